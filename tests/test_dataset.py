"""`fmnist.data.FashionMNIST`: the verified arrays as a torch Dataset, in a plain loop and a multi-worker DataLoader."""

from __future__ import annotations

import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

import fmnist
from fmnist import data
from fmnist.data import FashionMNIST
from fmnist.errors import ConfigError


def as_array(image) -> np.ndarray:
    """A transform that pickles (module level): the PIL image as the uint8 array it came from."""
    return np.asarray(image)


def plus_ten(label: int) -> int:
    return label + 10


@pytest.fixture(scope="module")
def real_arrays(real_data_source):
    return data.load_data(real_data_source.path)


@pytest.fixture(scope="module")
def test_set(real_data_source):
    return FashionMNIST("test", data_dir=real_data_source.path)


def test_the_splits_have_their_sizes_and_class_names(real_data_source, test_set):
    assert len(FashionMNIST("train", data_dir=real_data_source.path)) == 60_000
    assert len(test_set) == 10_000
    assert test_set.classes == list(data.CLASS_NAMES) and test_set.classes[6] == "Shirt"
    assert isinstance(test_set, Dataset)
    assert "split='test'" in repr(test_set) and "10,000 images" in repr(test_set)


def test_an_item_is_a_unit_scaled_tensor_and_an_int(test_set, real_arrays):
    image, label = test_set[0]
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
    assert type(label) is int
    (_, _), (x_test, y_test) = real_arrays
    for index in (0, 1, 9_999, -1):
        image, label = test_set[index]
        torch.testing.assert_close(image, torch.from_numpy(x_test[index]).float().div(255).unsqueeze(0),
                                   rtol=0, atol=0)
        assert label == int(y_test[index])


def test_the_pixels_are_those_of_load_data(test_set, real_arrays):
    (_, _), (x_test, y_test) = real_arrays
    np.testing.assert_array_equal(test_set.images, x_test)
    np.testing.assert_array_equal(test_set.labels, y_test)
    images, labels = test_set.tensors()
    torch.testing.assert_close(images, data.preprocess(x_test), rtol=0, atol=0)
    assert labels.dtype == torch.int64 and labels.tolist()[:5] == y_test[:5].tolist()


def test_standard_normalisation_matches_training(real_data_source, real_arrays):
    standard = FashionMNIST("test", data_dir=real_data_source.path, normalize="standard")
    mean, std = data.normalization(True)
    torch.testing.assert_close(standard[3][0], data.preprocess(real_arrays[1][0][3], mean, std)[0], rtol=0, atol=0)


def test_transforms_get_a_pil_image_and_the_label(real_data_source, real_arrays):
    seen = []

    def transform(image):
        seen.append(image)
        return "transformed"

    dataset = FashionMNIST("test", transform=transform, target_transform=plus_ten, data_dir=real_data_source.path)
    image, label = dataset[5]
    assert image == "transformed" and label == int(real_arrays[1][1][5]) + 10
    assert seen[0].mode == "L" and seen[0].size == (28, 28)  # what torchvision's FashionMNIST passes
    np.testing.assert_array_equal(np.asarray(seen[0]), real_arrays[1][0][5])


def test_a_data_loader_with_two_workers_yields_every_batch(test_set, real_arrays):
    loader = DataLoader(test_set, batch_size=256, num_workers=2)
    batches = list(loader)
    assert len(batches) == 40  # 39 full batches and one of 16
    images, labels = batches[0]
    assert images.shape == (256, 1, 28, 28) and images.dtype == torch.float32
    assert labels.shape == (256,) and labels.dtype == torch.int64
    assert batches[-1][0].shape == (16, 1, 28, 28)
    np.testing.assert_array_equal(torch.cat([batch[1] for batch in batches]).numpy(), real_arrays[1][1])


def test_it_pickles_with_module_level_transforms(real_data_source):
    dataset = FashionMNIST("test", transform=as_array, target_transform=plus_ten, data_dir=real_data_source.path)
    copy = pickle.loads(pickle.dumps(dataset))
    image, label = copy[7]
    np.testing.assert_array_equal(image, dataset.images[7])
    assert label == int(dataset.labels[7]) + 10


def test_custom_data_with_verify_off(tiny_idx_dir, tiny_arrays):
    dataset = FashionMNIST("train", data_dir=tiny_idx_dir, verify=False)
    assert len(dataset) == len(tiny_arrays[0][1])
    np.testing.assert_array_equal(dataset.images, tiny_arrays[0][0])


@pytest.mark.parametrize("arguments,pattern", [
    ({"split": "validation"}, r"split 'validation' is not a Fashion-MNIST split; use 'train' .* or 'test'"),
    ({"split": "test", "normalize": "minmax"}, r"normalize 'minmax' is not one of unit, standard"),
])
def test_bad_arguments_are_one_line_errors(arguments, pattern):
    with pytest.raises(ConfigError, match=pattern) as caught:
        FashionMNIST(**arguments)
    assert "\n" not in str(caught.value)


def test_exported_lazily_without_loading_torch_on_import():
    assert fmnist.FashionMNIST is FashionMNIST is data.FashionMNIST
    code = "import sys, fmnist, fmnist.data; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"

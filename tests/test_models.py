"""Architecture facts the speed work relies on: reordered layers compute exactly what the Keras originals do."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fmnist.models import ConvNet, KerasCNN, count_parameters


@pytest.mark.parametrize("channels_last", [False, True])
def test_keras_cnn_computes_exactly_the_keras_layer_order_on_the_full_image(channels_last):
    """Pooling before ReLU, and reading only the 26x26 pixels that reach the output: the same outputs and
    gradients as Keras' Conv-ReLU-Pool order run on all 28x28 pixels."""
    torch.manual_seed(0)
    ours = KerasCNN()
    keras_order = nn.Sequential(nn.Conv2d(1, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
                                nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
                                nn.Flatten(), nn.Linear(64 * 5 * 5, 128), nn.ReLU(), nn.Linear(128, 10))
    for theirs, mine in zip(keras_order.parameters(), ours.parameters(), strict=True):
        theirs.data.copy_(mine.data)
    x = torch.rand(16, 1, 28, 28) - 0.3  # negative values too, so ReLU matters
    y = torch.randint(0, 10, (16,))
    if channels_last:
        ours, keras_order = (model.to(memory_format=torch.channels_last) for model in (ours, keras_order))
    assert keras_order[:4](x).shape[-2:] == (11, 11)  # conv 2's output before pool 2 drops a row and column
    for model in (ours, keras_order):
        F.cross_entropy(model(x), y).backward()
    assert torch.equal(ours(x), keras_order(x))
    for a, b in zip(ours.parameters(), keras_order.parameters(), strict=True):
        assert torch.equal(a.grad, b.grad)
    assert count_parameters(ours) == 225_034  # Keras' model.summary() for this network


def test_keras_cnn_ignores_the_last_two_rows_and_columns():
    torch.manual_seed(0)
    model = KerasCNN().eval()
    x = torch.rand(4, 1, 28, 28)
    changed = x.clone()
    changed[..., 26:, :] = 1.0
    changed[..., :, 26:] = 1.0
    assert torch.equal(model(x), model(changed))
    changed[..., 25, 0] += 1.0  # the last pixel row that counts
    assert not torch.equal(model(x), model(changed))


@pytest.mark.parametrize("depth", [1, 2])
def test_convnet_pools_before_its_last_relu_with_the_same_function_and_gradients(depth):
    import copy

    torch.manual_seed(0)
    model = ConvNet((8, 16, 32), depth=depth)
    reference = copy.deepcopy(model)  # the textbook order: conv-BN-ReLU, then max-pool
    for stage in reference.features:
        last = stage[depth - 1]
        stage[depth - 1] = nn.Sequential(last[0], last[1], nn.ReLU())
        stage[depth + 1] = nn.Identity()
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    for net in (model, reference):
        F.cross_entropy(net(x), y).backward()
    assert torch.equal(model(x), reference(x))
    for (name, a), b in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert torch.equal(a.grad, b.grad), name
    assert "features.0.0.1.running_mean" in model.state_dict()  # parameter names as before: old runs still load

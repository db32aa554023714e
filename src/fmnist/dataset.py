"""`FashionMNIST`: the verified dataset arrays of `fmnist.data` as a map-style `torch.utils.data.Dataset`.

It lives beside `fmnist.data` rather than in it because subclassing torch's `Dataset` needs torch at import time,
and `fmnist.data` must import without torch (`import fmnist` and `fmnist runs` stay fast). `fmnist.data.FashionMNIST`
and `fmnist.FashionMNIST` are this class, imported on first use.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from fmnist.data import CLASS_NAMES, SPLIT_FILES, load_split, locate_data, normalization, preprocess
from fmnist.errors import ConfigError

NORMALIZATIONS = ("unit", "standard")


class FashionMNIST(Dataset):
    """One Fashion-MNIST split ("train": 60,000 images, "test": 10,000) for a plain PyTorch loop.

    The images are the arrays `fmnist.load_data` returns: found by `fmnist.data.locate_data` (`data_dir`,
    `$FMNIST_DATA`, the cache, Debian's package, else a download) and checked against the published MD5s
    (`verify=False` for custom data). An item is `(image, label)`:

    - without `transform`, `image` is a float32 tensor (1, 28, 28) made by `fmnist.data.preprocess`, the function
      training and `Classifier` use: with `normalize="unit"` (the default) that is pixels / 255, on 0..1, as
      `fmnist train --normalize unit`; `normalize="standard"` subtracts the training set's mean and divides by its
      std, as the CNN presets were trained. `label` is an int (a DataLoader batches it as int64).
    - with `transform`, the transform receives a PIL image in mode "L" (28x28, light garment on black), as
      torchvision's `FashionMNIST` gives it, so torchvision transforms work unchanged; its result is the image.
      `target_transform`, when given, receives the int label.

    Arrays stay NumPy and no file is held open, so the dataset pickles into `DataLoader(num_workers=N)` workers;
    give module-level functions as transforms for the same reason (a lambda does not pickle under spawn).

    A plain PyTorch loop::

        loader = DataLoader(FashionMNIST("train"), batch_size=256, shuffle=True, num_workers=2)
        for images, labels in loader:  # images (256, 1, 28, 28) float32 on 0..1, labels (256,) int64
            loss = torch.nn.functional.cross_entropy(model(images), labels)
            optimizer.zero_grad()
            loss.backward(); optimizer.step()
    """

    classes: list[str] = list(CLASS_NAMES)

    def __init__(self, split: str = "train", transform: Callable[[Any], Any] | None = None,
                 target_transform: Callable[[int], Any] | None = None, data_dir: str | os.PathLike | None = None,
                 normalize: str = "unit", verify: bool = True) -> None:
        if split not in SPLIT_FILES:
            raise ConfigError(f"split {split!r} is not a Fashion-MNIST split; use 'train' (60,000 images) or "
                              "'test' (10,000)")
        if normalize not in NORMALIZATIONS:
            raise ConfigError(f"normalize {normalize!r} is not one of {', '.join(NORMALIZATIONS)}")
        source = locate_data(data_dir)
        self.split, self.root, self.normalize = split, str(source.path), normalize
        self.transform, self.target_transform = transform, target_transform
        self.images, self.labels = load_split(source, split, verify)
        self._mean, self._std = normalization(normalize == "standard")

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        """`(image, label)` of image `index` (negative indices count from the end, as for a list)."""
        pixels, label = self.images[index], int(self.labels[index])
        if self.transform is not None:
            from PIL import Image

            image: Any = self.transform(Image.fromarray(np.ascontiguousarray(pixels)))  # uint8 2-D -> mode "L"
        else:
            image = preprocess(pixels, self._mean, self._std)[0]  # (1, 1, 28, 28) -> (1, 28, 28)
        return image, (self.target_transform(label) if self.target_transform is not None else label)

    def __repr__(self) -> str:
        extras = "".join(f", {name}={value!r}" for name, value in (("transform", self.transform),
                                                                    ("target_transform", self.target_transform))
                         if value is not None)
        return (f"FashionMNIST(split={self.split!r}, {len(self):,} images, normalize={self.normalize!r}"
                f"{extras}, root={self.root!r})")

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole split at once, `(images (n, 1, 28, 28) float32, labels (n,) int64)`, as `fmnist.train`
        holds it in memory: faster than a DataLoader when no per-image transform is needed."""
        return preprocess(self.images, self._mean, self._std), torch.from_numpy(self.labels.astype(np.int64))

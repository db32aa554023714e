"""fmnist: Fashion-MNIST done right, with PyTorch.

    import fmnist
    (x_train, y_train), (x_test, y_test) = fmnist.load_data()
    result = fmnist.train("fast")                  # a preset name, a TrainConfig, or settings as keywords
    classifier = result.classifier                 # or fmnist.Classifier.load("runs/fast")
    print(fmnist.summary("fast"))                  # the network, layer by layer, as Keras' model.summary()
    dataset = fmnist.FashionMNIST("train")         # a torch Dataset of (image, label) for your own loop
    mine = fmnist.train("fast", model=MyNet())     # any nn.Module (N,1,28,28) -> (N,10) logits, the whole loop

Import is light: torch-heavy parts (`train`, `Classifier`, `summary`, `FashionMNIST`) load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from fmnist.data import CLASS_NAMES, load_data
from fmnist.errors import FmnistError

# name -> the module that defines it, imported when the name is first used
_LAZY = {"train": "fmnist.training", "TrainConfig": "fmnist.config", "Classifier": "fmnist.predict",
         "summary": "fmnist.model_summary", "FashionMNIST": "fmnist.dataset"}

__all__ = ["CLASS_NAMES", "Classifier", "FashionMNIST", "FmnistError", "TrainConfig", "load_data", "summary",
           "train"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fmnist' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))

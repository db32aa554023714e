"""fmnist: Fashion-MNIST done right, with PyTorch.

Import is light: torch-heavy parts load on first use.
"""

from fmnist.data import CLASS_NAMES, load_data
from fmnist.errors import FmnistError

__all__ = ["CLASS_NAMES", "FmnistError", "load_data"]
__version__ = "0.1.0"

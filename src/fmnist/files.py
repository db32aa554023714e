"""The mode of the files fmnist writes atomically (a temporary file renamed into place).

Temporary files are created 0600; the renamed file gets the mode a plain open() would give (0666 minus the
umask), so a model, figure or dataset file made by one user can be read by another (a server, a teammate).
The umask is read once, at import. No heavy imports here: data.py and plots.py use it without torch.
"""

from __future__ import annotations

import os
from pathlib import Path

_UMASK = os.umask(0o022)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK


def publish(temporary: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Give a finished temporary file the usual mode and rename it to `path` (atomic on one filesystem)."""
    os.chmod(temporary, FILE_MODE)
    os.replace(temporary, path)
    return Path(path)

"""Torch-free file writing: atomic writes (a temporary file renamed into place), JSON, and the files' mode.

Temporary files are created 0600; the renamed file gets the mode a plain open() would give (0666 minus the
umask), so a model, figure or dataset file made by one user can be read by another (a server, a teammate).
The umask is read once, at import, without changing it. No heavy imports here: `runs`, `sweep`, `data`, `plots`
and the CLI's listing commands use it without loading torch.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def _read_umask() -> int:
    """The process's umask, read without changing it where Linux tells it (a set-and-restore elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_read_umask()


def publish(temporary: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Give a finished temporary file the usual mode and rename it to `path` (atomic on one filesystem)."""
    os.chmod(temporary, FILE_MODE)
    os.replace(temporary, path)
    return Path(path)


def atomic_write_bytes(path: str | os.PathLike, payload: bytes) -> Path:
    """Write to a temporary file in the same folder, fsync, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False)
    try:
        with handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        publish(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Text version of `atomic_write_bytes` (UTF-8)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, value: Any) -> Path:
    """Pretty JSON, atomically."""
    return atomic_write_text(path, json.dumps(value, indent=2) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    """Parsed JSON; raises FileNotFoundError, OSError, UnicodeDecodeError or json.JSONDecodeError for the caller
    to turn into its own one-line error."""
    return json.loads(Path(path).read_text(encoding="utf-8"))

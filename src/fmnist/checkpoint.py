"""Save and load models as safetensors + JSON metadata, atomically; nothing executable, no pickle.

A model file pair (`model.safetensors`, `model.json`) describes itself: the JSON names the architecture and its
config, so `load_model` rebuilds the network before loading weights, and carries classes, normalisation,
the training config and the metrics. The resume checkpoint holds tensors and plain values only.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes
from torch import nn

from fmnist.errors import ModelFileError
from fmnist.files import publish
from fmnist.models import create_model

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
META_FILE = "model.json"


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
    return atomic_write_text(path, json.dumps(value, indent=2, sort_keys=False) + "\n")


def _weights_to_bytes(model: nn.Module) -> bytes:
    state = {name: tensor.detach().contiguous().cpu() for name, tensor in model.state_dict().items()}
    return save_safetensors_bytes(state)


def save_model(model: nn.Module, directory: str | os.PathLike, meta: dict[str, Any]) -> Path:
    """Write `model.safetensors` then `model.json` (the JSON last: its presence means the pair is complete)."""
    directory = Path(directory)
    if "architecture" not in meta:
        raise ValueError("meta needs an 'architecture' entry: {'name': ..., 'config': {...}}")
    atomic_write_bytes(directory / WEIGHTS_FILE, _weights_to_bytes(model))
    write_json(directory / META_FILE, {"format_version": FORMAT_VERSION, **meta})
    return directory


def read_meta(directory: str | os.PathLike) -> dict[str, Any]:
    """Read and check `model.json` of a run folder."""
    path = Path(directory) / META_FILE
    if not Path(directory).is_dir():
        raise ModelFileError(f"{directory}: no such run folder; pass a folder made by `fmnist train`")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelFileError(f"{path}: missing; this folder holds no finished model (train one with `fmnist train`)") \
            from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ModelFileError(f"{path}: not valid JSON ({error}); the file is damaged, retrain or restore it") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("architecture"), dict) \
            or "name" not in meta["architecture"]:
        raise ModelFileError(f"{path}: not an fmnist model description (no architecture); "
                             "point at a run folder made by `fmnist train`")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise ModelFileError(f"{path}: written by a newer fmnist (format {meta['format_version']}); upgrade fmnist")
    return meta


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a safetensors file, turning every failure into a one-line `ModelFileError`."""
    path = Path(path)
    try:
        return load_safetensors_bytes(path.read_bytes())
    except FileNotFoundError:
        raise ModelFileError(f"{path}: missing; the run folder is incomplete, retrain or restore it") from None
    except (SafetensorError, ValueError, OSError) as error:
        raise ModelFileError(f"{path}: not a readable safetensors file ({error}); it is truncated or damaged") \
            from None


def load_model(directory: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the architecture named in `model.json`, load its weights strictly, return (model in eval mode, meta)."""
    meta = read_meta(directory)
    architecture = meta["architecture"]
    model = create_model(architecture["name"], **architecture.get("config", {}))
    state = load_tensors(Path(directory) / WEIGHTS_FILE)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        first = str(error).splitlines()[0] if str(error) else "shape or key mismatch"
        raise ModelFileError(f"{Path(directory) / WEIGHTS_FILE}: weights do not fit architecture "
                             f"{architecture['name']} {architecture.get('config', {})} ({first}); "
                             "the weights and model.json come from different models") from None
    model.eval()
    return model, meta

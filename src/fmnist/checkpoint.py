"""The run folder on disk: the one reader and writer of every file `fmnist train` leaves there.

    model.safetensors + model.json   the model: weights, and a typed, versioned `RunMeta` that rebuilds it
    config.json                      the resolved `TrainConfig`
    metrics.json                     the final measurements
    history.csv                      one row per epoch
    resume.safetensors + resume.json what `train(resume=...)` needs to continue bit for bit

Everything is written atomically (a temporary file renamed into place), nothing is pickled, and the model.json
is written last, so its presence means the model pair is complete. torch loads only when weights are read or
written: `fmnist runs` and sweeps read run folders without it.
"""

from __future__ import annotations

import csv
import io
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fmnist.config import TrainConfig
from fmnist.errors import ConfigError, ModelFileError
from fmnist.files import atomic_write_bytes, atomic_write_text, read_json, write_json

if TYPE_CHECKING:
    import torch
    from torch import nn

FORMAT_VERSION = 2  # 2: calibration at the top of model.json (1 kept it under metrics)
WEIGHTS_FILE = "model.safetensors"
META_FILE = "model.json"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
HISTORY_FILE = "history.csv"
RESUME_TENSORS = "resume.safetensors"
RESUME_META = "resume.json"
EVALUATION_FILE = "evaluation.json"


class Architecture(BaseModel):
    """The network's name and the keyword config `create_model` rebuilds it from."""

    name: str
    config: dict[str, Any] = Field(default_factory=dict)


class Normalization(BaseModel):
    """How pixels are scaled before the model: (x * scale - mean) / std."""

    scale: float = 1 / 255
    mean: float = 0.0
    std: float = Field(1.0, gt=0)


class Calibration(BaseModel):
    """Temperature scaling fitted on the validation split; it changes every probability the model reports."""

    fitted: bool = False
    temperature: float = Field(1.0, gt=0)
    images: int | None = None
    ece_before: float | None = None
    ece_after: float | None = None
    unusual_logit_threshold: float | None = None
    note: str | None = None


class RunMeta(BaseModel):
    """model.json: everything needed to rebuild the model and answer like it did when it was saved."""

    model_config = ConfigDict(extra="ignore")

    format_version: int = FORMAT_VERSION
    architecture: Architecture
    preset: str | None = None
    classes: list[str]
    normalization: Normalization = Field(default_factory=Normalization)
    channels_last: bool = False
    calibration: Calibration = Field(default_factory=Calibration)
    metrics: dict[str, Any] = Field(default_factory=dict)
    config: dict[str, Any] = Field(default_factory=dict)
    created: str | None = None

    def train_config(self) -> TrainConfig:
        """The `TrainConfig` the model was trained with."""
        return TrainConfig(**self.config)


def now() -> str:
    """A timestamp for `created` fields: UTC, to the second."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ----------------------------------------------------------------------------------------------- model pair
def _weights_to_bytes(model: nn.Module) -> bytes:
    from safetensors.torch import save

    return save({name: tensor.detach().contiguous().cpu() for name, tensor in model.state_dict().items()})


def save_model(model: nn.Module, directory: str | os.PathLike, meta: RunMeta) -> Path:
    """Write `model.safetensors` then `model.json` (the JSON last: its presence means the pair is complete)."""
    directory = Path(directory)
    atomic_write_bytes(directory / WEIGHTS_FILE, _weights_to_bytes(model))
    write_json(directory / META_FILE, meta.model_dump())
    return directory


def parse_meta(values: Any, label: str = META_FILE) -> RunMeta:
    """A model description from parsed JSON (model.json, or an ONNX file's copy), migrated to this version."""
    if not isinstance(values, dict) or not isinstance(values.get("architecture"), dict) \
            or "name" not in values["architecture"]:
        raise ModelFileError(f"{label}: not an fmnist model description (no architecture); "
                             "point at a run folder made by `fmnist train`")
    version = values.get("format_version", 1)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ModelFileError(f"{label}: written by a newer fmnist (format {version!r}, this one reads up to "
                             f"{FORMAT_VERSION}); upgrade fmnist")
    if version < 2 and "calibration" not in values:  # format 1 kept the calibration under metrics
        metrics = dict(values.get("metrics") or {})
        values = {**values, "calibration": metrics.pop("calibration", {}), "metrics": metrics}
    values.setdefault("classes", _default_classes())
    try:
        return RunMeta(**{**values, "format_version": FORMAT_VERSION})
    except ValidationError as error:
        problem = error.errors()[0]
        where = ".".join(str(part) for part in problem["loc"])
        raise ModelFileError(f"{label}: {where}: {problem['msg']}; the file is damaged, retrain or restore it") \
            from None


def _default_classes() -> list[str]:
    from fmnist.data import CLASS_NAMES

    return list(CLASS_NAMES)


def read_meta(directory: str | os.PathLike) -> RunMeta:
    """Read and check `model.json` of a run folder."""
    path = Path(directory) / META_FILE
    if not Path(directory).is_dir():
        raise ModelFileError(f"{directory}: no such run folder; pass a folder made by `fmnist train`")
    try:
        values = read_json(path)
    except FileNotFoundError:
        raise ModelFileError(f"{path}: missing; this folder holds no finished model (train one with `fmnist train`)") \
            from None
    except (ValueError, OSError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ModelFileError(f"{path}: not valid JSON ({error}); the file is damaged, retrain or restore it") from None
    return parse_meta(values, str(path))


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a safetensors file, turning every failure into a one-line `ModelFileError`."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    path = Path(path)
    try:
        return load(path.read_bytes())
    except FileNotFoundError:
        raise ModelFileError(f"{path}: missing; the run folder is incomplete, retrain or restore it") from None
    except (SafetensorError, ValueError, OSError) as error:
        raise ModelFileError(f"{path}: not a readable safetensors file ({error}); it is truncated or damaged") \
            from None


def build_model(meta: RunMeta) -> nn.Module:
    """The untrained network `meta` describes."""
    from fmnist.models import create_model

    try:
        return create_model(meta.architecture.name, **meta.architecture.config)
    except ConfigError as error:
        raise ModelFileError(f"{META_FILE}: {error}; the file is damaged or from another fmnist") from None


def load_model(directory: str | os.PathLike) -> tuple[nn.Module, RunMeta]:
    """Rebuild the architecture named in `model.json`, load its weights strictly, return (model in eval mode, meta)."""
    meta = read_meta(directory)
    model = build_model(meta)
    state = load_tensors(Path(directory) / WEIGHTS_FILE)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        first = str(error).splitlines()[0] if str(error) else "shape or key mismatch"
        raise ModelFileError(f"{Path(directory) / WEIGHTS_FILE}: weights do not fit architecture "
                             f"{meta.architecture.name} {meta.architecture.config} ({first}); "
                             "the weights and model.json come from different models") from None
    model.eval()
    return model, meta


# ----------------------------------------------------------------------------------------------- config, metrics
def write_config(run_dir: Path, config: TrainConfig) -> None:
    """config.json: the resolved settings, written when a run starts."""
    write_json(run_dir / CONFIG_FILE, config.to_dict())


def read_config(run_dir: Path) -> TrainConfig:
    """The settings a run folder was started with (what `--resume` continues)."""
    try:
        values = read_json(run_dir / CONFIG_FILE)
    except (OSError, ValueError):
        raise ModelFileError(f"{run_dir}: not a resumable run folder (no readable {CONFIG_FILE})") from None
    if not isinstance(values, dict):
        raise ModelFileError(f"{run_dir / CONFIG_FILE}: not a JSON object of settings; retrain from scratch")
    try:
        return TrainConfig(**values)
    except ConfigError as error:
        raise ModelFileError(f"{run_dir / CONFIG_FILE}: {error}; the file is damaged, retrain from scratch") from None


def write_metrics(run_dir: Path, metrics: dict[str, Any]) -> None:
    write_json(run_dir / METRICS_FILE, metrics)


def read_json_or_empty(path: Path) -> dict[str, Any]:
    """A JSON object, or {} when the file is missing or damaged (for listings that must not fail)."""
    try:
        values = read_json(path)
    except (OSError, ValueError):
        return {}
    return values if isinstance(values, dict) else {}


def write_history(run_dir: Path, history: list[dict[str, Any]]) -> None:
    """history.csv: one row per epoch; columns in first-seen order, empty cells for missing values."""
    columns: list[str] = []
    for row in history:
        columns += [key for key in row if key not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    for row in history:
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    atomic_write_text(run_dir / HISTORY_FILE, buffer.getvalue())


def read_history(run_dir: str | os.PathLike) -> list[dict[str, float]]:
    """history.csv as rows of floats (empty cells dropped), or [] when the run has none."""
    path = Path(run_dir) / HISTORY_FILE
    if not path.is_file():
        return []
    with path.open(newline="") as handle:
        return [{key: float(value) for key, value in row.items() if value not in ("", None)}
                for row in csv.DictReader(handle)]


# ----------------------------------------------------------------------------------------------- resume
def save_resume(run_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, generator: torch.Generator,
                state: dict[str, Any]) -> None:
    """Everything needed to continue bit-for-bit: weights, optimiser moments, RNG states (tensors + plain JSON)."""
    import torch
    from safetensors.torch import save

    tensors = {f"model.{k}": v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    optimizer_state = optimizer.state_dict()
    for index, slots in optimizer_state["state"].items():
        for key, value in slots.items():
            tensors[f"optim.{index}.{key}"] = torch.as_tensor(value).contiguous().cpu()
    tensors["rng.torch"] = torch.get_rng_state()
    device = next(model.parameters()).device
    if device.type == "cuda":  # dropout draws from the GPU's generator
        tensors["rng.cuda"] = torch.cuda.get_rng_state(device)
    tensors["rng.generator"] = generator.get_state()
    metadata = {"epoch": str(state["epoch"])}  # checked against resume.json: both files from the same epoch
    atomic_write_bytes(run_dir / RESUME_TENSORS, save(tensors, metadata=metadata))
    write_json(run_dir / RESUME_META, {**state, "param_groups": optimizer_state["param_groups"]})


def load_resume(run_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                generator: torch.Generator) -> dict[str, Any]:
    """Restore what `save_resume` wrote into `model`, `optimizer` and the RNGs; return the plain state."""
    import torch
    from safetensors import safe_open

    try:
        state = read_json(run_dir / RESUME_META)
    except (OSError, ValueError) as error:
        raise ModelFileError(f"{run_dir / RESUME_META}: no usable resume checkpoint ({error.__class__.__name__}); "
                             "only runs stopped after at least one epoch can be resumed") from None
    tensors = load_tensors(run_dir / RESUME_TENSORS)
    with safe_open(run_dir / RESUME_TENSORS, framework="pt") as handle:
        saved_epoch = (handle.metadata() or {}).get("epoch")
    if saved_epoch != str(state["epoch"]):
        raise ModelFileError(f"{run_dir}: resume.safetensors (epoch {saved_epoch}) and resume.json (epoch "
                             f"{state['epoch']}) disagree; the checkpoint was cut off, retrain from scratch")
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    slots: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            slots.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": slots, "param_groups": state["param_groups"]})
    # Safetensors stores contiguous tensors; fused optimisers walk raw memory, so moments must have their
    # parameter's layout again (channels-last conv weights), or resume silently diverges.
    for parameter, slot in optimizer.state.items():
        for key, value in slot.items():
            if value.shape == parameter.shape:
                slot[key] = torch.empty_like(parameter).copy_(value)
    torch.set_rng_state(tensors["rng.torch"])
    generator.set_state(tensors["rng.generator"])
    device = next(model.parameters()).device
    if device.type == "cuda" and "rng.cuda" in tensors:
        torch.cuda.set_rng_state(tensors["rng.cuda"], device)
    return state

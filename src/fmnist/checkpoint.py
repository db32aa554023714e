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

import contextlib
import csv
import io
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from fmnist.config import CustomNetwork, TrainConfig
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
NUM_CLASSES = 10  # fmnist.models.NUM_CLASSES, not imported: that would load torch for `fmnist runs`


_Finite = Annotated[float, Field(allow_inf_nan=False)]
_Positive = Annotated[float, Field(gt=0, allow_inf_nan=False)]
MAX_META_BYTES = 4 * 1024 * 1024  # a model.json is about 2 KB; anything this large is not one
MAX_HEADER_BYTES = 1024 * 1024  # a safetensors header names a few dozen tensors in a few KB


class Architecture(BaseModel):
    """The network's name and the keyword config `create_model` rebuilds it from (checked there, with torch)."""

    model_config = ConfigDict(strict=True)

    name: str = Field(max_length=100)
    config: dict[str, Any] = Field(default_factory=dict)


class Normalization(BaseModel):
    """How pixels are scaled before the model: (x * scale - mean) / std."""

    scale: _Positive = 1 / 255
    mean: _Finite = 0.0
    std: _Positive = 1.0


class Calibration(BaseModel):
    """Temperature scaling fitted on the validation split; it changes every probability the model reports.
    A temperature of 0, below 0 or not finite would turn every answer into NaN or a certainty, so it is refused."""

    fitted: bool = False
    temperature: _Positive = 1.0
    images: int | None = None
    ece_before: float | None = None
    ece_after: float | None = None
    unusual_logit_threshold: _Finite | None = None
    note: str | None = None


def _ten_names(classes: list[str]) -> list[str]:
    """The model has ten outputs; a list of another length would mislabel or drop answers."""
    if len(classes) != NUM_CLASSES or len(set(classes)) != NUM_CLASSES or not all(name.strip() for name in classes):
        raise ValueError(f"expected {NUM_CLASSES} distinct, non-empty class names, got {len(classes)} "
                         f"({len(set(classes))} distinct)")
    return classes


class RunMeta(BaseModel):
    """model.json: everything needed to rebuild the model and answer like it did when it was saved. Types are
    strict (a file is data, not a form), so a damaged file fails here with one line instead of later in torch."""

    model_config = ConfigDict(extra="ignore", strict=True)

    format_version: int = FORMAT_VERSION
    architecture: Architecture
    preset: str | None = None
    classes: Annotated[list[Annotated[str, Field(max_length=100)]], AfterValidator(_ten_names)]
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
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ModelFileError(f"{label}: format_version {version!r} is not a format fmnist writes (1..{FORMAT_VERSION});"
                             " the file is damaged, retrain or restore it")
    if version > FORMAT_VERSION:
        raise ModelFileError(f"{label}: written by a newer fmnist (format {version!r}, this one reads up to "
                             f"{FORMAT_VERSION}); upgrade fmnist")
    if version < 2 and "calibration" not in values:  # format 1 kept the calibration under metrics
        metrics = dict(values.get("metrics") or {})
        values = {**values, "calibration": metrics.pop("calibration", {}), "metrics": metrics}
    values.setdefault("classes", _default_classes())
    try:
        return RunMeta(**{**values, "format_version": FORMAT_VERSION})
    except ValidationError as error:
        problem = error.errors(include_url=False)[0]
        where = ".".join(str(part) for part in problem["loc"])
        reason = problem["msg"].removeprefix("Value error, ")
        raise ModelFileError(f"{label}: {where}: {reason}; the file is damaged, retrain or restore it") from None


def _default_classes() -> list[str]:
    from fmnist.data import CLASS_NAMES

    return list(CLASS_NAMES)


def read_meta(directory: str | os.PathLike) -> RunMeta:
    """Read and check `model.json` of a run folder (its size first: a huge file is not read into memory)."""
    path = Path(directory) / META_FILE
    if not Path(directory).is_dir():
        raise ModelFileError(f"{directory}: no such run folder; pass a folder made by `fmnist train`")
    try:
        if path.stat().st_size > MAX_META_BYTES:
            raise ModelFileError(f"{path}: {path.stat().st_size:,} bytes, over the {MAX_META_BYTES:,} a model "
                                 "description can be; the file is damaged, retrain or restore it")
        values = read_json(path)
    except FileNotFoundError:
        raise ModelFileError(f"{path}: missing; this folder holds no finished model (train one with `fmnist train`)") \
            from None
    except (ValueError, OSError, RecursionError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        detail = " ".join(str(error).split())[:200] or type(error).__name__
        raise ModelFileError(f"{path}: not valid JSON ({detail}); the file is damaged, retrain or restore it") \
            from None
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


def build_model(meta: RunMeta, trust_code: bool = False, source: str = META_FILE) -> nn.Module:
    """The untrained network `meta` describes; its config's types, ranges and parameter count are checked first
    (`fmnist.models.check_config`), so a damaged description never allocates more than the cap.

    A custom network (architecture "custom") is rebuilt by importing the module its model.json names, which runs
    that module's code: a run folder from someone else could run anything. So it is built only with
    `trust_code=True`; otherwise `UntrustedCodeError` names the code. `source` names the run in messages."""
    from fmnist.models import CUSTOM, check_trust, create_model

    if meta.architecture.name == CUSTOM:
        network = _custom_network(meta.architecture.config, source)
        check_trust(network.target, source, trust_code)
        try:
            return create_model(CUSTOM, **network.model_dump())
        except ConfigError as error:  # the code is missing here, or no longer builds what was trained
            raise ModelFileError(f"{source}: {error}") from None
    try:
        return create_model(meta.architecture.name, **meta.architecture.config)
    except ConfigError as error:
        raise ModelFileError(f"{META_FILE}: {error}; the file is damaged or from another fmnist") from None


def _custom_network(config: dict[str, Any], source: str) -> CustomNetwork:
    """The import path and keyword arguments of a custom architecture, checked as data before anything is imported."""
    try:
        return CustomNetwork(**config)
    except ValidationError as error:
        problem = error.errors(include_url=False)[0]
        where = ".".join(str(part) for part in problem["loc"]) or "config"
        reason = problem["msg"].removeprefix("Value error, ")
        raise ModelFileError(f"{source}: {META_FILE}: architecture custom: {where}: {reason}; the file is damaged or "
                             "from another fmnist") from None


def _tensor_table(path: Path) -> tuple[dict[str, Any], int]:
    """The safetensors header (name -> dtype, shape, offsets) and the bytes the file holds after it, read without
    the tensors."""
    import json
    import struct

    try:
        with path.open("rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            prefix = handle.read(8)
            length = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else -1
            if not 2 <= length <= min(MAX_HEADER_BYTES, size - 8):
                raise ValueError(f"header length {length}")
            table = json.loads(handle.read(length))
    except FileNotFoundError:
        raise ModelFileError(f"{path}: missing; the run folder is incomplete, retrain or restore it") from None
    except (OSError, ValueError, RecursionError) as error:
        raise ModelFileError(f"{path}: not a readable safetensors file ({' '.join(str(error).split())[:120]}); it "
                             "is truncated or damaged") from None
    if not isinstance(table, dict):
        raise ModelFileError(f"{path}: not a readable safetensors file (no tensor table); it is truncated or damaged")
    table.pop("__metadata__", None)
    return table, size - 8 - length


def check_weights(path: str | os.PathLike, expected: dict[str, torch.Tensor], what: str) -> None:
    """Refuse a weights file whose names, shapes or dtypes differ from `expected` (the model's state dict) or whose
    size disagrees with its header, before any tensor is read: the cost of loading is then bounded by the model."""
    path = Path(path)
    table, data_bytes = _tensor_table(path)
    problem = _first_mismatch(table, expected)
    if problem is None:
        described = max((entry["data_offsets"][1] for entry in table.values()), default=0)
        if data_bytes != described:
            raise ModelFileError(f"{path}: {data_bytes:,} bytes of tensors where its header describes {described:,}; "
                                 "it is truncated or damaged, retrain or restore it")
    if problem is not None:
        raise ModelFileError(f"{path}: weights do not fit {what} ({problem}); the weights and model.json come from "
                             "different models, or the file is damaged")


def _dtype_name(tensor: torch.Tensor) -> str:
    """The safetensors name of a tensor's dtype ("F32", "I64", ...)."""
    import torch

    names = {torch.float32: "F32", torch.float64: "F64", torch.float16: "F16", torch.bfloat16: "BF16",
             torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
             torch.bool: "BOOL"}
    return names.get(tensor.dtype, str(tensor.dtype))


def _first_mismatch(table: dict[str, Any], expected: dict[str, torch.Tensor]) -> str | None:
    """The first tensor that is missing, extra, or of another shape, dtype or byte length, said in a few words."""
    missing = sorted(set(expected) - set(table))
    extra = sorted(set(table) - set(expected))
    if missing or extra:
        return f"missing tensor {missing[0]!r}" if missing else f"unexpected tensor {extra[0]!r}"
    for name, tensor in expected.items():
        entry = table[name]
        if not isinstance(entry, dict):
            return f"tensor {name!r} has no description"
        dtype, shape = _dtype_name(tensor), list(tensor.shape)
        if entry.get("dtype") != dtype or entry.get("shape") != shape:
            return f"tensor {name!r} is {entry.get('dtype')} {entry.get('shape')}, the model needs {dtype} {shape}"
        offsets = entry.get("data_offsets")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and offsets[0] >= 0 and offsets[1] - offsets[0] == tensor.numel() * tensor.element_size()):
            return f"tensor {name!r} has a wrong byte range {offsets}"
    return None


def check_finite(tensors: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Refuse NaN or infinite weights: the model would answer NaN for every image."""
    import torch

    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ModelFileError(f"{path}: tensor {name!r} holds NaN or infinite values; the model is broken "
                                 "(training diverged, or the file is damaged), retrain it")


def load_model(directory: str | os.PathLike, trust_code: bool = False) -> tuple[nn.Module, RunMeta]:
    """Rebuild the architecture named in `model.json`, load its weights strictly, return (model in eval mode, meta).

    Every check that bounds cost comes before the cost: the description (types, ranges, parameter count) before
    the network is built, the weights file's header (names, shapes, dtypes, size) before its tensors are read.
    A run of your own network imports the code its model.json names, which runs it: only with `trust_code=True`
    (see `build_model`)."""
    meta = read_meta(directory)
    model = build_model(meta, trust_code=trust_code, source=f"run folder {directory}")
    path = Path(directory) / WEIGHTS_FILE
    architecture = f"architecture {meta.architecture.name} {meta.architecture.config}"
    check_weights(path, model.state_dict(), architecture)
    state = load_tensors(path)
    check_finite(state, path)
    model.load_state_dict(state, strict=True)
    model.eval()
    return model, meta


# ----------------------------------------------------------------------------------------------- replacing a run
@contextlib.contextmanager
def building(run_dir: Path) -> Iterator[Path]:
    """The folder to write a run into that becomes `run_dir`: `run_dir` itself when it is new or empty, else a new
    sibling folder that replaces it when the block ends and is removed when the block fails.

    Why a whole folder and not a manifest: the old run stays complete and loadable until one rename, every reader
    (`predict`, `serve`, `runs`, sweeps) keeps reading plain files without checking anything, and a failure or kill
    during training leaves the old run untouched instead of a new config.json beside the old model.
    """
    if not run_dir.exists() or (run_dir.is_dir() and not any(run_dir.iterdir())):
        run_dir.mkdir(parents=True, exist_ok=True)
        yield run_dir
        return
    stranger = _not_run_file(run_dir)
    if stranger is not None:
        raise ModelFileError(f"{run_dir}: holds {stranger.name!r}, which no run writes, so it is not replaced; choose "
                             "another --out (a run needs a folder of its own)")
    staging = run_dir.with_name(f".{run_dir.name}.new-{os.getpid()}-{secrets.token_hex(3)}")
    staging.mkdir()  # the same parent: the swap is a rename on one filesystem
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _swap_in(staging, run_dir)


def final_dir(folder: str | os.PathLike) -> Path:
    """The folder a run being written into `folder` ends up as: `building` writes a replacement into a hidden
    sibling `.NAME.new-PID-HEX` and renames it to NAME at the end, so files that name their own run (the model
    card) must name NAME, not the staging folder. Any other folder is already its own final place."""
    folder = Path(folder)
    match = re.fullmatch(r"\.(.+)\.new-\d+-[0-9a-f]+", folder.name)
    return folder.with_name(match.group(1)) if match else folder


def _not_run_file(run_dir: Path) -> Path | None:
    """The first entry of `run_dir` that a run does not write (the folder is then not a run's, e.g. `runs/` itself),
    or None."""
    if not run_dir.is_dir():
        return run_dir
    for entry in run_dir.iterdir():
        if entry.is_dir():
            if entry.name not in ("plots", "tb"):  # tb/: TensorBoard's event files (`fmnist train --log tensorboard`)
                return entry
        elif not entry.name.startswith(".") and entry.suffix not in (".json", ".csv", ".safetensors", ".png",
                                                                      ".onnx", ".md"):
            return entry
    return None


def _swap_in(staging: Path, run_dir: Path) -> None:
    """Two renames microseconds apart (Linux has no portable directory exchange), then the old run is deleted.
    A kill between them leaves both folders beside `run_dir`, each complete, with no half-written one."""
    old = run_dir.with_name(f".{run_dir.name}.old-{os.getpid()}-{secrets.token_hex(3)}")
    os.rename(run_dir, old)
    try:
        os.rename(staging, run_dir)
    except OSError:
        os.rename(old, run_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)


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


class ResumeState(BaseModel):
    """resume.json: the plain values `save_resume` wrote beside the tensors, checked before anything is restored."""

    model_config = ConfigDict(extra="allow", strict=True)

    epoch: int = Field(ge=0)
    history: list[dict[str, Any]]
    train_seconds: Annotated[float, Field(ge=0, allow_inf_nan=False)]
    param_groups: list[dict[str, Any]] = Field(min_length=1)


def _read_resume_state(run_dir: Path) -> dict[str, Any]:
    """resume.json as checked plain values, or one line saying why the checkpoint cannot be used."""
    path = run_dir / RESUME_META
    try:
        if path.stat().st_size > MAX_META_BYTES * 16:  # a history of thousands of epochs is still far below this
            raise ValueError("too large")
        state = ResumeState(**read_json(path)).model_dump()
    except (OSError, ValueError, TypeError, RecursionError) as error:  # ValidationError is a ValueError
        reason = (f"{error.error_count()} bad values, first {'.'.join(map(str, error.errors()[0]['loc']))}"
                  if isinstance(error, ValidationError) else error.__class__.__name__)
        raise ModelFileError(f"{path}: no usable resume checkpoint ({reason}); only runs stopped after at least one "
                             "epoch can be resumed, else retrain from scratch") from None
    if len(state["history"]) != state["epoch"]:
        raise ModelFileError(f"{path}: {len(state['history'])} history rows for epoch {state['epoch']}; the "
                             "checkpoint is damaged, retrain from scratch")
    return state


def _check_resume_tensors(path: Path, model: nn.Module) -> None:
    """The model's tensors in the checkpoint must fit the model, and the whole file stay within what weights,
    optimiser moments (two per weight for Adam) and RNG states take: checked from the header, before reading."""
    table, data_bytes = _tensor_table(path)
    expected = {f"model.{name}": tensor for name, tensor in model.state_dict().items()}
    problem = _first_mismatch({key: value for key, value in table.items() if key.startswith("model.")}, expected)
    model_bytes = sum(tensor.numel() * tensor.element_size() for tensor in expected.values())
    if problem is None and data_bytes > 3 * model_bytes + 1024 * 1024:
        problem = f"{data_bytes:,} bytes of tensors for a model of {model_bytes:,}"
    if problem is not None:
        raise ModelFileError(f"{path}: the checkpoint does not fit this run's model ({problem}); it is damaged, "
                             "retrain from scratch")


def load_resume(run_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                generator: torch.Generator) -> dict[str, Any]:
    """Restore what `save_resume` wrote into `model`, `optimizer` and the RNGs; return the plain state. A damaged
    checkpoint is one `ModelFileError` line, whichever of its parts is wrong."""
    from safetensors import safe_open

    state = _read_resume_state(run_dir)
    _check_resume_tensors(run_dir / RESUME_TENSORS, model)
    tensors = load_tensors(run_dir / RESUME_TENSORS)
    check_finite({key: value for key, value in tensors.items() if not key.startswith("rng.")}, run_dir / RESUME_TENSORS)
    with safe_open(run_dir / RESUME_TENSORS, framework="pt") as handle:
        saved_epoch = (handle.metadata() or {}).get("epoch")
    if saved_epoch != str(state["epoch"]):
        raise ModelFileError(f"{run_dir}: resume.safetensors (epoch {saved_epoch}) and resume.json (epoch "
                             f"{state['epoch']}) disagree; the checkpoint was cut off, retrain from scratch")
    try:
        _restore(tensors, state, model, optimizer, generator)
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as error:
        detail = " ".join(str(error).split())[:160] or type(error).__name__
        raise ModelFileError(f"{run_dir / RESUME_TENSORS}: the checkpoint cannot be restored ({detail}); it is "
                             "damaged, retrain from scratch") from None
    return state


def _restore(tensors: dict[str, torch.Tensor], state: dict[str, Any], model: nn.Module,
             optimizer: torch.optim.Optimizer, generator: torch.Generator) -> None:
    """Weights, optimiser moments and RNG states back into the live objects."""
    import torch

    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    slots: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            slots.setdefault(int(index), {})[name] = value
    _check_groups(optimizer.param_groups, state["param_groups"])
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


def _check_groups(live: list[dict[str, Any]], saved: list[dict[str, Any]]) -> None:
    """Saved optimiser settings must have the live ones' kinds (a learning rate that is a string would only fail
    at the first step, with a traceback); `ValueError` names the first that does not."""
    import math

    if len(live) != len(saved):
        raise ValueError(f"{len(saved)} parameter groups, the optimiser has {len(live)}")
    for group, stored in zip(live, saved, strict=True):
        for key, value in group.items():
            given = stored.get(key)
            if key == "params":
                ok = isinstance(given, list) and len(given) == len(value) and all(type(i) is int for i in given)
            elif isinstance(value, bool) or value is None:
                ok = type(given) is type(value)
            elif isinstance(value, (int, float)):
                ok = type(given) in (int, float) and math.isfinite(given)
            elif isinstance(value, (tuple, list)):
                ok = isinstance(given, list) and len(given) == len(value) \
                    and all(type(v) in (int, float) and math.isfinite(v) for v in given)
            else:
                ok = True
            if not ok:
                raise ValueError(f"optimiser setting {key!r} is {given!r}")

"""`TrainConfig`, the one schema of a training run, and the presets, with the evidence that chose each.

The schema is a pydantic model: field types and ranges are declared once and checked by pydantic, so the CLI's
train flags, `--config` files, sweep specs and resumed run folders are all validated by this one class, and every
problem comes out as a one-line `ConfigError` naming the setting and the fix. No torch here: listing presets and
validating a sweep spec stay fast.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from fmnist.errors import ConfigError, did_you_mean, short_repr

_DURATION = re.compile(r"(?:(\d+(?:\.\d*)?)h)?(?:(\d+(?:\.\d*)?)m)?(?:(\d+(?:\.\d*)?)s?)?")


def parse_duration(value: Any) -> Any:
    """"3m", "90s", "1h30m" or a number of seconds -> seconds (float); anything else is left for the schema to
    refuse."""
    if isinstance(value, str):
        match = _DURATION.fullmatch(value.strip().lower().replace(" ", ""))
        if match and value.strip() and any(match.groups()):
            hours, minutes, seconds = (float(part or 0) for part in match.groups())
            return hours * 3600 + minutes * 60 + seconds
        raise ValueError(f"budget {value!r} is not a duration; write it like 3m, 90s, 1h30m or a number of seconds")
    return float(value) if isinstance(value, int) and not isinstance(value, bool) else value


PositiveInt = Annotated[int, Field(gt=0)]
Duration = Annotated[Annotated[float, Field(gt=0)] | None, BeforeValidator(parse_duration)]
Fraction = Annotated[float, Field(ge=0, lt=1)]

# A class as `package.module:Qualified.Name`; `<locals>` parts (a class defined in a function) are allowed so an
# in-memory run can record any class, and refused where a run folder would need to import it again.
_IMPORT_PATH = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*:(?:[A-Za-z_]\w*|<locals>)(?:\.(?:[A-Za-z_]\w*|<locals>))*")


def _import_path(value: Any) -> Any:
    """A custom network's class as an import path, or a one-line reason why the text is not one."""
    if isinstance(value, str) and (len(value) > 300 or not _IMPORT_PATH.fullmatch(value)):
        raise ValueError(f"custom network {short_repr(value)} is not an import path; write it as "
                         "package.module:Class")
    return value


def _json_value(value: Any, where: str) -> Any:
    """`value` as plain JSON (tuples become lists), or a `ValueError` naming the first part that is not."""
    if value is None or isinstance(value, (bool, int, str)) or (isinstance(value, float) and math.isfinite(value)):
        return value
    if isinstance(value, (list, tuple)):
        return [_json_value(item, f"{where}[{index}]") for index, item in enumerate(value)]
    if isinstance(value, dict) and all(isinstance(key, str) for key in value):
        return {key: _json_value(item, f"{where}.{key}") for key, item in value.items()}
    raise ValueError(f"keyword argument {where!r} of the custom network is {type(value).__name__} "
                     f"{short_repr(value, 40)}; only JSON values (numbers, strings, booleans, null, lists, objects "
                     "with string keys) can be recorded to rebuild it: pass a plain value and build the object "
                     "inside the class")


def _json_kwargs(value: Any) -> Any:
    """Keyword arguments that a run folder can write and read back unchanged; not-a-dict is left to the schema."""
    if not isinstance(value, dict):
        return value
    if not all(isinstance(key, str) for key in value):
        raise ValueError("the custom network's keyword arguments must have string names")
    return {key: _json_value(item, key) for key, item in value.items()}


# One definition of a custom network's two settings, used by TrainConfig and by `CustomNetwork` (model.json).
ImportPath = Annotated[str, BeforeValidator(_import_path)]
JsonKwargs = Annotated[dict[str, Any], BeforeValidator(_json_kwargs)]


class CustomNetwork(BaseModel):
    """The config of architecture "custom" in model.json: a network class named by its import path and the
    keyword arguments that build it, `{"target": "mypkg.nets:TinyNet", "kwargs": {"width": 64}}`. Loading it imports
    that module, which runs its code: `fmnist.checkpoint` does so only when the caller trusts the run."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    target: ImportPath
    kwargs: JsonKwargs = Field(default_factory=dict)


def _setting(default: Any, help: str, **constraints: Any) -> Any:
    """A field whose `help` becomes its `fmnist train --flag` help line (see `fmnist.cli`)."""
    factory = ({"default_factory": (lambda: type(default)(default))} if isinstance(default, (list, dict))
               else {"default": default})
    return Field(description=help, **factory, **constraints)


class TrainConfig(BaseModel):
    """Everything that defines a run. Written into the run folder as `config.json`."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True)

    preset: str = _setting("custom", "the preset these settings started from", max_length=64)
    model: Literal["mlp", "convnet", "keras-cnn", "custom"] = _setting(
        "mlp", "architecture: mlp | convnet | keras-cnn | custom (your own nn.Module, see --custom)")
    custom: ImportPath | None = _setting(
        None, "with --model custom: your network class as package.module:Class, mapping (N,1,28,28) images to "
              "(N,10) logits; importing it runs its code, so it needs --trust-code")
    custom_kwargs: JsonKwargs = _setting(
        {}, "with --model custom: keyword arguments of that class, as a JSON object like '{\"width\": 64}'",
        json_schema_extra={"flag": "json"})
    hidden: list[Annotated[int, Field(gt=0, le=16384)]] = _setting(
        [128], "MLP hidden layer sizes, e.g. 300,100", min_length=1, max_length=32)
    activation: Literal["relu", "tanh", "sigmoid", "gelu"] = _setting(
        "relu", "MLP hidden-layer activation: relu | tanh | sigmoid | gelu")
    widths: list[Annotated[int, Field(gt=0, le=1024)]] = _setting(
        [32, 64, 128], "ConvNet stage widths, e.g. 32,64,128", min_length=1, max_length=4)
    depth: int = _setting(1, "ConvNet blocks per stage", ge=1, le=32)
    dropout: Fraction = _setting(0.0, "dropout before the last layer(s)")
    optimizer: Literal["adam", "adamw", "sgd", "rmsprop"] = _setting("adam", "adam | adamw | sgd | rmsprop")
    lr: float = _setting(1e-3, "peak learning rate", gt=0, lt=10)
    momentum: float = _setting(0.0, "SGD or RMSprop momentum", ge=0, lt=1)
    nesterov: bool = _setting(False, "Nesterov momentum (SGD)")
    weight_decay: float = _setting(0.0, "L2 weight decay (not on biases or batch norm)", ge=0, lt=1)
    schedule: Literal["constant", "cosine", "onecycle"] = _setting(
        "constant", "learning-rate schedule: constant | cosine | onecycle")
    warmup: Fraction = _setting(0.0, "fraction of all steps spent warming up (cosine, onecycle)")
    batch_size: int = _setting(32, "images per optimiser step", gt=0, le=16384)
    epochs: int = _setting(10, "number of epochs", gt=0, le=1_000_000)
    validation: int = _setting(0, "training images held out (stratified) for validation; 0 = none", ge=0,
                               lt=100_000)
    split: Literal["standard", "pooled"] = _setting(
        "standard", "standard (60k train / 10k test) | pooled (all 70k re-split at random, OpenML style)")
    pooled_test_fraction: float = _setting(0.2, "test share of the pooled split", gt=0, lt=1)
    normalize: Literal["unit", "standard"] = _setting(
        "unit", "pixel scaling: unit (x/255, as the Keras projects) | standard (training-set mean and std)")
    label_smoothing: Fraction = _setting(0.0, "label smoothing of the loss")
    flip: bool = _setting(False, "random horizontal flips")
    translate: int = _setting(0, "random shifts by up to N pixels", ge=0, le=8)
    erase: Fraction = _setting(0.0, "random erasing of a square this fraction of the side (half the images)")
    tta: bool = _setting(False, "also report test-time augmentation (flips, 1-pixel shifts) on the test set")
    stop_at: float | None = _setting(None, "stop as soon as the monitored metric reaches this value")
    patience: int = _setting(0, "stop after N epochs without improvement, restoring the best weights", ge=0,
                             le=1_000_000)
    monitor: Literal["accuracy", "loss", "val_accuracy", "val_loss"] = _setting(
        "accuracy", "metric for --stop-at and --patience: accuracy | loss | val_accuracy | val_loss")
    precision: Literal["fp32", "bf16", "auto"] = _setting(
        "fp32", "fp32 | bf16 (autocast) | auto (bf16 where the CPU or GPU computes it natively, else fp32)")
    channels_last: bool = _setting(False, "channels-last memory format (faster convolutions on CPU)")
    threads: int | None = _setting(None, "torch threads; unset: one per core", ge=1, le=1024)
    seed: int = _setting(0, "random seed: same seed, same machine, same weights", ge=0, lt=2**32)
    train_subset: int | None = _setting(None, "train on the first N training images only (smoke runs)", ge=1)
    test_subset: int | None = _setting(None, "test on the first N test images only (smoke runs)", ge=1)
    budget: Duration = _setting(
        None, "fit training into this wall time (3m, 90s, 1h): time a few steps here, then choose the epochs "
              "(the one-cycle schedule follows)", json_schema_extra={"flag": "duration"}, gt=0, lt=7 * 24 * 3600)
    track_test: bool = _setting(False, "also measure test accuracy after every epoch (for plots, not selection)")
    description: str = _setting("", "a note kept with the run", max_length=1000)

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as error:
            raise ConfigError(_one_line(error, values)) from None

    def __setattr__(self, name: str, value: Any) -> None:
        try:
            super().__setattr__(name, value)
        except ValidationError as error:
            raise ConfigError(_one_line(error, {name: value})) from None

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.monitor.startswith("val_") and not self.validation:
            raise ValueError(f"monitor {self.monitor} needs a validation split; add --validation 5000")
        if self.model == "custom" and self.custom is None:
            raise ValueError("model custom needs the network to train: add --custom package.module:Class")
        if self.model != "custom" and (self.custom is not None or self.custom_kwargs):
            raise ValueError(f"custom and custom_kwargs describe a network of your own, but model is {self.model}; "
                             "add --model custom, or drop them")
        return self

    def validate(self) -> TrainConfig:  # type: ignore[override]  # pydantic's is a deprecated classmethod
        """Check the settings again (after in-place changes) and return self; problems raise `ConfigError`."""
        TrainConfig(**self.to_dict())
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values, as written to `config.json`."""
        return self.model_dump()

    def architecture(self) -> dict[str, Any]:
        """The `{name, config}` that `create_model` rebuilds the network from."""
        if self.model == "custom":
            network = CustomNetwork(target=self.custom, kwargs=self.custom_kwargs)
            return {"name": "custom", "config": network.model_dump()}
        if self.model == "mlp":
            return {"name": "mlp", "config": {"hidden": list(self.hidden), "dropout": self.dropout,
                                              "activation": self.activation}}
        if self.model == "convnet":
            return {"name": "convnet", "config": {"widths": list(self.widths), "depth": self.depth,
                                                  "dropout": self.dropout}}
        return {"name": "keras-cnn", "config": {"dropout": self.dropout}}


def setting_names() -> list[str]:
    """Every TrainConfig field, in declaration order."""
    return list(TrainConfig.model_fields)


def _one_line(error: ValidationError, given: dict[str, Any]) -> str:
    """The first problem pydantic found, said the way a user fixes it: setting, value, what is allowed."""
    problem = error.errors()[0]
    location = [str(part) for part in problem["loc"]]
    name = location[0] if location else "config"
    value = _Short(problem.get("input"))
    kind, context = problem["type"], problem.get("ctx", {})
    if kind == "extra_forbidden":
        return f"unknown setting {name!r}{did_you_mean(name, setting_names())}"
    if kind == "value_error":
        return str(context.get("error", problem["msg"]))
    field = TrainConfig.model_fields.get(name)
    if kind == "literal_error" and field is not None:
        allowed = ", ".join(str(choice) for choice in get_args(field.annotation))
        return f"{name} {value!r} is not one of {allowed}"
    if len(location) > 1 or kind in ("too_short", "list_type"):  # an item of a list setting
        return f"setting {name} must be a list of {_item_range(field)}, got {_Short(given.get(name, value))!r}"
    wanted = {"int_type": "an integer", "float_type": "a number", "bool_type": "true or false",
              "string_type": "a string", "missing": "given", "dict_type": "a JSON object of names and values"}.get(kind)
    if wanted:
        return f"setting {name} must be {wanted}, got {value!r}"
    bounds = _bounds(field) or {key: context[key] for key in ("gt", "ge", "lt", "le") if key in context}
    if bounds == {"gt": 0}:
        return f"{name} must be positive, got {value}"
    if bounds == {"ge": 0}:
        return f"{name} must be zero or more, got {value}"
    if set(bounds) == {"ge"}:
        return f"{name} must be at least {bounds['ge']}, got {value}"
    if bounds:
        low = f"[{bounds['ge']}" if "ge" in bounds else f"({bounds.get('gt')}"
        high = f"{bounds['le']}]" if "le" in bounds else f"{bounds.get('lt')})"
        return f"{name} must be in {low}, {high}, got {value}"
    return f"setting {name}: {problem['msg']} (got {value!r})"


class _Short:
    """A value as an error message echoes it: its repr cut to about 80 characters, so a hostile config file
    (a 5,000-character description, a list of a million numbers) gives a one-line message, not a page."""

    def __init__(self, value: Any):
        self.value = value

    def __repr__(self) -> str:
        return short_repr(self.value)

    def __str__(self) -> str:
        return repr(self) if not isinstance(self.value, (int, float)) else str(self.value)[:80]


def _item_range(field: Any) -> str:
    """What each item of a list setting may be ("integers from 1 to 16384"), read from the field's schema."""
    items = get_args(getattr(field, "annotation", None))
    bounds: dict[str, Any] = {}
    for info in get_args(items[0])[1:] if items else ():
        bounds.update(_bounds(info))
    if "gt" in bounds and "le" in bounds:
        return f"integers from {bounds['gt'] + 1} to {bounds['le']}"
    return "positive integers"


def _bounds(field: Any) -> dict[str, Any]:
    bounds: dict[str, Any] = {}
    for item in getattr(field, "metadata", []) or []:
        for key in ("gt", "ge", "lt", "le"):
            if getattr(item, key, None) is not None:
                bounds[key] = getattr(item, key)
    return bounds


# What the CNN presets share: batch norm lets one-cycle Nesterov SGD run at lr 0.2; label smoothing, flips and
# flip TTA; weight decay (not on biases or batch norm); channels-last and bf16 where the CPU computes it natively.
_CNN_RECIPE: dict[str, Any] = dict(
    model="convnet", optimizer="sgd", lr=0.2, momentum=0.9, nesterov=True, weight_decay=5e-4, schedule="onecycle",
    warmup=0.2, batch_size=256, normalize="standard", label_smoothing=0.1, flip=True, tta=True, channels_last=True,
    precision="auto")

# Presets: the classic Keras projects, exactly, and the fast CNNs. `evidence` says what chose each setting;
# `expect` (the latest measured accuracy and time) comes from benchmarks/ via preset_results.json.
PRESETS: dict[str, dict[str, Any]] = {
    "classic-adam": dict(
        description="TensorFlow tutorial: Dense 128, Adam 1e-3, batch 32, 10 epochs",
        evidence="the TensorFlow 'basic classification' tutorial, copied setting for setting",
        model="mlp", hidden=[128], optimizer="adam", lr=1e-3, batch_size=32, epochs=10),
    "classic-sgd": dict(
        description="Dense 300 -> 100, SGD 0.01, batch 32, 30 epochs, 5,000 validation images",
        evidence="Geron's Hands-On ML chapter 10 Fashion-MNIST MLP, copied setting for setting",
        model="mlp", hidden=[300, 100], optimizer="sgd", lr=0.01, batch_size=32, epochs=30, validation=5000),
    "classic-narrow": dict(
        description="two hidden layers of 4 units, Adam, 20 epochs: what width buys",
        evidence="the classic 'too narrow' teaching example; kept to show under-capacity",
        model="mlp", hidden=[4, 4], optimizer="adam", lr=1e-3, batch_size=32, epochs=20),
    "classic-earlystop": dict(
        description="Dense 128, Adam, up to 50 epochs, stop once training accuracy reaches 95%",
        evidence="the Keras callback tutorial that stops at 95% training accuracy, copied",
        model="mlp", hidden=[128], optimizer="adam", lr=1e-3, batch_size=32, epochs=50, stop_at=0.95,
        monitor="accuracy"),
    "classic-resplit": dict(
        description="Dense 128, Adam, 10 epochs on the 70,000 images re-split 80/20 at random (OpenML style)",
        evidence="the fetch_openml + train_test_split projects: same network as classic-adam, their split",
        model="mlp", hidden=[128], optimizer="adam", lr=1e-3, batch_size=32, epochs=10, split="pooled"),
    "keras-cnn": dict(
        description="the typical Keras CNN (Conv32-pool-Conv64-pool-Dense128), Adam, batch 32, 10 epochs",
        evidence="the common Keras CNN of the Fashion-MNIST tutorials; channels-last measured faster on CPU",
        model="keras-cnn", optimizer="adam", lr=1e-3, batch_size=32, epochs=10, channels_last=True),
    # The CNN presets were chosen on a 5,000-image validation split (see the issue notes): flips help at every
    # length; shifts cost accuracy in short schedules and did not help at 25 epochs; width beats epochs.
    # fast and default keep that split to calibrate their confidence: label smoothing leaves them under-confident
    # (ECE 0.109 -> 0.007 after temperature scaling, measured on `fast`).
    "fast": dict(
        description="BN ConvNet 32-64-128, one-cycle SGD at batch 128, flips, 5 epochs: about 1 min on 2 "
                    "AVX512-BF16 cores, 3 min on 2 AVX2 cores",
        evidence="docs/recipe-study.md, 5,000 validation images, 2 seeds each: batch 128 at lr 0.1 93.26% against "
                 "92.82% for batch 256 at lr 0.2 (batch 128 at lr 0.2 92.97%, batch 64 at lr 0.05 92.88%, batch 512 "
                 "92.40%); label smoothing 0-0.2, lr 0.4 and widths 48-96-192 for 4 epochs within noise; random "
                 "erasing -0.4",
        **{**_CNN_RECIPE, "batch_size": 128, "lr": 0.1}, widths=[32, 64, 128], epochs=5, validation=5000),
    "default": dict(
        description="BN ConvNet 64-128-256, one-cycle SGD, flips, 10 epochs: about 4 min on 2 AVX512-BF16 "
                    "cores, 20 min on 2 AVX2 cores",
        evidence="earlier validation runs (numbers not kept): wider stages beat more epochs; 93.30% test, median "
                 "of 3 seeds",
        **_CNN_RECIPE, widths=[64, 128, 256], epochs=10, validation=5000),
    "best": dict(
        description="two blocks per stage, 64-128-256, flips + 1-pixel shifts, 28 epochs: 30 min on 2 AMX cores",
        evidence="earlier validation runs (numbers not kept): shifts pay only in long schedules; 95.07% test, "
                 "1 seed",
        **_CNN_RECIPE, widths=[64, 128, 256], depth=2, epochs=28, translate=1),
}
DEFAULT_PRESET = "default"
PRESET_NOTES = ("evidence",)  # preset keys that document a preset and are not settings
# Median results per preset from the latest benchmark, written by benchmarks/ (shipped inside the package).
PRESET_RESULTS = Path(__file__).with_name("preset_results.json")


def preset_settings(preset: str) -> dict[str, Any]:
    """A preset's settings (without its notes); unknown names get a "did you mean" `ConfigError`."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}{did_you_mean(preset, PRESETS)}; "
                          "see `fmnist train --list-presets`")
    return {key: value for key, value in PRESETS[preset].items() if key not in PRESET_NOTES}


def preset_value(preset: str, name: str) -> Any:
    """One setting as a preset gives it (the schema's default where the preset is silent)."""
    settings = preset_settings(preset)
    return settings[name] if name in settings else TrainConfig.model_fields[name].get_default(
        call_default_factory=True)


def resolve_config(preset: str = DEFAULT_PRESET, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """A preset's config with overrides applied (None values ignored); every problem is a `ConfigError`."""
    values = {"preset": preset, **preset_settings(preset)}
    values.update({key: value for key, value in (overrides or {}).items() if value is not None})
    return TrainConfig(**values)


def preset_expectations() -> dict[str, dict[str, dict[str, Any]]]:
    """`{preset: {cpu_class: {"test_accuracy": ..., "train_seconds": ...}}}` from the latest benchmark on each
    CPU class (AVX2, AVX512-BF16, AMX), or {} if none."""
    try:
        presets = json.loads(PRESET_RESULTS.read_text())["presets"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return {}
    return {name: results_by_class(entry) for name, entry in presets.items()}


def results_by_class(entry: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """One preset's results keyed by CPU class; an entry of the older one-result-per-preset form becomes the
    result for the class it names."""
    if "test_accuracy" in entry:
        return {entry.get("cpu_class") or "unknown": entry}
    return entry

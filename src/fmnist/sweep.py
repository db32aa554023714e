"""Hyper-parameter sweeps: a YAML spec, Ray Tune running `fmnist.training.train` per trial, a ranked report.

`load_spec(path)` reads and fully validates the spec (no Ray needed), so a typo fails in one line before any
process starts. `run_sweep(spec, out_dir)` runs the trials with Ray Tune on this machine and writes:

    out_dir/trials/<trial>/   one ordinary run folder per trial (`fmnist predict`, `evaluate`, `export` work on it)
    out_dir/sweep.json        the spec and every trial: params, metric, epochs run, status, test accuracy, folder
    out_dir/sweep.md          the same as a table, best first
    out_dir/best              a relative symlink to the best trial's folder (a text file naming it where the
                              file system has no symlinks)

Trials stopped early by ASHA: Tune ends a stopped trial's process while it waits in `tune.report`, so a trial
reports an epoch only at a safe point (when the next epoch starts, or after `train` has written the run folder).
A stopped trial therefore leaves its last complete epoch as a resume checkpoint; the driver then turns that into
an ordinary run folder through `train(resume=...)`, exactly like a run stopped with Ctrl-C: `metrics.json` says
`interrupted: true`, `fmnist train --resume` could continue it, and `sweep.json` marks it `stopped early`.
Ctrl-C stops the whole sweep the same way: the report is written, and trials cut off are marked `interrupted`.
Trial folders in sweep.json are relative to `out_dir` (`trials/trial-003`), so the sweep folder can move.

ray and pyyaml are the optional `sweep` extra: `pip install 'fmnist[sweep]'`.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import logging
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
    with_config,
)
from typing_extensions import TypedDict  # pydantic needs this one on Python < 3.12

from fmnist import checkpoint, events
from fmnist.config import PRESETS, TrainConfig, preset_value, resolve_config, setting_names
from fmnist.errors import ConfigError, FmnistError, did_you_mean, short_repr
from fmnist.files import atomic_write_text, write_json
from fmnist.hardware import usable_cores
from fmnist.runs import read_history
from fmnist.tracking import Fanout

INSTALL_HINT = "pip install 'fmnist[sweep]'"
Metric = Literal["val_accuracy", "val_loss", "accuracy", "loss"]
METRICS = {metric: "min" if metric.endswith("loss") else "max" for metric in get_args(Metric)}  # Tune's mode
ASHA_DEFAULTS = {"grace_period": 1, "reduction_factor": 2}
DEFAULT_VALIDATION = 5000  # held-out images added when a val_* metric meets a preset without a validation split
DEFAULT_SAMPLES = {"random": 8, "grid": 1}
# Bounds on what a spec may ask for, so reading, validating and reporting one costs little whatever it holds.
MAX_SPEC_BYTES = 64 * 1024  # the example spec is 1.5 KB
MAX_SPEC_VALUES = 10_000  # values after YAML aliases are expanded; a real spec holds a few dozen
MAX_SPEC_DEPTH = 16  # the deepest real value (a width list under a distribution under space) is 5 levels down
MAX_VALUES = 1000  # listed values of one distribution
MAX_SAMPLES = 1000  # random trials, or repeats of a grid
MAX_TRIALS = 10_000  # the whole sweep: each trial is a training run


class SweepError(FmnistError):
    """A sweep could not run: the extra is missing, the output folder is taken, or every trial failed."""


def require_extra() -> None:
    """Import ray.tune and yaml, or say in one line how to install them (the CLI calls this first)."""
    for module in ("yaml", "ray.tune"):
        _require(module)


def _require(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        name = module.split(".")[0]
        raise SweepError(f"sweeps need the {name} package, which is not installed; run {INSTALL_HINT}") from None


# ----------------------------------------------------------------------------------------------- the spec
# The schema, declared once; `_one_line` words pydantic's first complaint as the fix, quoting the descriptions.
_STRICT = ConfigDict(extra="forbid", strict=True)
_Number = Annotated[float, Field(allow_inf_nan=False)]  # strict: ints are numbers, bools are not
_Pair = Field(min_length=2, max_length=2)  # [low, high]


def _ordered(bounds: list[Any]) -> list[Any]:
    """low before high; randint's [3, 3] is the one value 3, but a range of numbers needs room."""
    if bounds[0] > bounds[1] or (bounds[0] == bounds[1] and isinstance(bounds[0], float)):
        raise ValueError("low must be below high")
    return bounds


@with_config(_STRICT)
class Distribution(TypedDict, total=False):
    """How one setting's values are drawn: exactly one of these keys."""

    choice: Annotated[list[Any], Field(min_length=1, max_length=MAX_VALUES, description=(
        f"a non-empty list of at most {MAX_VALUES} values, like {{choice: [0, 1]}}"))]
    grid: Annotated[list[Any], Field(min_length=1, max_length=MAX_VALUES, description=(
        f"a non-empty list of at most {MAX_VALUES} values, like {{grid: [0, 1]}}"))]
    uniform: Annotated[list[_Number], _Pair, AfterValidator(_ordered),
                       Field(description="numbers [low, high] with low < high, like {uniform: [0.0, 0.3]}")]
    loguniform: Annotated[list[Annotated[_Number, Field(gt=0)]], _Pair, AfterValidator(_ordered), Field(
        description="positive bounds [low, high] with low < high (use uniform for 0), like {loguniform: [0.02, 0.5]}")]
    randint: Annotated[list[int], _Pair, AfterValidator(_ordered), Field(
        description="integers [low, high] with low <= high (both included), like {randint: [1, 3]}")]


DISTRIBUTIONS = tuple(Distribution.__annotations__)


def _one_kind(distribution: Any) -> Any:
    if not isinstance(distribution, dict) or len(distribution) != 1:
        raise ValueError(f"give exactly one distribution, one of {', '.join(DISTRIBUTIONS)}, like "
                         "{choice: [a, b]}; put a single value under fixed instead")
    return distribution


@with_config(_STRICT)
class Asha(TypedDict):
    """ASHA early stopping: every trial trains `grace_period` epochs, then each rung keeps 1/`reduction_factor`."""

    grace_period: Annotated[int, Field(gt=0, description="a positive integer (epochs before any stop)")]
    reduction_factor: Annotated[int | float, Field(gt=1, allow_inf_nan=False,
                                                   description="a number above 1 (2 keeps the better half)")]


def _asha_switch(value: Any) -> Any:
    """`true`: ASHA with its defaults; `false` or nothing: off; a mapping overrides the defaults."""
    if isinstance(value, dict):
        return {**ASHA_DEFAULTS, **value}
    return dict(ASHA_DEFAULTS) if value is True else None if value is False else value


def _known_preset(preset: str) -> str:
    if preset not in PRESETS:
        raise ValueError(f"preset {short_repr(preset)} is unknown{did_you_mean(preset, PRESETS)}; "
                         f"choose one of {', '.join(PRESETS)}")
    return preset


def _setting_name(name: Any) -> Any:
    """A TrainConfig field the trials may set (preset and threads have their own top-level keys)."""
    if name == "preset":
        raise ValueError("preset is set once, at the top level of the spec (preset: fast)")
    if name == "threads":
        raise ValueError("threads per trial are set with the top-level trial_threads key")
    if name not in TrainConfig.model_fields:
        raise ValueError(f"unknown setting {short_repr(name)}{did_you_mean(name, setting_names())}; "
                         "see the TrainConfig fields in fmnist.config")
    return name


_Setting = Annotated[str, BeforeValidator(_setting_name)]
_EmptyIfNone = BeforeValidator(lambda value: {} if value is None else value)  # `fixed:` with nothing under it


class SweepSpec(BaseModel):
    """A validated sweep: the base preset, what to vary and how, what to maximise, how to stop early."""

    model_config = _STRICT

    preset: Annotated[str, AfterValidator(_known_preset)]
    metric: Metric = "val_accuracy"
    search: Literal["grid", "random"] = "random"
    samples: int = Field(DEFAULT_SAMPLES["random"], gt=0, le=MAX_SAMPLES, description=(
        f"a positive integer up to {MAX_SAMPLES} (random: trials to draw; grid: repeats of the full grid)"))
    fixed: Annotated[dict[_Setting, Any], _EmptyIfNone] = Field(
        default_factory=dict, description="a mapping of settings, like `fixed: {epochs: 6}`")
    space: Annotated[dict[_Setting, Annotated[Distribution, BeforeValidator(_one_kind)]], _EmptyIfNone] = Field(
        default_factory=dict, validate_default=True,
        description="a mapping of setting -> distribution, like `lr: {loguniform: [0.02, 0.5]}`")
    asha: Annotated[Asha | None, BeforeValidator(_asha_switch)] = Field(
        None, description="a mapping like {grace_period: 1, reduction_factor: 2}, true, or false")
    trial_threads: int = Field(1, gt=0, le=1024, description="a positive integer up to 1024 (torch threads per trial)")
    sampler_seed: int = Field(0, ge=0, lt=2**32,
                              description="an integer from 0 to 4294967295 (it seeds the random search)")
    name: str = "sweep"  # from the spec's file name, not a spec key

    @field_validator("space")
    @classmethod
    def _searchable(cls, space: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        """Something to search, with distributions that suit the search and the settings."""
        if not space:
            raise ValueError("space is empty; name a setting to search, like `lr: {loguniform: [0.02, 0.5]}`")
        for name, distribution in space.items():
            (kind,) = distribution
            if kind in ("uniform", "loguniform") and TrainConfig.model_fields[name].annotation in (int, int | None):
                raise ValueError(f"space.{name}: {kind} draws fractional numbers but {name} takes integers; "
                                 "use randint: [low, high] or choice")
            if info.data.get("search") == "random" and kind == "grid":
                raise ValueError(f"space.{name}: grid needs `search: grid` (random search draws values); "
                                 "use choice, or set search: grid")
            if info.data.get("search") == "grid" and kind != "grid":
                raise ValueError(f"space.{name}: search: grid takes only grid: [values]; list the values to try "
                                 "under grid, or use search: random")
        return space

    @model_validator(mode="after")
    def _consistent(self) -> SweepSpec:
        """The rules across keys, in the order a user would fix them."""
        both = sorted(set(self.fixed) & set(self.space))
        if both:
            raise ValueError(f"{both[0]} is both fixed and searched; keep it under fixed or under space, not both")
        if "samples" not in self.model_fields_set:
            self.samples = DEFAULT_SAMPLES[self.search]  # 8 random trials, or the grid once
        self._add_validation()
        self._seed_grid_repeats()
        if self.trial_count() > MAX_TRIALS:
            raise ValueError(f"the sweep would run {self.trial_count():,} trials, more than {MAX_TRIALS:,}; "
                             "search fewer values or lower samples")
        self._check_trials()
        epochs = self.max_epochs()
        if self.asha and self.asha["grace_period"] >= epochs:
            raise ValueError(f"asha.grace_period {self.asha['grace_period']} leaves no epoch to stop at (trials "
                             f"train at most {epochs}); lower it below {epochs} or set asha: false")
        return self

    def _add_validation(self) -> None:
        """A val_* metric needs held-out images: add DEFAULT_VALIDATION where the preset keeps none."""
        if not self.metric.startswith("val_"):
            return
        if "validation" not in {**self.fixed, **self.space} and not preset_value(self.preset, "validation"):
            self.fixed["validation"] = DEFAULT_VALIDATION
        values = (_candidates(self.space["validation"]) if "validation" in self.space
                  else [self.fixed.get("validation", preset_value(self.preset, "validation"))])
        if any(isinstance(value, (int, float)) and value <= 0 for value in values):
            raise ValueError(f"metric {self.metric} needs a validation split; set validation to a positive number "
                             f"of held-out images (e.g. {DEFAULT_VALIDATION}) or use metric: accuracy")

    def _seed_grid_repeats(self) -> None:
        """Training is deterministic, so repeats of a grid with one seed would be duplicates: each gets a seed."""
        if self.search != "grid" or self.samples == 1:
            return
        if "seed" in self.fixed or "seed" in self.space:
            where = "fixed" if "seed" in self.fixed else "space"
            raise ValueError(f"samples: {self.samples} repeats the grid with training seeds 0, 1, ..., but "
                             f"{where}.seed sets the seed, so the repeats would be identical; drop {where}.seed "
                             "or set samples: 1")
        base = preset_value(self.preset, "seed")
        self.space["seed"] = {"grid": [base + repeat for repeat in range(self.samples)]}
        self.samples = 1

    def _check_trials(self) -> None:
        """Every value in the space must make a valid TrainConfig: fail now, not in trial 7 an hour from now."""
        base = {name: _candidates(distribution)[0] for name, distribution in self.space.items()}
        trials = [("the first trial's settings are invalid", base)] + [
            (f"space.{name} value {short_repr(value)}", {**base, name: value})
            for name, distribution in self.space.items() for value in _candidates(distribution)]
        for what, params in trials:
            try:
                resolve_config(self.preset, self.overrides(params))
            except ConfigError as error:  # config's message may quote the whole value: keep the line short
                message = str(error)
                raise ValueError(f"{what}: {message if len(message) <= 200 else message[:197] + '...'}") from None

    @property
    def mode(self) -> str:
        """"max" for accuracies, "min" for losses."""
        return METRICS[self.metric]

    def to_dict(self) -> dict[str, Any]:
        """Plain values for sweep.json."""
        return self.model_dump()

    def overrides(self, params: dict[str, Any]) -> dict[str, Any]:
        """The TrainConfig overrides of one trial: fixed settings, the drawn params, the thread count."""
        return {**self.fixed, **params, "threads": self.trial_threads}

    def trial_count(self) -> int:
        """How many trials the sweep runs: the samples, times the size of the grid."""
        grid = math.prod(len(_candidates(d)) for d in self.space.values() if "grid" in d)
        return self.samples * grid

    def max_epochs(self) -> int:
        """The longest a trial can train (ASHA's max_t)."""
        if "epochs" in self.space:
            return max(int(value) for value in _candidates(self.space["epochs"]))
        return int(self.fixed.get("epochs", preset_value(self.preset, "epochs")))


SPEC_KEYS = tuple(key for key in SweepSpec.model_fields if key != "name")


def _candidates(distribution: dict[str, Any]) -> list[Any]:
    """Values that exercise a distribution: every listed value, or both bounds of a range."""
    return list(next(iter(distribution.values())))


def load_spec(path: str | os.PathLike) -> SweepSpec:
    """Read a YAML sweep spec and validate it completely; every problem is a one-line ConfigError."""
    yaml = _require("yaml")
    path = Path(path)
    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_SPEC_BYTES + 1)
        if len(raw) > MAX_SPEC_BYTES:
            raise ConfigError(f"{path}: larger than {MAX_SPEC_BYTES // 1024} KiB; a sweep spec is a short YAML "
                              "file (see examples/sweep-fast.yaml)")
        values = yaml.safe_load(raw.decode("utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such sweep spec; see examples/sweep-fast.yaml for one") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: cannot read the sweep spec ({error})") from None
    except RecursionError:  # PyYAML's parser recurses once per level of nesting
        raise ConfigError(f"{path}: values nested too deeply for a sweep spec; see examples/sweep-fast.yaml") \
            from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML{where} ({problem}); fix the syntax") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of spec keys (preset, metric, space, ...), "
                          f"got {type(values).__name__}; see examples/sweep-fast.yaml")
    try:
        return parse_spec(values, name=path.stem.removeprefix("sweep-") or path.stem)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None


def parse_spec(values: dict[str, Any], name: str = "sweep") -> SweepSpec:
    """Validate a spec given as a dict (what the YAML file holds) and fill in the defaults; problems: ConfigError."""
    if "name" in values:
        raise ConfigError("name is not a spec key: a sweep is named after its file")
    _check_expansion(values)
    try:
        return SweepSpec.model_validate({**values, "name": name})
    except ValidationError as error:
        raise ConfigError(_one_line(error, values)) from None


def _check_expansion(values: Any) -> None:
    """Refuse a spec that expands to too many values or nests too deeply, before it is validated: YAML aliases let
    a few hundred bytes stand for millions of values ("billion laughs"), which every check and error message would
    then walk. Shared (and even recursive) values are counted each time they appear; the walk stops at the cap."""
    pending, seen = [(values, 1)], 1
    while pending:
        value, depth = pending.pop()
        if not isinstance(value, (dict, list, tuple)):
            continue
        if depth > MAX_SPEC_DEPTH:
            raise ConfigError(f"values nested more than {MAX_SPEC_DEPTH} deep; a sweep spec holds settings and "
                              "short lists (see examples/sweep-fast.yaml)")
        seen += 2 * len(value) if isinstance(value, dict) else len(value)  # counted before a child is touched
        if seen > MAX_SPEC_VALUES:
            raise ConfigError(f"the spec expands to more than {MAX_SPEC_VALUES:,} values (repeated YAML aliases?); "
                              "a sweep spec needs a few dozen")
        children = [item for pair in value.items() for item in pair] if isinstance(value, dict) else value
        pending.extend((child, depth + 1) for child in children)


def _one_line(error: ValidationError, given: dict[str, Any]) -> str:
    """pydantic's first problem with a spec, said the way a user fixes it: the key, the value, what it must be."""
    problem = error.errors()[0]
    loc, kind, value = problem["loc"], problem["type"], problem.get("input")
    names = [str(part) for part in loc if part != "[key]"] or [""]  # [""]: a rule across keys
    if kind in ("extra_forbidden", "invalid_key"):  # a key not in the schema (or not even text)
        what, keys = [("spec key", SPEC_KEYS), ("key", ASHA_DEFAULTS), ("distribution", DISTRIBUTIONS)][len(loc) - 1]
        where = ".".join(names[:-1]) + ": " if len(loc) > 1 else ""
        return (f"{where}unknown {what} {short_repr(loc[-1])}{did_you_mean(loc[-1], keys)}; "
                f"the {what}s are {', '.join(keys)}")
    if names[0] == "space" and len(names) > 2:  # a distribution's values
        return (f"space.{names[1]}: {names[2]} needs {_described(Distribution, names[2])}, "
                f"got {short_repr(given['space'][loc[1]][loc[2]])}")
    if kind == "value_error":  # our validators' own lines; those on a setting or distribution are told where
        where = ".".join(names[:-1] if loc[-1] == "[key]" else names) + ": " if len(loc) > 1 else ""
        return f"{where}{problem['ctx']['error']}"
    if names[0] == "preset":
        return f"preset: name the base preset, e.g. `preset: fast` (one of {', '.join(PRESETS)})"
    if kind == "literal_error":
        allowed = ", ".join(get_args(SweepSpec.model_fields[names[0]].annotation))
        test = isinstance(value, str) and value.startswith("test")
        hint = "; pick on validation, never on the test set" if test else ""
        return f"{names[0]} {short_repr(value)} is not one of {allowed}{hint}"
    owner, name = (Asha, names[1]) if len(names) > 1 else (SweepSpec, names[0])
    return f"{'.'.join(names[:2])} must be {_described(owner, name)}, got {short_repr(value)}"


def _described(owner: Any, name: str) -> str:
    """What a key must be, as its declaration describes it."""
    return TypeAdapter(owner).json_schema()["properties"][name]["description"]


# ----------------------------------------------------------------------------------------------- running
def _plain(value: Any) -> Any:
    """numpy scalars and tuples from Ray's samplers -> JSON/TrainConfig-friendly Python values."""
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        return value.item()
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _trial_name(trial: Any) -> str:
    """`trial-000`, `trial-001`, ... from Tune's trial id (`<uuid>_00001`)."""
    suffix = str(trial.trial_id).rsplit("_", 1)[-1]
    return f"trial-{int(suffix):03d}" if suffix.isdigit() else f"trial-{trial.trial_id}"


def _trainable(params: dict[str, Any], *, arrays: tuple, settings: dict[str, Any]) -> None:
    """One trial, run by Ray in a worker: a normal `train()` into its own run folder, reporting every epoch.

    Each epoch is reported at a safe point, when the next epoch starts or after `train` returned: Tune stops a
    trial by ending its process while it waits in `tune.report`, and there the resume checkpoint of the reported
    epoch is already on disk (or the whole run folder, for the last epoch).
    """
    import numpy as np
    from ray import tune

    from fmnist.events import EpochEnd, EpochStart
    from fmnist.training import train

    metric = settings["metric"]
    overrides = {**settings["fixed"], **{k: _plain(v) for k, v in params.items()}, "threads": settings["threads"]}
    config = resolve_config(settings["preset"], overrides)
    run_dir = Path(settings["trials"]) / tune.get_context().get_trial_name()
    # Arrays from Ray's object store are read-only views; torch warns about those, so give train() its own copy.
    arrays = tuple((np.require(x, requirements="W"), np.require(y, requirements="W")) for x, y in arrays)
    pending: list[dict[str, Any]] = []

    def report(row: dict[str, Any], **extra: Any) -> None:
        tune.report({metric: row[metric], "epoch": row["epoch"], "loss": row["loss"], "accuracy": row["accuracy"],
                     **extra})

    def progress(event: Any) -> None:
        if isinstance(event, EpochEnd):
            pending.append({key: event.row[key] for key in (metric, "epoch", "loss", "accuracy")})
        elif isinstance(event, EpochStart) and pending:
            report(pending.pop())

    trackers = _trial_trackers(settings.get("tracking"), run_dir.name, arrays)
    with Fanout(*trackers) as tracker:  # closed before the last report, where Tune may end this process
        result = train(config, out_dir=run_dir, arrays=arrays,
                       progress=Fanout(progress, tracker) if trackers else progress)
    if pending:
        report(pending.pop(), test_accuracy=result.metrics["test_accuracy"], finished=True)


def _tracking_settings(log: str | list[str] | None, spec: SweepSpec, out_dir: Path) -> dict[str, Any] | None:
    """What every trial's loggers need (`fmnist sweep --log`): the backends, checked here in one line; the MLflow
    store resolved here, since trials run in their own working directories (default: beside the sweep folder, as
    for `fmnist train`); one MLflow experiment per sweep, so its table compares the trials."""
    from fmnist import tracking

    backends = tracking.parse_backends(log)
    if not backends:
        return None
    tracking.require(backends)
    return {"backends": backends, "sweep": spec.name,
            "uri": tracking.default_tracking_uri(out_dir.parent) if "mlflow" in backends else None,
            "experiment": os.environ.get("MLFLOW_EXPERIMENT_NAME") or f"fmnist-sweep-{spec.name}"}


def _trial_trackers(settings: dict[str, Any] | None, trial: str, arrays: tuple) -> list[Any]:
    """A trial's loggers: TensorBoard in its run folder, an MLflow run named `<sweep>/<trial>` (a trial that ASHA
    stops keeps its MLflow run RUNNING: Tune ends its process without warning)."""
    if not settings:
        return []
    from fmnist import tracking

    return tracking.loggers(settings["backends"], arrays=arrays, tracking_uri=settings["uri"],
                            experiment=settings["experiment"], run_name=f"{settings['sweep']}/{trial}",
                            tags={"fmnist.sweep": settings["sweep"], "fmnist.trial": trial})


@contextlib.contextmanager
def _muted(name: str) -> Iterator[None]:
    """Silence a logger and its children for a while (expected noise, reported another way)."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        logger.setLevel(level)


def _finish_stopped(run_dir: Path, arrays: tuple) -> None:
    """Turn a stopped trial's resume checkpoint into a full run folder, as Ctrl-C would have (same code path)."""
    from fmnist.training import StopRequest, train

    stop = StopRequest()
    stop.request()  # stop before the first step: train() keeps the last complete epoch and writes the run folder
    with _muted("fmnist.training"):  # "interrupted; keeping the last complete epoch" is expected here
        train(resume=run_dir, arrays=arrays, stop=stop)


def _error_text(error: BaseException) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", str(error))  # Ray colours the traceback's first line


def _error_line(error: BaseException | None) -> str | None:
    """The last line of a trial's traceback, `fmnist.errors.` dropped: what went wrong, in one line."""
    if error is None:
        return None
    lines = [line.strip() for line in _error_text(error).splitlines() if line.strip()]
    return lines[-1].removeprefix("fmnist.errors.") if lines else error.__class__.__name__


def default_concurrency(trial_threads: int) -> int:
    """Trials at once when not told: the cores divided by the threads per trial, at least one."""
    return max(1, usable_cores() // trial_threads)


def _trial_callback(progress: Callable[[events.SweepEvent], None] | None, metric: str, params: dict[str, dict],
                    ended: set[str]) -> Any:
    """A Tune callback that records each trial's params (a trial that fails before reporting has no result config)
    and which trials ended (the rest were cut off by Ctrl-C), and passes trial events to `progress` (the CLI)."""
    from ray.tune import Callback

    emit = progress or (lambda event: None)

    class Forward(Callback):
        def on_trial_start(self, iteration, trials, trial, **info):
            params[_trial_name(trial)] = {name: _plain(value) for name, value in trial.config.items()}
            emit(events.TrialStart(_trial_name(trial), params[_trial_name(trial)]))

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if metric in result:
                emit(events.TrialResult(_trial_name(trial), result.get("epoch"), metric, result[metric]))

        def on_trial_complete(self, iteration, trials, trial, **info):
            ended.add(_trial_name(trial))

        def on_trial_error(self, iteration, trials, trial, **info):
            ended.add(_trial_name(trial))
            emit(events.TrialError(_trial_name(trial)))

    return Forward()


def _param_space(spec: SweepSpec) -> dict[str, Any]:
    from ray import tune

    space = {}
    for name, distribution in spec.space.items():
        (kind, args), = distribution.items()
        if kind == "grid":
            space[name] = tune.grid_search(args)
        elif kind == "choice":
            space[name] = tune.choice(args)
        elif kind == "uniform":
            space[name] = tune.uniform(*args)
        elif kind == "loguniform":
            space[name] = tune.loguniform(*args)
        else:
            space[name] = tune.randint(args[0], args[1] + 1)  # the spec's high is included, Ray's is not
    return space


@contextlib.contextmanager
def _local_ray(num_cpus: int) -> Iterator[Path]:
    """A private Ray instance on this machine (no dashboard, no log forwarding), shut down and removed after."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # never phone home
    # Tune's newer console output prints an experiment banner even at verbose=0; the classic one stays silent.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    scratch = Path(tempfile.mkdtemp(prefix="fmnist-ray-"))  # short: Ray's socket paths must fit in 107 bytes
    owned = not ray.is_initialized()
    if owned:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.ERROR, _temp_dir=str(scratch / "ray"))
    try:
        yield scratch
    finally:
        if owned:
            ray.shutdown()
        shutil.rmtree(scratch, ignore_errors=True)


def _tune(spec: SweepSpec, trials_dir: Path, arrays: tuple, max_concurrent: int, callbacks: list,
          tracking: dict[str, Any] | None = None) -> list[tuple]:
    """Run the trials with Ray Tune on a private local Ray; return (trial folder name, error or None) per trial."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    cores = usable_cores()
    settings = {"preset": spec.preset, "fixed": spec.fixed, "metric": spec.metric, "threads": spec.trial_threads,
                "trials": str(trials_dir), "tracking": tracking}
    scheduler = None
    if spec.asha:
        scheduler = ASHAScheduler(time_attr="epoch", max_t=spec.max_epochs(), grace_period=spec.asha["grace_period"],
                                  reduction_factor=spec.asha["reduction_factor"])
    with _local_ray(cores) as scratch:
        trainable = tune.with_resources(tune.with_parameters(_trainable, arrays=arrays, settings=settings),
                                        {"cpu": min(spec.trial_threads, cores)})
        tuner = tune.Tuner(
            trainable,
            param_space=_param_space(spec),
            tune_config=tune.TuneConfig(
                metric=spec.metric, mode=spec.mode, scheduler=scheduler, num_samples=spec.samples,
                # Tune ignores max_concurrent_trials when given a search algorithm: the generator limits itself.
                search_alg=BasicVariantGenerator(max_concurrent=max_concurrent, random_state=spec.sampler_seed),
                trial_name_creator=_trial_name, trial_dirname_creator=_trial_name),
            run_config=tune.RunConfig(name=spec.name, storage_path=str(scratch / "tune"), verbose=0,
                                      callbacks=callbacks),
        )
        with _muted("ray.tune"):  # Tune logs every failed trial's traceback; sweep.json and error.txt keep them
            grid = tuner.fit()
        return [(Path(result.path).name, result.error) for result in grid]


def run_sweep(
    spec: SweepSpec,
    out_dir: str | os.PathLike,
    data_dir: str | os.PathLike | None = None,
    arrays: tuple | None = None,
    max_concurrent: int | None = None,
    progress: Callable[[events.SweepEvent], None] | None = None,
    log: str | list[str] | None = None,
) -> list[dict[str, Any]]:
    """Run every trial with Ray Tune and write sweep.json, sweep.md and `best`; return the trials, best first.

    The data is loaded once here and shared with the trials through Ray's object store. At most
    `max_concurrent` trials run at once (default: the cores divided by `spec.trial_threads`), each with
    `trial_threads` torch threads, so trials never oversubscribe the CPU. On Ctrl-C, Tune stops every trial;
    the report is still written, the trials cut off marked `interrupted` (with their last complete epoch).
    `log` ("tensorboard", "mlflow" or both, as `fmnist train --log`) tracks every trial (see `fmnist.tracking`).
    """
    _require("ray.tune")
    from fmnist import data

    out_dir = Path(out_dir).resolve()  # Tune runs trials in their own working directories
    trials_dir = out_dir / "trials"
    if trials_dir.is_dir() and any(trials_dir.iterdir()):
        raise SweepError(f"{out_dir} already holds a sweep's trials; choose another --out or delete that folder")
    if max_concurrent is None:
        max_concurrent = default_concurrency(spec.trial_threads)
    if not _is_int(max_concurrent) or max_concurrent < 1:
        raise ConfigError(f"max_concurrent must be a positive integer, got {max_concurrent!r}")
    tracking = _tracking_settings(log, spec, out_dir)
    if arrays is None:
        arrays = data.load_data(data_dir)
    _check_data_size(spec, arrays)
    trials_dir.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    params: dict[str, dict[str, Any]] = {}
    ended: set[str] = set()
    outcomes = _tune(spec, trials_dir, arrays, max_concurrent, [_trial_callback(progress, spec.metric, params, ended)],
                     tracking)
    trials = [_collect(trials_dir / name, params.get(name), error, name in ended, arrays, spec)
              for name, error in outcomes]
    trials = rank(trials, spec.mode)
    write_report(out_dir, spec, trials, seconds=time.perf_counter() - started, max_concurrent=max_concurrent)
    if not any(trial["status"] in ("completed", "stopped early", "interrupted") for trial in trials):
        first = next((t["error"] for t in trials if t.get("error")), "no trial finished an epoch")
        raise SweepError(f"every trial failed (see {out_dir / 'sweep.json'}); the first error: {first}")
    return trials


def _check_data_size(spec: SweepSpec, arrays: tuple) -> None:
    """A validation split as large as the training set would fail every trial; say so before starting Ray."""
    if {"validation", "train_subset", "split"} & set(spec.space):
        return
    fixed = {name: spec.fixed.get(name, preset_value(spec.preset, name))
             for name in ("validation", "train_subset", "split")}
    if fixed["split"] != "standard":
        return
    size = min(fixed["train_subset"] or len(arrays[0][1]), len(arrays[0][1]))
    if fixed["validation"] and fixed["validation"] >= size:
        raise ConfigError(f"validation {fixed['validation']} leaves no training images (of {size}); "
                          "set a smaller validation under fixed")


def _collect(run_dir: Path, params: dict[str, Any] | None, error: BaseException | None, ended: bool,
             arrays: tuple, spec: SweepSpec) -> dict[str, Any]:
    """One trial's row for the report; a trial stopped early (by ASHA, or by Ctrl-C: `ended` False) gets its
    last complete epoch turned into a run folder first."""
    params = {name: _plain(value) for name, value in (params or {}).items()}
    row: dict[str, Any] = {"trial": run_dir.name, "run": f"trials/{run_dir.name}", "params": params,
                           "metric": None, "epochs_run": 0, "epochs_planned": None, "status": "failed",
                           "stopped_early": False, "test_accuracy": None, "train_seconds": None,
                           "error": _error_line(error), "best": False}
    if error is not None:  # the whole traceback, since Tune's own records are temporary
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "error.txt", _error_text(error) + "\n")
        row["error"] += f" (traceback in {row['run']}/error.txt)"
        return row
    finished = (run_dir / checkpoint.META_FILE).exists()
    if not finished and (run_dir / checkpoint.RESUME_META).exists():
        try:
            _finish_stopped(run_dir, arrays)
        except FmnistError as failure:
            row["error"] = str(failure)
    metrics = checkpoint.read_json_or_empty(run_dir / checkpoint.METRICS_FILE)
    if not metrics or not (run_dir / checkpoint.META_FILE).exists():
        row["status"] = "failed" if ended else "interrupted"
        row["error"] = row["error"] or "the trial ended before finishing an epoch"
        return row
    history = read_history(run_dir)
    value: float | None = history[-1].get(spec.metric) if history else None
    if value is not None and not math.isfinite(value):
        value = None  # a diverged trial ranks last (and NaN is not JSON)
    status = "completed" if finished else "stopped early" if ended else "interrupted"
    row.update(metric=value, epochs_run=metrics.get("epochs_run"), epochs_planned=metrics.get("epochs_planned"),
               status=status, stopped_early=not finished, test_accuracy=metrics.get("test_accuracy"),
               train_seconds=metrics.get("train_seconds"), error=None)
    return row


def rank(trials: list[dict[str, Any]], mode: str) -> list[dict[str, Any]]:
    """Best first by the metric (trials without one last), with `best` set on the first trial that has one."""
    sign = -1.0 if mode == "max" else 1.0
    ranked = sorted(copy.deepcopy(trials), key=lambda t: (t["metric"] is None, sign * (t["metric"] or 0.0)))
    for position, trial in enumerate(ranked, 1):
        trial["rank"], trial["best"] = position, False
    if ranked and ranked[0]["metric"] is not None:
        ranked[0]["best"] = True
    return ranked


# ----------------------------------------------------------------------------------------------- the report
def format_params(params: dict[str, Any]) -> str:
    """`lr=0.1234 widths=16,32,64`: short and stable, for tables."""
    parts = []
    for name, value in sorted(params.items()):
        if isinstance(value, list):
            shown = ",".join(str(item) for item in value)
        elif isinstance(value, float):
            shown = f"{value:.4g}"
        else:
            shown = str(value)
        parts.append(f"{name}={shown}")
    return " ".join(parts)


def write_report(out_dir: Path, spec: SweepSpec, trials: list[dict[str, Any]], seconds: float = 0.0,
                 max_concurrent: int | None = None) -> None:
    """sweep.json, sweep.md and the `best` link (each written atomically)."""
    import ray

    best = next((trial for trial in trials if trial["best"]), None)
    write_json(out_dir / "sweep.json", {
        "spec": spec.to_dict(), "metric": spec.metric, "mode": spec.mode,
        "best": best["trial"] if best else None,
        "trials": trials, "seconds": round(seconds, 1), "max_concurrent": max_concurrent, "ray": ray.__version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    })
    atomic_write_text(out_dir / "sweep.md", _markdown(spec, trials, seconds))
    if best:
        _point_best(out_dir, Path("trials") / best["trial"])


def _markdown(spec: SweepSpec, trials: list[dict[str, Any]], seconds: float) -> str:
    direction = "higher" if spec.mode == "max" else "lower"
    asha = (f"ASHA (grace period {spec.asha['grace_period']}, reduction factor {spec.asha['reduction_factor']})"
            if spec.asha else "no early stopping")
    lines = [f"# Sweep {spec.name}", "",
             f"{len(trials)} trial{'s' if len(trials) != 1 else ''} of preset `{spec.preset}`, {spec.search} search, "
             f"{asha}, ranked by "
             f"`{spec.metric}` ({direction} is better), {seconds:.0f} s in all.", ""]
    if spec.fixed:
        lines += [f"Fixed for every trial: {format_params(spec.fixed)}", ""]
    lines += [f"| rank | trial | {spec.metric} | epochs | status | test accuracy | params |",
              "| ---: | --- | ---: | ---: | --- | ---: | --- |"]
    for trial in trials:
        name = f"**{trial['trial']}** (best)" if trial["best"] else trial["trial"]
        value = f"{trial['metric']:.4f}" if trial["metric"] is not None else "-"
        test = f"{trial['test_accuracy']:.4f}" if trial["test_accuracy"] is not None else "-"
        epochs = f"{trial['epochs_run']}/{trial['epochs_planned']}" if trial["epochs_planned"] else "-"
        status = trial["status"] + (f": {trial['error']}" if trial.get("error") else "")
        lines.append(f"| {trial['rank']} | {name} | {value} | {epochs} | {status.replace('|', '/')} | {test} | "
                     f"{format_params(trial['params'])} |")
    lines += ["", "Each trial is a run folder under `trials/`; `best` points at the best one."]
    return "\n".join(lines) + "\n"


def _point_best(out_dir: Path, target: Path) -> None:
    """`best` -> trials/<trial>, a relative symlink swapped in atomically; a text file where symlinks fail."""
    link = out_dir / "best"
    temporary = out_dir / f".best.{os.getpid()}.tmp"
    try:
        temporary.unlink(missing_ok=True)
        temporary.symlink_to(target, target_is_directory=True)
        if link.is_dir() and not link.is_symlink():
            raise OSError(f"{link} is a real folder")
        os.replace(temporary, link)
    except OSError:
        temporary.unlink(missing_ok=True)
        if not link.is_dir():
            atomic_write_text(link, f"{target.as_posix()}\n")

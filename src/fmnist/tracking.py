"""Training runs in TensorBoard and MLflow: loggers that consume training's progress events.

Training reports typed events (`fmnist.events`) to one `progress` callback. Each logger here is such a callback,
so the loop knows nothing of tracking, and `Fanout` hands every event to several consumers (the CLI's printer and
the loggers). From Python:

    from fmnist import tracking, training
    with tracking.Fanout(*tracking.loggers("tensorboard,mlflow")) as progress:
        training.train("fast", out_dir="runs/fast", progress=progress)

- TensorBoard (`pip install 'fmnist[tensorboard]'`; `tensorboard --logdir runs`): event files in `RUN/tb/`. The
  config as text when training starts; per epoch (step = epoch) the train, validation and test loss and accuracy,
  the learning rate and the seconds; at the end the hyper-parameters with the final scores (HParams tab), a grid
  of training images and the test set's confusion matrix.
- MLflow (`pip install 'fmnist[mlflow]'`): one MLflow run per training, in the experiment "fmnist"
  ($MLFLOW_EXPERIMENT_NAME to change it): the config as params, the same per-epoch metrics (step = epoch), the
  final metrics, the run folder's files as artifacts, and the model as a pyfunc whose `predict` takes uint8
  images (N, 28, 28) and returns (N, 10) probabilities (`fmnist.mlflow_model`), registered under a name if asked.
  The store: `tracking_uri`, else $MLFLOW_TRACKING_URI, else `sqlite:///<runs root>/mlflow.db`, the runs root
  being the folder that holds the run folder (artifacts then go to `<runs root>/mlartifacts/`). A resumed run
  is a new MLflow run, tagged with the epoch it resumed from.

Tracking must never cost a training: a failure (mlflow missing, a bad URI, an unreachable server) logs one warning
and turns that logger off; training, its output and its run folder stay as they would be without it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import sys
import tempfile
import time
import types
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from fmnist import events
from fmnist.errors import ConfigError, did_you_mean

log = logging.getLogger(__name__)

BACKENDS = ("tensorboard", "mlflow")  # each is also the name of the package it needs and of the fmnist extra
DEFAULT_EXPERIMENT = "fmnist"
TB_FOLDER = "tb"
PROGRESS_BAR_VARIABLE = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"  # MLflow draws tqdm bars on stderr unless "false"
# TensorBoard names per history.csv column: loss and accuracy of each split share a chart section
SCALARS = {"loss": "loss/train", "accuracy": "accuracy/train", "val_loss": "loss/validation",
           "val_accuracy": "accuracy/validation", "test_loss": "loss/test", "test_accuracy": "accuracy/test",
           "lr": "learning_rate", "seconds": "time/epoch_seconds", "train_seconds": "time/train_seconds"}


def parse_backends(values: str | Iterable[str] | None) -> list[str]:
    """`--log` values ("tensorboard", "mlflow", comma lists, repeated) in order and without repeats; an unknown
    name is a one-line ConfigError with a did-you-mean."""
    if values is None:
        return []
    chosen: list[str] = []
    for value in [values] if isinstance(values, str) else values:
        for name in (part.strip().lower() for part in value.split(",")):
            if not name:
                continue
            if name not in BACKENDS:
                raise ConfigError(f"--log {name!r} is not a tracking backend; use {' or '.join(BACKENDS)}"
                                  f"{did_you_mean(name, BACKENDS)}")
            if name not in chosen:
                chosen.append(name)
    return chosen


def require(backends: Iterable[str]) -> None:
    """Fail before any work, in one line naming the extra to install, when a backend's package is missing (found
    without importing it: mlflow takes seconds to import)."""
    for backend in backends:
        if importlib.util.find_spec(backend) is None:
            raise ConfigError(f"--log {backend} needs the {backend} package, which is not installed; "
                              f"run: pip install 'fmnist[{backend}]'")


def default_tracking_uri(runs_root: str | os.PathLike) -> str:
    """$MLFLOW_TRACKING_URI, else an SQLite store in the folder that holds the run folders (`runs/mlflow.db`)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(Path(runs_root) / 'mlflow.db').resolve()}"


def loggers(backends: str | Iterable[str], *, data_dir: str | os.PathLike | None = None, arrays: tuple | None = None,
            tracking_uri: str | None = None, experiment: str | None = None, run_name: str | None = None,
            tags: dict[str, str] | None = None, registered_model: str | None = None) -> list[Any]:
    """One logger per backend, as `--log` builds them. `data_dir`/`arrays` are what training was given: the
    TensorBoard logger re-reads the images it draws at the end from them (the MLflow options go to MLflowLogger)."""
    built: list[Any] = []
    for backend in parse_backends(backends):
        if backend == "tensorboard":
            built.append(TensorBoardLogger(data_dir=data_dir, arrays=arrays))
        else:
            built.append(MLflowLogger(tracking_uri, experiment=experiment, run_name=run_name, tags=tags,
                                      registered_model=registered_model))
    return built


class Fanout:
    """Hands each event to several consumers in order (the CLI's printer, then the loggers); `close()`, or the end
    of a `with` block, closes every consumer that has a `close`."""

    def __init__(self, *consumers: Callable[[Any], None] | None):
        self.consumers = [consumer for consumer in consumers if consumer is not None]

    def __call__(self, event: Any) -> None:
        for consumer in self.consumers:
            consumer(event)

    def close(self) -> None:
        for consumer in self.consumers:
            close = getattr(consumer, "close", None)
            if close is not None:
                close()

    def __enter__(self) -> Fanout:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Fanout({', '.join(type(consumer).__name__ for consumer in self.consumers)})"


class _Logger:
    """What both loggers share: events are dispatched to `on_<event class>` methods, and the first exception
    anywhere logs one warning and turns the logger off, so a tracking problem never reaches training."""

    backend = "tracking"
    package = ""  # imported before the backend's chatter is silenced: importing mlflow resets its loggers

    def __init__(self) -> None:
        self.failed = False

    def __call__(self, event: Any) -> None:
        handler = getattr(self, f"on_{type(event).__name__.lower()}", None)
        if handler is not None and not self.failed:
            self._guarded(handler, event)

    def _guarded(self, action: Callable[..., Any], *args: Any) -> None:
        try:
            with _quiet(self.package):
                action(*args)
        except Exception as error:  # any failure of a tracking backend is reported the same way, once
            if not self.failed:
                log.warning("%s tracking is off for this run (training goes on): %s", self.backend, _one_line(error))
            self.failed = True

    def close(self) -> None:
        """Finish what an interrupted or failed training left open (overridden by the loggers)."""


# ----------------------------------------------------------------------------------------------- TensorBoard
def _summary_writer(log_dir: Path) -> Any:
    """torch's SummaryWriter, without TensorFlow: tensorboard writes its files through TensorFlow when TF is
    installed (the dev extra has it), which costs 15 s of import and a screen of TF log lines. Its documented
    `tensorboard.compat.notf` switch selects tensorboard's own stub instead, which writes the same event files.
    When TF is already imported nothing changes."""
    if "tensorflow" not in sys.modules:
        sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(log_dir))


class TensorBoardLogger(_Logger):
    """Writes a training's scalars, hyper-parameters and figures as TensorBoard event files in `RUN/tb/`.

    `log_dir` overrides where (needed when training writes no run folder). `data_dir` and `arrays`, as given to
    `train`, are where the end-of-run figures read their images from. Events are flushed every epoch, so
    `tensorboard --logdir runs` shows a training while it runs.
    """

    backend = "TensorBoard"
    package = "tensorboard"

    def __init__(self, log_dir: str | os.PathLike | None = None, *, data_dir: str | os.PathLike | None = None,
                 arrays: tuple | None = None):
        super().__init__()
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.data_dir, self.arrays = data_dir, arrays
        self.writer: Any = None
        self.config: Any = None

    def _folder(self, run_dir: Path | None) -> Path:
        if self.log_dir is not None:
            return self.log_dir
        if run_dir is None:
            raise ConfigError("training writes no run folder; give TensorBoardLogger(log_dir=...)")
        return Path(run_dir) / TB_FOLDER

    def on_start(self, event: events.Start) -> None:
        self.config = event.config
        self.writer = _summary_writer(self._folder(event.run_dir))
        settings = json.dumps(event.config.to_dict(), indent=2)
        self.writer.add_text("config", f"```json\n{settings}\n```", event.start_epoch)  # ``` keeps it verbatim
        self.writer.flush()

    def on_epochend(self, event: events.EpochEnd) -> None:
        for key, value in event.row.items():
            if key != "epoch" and _is_number(value):
                self.writer.add_scalar(SCALARS.get(key, key), value, event.epoch)
        self.writer.flush()

    def on_end(self, event: events.End) -> None:
        """Hyper-parameters and figures, written into the finished folder: when an --overwrite run was built in a
        staging folder, that folder has just been renamed, so the epochs' writer (flushed) is closed first."""
        self._close_writer()
        self.writer = _summary_writer(self._folder(event.run_dir))
        final = {f"hparam/{key}": event.metrics[key] for key in ("test_accuracy", "test_loss", "val_accuracy")
                 if _is_number(event.metrics.get(key))}
        self.writer.add_hparams(_hparams(self.config.to_dict()), final, run_name=".")
        step = int(event.metrics.get("epochs_run") or 0)
        if event.run_dir is not None:
            for tag, figure in _figures(self.config, Path(event.run_dir), self.data_dir, self.arrays).items():
                self.writer.add_figure(tag, figure, step)  # closes the figure
        self._close_writer()

    def _close_writer(self) -> None:
        writer, self.writer = self.writer, None
        if writer is not None:
            writer.close()

    def close(self) -> None:
        """Close the event file a training that failed or was interrupted left open."""
        if self.writer is not None:
            self._guarded(self._close_writer)


def _hparams(config: dict[str, Any]) -> dict[str, Any]:
    """Config values as TensorBoard's HParams accepts them: numbers, strings and booleans (lists joined)."""
    shown = {}
    for key, value in config.items():
        if isinstance(value, list | tuple):
            value = ",".join(map(str, value))
        shown[key] = value if isinstance(value, int | float | str | bool) else str(value)
    return shown


def _figures(config: Any, run_dir: Path, data_dir: Any, arrays: tuple | None) -> dict[str, Any]:
    """The figures of a finished run that `fmnist plot` draws too: random training images per class and the test
    set's confusion matrix (of the model in the folder, on the test split the run was measured on)."""
    import numpy as np

    from fmnist import plots, training
    from fmnist.predict import Classifier

    splits = training.load_splits(config, arrays, data_dir)
    (x_train, y_train), (x_test, y_test) = splits["train"], splits["test"]
    classifier = Classifier.load(run_dir)
    classes = len(classifier.classes)
    predicted = classifier.predict(x_test)
    matrix = np.bincount(np.asarray(y_test, np.int64) * classes + predicted, minlength=classes * classes)
    return {"images/training_samples": plots.sample_grid(x_train, y_train, per_class=8, seed=config.seed,
                                                         class_names=classifier.classes),
            "images/confusion_matrix": plots.confusion_matrix(matrix.reshape(classes, classes), classifier.classes)}


# ----------------------------------------------------------------------------------------------- MLflow
class MLflowLogger(_Logger):
    """Logs a training as one MLflow run: params, per-epoch and final metrics, the run folder, a pyfunc model.

    `tracking_uri`: where (default: $MLFLOW_TRACKING_URI, else `sqlite:///<runs root>/mlflow.db`); `experiment`:
    default $MLFLOW_EXPERIMENT_NAME, else "fmnist"; `run_name`: default the run folder's name; `tags` are added to
    the run; `registered_model` also registers the model under that name in the model registry. Uses the
    `MlflowClient` API only, so it touches no process-wide "active run" and several can log at once.
    """

    backend = "MLflow"
    package = "mlflow"

    def __init__(self, tracking_uri: str | None = None, *, experiment: str | None = None,
                 run_name: str | None = None, tags: dict[str, str] | None = None,
                 registered_model: str | None = None):
        super().__init__()
        self.tracking_uri = tracking_uri
        self.experiment = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
        self.run_name, self.tags, self.registered_model = run_name, dict(tags or {}), registered_model
        self.client: Any = None
        self.run_id: str | None = None
        self.ended = False
        self.run_dir: Path | None = None
        self.uploaded: dict[str, tuple[float, int]] = {}  # artifact path -> (mtime, size) when uploaded

    def on_start(self, event: events.Start) -> None:
        from mlflow import MlflowClient
        from mlflow.entities import Param

        root = Path(event.run_dir).parent if event.run_dir is not None else Path("runs")
        uri = self.tracking_uri or default_tracking_uri(root)
        if uri.startswith("sqlite:///"):  # SQLite creates the file but not its folder (runs/ before any run)
            Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        _bounded_http_retries()
        self.client = MlflowClient(tracking_uri=uri)
        tags = {"fmnist.preset": event.config.preset, "fmnist.device": event.device,
                "fmnist.precision": event.precision, **self.tags}
        if event.run_dir is not None:
            tags["fmnist.run_dir"] = str(Path(event.run_dir).resolve())
        if event.start_epoch:
            tags["fmnist.resumed_from_epoch"] = str(event.start_epoch)
        name = self.run_name or (Path(event.run_dir).name if event.run_dir is not None else None)
        run = self.client.create_run(self._experiment_id(uri), run_name=name, tags=tags)
        self.run_id = run.info.run_id
        params = [Param(key, str(value)[:6000]) for key, value in sorted(event.config.to_dict().items())]
        params += [Param("parameters", str(event.parameters)), Param("train_size", str(event.train_size))]
        self.client.log_batch(self.run_id, params=params)

    def _experiment_id(self, uri: str) -> str:
        """The experiment's id, created when missing; with a local SQLite store its artifacts go beside the
        database, in `mlartifacts/<experiment>/<run id>/artifacts/` (MLflow's default would be ./mlruns in whatever
        folder the command ran from). Four levels down, so `fmnist runs` does not list the copies of run folders."""
        found = self.client.get_experiment_by_name(self.experiment)
        if found is not None:
            return found.experiment_id
        location = None
        if uri.startswith("sqlite:///"):
            folder = Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts" / _safe_name(self.experiment)
            location = folder.resolve().as_uri()
        try:
            return self.client.create_experiment(self.experiment, artifact_location=location)
        except Exception:  # another process (a sweep's trial) created it first
            found = self.client.get_experiment_by_name(self.experiment)
            if found is None:
                raise
            return found.experiment_id

    def on_epochend(self, event: events.EpochEnd) -> None:
        self._log_metrics({key: value for key, value in event.row.items() if key != "epoch"}, event.epoch)

    def on_end(self, event: events.End) -> None:
        """Final metrics (numbers as metrics, words as tags; tables such as per-class scores are in the
        uploaded metrics.json), the run folder, the model; then the run is over."""
        from mlflow.entities import RunTag

        metrics = _flat(event.metrics)
        self._log_metrics(metrics, int(metrics.get("epochs_run") or 0))
        words = [RunTag(f"fmnist.{key}", str(value)[:5000]) for key, value in metrics.items()
                 if isinstance(value, str | bool)]
        if event.run_dir is not None:  # the final folder: Start named the staging one of an --overwrite run
            words.append(RunTag("fmnist.run_dir", str(Path(event.run_dir).resolve())))
        if words:
            self.client.log_batch(self.run_id, tags=words)
        if event.run_dir is not None:
            self.run_dir = Path(event.run_dir)
            self.client.update_run(self.run_id, name=self.run_name or self.run_dir.name)
            self._upload_new_files()
            self._log_model()
        self.client.set_terminated(self.run_id, "KILLED" if event.metrics.get("interrupted") else "FINISHED")
        self.ended = True

    def _log_metrics(self, values: dict[str, Any], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key, float(value), now, step) for key, value in values.items() if _is_number(value)]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def _upload_new_files(self) -> None:
        """The run folder's files not uploaded yet or changed since (the CLI draws curves.png after training),
        without the resume checkpoint, which only `fmnist train --resume` needs."""
        from fmnist.checkpoint import RESUME_META, RESUME_TENSORS

        for path in sorted(p for p in self.run_dir.rglob("*") if p.is_file()):
            relative = path.relative_to(self.run_dir)
            if path.name in (RESUME_META, RESUME_TENSORS) or any(part.startswith(".") for part in relative.parts):
                continue
            stat = path.stat()
            if self.uploaded.get(relative.as_posix()) != (stat.st_mtime, stat.st_size):
                parent = relative.parent.as_posix()
                self.client.log_artifact(self.run_id, str(path), None if parent == "." else parent)
                self.uploaded[relative.as_posix()] = (stat.st_mtime, stat.st_size)

    def _log_model(self) -> None:
        """The pyfunc model under the run's `model` artifact, and in the registry when a name was given."""
        from fmnist.mlflow_model import save_pyfunc

        with tempfile.TemporaryDirectory(prefix="fmnist-mlflow-") as scratch:
            self.client.log_artifacts(self.run_id, str(save_pyfunc(self.run_dir, Path(scratch) / "model")), "model")
        if self.registered_model:
            with contextlib.suppress(Exception):  # it exists already: add a version to it
                self.client.create_registered_model(self.registered_model)
            source = f"{self.client.get_run(self.run_id).info.artifact_uri}/model"
            self.client.create_model_version(self.registered_model, source, run_id=self.run_id)

    def close(self) -> None:
        """Upload files the caller added after training (the CLI's curves.png); a run that never reached its end
        (an error, Ctrl-C) is marked FAILED rather than left RUNNING."""
        if self.run_id is None or self.failed:
            return
        if self.ended and self.run_dir is not None:
            self._guarded(self._upload_new_files)
        elif not self.ended:
            self._guarded(self.client.set_terminated, self.run_id, "FAILED")
            self.ended = True

    def __repr__(self) -> str:
        return f"MLflowLogger(experiment={self.experiment!r}, run_id={self.run_id!r})"


def _bounded_http_retries() -> None:
    """MLflow retries an unreachable server 7 times with growing pauses (minutes before the first epoch could
    start); unless the user chose otherwise, two quick retries and a 10 s timeout bound the wait to seconds."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def _flat(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"calibration": {"temperature": 1.2}} -> {"calibration.temperature": 1.2}: MLflow keys are flat."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# ----------------------------------------------------------------------------------------------- helpers
def _is_number(value: Any) -> bool:
    """A real number to plot (booleans and NaN/inf are not)."""
    import math

    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _safe_name(name: str) -> str:
    """An experiment name as one folder name: "a/b" would nest folders, ".." would climb out."""
    cleaned = "".join(character if character.isalnum() or character in "-_." else "_" for character in name)
    return cleaned.strip(".") or "experiment"


def _one_line(error: BaseException) -> str:
    """An exception as one short line: MLflow's messages can hold a whole server response or traceback."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else type(error).__name__
    return text if len(text) <= 200 else text[:197] + "..."


@contextlib.contextmanager
def _quiet(package: str) -> Iterator[None]:
    """Silence a backend's own chatter while a logger works (MLflow's INFO lines about database migrations, its
    artifact progress bars, advice as UserWarnings): it would interleave with the epoch lines, and a failure is
    reported once, by `_Logger`. The package is imported first (a missing one raises here, to be reported),
    because importing mlflow configures its loggers afresh."""
    if package:
        importlib.import_module(package)
    names = ("mlflow", "alembic", "tensorboard", "urllib3")  # urllib3: a line per retry of an unreachable server
    levels = {name: logging.getLogger(name).level for name in names}
    progress_bar = os.environ.get(PROGRESS_BAR_VARIABLE)
    try:
        for name in names:
            logging.getLogger(name).setLevel(logging.ERROR)
        os.environ[PROGRESS_BAR_VARIABLE] = "false"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        if progress_bar is None:
            os.environ.pop(PROGRESS_BAR_VARIABLE, None)
        else:
            os.environ[PROGRESS_BAR_VARIABLE] = progress_bar

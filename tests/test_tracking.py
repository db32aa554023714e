"""`--log tensorboard|mlflow`: training runs readable back from TensorBoard event files and an MLflow store.

Three small CLI trainings, each read back by several tests: one logged to TensorBoard; one logged to both backends
(marked slow: importing mlflow and creating its SQLite store take about 20 s on a busy 2-core machine); one against
a broken store. Data are small learnable arrays served in place of the dataset, as `tests/test_cli_train.py` serves
the real one.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from test_train import learnable_arrays

from fmnist import data, tracking
from fmnist.checkpoint import CONFIG_FILE, META_FILE, METRICS_FILE
from fmnist.cli import main
from fmnist.config import resolve_config
from fmnist.events import EpochEnd, Start
from fmnist.predict import Classifier
from fmnist.runs import list_runs

EPOCHS = 2
TRAIN = ["train", "--preset", "classic-adam", "--epochs", str(EPOCHS), "--validation", "60", "--track-test",
         "--hidden", "32", "--threads", "1"]


def run_cli(args: list[str]) -> tuple[int, str, str]:
    """`fmnist ARGS` in-process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(args)
    return code, out.getvalue(), err.getvalue()


def single_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fmnist: error: ") and "Traceback" not in stderr, stderr
    return lines[0]


def event_accumulator(folder: Path):
    """TensorBoard's own reader over a run's event files, everything kept (it samples images by default)."""
    sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))  # no TF import
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


@pytest.fixture(scope="module")
def served_arrays():
    """Learnable arrays in place of the dataset for every command here (the CLI loads data by `data.load_data`)."""
    arrays = learnable_arrays()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(data, "load_data", lambda data_dir=None, verify=True: arrays)
        yield arrays


@pytest.fixture(scope="module")
def board_run(served_arrays, tmp_path_factory):
    """One training logged to TensorBoard: (run folder, exit code, stdout, stderr)."""
    pytest.importorskip("tensorboard")
    run = tmp_path_factory.mktemp("board") / "runs" / "board"
    return (run, *run_cli([*TRAIN, "--out", str(run), "--log", "tensorboard"]))


@pytest.fixture(scope="module")
def logged(served_arrays, tmp_path_factory):
    """One training logged to TensorBoard and to an MLflow SQLite store (registered): (run, store, code, out, err)."""
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    root = tmp_path_factory.mktemp("tracking")
    store = f"sqlite:///{root / 'runs' / 'mlflow.db'}"  # where the default puts it: beside the run folder
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", store)
        patch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
        code, out, err = run_cli([*TRAIN, "--out", str(root / "runs" / "logged"), "--log", "tensorboard",
                                  "--log", "mlflow", "--register", "fmnist-test"])
        yield root / "runs" / "logged", store, code, out, err


@pytest.fixture
def mlflow_run(logged, monkeypatch):
    """The MLflow run of the logged training (the store is MLFLOW_TRACKING_URI while the test runs)."""
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", logged[1])
    client = MlflowClient()
    experiment = client.get_experiment_by_name(tracking.DEFAULT_EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    return client, runs[0]


# ----------------------------------------------------------------------------------------------- TensorBoard
def test_tensorboard_has_one_value_per_epoch_of_every_scalar(board_run):
    run, code, out, err = board_run
    assert code == 0 and err == "", err  # no TensorFlow or TensorBoard chatter reaches the terminal
    assert f"run folder: {run}" in out
    history = _history(run)
    scalars = event_accumulator(run / "tb")
    for tag, column in (("loss/train", "loss"), ("accuracy/train", "accuracy"), ("loss/validation", "val_loss"),
                        ("accuracy/validation", "val_accuracy"), ("loss/test", "test_loss"),
                        ("accuracy/test", "test_accuracy"), ("learning_rate", "lr"),
                        ("time/epoch_seconds", "seconds")):
        values = scalars.Scalars(tag)
        assert [value.step for value in values] == list(range(1, EPOCHS + 1)), tag
        np.testing.assert_allclose([value.value for value in values], [row[column] for row in history], rtol=1e-5)


def test_tensorboard_has_the_config_hparams_and_figures(board_run):
    run = board_run[0]
    accumulator = event_accumulator(run / "tb")
    tags = accumulator.Tags()
    assert {"images/training_samples", "images/confusion_matrix"} <= set(tags["images"])
    for tag in ("images/training_samples", "images/confusion_matrix"):
        image, = accumulator.Images(tag)  # drawn once, at the end
        assert image.step == EPOCHS and image.encoded_image_string.startswith(b"\x89PNG") and image.width > 200
    metrics = json.loads((run / METRICS_FILE).read_text())
    final, = accumulator.Scalars("hparam/test_accuracy")
    assert final.value == pytest.approx(metrics["test_accuracy"])
    assert "config/text_summary" in tags["tensors"]
    assert "_hparams_/session_start_info" in accumulator.PluginTagToContent("hparams")


def test_overwriting_a_logged_run_replaces_its_event_files(board_run, tmp_path):
    """--overwrite builds the new run beside the old one and swaps it in at the end: the epochs' events move with
    it, the end-of-run figures land in the final folder, and the old run's events are gone."""
    run = Path(shutil.copytree(board_run[0], tmp_path / "run"))
    before = {path.name for path in (run / "tb").iterdir()}
    code, out, err = run_cli([*TRAIN, "--epochs", "1", "--out", str(run), "--overwrite", "--log", "tensorboard"])
    assert code == 0 and err == "", err
    assert not before & {path.name for path in (run / "tb").iterdir()}
    board = event_accumulator(run / "tb")
    assert [value.step for value in board.Scalars("loss/train")] == [1]
    assert "images/confusion_matrix" in board.Tags()["images"]


def _history(run: Path) -> list[dict]:
    from fmnist.runs import read_history

    return read_history(run)


# ----------------------------------------------------------------------------------------------- MLflow
@pytest.mark.slow
def test_mlflow_run_has_params_metrics_per_epoch_and_artifacts(logged, mlflow_run):
    run, _, code, out, err = logged
    assert code == 0 and err == "", err  # neither backend's chatter reaches the terminal
    assert f"run folder: {run}" in out
    assert event_accumulator(run / "tb").Scalars("loss/train")  # both backends, from one --log each
    client, found = mlflow_run
    assert found.info.status == "FINISHED" and found.info.run_name == run.name
    config = json.loads((run / CONFIG_FILE).read_text())
    assert found.data.params["lr"] == str(config["lr"]) and found.data.params["hidden"] == "[32]"
    history = _history(run)
    for key in ("loss", "accuracy", "val_accuracy", "test_loss", "lr"):
        steps = client.get_metric_history(found.info.run_id, key)
        per_epoch = sorted((metric.step, metric.value) for metric in steps)[:EPOCHS]
        assert [step for step, _ in per_epoch] == list(range(1, EPOCHS + 1)), key
        np.testing.assert_allclose([value for _, value in per_epoch], [row[key] for row in history], rtol=1e-6)
    metrics = json.loads((run / METRICS_FILE).read_text())
    assert found.data.metrics["test_accuracy"] == pytest.approx(metrics["test_accuracy"])
    assert found.data.tags["fmnist.preset"] == "classic-adam"
    assert found.data.tags["fmnist.run_dir"] == str(run.resolve())
    artifacts = {item.path for item in client.list_artifacts(found.info.run_id)}
    assert {META_FILE, METRICS_FILE, CONFIG_FILE, "history.csv", "model", "plots", "tb"} <= artifacts
    assert "plots/curves.png" in {item.path for item in client.list_artifacts(found.info.run_id, "plots")}
    assert not any(name.startswith("resume") for name in artifacts)
    assert [row["name"] for row in list_runs(run.parent)] == [run.name]  # the artifact copy is not listed as a run


@pytest.mark.slow
def test_mlflow_pyfunc_model_answers_like_the_classifier(logged, mlflow_run, served_arrays):
    import mlflow.pyfunc

    client, found = mlflow_run
    images = served_arrays[1][0][:6]
    model = mlflow.pyfunc.load_model(f"runs:/{found.info.run_id}/model")
    probabilities = model.predict(images)
    assert probabilities.shape == (6, 10)
    np.testing.assert_allclose(probabilities, Classifier.load(logged[0]).predict_proba(images), rtol=1e-5, atol=1e-6)
    version, = client.search_model_versions("name='fmnist-test'")
    assert version.run_id == found.info.run_id


def test_a_broken_store_warns_once_and_training_finishes(served_arrays, tmp_path, monkeypatch, caplog):
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "nosuchscheme://nowhere")
    run = tmp_path / "runs" / "broken"
    with caplog.at_level(logging.WARNING):
        code, out, err = run_cli([*TRAIN, "--out", str(run), "--log", "mlflow"])
    assert code == 0, err
    warned = [record for record in caplog.records if record.name == "fmnist.tracking"]
    assert len(warned) == 1 and "MLflow tracking is off" in warned[0].getMessage(), caplog.text
    assert "\n" not in warned[0].getMessage() and "Traceback" not in err
    assert Classifier.load(run).predict_proba(served_arrays[1][0][:2]).shape == (2, 10)
    assert json.loads((run / METRICS_FILE).read_text())["epochs_run"] == EPOCHS
    assert not (run / "tb").exists()


def test_an_unreachable_server_is_one_warning_then_silence(monkeypatch, caplog):
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    logger = tracking.MLflowLogger("http://127.0.0.1:9")  # the discard port: nothing listens
    start = Start(resolve_config("fast"), 10, 1, 100, 320, 0, "cpu", 1, "fp32")
    with caplog.at_level(logging.WARNING, logger="fmnist.tracking"):
        for event in (start, EpochEnd(1, {"epoch": 1, "loss": 1.0}), EpochEnd(2, {"epoch": 2, "loss": 0.5})):
            logger(event)
        logger.close()
    assert logger.failed and len(caplog.records) == 1, caplog.text


# ----------------------------------------------------------------------------------------------- without the CLI
def test_python_api_logs_without_a_run_folder(tmp_path):
    pytest.importorskip("tensorboard")
    from fmnist.training import train

    printed = []
    with tracking.Fanout(printed.append, tracking.TensorBoardLogger(tmp_path / "tb")) as progress:
        train({"preset": "classic-adam", "epochs": 1, "hidden": [16], "threads": 1}, arrays=learnable_arrays(),
              progress=progress)
    assert any(isinstance(event, EpochEnd) for event in printed)
    assert [value.step for value in event_accumulator(tmp_path / "tb").Scalars("loss/train")] == [1]


# ----------------------------------------------------------------------------------------------- --log itself
def test_log_values_are_comma_lists_or_repeated():
    assert tracking.parse_backends(["tensorboard,mlflow", "MLflow", " tensorboard "]) == ["tensorboard", "mlflow"]
    assert tracking.parse_backends(None) == []


@pytest.mark.parametrize("args,expected", [
    (["--log", "tensorbord"], "--log 'tensorbord' is not a tracking backend; use tensorboard or mlflow; did you mean "
                              "'tensorboard'?"),
    (["--log", "foo"], "--log 'foo' is not a tracking backend; use tensorboard or mlflow"),
    (["--log", "tensorboard", "--register", "m"], "--register names the model in MLflow's model registry"),
])
def test_bad_log_flags_are_one_line_usage_errors(args, expected, tmp_path):
    code, out, err = run_cli(["train", "--dry-run", "--out", str(tmp_path / "run"), *args])
    assert code == 2 and expected in single_error_line(err)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("backend", ["mlflow", "tensorboard"])
def test_a_missing_package_names_the_extra(backend, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, backend, None)  # find_spec then reports it missing
    code, out, err = run_cli(["train", "--dry-run", "--out", str(tmp_path / "run"), "--log", f"tensorboard,{backend}"])
    assert code == 2 and f"pip install 'fmnist[{backend}]'" in single_error_line(err)
    assert not (tmp_path / "run").exists()


def test_train_help_says_where_runs_are_tracked(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert "--log BACKEND" in shown and "sqlite:///runs/mlflow.db" in shown and "RUN/tb/" in shown


# ----------------------------------------------------------------------------------------------- sweeps
def test_sweep_trials_get_their_own_named_loggers(tmp_path, monkeypatch):
    from fmnist import sweep

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    spec = sweep.parse_spec({"preset": "fast", "space": {"lr": {"choice": [0.1]}}}, name="tiny")
    assert sweep._tracking_settings(None, spec, tmp_path / "sweep") is None
    settings = sweep._tracking_settings(["tensorboard,mlflow"], spec, tmp_path / "sweep")
    assert settings["uri"] == f"sqlite:///{(tmp_path / 'mlflow.db').resolve()}"
    board, flow = sweep._trial_trackers(settings, "trial-003", learnable_arrays())
    assert isinstance(board, tracking.TensorBoardLogger) and board.log_dir is None  # RUN/tb of the trial folder
    assert (flow.experiment, flow.run_name, flow.tags["fmnist.trial"]) == ("fmnist-sweep-tiny", "tiny/trial-003",
                                                                         "trial-003")


@pytest.mark.slow
def test_a_sweep_logs_every_trial_to_tensorboard(tmp_path):
    pytest.importorskip("ray.tune")
    pytest.importorskip("tensorboard")
    from fmnist import sweep

    tiny = sweep.parse_spec({"preset": "classic-adam", "search": "grid",
                             "fixed": {"epochs": 1, "hidden": [16], "validation": 40},
                             "space": {"lr": {"grid": [0.01]}}}, name="tiny")
    trials = sweep.run_sweep(tiny, tmp_path / "sweep", arrays=learnable_arrays(), max_concurrent=1,
                             log=["tensorboard"])
    assert trials[0]["status"] == "completed"
    board = event_accumulator(tmp_path / "sweep" / trials[0]["run"] / "tb")
    assert [value.step for value in board.Scalars("loss/train")] == [1]
    assert "images/confusion_matrix" in board.Tags()["images"]

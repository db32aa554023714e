"""`fmnist train / evaluate / predict / plot` in-process through `fmnist.cli.main`, on the real dataset.

One `--dry-run` model (1 epoch on 512 images) is trained once per module and reused; tests that damage or
rewrite a run folder work on a copy. The real dataset is read from disk once per module and then served from
memory, so the many commands here do not each spend a second decompressing it.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fmnist import data
from fmnist.checkpoint import load_tensors
from fmnist.cli import main
from fmnist.training import PRESETS

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
RUN_FILES = ("model.safetensors", "model.json", "history.csv", "metrics.json", "config.json")
PLOTS = ("curves.png", "confusion.png", "predictions.png", "probabilities.png", "mistakes.png")


# ----------------------------------------------------------------------------------------------- helpers
def single_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("fmnist: error: ")
    assert "Traceback" not in stderr
    return lines[0]


def assert_png(path: Path, min_side: int = 200) -> None:
    content = path.read_bytes()
    assert content.startswith(PNG_SIGNATURE), path
    with Image.open(path) as image:
        image.load()
        assert image.format == "PNG" and min(image.size) >= min_side, (path, image.size)


def no_temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob(".*") if p.is_file()]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def copy_run(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run-copy"))


# ----------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def real_arrays(real_data_source):
    """The real dataset, read once (checksums verified) and then served from memory to every command here."""
    arrays = data.load_data(real_data_source.path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two threads on a busy 2-core machine spin against each other: many times slower
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(data, "load_data", lambda data_dir=None, verify=True: arrays)
            yield arrays
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(real_arrays, tmp_path_factory):
    """`fmnist train --preset classic-adam --dry-run --out RUN`, run once: (run folder, exit code, stdout, stderr)."""
    run = tmp_path_factory.mktemp("cli-train") / "run"
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["train", "--preset", "classic-adam", "--dry-run", "--out", str(run)])
    return run, code, out.getvalue(), err.getvalue()


@pytest.fixture
def run(trained) -> Path:
    """The shared dry-run folder (read-only use: copy it before changing anything)."""
    return trained[0]


@pytest.fixture
def test_labels(real_arrays) -> np.ndarray:
    return real_arrays[1][1]


# ----------------------------------------------------------------------------------------------- train
def test_train_dry_run_writes_a_complete_run(trained):
    run, code, out, err = trained
    assert code == 0, err
    assert err == ""
    # --device auto: the CPU here, the GPU where torch sees one
    assert re.search(r"^training classic-adam \(mlp, 101,770 parameters\) on 512 images, 1 epoch of 16 steps, "
                     r"on (cpu|cuda:0 \(.+\)), (fp32|bf16)$", out, re.MULTILINE), out
    assert re.search(r"^epoch\s+1  loss \d+\.\d{4}  accuracy [01]\.\d{4}  \d+\.\ds$", out, re.MULTILINE), out
    printed = re.search(r"^test accuracy ([01]\.\d{4}), test loss \d+\.\d{4}( \(\d\.\d{4} calibrated\))?, 1 epoch in",
                        out, re.MULTILINE)
    assert printed, out
    assert f"run folder: {run}" in out
    for name in RUN_FILES:
        assert (run / name).is_file() and (run / name).stat().st_size > 0, name
    assert_png(run / "plots" / "curves.png")
    assert not no_temporaries(run)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["epochs_run"] == 1 and metrics["test_size"] == 512 and metrics["interrupted"] is False
    assert printed.group(1) == f"{metrics['test_accuracy']:.4f}"
    config = json.loads((run / "config.json").read_text())
    assert (config["preset"], config["epochs"], config["train_subset"], config["test_subset"]) == \
        ("classic-adam", 1, 512, 512)
    history = (run / "history.csv").read_text().splitlines()
    assert history[0].startswith("epoch,loss,accuracy") and len(history) == 2


def test_train_quiet_prints_nothing(real_arrays, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--preset", "classic-sgd", "--dry-run", "--out", str(run), "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert out == "" and err == ""
    for name in RUN_FILES:
        assert (run / name).is_file(), name
    config = json.loads((run / "config.json").read_text())
    assert config["hidden"] == [300, 100] and config["validation"] == 128  # dry run shrinks the 5,000 held out
    assert "val_accuracy" in json.loads((run / "metrics.json").read_text())
    assert_png(run / "plots" / "curves.png")


def test_list_presets_names_every_preset(capsys):
    assert main(["train", "--list-presets"]) == 0
    out = capsys.readouterr().out
    listed = [line.split()[0] for line in out.splitlines()[1:] if not line.startswith("(")]
    assert listed == list(PRESETS)
    for name, values in PRESETS.items():
        assert values["description"] in out, name


def test_flags_and_config_file_reach_the_saved_config(real_arrays, tmp_path, capsys):
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"lr": 0.1, "weight_decay": 1e-4, "train_subset": 512, "test_subset": 256}))
    run = tmp_path / "run"
    code = main(["train", "--preset", "classic-adam", "--out", str(run), "--config", str(settings), "--quiet",
                 "--no-plots", "--hidden", "64,32", "--epochs", "1", "--lr", "0.005", "--batch-size", "64"])
    assert code == 0, capsys.readouterr().err
    config = json.loads((run / "config.json").read_text())
    meta = json.loads((run / "model.json").read_text())
    for saved in (config, meta["config"]):
        assert saved["hidden"] == [64, 32] and saved["epochs"] == 1 and saved["batch_size"] == 64
        assert saved["lr"] == 0.005  # the flag wins over the config file
        assert saved["weight_decay"] == 1e-4 and saved["test_subset"] == 256  # the file wins over the preset
        assert saved["optimizer"] == "adam" and saved["preset"] == "classic-adam"
    assert meta["architecture"] == {"name": "mlp", "config": {"hidden": [64, 32], "dropout": 0.0, "activation": "relu"}}
    shapes = {tuple(tensor.shape) for tensor in load_tensors(run / "model.safetensors").values()}
    assert {(64, 784), (32, 64), (10, 32)} <= shapes
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["epochs_run"] == 1 and metrics["test_size"] == 256
    assert not (run / "plots").exists()  # --no-plots


# ----------------------------------------------------------------------------------------------- evaluate
def test_evaluate_prints_the_report_and_writes_it(trained, tmp_path, capsys):
    run = copy_run(trained[0], tmp_path)
    assert main(["evaluate", str(run)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert out.startswith("Classifier(mlp, preset='classic-adam', test_accuracy=") and "on 512 test images" in out
    calibrated = json.loads((run / "metrics.json").read_text())["calibration"]["fitted"]
    assert ("probabilities not calibrated" in out) != calibrated
    assert ("probabilities calibrated on the validation split (temperature" in out) == calibrated
    supports = []
    for name in data.CLASS_NAMES:
        row = re.search(rf"^{re.escape(name)}\s+([01]\.\d{{3}})\s+([01]\.\d{{3}})\s+([01]\.\d{{3}})\s+(\d+)$",
                        out, re.MULTILINE)
        assert row, f"no row for {name}:\n{out}"
        supports.append(int(row.group(4)))
    assert sum(supports) == 512
    report = json.loads((run / "evaluation.json").read_text())
    printed = float(re.search(r"test accuracy ([01]\.\d{4})", out).group(1))
    assert printed == round(report["accuracy"], 4)
    assert [row["support"] for row in report["per_class"]] == supports
    # The same model on the same 512 test images: evaluate agrees with what training measured.
    metrics = json.loads((run / "metrics.json").read_text())
    assert report["accuracy"] == pytest.approx(metrics["test_accuracy"], abs=1e-6)
    assert f"wrote {run / 'evaluation.json'}" in out
    assert not no_temporaries(run)


def test_evaluate_json(trained, tmp_path, capsys):
    run = copy_run(trained[0], tmp_path)
    assert main(["evaluate", str(run), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["test_size"] == 512 and len(report["per_class"]) == 10
    assert np.array(report["confusion_matrix"]).sum() == 512
    assert 0 <= report["accuracy"] <= 1
    assert report["tta"] is None  # an MLP trained without flips: mirror images would only mislead it
    assert report == json.loads((run / "evaluation.json").read_text())


# ----------------------------------------------------------------------------------------------- predict
def test_predict_prints_each_index_with_its_true_label(run, test_labels, capsys):
    assert main(["predict", str(run), "--index", "0", "5", "42"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    for index in (0, 5, 42):
        true = re.escape(data.CLASS_NAMES[test_labels[index]])
        line = rf"^test image {index}: .+ \(\d+\.\d%\), true {true} \[(right|WRONG)\]$"
        assert re.search(line, out, re.MULTILINE), f"index {index}:\n{out}"
    bars = [line for line in out.splitlines() if line.startswith("    ")]
    assert len(bars) == 9  # the --top 3 classes per image


def test_predict_index_top_and_show_draw_the_probability_grid(run, tmp_path, capsys):
    shown = tmp_path / "grid.png"
    assert main(["predict", str(run), "--index", "0", "5", "42", "--top", "10", "--show", str(shown)]) == 0
    out = capsys.readouterr().out
    assert len([line for line in out.splitlines() if line.startswith("    ")]) == 30  # every class with --top 10
    assert f"wrote {shown}" in out
    assert_png(shown)


def test_predict_json(run, test_labels, capsys):
    assert main(["predict", str(run), "--index", "0", "5", "42", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert isinstance(rows, list) and [row["index"] for row in rows] == [0, 5, 42]
    for row in rows:
        probabilities = row["probabilities"]
        assert list(probabilities) == list(data.CLASS_NAMES)
        assert sum(probabilities.values()) == pytest.approx(1.0, abs=1e-4)
        assert row["predicted"] == max(probabilities, key=probabilities.get)
        assert row["probability"] == probabilities[row["predicted"]]
        assert row["true"] == data.CLASS_NAMES[test_labels[row["index"]]]


# ----------------------------------------------------------------------------------------------- plot
def test_plot_draws_every_figure(trained, tmp_path, capsys):
    run = copy_run(trained[0], tmp_path)
    (run / "plots").rename(run / "plots-from-training")
    assert main(["plot", str(run)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert sorted(p.name for p in (run / "plots").iterdir()) == sorted(PLOTS)  # and no temporary files
    for name in PLOTS:
        assert f"wrote {run / 'plots' / name}" in out
        assert_png(run / "plots" / name)


# ----------------------------------------------------------------------------------------------- bad input
def test_unknown_preset_is_exit_2_with_a_suggestion(tmp_path, capsys):
    out_dir = tmp_path / "run"
    assert main(["train", "--preset", "clasic-adam", "--dry-run", "--out", str(out_dir)]) == 2
    out, err = capsys.readouterr()
    line = single_error_line(err)
    assert "unknown preset 'clasic-adam'" in line and "did you mean 'classic-adam'" in line
    assert out == "" and not out_dir.exists()


def test_existing_run_is_not_overwritten(trained, tmp_path, capsys):
    run = copy_run(trained[0], tmp_path)
    before = snapshot(run)
    assert main(["train", "--preset", "classic-adam", "--dry-run", "--out", str(run)]) == 2
    out, err = capsys.readouterr()
    line = single_error_line(err)
    assert str(run) in line and "--overwrite" in line
    assert out == ""
    assert snapshot(run) == before  # model.safetensors, model.json and the rest: byte for byte


def test_evaluate_missing_folder_is_exit_2(tmp_path, capsys):
    missing = tmp_path / "no-such-run"
    assert main(["evaluate", str(missing)]) == 2
    line = single_error_line(capsys.readouterr().err)
    assert str(missing) in line and "no such run folder" in line


def test_evaluate_truncated_weights_is_exit_2(trained, tmp_path, capsys):
    run = copy_run(trained[0], tmp_path)
    weights = run / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert main(["evaluate", str(run)]) == 2
    out, err = capsys.readouterr()
    line = single_error_line(err)
    assert "model.safetensors" in line and "truncated or damaged" in line
    assert out == "" and not (run / "evaluation.json").exists()


@pytest.mark.parametrize("index", ["999999", "512", "-1"])
def test_predict_index_outside_the_test_set_is_exit_2(run, index, capsys):
    assert main(["predict", str(run), "--index", "0", index]) == 2
    out, err = capsys.readouterr()
    line = single_error_line(err)
    assert f"--index {index} is outside the test set (0..511)" in line  # a dry-run model keeps its 512 test images
    assert out == ""


def test_config_file_that_is_not_json_is_exit_2(tmp_path, capsys):
    settings = tmp_path / "settings.yaml"
    settings.write_text("epochs: 3\n")
    assert main(["train", "--preset", "classic-adam", "--config", str(settings), "--out", str(tmp_path / "r")]) == 2
    line = single_error_line(capsys.readouterr().err)
    assert str(settings) in line and "cannot read the config file" in line


def test_missing_config_file_is_exit_2(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path / "nope.json"), "--out", str(tmp_path / "r")]) == 2
    assert "nope.json" in single_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("flags,message", [
    (["--optimizer", "adagrad"], "optimizer 'adagrad' is not one of adam, adamw, sgd, rmsprop"),
    (["--epochs", "0"], "epochs must be in (0, 1000000], got 0"),
    (["--monitor", "val_loss"], "needs a validation split"),
    (["--dropout", "1.5"], "must be in [0, 1)"),
])
def test_impossible_settings_are_exit_2(flags, message, tmp_path, capsys):
    out_dir = tmp_path / "run"
    assert main(["train", "--preset", "classic-adam", "--out", str(out_dir), "--train-subset", "64", *flags]) == 2
    assert message in single_error_line(capsys.readouterr().err)
    assert not out_dir.exists()


def test_resume_of_a_folder_without_a_run_is_exit_2(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path)]) == 2
    assert "not a resumable run folder" in single_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("argv,message", [
    (["train", "--hidden", "abc"], "expected comma-separated integers"),
    (["train", "--hidden", "128,0"], "expected positive sizes"),
    (["train", "--epochs", "two"], "invalid int value"),
    (["train", "--no-such-flag"], "unrecognized arguments"),
    ([], "COMMAND"),
])
def test_usage_errors_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as excinfo:
        main(argv)
    assert excinfo.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


# Bad config input must end as "fmnist: error: ..." and exit 2, never a traceback.
@pytest.mark.parametrize("content,flags", [
    (PNG_SIGNATURE + b"\xff\xfe", []),  # a binary file: UnicodeDecodeError, not caught
    (b"[1, 2]", []),  # JSON, but not an object: TypeError from dict.update
    (b'{"lr": "0.1"}', []),  # wrongly typed value: TypeError in validate
    (b"{}", ["--threads", "-1"]),  # RuntimeError from torch.set_num_threads
], ids=["binary-config", "json-list-config", "string-lr", "negative-threads"])
def test_bad_config_values_are_exit_2(content, flags, tmp_path, capsys):
    settings = tmp_path / "settings.json"
    settings.write_bytes(content)
    code = main(["train", "--preset", "classic-adam", "--config", str(settings), "--out", str(tmp_path / "r"),
                 "--dry-run", *flags])
    assert code == 2
    single_error_line(capsys.readouterr().err)


def test_predict_without_files_or_index_is_exit_2(tmp_path, capsys):
    assert main(["predict", str(tmp_path)]) == 2
    assert "--index" in single_error_line(capsys.readouterr().err)

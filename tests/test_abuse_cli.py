"""Bad input at the command line: one line on stderr naming the problem and the fix, exit 2, no traceback, and a
cost bounded by the input's caps (damaged run folders, absurd settings, hostile sweep specs, CSV formulas)."""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_train import learnable_arrays, small

from fmnist import report, sweep, training
from fmnist.cli import main
from fmnist.config import PRESETS, TrainConfig, resolve_config
from fmnist.errors import ConfigError

# A "billion laughs" spec: 9^8 (43 million) strings from a 400-byte file. Before the fix, validating it echoed the
# whole value: a 35 MB error message.
BILLION_LAUGHS = """\
preset: fast
fixed:
  description: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
  seed: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
  label_smoothing: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
  warmup: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
  momentum: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
  epochs: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
  weight_decay: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
  dropout: *g
space:
  lr: {choice: [0.1]}
"""


def one_error_line(stderr: str) -> str:
    """The single `fmnist: error: ...` line a bad input must produce, and nothing else."""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr[:2000]
    assert lines[0].startswith("fmnist: error: ") and "Traceback" not in stderr
    return lines[0]


# ----------------------------------------------------------------------------------------------- runs, compare
@pytest.fixture(scope="module")
def good_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("good") / "run"
    training.train(small("classic-adam", epochs=1), arrays=learnable_arrays(), out_dir=run)
    return run


def _copy(good_run: Path, root: Path, name: str) -> Path:
    return Path(shutil.copytree(good_run, root / name))


def _edit_json(path: Path, change) -> None:
    values = json.loads(path.read_text())
    change(values)
    path.write_text(json.dumps(values))


@pytest.fixture
def runs_root(good_run, tmp_path) -> Path:
    """Two good runs and four damaged ones, each damaged its own way."""
    root = tmp_path / "runs"
    _copy(good_run, root, "good-a")
    _copy(good_run, root, "good-b")
    (_copy(good_run, root, "bad-json") / "model.json").write_text("{not json")
    _edit_json(_copy(good_run, root, "bad-metric") / "model.json",
               lambda meta: meta["metrics"].update(test_accuracy="x" * 10_000))
    _edit_json(_copy(good_run, root, "bad-seconds") / "model.json",
               lambda meta: meta["metrics"].update(train_seconds=[1, 2]))
    unfinished = _copy(good_run, root, "bad-unfinished")
    (unfinished / "model.json").unlink()
    _edit_json(unfinished / "resume.json", lambda state: state.update(epoch="three"))
    return root


DAMAGED = ("bad-json", "bad-metric", "bad-seconds", "bad-unfinished")


def test_runs_lists_the_good_folders_and_marks_each_damaged_one_in_one_line(runs_root, capsys):
    """Before: a string test accuracy in one model.json was a ValueError traceback that hid the whole listing."""
    assert main(["runs", str(runs_root)]) == 0
    captured = capsys.readouterr()
    table = {line.split()[0]: line for line in captured.out.splitlines()[1:]}
    assert set(table) == {"good-a", "good-b", *DAMAGED}
    assert "%" in table["good-a"] and "%" in table["good-b"]
    assert all("damaged" in table[name] for name in DAMAGED)
    warnings = captured.err.strip().splitlines()
    assert len(warnings) == len(DAMAGED) and "Traceback" not in captured.err
    for name in DAMAGED:
        line = next(line for line in warnings if f" {name} is damaged: " in line)
        assert len(line) < 400, line  # a 10,000-character value is not echoed whole
    assert any("test_accuracy 'xxxxxxxx" in line and "is not a number" in line for line in warnings)
    assert any("train_seconds [1, 2] is not a number" in line for line in warnings)


def test_runs_json_marks_the_damaged_folders(runs_root, capsys):
    assert main(["runs", str(runs_root), "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert {name for name, row in rows.items() if row["state"] == "damaged"} == set(DAMAGED)
    assert "not valid JSON" in rows["bad-json"]["error"] and "epochs 'three' is not a whole number" in \
        rows["bad-unfinished"]["error"]


@pytest.mark.parametrize("damage", ["bad-metric", "bad-seconds", "bad-json", "history"])
def test_compare_with_a_damaged_folder_is_one_line(runs_root, tmp_path, capsys, damage):
    """Before: bad metric types and a non-numeric history.csv were ValueError tracebacks."""
    folder = runs_root / damage if damage != "history" else runs_root / "good-b"
    if damage == "history":
        (folder / "history.csv").write_text("epoch,loss\n1,abc\n")
    code = main(["compare", str(runs_root / "good-a"), str(folder), "--out", str(tmp_path / "c.png")])
    captured = capsys.readouterr()
    assert code == 2
    line = one_error_line(captured.err)
    assert str(folder) in line and "damaged" in line
    assert captured.out == ""  # no half table before the error
    assert not (tmp_path / "c.png").exists()


# ----------------------------------------------------------------------------------------------- predict
@pytest.mark.parametrize("top", ["0", "-3", "many"])
def test_predict_top_below_one_is_a_usage_error(tmp_path, capsys, top):
    with pytest.raises(SystemExit) as caught:
        main(["predict", str(tmp_path), "shoe.png", "--top", top])
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("fmnist predict: error: argument --top: ")
    assert "Traceback" not in err


@pytest.mark.parametrize(("command", "flag"), [
    (["data", "show", "--per-class", "0"], "--per-class"), (["data", "show", "--per-class", "-1"], "--per-class"),
    (["data", "show", "--seed", "-1"], "--seed"), (["plot", "RUN", "--seed", "-1"], "--seed"),
    (["data", "fetch", "--retries", "0"], "--retries")])
def test_counts_below_their_range_are_usage_errors(command, flag, capsys):
    with pytest.raises(SystemExit) as caught:
        main(command)
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert f"error: argument {flag}: must be from " in err.strip().splitlines()[-1]
    assert "Traceback" not in err


def test_predict_top_zero_in_a_process_is_exit_2_without_traceback(tmp_path):
    done = subprocess.run([sys.executable, "-m", "fmnist", "predict", str(tmp_path), "x.png", "--top", "0"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == "fmnist predict: error: argument --top: must be at least 1, got 0"
    assert "Traceback" not in done.stderr


# ----------------------------------------------------------------------------------------------- train --config
ABSURD = [
    ({"erase": 1.5}, "erase must be in [0, 1), got 1.5"),
    ({"translate": 1000}, "translate must be in [0, 8], got 1000"),
    ({"model": "mlp", "hidden": [100_000_000]}, "setting hidden must be a list of integers from 1 to 16384"),
    ({"model": "mlp", "hidden": [8] * 33}, "at most 32 items"),
    ({"model": "convnet", "widths": [100_000_000]}, "setting widths must be a list of integers from 1 to 1024"),
    ({"model": "convnet", "widths": [8] * 5}, "at most 4 items"),
    ({"depth": 1000}, "depth must be in [1, 32], got 1000"),
    ({"epochs": 10**9}, "epochs must be in (0, 1000000], got 1000000000"),
    ({"batch_size": 10**9}, "batch_size must be in (0, 16384], got 1000000000"),
    ({"validation": 10**9}, "validation must be in [0, 100000)"),
    ({"patience": 10**9}, "patience must be in [0, 1000000]"),
    ({"lr": 1e308}, "lr must be in (0, 10), got 1e+308"),
    ({"weight_decay": 1e308}, "weight_decay must be in [0, 1)"),
    ({"threads": 10**6}, "threads must be in [1, 1024], got 1000000"),
    ({"seed": -1}, "seed must be in [0, 4294967296), got -1"),
    ({"seed": 2**64}, "seed must be in [0, 4294967296)"),
    ({"budget": 1e300}, "budget must be in (0, 604800)"),
    ({"description": "x" * 5000}, "at most 1000 characters"),
    ({"preset": "p" * 500}, "at most 64 characters"),
]


@pytest.mark.parametrize(("values", "fragment"), ABSURD, ids=[next(iter(v)) + str(i) for i, (v, _) in
                                                              enumerate(ABSURD)])
def test_absurd_config_file_values_are_refused_by_the_schema(values, fragment, tmp_path, capsys):
    """Before: translate 1000 trained on 2028x2028 images, hidden [1e8] died in torch's allocator, seed -1 in
    scikit-learn, threads 1e6 in the loader: tracebacks after seconds to minutes, or no end at all."""
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps(values))
    out = tmp_path / "run"
    code = main(["train", "--preset", "classic-adam", "--config", str(settings), "--out", str(out)])
    assert code == 2
    assert fragment in one_error_line(capsys.readouterr().err)
    assert not out.exists()


def test_the_presets_fit_the_caps():
    for name in PRESETS:
        resolve_config(name)
    TrainConfig(hidden=[16384] * 32, widths=[1024] * 4, depth=32, epochs=1_000_000, batch_size=16384, translate=8,
                seed=2**32 - 1, threads=1024, budget="167h")


@pytest.mark.parametrize(("content", "fragment"), [
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b" " * (2 * 1024 * 1024) + b"{}", "larger than 1024 KiB"),
])
def test_hostile_config_files_are_one_line(content, fragment, tmp_path, capsys):
    settings = tmp_path / "settings.json"
    settings.write_bytes(content)
    assert main(["train", "--config", str(settings), "--out", str(tmp_path / "run")]) == 2
    assert fragment in one_error_line(capsys.readouterr().err)


# ----------------------------------------------------------------------------------------------- sweep specs
def _spec_error(tmp_path: Path, text: str, capsys) -> str:
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    assert main(["sweep", str(path), "--out", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()
    return one_error_line(capsys.readouterr().err)


SPECS = [
    ("preset: fast\nmetric: []\nspace: {lr: {choice: [0.1]}}\n", "metric [] is not one of"),
    ("preset: fast\nmetric: {a: [1, 2]}\nspace: {lr: {choice: [0.1]}}\n", "metric {'a': [1, 2]} is not one of"),
    ("preset: fast\nsamples: 1000000000\nspace: {lr: {choice: [0.1]}}\n", "samples must be a positive integer up to"),
    ("preset: fast\nsampler_seed: -1\nspace: {lr: {choice: [0.1]}}\n", "sampler_seed must be an integer from 0"),
    ("preset: fast\ntrial_threads: 100000\nspace: {lr: {choice: [0.1]}}\n", "up to 1024"),
    ("preset: fast\nspace: {lr: {choice: [" + ", ".join(["0.1"] * 1001) + "]}}\n", "at most 1000 values"),
    ("preset: fast\nsearch: grid\nspace: {" + ", ".join(f"{name}: {{grid: [{', '.join(['0.1'] * 30)}]}}" for name in
                                                         ("lr", "dropout", "warmup")) + "}\n",
     "would run 27,000 trials, more than 10,000"),
    ("preset: fast\nspace: {epochs: {randint: [1, 1000000000]}}\n", "epochs must be in (0, 1000000]"),
    ("preset: fast\nspace: &x {lr: *x}\n", "nested more than 16 deep"),
    ("preset: fast\nspace: " + "[" * 20_000 + "]" * 20_000 + "\n", "nested too deeply"),
    ("preset: fast\nfixed: {description: " + "x" * 60_000 + "}\nspace: {lr: {choice: [0.1]}}\n", "..."),
    ("preset: fast\n" + "#" * 70_000 + "\n", "larger than 64 KiB"),
]


@pytest.mark.parametrize(("text", "fragment"), SPECS, ids=["metric-list", "metric-dict", "samples", "sampler-seed",
                                                           "threads", "long-choice", "huge-grid", "epochs-range",
                                                           "recursive-alias", "deep", "long-string", "big-file"])
def test_hostile_sweep_specs_are_short_one_line_errors(text, fragment, tmp_path, capsys):
    pytest.importorskip("ray")
    line = _spec_error(tmp_path, text, capsys)
    assert fragment in line and len(line) < 400, line[:1000]


def test_billion_laughs_spec_is_refused_quickly_in_one_short_line(tmp_path, capsys):
    """Before: a 35 MB error message (the fully expanded value), after a second of work and 180 MB of memory."""
    pytest.importorskip("ray")
    started = time.perf_counter()
    line = _spec_error(tmp_path, BILLION_LAUGHS, capsys)
    assert "expands to more than 10,000 values" in line and len(line) < 300
    assert time.perf_counter() - started < 2.0


def test_billion_laughs_as_a_dict_is_refused_before_validation():
    """parse_spec (specs given as data, not a file) counts shared values too."""
    lol = ["lol"] * 9
    for _ in range(7):
        lol = [lol] * 9
    with pytest.raises(ConfigError, match="expands to more than 10,000 values"):
        sweep.parse_spec({"preset": "fast", "space": {"lr": {"choice": [0.1]}}, "fixed": {"dropout": lol}})


def test_billion_laughs_in_a_process_leaves_one_line_on_stderr(tmp_path):
    pytest.importorskip("ray")
    spec = tmp_path / "laughs.yaml"
    spec.write_text(BILLION_LAUGHS)
    done = subprocess.run([sys.executable, "-m", "fmnist", "sweep", str(spec), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert "expands to more than 10,000 values" in one_error_line(done.stderr)


# ----------------------------------------------------------------------------------------------- CSV formulas
def test_predictions_csv_neutralises_formula_cells():
    """A file name or class name starting with = + - @ is a formula to a spreadsheet: prefix it with a quote."""
    classes = ["=SUM(1)", *(f"class {i}" for i in range(9))]
    probabilities = {name: 0.1 for name in classes}
    rows = [{"file": "=HYPERLINK(\"http://x\")", "top": [{"class": "=SUM(1)", "probability": 0.1}],
             "probabilities": probabilities, "unsure": True, "unusual": False},
            {"file": "@cmd.png", "error": "-bad image"},
            {"file": "+1.png", "error": "-12.5"}]
    table = list(csv.reader(io.StringIO(report.predictions_csv(rows, classes))))
    assert table[0][6] == "'=SUM(1)"
    assert table[1][:2] == ["'=HYPERLINK(\"http://x\")", "'=SUM(1)"]
    assert table[2][0] == "'@cmd.png" and table[2][5] == "'-bad image"
    assert table[3][0] == "'+1.png" and table[3][5] == "-12.5"  # a negative number stays a number

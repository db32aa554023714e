"""Damaged and hostile run folders: every one is refused with one line and exit 2, at a bounded cost.

Each case corrupts a copy of a tiny trained run (model.json, model.safetensors, the resume checkpoint) and goes
through the CLI's `predict`, `evaluate` and `serve` paths, which all load the model the same way. The sizes are
checked before anything is built or read, so a 2 KB model.json cannot make the process allocate gigabytes.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import make_tiny_arrays
from PIL import Image

from fmnist import checkpoint, models, training
from fmnist.cli import main
from fmnist.errors import ConfigError, FmnistError, ModelFileError


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """A tiny MLP run (one epoch on generated images), never changed: each test corrupts a copy."""
    folder = tmp_path_factory.mktemp("pristine") / "run"
    config = training.resolve_config("classic-adam", {"epochs": 2, "hidden": [16]})
    training.train(config, arrays=make_tiny_arrays(), out_dir=folder)
    return folder


@pytest.fixture
def run(pristine, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(pristine, copy)
    return copy


def edit_meta(run: Path, change) -> None:
    meta = json.loads((run / "model.json").read_text())
    change(meta)
    (run / "model.json").write_text(json.dumps(meta))  # NaN and Infinity written as JSON's common extension


def edit_tensor(run: Path, name: str, change) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(run / "model.safetensors")
    tensors[name] = change(tensors[name])
    save_file(tensors, run / "model.safetensors")


def set_config(**values):
    return lambda meta: meta["architecture"]["config"].update(values)


def set_calibration(**values):
    return lambda meta: meta["calibration"].update(values)


def truncate(run: Path, name: str, keep: float = 0.5) -> None:
    payload = (run / name).read_bytes()
    (run / name).write_bytes(payload[:int(len(payload) * keep)])


def forged_header(run: Path) -> None:
    """A weights file whose header claims an 8 GB tensor table: refused from the first 8 bytes."""
    (run / "model.safetensors").write_bytes(struct.pack("<Q", 8 * 2**30) + b"{}")


CASES = {
    "truncated json": (lambda run: truncate(run, "model.json"), "not valid JSON"),
    "json not an object": (lambda run: (run / "model.json").write_text("[1, 2]"), "not an fmnist model"),
    "deeply nested json": (lambda run: (run / "model.json").write_text("[" * 100_000), "not valid JSON"),
    "huge model.json": (lambda run: (run / "model.json").write_text(" " * (5 * 2**20) + "{}"), "over the"),
    "hidden is a string": (lambda run: edit_meta(run, set_config(hidden="abc")), "hidden = 'abc'"),
    "hidden of floats": (lambda run: edit_meta(run, set_config(hidden=[16.5])), "valid integer"),
    "huge hidden": (lambda run: edit_meta(run, set_config(hidden=[100_000_000])), "less than or equal"),
    "over the parameter cap": (lambda run: edit_meta(run, set_config(hidden=[40_000, 2_000])), "over the limit of"),
    "dropout nan": (lambda run: edit_meta(run, set_config(dropout=math.nan)), "finite"),
    "unknown model kind": (lambda run: edit_meta(run, lambda m: m["architecture"].update(name="resnet")),
                           "unknown architecture 'resnet'"),
    "newer format": (lambda run: edit_meta(run, lambda m: m.update(format_version=99)), "newer fmnist"),
    "format is a string": (lambda run: edit_meta(run, lambda m: m.update(format_version="2")), "format_version"),
    "three classes": (lambda run: edit_meta(run, lambda m: m.update(classes=["a", "b", "c"])), "10 distinct"),
    "classes of numbers": (lambda run: edit_meta(run, lambda m: m.update(classes=list(range(10)))), "classes"),
    "temperature 0": (lambda run: edit_meta(run, set_calibration(temperature=0)), "temperature"),
    "temperature negative": (lambda run: edit_meta(run, set_calibration(temperature=-1.5)), "temperature"),
    "temperature nan": (lambda run: edit_meta(run, set_calibration(temperature=math.nan)), "temperature"),
    "temperature inf": (lambda run: edit_meta(run, set_calibration(temperature=math.inf)), "temperature"),
    "std zero": (lambda run: edit_meta(run, lambda m: m["normalization"].update(std=0)), "normalization.std"),
    "missing weights": (lambda run: (run / "model.safetensors").unlink(), "missing"),
    "truncated weights": (lambda run: truncate(run, "model.safetensors"), "safetensors|do not fit"),
    "forged weights header": (forged_header, "not a readable safetensors"),
    "weights of another shape": (lambda run: edit_meta(run, set_config(hidden=[32])), "do not fit"),
    "weights of another dtype": (lambda run: edit_tensor(run, "layers.1.weight", lambda t: t.double()), "F64"),
    "nan weight": (lambda run: edit_tensor(run, "layers.1.bias", lambda t: t.index_fill(0, t.new_zeros(1).long(),
                                                                                          math.nan)), "NaN"),
    "overflowing weights": (lambda run: [edit_tensor(run, name, lambda t: t * 0 + 1e30)
                                         for name in ("layers.1.bias", "layers.3.weight")], "blank image"),
    "normalization overflows": (lambda run: edit_meta(run, lambda m: m["normalization"].update(mean=1e300, std=1e-300)),
                                "blank image"),
}


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fmnist: error: "), err
    return lines[0]


@pytest.mark.parametrize("case", list(CASES))
def test_a_damaged_model_is_one_line_and_exit_2_on_every_path(case, run, tmp_path, capsys):
    damage, reason = CASES[case]
    damage(run)
    photo = tmp_path / "shirt.png"
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(photo)
    for argv in (["predict", str(run), str(photo)], ["evaluate", str(run)], ["serve", str(run), "--port", "0"]):
        assert main(argv) == 2, argv
        line = one_line_error(capsys)
        assert re.search(reason, line), (argv, line)


def test_a_pristine_run_loads(pristine, tmp_path, capsys):
    """The fixture itself passes every check, so the cases above fail for their damage alone."""
    photo = tmp_path / "blank.png"
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(photo)
    assert main(["predict", str(pristine), str(photo), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["top"]


def test_nothing_is_built_before_the_size_is_checked(run, monkeypatch):
    """The parameter count comes from the description: the network's class is never called for an oversized one."""
    def forbidden(**config):
        raise AssertionError("built before the size check")

    monkeypatch.setitem(models.ARCHITECTURES, "mlp", forbidden)
    edit_meta(run, set_config(hidden=[70_000]))
    with pytest.raises(ModelFileError, match="55,650,010 parameters, over the limit of 50,000,000"):
        checkpoint.load_model(run)


@pytest.mark.parametrize("name, config", [("mlp", {}), ("mlp", {"hidden": [300, 100], "dropout": 0.2}),
                                          ("mlp", {"hidden": []}), ("keras-cnn", {}), ("convnet", {}),
                                          ("convnet", {"widths": [8, 16, 24, 32], "depth": 3})])
def test_parameter_count_from_the_description_matches_the_built_network(name, config):
    assert models.parameter_count(name, **config) == models.count_parameters(models.create_model(name, **config))


def test_a_convnet_with_more_stages_than_pixels_is_refused():
    with pytest.raises(ConfigError, match="at most 4"):
        models.create_model("convnet", widths=[8] * 5)


def test_loading_hostile_folders_stays_within_bounded_memory(pristine, tmp_path):
    """Peak memory of a fresh process loading each oversized case stays near torch's own footprint (~0.4 GB),
    where building `hidden: [100000000]` took 1.16 GB before failing."""
    cases = {"huge hidden": [100_000_000], "just over the cap": [63_800], "many layers": [1] * 10_000}
    folders = []
    for label, hidden in cases.items():
        folder = tmp_path / label.replace(" ", "-")
        shutil.copytree(pristine, folder)
        edit_meta(folder, set_config(hidden=hidden))
        folders.append(str(folder))
    forged = tmp_path / "forged"
    shutil.copytree(pristine, forged)
    forged_header(forged)
    folders.append(str(forged))
    script = textwrap.dedent("""
        import sys
        from fmnist.checkpoint import load_model
        from fmnist.errors import ModelFileError
        for folder in sys.argv[1:]:
            try:
                load_model(folder)
            except ModelFileError:
                pass
            else:
                raise SystemExit(f"{folder} loaded")
        from fmnist.hardware import peak_rss_mib
        print(int(peak_rss_mib()))
    """)
    done = subprocess.run([sys.executable, "-c", script, *folders], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) < 700, f"peak RSS {done.stdout.strip()} MB"


# ----------------------------------------------------------------------------------------------- resume
RESUME_CASES = {
    "resume.json truncated": (lambda run: truncate(run, "resume.json"), "no usable resume checkpoint"),
    "epoch is a string": (lambda run: _edit_resume(run, epoch="2"), "no usable resume checkpoint"),
    "history shorter than epoch": (lambda run: _edit_resume(run, epoch=7), "history rows"),
    "learning rate is a string": (lambda run: _edit_resume(run, param_groups=[{"lr": "fast", "params": [0]}]),
                                  "cannot be restored"),
    "tensors truncated": (lambda run: truncate(run, "resume.safetensors"), "safetensors|does not fit"),
    "tensors missing": (lambda run: (run / "resume.safetensors").unlink(), "missing"),
    "config.json damaged": (lambda run: (run / "config.json").write_text('{"hidden": "x"'), "resumable"),
    "config with a huge model": (lambda run: _edit_config(run, hidden=[100_000_000]), "parameters|less than|hidden"),
}


def _edit_resume(run: Path, **values) -> None:
    state = json.loads((run / "resume.json").read_text())
    state.update(values)
    (run / "resume.json").write_text(json.dumps(state))


def _edit_config(run: Path, **values) -> None:
    config = json.loads((run / "config.json").read_text())
    config.update(values)
    (run / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_resume_of_a_damaged_checkpoint_is_one_line(case, run):
    """Through the library with the run's own tiny arrays; the CLI turns the same error into exit 2 (below)."""
    damage, reason = RESUME_CASES[case]
    damage(run)
    with pytest.raises(FmnistError) as caught:
        training.train(resume=run, arrays=make_tiny_arrays())
    assert "\n" not in str(caught.value) and re.search(reason, str(caught.value)), caught.value


def test_train_resume_of_a_damaged_checkpoint_is_exit_2(run, capsys):
    _edit_resume(run, history="lost")
    (run / "config.json").write_text("{")
    assert main(["train", "--resume", str(run), "--quiet", "--no-plots"]) == 2
    assert "resumable" in one_line_error(capsys)


# ----------------------------------------------------------------------------------------------- overwriting a run
def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def siblings(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.parent.iterdir() if path != folder)


def test_overwrite_that_fails_leaves_the_old_run_whole(run, tmp_path):
    (run / "evaluation.json").write_text("{}")
    before, around = snapshot(run), siblings(run)

    def fail_in_epoch_two(event):
        if getattr(event, "epoch", 0) == 2:
            raise RuntimeError("out of memory")

    config = training.resolve_config("classic-adam", {"epochs": 3, "hidden": [8]})
    with pytest.raises(RuntimeError, match="out of memory"):
        training.train(config, arrays=make_tiny_arrays(), out_dir=run, progress=fail_in_epoch_two)
    assert snapshot(run) == before  # not a new config.json beside the old model
    assert siblings(run) == around  # the half-built run is gone too
    checkpoint.load_model(run)


def test_overwrite_that_succeeds_replaces_the_whole_folder(run):
    (run / "evaluation.json").write_text("{}")  # measured on the old model: must not survive it
    around = siblings(run)
    config = training.resolve_config("classic-adam", {"epochs": 1, "hidden": [8]})
    result = training.train(config, arrays=make_tiny_arrays(), out_dir=run)
    assert result.run_dir == run and siblings(run) == around
    assert not (run / "evaluation.json").exists()
    model, meta = checkpoint.load_model(run)
    assert meta.architecture.config["hidden"] == [8]
    assert json.loads((run / "config.json").read_text())["hidden"] == [8]
    assert (run / "model.json").stat().st_mode & 0o777 == (run / "metrics.json").stat().st_mode & 0o777


def test_a_folder_holding_other_files_is_never_replaced(tmp_path):
    folder = tmp_path / "runs"
    (folder / "someone-else").mkdir(parents=True)
    config = training.resolve_config("classic-adam", {"epochs": 1, "hidden": [8]})
    with pytest.raises(ModelFileError, match="which no run writes"):
        training.train(config, arrays=make_tiny_arrays(), out_dir=folder)
    assert (folder / "someone-else").is_dir() and siblings(folder) == []


def test_a_kill_between_the_final_writes_never_pairs_new_files_with_old_metadata(run, monkeypatch):
    """A resumed run rewrites its model in place: until the new model.json is written there is none at all."""
    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save_model", killed)  # history and metrics written, then the process dies
    _edit_config(run, epochs=3)
    with pytest.raises(KeyboardInterrupt):
        training.train(resume=run, arrays=make_tiny_arrays())
    with pytest.raises(ModelFileError, match="no finished model"):
        checkpoint.load_model(run)

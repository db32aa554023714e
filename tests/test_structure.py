"""The single sources of truth: the config schema, the model file (versioned), preprocessing, stopping, settings."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from fmnist import checkpoint, data, training
from fmnist.cli import main
from fmnist.config import TrainConfig, resolve_config, setting_names
from fmnist.errors import ConfigError, ModelFileError
from fmnist.events import EpochEnd, EpochStart, Start
from fmnist.predict import Classifier


def tiny_arrays(n: int = 400) -> tuple:
    rng = np.random.default_rng(0)
    labels = np.arange(n) % 10
    images = (rng.random((n, 28, 28)) * 40).astype(np.uint8)
    for index, label in enumerate(labels):  # a bright bar whose row encodes the class: learnable in an epoch
        images[index, 2 + 2 * label, :] = 255
    return (images, labels.astype(np.uint8)), (images[:100].copy(), labels[:100].astype(np.uint8))


@pytest.fixture(scope="module")
def calibrated_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("structure") / "run"
    config = resolve_config("classic-adam", {"epochs": 1, "validation": 120, "hidden": [16]})
    training.train(config, arrays=tiny_arrays(), out_dir=run)
    return run


@pytest.mark.parametrize("values,message", [
    ({"epochs": "5"}, "setting epochs must be an integer, got '5'"),
    ({"lr": True}, "setting lr must be a number"),
    ({"hidden": [32, 0]}, "setting hidden must be a list of integers from 1 to 16384, got [32, 0]"),
    ({"epoch": 3}, "unknown setting 'epoch'; did you mean 'epochs'?"),
    ({"precision": "fp16"}, "precision 'fp16' is not one of fp32, bf16, auto"),
    ({"momentum": 1.5}, "momentum must be in [0, 1), got 1.5"),
    ({"threads": 0}, "threads must be in [1, 1024], got 0"),
])
def test_config_errors_are_one_line_and_name_the_setting(values, message):
    with pytest.raises(ConfigError) as caught:
        TrainConfig(**values)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_assignment_is_validated_too():
    config = TrainConfig()
    with pytest.raises(ConfigError, match=r"batch_size must be in \(0, 16384\], got 0"):
        config.batch_size = 0


def test_every_setting_has_a_documented_train_flag(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    shown = capsys.readouterr().out
    for name in setting_names():
        if name != "preset":
            assert f"--{name.replace('_', '-')}" in shown, name
            first_words = " ".join(TrainConfig.model_fields[name].description.split()[:2])
            assert first_words in " ".join(shown.split()), name


def test_a_format_1_model_file_still_loads(calibrated_run, tmp_path):
    meta = json.loads((calibrated_run / checkpoint.META_FILE).read_text())
    assert meta["format_version"] == checkpoint.FORMAT_VERSION and meta["calibration"]["fitted"]
    assert "calibration" not in meta["metrics"]  # the temperature lives with the model, not under metrics
    old = {**meta, "format_version": 1, "metrics": {**meta["metrics"], "calibration": meta["calibration"]}}
    del old["calibration"]
    folder = tmp_path / "old"
    folder.mkdir()
    (folder / checkpoint.WEIGHTS_FILE).write_bytes((calibrated_run / checkpoint.WEIGHTS_FILE).read_bytes())
    (folder / checkpoint.META_FILE).write_text(json.dumps(old))
    loaded, new = Classifier.load(folder), Classifier.load(calibrated_run)
    assert loaded.calibrated and loaded.temperature == new.temperature != 1.0
    images = tiny_arrays()[1][0][:8]
    np.testing.assert_array_equal(loaded.predict_proba(images), new.predict_proba(images))


def test_a_newer_model_file_is_refused_with_the_fix(calibrated_run, tmp_path):
    meta = json.loads((calibrated_run / checkpoint.META_FILE).read_text())
    folder = tmp_path / "future"
    folder.mkdir()
    (folder / checkpoint.META_FILE).write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(ModelFileError, match="newer fmnist.*upgrade fmnist"):
        checkpoint.read_meta(folder)


def test_preprocess_scales_uint8_and_float_alike_without_touching_the_input():
    pixels = np.random.default_rng(1).integers(0, 256, (3, 28, 28), dtype=np.uint8)
    as_float = pixels.astype(np.float32) / 255
    frozen = pixels.copy()
    frozen.flags.writeable = False
    mean, std = data.normalization(True)
    a = data.preprocess(frozen, mean, std)
    b = data.preprocess(as_float, mean, std)
    assert a.shape == (3, 1, 28, 28) and a.dtype == torch.float32
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, (torch.from_numpy(pixels).float() / 255 - mean).div(std).unsqueeze(1))
    np.testing.assert_array_equal(as_float, pixels.astype(np.float32) / 255)  # the caller's array is unchanged
    for on_pixels, on_inputs in zip(data.tta_views(pixels), data.tta_views(data.preprocess(pixels)), strict=True):
        np.testing.assert_array_equal(data.preprocess(on_pixels), on_inputs)  # NumPy (ONNX) and torch agree


def test_the_test_time_views_are_mirror_and_one_pixel_shifts():
    image = np.arange(1, 17, dtype=np.uint8).reshape(1, 4, 4)
    views = data.tta_views(image)
    assert len(views) == len(data.TTA_WEIGHTS) == 10 and abs(sum(data.TTA_WEIGHTS) - 1) < 1e-12
    np.testing.assert_array_equal(views[1], image[..., ::-1])
    down = data.shift(image, 1, 0)  # moved down one row: the top row repeats into the gap
    np.testing.assert_array_equal(down[0, 1:], image[0, :-1])
    np.testing.assert_array_equal(down[0, 0], image[0, 0])
    left = data.shift(torch.from_numpy(image).float()[None], 0, -1)[0]  # torch, (n, 1, h, w)
    np.testing.assert_array_equal(left[0, :, :-1].numpy(), image[0, :, 1:])


def test_stop_request_ends_a_run_after_its_last_complete_epoch(tmp_path):
    stop = training.StopRequest()
    seen = []

    def progress(event):
        seen.append(type(event))
        if isinstance(event, EpochStart) and event.epoch == 2:
            stop.request()

    config = resolve_config("classic-adam", {"epochs": 3, "hidden": [16], "threads": 1})
    before = torch.get_num_threads()
    result = training.train(config, arrays=tiny_arrays(), out_dir=tmp_path / "run", progress=progress, stop=stop)
    assert result.interrupted and result.metrics["epochs_run"] == 1
    assert seen[0] is Start and seen.count(EpochEnd) == 1
    assert torch.get_num_threads() == before  # the run's thread count did not leak into the process
    assert json.loads((tmp_path / "run" / checkpoint.METRICS_FILE).read_text())["interrupted"] is True


def test_listing_runs_does_not_load_torch(calibrated_run):
    code = ("import sys\nfrom fmnist.cli import main\n"
            f"assert main(['runs', {str(calibrated_run.parent)!r}]) == 0\n"
            "print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip().splitlines()[-1] == "False", result.stdout
    assert "run" in result.stdout


def test_a_budget_chooses_the_epochs_and_records_them(tmp_path):
    config = resolve_config("classic-adam", {"budget": "6s", "hidden": [16], "validation": 100})
    assert config.budget == 6.0
    result = training.train(config, arrays=tiny_arrays(), out_dir=tmp_path / "run")
    plan = result.metrics["budget"]
    assert plan["seconds"] == 6.0 and plan["epochs"] >= 1 and plan["step_ms"] > 0
    assert result.config.epochs == plan["epochs"] == result.metrics["epochs_planned"]
    saved = json.loads((tmp_path / "run" / checkpoint.CONFIG_FILE).read_text())
    assert saved["epochs"] == plan["epochs"] and saved["budget"] == 6.0


def test_the_first_epoch_resizes_a_plan_the_probe_got_wrong(tmp_path, monkeypatch):
    """A probe that guessed 20 s per epoch planned 1 epoch; the real first epoch takes a fraction of a second, so
    the run re-plans to fill the budget, and config, plan, history and config.json agree on the new length."""
    probe = training.fit_to_budget

    def pessimistic(config, *args, **kwargs):
        config, plan = probe(config, *args, **kwargs)
        plan.update(epochs=1, epoch_seconds_estimate=20.0)
        return config.model_copy(update={"epochs": 1}), plan

    monkeypatch.setattr(training, "fit_to_budget", pessimistic)
    config = resolve_config("classic-adam", {"budget": "6s", "hidden": [16], "validation": 100})
    result = training.train(config, arrays=tiny_arrays(), out_dir=tmp_path / "run")
    plan = result.metrics["budget"]
    assert plan["replanned"]["epochs_from_probe"] == 1 and plan["replanned"]["after_epoch"] == 1
    assert plan["epochs"] > 1 and result.config.epochs == plan["epochs"] == len(result.history)
    assert result.metrics["epochs_planned"] == plan["epochs"]
    saved = json.loads((tmp_path / "run" / checkpoint.CONFIG_FILE).read_text())
    assert saved["epochs"] == plan["epochs"]


def test_a_budget_too_short_for_one_epoch_is_refused(capsys, monkeypatch):
    """Every probed step is made to last at least 0.2 s, so an epoch of 6,000 images (12 steps) cannot fit in
    1 s on any machine: on a fast machine the real steps alone fit, and the test would fail for the wrong reason."""
    real_step = training.train_step

    def slow_step(*args, **kwargs):
        time.sleep(0.2)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(training, "train_step", slow_step)
    code = main(["train", "--preset", "fast", "--train-subset", "6000", "--budget", "1s", "--quiet"])
    error = capsys.readouterr().err.strip()
    assert code == 2 and len(error.splitlines()) == 1, error
    assert "is too short for one epoch here" in error and "--budget" in error


@pytest.mark.parametrize("text,seconds", [("3m", 180.0), ("90s", 90.0), ("1h30m", 5400.0), ("45", 45.0)])
def test_budget_durations(text, seconds):
    assert TrainConfig(budget=text).budget == seconds


def test_a_bad_budget_is_refused_in_one_line():
    with pytest.raises(ConfigError, match="budget '3 minutes' is not a duration; write it like 3m"):
        TrainConfig(budget="3 minutes")


@pytest.mark.parametrize("probes,limit,expected,bf16", [
    ({"_is_amx_tile_supported": True}, "", "AMX", True),
    ({"_is_avx512_bf16_supported": True}, "", "AVX512-BF16", True),
    ({"_is_avx512_supported": True}, "", "AVX512", False),  # bf16 only emulated: slower than fp32
    ({"_is_avx2_supported": True}, "", "AVX2", False),
    ({"_is_amx_tile_supported": True}, "AVX2", "AVX2", False),  # the laptop emulation on a Xeon
    ({"_is_amx_tile_supported": True}, "AVX512_CORE_BF16", "AVX512-BF16", True),
])
def test_auto_precision_follows_the_cpu_class(monkeypatch, probes, limit, expected, bf16):
    from fmnist import devices

    for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported", "_is_avx512_supported",
                 "_is_avx2_supported"):
        value = probes.get(name, False)
        monkeypatch.setattr(torch.cpu, name, lambda value=value: value, raising=False)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", limit)
    assert devices.cpu_class() == expected
    assert training.resolve_precision("auto", torch.device("cpu")) == ("bf16" if bf16 else "fp32")


def test_version_flag(capsys):
    import fmnist

    with pytest.raises(SystemExit) as caught:
        main(["--version"])
    assert caught.value.code == 0 and capsys.readouterr().out.strip() == f"fmnist {fmnist.__version__}"

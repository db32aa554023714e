"""What a learner reaches first: `import fmnist` and its top-level names, and the network as a Keras-style table."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import fmnist
from fmnist.cli import main
from fmnist.model_summary import summarize_module, summary
from fmnist.models import create_model


def test_import_fmnist_stays_light_and_exposes_the_api_lazily():
    code = ("import sys, fmnist; assert 'torch' not in sys.modules, 'torch loaded at import'; "
            "fmnist.Classifier; assert 'torch' in sys.modules; print(sorted(fmnist.__all__))")
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    for name in ("Classifier", "TrainConfig", "load_data", "summary", "train"):
        assert name in completed.stdout


def test_top_level_names_are_the_library_objects():
    from fmnist.predict import Classifier
    from fmnist.training import train

    assert fmnist.Classifier is Classifier and fmnist.summary is summary
    assert fmnist.train is train
    assert {"Classifier", "summary", "train"} <= set(dir(fmnist))
    with pytest.raises(AttributeError, match="no attribute 'Clasifier'"):
        fmnist.Clasifier  # noqa: B018


def test_summary_of_a_preset_counts_parameters_and_multiply_adds():
    table = summary("fast")
    model = create_model("convnet", widths=[32, 64, 128])
    assert table.total_parameters == sum(p.numel() for p in model.parameters()) == 94_186
    first = table.rows[0]
    assert (first.kind, first.output_shape, first.parameters) == ("Conv2d", (1, 32, 28, 28), 288)
    assert first.mult_adds == 28 * 28 * 32 * 9  # each output value: 3x3 weights on 1 channel
    assert table.rows[-1].kind == "Linear" and table.rows[-1].output_shape == (1, 10)
    assert all(row.kind != "Identity" for row in table.rows)
    text = str(table)
    assert "Total params: 94,186" in text and "(N, 32, 28, 28)" in text and "Mult-adds per image: 7.45 M" in text


def test_summary_of_your_own_module_and_frozen_parameters():
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10))
    model[1].weight.requires_grad_(False)
    model.train()
    table = summarize_module(model)
    assert [row.kind for row in table.rows] == ["Flatten", "Linear", "ReLU", "Linear"]
    assert table.total_parameters == 784 * 64 + 64 + 64 * 10 + 10
    assert table.trainable_parameters == table.total_parameters - 784 * 64
    assert table.mult_adds == 784 * 64 + 64 * 10
    assert model.training  # the summary put it back as it was
    assert torch.is_grad_enabled()


def test_cli_summary_of_a_preset_and_refusals(capsys):
    assert main(["summary", "--preset", "classic-adam"]) == 0
    out = capsys.readouterr().out
    assert "Model: mlp, preset classic-adam" in out and "Total params: 101,770" in out
    assert main(["summary"]) == 2
    assert "give a run folder or --preset" in capsys.readouterr().err
    assert main(["summary", "--preset", "fsat"]) == 2
    assert "did you mean 'fast'" in capsys.readouterr().err


def test_cli_summary_of_a_run_folder_and_train_summary(tmp_path, capsys, real_data_source, monkeypatch):
    monkeypatch.setenv("FMNIST_DATA", str(real_data_source.path))
    run = tmp_path / "run"
    assert main(["train", "--preset", "classic-adam", "--dry-run", "--summary", "--quiet", "--no-plots",
                 "--out", str(run)]) == 0
    assert "Total params: 101,770" in capsys.readouterr().out  # printed before training
    assert main(["summary", str(run)]) == 0
    out = capsys.readouterr().out
    assert f"Model: mlp, run {run}" in out and "layers.1 (Linear)" in out


def test_train_result_classifier_answers_as_the_saved_model(tmp_path):
    from conftest import make_tiny_arrays

    arrays = make_tiny_arrays(n_train=200, n_test=40)
    result = fmnist.train({"preset": "fast", "epochs": 1, "widths": [8, 16, 32], "validation": 50,
                           "batch_size": 50}, arrays=arrays, out_dir=tmp_path / "run")
    in_memory, loaded = result.classifier, fmnist.Classifier.load(tmp_path / "run")
    assert (in_memory.temperature, in_memory.calibrated) == (loaded.temperature, loaded.calibrated)
    x_test, y_test = arrays[1]
    assert in_memory.predict_proba(x_test) == pytest.approx(loaded.predict_proba(x_test), abs=1e-6)
    scores = loaded.evaluate(x_test, y_test)
    assert scores["accuracy"] == pytest.approx((loaded.predict(x_test) == y_test).mean())
    assert len(scores["per_class"]) == 10 and scores["loss"] > 0 and len(scores["confusion_matrix"]) == 10
    with pytest.raises(ValueError, match="one class index per image"):
        loaded.evaluate(x_test, y_test[:-1])


def test_train_takes_a_preset_name():
    from conftest import make_tiny_arrays

    result = fmnist.train("classic-narrow", arrays=make_tiny_arrays(n_train=64, n_test=16))
    assert result.config.preset == "classic-narrow" and result.config.hidden == [4, 4]
    assert result.run_dir is None and len(result.history) == result.config.epochs


def test_a_one_cycle_run_too_short_to_settle_is_warned_about(caplog):
    from fmnist.training import resolve_config, warn_if_too_short

    with caplog.at_level("WARNING", logger="fmnist.training"):
        warn_if_too_short(resolve_config("fast"), 24)
    assert "only 24 optimiser steps" in caplog.text and "--lr 0.025" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="fmnist.training"):
        warn_if_too_short(resolve_config("fast"), 2150)  # the preset as it is: 5 epochs of 430 steps
        warn_if_too_short(resolve_config("classic-adam"), 20)  # a constant schedule at lr 0.001
    assert caplog.text == ""


@pytest.mark.parametrize("activation", ["relu", "tanh", "sigmoid", "gelu"])
def test_mlp_activations_train_save_and_reload(tmp_path, activation):
    from conftest import make_tiny_arrays

    arrays = make_tiny_arrays(n_train=100, n_test=20)
    result = fmnist.train({"preset": "classic-adam", "epochs": 1, "activation": activation}, arrays=arrays,
                          out_dir=tmp_path / "run")
    kinds = [type(layer).__name__.lower() for layer in result.model.layers]
    assert kinds[2] == activation
    loaded = fmnist.Classifier.load(tmp_path / "run")
    assert loaded.meta.architecture.config["activation"] == activation
    assert loaded.predict_proba(arrays[1][0]) == pytest.approx(result.classifier.predict_proba(arrays[1][0]), abs=1e-6)


def test_rmsprop_uses_keras_defaults_and_trains():
    from conftest import make_tiny_arrays

    from fmnist.training import make_optimizer

    config = fmnist.TrainConfig(optimizer="rmsprop", lr=1e-3, momentum=0.5)
    optimizer = make_optimizer(config, create_model("mlp", hidden=[16]))
    assert isinstance(optimizer, torch.optim.RMSprop)
    assert optimizer.defaults["alpha"] == 0.9 and optimizer.defaults["eps"] == 1e-7  # Keras' rho and epsilon
    assert optimizer.defaults["momentum"] == 0.5
    result = fmnist.train({"preset": "classic-adam", "optimizer": "rmsprop", "epochs": 2},
                          arrays=make_tiny_arrays(n_train=100, n_test=20))
    assert result.history[-1]["loss"] < result.history[0]["loss"] * 1.5 and np.isfinite(result.history[-1]["loss"])


def test_a_model_file_from_before_activations_loads_as_relu():
    from fmnist.models import check_config

    assert check_config("mlp", {"hidden": [128], "dropout": 0.0}).activation == "relu"
    with pytest.raises(fmnist.FmnistError, match="activation"):
        check_config("mlp", {"hidden": [128], "activation": "swish"})


def test_rmsprop_resumes_to_the_same_weights(tmp_path):
    from conftest import make_tiny_arrays

    from fmnist import events
    from fmnist.training import StopRequest

    arrays = make_tiny_arrays(n_train=100, n_test=20)
    settings = {"preset": "classic-adam", "optimizer": "rmsprop", "momentum": 0.5, "epochs": 2}
    whole = fmnist.train(settings, arrays=arrays, out_dir=tmp_path / "whole")
    stop = StopRequest()
    stopped = fmnist.train(settings, arrays=arrays, out_dir=tmp_path / "part", stop=stop,
                           progress=lambda event: stop.request() if isinstance(event, events.EpochEnd) else None)
    assert stopped.interrupted and len(stopped.history) == 1
    resumed = fmnist.train(resume=tmp_path / "part", arrays=arrays)
    for a, b in zip(whole.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b)

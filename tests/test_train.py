"""Training loop: presets, early stopping, resume, determinism, run folders, checkpoints (small generated data)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from fmnist import training
from fmnist.checkpoint import load_model
from fmnist.errors import ConfigError, ModelFileError
from fmnist.events import EpochStart
from fmnist.predict import Classifier


def learnable_arrays(n_train: int = 320, n_test: int = 80, seed: int = 0):
    """Images whose class is visible: class k lights up row band k, plus noise. A real net learns it in a few steps."""
    rng = np.random.default_rng(seed)
    splits = []
    for n in (n_train, n_test):
        labels = rng.integers(0, 10, size=n).astype(np.uint8)
        images = rng.integers(0, 60, size=(n, 28, 28)).astype(np.uint8)
        for i, label in enumerate(labels):
            images[i, 2 + 2 * label: 4 + 2 * label, 4:24] = 230
        splits.append((images, labels))
    return tuple(splits)


@pytest.fixture(scope="module")
def arrays():
    return learnable_arrays()


def small(preset: str, **overrides) -> training.TrainConfig:
    values = {"epochs": 1, "batch_size": 32, "seed": 0}
    if training.PRESETS[preset].get("validation"):
        values["validation"] = 40
    values.update(overrides)
    return training.resolve_config(preset, values)


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("preset", list(training.PRESETS))
def test_every_preset_builds_and_trains_an_epoch(preset, arrays):
    result = training.train(small(preset), arrays=arrays)
    assert len(result.history) == 1
    row = result.history[0]
    assert np.isfinite(row["loss"]) and 0.0 <= row["accuracy"] <= 1.0
    assert 0.0 <= result.metrics["test_accuracy"] <= 1.0
    assert result.metrics["epochs_run"] == 1 and result.metrics["preset"] == preset


def test_classic_presets_match_the_keras_programs():
    adam = training.resolve_config("classic-adam")
    assert (adam.hidden, adam.optimizer, adam.lr, adam.batch_size, adam.epochs) == ([128], "adam", 1e-3, 32, 10)
    sgd = training.resolve_config("classic-sgd")
    assert (sgd.hidden, sgd.optimizer, sgd.lr, sgd.epochs, sgd.validation) == ([300, 100], "sgd", 0.01, 30, 5000)
    assert training.resolve_config("classic-narrow").hidden == [4, 4]
    stop = training.resolve_config("classic-earlystop")
    assert (stop.epochs, stop.stop_at, stop.monitor) == (50, 0.95, "accuracy")
    assert training.resolve_config("classic-resplit").split == "pooled"


def test_loss_falls_on_learnable_data(arrays):
    result = training.train(small("classic-adam", epochs=4, batch_size=16), arrays=arrays)
    losses = [row["loss"] for row in result.history]
    assert losses[-1] < losses[0] * 0.7
    assert result.metrics["test_accuracy"] > 0.5


def test_stop_at_target_ends_early_and_says_why(arrays):
    result = training.train(small("classic-earlystop", epochs=50, stop_at=0.3, batch_size=16), arrays=arrays)
    assert result.metrics["epochs_run"] < 50
    assert result.history[-1]["accuracy"] >= 0.3
    assert all(row["accuracy"] < 0.3 for row in result.history[:-1])
    assert "reached the target 0.3" in result.metrics["stop_reason"]


def test_patience_stops_and_restores_best_weights(arrays):
    # A learning rate this small changes nothing measurable: val_loss never improves after epoch 1.
    config = small("classic-sgd", epochs=6, lr=1e-30, patience=2, monitor="val_loss")
    result = training.train(config, arrays=arrays)
    assert result.metrics["epochs_run"] == 3
    assert "did not improve for 2 epochs" in result.metrics["stop_reason"]


@pytest.mark.parametrize("preset,extra", [
    ("classic-adam", {"dropout": 0.3}),  # the plain step (dropout)
    ("classic-adam", {}),  # the autograd-free MLP step (fmnist.fast_step), Adam state in the resume file
    ("classic-sgd", {"momentum": 0.9, "nesterov": True}),  # the same with SGD's momentum buffers
    ("fast", {}),
])
def test_resume_equals_uninterrupted(preset, extra, arrays, tmp_path):
    config = small(preset, epochs=3, **extra)
    straight = training.train(config, arrays=arrays, out_dir=tmp_path / "straight")

    def interrupt_at_epoch_two(event):
        if isinstance(event, EpochStart) and event.epoch == 2:
            raise KeyboardInterrupt

    stopped = training.train(config, arrays=arrays, out_dir=tmp_path / "resumed", progress=interrupt_at_epoch_two)
    assert stopped.interrupted and stopped.metrics["epochs_run"] == 1
    assert json.loads((tmp_path / "resumed" / "metrics.json").read_text())["interrupted"] is True
    resumed = training.train(resume=tmp_path / "resumed", arrays=arrays)
    assert resumed.metrics["epochs_run"] == 3 and not resumed.interrupted
    assert_same_weights(weights(straight.model), weights(resumed.model))


def test_same_seed_same_weights_other_seed_other_weights(arrays):
    first = training.train(small("fast", epochs=1), arrays=arrays)
    second = training.train(small("fast", epochs=1), arrays=arrays)
    other = training.train(small("fast", epochs=1, seed=1), arrays=arrays)
    assert_same_weights(weights(first.model), weights(second.model))
    assert not torch.equal(first.model.state_dict()["head.3.weight"], other.model.state_dict()["head.3.weight"])


def test_run_folder_contents(arrays, tmp_path):
    result = training.train(small("classic-sgd", epochs=2), arrays=arrays, out_dir=tmp_path / "run")
    run = tmp_path / "run"
    for name in ("model.safetensors", "model.json", "history.csv", "metrics.json", "config.json"):
        assert (run / name).is_file(), name
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("test_accuracy", "test_loss", "train_seconds", "epochs_run", "seed", "preset"):
        assert key in metrics
    assert metrics["test_accuracy"] == result.metrics["test_accuracy"]
    header = (run / "history.csv").read_text().splitlines()[0].split(",")
    assert {"epoch", "loss", "accuracy", "val_loss", "val_accuracy"} <= set(header)
    meta = json.loads((run / "model.json").read_text())
    assert meta["architecture"] == {"name": "mlp",
                                    "config": {"hidden": [300, 100], "dropout": 0.0, "activation": "relu"}}
    assert meta["classes"][6] == "Shirt" and meta["normalization"]["std"] == 1.0
    assert not list(run.glob(".*.tmp"))
    umask = os.umask(0o022)
    os.umask(umask)
    for name in ("model.safetensors", "model.json", "metrics.json"):  # readable like any file the user makes
        assert (run / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


def test_checkpoint_round_trip_in_a_fresh_process(arrays, tmp_path):
    run = tmp_path / "run"
    training.train(small("fast", epochs=1), arrays=arrays, out_dir=run)
    images = arrays[1][0][:8]
    np.save(tmp_path / "images.npy", images)
    here = Classifier.load(run).predict_proba(images)
    code = ("import sys, numpy as np; from fmnist.predict import Classifier; "
            "p = Classifier.load(sys.argv[1]).predict_proba(np.load(sys.argv[2])); np.save(sys.argv[3], p)")
    subprocess.run([sys.executable, "-c", code, str(run), str(tmp_path / "images.npy"), str(tmp_path / "p.npy")],
                   check=True)
    there = np.load(tmp_path / "p.npy")
    np.testing.assert_array_equal(here, there)
    assert here.shape == (8, 10)
    np.testing.assert_allclose(here.sum(axis=1), 1.0, rtol=1e-5)


def test_classifier_accepts_uint8_and_float_and_single_images(arrays, tmp_path):
    training.train(small("classic-adam"), arrays=arrays, out_dir=tmp_path / "run")
    classifier = Classifier.load(tmp_path / "run")
    images = arrays[1][0][:4]
    from_uint8 = classifier.predict_proba(images)
    np.testing.assert_allclose(classifier.predict_proba(images / 255.0), from_uint8, atol=1e-6)
    np.testing.assert_allclose(classifier.predict_proba(images[0]), from_uint8[:1], atol=1e-6)
    assert len(classifier.top_k(images, k=3)[0]) == 3
    with pytest.raises(Exception, match="shape"):
        classifier.predict_proba(np.zeros((2, 32, 32), np.uint8))
    with pytest.raises(Exception, match="0..1"):
        classifier.predict_proba(np.full((1, 28, 28), 3.0))


@pytest.fixture
def trained_run(arrays, tmp_path):
    run = tmp_path / "run"
    training.train(small("classic-adam"), arrays=arrays, out_dir=run)
    return run


def test_missing_run_folder_is_rejected(tmp_path):
    with pytest.raises(ModelFileError, match="no such run folder"):
        load_model(tmp_path / "nothing")


def test_missing_model_json_is_rejected(trained_run):
    (trained_run / "model.json").unlink()
    with pytest.raises(ModelFileError, match="missing"):
        load_model(trained_run)


def test_truncated_weights_are_rejected(trained_run):
    path = trained_run / "model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ModelFileError, match="truncated or damaged"):
        load_model(trained_run)


def test_not_a_model_is_rejected(trained_run):
    (trained_run / "model.json").write_text("{not json")
    with pytest.raises(ModelFileError, match="not valid JSON"):
        load_model(trained_run)
    (trained_run / "model.json").write_text(json.dumps({"hello": "world"}))
    with pytest.raises(ModelFileError, match="not an fmnist model"):
        load_model(trained_run)


def test_weights_of_another_architecture_are_rejected(trained_run):
    meta = json.loads((trained_run / "model.json").read_text())
    meta["architecture"]["config"]["hidden"] = [64]
    (trained_run / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelFileError, match="do not fit architecture"):
        load_model(trained_run)


def test_bad_configs_are_refused_with_a_hint():
    with pytest.raises(ConfigError, match="did you mean 'classic-adam'"):
        training.resolve_config("clasic-adam")
    with pytest.raises(ConfigError, match="did you mean 'epochs'"):
        training.resolve_config("fast", {"epoch": 3})
    with pytest.raises(ConfigError, match="optimizer"):
        training.resolve_config("fast", {"optimizer": "adagrad"})
    with pytest.raises(ConfigError, match="needs a validation split"):
        training.resolve_config("classic-adam", {"monitor": "val_loss"})


def test_learning_rate_schedules():
    config = training.resolve_config("fast", {"epochs": 1})
    rates = [training.learning_rate(config, step, 100) for step in range(100)]
    peak = int(config.warmup * 100)
    assert rates[0] == pytest.approx(config.lr / 25)
    assert rates[peak] == pytest.approx(config.lr)
    assert rates[-1] < config.lr * 0.02
    cosine = training.resolve_config("fast", {"schedule": "cosine", "warmup": 0.0})
    assert training.learning_rate(cosine, 50, 100) == pytest.approx(cosine.lr / 2)
    assert training.learning_rate(training.resolve_config("classic-adam"), 77, 100) == 1e-3

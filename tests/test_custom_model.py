"""Your own network through fmnist: `train(config, model=...)` with every part of the loop, a run folder that names
the class, and loading it only when the code is trusted (small generated data, 1-2 epochs)."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import fmnist
from fmnist import checkpoint, events, models, training
from fmnist.cli import main
from fmnist.errors import ConfigError, UntrustedCodeError
from fmnist.predict import Classifier

HERE = Path(__file__).resolve().parent
TARGET = "custom_nets:TinyNet"


@pytest.fixture(scope="module", autouse=True)
def nets_importable():
    """`custom_nets` (beside this file) importable whatever pytest's import mode, as a user's package would be."""
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(HERE))
        yield


def bar_arrays(n: int = 300) -> tuple:
    """Noise with a bright row whose position encodes the class: learnable in an epoch."""
    rng = np.random.default_rng(0)
    labels = (np.arange(n) % 10).astype(np.uint8)
    images = (rng.random((n, 28, 28)) * 40).astype(np.uint8)
    for index, label in enumerate(labels):
        images[index, 2 + 2 * label, :] = 255
    return (images, labels), (images[:100].copy(), labels[:100].copy())


def small(**settings) -> dict:
    return {"preset": "classic-adam", "epochs": 1, "threads": 1, **settings}


def one_line(error: BaseException) -> str:
    text = str(error)
    assert "\n" not in text, text
    return text


@pytest.fixture(scope="module")
def custom_run(tmp_path_factory):
    """An instance of TinyNet trained through everything: validation, calibration, early stopping, channels-last,
    progress events and a run folder."""
    import custom_nets

    run = tmp_path_factory.mktemp("custom") / "run"
    seen: list[type] = []
    network = custom_nets.TinyNet(width=6)
    config = small(epochs=3, validation=100, stop_at=0.0, channels_last=True)
    result = training.train(config, model=network, model_kwargs={"width": 6}, arrays=bar_arrays(), out_dir=run,
                            progress=lambda event: seen.append(type(event)))
    return result, run, network, seen


# ----------------------------------------------------------------------------------------------- train and reload
def test_your_network_trains_with_the_whole_loop_and_records_its_class(custom_run):
    result, run, network, seen = custom_run
    assert result.model is network  # trained in place, returned on the CPU
    assert result.config.model == "custom" and result.config.custom == TARGET
    assert result.metrics["epochs_run"] == 1 and "reached the target" in result.metrics["stop_reason"]
    assert "val_accuracy" in result.history[0] and result.calibration.fitted
    assert result.metrics["parameters"] == sum(p.numel() for p in network.parameters())
    assert network.conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert {events.Start, events.EpochStart, events.Step, events.EpochEnd, events.End} <= set(seen)
    meta = json.loads((run / checkpoint.META_FILE).read_text())
    assert meta["architecture"] == {"name": "custom", "config": {"target": TARGET, "kwargs": {"width": 6}}}
    assert meta["channels_last"] is True
    assert json.loads((run / checkpoint.CONFIG_FILE).read_text())["custom_kwargs"] == {"width": 6}


def test_a_trusted_reload_answers_like_the_run_in_memory(custom_run):
    result, run, _, _ = custom_run
    images = bar_arrays()[1][0]
    loaded = Classifier.load(run, trust_code=True)
    np.testing.assert_allclose(loaded.predict_proba(images), result.classifier.predict_proba(images), atol=1e-6)
    assert loaded.temperature == result.calibration.temperature != 1.0
    model, _ = checkpoint.load_model(run, trust_code=True)
    assert type(model).__name__ == "TinyNet" and not model.training
    table = fmnist.summary(run, trust_code=True)
    assert table.total_parameters == result.metrics["parameters"] and TARGET in table.title


def test_an_import_path_is_built_after_seeding():
    def weights(seed: int) -> dict[str, torch.Tensor]:
        config = small(seed=seed, train_subset=64, test_subset=20)
        return training.train(config, model=TARGET, model_kwargs={"hidden": [12]}, arrays=bar_arrays()).model \
            .state_dict()

    first, second, other = weights(0), weights(0), weights(1)
    assert all(torch.equal(first[name], second[name]) for name in first)
    assert not torch.equal(first["conv.weight"], other["conv.weight"])
    assert first["head.0.weight"].shape == (12, 8 * 7 * 7)  # model_kwargs reached the class


def test_a_time_budget_probes_a_copy_of_your_instance():
    import custom_nets

    def fresh() -> nn.Module:
        torch.manual_seed(7)
        return custom_nets.TinyNet(width=4)

    data = {"train_subset": 64, "test_subset": 20}
    budgeted = training.train(small(budget=1.0, **data), model=fresh(), arrays=bar_arrays())
    epochs = budgeted.metrics["epochs_run"]
    assert budgeted.metrics["budget"]["epochs"] == epochs
    plain = training.train(small(epochs=epochs, **data), model=fresh(), arrays=bar_arrays())
    for name, tensor in plain.model.state_dict().items():  # the probe's steps never touched the trained network
        assert torch.equal(tensor, budgeted.model.state_dict()[name]), name


def test_resuming_your_network_needs_trust_then_continues_bit_for_bit(tmp_path):
    config = small(epochs=2, train_subset=120, test_subset=20)
    straight = training.train(config, model=TARGET, arrays=bar_arrays())

    def interrupt_at_epoch_two(event):
        if isinstance(event, events.EpochStart) and event.epoch == 2:
            raise KeyboardInterrupt

    run = tmp_path / "run"
    stopped = training.train(config, model=TARGET, arrays=bar_arrays(), out_dir=run, progress=interrupt_at_epoch_two)
    assert stopped.interrupted and stopped.metrics["epochs_run"] == 1
    with pytest.raises(UntrustedCodeError, match=f"run folder {run} names code '{TARGET}'"):
        training.train(resume=run, arrays=bar_arrays())
    resumed = training.train(resume=run, arrays=bar_arrays(), trust_code=True)
    assert resumed.metrics["epochs_run"] == 2 and not resumed.interrupted
    for name, tensor in straight.model.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name


# ----------------------------------------------------------------------------------------------- trust
def test_loading_without_trust_is_refused_before_any_import(custom_run, tmp_path, monkeypatch):
    _, run, _, _ = custom_run
    for load in (Classifier.load, checkpoint.load_model, fmnist.summary):
        with pytest.raises(UntrustedCodeError) as caught:
            load(run)
        message = one_line(caught.value)
        assert f"names code '{TARGET}'" in message and "runs its code" in message
        assert "--trust-code" in message and "trust_code=True" in message
    # A run naming a module that leaves a mark when imported: refused, and the module never ran.
    (tmp_path / "marking_nets.py").write_text(
        "from pathlib import Path\nPath(__file__).with_name('imported').touch()\nfrom custom_nets import TinyNet\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    copy = Path(shutil.copytree(run, tmp_path / "copy"))
    meta = json.loads((copy / checkpoint.META_FILE).read_text())
    meta["architecture"]["config"]["target"] = "marking_nets:TinyNet"
    (copy / checkpoint.META_FILE).write_text(json.dumps(meta))
    with pytest.raises(UntrustedCodeError, match="marking_nets:TinyNet"):
        Classifier.load(copy)
    assert not (tmp_path / "imported").exists()
    assert Classifier.load(copy, trust_code=True).predict_proba(bar_arrays()[1][0][:2]).shape == (2, 10)
    assert (tmp_path / "imported").exists()


def _free_port() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return str(probe.getsockname()[1])


@pytest.mark.parametrize("command", [["evaluate"], ["predict", "--index", "0"], ["plot"], ["summary"], ["export"],
                                     ["serve", "--port", "PORT"], ["train", "--resume"]])
def test_every_command_that_loads_a_run_refuses_untrusted_code(custom_run, command, capsys):
    _, run, _, _ = custom_run
    before = {path.name: path.stat().st_mtime_ns for path in run.iterdir()}
    argv = [_free_port() if part == "PORT" else part for part in command]
    argv = [*argv[:1], str(run), *argv[1:]] if command[0] != "train" else [*argv, str(run)]
    assert main(argv) == 2
    stderr = capsys.readouterr().err
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert lines[0].startswith("fmnist: error: ") and f"'{TARGET}'" in lines[0] and "--trust-code" in lines[0]
    assert {path.name: path.stat().st_mtime_ns for path in run.iterdir()} == before  # nothing written


# ----------------------------------------------------------------------------------------------- refusals
def test_a_class_from___main___is_refused_before_training_with_a_run_folder(tmp_path):
    import custom_nets

    script_net = type("ScriptNet", (custom_nets.TinyNet,), {"__module__": "__main__"})
    seen: list[object] = []
    with pytest.raises(ConfigError) as caught:
        training.train(small(), model=script_net(width=4), arrays=bar_arrays(), out_dir=tmp_path / "run",
                       progress=seen.append)
    message = one_line(caught.value)
    assert "__main__:ScriptNet" in message and "move the class into a .py module" in message
    assert not (tmp_path / "run").exists() and not seen

    class LocalNet(custom_nets.TinyNet):
        pass

    with pytest.raises(ConfigError, match="defined inside a function"):
        training.train(small(), model=LocalNet(), arrays=bar_arrays(), out_dir=tmp_path / "run")
    # In memory any class will do, and the result answers as a Classifier.
    result = training.train(small(train_subset=64, test_subset=20), model=script_net(width=4), arrays=bar_arrays())
    assert result.config.custom == "__main__:ScriptNet"
    probabilities = result.classifier.predict_proba(bar_arrays()[1][0][:3])
    assert probabilities.shape == (3, 10) and np.allclose(probabilities.sum(1), 1)


@pytest.mark.parametrize("model,kwargs,message", [
    ("custom_nets:WrongShape", None, r"maps a \(2, 1, 28, 28\) batch to \(2, 7\), not \(2, 10\) logits"),
    ("custom_nets:Missing", None, "module custom_nets has no 'Missing'"),
    ("no_such_package_xyz.nets:Net", None, "no module named 'no_such_package_xyz'"),
    ("custom_nets:not_a_module", None, "is a function, not a torch.nn.Module subclass"),
    ("custom_nets:TinyNet", {"width": "wide"}, r"building it with \{'width': 'wide'\} failed \(TypeError"),
    ("custom_nets:TinyNet", {"activation": nn.ReLU}, "keyword argument 'activation' .* only JSON values"),
    ("custom_nets.TinyNet", None, "is not an import path; write it as package.module:Class"),
    (42, None, "model= takes a torch.nn.Module or an import path"),
])
def test_a_network_that_cannot_work_is_refused_in_one_line(model, kwargs, message):
    with pytest.raises(ConfigError, match=message) as caught:
        training.train(small(), model=model, model_kwargs=kwargs, arrays=bar_arrays())
    one_line(caught.value)


def test_an_instance_must_be_what_its_class_and_kwargs_rebuild(tmp_path):
    import custom_nets

    with pytest.raises(ConfigError, match=r"custom_nets:TinyNet\(\*\*\{\}\) does not rebuild the network") as caught:
        training.train(small(), model=custom_nets.TinyNet(width=5), arrays=bar_arrays(), out_dir=tmp_path / "run")
    assert "model_kwargs=" in one_line(caught.value) and not (tmp_path / "run").exists()


def test_the_parameter_cap_and_a_shape_check_hold_for_instances_too(monkeypatch):
    monkeypatch.setattr(models, "MAX_PARAMETERS", 100)
    with pytest.raises(ConfigError, match="over the limit of 100"):
        training.train(small(), model=nn.Sequential(nn.Flatten(), nn.Linear(784, 10)), arrays=bar_arrays())
    monkeypatch.undo()
    with pytest.raises(ConfigError, match=r"to \(2, 784\), not \(2, 10\)"):
        training.train(small(), model=nn.Sequential(nn.Flatten(), nn.Identity(), nn.Linear(784, 784)),
                       arrays=bar_arrays())


def test_a_config_that_names_code_needs_trust():
    config = small(model="custom", custom=TARGET, custom_kwargs={"width": 4}, train_subset=64, test_subset=20)
    with pytest.raises(UntrustedCodeError, match=f"the config names code '{TARGET}'"):
        training.train(config, arrays=bar_arrays())
    assert training.train(config, arrays=bar_arrays(), trust_code=True).config.custom_kwargs == {"width": 4}
    with pytest.raises(ConfigError, match="model is mlp; add --model custom"):
        training.resolve_config("classic-adam", {"custom": TARGET})


# ----------------------------------------------------------------------------------------------- CLI
def test_the_cli_trains_your_network_with_trust(tiny_csv_dir, tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train", "--preset", "classic-adam", "--model", "custom", "--custom", TARGET, "--custom-kwargs",
            '{"width": 4}', "--epochs", "1", "--threads", "1", "--data-dir", str(tiny_csv_dir), "--out", str(run),
            "--no-plots", "-q"]
    assert main(argv) == 2 and not run.exists()
    assert "fmnist: error: the config names code 'custom_nets:TinyNet'" in capsys.readouterr().err
    assert main([*argv, "--trust-code"]) == 0, capsys.readouterr().err
    meta = json.loads((run / checkpoint.META_FILE).read_text())
    assert meta["architecture"]["config"] == {"target": TARGET, "kwargs": {"width": 4}}
    assert main(["evaluate", str(run), "--trust-code", "--data-dir", str(tiny_csv_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["test_size"] == 20
    with pytest.raises(SystemExit) as exited:
        main([*argv[:8], "{width: 4}", *argv[9:]])
    assert exited.value.code == 2 and "expected a JSON object" in capsys.readouterr().err

"""Device choice: what --device values mean, the errors for impossible ones, and the CPU path end to end.

The GPU itself is exercised by tests/e2e/test_gpu.py, which runs only where torch sees CUDA. Here the GPU
decisions (which index each torchrun rank takes, the NCCL backend, bf16 on GPUs) are checked against a faked
`torch.cuda`, so they are pinned down on CPU-only machines too.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from fmnist import distributed, training
from fmnist.devices import describe, node_position, resolve_device
from fmnist.errors import ConfigError
from fmnist.predict import Classifier


@pytest.fixture
def two_gpus(monkeypatch):
    """Pretend torch sees two CUDA GPUs with bf16 units (only the probes the device choice reads)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_cpu_and_auto_without_a_gpu(no_gpu):
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("auto", (1, 2)) == torch.device("cpu")
    assert describe(torch.device("cpu")) == "cpu"


@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:3"])
def test_asking_for_a_missing_gpu_says_to_use_the_cpu(no_gpu, name):
    with pytest.raises(ConfigError, match="use --device cpu"):
        resolve_device(name)


@pytest.mark.parametrize(("name", "hint"), [("gpu", "cuda or cuda:N"), ("cuda:x", "cuda or cuda:N"),
                                            ("tpu", "cuda or cuda:N"), ("mps", "not supported yet")])
def test_unknown_devices_are_refused_with_the_choices(name, hint):
    with pytest.raises(ConfigError, match=hint):
        resolve_device(name)


def test_gpu_indices_alone_and_under_torchrun(two_gpus):
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("cuda", (1, 2)) == torch.device("cuda", 1)  # one GPU per process: its local rank
    assert resolve_device("auto", (1, 2)) == torch.device("cuda", 1)
    # auto takes GPUs only when every process on the node gets one, so no rank is left on the CPU alone
    assert resolve_device("auto", (0, 3)) == torch.device("cpu")
    assert resolve_device("auto", (2, 3)) == torch.device("cpu")


def test_impossible_gpu_choices_name_the_fix(two_gpus):
    with pytest.raises(ConfigError, match="cuda:0 to cuda:1"):
        resolve_device("cuda:2")
    with pytest.raises(ConfigError, match="--nproc-per-node 2"):
        resolve_device("cuda", (2, 3))
    with pytest.raises(ConfigError, match="CUDA_VISIBLE_DEVICES"):
        resolve_device("cuda:1", (0, 2))  # a fixed index would put every rank on the same GPU


def test_node_position_reads_torchrun_environment(monkeypatch):
    for name in ("WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert node_position() is None
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert node_position() == (1, 2)
    monkeypatch.setenv("WORLD_SIZE", "1")  # a single process started by torchrun is not distributed
    assert node_position() is None


def test_backend_and_precision_follow_the_device(two_gpus):
    assert distributed.backend_for(torch.device("cuda", 1)) == "nccl"
    assert distributed.backend_for(torch.device("cpu")) == "gloo"
    assert training.resolve_precision("auto", torch.device("cuda", 0)) == "bf16"
    assert training.resolve_precision("fp32", torch.device("cuda", 0)) == "fp32"


def small_arrays(n_train: int = 256, n_test: int = 64):
    rng = np.random.default_rng(0)
    splits = []
    for n in (n_train, n_test):
        labels = rng.integers(0, 10, size=n).astype(np.uint8)
        images = rng.integers(0, 60, size=(n, 28, 28)).astype(np.uint8)
        for i, label in enumerate(labels):
            images[i, 2 + 2 * label: 4 + 2 * label, 4:24] = 230
        splits.append((images, labels))
    return tuple(splits)


def test_training_records_where_it_ran_and_refuses_a_missing_gpu_before_writing(tmp_path, no_gpu):
    config = training.resolve_config("classic-adam", {"epochs": 1})
    result = training.train(config, arrays=small_arrays(), out_dir=tmp_path / "cpu-run", device="cpu")
    assert result.metrics["device"] == "cpu" and result.metrics["processes"] == 1
    assert json.loads((tmp_path / "cpu-run" / "metrics.json").read_text())["device"] == "cpu"
    with pytest.raises(ConfigError, match="use --device cpu"):
        training.train(config, arrays=small_arrays(), out_dir=tmp_path / "gpu-run", device="cuda")
    assert not (tmp_path / "gpu-run").exists()  # refused before any file was written
    with pytest.raises(ConfigError, match="use --device cpu"):
        Classifier.load(tmp_path / "cpu-run", device="cuda")
    assert Classifier.load(tmp_path / "cpu-run").device == torch.device("cpu")


def run_cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fmnist", *args], capture_output=True, text=True, timeout=120,
                          cwd=cwd)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
@pytest.mark.parametrize("command", [["train", "--dry-run", "--device", "cuda"],
                                     ["evaluate", "RUN", "--device", "cuda:0"],
                                     ["predict", "RUN", "--index", "0", "--device", "cuda"]])
def test_cli_refuses_a_missing_gpu_in_one_line(command, tmp_path):
    config = training.resolve_config("classic-adam", {"epochs": 1})
    training.train(config, arrays=small_arrays(), out_dir=tmp_path / "run")
    done = run_cli(*[str(tmp_path / "run") if part == "RUN" else part for part in command], cwd=tmp_path)
    assert done.returncode == 2
    assert sorted(path.name for path in tmp_path.iterdir()) == ["run"]  # nothing written
    assert done.stderr.strip().count("\n") == 0 and "use --device cpu" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_cli_help_lists_the_device_choices():
    for command in ("train", "evaluate", "predict"):
        done = run_cli(command, "--help")
        assert done.returncode == 0 and "--device" in done.stdout and "cuda:N" in done.stdout

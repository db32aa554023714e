"""Data-parallel training as real process groups: torchrun with 2 processes over gloo on 127.0.0.1.

Checks what the team relies on: the same `fmnist train` works under torchrun, ranks end with identical weights,
two processes with a global batch B take the steps one process with batch B takes, only one run folder is
written and it loads in a single process, and Ctrl-C stops the whole group with a resumable checkpoint.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fmnist import data
from fmnist.predict import Classifier

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]

WORKER = r"""
import json, sys
import numpy as np
from safetensors.torch import save_file
from fmnist.training import resolve_config, train

preset, overrides, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
rng = np.random.default_rng(0)
splits = []
for n in (384, 96):  # class k lights up row band k, plus noise: learnable in a few steps
    labels = rng.integers(0, 10, size=n).astype(np.uint8)
    images = rng.integers(0, 60, size=(n, 28, 28)).astype(np.uint8)
    for i, label in enumerate(labels):
        images[i, 2 + 2 * label: 4 + 2 * label, 4:24] = 230
    splits.append((images, labels))
result = train(resolve_config(preset, overrides), arrays=tuple(splits))
import os
rank = os.environ.get("RANK", "single")
state = {k: v.contiguous() for k, v in result.model.state_dict().items()}
save_file(state, f"{out}/weights-{rank}.safetensors")
with open(f"{out}/history-{rank}.json", "w") as handle:
    json.dump(result.history, handle)
"""


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "FMNIST_DIST_TIMEOUT": "60"}


def run_worker(tmp_path: Path, preset: str, overrides: dict, distributed: bool) -> None:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    command = [*TORCHRUN, str(script)] if distributed else [sys.executable, str(script)]
    done = subprocess.run([*command, preset, json.dumps(overrides), str(tmp_path)], capture_output=True, text=True,
                          timeout=300, env=env())
    assert done.returncode == 0, done.stdout + done.stderr


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path)


@pytest.mark.slow
def test_two_processes_take_the_same_steps_as_one(tmp_path):
    """MLP (no batch norm): 2 ranks x 16 images == 1 process x 32 images, up to float summation order."""
    overrides = {"epochs": 2, "batch_size": 32, "threads": 1}
    run_worker(tmp_path, "classic-adam", overrides, distributed=True)
    run_worker(tmp_path, "classic-adam", overrides, distributed=False)
    rank0, rank1 = weights(tmp_path / "weights-0.safetensors"), weights(tmp_path / "weights-1.safetensors")
    single = weights(tmp_path / "weights-single.safetensors")
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name  # DDP keeps the replicas bit-identical
        torch.testing.assert_close(rank0[name], single[name], atol=2e-5, rtol=1e-4)
    both = json.loads((tmp_path / "history-0.json").read_text())
    alone = json.loads((tmp_path / "history-single.json").read_text())
    assert both[-1]["accuracy"] == pytest.approx(alone[-1]["accuracy"], abs=0.01)  # metrics summed over ranks


@pytest.mark.slow
def test_batch_norm_and_augmentation_stay_identical_across_ranks(tmp_path):
    overrides = {"epochs": 2, "batch_size": 64, "widths": [8, 16, 32], "validation": 64, "threads": 1,
                 "precision": "fp32"}
    run_worker(tmp_path, "fast", overrides, distributed=True)
    rank0, rank1 = weights(tmp_path / "weights-0.safetensors"), weights(tmp_path / "weights-1.safetensors")
    assert rank0.keys() == rank1.keys() and any("running_mean" in name for name in rank0)
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name  # parameters and the synced batch-norm statistics
    histories = [[{k: v for k, v in row.items() if not k.endswith("seconds")} for row in json.loads(
        (tmp_path / f"history-{rank}.json").read_text())] for rank in (0, 1)]
    assert histories[0] == histories[1]  # both ranks saw the same metrics (timings aside), so they stop alike


def train_command(out: Path, data_dir: Path, *extra: str) -> list[str]:
    return [*TORCHRUN, "-m", "fmnist", "train", "--preset", "classic-adam", "--train-subset", "1280",
            "--threads", "1", "--device", "cpu", "--out", str(out), "--data-dir", str(data_dir), *extra]


@pytest.mark.slow
def test_fmnist_train_under_torchrun_writes_one_loadable_run(tmp_path, real_data_source, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "ddp-run"
    done = subprocess.run(train_command(out, real_data_source.path, "--epochs", "2"), capture_output=True,
                          text=True, timeout=300, env=env())
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("test accuracy") == 1  # rank 0 alone reports
    assert done.stdout.count("epoch   2") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp-run"]  # one run folder, nothing else
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs_run"] == 2 and metrics["test_accuracy"] > 0.6
    classifier = Classifier.load(out)  # a distributed run's model loads like any other
    (_, _), (x_test, y_test) = data.load_data(real_data_source.path)
    accuracy = float(np.mean(classifier.predict(x_test) == y_test))
    assert accuracy == pytest.approx(metrics["test_accuracy"], abs=1e-6)


@pytest.mark.slow
def test_ctrl_c_stops_every_rank_and_the_run_resumes(tmp_path, real_data_source):
    out = tmp_path / "ddp-run"
    process = subprocess.Popen(train_command(out, real_data_source.path, "--epochs", "200"),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env(),
                               start_new_session=True)
    deadline = time.monotonic() + 120
    while not (out / "resume.json").exists():
        assert process.poll() is None and time.monotonic() < deadline, process.stdout.read() if process.stdout else ""
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole foreground group
    output, _ = process.communicate(timeout=120)
    assert process.returncode != 0, output
    epochs_done = json.loads((out / "resume.json").read_text())["epoch"]
    assert 1 <= epochs_done < 200
    config = json.loads((out / "config.json").read_text())
    config["epochs"] = epochs_done + 1  # finish quickly: one more epoch
    (out / "config.json").write_text(json.dumps(config))
    done = subprocess.run([*TORCHRUN, "-m", "fmnist", "train", "--resume", str(out), "--device", "cpu", "--data-dir",
                           str(real_data_source.path)], capture_output=True, text=True, timeout=300, env=env())
    assert done.returncode == 0, done.stdout + done.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs_run"] == epochs_done + 1 and not metrics["interrupted"]
    Classifier.load(out)

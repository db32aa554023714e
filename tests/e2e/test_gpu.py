"""The CUDA path, on a real GPU: training, the CPU/GPU hand-over of models and checkpoints, and NCCL.

Runs only where torch sees a CUDA GPU (CI machines have none, so CI skips this file; run it on a GPU machine
with `pytest tests/e2e/test_gpu.py`). The device choices themselves are pinned on CPU in tests/test_devices.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fmnist import data, training
from fmnist.events import EpochEnd
from fmnist.predict import Classifier

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def real_subset(source, n_train: int = 12_000):
    (x_train, y_train), test = data.load_data(source.path)
    return (x_train[:n_train], y_train[:n_train]), test


def test_augmentation_on_the_gpu_equals_the_cpu():
    batch = torch.rand(64, 1, 28, 28)
    on_cpu = data.augment_batch(batch, torch.Generator().manual_seed(5), True, 2, 0.3)
    on_gpu = data.augment_batch(batch.cuda(), torch.Generator().manual_seed(5), True, 2, 0.3)
    assert on_gpu.is_cuda and torch.equal(on_gpu.cpu(), on_cpu)


def test_cli_trains_on_the_gpu_and_the_run_loads_on_the_cpu(tmp_path, real_data_source):
    out = tmp_path / "gpu-run"
    done = subprocess.run([sys.executable, "-m", "fmnist", "train", "--preset", "fast", "--epochs", "2",
                           "--train-subset", "12000", "--validation", "2000", "--device", "cuda", "--out", str(out),
                           "--data-dir", str(real_data_source.path), "--no-plots"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "on cuda:0 (" in done.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["device"].startswith("cuda:0") and metrics["test_accuracy"] > 0.8
    assert metrics["precision"] == ("bf16" if torch.cuda.is_bf16_supported() else "fp32")
    (_, _), (x_test, y_test) = data.load_data(real_data_source.path)
    on_cpu = Classifier.load(out).predict_proba(x_test)
    on_gpu = Classifier.load(out, device="cuda").predict_proba(x_test)
    assert float(np.mean(on_cpu.argmax(1) == y_test)) == pytest.approx(metrics["test_accuracy"], abs=0.003)
    assert np.mean(on_cpu.argmax(1) == on_gpu.argmax(1)) > 0.998
    np.testing.assert_allclose(on_gpu, on_cpu, atol=2e-3)


def test_a_gpu_run_resumes_on_the_cpu(tmp_path, real_data_source):
    config = training.resolve_config("fast", {"epochs": 2, "validation": 2000, "widths": [16, 32, 64]})

    def stop_after_epoch_one(event):
        if isinstance(event, EpochEnd) and event.epoch == 1:
            raise KeyboardInterrupt

    arrays = real_subset(real_data_source)
    stopped = training.train(config, arrays=arrays, out_dir=tmp_path / "run", progress=stop_after_epoch_one,
                          device="cuda")
    assert stopped.interrupted and next(stopped.model.parameters()).device.type == "cpu"
    resumed = training.train(resume=tmp_path / "run", arrays=arrays, device="cpu")
    assert resumed.metrics["epochs_run"] == 2 and not resumed.interrupted
    assert resumed.metrics["device"] == "cpu" and resumed.metrics["test_accuracy"] > 0.8


WORKER = r"""
import os, sys
from safetensors.torch import save_file
from fmnist import data
from fmnist.training import resolve_config, train

(x, y), test = data.load_data(sys.argv[2])
result = train(resolve_config("fast", {"epochs": 1, "validation": 1000}), arrays=((x[:8000], y[:8000]), test),
               device="cuda")
assert result.metrics["processes"] == 2, result.metrics
save_file({k: v.contiguous() for k, v in result.model.state_dict().items()},
          f"{sys.argv[1]}/weights-{os.environ['RANK']}.safetensors")
"""


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL data-parallel needs two GPUs")
def test_two_gpus_over_nccl_end_with_identical_weights(tmp_path, real_data_source):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(script), str(tmp_path), str(real_data_source.path)],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "FMNIST_DIST_TIMEOUT": "120"})
    assert done.returncode == 0, done.stdout + done.stderr
    rank0, rank1 = load_file(tmp_path / "weights-0.safetensors"), load_file(tmp_path / "weights-1.safetensors")
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name

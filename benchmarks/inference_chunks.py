"""Inference speed by chunk size: how many images per forward pass `evaluate.inference_chunk` should choose.

Each architecture (fresh weights: speed does not depend on them) runs the same 10,000 random images in eval mode,
fp32, on the CPU, in chunks of each size (channels-last for the convolutional nets, as they train); the best of 3
passes after a warm-up. Nothing else should run on the machine meanwhile.

    .venv/bin/python benchmarks/inference_chunks.py

Prints a table and writes benchmarks/results/inference_chunks-<time>.json.
"""

from __future__ import annotations

import json
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from _machine import cpu_name, git_commit

from fmnist import data
from fmnist.devices import cpu_class
from fmnist.evaluate import inference_chunk
from fmnist.models import create_model

RESULTS = Path(__file__).resolve().parent / "results"
CHUNKS = (32, 64, 128, 256, 512, 1024)
NETWORKS = (("mlp", {}), ("mlp", {"hidden": [300, 100]}), ("keras-cnn", {}),
            ("convnet", {"widths": [32, 64, 128]}), ("convnet", {"widths": [64, 128, 256]}))


def images_per_second(model: torch.nn.Module, x: torch.Tensor, chunk: int, channels_last: bool) -> float:
    def one_pass() -> float:
        started = time.perf_counter()
        with torch.inference_mode():
            for start in range(0, len(x), chunk):
                batch = x[start:start + chunk]
                model(batch.contiguous(memory_format=torch.channels_last) if channels_last else batch)
        return time.perf_counter() - started

    one_pass()
    return len(x) / min(one_pass() for _ in range(3))


def main() -> None:
    images = np.random.default_rng(0).integers(0, 256, (10_000, 28, 28), dtype=np.uint8)
    x = data.preprocess(images, *data.normalization(False))
    rows = []
    for name, settings in NETWORKS:
        model = create_model(name, **settings).eval()
        channels_last = name != "mlp"
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        speeds = {chunk: round(images_per_second(model, x, chunk, channels_last)) for chunk in CHUNKS}
        rows.append({"network": name, "settings": settings, "images_per_second": speeds,
                     "fastest": max(speeds, key=speeds.get), "chosen": inference_chunk(model)})
        print(f"{name} {settings}: " + "  ".join(f"{c}: {v:,}" for c, v in speeds.items())
              + f"  (fastest {rows[-1]['fastest']}, fmnist uses {rows[-1]['chosen']})")
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H%M%S")
    result = {"date": stamp, "cpu": cpu_name(), "cpu_class": cpu_class(), "precision": "fp32",
              "threads": torch.get_num_threads(),
              "torch": torch.__version__, "python": platform.python_version(), "commit": git_commit(), "rows": rows}
    path = RESULTS / f"inference_chunks-{stamp}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

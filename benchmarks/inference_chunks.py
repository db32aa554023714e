"""Inference speed by chunk size: how many images per forward pass `evaluate.inference_chunk` should choose.

Each architecture (fresh weights: speed does not depend on them) runs the same 10,000 random images in eval mode,
fp32, on the CPU, in chunks of each size (channels-last for the convolutional nets, as they train); the best of 3
passes after a warm-up. When onnxruntime is installed, the same network exported as `fmnist export` does it
(`onnx_payload`) runs through `OnnxClassifier.predict_proba` in the same chunks, for `export.onnx_chunk`.
Nothing else should run on the machine meanwhile.

    .venv/bin/python benchmarks/inference_chunks.py

Prints a table and writes benchmarks/results/inference_chunks-<time>.json.
"""

from __future__ import annotations

import json
import platform
import time
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import numpy as np
import torch
from _machine import cpu_name, git_commit

from fmnist import data
from fmnist.checkpoint import Architecture, RunMeta
from fmnist.devices import cpu_class
from fmnist.evaluate import inference_chunk
from fmnist.export import onnx_chunk
from fmnist.models import create_model

RESULTS = Path(__file__).resolve().parent / "results"
CHUNKS = (32, 64, 128, 256, 512, 1024)
NETWORKS = (("mlp", {}), ("mlp", {"hidden": [300, 100]}), ("keras-cnn", {}),
            ("convnet", {"widths": [32, 64, 128]}), ("convnet", {"widths": [64, 128, 256]}))


def images_per_second(model: torch.nn.Module, x: torch.Tensor, chunk: int, channels_last: bool) -> float:
    def one_pass() -> None:
        with torch.inference_mode():
            for start in range(0, len(x), chunk):
                batch = x[start:start + chunk]
                model(batch.contiguous(memory_format=torch.channels_last) if channels_last else batch)

    return len(x) / best_of_three(one_pass)


def best_of_three(run) -> float:
    """Seconds of the fastest of three calls, after one warm-up call."""
    run()
    times = []
    for _ in range(3):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times)


def onnx_speeds(model: torch.nn.Module, name: str, settings: dict, images: np.ndarray) -> dict[int, int] | str:
    """Images/s of the exported graph through `OnnxClassifier` per chunk, or why it was not measured."""
    try:
        from fmnist.export import OnnxClassifier, onnx_payload

        meta = RunMeta(architecture=Architecture(name=name, config=settings), classes=list(data.CLASS_NAMES))
        classifier = OnnxClassifier.from_bytes(onnx_payload(model, meta))
    except Exception as error:  # an optional column: say why it is missing, keep the torch rows
        return f"not measured: {type(error).__name__}: {error}"
    return {chunk: round(len(images) / best_of_three(partial(classifier.predict_proba, images, batch_size=chunk)))
            for chunk in CHUNKS}


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
        onnx = onnx_speeds(model.to(memory_format=torch.contiguous_format), name, settings, images)
        rows[-1]["onnxruntime_images_per_second"] = onnx
        if isinstance(onnx, dict):
            rows[-1]["onnxruntime_fastest"] = max(onnx, key=onnx.get)
            rows[-1]["onnxruntime_chosen"] = onnx_chunk(rows[-1]["network"])
            print("  onnxruntime: " + "  ".join(f"{c}: {v:,}" for c, v in onnx.items())
                  + f"  (fastest {rows[-1]['onnxruntime_fastest']}, fmnist uses {rows[-1]['onnxruntime_chosen']})")
        else:
            print(f"  onnxruntime: {onnx}")
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H%M%S")
    result = {"date": stamp, "cpu": cpu_name(), "cpu_class": cpu_class(), "precision": "fp32",
              "threads": torch.get_num_threads(),
              "torch": torch.__version__, "python": platform.python_version(), "commit": git_commit(), "rows": rows}
    path = RESULTS / f"inference_chunks-{stamp}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

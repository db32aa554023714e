"""Time-to-accuracy of fmnist's presets: train each preset with several seeds and report, per preset,
the training time at which test accuracy first reached 90..95% (checked at epoch ends), final accuracy with
and without flip TTA, total time (data loading included, interpreter start excluded), peak memory,
and inference throughput / single-image latency.

Each run is a fresh child process, so peak memory (ru_maxrss) is that run's alone. Nothing else should run on
the machine meanwhile: the numbers are wall-clock times.

    .venv/bin/python benchmarks/time_to_accuracy.py --presets fast default --seeds 3
    .venv/bin/python benchmarks/time_to_accuracy.py --presets best --seeds 1

Writes benchmarks/results/time_to_accuracy-<date>.json, benchmarks/results/time_to_accuracy.md (the table the
README links to) and updates src/fmnist/preset_results.json (what `fmnist train --list-presets` shows).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

from _machine import cpu_name

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
THRESHOLDS = (0.90, 0.91, 0.92, 0.93, 0.94, 0.95)

CHILD = r"""
import json, resource, sys, time
import numpy as np, torch
from fmnist import data
from fmnist.train import resolve_config, train
preset, seed = sys.argv[1], int(sys.argv[2])
overrides = json.loads(sys.argv[3])
started = time.perf_counter()  # after interpreter start and imports; data loading counts
arrays = data.load_data()
config = resolve_config(preset, {"seed": seed, "track_test": True, **overrides})
result = train(config, arrays=arrays)
total = time.perf_counter() - started
train_peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # before inference adds its own
model = result.model.eval()
x = data.preprocess(arrays[1][0], *data.normalization(config.normalize == "standard"))
if config.channels_last:
    x = x.contiguous(memory_format=torch.channels_last)
with torch.inference_mode():
    model(x[:1000])  # warm-up
    t = time.perf_counter()
    for start in range(0, len(x), 1000):  # batches of 1000: one batch of 10,000 would need GBs of activations
        model(x[start:start + 1000])
    batch_seconds = time.perf_counter() - t
    latencies = []
    for i in range(300):
        single = x[i:i + 1]
        t = time.perf_counter(); model(single); latencies.append(time.perf_counter() - t)
print(json.dumps({
    "preset": preset, "seed": seed, "history": result.history, "metrics": result.metrics,
    "total_seconds": total, "peak_rss_mib": train_peak_mib, "peak_rss_scope": "training",
    "throughput_images_per_s": len(x) / batch_seconds,
    "latency_ms_p50": float(np.percentile(latencies[50:], 50) * 1000),
    "latency_ms_p99": float(np.percentile(latencies[50:], 99) * 1000),
}))
"""


def machine() -> dict:
    """CPU model, cores, Python and torch versions: the context every number needs."""
    import torch

    return {"cpu": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "torch_threads": torch.get_num_threads(), "platform": platform.platform()}


def run_one(preset: str, seed: int, overrides: dict) -> dict:
    """Train one preset/seed in a fresh interpreter and return its measurements."""
    output = subprocess.run([sys.executable, "-c", CHILD, preset, str(seed), json.dumps(overrides)],
                            check=True, capture_output=True, text=True, cwd=ROOT).stdout
    record = json.loads(output.strip().splitlines()[-1])
    record["time_to"] = {}
    for threshold in THRESHOLDS:
        reached = next((row for row in record["history"] if row["test_accuracy"] >= threshold), None)
        record["time_to"][f"{threshold:.2f}"] = reached["train_seconds"] if reached else None
    return record


def summarise(runs: list[dict]) -> dict:
    """Median and min-max spread over seeds for every reported number."""
    def stats(values):
        values = [v for v in values if v is not None]
        if not values:
            return None
        return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}

    summary = {
        "test_accuracy": stats([r["metrics"]["test_accuracy"] for r in runs]),
        "test_accuracy_tta": stats([r["metrics"].get("test_accuracy_tta") for r in runs]),
        "train_seconds": stats([r["metrics"]["train_seconds"] for r in runs]),
        "total_seconds": stats([r["total_seconds"] for r in runs]),
        "peak_rss_mib": stats([r["peak_rss_mib"] for r in runs]),
        "throughput_images_per_s": stats([r["throughput_images_per_s"] for r in runs]),
        "latency_ms_p50": stats([r["latency_ms_p50"] for r in runs]),
        "epochs": runs[0]["metrics"]["epochs_run"], "parameters": runs[0]["metrics"]["parameters"],
        "precision": runs[0]["metrics"].get("precision"),
        "peak_rss_scope": runs[0].get("peak_rss_scope", "training + one 10,000-image inference batch"),
        "time_to": {},
    }
    for key in runs[0]["time_to"]:
        summary["time_to"][key] = stats([r["time_to"][key] for r in runs])
        if summary["time_to"][key] is not None:
            summary["time_to"][key]["reached"] = f"{summary['time_to'][key]['n']}/{len(runs)}"
    return summary


def markdown(result: dict) -> str:
    """The table the README links to (one row per preset, each from its latest measurement)."""
    lines = [
        "# Time to accuracy",
        "",
        "Written by `benchmarks/time_to_accuracy.py`; the raw runs are in the dated JSON files beside this one.",
        "Median over seeds (min-max in brackets). Time-to-X is training seconds until the test accuracy, checked",
        "at each epoch end, first reached X (data loading and the per-epoch test check excluded); `-` = not reached.",
        "Total = data loading + training + the per-epoch test checks + final evaluation, in one process,",
        "interpreter start and imports excluded. Peak RSS is the training process's maximum resident memory,",
        "read before the inference measurements. Inference: eval mode, `torch.inference_mode()`, fp32,",
        "10,000 test images in batches of 1,000 (img/s) and the median latency of one image at a time.",
        "",
        "| preset | seeds | epochs | params | precision | " + " | ".join(f"to {t:.0%}" for t in THRESHOLDS)
        + " | test acc | test acc (flip TTA) | train s | total s | peak RSS MiB | infer img/s | latency ms |",
        "|---" * (5 + len(THRESHOLDS) + 7) + "|",
    ]

    def fmt(stat, spec="{:.1f}", spread=True):
        if stat is None:
            return "-"
        text = spec.format(stat["median"])
        if spread and stat["n"] > 1:
            text += f" ({spec.format(stat['min'])}-{spec.format(stat['max'])})"
        return text

    for preset, s in result["presets"].items():
        cells = [preset, str(s["test_accuracy"]["n"]), str(s["epochs"]), f"{s['parameters']:,}", str(s["precision"])]
        for threshold in THRESHOLDS:
            stat = s["time_to"][f"{threshold:.2f}"]
            cells.append("-" if stat is None else fmt(stat, "{:.0f}", False) + f" s [{stat['reached']}]")
        cells += [fmt(s["test_accuracy"], "{:.2%}"), fmt(s["test_accuracy_tta"], "{:.2%}"),
                  fmt(s["train_seconds"], "{:.0f}"), fmt(s["total_seconds"], "{:.0f}", False),
                  fmt(s["peak_rss_mib"], "{:.0f}", False) + ("" if s.get("peak_rss_scope") == "training" else " *"),
                  fmt(s["throughput_images_per_s"], "{:,.0f}", False),
                  fmt(s["latency_ms_p50"], "{:.2f}", False)]
        lines.append("| " + " | ".join(cells) + " |")
    if any(s.get("peak_rss_scope") != "training" for s in result["presets"].values()):
        lines += ["", "\\* run made by the first version of this script, which read peak RSS after pushing all",
                  "10,000 test images through the model in one batch (that batch's activations, not training, set",
                  "the peak) and timed inference (img/s) as that one batch."]
    lines += ["", "Where each row was measured:", ""]
    for preset, s in result["presets"].items():
        m = s["machine"]
        lines.append(f"- {preset}: {s['date']}, {m['cpu']} ({m['cores']} cores), torch {m['torch']} "
                     f"({m['torch_threads']} threads), Python {m['python']}: `{s['command']}`")
    return "\n".join(lines) + "\n"


def update_preset_results(result: dict) -> None:
    """Merge this run's medians into the package file that `fmnist train --list-presets` reads."""
    path = ROOT / "src" / "fmnist" / "preset_results.json"
    try:
        current = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        current = {"presets": {}}
    for preset, s in result["presets"].items():
        current["presets"][preset] = {"test_accuracy": s["test_accuracy"]["median"],
                                      "train_seconds": s["train_seconds"]["median"], "seeds": s["test_accuracy"]["n"],
                                      "measured": result["date"], "cpu": result["machine"]["cpu"]}
    path.write_text(json.dumps(current, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["fast", "default"], help="presets to train")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per preset (0..N-1)")
    parser.add_argument("--set", default="{}", help="JSON overrides for every run (e.g. for a quick smoke test)")
    parser.add_argument("--tag", default="", help="suffix of the result file name")
    args = parser.parse_args()
    overrides = json.loads(args.set)
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H%M")  # one file per invocation, never overwritten
    result = {"date": date, "machine": machine(), "command": "python benchmarks/time_to_accuracy.py "
              + " ".join(sys.argv[1:]), "presets": {}, "runs": []}
    for preset in args.presets:
        runs = []
        for seed in range(args.seeds):
            record = run_one(preset, seed, overrides)
            runs.append(record)
            print(f"{preset} seed {seed}: test {record['metrics']['test_accuracy']:.4f} "
                  f"(TTA {record['metrics'].get('test_accuracy_tta', float('nan')):.4f}) in "
                  f"{record['metrics']['train_seconds']:.1f} s training, {record['total_seconds']:.1f} s total, "
                  f"time to accuracy: {record['time_to']}", flush=True)
        result["presets"][preset] = {**summarise(runs), "machine": result["machine"], "date": date,
                                     "command": result["command"]}
        result["runs"] += runs
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = f"time_to_accuracy-{stamp}{('-' + args.tag) if args.tag else ''}"
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))
    if overrides:
        return  # a smoke run with overrides is not a preset's result
    merged_path = RESULTS / "time_to_accuracy.json"
    merged = json.loads(merged_path.read_text()) if merged_path.exists() else {"presets": {}}
    merged["presets"].update(result["presets"])
    merged_path.write_text(json.dumps(merged, indent=2) + "\n")
    (RESULTS / "time_to_accuracy.md").write_text(markdown(merged))
    update_preset_results(result)


if __name__ == "__main__":
    main()

"""fmnist side by side with the classic Keras programs: the same networks, settings and data, timed the same way.

Each pair is one Keras peer from benchmarks/peers/ and the fmnist preset it matches exactly:

    mlp        keras_mlp.py        classic-adam       (TensorFlow tutorial: Dense 128, Adam, batch 32, 10 epochs)
    sgd        keras_sgd.py        classic-sgd        (Géron: Dense 300 -> 100, SGD 0.01, 30 epochs, 5,000 validation)
    earlystop  keras_earlystop.py  classic-earlystop  (Dense 128, Adam, stop once training accuracy reaches 95%)
    cnn        keras_cnn.py        keras-cnn          (Conv32-pool-Conv64-pool-Dense128, Adam, batch 32, 10 epochs)

Runs alternate (peer, fmnist, peer, fmnist, ...) over `--reps` repetitions, and every run is a fresh child
process, so wall time includes interpreter and library start-up and peak memory (ru_maxrss) is that run's alone.
With the cnn pair, fmnist's `fast` preset also trains with per-epoch test tracking, to report when it first
reached the Keras CNN's final accuracy. Nothing else should run on the machine meanwhile: these are wall times.

    .venv/bin/python benchmarks/compare.py                          # every pair, 3 repetitions (see the README)
    .venv/bin/python benchmarks/compare.py --pairs mlp cnn --reps 5
    .venv/bin/python benchmarks/compare.py --tiny                   # 2,000 images, 1 epoch, 1 rep: a smoke test
    .venv/bin/python benchmarks/compare.py --cpu-class avx2         # both sides limited to AVX2 (a laptop's class)
    .venv/bin/python benchmarks/compare.py --pairs cnn --bf16       # Keras mixed_bfloat16 vs fmnist bf16

Writes benchmarks/results/compare-<YYYY-MM-DDTHHMM>.json (raw runs, summary, machine) and
benchmarks/results/compare.md (the table; compare-avx2.md etc. under --cpu-class), and prints the table. `--tiny`
writes to a temporary folder (or `--out DIR`) and never over the real results.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from _machine import cpu_name, git_commit
from time_to_accuracy import CPU_CLASSES, class_env, class_mismatch, parse_isa_line, probe_cpu_class

ROOT = Path(__file__).resolve().parent.parent
PEERS = ROOT / "benchmarks" / "peers"
RESULTS = ROOT / "benchmarks" / "results"

PAIRS: dict[str, tuple[str, str]] = {  # name: (peer program, fmnist preset)
    "mlp": ("keras_mlp", "classic-adam"),
    "sgd": ("keras_sgd", "classic-sgd"),
    "earlystop": ("keras_earlystop", "classic-earlystop"),
    "cnn": ("keras_cnn", "keras-cnn"),
}
TINY = {"train_subset": 2000, "test_subset": 1000, "epochs": 1}
# Keras: model.predict(x_test, batch_size=1000) (and its default batch of 32, reported too); fmnist: the plain call
# Classifier.predict_proba(x_test), which feeds the model in chunks of its own choosing (evaluate.inference_chunk).
PREDICT_BATCH = 1000
LATENCY_CALLS = 50
ACCURACY_TOLERANCE = 0.005  # "equal accuracy": medians within half a percentage point
TARGETS = (  # (pair, what, metric, minimum fmnist speed-up)
    ("mlp", "Dense 128 MLP trains >= 4x faster per epoch than Keras", "epoch_seconds", 4.0),
    ("sgd", "Dense 300-100 MLP with plain SGD (Géron) trains >= 4x faster per epoch than Keras", "epoch_seconds", 4.0),
    ("cnn", "Keras CNN architecture trains >= 2x faster per epoch than Keras", "epoch_seconds", 2.0),
)
INFERENCE_TARGET = 3.0  # batch inference >= 3x faster than Keras model.predict (same batch size)


# ----------------------------------------------------------------------------------------------- the fmnist child
def fmnist_child(preset: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """Train `preset` through fmnist's Python API in this (fresh) process and measure what the peers measure."""
    import numpy as np
    import torch

    from fmnist import data, evaluate, events
    from fmnist.hardware import peak_rss_mib
    from fmnist.predict import Classifier
    from fmnist.training import resolve_config, train, write_run

    def peak() -> float:
        return peak_rss_mib()

    def median_ms(function) -> float:
        function()  # warm-up
        times = []
        for _ in range(LATENCY_CALLS):
            started = time.perf_counter()
            function()
            times.append(time.perf_counter() - started)
        return statistics.median(times) * 1000

    arrays = data.load_data()
    config = resolve_config(preset, overrides)
    epochs: list[float] = []
    clock = {"epoch": 0.0, "last_end": 0.0, "train_size": None}

    def progress(event: events.Event) -> None:  # epoch wall time includes the validation pass, as in Keras
        if isinstance(event, events.Start):
            clock["train_size"] = event.train_size
        elif isinstance(event, events.EpochStart):
            clock["epoch"] = time.perf_counter()
        elif isinstance(event, events.EpochEnd):
            clock["last_end"] = time.perf_counter()
            epochs.append(clock["last_end"] - clock["epoch"])

    started = time.perf_counter()
    result = train(config, arrays=arrays, progress=progress)
    fit_seconds = clock["last_end"] - started  # tensors, model, epochs; not the final metrics and calibration
    peak_fit = peak()

    (x_test, y_test) = arrays[1]
    if config.test_subset:
        x_test, y_test = x_test[:config.test_subset], y_test[:config.test_subset]
    x = data.preprocess(x_test, *data.normalization(config.normalize == "standard"), config.channels_last)
    y = torch.from_numpy(y_test.astype(np.int64))
    started = time.perf_counter()
    test_loss, test_accuracy = evaluate.loss_and_accuracy(result.model, x, y)
    evaluate_seconds = time.perf_counter() - started
    evaluated_at = time.time()

    with tempfile.TemporaryDirectory(prefix="fmnist-compare-") as run_dir:
        write_run(Path(run_dir), result.model, config, result.history, result.metrics)
        classifier = Classifier.load(run_dir)
        classifier.predict_proba(x_test[:PREDICT_BATCH])  # warm-up
        started = time.perf_counter()
        classifier.predict_proba(x_test)
        batch_seconds = time.perf_counter() - started
        one = x_test[:1]
        one_tensor = classifier.prepare(one)
        with torch.inference_mode():
            latency_call = median_ms(lambda: classifier.model(one_tensor))
        record: dict[str, Any] = {
            "side": "fmnist", "program": f"fmnist {preset}", "preset": preset, "overrides": overrides,
            "config": {"description": config.description, "epochs": config.epochs, "batch_size": config.batch_size,
                       "validation": config.validation, "precision": result.metrics.get("precision"),
                       "train_size": clock["train_size"]},
            "epochs_run": len(result.history), "epoch_seconds": epochs, "fit_seconds": fit_seconds,
            "history": result.history, "train_accuracy": result.history[-1]["accuracy"] if result.history else None,
            "val_accuracy": result.metrics.get("val_accuracy"), "stop_reason": result.metrics.get("stop_reason"),
            "test_accuracy": test_accuracy, "test_loss": test_loss, "evaluate_seconds": evaluate_seconds,
            "test_accuracy_tta": result.metrics.get("test_accuracy_tta"), "test_size": len(y_test),
            "evaluated_at": evaluated_at,
            "predict_batch_size": "predict_proba default", "batch_predict_seconds": batch_seconds,
            "batch_images_per_s": len(x_test) / batch_seconds,
            "latency_predict_ms": median_ms(lambda: classifier.predict_proba(one)),
            "latency_call_ms": latency_call, "latency_calls": LATENCY_CALLS,
            "peak_rss_mib_fit": peak_fit,
            "versions": {"torch": torch.__version__, "threads": torch.get_num_threads()},
        }
        record["peak_rss_mib"] = peak()  # before onnxruntime is loaded: the ONNX figures are extra
        record["onnx"] = onnx_measurements(run_dir, x_test, median_ms)
    return record


def onnx_measurements(run_dir: str, x_test, median_ms) -> dict[str, Any]:
    """The same inference measurements through `fmnist.export` + onnxruntime, or why they are missing."""
    try:
        from fmnist.export import OnnxClassifier, export_onnx
    except ImportError as error:
        return {"available": False, "note": f"fmnist.export is not available ({error})"}
    try:
        started = time.perf_counter()
        path = export_onnx(run_dir)
        export_seconds = time.perf_counter() - started
        classifier = OnnxClassifier.load(path)
        classifier.predict_proba(x_test[:PREDICT_BATCH])  # warm-up
        started = time.perf_counter()
        classifier.predict_proba(x_test)
        batch_seconds = time.perf_counter() - started
        one = x_test[:1]
        return {"available": True, "export_seconds": export_seconds, "batch_predict_seconds": batch_seconds,
                "batch_images_per_s": len(x_test) / batch_seconds, "predict_batch_size": "predict_proba default",
                "latency_predict_ms": median_ms(lambda: classifier.predict_proba(one))}
    except Exception as error:  # an optional column: a failure here must not lose the run's other numbers
        return {"available": False, "note": f"ONNX export/inference failed: {type(error).__name__}: {error}"}


# ----------------------------------------------------------------------------------------------- running children
def child_env(cpu_class: str = "native") -> dict[str, str]:
    """The environment of every child: TensorFlow's C++ logging quiet, the TensorFlow Keras backend, and the CPU
    class's limits (`time_to_accuracy.class_env`: oneDNN's ISA, for avx2 ATen's too) on both sides."""
    return {**class_env(cpu_class, os.environ), "TF_CPP_MIN_LOG_LEVEL": "2", "KERAS_BACKEND": "tensorflow",
            "PYTHONHASHSEED": "0"}


def checked_emulation(cpu_class: str) -> dict[str, Any] | None:
    """For an emulated CPU class, what a torch child sees under it (oneDNN's ISA line, ATen's capability);
    exit with one line when the limit does not take effect. TensorFlow's bundled oneDNN reads the same variable."""
    if cpu_class == "native":
        return None
    probe = probe_cpu_class(cpu_class)
    mismatch = class_mismatch(cpu_class, probe)
    if mismatch:
        sys.exit(f"compare: {mismatch}")
    tensorflow_isa = tensorflow_onednn_isa(cpu_class)
    if tensorflow_isa != probe["onednn_isa"]:
        sys.exit(f"compare: --cpu-class {cpu_class}: TensorFlow's oneDNN uses {tensorflow_isa!r}, torch's "
                 f"{probe['onednn_isa']!r}; the sides would not run the same class")
    return {"requested": cpu_class, "environment": CPU_CLASSES[cpu_class], "onednn_isa": probe["onednn_isa"],
            "tensorflow_onednn_isa": tensorflow_isa, "cpu_class": probe["cpu_class"],
            "aten_cpu_capability": probe["aten_cpu_capability"]}


TF_PROBE = ("import numpy as np, keras; m = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Conv2D(32, 3), "
            "keras.layers.Flatten(), keras.layers.Dense(10)]); m.predict(np.zeros((64, 28, 28, 1), 'float32'), "
            "verbose=0)")


def tensorflow_onednn_isa(cpu_class: str) -> str | None:
    """The ISA TensorFlow's bundled oneDNN names under this class's limits (ONEDNN_VERBOSE=1), or None."""
    env = {**child_env(cpu_class), "ONEDNN_VERBOSE": "1"}
    completed = subprocess.run([sys.executable, "-c", TF_PROBE], capture_output=True, text=True, env=env)
    found = parse_isa_line(completed.stdout + completed.stderr)
    return found[1] if found else None


def run_child(command: list[str], label: str, cpu_class: str = "native") -> dict[str, Any]:
    """Run one measurement in a fresh interpreter; its last stdout line is the JSON record."""
    launched_at, started = time.time(), time.perf_counter()
    completed = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=child_env(cpu_class))
    wall = time.perf_counter() - started
    if completed.returncode != 0:
        tail = "\n".join((completed.stderr or completed.stdout).strip().splitlines()[-15:])
        raise RuntimeError(f"{label} failed (exit {completed.returncode}):\n{tail}")
    record = json.loads(completed.stdout.strip().splitlines()[-1])
    record["wall_seconds"] = wall
    # Process launch until the model was trained and evaluated: start-up, imports, data, training, evaluation.
    evaluated_at = record.get("evaluated_at")
    record["wall_to_result_seconds"] = (evaluated_at - launched_at) if evaluated_at else None
    return record


def peer_command(peer: str, tiny: bool, bf16: bool = False) -> list[str]:
    command = [sys.executable, str(PEERS / f"{peer}.py"), "--json"] + (["--mixed-bfloat16"] if bf16 else [])
    if tiny:
        command += ["--epochs", str(TINY["epochs"]), "--train-subset", str(TINY["train_subset"]),
                    "--test-subset", str(TINY["test_subset"])]
    return command


def fmnist_overrides(preset: str, rep: int, tiny: bool, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The preset unchanged (seed = repetition), or its tiny version with the peers' tiny validation split."""
    if str(PEERS) not in sys.path:
        sys.path.insert(0, str(PEERS))
    from _common import validation_size  # the rule the peers use, so a tiny sgd pair still matches

    from fmnist.training import PRESETS

    overrides: dict[str, Any] = {"seed": rep, **(extra or {})}
    if tiny:
        overrides.update(TINY)
        if PRESETS[preset].get("validation"):
            overrides["validation"] = validation_size(TINY["train_subset"])
    return overrides


def fmnist_command(preset: str, overrides: dict[str, Any]) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--fmnist-child", preset, "--overrides",
            json.dumps(overrides)]


# ----------------------------------------------------------------------------------------------- summary
def stats(values: list[float | None]) -> dict[str, float] | None:
    """Median, min, max and count of the values that exist."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def side_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Every reported number of one side of a pair, over its repetitions."""
    onnx = [r.get("onnx") or {} for r in runs]
    return {
        "runs": len(runs),
        "epoch_seconds": stats([statistics.median(r["epoch_seconds"]) if r["epoch_seconds"] else None
                                for r in runs]),
        "first_epoch_seconds": stats([r["epoch_seconds"][0] if r["epoch_seconds"] else None for r in runs]),
        "epochs_run": stats([r["epochs_run"] for r in runs]),
        "fit_seconds": stats([r["fit_seconds"] for r in runs]),
        "wall_to_result_seconds": stats([r["wall_to_result_seconds"] for r in runs]),
        "wall_seconds": stats([r["wall_seconds"] for r in runs]),
        "test_accuracy": stats([r["test_accuracy"] for r in runs]),
        "evaluate_seconds": stats([r["evaluate_seconds"] for r in runs]),
        "peak_rss_mib": stats([r["peak_rss_mib"] for r in runs]),
        "batch_images_per_s": stats([r["batch_images_per_s"] for r in runs]),
        "default_batch_images_per_s": stats([r.get("default_batch_images_per_s") for r in runs]),
        "latency_predict_ms": stats([r["latency_predict_ms"] for r in runs]),
        "latency_call_ms": stats([r["latency_call_ms"] for r in runs]),
        "onnx_batch_images_per_s": stats([o.get("batch_images_per_s") for o in onnx]),
        "onnx_latency_ms": stats([o.get("latency_predict_ms") for o in onnx]),
        "onnx_notes": sorted({o["note"] for o in onnx if o.get("note")}),
    }


def ratio(numerator: dict | None, denominator: dict | None) -> float | None:
    if not numerator or not denominator or not denominator["median"]:
        return None
    return numerator["median"] / denominator["median"]


def pair_summary(keras: dict[str, Any], fm: dict[str, Any]) -> dict[str, Any]:
    """Ratios of medians, each oriented so that > 1 means fmnist is better (faster / more throughput)."""
    accuracy = (fm["test_accuracy"]["median"] - keras["test_accuracy"]["median"]
                if fm["test_accuracy"] and keras["test_accuracy"] else None)
    return {
        "epoch_speedup": ratio(keras["epoch_seconds"], fm["epoch_seconds"]),
        "fit_speedup": ratio(keras["fit_seconds"], fm["fit_seconds"]),
        "wall_to_result_speedup": ratio(keras["wall_to_result_seconds"], fm["wall_to_result_seconds"]),
        "accuracy_difference": accuracy,  # fmnist minus Keras, as a fraction (0.005 = half a point)
        "equal_accuracy": accuracy is not None and abs(accuracy) <= ACCURACY_TOLERANCE,
        "memory_ratio": ratio(fm["peak_rss_mib"], keras["peak_rss_mib"]),  # fmnist / Keras: < 1 = less memory
        "batch_speedup": ratio(fm["batch_images_per_s"], keras["batch_images_per_s"]),
        "batch_speedup_vs_keras_default": ratio(fm["batch_images_per_s"], keras["default_batch_images_per_s"]),
        "latency_predict_speedup": ratio(keras["latency_predict_ms"], fm["latency_predict_ms"]),
        "latency_call_speedup": ratio(keras["latency_call_ms"], fm["latency_call_ms"]),
        "onnx_batch_speedup": ratio(fm["onnx_batch_images_per_s"], keras["batch_images_per_s"]),
        "onnx_latency_speedup": ratio(keras["latency_predict_ms"], fm["onnx_latency_ms"]),
    }


def evaluate_targets(pairs: dict[str, Any], tiny: bool) -> list[dict[str, Any]]:
    """Each target as met / missed / not measured, with the numbers that decided it."""
    targets = []
    for pair, what, _metric, minimum in TARGETS:
        entry: dict[str, Any] = {"target": what, "pair": pair, "minimum_speedup": minimum}
        if pair not in pairs:
            entry.update(status="not measured", detail=f"pair {pair} not run")
        else:
            ratios = pairs[pair]["ratios"]
            speedup, difference = ratios["epoch_speedup"], ratios["accuracy_difference"]
            met = speedup is not None and speedup >= minimum and ratios["equal_accuracy"]
            entry.update(status="met" if met else "missed", speedup=speedup, accuracy_difference=difference,
                         detail=f"{speedup:.2f}x per epoch, accuracy {100 * difference:+.2f} points")
        targets.append(entry)
    measured = {name: p["ratios"]["batch_speedup"] for name, p in pairs.items()}
    onnx = {name: p["ratios"]["onnx_batch_speedup"] for name, p in pairs.items()}
    entry = {"target": f"batch inference >= {INFERENCE_TARGET:g}x faster than Keras model.predict (batch_size="
                       f"{PREDICT_BATCH}, 10,000 test images, every pair), by fmnist's faster inference path: "
                       "torch `Classifier` or onnxruntime `OnnxClassifier`",
             "pair": "all", "minimum_speedup": INFERENCE_TARGET, "speedups": measured, "onnx_speedups": onnx}
    if not measured:
        entry.update(status="not measured", detail="no pair run")
    else:
        best = {name: max((v for v in (measured[name], onnx[name]) if v is not None), default=None)
                for name in measured}
        met = all(v is not None and v >= INFERENCE_TARGET for v in best.values())
        entry.update(status="met" if met else "missed", detail=", ".join(
            f"{name} {faster_path(measured[name])} Classifier, {faster_path(onnx[name])} OnnxClassifier"
            for name in measured))
    targets.append(entry)
    if tiny:
        for entry in targets:
            entry["status"] += " (tiny run: not meaningful)"
    return targets


def faster_path(speedup: float | None) -> str:
    return "-" if speedup is None else f"{speedup:.2f}x"


def fast_summary(fast_runs: list[dict[str, Any]], keras_cnn: dict[str, Any] | None) -> dict[str, Any] | None:
    """When fmnist's `fast` preset first reached the Keras CNN's final (median) test accuracy."""
    if not fast_runs or not keras_cnn or not keras_cnn["test_accuracy"]:
        return None
    goal = keras_cnn["test_accuracy"]["median"]
    reached = []
    for run in fast_runs:
        row = next((r for r in run["history"] if r.get("test_accuracy", 0) >= goal), None)
        reached.append({"epoch": row["epoch"], "train_seconds": row["train_seconds"]} if row else None)
    times = stats([r["train_seconds"] if r else None for r in reached])
    keras_fit = keras_cnn["fit_seconds"]
    return {
        "goal_accuracy": goal, "reached": reached, "reached_runs": f"{sum(r is not None for r in reached)}/"
                                                                   f"{len(reached)}",
        "train_seconds_to_goal": times, "keras_cnn_fit_seconds": keras_fit,
        "speedup_to_goal": ratio(keras_fit, times),
        "final": side_summary(fast_runs),
        "final_test_accuracy_tta": stats([r.get("test_accuracy_tta") for r in fast_runs]),
        "train_seconds": stats([r["history"][-1]["train_seconds"] if r["history"] else None for r in fast_runs]),
        "precision": fast_runs[0]["config"].get("precision"),
    }


# ----------------------------------------------------------------------------------------------- report
def machine() -> dict[str, Any]:
    """CPU model, cores, library versions and load: the context every number needs."""
    cpu = cpu_name()

    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    from fmnist.devices import cpu_class

    return {"cpu": cpu, "cpu_class": cpu_class(), "commit": git_commit(), "cores": os.cpu_count(),
            "python": platform.python_version(), "platform": platform.platform(),
            "torch": version("torch"), "tensorflow": version("tensorflow-cpu") or version("tensorflow"),
            "keras": version("keras"), "onnxruntime": version("onnxruntime"),
            "load_average_at_start": os.getloadavg()}


def fmt(stat: dict | None, spec: str = "{:.2f}") -> str:
    """`median (min-max)`, or `-`."""
    if not stat:
        return "-"
    text = spec.format(stat["median"])
    if stat["n"] > 1:
        text += f" ({spec.format(stat['min'])}-{spec.format(stat['max'])})"
    return text


def faster(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}x faster" if value >= 1 else f"{1 / value:.2f}x slower"


def extra_precision(bf16: bool) -> dict[str, Any]:
    return {"precision": "bf16"} if bf16 else {}


def precision_text(result: dict[str, Any]) -> str:
    if result.get("precision") == "bf16":
        return "bf16 on both sides: Keras' mixed_bfloat16 policy (bf16 compute, fp32 variables) and fmnist's bf16"
    return "fp32 on both sides"


def class_text(result: dict[str, Any]) -> str:
    """The CPU class the numbers are for: the machine's, or the emulated one with how it was limited."""
    emulation = result.get("emulation")
    if not emulation:
        return result["machine"].get("cpu_class", "unknown")
    limits = " ".join(f"{name}={value}" for name, value in emulation["environment"].items())
    return (f"{emulation['cpu_class']}, emulated on an {result['machine'].get('cpu_class')} CPU with {limits} in "
            f"both sides' children; torch's and TensorFlow's oneDNN both said `isa:{emulation['onednn_isa']}` "
            "under it; TensorFlow's own Eigen kernels are not limited by it)")


def markdown(result: dict[str, Any]) -> str:
    """The side-by-side table, the targets and the fast-preset comparison."""
    from fmnist.evaluate import CONV_CHUNK, DENSE_CHUNK
    from fmnist.export import ONNX_CONV_CHUNK, ONNX_DENSE_CHUNK

    m = result["machine"]
    lines = ["# fmnist side by side with Keras", ""]
    if result["tiny"]:
        lines += ["**TINY SMOKE RUN** (2,000 training images, 1,000 test images, 1 epoch, 1 repetition): "
                  "checks that everything runs; the numbers mean nothing.", ""]
    lines += [
        f"Written by `benchmarks/compare.py` on {result['date']}: `{result['command']}`; raw runs in "
        f"`{result['json_name']}`.",
        f"Commit {m.get('commit', 'unknown')}. Machine: {m['cpu']} (CPU class {class_text(result)}, "
        f"{precision_text(result)}), {m['cores']} cores, Python {m['python']}, torch {m['torch']}, "
        f"TensorFlow {m['tensorflow']}, Keras {m['keras']}, onnxruntime {m['onnxruntime']}; load average at start "
        + ", ".join(f"{v:.2f}" for v in m["load_average_at_start"]) + ".",
        "",
        f"Median of {result['reps']} repetition(s), (min-max) when more than one; peer and fmnist runs alternate, each",
        "in a fresh process. The last column is fmnist against Keras (\"faster\" = less time or more images/s).",
        "",
        "| pair | metric | Keras peer | fmnist | fmnist vs Keras |",
        "|---|---|---|---|---|",
    ]
    for name, pair in result["pairs"].items():
        k, f, r = pair["keras"], pair["fmnist"], pair["ratios"]
        label = f"{name}: `{pair['peer']}.py` vs `{pair['preset']}`"
        difference = r["accuracy_difference"]
        memory = r["memory_ratio"]
        rows = [
            ("time per epoch, s (median epoch)", fmt(k["epoch_seconds"]), fmt(f["epoch_seconds"]),
             faster(r["epoch_speedup"])),
            ("epochs run", fmt(k["epochs_run"], "{:.0f}"), fmt(f["epochs_run"], "{:.0f}"), ""),
            ("fit, s", fmt(k["fit_seconds"], "{:.1f}"), fmt(f["fit_seconds"], "{:.1f}"), faster(r["fit_speedup"])),
            ("wall incl. start-up until evaluated, s", fmt(k["wall_to_result_seconds"], "{:.1f}"),
             fmt(f["wall_to_result_seconds"], "{:.1f}"), faster(r["wall_to_result_speedup"])),
            ("evaluate the test set, s (Keras batch 32, fmnist 1000)", fmt(k["evaluate_seconds"], "{:.3f}"),
             fmt(f["evaluate_seconds"], "{:.3f}"), faster(ratio(k["evaluate_seconds"], f["evaluate_seconds"]))),
            ("test accuracy", fmt(k["test_accuracy"], "{:.2%}"), fmt(f["test_accuracy"], "{:.2%}"),
             "-" if difference is None else f"{100 * difference:+.2f} points"),
            ("peak memory, MiB", fmt(k["peak_rss_mib"], "{:.0f}"), fmt(f["peak_rss_mib"], "{:.0f}"),
             "-" if memory is None else f"{memory:.2f}x the memory"),
            (f"batch inference, images/s (Keras batch {PREDICT_BATCH})", fmt(k["batch_images_per_s"], "{:,.0f}"),
             fmt(f["batch_images_per_s"], "{:,.0f}"), faster(r["batch_speedup"])),
            ("batch inference, images/s (each library's default: Keras batch 32, fmnist "
             f"{CONV_CHUNK} conv, {DENSE_CHUNK} dense)",
             fmt(k["default_batch_images_per_s"], "{:,.0f}"), fmt(f["batch_images_per_s"], "{:,.0f}"),
             faster(r["batch_speedup_vs_keras_default"])),
            ("one image, ms: `model.predict` vs `Classifier.predict_proba`", fmt(k["latency_predict_ms"]),
             fmt(f["latency_predict_ms"]), faster(r["latency_predict_speedup"])),
            ("one image, ms: `model(x, training=False)` vs torch `model(x)`", fmt(k["latency_call_ms"]),
             fmt(f["latency_call_ms"]), faster(r["latency_call_speedup"])),
            (f"onnxruntime batch inference, images/s (`OnnxClassifier`, its default chunks) vs Keras batch "
             f"{PREDICT_BATCH}",
             fmt(k["batch_images_per_s"], "{:,.0f}"), fmt(f["onnx_batch_images_per_s"], "{:,.0f}"),
             faster(r["onnx_batch_speedup"])),
            ("onnxruntime one image, ms, vs `model.predict`", fmt(k["latency_predict_ms"]), fmt(f["onnx_latency_ms"]),
             faster(r["onnx_latency_speedup"])),
        ]
        for i, (metric, keras_cell, fmnist_cell, versus) in enumerate(rows):
            lines.append(f"| {label if i == 0 else ''} | {metric} | {keras_cell} | {fmnist_cell} | {versus} |")
    notes = sorted({note for pair in result["pairs"].values() for note in pair["fmnist"]["onnx_notes"]})
    lines += ["", "## Targets (same configuration, accuracy within 0.5 points)", ""]
    for target in result["targets"]:
        lines.append(f"- **{target['status']}**: {target['target']} — {target['detail']}")
    fast = result.get("fast")
    if fast:
        t = fast["train_seconds_to_goal"]
        lines += [
            "", "## fmnist `fast` vs the best peer (`keras_cnn.py`)", "",
            f"The Keras CNN reached {fast['goal_accuracy']:.2%} test accuracy (median) after "
            f"{fmt(fast['keras_cnn_fit_seconds'], '{:.1f}')} s of `model.fit`. fmnist's `fast` preset "
            f"({fast['precision']}), with the test set checked after every epoch, "
            + (f"first reached it after {fmt(t, '{:.1f}')} s of training ({fast['reached_runs']} runs reached it): "
               f"{faster(fast['speedup_to_goal'])}." if t else f"did not reach it ({fast['reached_runs']} runs)."),
            f"Its final test accuracy: {fmt(fast['final']['test_accuracy'], '{:.2%}')} "
            f"({fmt(fast['final_test_accuracy_tta'], '{:.2%}')} with flip TTA) after "
            f"{fmt(fast['train_seconds'], '{:.1f}')} s of training, "
            f"{fmt(fast['final']['wall_to_result_seconds'], '{:.1f}')} s wall incl. start-up; peak memory "
            f"{fmt(fast['final']['peak_rss_mib'], '{:.0f}')} MiB.",
        ]
    lines += [
        "", "## What is timed", "",
        "- Time per epoch: Keras, a callback reading `time.perf_counter()` at epoch begin and end; fmnist, the "
        "`epoch_start`/`epoch_end` progress events. Both include the epoch's validation pass (sgd pair). The median "
        "epoch is reported (Keras traces its graph in the first epoch; the first epoch is in the JSON).",
        "- Fit: the `model.fit` call; fmnist, from calling `train()` to the last epoch's end (tensors, model, epochs).",
        "- Wall until evaluated: from launching the child process to the end of evaluating the test set: "
        "interpreter start, imports, data loading, training and evaluation.",
        "- Test accuracy: `model.evaluate` (Keras, its default batch of 32) vs `fmnist.evaluate.loss_and_accuracy`.",
        "- Peak memory: ru_maxrss of the child at the end of its measurements, onnxruntime excluded.",
        f"- Batch inference: all 10,000 test images after one warm-up batch: `model.predict(x, batch_size="
        f"{PREDICT_BATCH})` on the x/255 arrays vs `Classifier.predict_proba(uint8 images)` (its default chunks of "
        f"{CONV_CHUNK} images for conv nets, {DENSE_CHUNK} for dense nets; scaling and softmax included), and the "
        f"same through `fmnist export` and `OnnxClassifier.predict_proba` (chunks of {ONNX_CONV_CHUNK} / "
        f"{ONNX_DENSE_CHUNK}); Keras also with its default `model.predict(x)` (batch 32).",
        f"- One image: median of {LATENCY_CALLS} calls after a warm-up, on `x_test[:1]`.",
        "- Data: `fmnist.load_data()` on both sides (the same bytes as `keras.datasets.fashion_mnist.load_data()`, "
        "which downloads). Keras runs are unseeded, as in the tutorials; fmnist uses seed = repetition.",
        "- The dense peers scale pixels with `x / 255.0` as the tutorials and Géron do, which makes float64 arrays "
        "(Keras casts each batch to float32); that is part of their peak memory. The CNN peer uses float32.",
    ]
    if notes:
        lines += ["", "ONNX: " + "; ".join(notes)]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------- main
def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", nargs="+", choices=list(PAIRS), default=list(PAIRS), help="pairs to run")
    parser.add_argument("--reps", type=int, default=None, help="repetitions of every run (default 3; tiny: 1)")
    parser.add_argument("--tiny", action="store_true",
                        help="2,000 training / 1,000 test images, 1 epoch, 1 repetition: a smoke test")
    parser.add_argument("--no-fast", action="store_true", help="skip fmnist's fast preset vs the Keras CNN")
    parser.add_argument("--out", type=Path, help="folder for the JSON and markdown (default benchmarks/results; "
                                                 "with --tiny a new temporary folder)")
    parser.add_argument("--cpu-class", choices=list(CPU_CLASSES), default="native",
                        help="limit both sides' oneDNN (and for avx2 torch's ATen) to that instruction set, checked "
                             "first; results go to compare-<class>.md")
    parser.add_argument("--bf16", action="store_true",
                        help="bf16 on both sides: Keras' mixed_bfloat16 policy against fmnist's precision bf16 (a "
                             "separate comparison from the fp32 one); results to compare-bf16.md")
    parser.add_argument("--fmnist-child", metavar="PRESET", help=argparse.SUPPRESS)
    parser.add_argument("--overrides", default="{}", help=argparse.SUPPRESS)
    return parser.parse_args()


def run_repetitions(args: argparse.Namespace, reps: int, result: dict[str, Any]
                    ) -> tuple[dict[str, dict[str, list]], list[dict[str, Any]]]:
    """Every pair's peer and fmnist runs, alternating, `reps` times (plus `fast` after each repetition when
    asked); each record is also appended to result["runs"]. Returns the records by pair and side, and `fast`'s."""
    runs: dict[str, dict[str, list]] = {name: {"keras": [], "fmnist": []} for name in args.pairs}
    fast_runs: list[dict[str, Any]] = []
    extra = extra_precision(args.bf16)
    for rep in range(reps):
        for name in args.pairs:
            peer, preset = PAIRS[name]
            for side, command in (("keras", peer_command(peer, args.tiny, args.bf16)),
                                  ("fmnist", fmnist_command(preset, fmnist_overrides(preset, rep, args.tiny, extra)))):
                label = f"rep {rep + 1}/{reps} {name} {side}"
                record = run_child(command, label, args.cpu_class)
                record.update(pair=name, rep=rep)
                runs[name][side].append(record)
                result["runs"].append(record)
                print(f"{label}: {record['epochs_run']} epochs, median epoch "
                      f"{statistics.median(record['epoch_seconds']):.2f} s, test {record['test_accuracy']:.4f}, "
                      f"{record['wall_seconds']:.1f} s wall, peak {record['peak_rss_mib']:.0f} MiB", flush=True)
        if "cnn" in args.pairs and not args.no_fast:
            overrides = fmnist_overrides("fast", rep, args.tiny, {"track_test": True, **extra})
            record = run_child(fmnist_command("fast", overrides), f"rep {rep + 1}/{reps} fast", args.cpu_class)
            record.update(pair="fast", rep=rep)
            fast_runs.append(record)
            result["runs"].append(record)
            print(f"rep {rep + 1}/{reps} fast: test {record['test_accuracy']:.4f} after "
                  f"{record['history'][-1]['train_seconds']:.1f} s of training, {record['wall_seconds']:.1f} s wall",
                  flush=True)
    return runs, fast_runs


def main() -> None:
    args = parse_args()
    if args.fmnist_child:
        sys.stdout.write(json.dumps(fmnist_child(args.fmnist_child, json.loads(args.overrides))) + "\n")
        return

    reps = args.reps or (1 if args.tiny else 3)
    out = args.out or (Path(tempfile.mkdtemp(prefix="fmnist-compare-tiny-")) if args.tiny else RESULTS)
    now = datetime.now(timezone.utc)
    stamp = now.strftime("%Y-%m-%dT%H%M")
    variant = ("" if args.cpu_class == "native" else f"-{args.cpu_class}") + ("-bf16" if args.bf16 else "")
    json_name = f"compare-{stamp}{'-tiny' if args.tiny else ''}{variant}.json"
    md_name = f"compare{variant}.md"  # a tiny run writes to its own folder
    result: dict[str, Any] = {
        "date": now.strftime("%Y-%m-%d %H:%M UTC"), "tiny": args.tiny, "reps": reps, "json_name": json_name,
        "command": "python benchmarks/compare.py " + " ".join(sys.argv[1:]), "machine": machine(),
        "pairs": {}, "runs": [], "emulation": checked_emulation(args.cpu_class),
        "precision": "bf16" if args.bf16 else "fp32",
    }
    runs, fast_runs = run_repetitions(args, reps, result)
    for name in args.pairs:
        peer, preset = PAIRS[name]
        keras, fm = side_summary(runs[name]["keras"]), side_summary(runs[name]["fmnist"])
        result["pairs"][name] = {"peer": peer, "preset": preset, "keras": keras, "fmnist": fm,
                                 "ratios": pair_summary(keras, fm)}
    result["targets"] = evaluate_targets(result["pairs"], args.tiny)
    if fast_runs:
        result["fast"] = fast_summary(fast_runs, result["pairs"]["cnn"]["keras"])
    result["machine"]["load_average_at_end"] = os.getloadavg()

    out.mkdir(parents=True, exist_ok=True)
    (out / json_name).write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    (out / md_name).write_text(table)
    print()
    print(table)
    print(f"wrote {out / json_name} and {out / md_name}")

if __name__ == "__main__":
    main()

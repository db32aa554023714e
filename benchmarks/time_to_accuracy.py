"""Time to accuracy of fmnist's presets, measured the way the CIFAR-10 speed records (airbench) measure it.

Each seed is a fresh child process that trains a preset on its fixed schedule (its epochs, or the epochs that
`--budget` fits) and measures test accuracy once, at the end: nothing is chosen by looking at the test set, so
there is no "first epoch that reached X%" (that peeked at the test set after every epoch). Before the timed run,
the child trains the same preset for one untimed epoch on 2,048 images, so oneDNN's kernel selection and the
allocator's warm-up are not timed. The reported time is training plus the final test evaluation (with flip
test-time augmentation where the preset has `tta`); data loading is reported beside it. Mean, standard deviation,
min and max over seeds 0..N-1.

    .venv/bin/python benchmarks/time_to_accuracy.py --presets fast default
    .venv/bin/python benchmarks/time_to_accuracy.py --presets best
    .venv/bin/python benchmarks/time_to_accuracy.py --presets fast default --cpu-class avx2
    .venv/bin/python benchmarks/time_to_accuracy.py --presets fast --budget 3m
    .venv/bin/python benchmarks/time_to_accuracy.py --presets classic-adam classic-sgd classic-narrow \\
        classic-earlystop classic-resplit keras-cnn

`--cpu-class avx2` / `avx512-bf16` run the children with oneDNN (and for avx2 ATen) limited to that instruction
set, to measure what a laptop-class CPU would do; a child started with ONEDNN_VERBOSE=1 checks first that the
limit took effect. Nothing else should run on the machine meanwhile: the numbers are wall-clock times.

Writes <results>/time_to_accuracy-<time>-<class>.json (every run), merges one row per (preset, CPU class) into
<results>/time_to_accuracy.json and regenerates <results>/time_to_accuracy.md from it; `native` runs of the
presets as they are also update src/fmnist/preset_results.json (what `fmnist train --list-presets` shows).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from _machine import cpu_name, git_commit

from fmnist.config import PRESETS, parse_duration, resolve_config, results_by_class
from fmnist.errors import ConfigError
from fmnist.files import atomic_write_text, read_json, write_json
from fmnist.hardware import CPU_CLASSES as HARDWARE_CLASSES
from fmnist.hardware import usable_cores

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PRESET_RESULTS = ROOT / "src" / "fmnist" / "preset_results.json"
STORE_FORMAT = 2  # format 1 (no "format" key): rows keyed by preset alone, test accuracy checked every epoch
MARKER = "@@time_to_accuracy "  # the child's result line: oneDNN's verbose output shares its stdout

# airbench reports the mean of many runs; `fast` is cheap enough for 5 seeds, `best` costs ~30 min a seed.
SEEDS = {"fast": 5, "default": 3}
DEFAULT_SEEDS = 1
WARMUP_IMAGES = 2048  # 8 steps of batch 256: every layer shape meets oneDNN and the allocator at least once
WARMUP_VALIDATION = 256  # presets with a validation split warm up its per-epoch pass and the calibration too
WARMUP_TEST = 512

CPU_CLASSES: dict[str, dict[str, str]] = {
    "native": {},
    # MKL (torch's BLAS for the dense layers) dispatches on its own; on AMD CPUs it takes AVX2 paths anyway
    "avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "avx512-bf16": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"},
}
EXPECTED_CLASS = {"avx2": "AVX2", "avx512-bf16": "AVX512-BF16"}  # as fmnist.devices.cpu_class() names them
# Inherited settings that would change what a class means (or flood the children's output): dropped first.
CLEARED = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_VERBOSE",
           "DNNL_VERBOSE")
ISA_LINE = re.compile(r"^(?:onednn|dnnl|mkldnn)_verbose,(?:v\d+,)?info,(?:cpu,isa:|Detected ISA is )(?P<isa>.+)$")

PROTOCOL = ("each seed trains in a fresh process on the preset's fixed schedule (or the epochs that --budget fits) "
            "after an untimed 1-epoch warm-up of the same preset on 2,048 training images, and test accuracy is "
            "measured once at the end; time = training + the final test evaluation (the plain pass and the "
            "test-time-augmentation pass: image, mirror and their 1-pixel shifts), "
            "data loading reported separately")
SUMMARISED = ("test_accuracy", "test_accuracy_tta", "time_seconds", "train_seconds", "eval_seconds", "data_seconds",
              "warmup_seconds", "peak_rss_mib", "throughput_images_per_s", "latency_ms_p50")


class ChildFailed(RuntimeError):
    """A child process exited with an error or printed no result line."""


# ----------------------------------------------------------------------------------------------- CPU classes
def class_env(cpu_class: str, base: Mapping[str, str]) -> dict[str, str]:
    """The children's environment for a CPU class: the caller's without any inherited ISA limit or verbose
    switch (so `native` really is unlimited and results are not drowned in oneDNN's log), plus the class's limits."""
    env = {name: value for name, value in base.items() if name not in CLEARED}
    env.update(CPU_CLASSES[cpu_class])
    return env


def parse_isa_line(output: str) -> tuple[str, str] | None:
    """(the line, the ISA's name) from oneDNN's verbose header, or None where there is none.

    oneDNN 3.x prints `onednn_verbose,v1,info,cpu,isa:Intel AVX2`; 2.x `onednn_verbose,info,cpu,isa:...` and
    older `dnnl_verbose,info,Detected ISA is ...`. It names the ISA oneDNN dispatches to, after ONEDNN_MAX_CPU_ISA.
    """
    for line in output.splitlines():
        match = ISA_LINE.match(line.strip())
        if match:
            return line.strip(), match["isa"].strip()
    return None


def isa_class(isa: str) -> str:
    """oneDNN's ISA name mapped to fmnist's CPU classes (`fmnist.devices.cpu_class` uses the same names):
    "Intel AVX2 with Intel DL Boost, float16 and bfloat16 support" is still AVX2, any AMX name is AMX."""
    text = isa.upper()
    if "AMX" in text:
        return "AMX"
    if "AVX-512" in text or "AVX512" in text or "AVX10" in text:
        return "AVX512-BF16" if "BFLOAT16" in text else "AVX512"
    return "AVX2" if "AVX2" in text else "SSE"


def class_mismatch(requested: str, probe: Mapping[str, Any]) -> str | None:
    """Why children would not run as the requested class, or None when they would (`native` asks for nothing).

    oneDNN's ISA decides the convolution kernels; fmnist's cpu_class() decides whether `precision: auto` picks
    bf16; ATen's capability decides its vectorised element-wise kernels. Each must show the limit.
    """
    if requested == "native":
        return None
    wanted = EXPECTED_CLASS[requested]
    isa = probe.get("onednn_isa")
    if isa is None:
        return f"--cpu-class {requested}: oneDNN printed no ISA line under ONEDNN_VERBOSE=1; cannot verify the limit"
    got = isa_class(isa)
    if got != wanted:
        why = ("this CPU lacks it" if HARDWARE_CLASSES.index(got) < HARDWARE_CLASSES.index(wanted)
               else "the limit did not take effect")
        return f"--cpu-class {requested}: oneDNN uses {isa!r} ({got}), not {wanted}: {why}"
    if probe.get("cpu_class") != wanted:
        return f"--cpu-class {requested}: fmnist.devices.cpu_class() says {probe.get('cpu_class')}, not {wanted}"
    if requested == "avx2" and str(probe.get("aten_cpu_capability")).upper() != "AVX2":
        return f"--cpu-class avx2: ATen uses {probe.get('aten_cpu_capability')}, not AVX2"
    return None


# ----------------------------------------------------------------------------------------------- children
def child_command(mode: str, payload: Mapping[str, Any] | None = None) -> list[str]:
    """This script in a fresh interpreter, as a `--probe` or `--child` process."""
    return [sys.executable, str(Path(__file__).resolve()), mode, json.dumps(payload or {})]


def run_child(command: list[str], env: Mapping[str, str]) -> tuple[dict[str, Any], str]:
    """Run a child; return its result record and everything it printed (oneDNN's verbose lines included)."""
    completed = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=dict(env))
    output = completed.stdout + completed.stderr
    if completed.returncode != 0:
        raise ChildFailed(f"child exited with {completed.returncode}:\n{completed.stderr[-3000:]}")
    for line in completed.stdout.splitlines():
        if line.startswith(MARKER):
            return json.loads(line[len(MARKER):]), output
    raise ChildFailed(f"child printed no result line:\n{output[-3000:]}")


def probe_cpu_class(cpu_class: str) -> dict[str, Any]:
    """What a child of this class sees: oneDNN's ISA line (ONEDNN_VERBOSE=1), cpu_class(), ATen's capability."""
    env = {**class_env(cpu_class, os.environ), "ONEDNN_VERBOSE": "1"}
    seen, output = run_child(child_command("--probe"), env)
    found = parse_isa_line(output)
    seen["onednn_isa_line"], seen["onednn_isa"] = found if found else (None, None)
    seen["onednn_isa_class"] = isa_class(found[1]) if found else None
    return seen


def child_probe() -> dict[str, Any]:
    """In the probe child: one channels-last convolution big enough for torch to hand it to oneDNN (a tiny
    contiguous one is not), so oneDNN initialises and prints its ISA line; plus what fmnist and ATen see."""
    import torch

    from fmnist import devices

    x = torch.randn(2, 16, 28, 28).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(32, 16, 3, 3).contiguous(memory_format=torch.channels_last)
    torch.nn.functional.conv2d(x, weight)
    return {"cpu_class": devices.cpu_class(), "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version()}


def warmup_config(config):
    """The untimed warm-up run: the same preset (batch, precision, memory format, augmentation, so the same
    kernels) for 1 epoch on the first 2,048 training images, without a budget. The first steps of a process pay
    for oneDNN's kernel selection and the allocator's growth; airbench excludes that warm-up from its times too."""
    images = min(WARMUP_IMAGES, config.train_subset or WARMUP_IMAGES)
    validation = min(WARMUP_VALIDATION, images // 4) if config.validation else 0
    update = {"epochs": 1, "train_subset": images, "validation": validation, "budget": None,
              "test_subset": min(WARMUP_TEST, config.test_subset or WARMUP_TEST)}
    if not validation and config.monitor.startswith("val_"):
        update["monitor"] = "accuracy"
    return config.model_copy(update=update).validate()


def test_tensors(config, arrays):
    """The test images and labels exactly as `train` measured them (split, subset, normalisation, layout)."""
    import numpy as np
    import torch

    from fmnist import data
    from fmnist.training import load_splits

    images, labels = load_splits(config.model_copy(update={"validation": 0}), arrays)["test"]
    mean, std = data.normalization(config.normalize == "standard")
    x = data.preprocess(images, mean, std, channels_last=config.channels_last)
    return x, torch.from_numpy(labels.astype(np.int64))


def timed_evaluation(model, x, y, tta: bool) -> dict[str, Any]:
    """The final test evaluation, timed here because it is part of the reported time (as in airbench): a plain
    pass, then the TTA pass (data.tta_views: image, mirror, 1-pixel shifts) where the preset reports one. fp32,
    batches of 256, like `fmnist evaluate`."""
    from fmnist import evaluate

    started = time.perf_counter()
    loss, accuracy = evaluate.loss_and_accuracy(model, x, y)
    record = {"test_accuracy": accuracy, "test_loss": loss, "test_accuracy_tta": None, "test_size": len(y),
              "eval_seconds": time.perf_counter() - started}
    if tta:
        started = time.perf_counter()
        record["test_loss_tta"], record["test_accuracy_tta"] = evaluate.loss_and_accuracy(model, x, y, tta=True)
        record["eval_tta_seconds"] = time.perf_counter() - started
        record["eval_seconds"] += record["eval_tta_seconds"]
    return record


def inference_speed(model, x) -> dict[str, float]:
    """Images/s in batches of 1,000 and single-image latency (eval mode, fp32), measured after the timed part:
    what serving the model costs, not part of time to accuracy."""
    import numpy as np
    import torch

    with torch.inference_mode():
        model(x[:1000])  # warm-up of the inference shapes
        started = time.perf_counter()
        for start in range(0, len(x), 1000):  # one batch of 10,000 would need GBs of activations
            model(x[start:start + 1000])
        batch_seconds = time.perf_counter() - started
        latencies = []
        for i in range(300):
            single = x[i % len(x):i % len(x) + 1]
            started = time.perf_counter()
            model(single)
            latencies.append(time.perf_counter() - started)
    return {"throughput_images_per_s": len(x) / batch_seconds,
            "latency_ms_p50": float(np.percentile(latencies[50:], 50) * 1000),
            "latency_ms_p99": float(np.percentile(latencies[50:], 99) * 1000)}


def child_run(preset: str, seed: int, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """In a run child: load the data, warm up (untimed), train on the fixed schedule, evaluate the test set once."""
    import torch

    from fmnist import data, devices
    from fmnist.hardware import peak_rss_mib
    from fmnist.training import train

    started = time.perf_counter()
    arrays = data.load_data()
    load_seconds = time.perf_counter() - started
    config = resolve_config(preset, {**overrides, "seed": seed, "track_test": False})
    started = time.perf_counter()
    train(warmup_config(config), arrays=arrays)
    warmup_seconds = time.perf_counter() - started
    result = train(config, arrays=arrays)
    x, y = test_tensors(config, arrays)
    evaluation = timed_evaluation(result.model, x, y, config.tta)
    peak_rss_mib = peak_rss_mib()  # before inference adds its own
    metrics = result.metrics
    probe_seconds = metrics.get("budget", {}).get("probe_seconds", 0.0)
    return {
        "preset": preset, "seed": seed, "overrides": dict(overrides), **evaluation,
        "time_seconds": metrics["train_seconds"] + probe_seconds + evaluation["eval_seconds"],
        "train_seconds": metrics["train_seconds"], "budget_probe_seconds": probe_seconds,
        "data_seconds": load_seconds + metrics["data_seconds"], "warmup_seconds": warmup_seconds,
        "epochs": metrics["epochs_run"], "parameters": metrics["parameters"], "precision": metrics["precision"],
        "cpu_class": devices.cpu_class(), "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": metrics["threads"], "torch": torch.__version__, "peak_rss_mib": peak_rss_mib,
        "peak_rss_scope": "warm-up + training + final evaluation", **inference_speed(result.model, x),
        "history": result.history, "metrics": metrics,
    }


# ----------------------------------------------------------------------------------------------- summaries
def seeds_for(preset: str, override: int | None) -> int:
    """How many seeds a preset gets: `--seeds` for all, else 5 for fast, 3 for default, 1 for the rest."""
    return override if override is not None else SEEDS.get(preset, DEFAULT_SEEDS)


def stats(values) -> dict[str, Any] | None:
    """Mean, sample standard deviation (None for a single run), min, max and n; None when no run has the number
    (a preset without TTA)."""
    values = [float(value) for value in values if value is not None]
    if not values:
        return None
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "min": min(values), "max": max(values), "n": len(values)}


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Every reported number over the seeds, plus what the runs share (precision, epochs, class as seen)."""
    summary: dict[str, Any] = {name: stats(run.get(name) for run in runs) for name in SUMMARISED}
    summary.update(
        seeds=[run["seed"] for run in runs], epochs=sorted({run["epochs"] for run in runs}),
        parameters=runs[0]["parameters"], precision="/".join(sorted({run["precision"] for run in runs})),
        cpu_class_seen="/".join(sorted({run["cpu_class"] for run in runs})),
        aten_cpu_capability="/".join(sorted({run["aten_cpu_capability"] for run in runs})))
    return summary


def row_label(preset: str, budget: str | None, overrides: Mapping[str, Any]) -> str:
    """The row's name: the preset, marked when a budget or `--set` changed what it trains."""
    return preset + (f" budget {budget}" if budget else "") + (" +set" if overrides else "")


def make_row(preset: str, runs: list[dict[str, Any]], context: Mapping[str, Any], budget: str | None,
             overrides: Mapping[str, Any]) -> dict[str, Any]:
    """One table row: the summary over seeds with everything needed to trust it (machine, class, commit)."""
    label = row_label(preset, budget, overrides)
    summary = summarise(runs)
    return {"key": row_key(label, summary["cpu_class_seen"], context["cpu_class"]), "preset": preset,
            "label": label, "budget": budget, "overrides": dict(overrides), **summary, **context}


def row_key(label: str, class_seen: str, requested: str) -> str:
    """Rows are kept per class computed in, and native apart from emulated: an AVX2 laptop's own row and an
    AVX2 emulation on a bigger CPU are both kept, while a native run on another CPU of the same class replaces
    the older one."""
    return f"{label}|{class_seen}|{'native' if requested == 'native' else 'emulated'}"


def merge_rows(stored: Mapping[str, dict], new: list[dict[str, Any]]) -> dict[str, dict]:
    """The stored rows with each new row replacing the one of the same key (preset+class): other classes' rows
    and other presets' rows stay as they were measured."""
    merged = dict(stored)
    for row in new:
        merged[row["key"]] = row
    return merged


def load_store(path: Path) -> dict[str, Any]:
    """The rows measured so far. A file of the old protocol (rows keyed by preset, test accuracy checked every
    epoch) is not merged: its numbers are not comparable. The dated files and git keep them."""
    try:
        store = read_json(path)
    except FileNotFoundError:
        store = {}
    if store.get("format") != STORE_FORMAT:
        if store:
            print(f"note: {path} holds rows of the old protocol; starting a new table", file=sys.stderr)
        store = {"format": STORE_FORMAT, "protocol": PROTOCOL, "rows": {}}
    # Rows written before rows were kept per class seen were keyed `label|requested class`.
    store["rows"] = {row_key(row["label"], row["cpu_class_seen"], row["cpu_class"]): {
        **row, "key": row_key(row["label"], row["cpu_class_seen"], row["cpu_class"])}
        for row in store["rows"].values()}
    return store


# ----------------------------------------------------------------------------------------------- markdown
def fmt(stat: Mapping[str, Any] | None, spec: str, scale: float = 1.0, spread: bool = False) -> str:
    """`mean ± std`, with `(min-max)` when `spread`; `-` for a number no run has."""
    if stat is None:
        return "-"
    text = spec.format(stat["mean"] * scale)
    if stat["std"] is not None:
        text += " ± " + spec.format(stat["std"] * scale)
        if spread:
            text += f" ({spec.format(stat['min'] * scale)}-{spec.format(stat['max'] * scale)})"
    return text


def row_order(row: Mapping[str, Any]) -> tuple:
    """Presets in the order `fmnist train --list-presets` shows them, then the fastest CPU class first, native
    before emulated."""
    presets = list(PRESETS)
    seen = row["cpu_class_seen"]
    rank = HARDWARE_CLASSES.index(seen) if seen in HARDWARE_CLASSES else -1
    return (presets.index(row["preset"]) if row["preset"] in presets else len(presets), row["label"], -rank,
            row["cpu_class"] != "native")


TABLE_HEAD = ("| preset | CPU class | how | precision | seeds | epochs | test acc % | TTA acc % | time s "
              "| train s | eval s | data s | warm-up s | peak RSS MiB | infer img/s | latency ms | CPU | torch "
              "| commit | date |")


def table_line(row: Mapping[str, Any]) -> str:
    """One markdown row: accuracy as mean ± std (min-max), times as mean ± std, the rest as means."""
    cells = [row["label"], row["cpu_class_seen"], how(row), row["precision"], str(len(row["seeds"])),
             "/".join(str(epochs) for epochs in row["epochs"]),
             fmt(row["test_accuracy"], "{:.2f}", 100, spread=True),
             fmt(row["test_accuracy_tta"], "{:.2f}", 100, spread=True),
             fmt(row["time_seconds"], "{:.1f}"), fmt(row["train_seconds"], "{:.1f}"),
             fmt(row["eval_seconds"], "{:.2f}"), fmt(row["data_seconds"], "{:.1f}"),
             fmt(row["warmup_seconds"], "{:.1f}"),
             f"{row['peak_rss_mib']['mean']:.0f}", f"{row['throughput_images_per_s']['mean']:,.0f}",
             f"{row['latency_ms_p50']['mean']:.2f}", row["cpu"], row["torch"], row["commit"], row["date"][:10]]
    return "| " + " | ".join(cells) + " |"


def how(row: Mapping[str, Any]) -> str:
    """`native`, or the emulation that limited the CPU (`emulated: --cpu-class avx2`)."""
    return "native" if row["cpu_class"] == "native" else f"emulated: --cpu-class {row['cpu_class']}"


def markdown(store: Mapping[str, Any]) -> str:
    """The table the README links to, regenerated from the stored rows (one per preset and CPU class)."""
    rows = sorted(store["rows"].values(), key=row_order)
    lines = [
        "# Time to accuracy", "",
        "Written by `benchmarks/time_to_accuracy.py` from `time_to_accuracy.json` beside this file (one row per",
        "preset and CPU class, each from its latest measurement; every seed's numbers are in the dated JSON files).",
        "", f"Protocol: {PROTOCOL}.", "",
        "- Warm-up excluded: before its timed run, each child trains the same preset for 1 epoch on 2,048 images",
        "  (`warm-up s`, not timed), so oneDNN's kernel selection and the allocator's warm-up are not in `time s`.",
        "- `time s` = `train s` (the epochs' training steps; per-epoch validation passes and the temperature",
        "  calibration are not in it; with `--budget`, its probe steps are added) + `eval s` (the final fp32 test",
        "  passes, plain and TTA: image, mirror and their 1-pixel shifts; rows measured before 2026-12-02 21:00",
        "  UTC used the mirror alone). `data s` (reading, splitting, preprocessing) is not in `time s`.",
        "- Mean ± sample standard deviation over seeds 0..N-1; accuracy also (min-max). Test accuracy is measured",
        "  once, after the last epoch: no number here was chosen by looking at the test set.",
        "- Peak RSS: the child's maximum resident memory after the final evaluation. Inference (after the timed",
        "  part): eval mode, fp32, test images in batches of 1,000 (img/s) and the median latency of one image.",
        "- CPU class: the instruction set the runs computed in (AVX2: most laptops; AVX512-BF16: AMD Zen 4/5,",
        "  Intel Cooper Lake; AMX: Intel Sapphire Rapids and later). `how`: `native` = the CPU as it is;",
        "  `emulated: --cpu-class avx2` = `ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2`, `avx512-bf16` =",
        "  `ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16` on a bigger CPU, each checked before the runs against oneDNN's",
        "  verbose ISA line (below). Precision is what the runs used (`auto` = bf16 only on AVX512-BF16/AMX).",
        "", TABLE_HEAD, "|---" * TABLE_HEAD.count(" |") + "|",
    ]
    lines += [table_line(row) for row in rows]
    lines += ["", "Where each row was measured:", ""]
    for row in rows:
        lines.append(f"- {row['label']} / {row['cpu_class_seen']} {how(row)}: {row['date']}, {row['cpu']} "
                     f"({row['cores']} cores, {row['threads']} threads), torch {row['torch']}, Python {row['python']}, "
                     f"commit {row['commit']}; fmnist class {row['cpu_class_seen']}, "
                     f"ATen {row['aten_cpu_capability']}; "
                     f"oneDNN `{row['onednn_isa_line']}`; `{row['command']}`")
    return "\n".join(lines) + "\n"


def update_preset_results(rows: list[dict[str, Any]], path: Path = PRESET_RESULTS) -> None:
    """Merge the rows of presets run as they are on the native CPU into the file `fmnist train --list-presets`
    reads: an emulated class or a budget is not what the preset does on this machine for a user."""
    try:
        current = read_json(path)
    except (FileNotFoundError, json.JSONDecodeError):
        current = {"presets": {}}
    presets = {name: results_by_class(entry) for name, entry in current.get("presets", {}).items()}
    for row in rows:
        if row["cpu_class"] != "native" or row["budget"] or row["overrides"]:
            continue
        presets.setdefault(row["preset"], {})[row["cpu_class_seen"]] = {
            "test_accuracy": row["test_accuracy"]["mean"],
            "test_accuracy_tta": (row["test_accuracy_tta"] or {}).get("mean"),
            "train_seconds": row["train_seconds"]["mean"], "time_seconds": row["time_seconds"]["mean"],
            "seeds": row["test_accuracy"]["n"], "measured": row["date"][:10], "cpu": row["cpu"],
            "cpu_class": row["cpu_class_seen"], "precision": row["precision"], "commit": row["commit"],
            "protocol": "fixed schedule, test measured once at the end, warm-up excluded, mean over seeds"}
    write_json(path, {"presets": presets})


# ----------------------------------------------------------------------------------------------- main
def duration(text: str) -> str:
    """`--budget` as given ("3m", "90s", "1h30m": the row's label shows it so), refused by argparse (exit 2) when
    it is not a duration."""
    try:
        parse_duration(text)
    except (TypeError, ValueError) as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def positive(text: str) -> int:
    """A positive integer argument."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line; `--probe` and `--child` are how this script runs itself in fresh processes."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["fast", "default"], help="presets to train "
                        "(default: fast default)")
    parser.add_argument("--seeds", type=positive, default=None, help="seeds 0..N-1 for every preset (default: 5 for "
                        "fast, 3 for default, 1 for the others)")
    parser.add_argument("--budget", type=duration, default=None, help="fit each run into this wall time (3m, 90s); "
                        "TrainConfig.budget chooses the epochs (default: the preset's epochs)")
    parser.add_argument("--cpu-class", choices=list(CPU_CLASSES), default="native", help="run as this CPU class: "
                        "avx2 and avx512-bf16 limit oneDNN (and ATen) to that ISA, verified first (default: native)")
    parser.add_argument("--set", default="{}", help="JSON settings for every run, e.g. for a smoke test; its rows "
                        "enter the table only with --results (default: {})")
    parser.add_argument("--results", type=Path, default=None,
                        help="folder for the results files (default: benchmarks/results)")
    parser.add_argument("--tag", default="", help="suffix of the dated result file's name (default: none)")
    parser.add_argument("--probe", nargs="?", const="{}", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def checked_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The `--set` settings, validated (with `--budget`) against every preset before anything runs."""
    try:
        overrides = json.loads(args.set)
    except json.JSONDecodeError as error:
        raise ConfigError(f"--set is not JSON: {error}") from None
    if not isinstance(overrides, dict):
        raise ConfigError('--set must be a JSON object of settings, like {"epochs": 1}')
    if "track_test" in overrides:
        raise ConfigError("--set track_test: measuring the test set every epoch is what this protocol forbids")
    for preset in args.presets:  # unknown presets get "did you mean", bad settings a one-line error
        resolve_config(preset, {**overrides, "budget": args.budget})
    return overrides


def run_context(args: argparse.Namespace, probe: Mapping[str, Any], argv: list[str]) -> dict[str, Any]:
    """What every row and results file records about the machine, the code and the protocol."""
    return {"cpu_class": args.cpu_class, "cpu": cpu_name(), "cores": usable_cores(), "torch": probe["torch"],
            "python": probe["python"], "threads": probe["threads"], "commit": git_commit(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "protocol": PROTOCOL,
            "command": "python benchmarks/time_to_accuracy.py " + shlex.join(argv),
            "env": CPU_CLASSES[args.cpu_class], "onednn_isa_line": probe["onednn_isa_line"],
            "onednn_isa": probe["onednn_isa"], "probe_cpu_class": probe["cpu_class"]}


def run_seeds(preset: str, count: int, overrides: Mapping[str, Any], env: Mapping[str, str],
              cpu_class: str) -> list[dict[str, Any]]:
    """Each seed in its own fresh child, with one progress line per seed."""
    runs = []
    for seed in range(count):
        run, _ = run_child(child_command("--child", {"preset": preset, "seed": seed, "overrides": overrides}), env)
        runs.append(run)
        tta = f" (TTA {run['test_accuracy_tta']:.4f})" if run["test_accuracy_tta"] is not None else ""
        print(f"{preset} [{cpu_class}] seed {seed}: test {run['test_accuracy']:.4f}{tta} in {run['time_seconds']:.1f} s"
              f" (train {run['train_seconds']:.1f} + eval {run['eval_seconds']:.2f}), {run['epochs']} epochs, "
              f"{run['precision']}; data {run['data_seconds']:.1f} s and warm-up {run['warmup_seconds']:.1f} s "
              "not timed", flush=True)
    return runs


def write_results(result: dict[str, Any], results: Path, update_table: bool, update_presets: bool) -> Path:
    """The dated file of this invocation; the merged store and its markdown; the package's preset results."""
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H%M%S")  # one file per invocation, never overwritten
    tag = f"-{result['tag']}" if result["tag"] else ""
    dated = write_json(results / f"time_to_accuracy-{stamp}-{result['cpu_class']}{tag}.json", result)
    if update_table:
        store_path = results / "time_to_accuracy.json"
        store = load_store(store_path)
        store["rows"] = merge_rows(store["rows"], result["rows"])
        write_json(store_path, store)
        atomic_write_text(results / "time_to_accuracy.md", markdown(store))
    if update_presets:
        update_preset_results(result["rows"])
    return dated


def benchmark(args: argparse.Namespace, argv: list[str]) -> int:
    """Check the CPU class, run every preset's seeds, write the results; the exit code."""
    try:
        overrides = checked_overrides(args)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    probe = probe_cpu_class(args.cpu_class)
    problem = class_mismatch(args.cpu_class, probe)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    print(f"{args.cpu_class}: oneDNN `{probe['onednn_isa_line']}`, fmnist class {probe['cpu_class']}, "
          f"ATen {probe['aten_cpu_capability']}", flush=True)
    context = run_context(args, probe, argv)
    env = class_env(args.cpu_class, os.environ)
    settings = {**overrides, "budget": args.budget} if args.budget else overrides
    result = {"format": STORE_FORMAT, **context, "tag": args.tag, "rows": [], "runs": []}
    for preset in args.presets:
        runs = run_seeds(preset, seeds_for(preset, args.seeds), settings, env, args.cpu_class)
        result["rows"].append(make_row(preset, runs, context, args.budget, overrides))
        result["runs"] += runs
    scratch = args.results is not None  # a folder of one's own: smoke rows may enter its table
    dated = write_results(result, args.results or RESULTS, update_table=scratch or not overrides,
                          update_presets=not scratch and not overrides and args.cpu_class == "native")
    print(markdown({"rows": {row["key"]: row for row in result["rows"]}}))
    print(f"wrote {dated}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Dispatch: a probe child, a run child, or the benchmark itself."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.probe is not None or args.child is not None:
        record = child_probe() if args.probe is not None else child_run(**json.loads(args.child))
        print(MARKER + json.dumps(record), flush=True)
        return 0
    try:
        return benchmark(args, argv)
    except ChildFailed as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

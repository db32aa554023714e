"""Which recipe pays for a preset on this data: variants trained over seeds, judged on the validation split.

Each variant is the preset with a few settings changed (`--variant NAME='{"label_smoothing": 0.2}'`); each
(variant, seed) is one `fmnist train` in a fresh process. The score is the final validation accuracy of the
preset's own held-out split: the test set is never looked at here, so a preset chosen from this table has not
been tuned on the test set. Training time is reported beside it (per-epoch training steps only), which is a
fair cost only when nothing else ran on the machine meanwhile.

    .venv/bin/python benchmarks/recipe_study.py --preset fast --seeds 2 \\
        --variant ls02='{"label_smoothing": 0.2}' --variant bs512='{"batch_size": 512, "lr": 0.4}'

Writes <results>/recipe_study-<preset>-<time>.json (every run, rewritten after each variant so a study stopped
early keeps what it measured) and prints a markdown table (best first), which the file's `table` key keeps.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from _machine import cpu_name, git_commit

from fmnist.config import resolve_config
from fmnist.errors import ConfigError
from fmnist.files import read_json, write_json

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
FMNIST = [sys.executable, "-m", "fmnist"]


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    """`NAME={json settings}` -> (name, settings), checked against the schema now, not after an hour of runs."""
    name, sep, body = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"--variant {text!r}: write it as NAME='{{\"setting\": value}}'")
    try:
        settings = json.loads(body)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"--variant {name}: not JSON ({error.msg})") from None
    if not isinstance(settings, dict):
        raise argparse.ArgumentTypeError(f"--variant {name}: give a JSON object of settings")
    return name, settings


def run_one(preset: str, settings: dict[str, Any], seed: int, workdir: Path, out: Path) -> dict[str, Any]:
    """One training in a fresh process into `out`; its metrics.json, reduced to what the study compares."""
    config = workdir / "config.json"
    config.write_text(json.dumps(settings))
    command = [*FMNIST, "train", "--preset", preset, "--config", str(config), "--seed", str(seed),
               "--out", str(out), "--overwrite", "--quiet"]
    subprocess.run(command, check=True, cwd=ROOT)
    metrics = read_json(out / "metrics.json")
    return {"seed": seed, "val_accuracy": metrics["val_accuracy"], "val_loss": metrics["val_loss"],
            "train_seconds": metrics["train_seconds"], "epochs": metrics["epochs_run"],
            "precision": metrics["precision"], "cpu_class": metrics["cpu_class"]}


def summarise(name: str, settings: dict[str, Any], runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and spread of validation accuracy and training time over the seeds."""
    accuracy = [run["val_accuracy"] for run in runs]
    seconds = [run["train_seconds"] for run in runs]
    return {"variant": name, "settings": settings, "runs": runs,
            "val_accuracy_mean": statistics.fmean(accuracy),
            "val_accuracy_std": statistics.stdev(accuracy) if len(accuracy) > 1 else None,
            "train_seconds_mean": statistics.fmean(seconds)}


def table(preset: str, rows: list[dict[str, Any]]) -> str:
    """The variants best first: validation accuracy mean ± std over seeds, training time, what changed."""
    lines = [f"| {preset} variant | val acc % | train s | seeds | settings changed |", "|---|---|---|---|---|"]
    for row in sorted(rows, key=lambda row: -row["val_accuracy_mean"]):
        spread = f" ± {row['val_accuracy_std'] * 100:.2f}" if row["val_accuracy_std"] is not None else ""
        lines.append(f"| {row['variant']} | {row['val_accuracy_mean'] * 100:.2f}{spread} | "
                     f"{row['train_seconds_mean']:.1f} | {len(row['runs'])} | `{json.dumps(row['settings'])}` |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", required=True)
    parser.add_argument("--variant", type=parse_variant, action="append", default=[], metavar="NAME=JSON")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--keep", type=Path, metavar="DIR",
                        help="keep every run folder as DIR/<variant>-seed<N> (default: a temporary folder)")
    args = parser.parse_args(argv)
    variants = [("baseline", {}), *args.variant]
    try:
        for name, settings in variants:
            if resolve_config(args.preset, settings).validation == 0:
                parser.error(f"--variant {name}: it has no validation split to judge it on")
    except ConfigError as error:
        parser.error(str(error))
    stamp = datetime.now(timezone.utc)
    path = args.results / f"recipe_study-{args.preset}-{stamp:%Y-%m-%dT%H%M%S}.json"
    import torch

    from fmnist.devices import cpu_class

    record = {"preset": args.preset, "date": stamp.isoformat(timespec="seconds"), "cpu": cpu_name(),
              "cpu_class": cpu_class(), "torch": torch.__version__,
              "timing": "train_seconds are fair costs only if nothing else ran meanwhile",
              "commit": git_commit(), "command": " ".join(["python", "benchmarks/recipe_study.py", *sys.argv[1:]]),
              "rows": [], "table": ""}
    with tempfile.TemporaryDirectory() as workdir:
        for name, settings in variants:
            runs = [run_one(args.preset, settings, seed, Path(workdir),
                            (args.keep or Path(workdir)) / f"{name}-seed{seed}") for seed in range(args.seeds)]
            record["rows"].append(summarise(name, settings, runs))
            record["table"] = table(args.preset, record["rows"])
            write_json(path, record)  # after every variant: a study stopped early keeps what it measured
            row = record["rows"][-1]
            print(f"{name}: val {row['val_accuracy_mean']:.4f} in {row['train_seconds_mean']:.1f} s", flush=True)
    print(record["table"])
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

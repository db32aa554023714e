"""Data-parallel scaling on this machine: 1 process vs N processes under torchrun, one torch thread each.

For each preset: one process with 1 thread, N processes (torchrun, gloo) with 1 thread each, and, for reference,
one process with N threads (the usual way to use N cores without torchrun). Where torch sees CUDA it adds one
process on 1 GPU and, with several GPUs, N processes on N GPUs over NCCL (their speed-up is still against the
1-thread CPU run). Reports training images/s, the speed-up and scaling efficiency (speed-up / N) over the 1-thread
run, and test accuracy, so the same preset can be seen to give the same accuracy on 1 or N processes. Every run is
`fmnist train` in fresh processes; nothing else should run meanwhile.

    .venv/bin/python benchmarks/distributed_scaling.py                       # classic-adam and fast, 2 processes
    .venv/bin/python benchmarks/distributed_scaling.py --presets fast --epochs 3 --processes 2

Writes benchmarks/results/distributed_scaling-<stamp>.json and benchmarks/results/distributed_scaling.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from _machine import cpu_name

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def train_once(preset: str, epochs: int, processes: int, threads: int, device: str = "cpu") -> dict:
    with tempfile.TemporaryDirectory(prefix="fmnist-scaling-") as folder:
        out = Path(folder) / "run"
        command = ["-m", "fmnist", "train", "--preset", preset, "--epochs", str(epochs), "--threads", str(threads),
                   "--out", str(out), "--no-plots", "--quiet", "--device", device]
        if processes > 1:
            command = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes), *command]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        done = subprocess.run([sys.executable, *command], capture_output=True, text=True, env=env)
        if done.returncode != 0:
            sys.exit(f"training failed ({preset}, {processes} processes):\n{done.stdout}\n{done.stderr}")
        metrics = json.loads((out / "metrics.json").read_text())
        config = json.loads((out / "config.json").read_text())
    train_images = 60_000 - (config.get("validation") or 0)
    return {"preset": preset, "processes": processes, "threads_per_process": threads, "epochs": epochs,
            "train_seconds": metrics["train_seconds"], "images_per_s": train_images * epochs / metrics["train_seconds"],
            "test_accuracy": metrics["test_accuracy"], "global_batch": config["batch_size"],
            "device": metrics.get("device", "cpu"), "precision": metrics.get("precision")}


def markdown(report: dict) -> str:
    lines = [f"# Data-parallel scaling ({report['date']})", "",
             f"Machine: {report['cpu']}, {report['cores']} cores; GPUs: {report['gpus'] or 'none'}; "
             f"torch {report['torch']}; gloo between CPU processes, NCCL between GPUs. "
             f"Command: `{report['command']}`.", "",
             "| preset | setup | global batch | training s | images/s | speed-up vs 1x1 | efficiency | test acc |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for row in report["runs"]:
        plural = "es" if row["processes"] > 1 else ""
        threads = "thread" if row["threads_per_process"] == 1 else "threads"
        setup = f"{row['processes']} process{plural} x {row['threads_per_process']} {threads}"
        if row["device"].startswith("cuda"):
            gpus = "1 GPU" if row["processes"] == 1 else f"{row['processes']} GPUs (NCCL)"
            setup = f"{row['processes']} process{plural} on {gpus}, {row['precision']}"
        efficiency = "n/a" if row["efficiency"] is None else f"{row['efficiency']:.0%}"
        lines.append(f"| {row['preset']} | {setup} | {row['global_batch']} | {row['train_seconds']:.1f} | "
                     f"{row['images_per_s']:,.0f} | {row['speedup']:.2f}x | "
                     f"{efficiency} | {row['test_accuracy']:.2%} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["classic-adam", "fast"])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not gpus:
        print("torch sees no CUDA GPU: the GPU rows are skipped", flush=True)
    runs = []
    for preset in args.presets:
        single = train_once(preset, args.epochs, 1, 1)
        group = train_once(preset, args.epochs, args.processes, 1)
        threaded = train_once(preset, args.epochs, 1, args.processes)
        # (row, the run its efficiency is measured against, workers); a GPU is not "one worker" of a CPU
        setups = [(single, single, 1), (group, single, args.processes), (threaded, single, args.processes)]
        if gpus:
            one_gpu = train_once(preset, args.epochs, 1, 1, "cuda")
            setups.append((one_gpu, None, 1))
            if gpus >= 2:
                count = min(gpus, args.processes)
                setups.append((train_once(preset, args.epochs, count, 1, "cuda"), one_gpu, count))
        for row, baseline, workers in setups:
            row["speedup"] = row["images_per_s"] / single["images_per_s"]
            row["efficiency"] = None if baseline is None else row["images_per_s"] / baseline["images_per_s"] / workers
            runs.append(row)
            print(f"{preset:>13} {row['device'][:6]:>6} {row['processes']} proc x {row['threads_per_process']} thr: "
                  f"{row['images_per_s']:8,.0f} img/s  speed-up {row['speedup']:.2f}x  "
                  f"test {row['test_accuracy']:.4f}", flush=True)

    report = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "cpu": cpu_name(),
              "cores": os.cpu_count(),
              "gpus": ", ".join(torch.cuda.get_device_name(i) for i in range(gpus)),
              "torch": torch.__version__,
              "command": "python benchmarks/distributed_scaling.py " + " ".join(sys.argv[1:]),
              "runs": runs}
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H%M")
    (args.out / f"distributed_scaling-{stamp}.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "distributed_scaling.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

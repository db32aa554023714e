"""Load test of `fmnist serve`: N concurrent clients on loopback for a bounded time.

Starts the server as its own process, then drives it from this process with asyncio clients that each hold one
HTTP/1.1 keep-alive connection and send the next request as soon as the previous answer arrives (closed loop).
Requests are prebuilt multipart uploads of real test images as PNG (what the web page sends), one image or a batch
of 64 per request. The client is deliberately thin (raw asyncio streams, no HTTP library) so that its own CPU use
stays small next to the server's: both share the machine, as they would on a laptop.

Reports requests/s, images/s, p50/p99 latency and errors per scenario, and checks the target for single images at
16 clients (>= 300 requests/s, p99 < 50 ms, zero errors). Nothing else should run on the machine meanwhile.

    .venv/bin/python benchmarks/serve_load.py runs/demo
    .venv/bin/python benchmarks/serve_load.py runs/demo --scenarios 1x1 16x1 4x64 --seconds 20 --unbatched

Writes benchmarks/results/serve_load-<stamp>.json and benchmarks/results/serve_load.md.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import socket
import subprocess
import sys
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from _machine import cpu_name, wait_until_healthy
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
TARGET = {"scenario": "16x1", "requests_per_s": 300.0, "p99_ms": 50.0}


def multipart_request(images: list[bytes], port: int) -> bytes:
    """One complete HTTP request uploading `images` as repeated `file` fields."""
    boundary = "fmnistloadtest"
    parts = [(f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{i}.png\"\r\n"
              "Content-Type: image/png\r\n\r\n").encode() + payload + b"\r\n" for i, payload in enumerate(images)]
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    head = (f"POST /v1/predict?top=3 HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    length = next(int(line.split(":", 1)[1]) for line in lines[1:] if line.lower().startswith("content-length:"))
    return status, await reader.readexactly(length)


async def client(port: int, requests: list[bytes], images_per_request: int, stop_at: float, record_from: float,
                 latencies: list[float], errors: list[str], offset: int) -> None:
    """One user: a keep-alive connection, next request as soon as the previous answer is in."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    sent = offset
    try:
        while time.perf_counter() < stop_at:
            request = requests[sent % len(requests)]
            sent += 1
            started = time.perf_counter()
            writer.write(request)
            await writer.drain()
            status, body = await read_response(reader)
            elapsed = time.perf_counter() - started
            if started < record_from:
                continue  # warm-up
            if status != 200 or len(json.loads(body)["predictions"]) != images_per_request:
                errors.append(f"{status}: {body[:120]!r}")
            latencies.append(elapsed)
    except (OSError, asyncio.IncompleteReadError, ValueError) as error:
        errors.append(f"{type(error).__name__}: {error}")
    finally:
        writer.close()


async def scenario(port: int, pngs: list[bytes], clients: int, per_request: int, seconds: float,
                   warmup: float) -> dict:
    requests = [multipart_request(pngs[i:i + per_request], port) for i in range(0, 640, per_request)]
    latencies: list[float] = []
    errors: list[str] = []
    start = time.perf_counter()
    record_from, stop_at = start + warmup, start + warmup + seconds
    cpu_before = os.times()
    await asyncio.gather(*(client(port, requests, per_request, stop_at, record_from, latencies, errors, k)
                           for k in range(clients)))
    cpu = os.times()
    measured = time.perf_counter() - record_from
    ms = np.array(latencies) * 1000
    return {
        "scenario": f"{clients}x{per_request}", "clients": clients, "images_per_request": per_request,
        "seconds": round(measured, 2), "requests": len(latencies), "errors": len(errors),
        "error_samples": errors[:3],
        "requests_per_s": round(len(latencies) / measured, 1),
        "images_per_s": round(len(latencies) * per_request / measured, 1),
        "p50_ms": round(float(np.percentile(ms, 50)), 2) if len(ms) else None,
        "p99_ms": round(float(np.percentile(ms, 99)), 2) if len(ms) else None,
        "max_ms": round(float(ms.max()), 2) if len(ms) else None,
        "client_cpu_s": round((cpu.user + cpu.system) - (cpu_before.user + cpu_before.system), 2),
    }


def start_server(run: Path, port: int, threads: int | None, max_batch: int = 256) -> subprocess.Popen:
    command = [sys.executable, "-m", "fmnist", "serve", str(run), "--port", str(port), "--log-level", "warning",
               "--max-batch", str(max_batch)]
    if threads:
        command += ["--threads", str(threads)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_until_healthy(process, port, lambda: process.stdout.read())
    return process


def server_stats(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
        return json.loads(response.read())


def test_pngs(count: int = 640) -> list[bytes]:
    from fmnist import load_data

    (_, _), (x_test, _) = load_data()
    pngs = []
    for image in x_test[:count]:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        pngs.append(buffer.getvalue())
    return pngs


def markdown(report: dict) -> str:
    lines = [f"# fmnist serve under load ({report['date']})", "",
             f"Model: `{report['run']}` ({report['model']}); server: `fmnist serve`, one process, "
             f"{report['server_threads'] or 'default'} torch threads; client: {report['clients_note']}.",
             f"Machine: {report['machine']['cpu']}, {report['machine']['cores']} cores. "
             f"Command: `{report['command']}`.", "",
             "| scenario (clients x images/request) | requests/s | images/s | p50 ms | p99 ms | max ms | errors | "
             "mean batch on the server |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in report["scenarios"]:
        lines.append(f"| {row['scenario']} | {row['requests_per_s']:.0f} | {row['images_per_s']:.0f} | "
                     f"{row['p50_ms']} | {row['p99_ms']} | {row['max_ms']} | {row['errors']} | "
                     f"{row['mean_server_batch']} |")
    if "batching_speedup_16x1" in report:
        lines += ["", f"Micro-batching at 16 clients: {report['batching_speedup_16x1']}x the requests/s of the same "
                      "server with `--max-batch 1` (one forward pass per request), same run."]
    target = report.get("target")
    if target:
        lines += ["", f"Target (single images, 16 clients): >= {TARGET['requests_per_s']:.0f} requests/s with p99 < "
                      f"{TARGET['p99_ms']:.0f} ms and no errors: **{'met' if target['met'] else 'missed'}**."]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="run folder to serve (the target is for the `default` preset)")
    parser.add_argument("--scenarios", nargs="+", default=["1x1", "16x1", "1x64", "4x64"],
                        help="CLIENTSxIMAGES per request")
    parser.add_argument("--seconds", type=float, default=15.0, help="measured time per scenario")
    parser.add_argument("--warmup", type=float, default=3.0, help="unmeasured time before each scenario")
    parser.add_argument("--threads", type=int, default=None, help="server torch threads (default: one per core)")
    parser.add_argument("--unbatched", action="store_true",
                        help="also run the 16x1 scenario against a server started with --max-batch 1, to measure "
                             "what micro-batching buys")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    args = parser.parse_args()
    if not (args.run / "model.json").is_file():
        sys.exit(f"{args.run} is not a run folder (no model.json); train one with `make demo` or `fmnist train`")

    pngs = test_pngs()
    plan = [(spec, 256) for spec in args.scenarios] + ([("16x1", 1)] if args.unbatched else [])
    rows, server, running_max_batch = [], None, None
    try:
        for spec, max_batch in plan:
            if max_batch != running_max_batch:
                if server is not None:
                    server.terminate()
                    server.wait(timeout=30)
                port = _free_port()
                server, running_max_batch = start_server(args.run, port, args.threads, max_batch), max_batch
            clients, per_request = (int(part) for part in spec.split("x"))
            before = server_stats(port)
            row = asyncio.run(scenario(port, pngs, clients, per_request, args.seconds, args.warmup))
            after = server_stats(port)
            batches = after["batches"] - before["batches"]
            row["mean_server_batch"] = round((after["images"] - before["images"]) / batches, 1) if batches else None
            row["server_max_batch"] = max_batch
            if max_batch == 1:
                row["scenario"] += " unbatched"
            rows.append(row)
            print(f"{row['scenario']:>16}: {row['requests_per_s']:8.1f} req/s {row['images_per_s']:9.1f} img/s  "
                  f"p50 {row['p50_ms']:7.2f} ms  p99 {row['p99_ms']:7.2f} ms  errors {row['errors']}  "
                  f"mean batch {row['mean_server_batch']}", flush=True)
        model = after["model"]
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)

    import torch

    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/serve_load.py " + " ".join(sys.argv[1:]),
        "run": str(args.run), "model": model, "server_threads": args.threads,
        "clients_note": "asyncio keep-alive connections in one separate process, PNG multipart uploads",
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__},
        "scenarios": rows,
    }
    single = next((row for row in rows if row["scenario"] == TARGET["scenario"]), None)
    unbatched = next((row for row in rows if row["scenario"] == "16x1 unbatched"), None)
    if single and unbatched:
        report["batching_speedup_16x1"] = round(single["requests_per_s"] / unbatched["requests_per_s"], 2)
    if single:
        report["target"] = {**TARGET, "met": single["requests_per_s"] >= TARGET["requests_per_s"]
                            and single["p99_ms"] < TARGET["p99_ms"] and single["errors"] == 0}
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H%M")
    (args.out / f"serve_load-{stamp}.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "serve_load.md").write_text(markdown(report))
    print(markdown(report))
    print(f"wrote {args.out / f'serve_load-{stamp}.json'} and {args.out / 'serve_load.md'}")
    return 0


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


if __name__ == "__main__":
    raise SystemExit(main())

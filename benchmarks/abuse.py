"""Abuse test of `fmnist serve`: the worst requests its limits allow, from N clients, while a normal client asks.

Starts `fmnist serve RUN` on 127.0.0.1 with its default limits (or targets one already running: --port and --pid),
then runs one phase per attack, each for a bounded time, with one normal client (the web page's requests: a small
photo upload, then a 28x28 JSON array, in a closed loop) throughout:

    baseline       no attackers
    large-decodes  64 images per request, each at the pixel limit (25 MP, RGBA, ~110 KB as PNG: 7 MB a request)
    slow-bodies    bodies at the size limit (10 MB uploads, JSON at its limit), all but the last byte, then silence
    max-json       JSON bodies at the JSON limit, 64 images of long decimals, as fast as answered
    refused        bodies declared over the limit, other sites' Host and Origin: each should cost nothing

Measures the server's peak RSS (psutil when installed, else /proc/PID/status: VmRSS sampled every 50 ms, and the
kernel's VmHWM high-water mark) and the normal client's latency. Targets: peak RSS < 1.5 GB, and every normal
request answered (no errors; p99 reported). Attackers leave at the end of each phase (the server stops work for a
client that has gone). Keep the machine otherwise idle; the whole run takes about 100 s with the defaults.

    .venv/bin/python benchmarks/abuse.py runs/demo
    .venv/bin/python benchmarks/abuse.py runs/demo --seconds 10 --clients 16
    .venv/bin/python benchmarks/abuse.py --port 8000 --pid 12345      # a server already running on 127.0.0.1

Writes benchmarks/results/abuse-<stamp>.json and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from _machine import cpu_name, git_commit, wait_until_healthy
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
TARGET_RSS_MB = 1500.0
MiB = 1024 * 1024
# The server's default limits (fmnist.serve.ServeSettings); the attacks are sized to them.
MAX_BYTES, MAX_PIXELS, MAX_IMAGES = 10 * MiB, 25_000_000, 64
JSON_BYTES = MAX_IMAGES * 28 * 28 * 32 + 64 * 1024
ATTACKS = ["baseline", "large-decodes", "slow-bodies", "max-json", "refused"]


# ----------------------------------------------------------------------------------------------- requests
def multipart(files: list[tuple[str, bytes, str]]) -> tuple[bytes, str]:
    boundary = "fmnistabuse"
    parts = [(f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n"
              f"Content-Type: {kind}\r\n\r\n").encode() + payload + b"\r\n" for name, payload, kind in files]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def http_request(port: int, body: bytes, content_type: str, length: int | None = None, host: str | None = None,
                 origin: str | None = None) -> bytes:
    """One complete POST /v1/predict; `length` may declare more than is sent (a slow or lying client)."""
    head = ["POST /v1/predict HTTP/1.1", f"Host: {host or f'127.0.0.1:{port}'}", f"Content-Type: {content_type}",
            f"Content-Length: {len(body) if length is None else length}", "Connection: close"]
    if origin:
        head.append(f"Origin: {origin}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def photo(size: tuple[int, int], mode: str, fmt: str) -> bytes:
    """A dark garment on a light background (what a phone sends), compressed: pixels cheap to send, dear to decode."""
    array = np.full(size[::-1], 230, np.uint8)
    array[size[1] // 4: 3 * size[1] // 4, size[0] // 3: 2 * size[0] // 3] = 40
    buffer = io.BytesIO()
    Image.fromarray(array).convert(mode).save(buffer, format=fmt)
    return buffer.getvalue()


def json_at_limit() -> bytes:
    """As many images of long decimals as the JSON limit allows (64 at the default: ~1.6 MB)."""
    row = ", ".join(["0.1234567890123456"] * 28)
    image = "[" + ", ".join([f"[{row}]"] * 28) + "]"
    count = min(MAX_IMAGES, (JSON_BYTES - 64) // (len(image) + 2))
    return ('{"images": [' + ", ".join([image] * count) + '], "scale": 1}').encode()


async def exchange(port: int, request: bytes) -> int:
    """Send `request` on a new connection and return the response's status (0: closed without one). A request
    shorter than its Content-Length leaves the client waiting, as a slow one would, until the server gives up."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        status_line = await reader.readline()
        await reader.read()  # the server closes the connection: Connection: close
        return int(status_line.split()[1]) if status_line else 0
    finally:
        writer.close()


# ----------------------------------------------------------------------------------------------- clients
async def attacker(port: int, requests: list[bytes], stop_at: float, statuses: dict[str, int]) -> None:
    """Sends its requests one after another until the phase ends, then leaves (cancelling what it waits for)."""
    sent = 0
    while (remaining := stop_at - time.perf_counter()) > 0:
        request = requests[sent % len(requests)]
        sent += 1
        try:
            status = await asyncio.wait_for(exchange(port, request), remaining)
            key = str(status)
        except (asyncio.TimeoutError, TimeoutError):
            key = "unfinished at phase end"
        except (OSError, ValueError, IndexError) as error:
            key = type(error).__name__
        statuses[key] = statuses.get(key, 0) + 1


async def normal_client(port: int, requests: list[bytes], stop_at: float, latencies: list[float],
                        errors: list[str]) -> None:
    """What the page sends, in a closed loop: every one must be answered 200."""
    sent = 0
    while time.perf_counter() < stop_at:
        started = time.perf_counter()
        try:
            status: int | str = await asyncio.wait_for(exchange(port, requests[sent % len(requests)]), 60)
        except (OSError, ValueError, IndexError, asyncio.TimeoutError, TimeoutError) as error:
            status = type(error).__name__
        sent += 1
        latencies.append(time.perf_counter() - started)
        if status != 200:
            errors.append(str(status))


# ----------------------------------------------------------------------------------------------- memory
class RssMonitor:
    """The server's resident memory, sampled every 50 ms in a thread; `peak_mb` also reads the kernel's VmHWM."""

    def __init__(self, pid: int):
        self.pid = pid
        self.samples: list[float] = []
        self._stop = threading.Event()
        try:
            import psutil

            self._process = psutil.Process(pid)
        except ImportError:
            self._process = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def rss_mb(self) -> float:
        if self._process is not None:
            return self._process.memory_info().rss / MiB
        return self._status_kb("VmRSS") / 1024

    def _status_kb(self, field: str) -> float:
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith(field + ":"):
                    return float(line.split()[1])
        except OSError:
            pass
        return 0.0

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            try:
                self.samples.append(self.rss_mb())
            except Exception:  # the process ended: keep what was sampled
                return

    def window(self) -> int:
        return len(self.samples)

    def peak_since(self, start: int) -> float:
        return max(self.samples[start:], default=0.0)

    def peak_mb(self) -> float:
        return max(max(self.samples, default=0.0), self._status_kb("VmHWM") / 1024)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)


# ----------------------------------------------------------------------------------------------- phases
def attacks(port: int) -> dict[str, list[bytes]]:
    """Each attack's requests (the slow ones send all but their last byte, then nothing)."""
    side = int(MAX_PIXELS ** 0.5)
    huge = photo((side, side), "RGBA", "PNG")
    files = min(MAX_IMAGES, (MAX_BYTES - 4096) // (len(huge) + 200))
    decodes, decodes_type = multipart([(f"{i}.png", huge, "image/png") for i in range(files)])
    upload, upload_type = multipart([("big.bin", os.urandom(MAX_BYTES - 400), "image/png")])
    big_json = json_at_limit()
    array = json.dumps({"image": [[0] * 28] * 28}).encode()
    return {
        "large-decodes": [http_request(port, decodes, decodes_type)],
        "slow-bodies": [http_request(port, upload[:-1], upload_type, len(upload)),
                        http_request(port, big_json[:-1], "application/json", len(big_json))],
        "max-json": [http_request(port, big_json, "application/json")],
        "refused": [http_request(port, b"", upload_type, 100 * MAX_BYTES),
                    http_request(port, array, "application/json", host="evil.example"),
                    http_request(port, array, "application/json", origin="http://evil.example")],
    }


def normal_requests(port: int) -> list[bytes]:
    body, kind = multipart([("shirt.jpg", photo((400, 300), "RGB", "JPEG"), "image/jpeg")])
    array = json.dumps({"image": [[0] * 28] * 28}).encode()
    return [http_request(port, body, kind), http_request(port, array, "application/json")]


async def phase(name: str, port: int, requests: list[bytes], clients: int, seconds: float, normal: list[bytes],
                monitor: RssMonitor) -> dict:
    statuses: dict[str, int] = {}
    latencies: list[float] = []
    errors: list[str] = []
    start = monitor.window()
    stop_at = time.perf_counter() + seconds
    attackers = clients if requests else 0
    await asyncio.gather(normal_client(port, normal, stop_at, latencies, errors),
                         *(attacker(port, requests, stop_at, statuses) for _ in range(attackers)))
    await asyncio.sleep(1.0)  # the server notices the departures and stops their work
    ms = np.array(latencies) * 1000
    return {"attack": name, "clients": attackers, "seconds": seconds, "statuses": statuses,
            "peak_rss_mb": round(monitor.peak_since(start), 1),
            "normal": {"requests": len(ms), "errors": len(errors), "error_samples": errors[:3],
                       "p50_ms": round(float(np.percentile(ms, 50)), 1) if len(ms) else None,
                       "p99_ms": round(float(np.percentile(ms, 99)), 1) if len(ms) else None,
                       "max_ms": round(float(ms.max()), 1) if len(ms) else None}}


# ----------------------------------------------------------------------------------------------- server, report
def start_server(run: Path, port: int, log: Path) -> subprocess.Popen:
    """`fmnist serve` with its default limits, logging to a file: a pipe nobody reads would fill and stall it."""
    command = [sys.executable, "-m", "fmnist", "serve", str(run), "--port", str(port), "--log-level", "error"]
    with log.open("w") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, text=True)
    wait_until_healthy(process, port, lambda: log.read_text()[-2000:])
    return process


def log_errors(log: Path) -> list[str]:
    """The server's logged errors (a traceback is a bug: every bad request should be a clean 4xx)."""
    text = log.read_text() if log.is_file() else ""
    return [line for line in text.splitlines() if "ERROR" in line or "Traceback" in line][:10]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def table(report: dict) -> str:
    lines = [f"{'attack':<14} {'clients':>7} {'attack answers':<44} {'peak RSS MB':>11} {'normal n':>8} "
             f"{'errors':>6} {'p50 ms':>8} {'p99 ms':>8}"]
    for row in report["attacks"]:
        normal = row["normal"]
        answers = ", ".join(f"{key}: {count}" for key, count in sorted(row["statuses"].items())) or "-"
        lines.append(f"{row['attack']:<14} {row['clients']:>7} {answers[:44]:<44} {row['peak_rss_mb']:>11.0f} "
                     f"{normal['requests']:>8} {normal['errors']:>6} {normal['p50_ms'] or 0:>8.1f} "
                     f"{normal['p99_ms'] or 0:>8.1f}")
    verdict = "met" if report["target"]["met"] else "MISSED"
    lines.append(f"server peak RSS {report['server_peak_rss_mb']:.0f} MB (target < {TARGET_RSS_MB:.0f}); normal "
                 f"requests {report['normal']['requests']}, errors {report['normal']['errors']}, p99 "
                 f"{report['normal']['p99_ms']} ms; server errors logged: "
                 f"{len(report['server_errors_logged'] or [])}: target {verdict}")
    return "\n".join(lines)


def summary(rows: list[dict]) -> dict:
    requests = sum(row["normal"]["requests"] for row in rows)
    return {"requests": requests, "errors": sum(row["normal"]["errors"] for row in rows),
            "p99_ms": max((row["normal"]["p99_ms"] or 0 for row in rows), default=None)}


async def run_phases(port: int, args: argparse.Namespace, monitor: RssMonitor) -> list[dict]:
    plan = {name: requests for name, requests in {"baseline": [], **attacks(port)}.items()
            if name in args.attacks}
    normal = normal_requests(port)
    rows = []
    for name, requests in plan.items():
        seconds = min(args.seconds, 5.0) if name == "baseline" else args.seconds
        rows.append(await phase(name, port, requests, args.clients, seconds, normal, monitor))
        print(f"  {name}: peak RSS {rows[-1]['peak_rss_mb']:.0f} MB, normal p99 {rows[-1]['normal']['p99_ms']} ms",
              file=sys.stderr, flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, nargs="?", default=ROOT / "runs" / "demo", help="run folder to serve")
    parser.add_argument("--seconds", type=float, default=20.0, help="time per attack (the baseline: at most 5 s)")
    parser.add_argument("--clients", type=int, default=16, help="attacking clients per attack")
    parser.add_argument("--attacks", nargs="+", default=ATTACKS, choices=ATTACKS, help="phases to run, in order")
    parser.add_argument("--port", type=int, default=None, help="target a server already running on this port")
    parser.add_argument("--pid", type=int, default=None, help="its process id (for its memory; with --port)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    args = parser.parse_args()
    if (args.port is None) != (args.pid is None):
        sys.exit("--port and --pid go together: the port to attack, the process to measure")
    if args.port is None and not (args.run / "model.json").is_file():
        sys.exit(f"{args.run} is not a run folder (no model.json); train one with `make demo` or `fmnist train`")
    server = None
    port = args.port or free_port()
    log = Path(tempfile.gettempdir()) / f"fmnist-abuse-server-{port}.log"
    if args.port is None:
        server = start_server(args.run, port, log)
    monitor = RssMonitor(args.pid or server.pid)
    baseline_mb = monitor.rss_mb()
    try:
        rows = asyncio.run(run_phases(port, args, monitor))
    finally:
        peak = monitor.peak_mb()
        monitor.stop()
        if server is not None:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                print("the server did not stop within 30 s of SIGTERM; killed", file=sys.stderr)
    normal = summary(rows)
    errors_logged = log_errors(log) if server is not None else None
    import torch  # only now: the load generator itself stays light while it measures

    from fmnist.devices import cpu_class

    report = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "commit": git_commit(),
              "machine": {"cpu": cpu_name(), "cpu_class": cpu_class(), "cores": os.cpu_count(),
                          "torch": torch.__version__, "precision": "fp32 (the served model's inference)"},
              "run": str(args.run),
              "server_start_rss_mb": round(baseline_mb, 1), "server_peak_rss_mb": round(peak, 1),
              "attacks": rows, "normal": normal, "server_errors_logged": errors_logged,
              "target": {"peak_rss_mb_below": TARGET_RSS_MB,
                         "met": peak < TARGET_RSS_MB and normal["errors"] == 0 and normal["requests"] > 0
                                and not errors_logged}}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"abuse-{datetime.now().strftime('%Y-%m-%dT%H%M%S')}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))
    print(f"wrote {path}")
    return 0 if report["target"]["met"] else 1


if __name__ == "__main__":
    sys.exit(main())

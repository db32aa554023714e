"""What every benchmark records about the machine and code it ran on (imported by the scripts in this folder).

The CPU model comes from `fmnist.hardware.cpu_model`, the one place that reads it, so results files and a run's
metrics.json name the same CPU the same way.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from fmnist.hardware import cpu_model

ROOT = Path(__file__).resolve().parent.parent


def cpu_name() -> str:
    """The CPU model, as `fmnist.hardware.cpu_model` reads it (kept under this name for the scripts that import it)."""
    return cpu_model()


def git_commit(root: Path = ROOT) -> str:
    """`git rev-parse --short HEAD`, plus `-dirty` when tracked or new (not ignored) files differ from it: a number
    measured on uncommitted code must say so. "unknown" outside a git checkout."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True).stdout.strip()
        changes = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True,
                                 check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("-dirty" if changes else "")


def wait_until_healthy(process, port: int, failure) -> None:
    """Wait (up to 2 minutes) until the `fmnist serve` in `process` answers /healthz on 127.0.0.1:`port`; else kill
    it and exit with `failure()` (the server's log or output) as the message."""
    import sys
    import time
    import urllib.request

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2):
                return
        except OSError:
            if process.poll() is not None:
                break
            time.sleep(0.2)
    process.kill()
    sys.exit(f"the server did not start: {failure()}")

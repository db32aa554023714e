"""`python -m fmnist train` as a real process stopped by SIGTERM: exit 130, a consistent run folder, then resume.

The runs use `--threads 1`: on a busy 2-core machine torch's default two threads spin against each other and an
epoch of this MLP takes seconds instead of a fraction of one; the thread count changes nothing under test.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")


class TrainProcess:
    """`python -m fmnist train ...` with its stdout read line by line in a thread, stderr into a file."""

    def __init__(self, args: list[str], workdir: Path):
        self.stderr_path = workdir / "train-stderr.txt"
        self._stderr = self.stderr_path.open("w")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.process = subprocess.Popen([sys.executable, "-m", "fmnist", "train", *args], stdout=subprocess.PIPE,
                                        stderr=self._stderr, text=True, env=env, cwd=workdir)
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for_line(self, prefix: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.kill()
                pytest.fail(f"no line starting with {prefix!r} within {timeout} s; stdout so far: {self.lines}")
            if line is None:
                self.finish(timeout=5)
                pytest.fail(f"process ended (exit {self.process.returncode}) before a line starting with "
                            f"{prefix!r}; stdout: {self.lines}; stderr: {self.stderr}")
            self.lines.append(line)
            if line.startswith(prefix):
                return line

    def finish(self, timeout: float) -> tuple[int, str, str]:
        """Wait for the exit; return (exit code, all stdout, stderr)."""
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"process still running {timeout} s later; stdout: {self.lines}")
        self._reader.join(timeout=10)
        while not self._queue.empty():
            line = self._queue.get_nowait()
            if line is not None:
                self.lines.append(line)
        return code, "\n".join(self.lines), self.stderr

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def kill(self) -> None:
        """Make sure nothing outlives the test (a no-op once the process has exited)."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self._reader.join(timeout=10)
        self.process.stdout.close()
        self._stderr.close()


def temporaries(run: Path) -> list[Path]:
    return [p for p in run.rglob(".*") if p.is_file()]


def interrupt_after_first_epoch(args: list[str], workdir: Path) -> tuple[int, str, str]:
    train = TrainProcess(args, workdir)
    try:
        train.wait_for_line("epoch", timeout=60)
        train.process.send_signal(signal.SIGTERM)
        return train.finish(timeout=30)
    finally:
        train.kill()


def test_sigterm_stops_cleanly_with_exit_130(use_real_data, tmp_path):
    run = tmp_path / "run"
    code, out, err = interrupt_after_first_epoch(
        ["--preset", "classic-adam", "--train-subset", "6000", "--epochs", "30", "--threads", "1", "--out", str(run)],
        tmp_path)
    assert code == 130, f"stdout:\n{out}\nstderr:\n{err}"
    assert "Traceback" not in err
    assert "--resume" in err and f"fmnist train --resume {run}" in err
    assert f"run folder: {run}" in out
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["interrupted"] is True
    assert 1 <= metrics["epochs_run"] < 30 and metrics["epochs_planned"] == 30
    meta = json.loads((run / "model.json").read_text())
    assert meta["metrics"]["interrupted"] is True and meta["metrics"]["epochs_run"] == metrics["epochs_run"]
    assert (run / "model.safetensors").stat().st_size > 100_000
    assert len((run / "history.csv").read_text().splitlines()) == 1 + metrics["epochs_run"]
    assert json.loads((run / "resume.json").read_text())["epoch"] >= 1
    assert not temporaries(run), temporaries(run)


def test_interrupted_run_resumes_to_completion(use_real_data, tmp_path):
    run = tmp_path / "run"
    # 30,000 images: an epoch lasts long enough that the signal lands before the three epochs are over.
    code, out, err = interrupt_after_first_epoch(
        ["--preset", "classic-adam", "--train-subset", "30000", "--epochs", "3", "--threads", "1", "--out", str(run)],
        tmp_path)
    assert code == 130, f"the run was not interrupted (exit {code}); stdout:\n{out}\nstderr:\n{err}"
    stopped = json.loads((run / "metrics.json").read_text())
    assert stopped["interrupted"] is True and 1 <= stopped["epochs_run"] < 3

    resumed = subprocess.run([sys.executable, "-m", "fmnist", "train", "--resume", str(run), "--quiet"],
                             capture_output=True, text=True, timeout=120, cwd=tmp_path, check=False,
                             env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout == "" and "Traceback" not in resumed.stderr
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["epochs_run"] == 3 and metrics["interrupted"] is False
    history = (run / "history.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in history[1:]] == ["1", "2", "3"]
    assert json.loads((run / "config.json").read_text())["threads"] == 1  # the stored config wins on resume
    assert json.loads((run / "model.json").read_text())["metrics"]["epochs_run"] == 3
    assert not temporaries(run), temporaries(run)

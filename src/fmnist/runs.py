"""The run folders on disk: list them, and set several side by side.

A run folder is whatever `fmnist train` wrote: `model.json` (with the metrics), `history.csv`, and the weights.
Folders that hold only a resume checkpoint (training was stopped before it finished) are listed as unfinished.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from fmnist import checkpoint
from fmnist.checkpoint import read_history
from fmnist.errors import ModelFileError

__all__ = ["list_runs", "read_history", "summary"]


def summary(run_dir: str | os.PathLike) -> dict[str, Any]:
    """One run's row: name, preset, model, test accuracy, training time, epochs, date, state."""
    run_dir = Path(run_dir)
    if (run_dir / checkpoint.META_FILE).is_file():
        meta = checkpoint.read_meta(run_dir)
        metrics = meta.metrics
        return {"name": run_dir.name, "path": str(run_dir), "preset": meta.preset, "model": meta.architecture.name,
                "test_accuracy": metrics.get("test_accuracy"), "val_accuracy": metrics.get("val_accuracy"),
                "train_seconds": metrics.get("train_seconds"), "epochs": metrics.get("epochs_run"),
                "created": meta.created, "state": "interrupted" if metrics.get("interrupted") else "done"}
    if (run_dir / checkpoint.RESUME_META).is_file():
        config = checkpoint.read_json_or_empty(run_dir / checkpoint.CONFIG_FILE)
        state = checkpoint.read_json_or_empty(run_dir / checkpoint.RESUME_META)
        return {"name": run_dir.name, "path": str(run_dir), "preset": config.get("preset"),
                "model": config.get("model"), "test_accuracy": None, "val_accuracy": None,
                "train_seconds": state.get("train_seconds"), "epochs": state.get("epoch"), "created": None,
                "state": "unfinished"}
    raise ModelFileError(f"{run_dir}: not a run folder (no model.json or resume checkpoint); "
                         "give folders written by `fmnist train`")


def _prefixes(relative: Path) -> list[Path]:
    """a/b/c -> [a, a/b, a/b/c]."""
    parts = relative.parts
    return [Path(*parts[:i]) for i in range(1, len(parts) + 1)]


def list_runs(root: str | os.PathLike = "runs") -> list[dict[str, Any]]:
    """Every run folder under `root` (three levels deep, so sweep trials show too), newest first; symlinks (a
    sweep's `best`) are skipped so no run is listed twice."""
    root = Path(root)
    if not root.is_dir():
        raise ModelFileError(f"{root}: no such folder; train a model first (`make demo` or `fmnist train`) "
                             "or name the folder that holds your runs")
    found = {p.parent for depth in ("*", "*/*", "*/*/*") for name in (checkpoint.META_FILE, checkpoint.RESUME_META)
             for p in root.glob(f"{depth}/{name}")
             if not any((root / part).is_symlink() for part in _prefixes(p.parent.relative_to(root)))}
    rows = []
    for folder in found:
        try:
            rows.append(summary(folder))
        except ModelFileError:
            continue
        rows[-1]["name"] = str(folder.relative_to(root))
        rows[-1]["modified"] = folder.stat().st_mtime
    return sorted(rows, key=lambda row: row["modified"], reverse=True)

"""The run folders on disk: list them, and set several side by side.

A run folder is whatever `fmnist train` wrote: `model.json` (with the metrics), `history.csv`, and the weights.
Folders that hold only a resume checkpoint (training was stopped before it finished) are listed as unfinished.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

from fmnist.errors import ModelFileError


def read_history(run_dir: Path) -> list[dict[str, float]]:
    """history.csv as rows of floats (empty cells dropped), or [] when the run has none."""
    path = Path(run_dir) / "history.csv"
    if not path.is_file():
        return []
    with path.open(newline="") as handle:
        return [{key: float(value) for key, value in row.items() if value not in ("", None)}
                for row in csv.DictReader(handle)]


def summary(run_dir: str | os.PathLike) -> dict[str, Any]:
    """One run's row: name, preset, model, test accuracy, training time, epochs, date, state."""
    run_dir = Path(run_dir)
    model_json, resume_json = run_dir / "model.json", run_dir / "resume.json"
    if model_json.is_file():
        try:
            meta = json.loads(model_json.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ModelFileError(f"{model_json}: not valid JSON ({error}); the run folder is damaged") from None
        metrics = meta.get("metrics", {})
        return {"name": run_dir.name, "path": str(run_dir), "preset": meta.get("preset"),
                "model": meta.get("architecture", {}).get("name"), "test_accuracy": metrics.get("test_accuracy"),
                "val_accuracy": metrics.get("val_accuracy"), "train_seconds": metrics.get("train_seconds"),
                "epochs": metrics.get("epochs_run"), "created": meta.get("created"),
                "state": "interrupted" if metrics.get("interrupted") else "done"}
    if resume_json.is_file():
        config = _read_json(run_dir / "config.json")
        state = _read_json(resume_json)
        return {"name": run_dir.name, "path": str(run_dir), "preset": config.get("preset"),
                "model": config.get("model"), "test_accuracy": None, "val_accuracy": None,
                "train_seconds": state.get("train_seconds"), "epochs": state.get("epoch"), "created": None,
                "state": "unfinished"}
    raise ModelFileError(f"{run_dir}: not a run folder (no model.json or resume checkpoint); "
                         "give folders written by `fmnist train`")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}


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
    found = {p.parent for depth in ("*", "*/*", "*/*/*") for name in ("model.json", "resume.json")
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

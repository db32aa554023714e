"""The run folders on disk: list them, and set several side by side.

A run folder is whatever `fmnist train` wrote: `model.json` (with the metrics), `history.csv`, and the weights.
Folders that hold only a resume checkpoint (training was stopped before it finished) are listed as unfinished.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

from fmnist import checkpoint
from fmnist.errors import ModelFileError, short_repr

__all__ = ["list_runs", "read_history", "summary"]

_TEXT_FIELDS = ("preset", "model", "created")
_NUMBER_FIELDS = ("test_accuracy", "val_accuracy", "train_seconds")


def _checked(row: dict[str, Any], source: Path) -> dict[str, Any]:
    """Refuse a summary value of the wrong type: the tables format these as text and numbers, so a hand-edited or
    damaged file must be a one-line error naming it, not a ValueError in the middle of a listing."""
    for key in _TEXT_FIELDS + _NUMBER_FIELDS + ("epochs",):
        value = row[key]
        if value is None:
            continue
        if key in _TEXT_FIELDS:
            wanted, ok = "text", isinstance(value, str)
        elif key == "epochs":
            wanted, ok = "a whole number", isinstance(value, int) and not isinstance(value, bool)
        else:
            wanted, ok = "a number", isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok:
            raise ModelFileError(f"{source}: {key} {short_repr(value)} is not {wanted}; the file is damaged, "
                                 "retrain or restore it")
    return row


def read_history(run_dir: str | os.PathLike) -> list[dict[str, float]]:
    """history.csv as rows of floats, or [] when the run has none; a damaged file is a one-line `ModelFileError`
    naming it (the checkpoint reader lets `float('abc')` escape as a bare ValueError)."""
    try:
        return checkpoint.read_history(run_dir)
    except (ValueError, csv.Error, OSError) as error:  # UnicodeDecodeError is a ValueError
        raise ModelFileError(f"{Path(run_dir) / checkpoint.HISTORY_FILE}: not a history of numbers "
                             f"({' '.join(str(error).split())[:80]}); the file is damaged, retrain or restore it") \
            from None


def summary(run_dir: str | os.PathLike) -> dict[str, Any]:
    """One run's row: name, preset, model, test accuracy, training time, epochs, date, state."""
    run_dir = Path(run_dir)
    if (run_dir / checkpoint.META_FILE).is_file():
        meta = checkpoint.read_meta(run_dir)
        metrics = meta.metrics
        row = {"name": run_dir.name, "path": str(run_dir), "preset": meta.preset, "model": meta.architecture.name,
               "test_accuracy": metrics.get("test_accuracy"), "val_accuracy": metrics.get("val_accuracy"),
               "train_seconds": metrics.get("train_seconds"), "epochs": metrics.get("epochs_run"),
               "created": meta.created, "state": "interrupted" if metrics.get("interrupted") else "done"}
        return _checked(row, run_dir / checkpoint.META_FILE)
    if (run_dir / checkpoint.RESUME_META).is_file():
        config = checkpoint.read_json_or_empty(run_dir / checkpoint.CONFIG_FILE)
        state = checkpoint.read_json_or_empty(run_dir / checkpoint.RESUME_META)
        return _checked({"name": run_dir.name, "path": str(run_dir), "preset": config.get("preset"),
                         "model": config.get("model"), "test_accuracy": None, "val_accuracy": None,
                         "train_seconds": state.get("train_seconds"), "epochs": state.get("epoch"), "created": None,
                         "state": "unfinished"}, run_dir)
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
            row = summary(folder)
        except ModelFileError as error:  # one damaged folder is listed as such, never hides the others
            row = _damaged(folder, error)
        row["name"] = str(folder.relative_to(root))
        row["modified"] = folder.stat().st_mtime
        rows.append(row)
    return sorted(rows, key=lambda row: row["modified"], reverse=True)


def _damaged(folder: Path, error: ModelFileError) -> dict[str, Any]:
    """The row of a run folder whose files cannot be read: state "damaged" and the one-line reason."""
    return {"name": folder.name, "path": str(folder), "preset": None, "model": None, "test_accuracy": None,
            "val_accuracy": None, "train_seconds": None, "epochs": None, "created": None, "state": "damaged",
            "error": str(error)}

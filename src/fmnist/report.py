"""The text the `fmnist` command prints: pure functions from plain data to lines, so cli.py stays thin.

Nothing here prints, writes files or imports torch; each function returns a string or a list of lines.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fmnist import events
from fmnist.hardware import CPU_CLASSES

if TYPE_CHECKING:
    from fmnist.events import Start
    from fmnist.sweep import SweepSpec

BAR_WIDTH = 30  # characters of `#` for a probability of 1


def count(number: int, noun: str) -> str:
    """`1 epoch`, `3 epochs`: a number with its noun, plural when it is not one."""
    return f"{number} {noun}{'' if number == 1 else 's'}"


# ----------------------------------------------------------------------------------------------- data
def dataset_line(file_format: str, path: str | Path, origin: str) -> str:
    """Where the dataset was found, printed before loading so a failing load still says which files it read."""
    return f"dataset:   Fashion-MNIST ({file_format.upper()}) in {path} (found via {origin})"


def checksums_line(verified: bool) -> str:
    """Whether the IDX files were checked against the published MD5 (a skipped check is said out loud)."""
    return "checksums: " + ("all 4 files match the published MD5" if verified else "skipped (--no-verify)")


def class_count_table(class_names: Sequence[str], counts: Mapping[str, Sequence[int]]) -> list[str]:
    """Images per class and split, with totals: shows at a glance whether the data is balanced and complete."""
    splits = list(counts)
    lines = [f"{'class':<14}" + "".join(f"{split:>8}" for split in splits)]
    for index, name in enumerate(class_names):
        lines.append(f"{index} {name:<12}" + "".join(f"{counts[split][index]:>8}" for split in splits))
    lines.append(f"{'total':<14}" + "".join(f"{sum(counts[split]):>8}" for split in splits))
    return lines


def pixel_stats_line(split: str, mean: float, std: float, shape: Sequence[int], dtype: str) -> str:
    """A split's pixel mean and spread on 0..1, shape and dtype: the numbers normalisation depends on."""
    return f"{split} pixels: mean {mean:.4f}, std {std:.4f} (on 0..1), shape {tuple(shape)}, dtype {dtype}"


# ----------------------------------------------------------------------------------------------- train
def presets_table(presets: Mapping[str, Mapping[str, Any]], expected: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """One row per preset with its benchmarked accuracy and time, so a choice can be made without reading code."""
    classes = [name for name in reversed(CPU_CLASSES) if any(name in expected.get(preset, {}) for preset in presets)]
    lines = [f"{'preset':<18} " + "".join(f"{name + ' CPU':<20}" for name in classes) + "description"]
    for name, values in presets.items():
        results = expected.get(name, {})
        cells = [f"{results[cls]['test_accuracy']:.2%} in {results[cls]['train_seconds']:.0f} s"
                 if cls in results else "-" for cls in classes]
        lines.append(f"{name:<18} " + "".join(f"{cell:<20}" for cell in cells) + values["description"])
    if classes:
        lines.append("(test accuracy and training time of the latest benchmark on 2 cores, per CPU class: "
                     "benchmarks/results/time_to_accuracy.md)")
    return lines


def train_start_line(event: Start) -> str:
    """What is about to train, on how much data and where: the one line to check before waiting for it."""
    config = event.config
    where = event.device + (f" and {event.processes - 1} more processes" if event.processes > 1 else "")
    budget = f" (what fits a {duration(config.budget)} budget here)" if config.budget else ""
    return (f"training {config.preset} ({config.model}, {event.parameters:,} parameters) on "
            f"{event.train_size:,} images, {count(event.epochs, 'epoch')}{budget} of {event.steps_per_epoch} steps, "
            f"on {where}, {event.precision}")


def duration(seconds: float) -> str:
    """90 -> "1m30s", 180 -> "3m", 45 -> "45s": how people write a time budget."""
    minutes, rest = divmod(round(seconds), 60)
    return (f"{minutes}m" if minutes else "") + (f"{rest}s" if rest or not minutes else "")


def step_metrics(loss: float, accuracy: float) -> str:
    """The running loss and accuracy shown beside the live progress bar."""
    return f"loss {loss:.4f} accuracy {accuracy:.4f}"


def epoch_line(epoch: int, row: Mapping[str, Any]) -> str:
    """An epoch's history row as one line, so a log or a pipe keeps the curve even without the live bar."""
    parts = [f"epoch {epoch:>3}", f"loss {row['loss']:.4f}", f"accuracy {row['accuracy']:.4f}"]
    parts += [f"{key} {row[key]:.4f}" for key in ("val_loss", "val_accuracy", "test_accuracy") if key in row]
    return "  ".join([*parts, f"{row['seconds']:.1f}s"])


def train_summary_lines(metrics: Mapping[str, Any], out_dir: str | Path) -> list[str]:
    """Why training stopped, the final test numbers and where the run lives: the end of `fmnist train`."""
    lines = [f"stopped early: {metrics['stop_reason']}"] if metrics["stop_reason"] else []
    tta = f" (with TTA {metrics['test_accuracy_tta']:.4f})" if "test_accuracy_tta" in metrics else ""
    calibrated = (f" ({metrics['test_loss_calibrated']:.4f} calibrated)" if "test_loss_calibrated" in metrics
                  else "")
    lines.append(f"test accuracy {metrics['test_accuracy']:.4f}{tta}, test loss {metrics['test_loss']:.4f}"
                 f"{calibrated}, {count(metrics['epochs_run'], 'epoch')} in {metrics['train_seconds']:.1f} s of "
                 "training")
    lines.append(f"run folder: {out_dir}")
    return lines


# ----------------------------------------------------------------------------------------------- evaluate, predict
def evaluation_lines(model: str, result: Mapping[str, Any]) -> list[str]:
    """The evaluation report (`result` as written to evaluation.json): totals, per-class scores, main confusions."""
    tta = result.get("tta")
    flipped = f"  (TTA: loss {tta['loss']:.4f}, accuracy {tta['accuracy']:.4f})" if tta else ""
    lines = [f"{model} on {result['test_size']:,} test images",
             f"probabilities calibrated on the validation split (temperature {result['temperature']:.2f})"
             if result["calibrated"] else "probabilities not calibrated (the run had no validation split)",
             f"test loss {result['loss']:.4f}  test accuracy {result['accuracy']:.4f}{flipped}",
             "", f"{'class':<14}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>9}"]
    for row in result["per_class"]:
        lines.append(f"{row['class']:<14}{row['precision']:>10.3f}{row['recall']:>10.3f}{row['f1']:>10.3f}"
                     f"{row['support']:>9}")
    lines += ["", "most confused (true -> predicted):"]
    for pair in result["most_confused"]:
        lines.append(f"  {pair['true']:>12} -> {pair['predicted']:<12} {pair['count']:>4} images")
    return lines


def probability_bar(name: str, probability: float) -> str:
    """One class's probability as a number and a bar of `#`, readable at a glance in a terminal."""
    return f"    {name:<12} {probability:7.2%} {'#' * int(round(probability * BAR_WIDTH))}"


def answer_lines(title: str, answer: Mapping[str, Any]) -> list[str]:
    """A Classifier.answer as the best guess with its warnings, then a bar per top class."""
    best = answer["top"][0]
    flags = []
    if answer.get("unusual"):
        flags.append("this does not look like a Fashion-MNIST garment")
    if answer["unsure"]:
        flags.append("unsure")
    lines = [f"{title}: {best['class']} ({best['probability']:.1%})" + (f"  [{'; '.join(flags)}]" if flags else "")]
    return lines + [probability_bar(item["class"], item["probability"]) for item in answer["top"]]


def labelled_image_lines(item: Mapping[str, Any], top: int | None = None) -> list[str]:
    """A test image's prediction against its true label, then the `top` classes' probabilities (every class when
    None), most probable first."""
    mark = "right" if item["predicted"] == item["true"] else "WRONG"
    lines = [f"test image {item['index']}: {item['predicted']} ({item['probability']:.1%}), "
             f"true {item['true']} [{mark}]"]
    ranked = sorted(item["probabilities"].items(), key=lambda kv: -kv[1])[:top]
    return lines + [probability_bar(name, p) for name, p in ranked]


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _safe_cell(value: Any) -> Any:
    """A cell a spreadsheet will not run as a formula (CSV injection through a file name): text starting with
    = + - @ (or a tab or carriage return) gets a leading quote; numbers, negative ones included, stay numbers."""
    if not isinstance(value, str) or not value.startswith(_FORMULA_START):
        return value
    try:
        float(value)
    except ValueError:
        return "'" + value
    return value


def predictions_csv(rows: Sequence[Mapping[str, Any]], classes: Sequence[str]) -> str:
    """One CSV row per file (an unreadable file keeps its row, with the error), for spreadsheets and scripts."""
    table: list[list[Any]] = [["file", "predicted", "probability", "unsure", "unusual", "error", *classes]]
    for row in rows:
        if "error" in row:
            table.append([row["file"], "", "", "", "", row["error"], *[""] * len(classes)])
        else:
            best = row["top"][0]
            table.append([row["file"], best["class"], f"{best['probability']:.6f}", row["unsure"], row["unusual"],
                          "", *(f"{row['probabilities'][c]:.6f}" for c in classes)])
    buffer = io.StringIO()
    csv.writer(buffer).writerows([_safe_cell(cell) for cell in line] for line in table)
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------------- sweep
def sweep_start_line(spec: SweepSpec, concurrency: int, out_dir: str | Path) -> str:
    """What the sweep will run, how and where, printed before the (long) wait."""
    stopping = f", ASHA on {spec.metric}" if spec.asha else ""
    return (f"sweep {spec.name}: {count(spec.trial_count(), 'trial')} of preset {spec.preset} "
            f"({spec.search} search{stopping}), {concurrency} at a time with {spec.trial_threads} torch thread(s) "
            f"each, into {out_dir}")


def sweep_event_line(event: events.SweepEvent) -> str | None:
    """A sweep progress event as one line, or None for events not worth a line."""
    from fmnist.sweep import format_params

    if isinstance(event, events.TrialStart):
        return f"{event.trial} started: {format_params(event.params)}"
    if isinstance(event, events.TrialResult):
        return f"{event.trial} epoch {event.epoch}: {event.metric} {event.value:.4f}"
    if isinstance(event, events.TrialError):
        return f"{event.trial} failed"
    return None


def sweep_table(metric: str, trials: Sequence[Mapping[str, Any]], out_dir: str | Path) -> list[str]:
    """The ranked trials (best starred) and where the best run folder is: the answer a sweep was run for."""
    from fmnist.sweep import format_params

    width = max(len("trial"), *(len(trial["trial"]) for trial in trials))
    lines = ["", f"{'rank':>5}  {'trial':<{width}}  {metric:>12}  {'epochs':>6}  {'status':<13} {'test acc':>8}  "
                 "params"]
    for trial in trials:
        rank = f"{'*' if trial['best'] else ''}{trial['rank']}"
        value = f"{trial['metric']:.4f}" if trial["metric"] is not None else "-"
        epochs = f"{trial['epochs_run']}/{trial['epochs_planned']}" if trial["epochs_planned"] else "-"
        test = f"{trial['test_accuracy']:.2%}" if trial["test_accuracy"] is not None else "-"
        lines.append(f"{rank:>5}  {trial['trial']:<{width}}  {value:>12}  {epochs:>6}  {trial['status']:<13} "
                     f"{test:>8}  {format_params(trial['params'])}")
    best = next((trial for trial in trials if trial["best"]), None)
    if best:
        out_dir = Path(out_dir)
        lines.append(f"* best: {best['trial']} ({metric} {best['metric']:.4f}), run folder {out_dir / best['run']} "
                     f"(also {out_dir / 'best'})")
    return lines


def sweep_failures(trials: Sequence[Mapping[str, Any]], shown: int = 3) -> list[str]:
    """The first few failed trials with their error, so a broken sweep explains itself without opening files."""
    failed = [trial for trial in trials if trial["status"] == "failed"]
    return [f"{trial['trial']} failed: {trial['error']}" for trial in failed[:shown]]


# ----------------------------------------------------------------------------------------------- runs, compare
def runs_table(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """One row per run folder (fmnist.runs.list_runs), so old runs can be found and told apart."""
    width = max(len("run"), *(len(row["name"]) for row in rows))
    lines = [f"{'run':<{width}}  {'preset':<18} {'model':<10} {'test acc':>8} {'train s':>8} {'epochs':>6}  created"]
    for row in rows:
        accuracy = f"{row['test_accuracy']:.2%}" if row["test_accuracy"] is not None else row["state"]
        seconds = f"{row['train_seconds']:.0f}" if row["train_seconds"] is not None else "-"
        created = (row["created"] or "-")[:16].replace("T", " ")
        epochs = row["epochs"] if row["epochs"] is not None else "-"
        lines.append(f"{row['name']:<{width}}  {row['preset'] or '-':<18} {row['model'] or '-':<10} {accuracy:>8} "
                     f"{seconds:>8} {epochs:>6}  {created}")
    return lines


COMPARED = (("preset", "{}"), ("model", "{}"), ("test_accuracy", "{:.2%}"), ("val_accuracy", "{:.2%}"),
            ("train_seconds", "{:.1f}"), ("epochs", "{}"), ("state", "{}"))


def compare_table(names: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Runs side by side, one column each (fmnist.runs.summary rows), so their differences line up."""
    width = max(14, *(len(name) for name in names))
    lines = [f"{'':<14}" + "".join(f"{name:>{width + 2}}" for name in names)]
    for key, shown in COMPARED:
        values = [shown.format(row[key]) if row[key] is not None else "-" for row in rows]
        lines.append(f"{key:<14}" + "".join(f"{value:>{width + 2}}" for value in values))
    return lines

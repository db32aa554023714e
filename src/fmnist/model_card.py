"""The model card: `README.md` in every run folder, rendered from what the run folder's JSON files hold.

`render` is a pure function (run metadata, the metrics dict that becomes metrics.json, the history) -> Markdown, so
every number on the card is formatted from the same values as metrics.json and cannot drift from it. The card opens
with YAML front matter a model hub reads (license, tags, dataset, a `model-index` with the test accuracy); it is
written by hand here because PyYAML is only an optional extra. Torch-free: a card can be rendered anywhere.
"""

from __future__ import annotations

import json
import math
import os
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fmnist.checkpoint import Calibration, RunMeta, final_dir
from fmnist.config import PRESETS, TrainConfig, preset_value
from fmnist.files import atomic_write_text

__all__ = ["CARD_FILE", "describe_architecture", "render", "run_label", "write"]

CARD_FILE = "README.md"
HISTORY_ROWS = 30  # epochs shown on the card; history.csv holds them all
# The exported graph's input name (`fmnist.export.INPUT_NAME`; not imported: export loads torch and onnx).
ONNX_INPUT = "images"
_KINDS = {"mlp": "An MLP (dense network)", "convnet": "A batch-norm ConvNet", "keras-cnn": "A Keras-style CNN"}
_ACTIVATIONS = {"relu": "nn.ReLU()", "tanh": "nn.Tanh()", "sigmoid": "nn.Sigmoid()", "gelu": "nn.GELU()"}


def write(run_dir: str | os.PathLike, meta: RunMeta, metrics: Mapping[str, Any],
          history: Sequence[Mapping[str, Any]]) -> Path:
    """Write the card into `run_dir` atomically; `write_run` calls it before model.json, which comes last."""
    run_dir = Path(run_dir)
    return atomic_write_text(run_dir / CARD_FILE, render(meta, metrics, history, run_label(run_dir)))


def run_label(run_dir: str | os.PathLike) -> str:
    """How the card's commands name the run: the path it was trained into when relative (`runs/fast`), else only
    the folder's name, so a card shared on a hub carries no home directory. A folder being built to replace a run
    (`--overwrite`) is named as the run it becomes."""
    folder = final_dir(run_dir)
    return folder.name if folder.is_absolute() else folder.as_posix()


def render(meta: RunMeta, metrics: Mapping[str, Any], history: Sequence[Mapping[str, Any]],
           run_path: str = "RUN") -> str:
    """The whole card as Markdown. `run_path` is the folder its load commands name."""
    config = meta.config
    sections = [
        _front_matter(metrics, Path(run_path).name or "fmnist-model"),
        f"# {Path(run_path).name or 'fmnist model'}: a Fashion-MNIST classifier ({meta.architecture.name})",
        _introduction(meta, metrics),
        "## Model and training\n\n" + _table(("setting", "value"), _training_rows(meta, metrics)),
        "## Data\n\n" + _data_text(config, metrics),
        "## Results\n\n" + _table(("metric", "value"), _metric_rows(metrics)),
        "## Per-class scores\n\n" + _per_class_text(metrics),
        "## Calibration\n\n" + _calibration_text(meta.calibration),
        "## Intended use and limits\n\n" + _limits_text(metrics),
        "## How to use it\n\n" + _usage_text(meta, run_path),
        "## Training history\n\n" + _history_text(history),
    ]
    return "\n\n".join(section.rstrip() for section in sections) + "\n"


# ----------------------------------------------------------------------------------------------- front matter
def _yaml_string(value: str) -> str:
    """A YAML double-quoted scalar: JSON's string syntax is a subset of it, escapes included."""
    return json.dumps(value)


def _yaml_number(value: Any) -> str:
    """The number exactly as metrics.json holds it (so a hub shows the same value), `.nan` when missing."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return ".nan"
    return repr(value)


def _test_set_words(metrics: Mapping[str, Any], config: Mapping[str, Any]) -> str:
    """Which test images the numbers are on, said where it differs from the standard 10,000."""
    if config.get("split") == "pooled":
        return f"{metrics.get('test_size', 0):,} images of a random re-split of all 70,000 (not the standard test set)"
    if config.get("test_subset"):
        return f"the first {metrics.get('test_size', 0):,} test images only (a smoke run)"
    return f"the {metrics.get('test_size', 10000):,} test images"


def _front_matter(metrics: Mapping[str, Any], name: str) -> str:
    """License, tags, dataset and a `model-index` with the test accuracy (and TTA accuracy when measured)."""
    results = [("Test accuracy", metrics.get("test_accuracy"))]
    if "test_accuracy_tta" in metrics:
        results.append(("Test accuracy, TTA (flips, 1-pixel shifts)", metrics["test_accuracy_tta"]))
    lines = ["---", "library_name: pytorch", "license: mit", "pipeline_tag: image-classification",
             "tags:", "- image-classification", "- fashion-mnist", "datasets:", "- fashion_mnist",
             "metrics:", "- accuracy", "model-index:", f"- name: {_yaml_string(name)}", "  results:",
             "  - task:", "      type: image-classification", "      name: Image Classification",
             "    dataset:", "      type: fashion_mnist", "      name: Fashion-MNIST", "      split: test",
             "    metrics:"]
    for title, value in results:
        lines += ["    - type: accuracy", f"      value: {_yaml_number(value)}", f"      name: {_yaml_string(title)}"]
    return "\n".join([*lines, "---"])


# ----------------------------------------------------------------------------------------------- text helpers
def _cell(value: Any) -> str:
    """A table cell: one line, pipes escaped, so a class name or a note cannot break the table."""
    return " ".join(str(value).split()).replace("|", "\\|")


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table (what hubs and code hosts render)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(_cell(value) for value in row) + " |" for row in rows])


def _score(value: Any) -> str:
    """A fraction as the card prints it: 4 decimals (the per-class table and the metrics alike)."""
    return f"{value:.4f}" if isinstance(value, (int, float)) and math.isfinite(value) else "-"


def _code(language: str, lines: Sequence[str]) -> str:
    """A fenced code block, tagged so hubs highlight it and a reader can paste it whole."""
    return "\n".join([f"```{language}", *lines, "```"])


def _duration(seconds: float) -> str:
    """Seconds, with minutes beside them once they stop being easy to read."""
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds:.0f} s ({seconds / 60:.1f} min)"


# ----------------------------------------------------------------------------------------------- what it is
def describe_architecture(name: str, config: Mapping[str, Any]) -> str:
    """The network in one line, precise enough to rebuild it (model.json holds the same as data)."""
    dropout = config.get("dropout") or 0.0
    if name == "mlp":
        activation = config.get("activation", "relu")
        layers = " → ".join(f"Dense {width} ({activation})" for width in config.get("hidden", []))
        text = f"MLP: flatten 784 → {layers} → Dense 10"
        return text + (f", dropout {dropout:g} after each hidden layer" if dropout else "")
    if name == "convnet":
        widths, depth = config.get("widths", []), config.get("depth", 1)
        text = (f"ConvNet: {len(widths)} stages of {'-'.join(map(str, widths))} channels, each {depth} × "
                "(3x3 conv, batch norm, ReLU) then 2x2 max-pool; global max-pool → Dense 10")
        return text + (f", dropout {dropout:g} before it" if dropout else "")
    if name == "keras-cnn":
        text = "Keras-tutorial CNN: conv 32 3x3 → max-pool → conv 64 3x3 → max-pool → Dense 128 → Dense 10 (ReLU)"
        return text + (f", dropout {dropout:g} before the last layer" if dropout else "")
    return f"{name} {json.dumps(dict(config))}"


def _introduction(meta: RunMeta, metrics: Mapping[str, Any]) -> str:
    """Two sentences: what the model does and how good it is, then the run's own note if it has one."""
    accuracy = metrics.get("test_accuracy")
    shown = f"{accuracy:.2%}" if isinstance(accuracy, (int, float)) else "an unrecorded"
    what = _KINDS.get(meta.architecture.name, f"A {meta.architecture.name} network")
    text = (f"{what} trained with fmnist (PyTorch) to sort 28x28 grayscale clothing images into the 10 "
            f"Fashion-MNIST classes. It scores {shown} accuracy on {_test_set_words(metrics, meta.config)}.")
    description = " ".join(str(meta.config.get("description", "")).split())
    preset_description = PRESETS.get(meta.preset or "", {}).get("description")
    return text + (f"\n\n> {description}" if description and description != preset_description else "")


def _changes(preset: str, config: Mapping[str, Any]) -> str:
    """The settings that differ from the preset's, so a preset's description is not taken for this run's."""
    if preset not in PRESETS:
        return ""
    changed = [f"{name} {json.dumps(value)}" for name, value in config.items()
               if name not in ("preset", "description") and name in TrainConfig.model_fields
               and value != preset_value(preset, name)]
    return ", ".join(changed)


def _optimizer_text(config: Mapping[str, Any]) -> str:
    """`SGD (momentum 0.9, Nesterov, weight decay 0.0005)`: only the settings that are switched on."""
    name = {"adam": "Adam", "adamw": "AdamW", "sgd": "SGD", "rmsprop": "RMSprop"}.get(config.get("optimizer"),
                                                                                       str(config.get("optimizer")))
    details = []
    if config.get("momentum"):
        details.append(f"momentum {config['momentum']:g}" + (", Nesterov" if config.get("nesterov") else ""))
    if config.get("weight_decay"):
        details.append(f"weight decay {config['weight_decay']:g}")
    return name + (f" ({', '.join(details)})" if details else "")


def _augmentation_text(config: Mapping[str, Any]) -> str:
    """The training-time augmentations in words, or "none" (it changes what the model has seen)."""
    parts = ["random horizontal flips"] if config.get("flip") else []
    if config.get("translate"):
        parts.append(f"random shifts of up to {config['translate']} px")
    if config.get("erase"):
        parts.append(f"random erasing ({config['erase']:g} of the side)")
    return ", ".join(parts) or "none"


def _epochs_text(metrics: Mapping[str, Any]) -> str:
    """Epochs run of planned, and why a run ended short (interrupted, or early stopping with its reason)."""
    text = f"{metrics.get('epochs_run')} of {metrics.get('epochs_planned')}"
    if metrics.get("interrupted"):
        return text + " (interrupted; the last complete epoch was kept)"
    return text + (f" (stopped early: {metrics['stop_reason']})" if metrics.get("stop_reason") else "")


def _training_rows(meta: RunMeta, metrics: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """The settings that made this model, as (setting, value) rows."""
    config, norm = meta.config, meta.normalization
    preset = meta.preset or config.get("preset") or "custom"
    preset_note = PRESETS.get(preset, {}).get("description")
    changes = _changes(preset, config)
    scaling = "x / 255 (unit)" if norm.mean == 0 and norm.std == 1 else \
        f"(x / 255 - {norm.mean:g}) / {norm.std:g} (standard)"
    schedule = f"{config.get('lr', 0):g}, {config.get('schedule', 'constant')} schedule"
    if config.get("warmup"):
        schedule += f", {config['warmup']:.0%} warm-up"
    hardware = f"{metrics.get('device', 'cpu')}, {metrics.get('cpu', 'unknown CPU')} ({metrics.get('cpu_class', '?')}" \
               f" class), {metrics.get('threads', '?')} threads" + \
        (f", {metrics['processes']} processes" if metrics.get("processes", 1) > 1 else "")
    rows = [("architecture", describe_architecture(meta.architecture.name, meta.architecture.config)),
            ("parameters", f"{metrics.get('parameters', 0):,}"),
            ("preset", f"{preset}" + (f" ({preset_note})" if preset_note else "")),
            ("changed from the preset", changes or "nothing"),
            ("epochs", _epochs_text(metrics)), ("optimiser", _optimizer_text(config)),
            ("learning rate", schedule), ("batch size", config.get("batch_size")),
            ("label smoothing", f"{config.get('label_smoothing', 0):g}"),
            ("augmentation", _augmentation_text(config)), ("input scaling", scaling),
            ("precision", metrics.get("precision", config.get("precision"))), ("hardware", hardware),
            ("training time", _duration(float(metrics.get("train_seconds", 0.0))))]
    if "budget" in metrics:
        rows.append(("time budget", f"{metrics['budget'].get('seconds', 0):g} s, which chose the epochs"))
    rows += [("seed", config.get("seed")), ("torch", metrics.get("torch", "?")), ("created", meta.created or "-")]
    return rows


# ----------------------------------------------------------------------------------------------- data, results
def _data_text(config: Mapping[str, Any], metrics: Mapping[str, Any]) -> str:
    """Which images trained, selected and measured the model."""
    trained = f"{metrics['train_size']:,}" if "train_size" in metrics else "the"
    if config.get("split") == "pooled":
        fraction = config.get("pooled_test_fraction", 0.2)
        source = (f"all 70,000 Fashion-MNIST images pooled and re-split at random ({fraction:.0%} test, seed "
                  f"{config.get('seed')}), OpenML style: the test numbers are not comparable to the standard test set")
    else:
        source = ("Fashion-MNIST (Zalando Research, MIT license), the standard split: 60,000 training and 10,000 "
                  "test images")
    lines = [f"- Source: {source}.",
             f"- Trained on {trained} training images" + (f" (the first {config['train_subset']:,} only)"
                                                          if config.get("train_subset") else "") + "."]
    if config.get("validation"):
        lines.append(f"- Validation: {config['validation']:,} training images held out (stratified, seed "
                     f"{config.get('seed')}), never trained on; they chose nothing but the calibration temperature "
                     "and any early stopping.")
    else:
        lines.append("- Validation: none held out.")
    lines.append(f"- Test: measured once, at the end, on {_test_set_words(metrics, config)}.")
    return "\n".join(lines)


def _metric_rows(metrics: Mapping[str, Any]) -> list[tuple[str, str]]:
    rows = [("test accuracy", _score(metrics.get("test_accuracy"))), ("test loss", _score(metrics.get("test_loss")))]
    if "test_loss_calibrated" in metrics:
        rows.append(("test loss, calibrated", _score(metrics["test_loss_calibrated"])))
    if "test_accuracy_tta" in metrics:
        rows.append(("test accuracy, TTA (flips, 1-pixel shifts)", _score(metrics["test_accuracy_tta"])))
    if "val_accuracy" in metrics:
        rows += [("validation accuracy (last epoch)", _score(metrics["val_accuracy"])),
                 ("validation loss (last epoch)", _score(metrics.get("val_loss")))]
    if "macro_f1" in metrics:
        rows.append(("macro F1 (test)", _score(metrics["macro_f1"])))
    return rows


def _per_class_text(metrics: Mapping[str, Any]) -> str:
    """The per-class table from metrics.json's `per_class` (plain test predictions, no TTA)."""
    per_class = metrics.get("per_class")
    if not per_class:
        return "Not recorded for this run; `fmnist evaluate RUN` prints and saves them."
    rows = [(row["class"], _score(row["precision"]), _score(row["recall"]), _score(row["f1"]), row["support"])
            for row in per_class]
    weakest = min(per_class, key=lambda row: row["f1"])
    return (_table(("class", "precision", "recall", "F1", "test images"), rows)
            + f"\n\nOn the test set, from the plain predictions (no TTA). The weakest class of this run is "
              f"{weakest['class']} (F1 {_score(weakest['f1'])}).")


def _calibration_text(calibration: Calibration) -> str:
    """The temperature and its effect, or why there is none: it changes every probability the model reports."""
    if not calibration.fitted:
        note = f" ({calibration.note})" if calibration.note else ""
        return f"Not calibrated{note}: probabilities are the plain softmax of the logits (temperature 1)."
    lines = [f"Temperature scaling, fitted on {calibration.images or 0:,} held-out validation images: "
             f"T = {calibration.temperature:.4f}; probabilities are softmax(logits / T).",
             f"Expected calibration error (15 bins, validation): {_score(calibration.ece_before)} before, "
             f"{_score(calibration.ece_after)} after.",
             "`fmnist.Classifier`, `fmnist predict` and the ONNX export apply it; divide the logits by T yourself "
             "when you run the safetensors weights without fmnist."]
    return "\n\n".join(lines)


def _limits_text(metrics: Mapping[str, Any]) -> str:
    """What the model is for and where it fails, with this run's weakest class when the scores are recorded."""
    weakest = ""
    if metrics.get("per_class"):
        row = min(metrics["per_class"], key=lambda item: item["f1"])
        weakest = f"; the weakest class of this run is {row['class']} (F1 {_score(row['f1'])})"
    return "\n".join([
        "- Made for 28x28 grayscale product images in Fashion-MNIST form: one garment, centred, light on a black "
        "background.",
        "- A photo (dark garment on a light background, any size) must be converted first: `fmnist predict` and "
        "`fmnist.images.prepare` do it; feeding a raw photo gives confident nonsense.",
        "- Ten classes only: anything else (people, animals, other objects) is still forced into one of them.",
        "- Not for decisions about people, nor for anything safety-relevant.",
        f"- Shirt is Fashion-MNIST's weak class, confused with T-shirt/top, Pullover and Coat{weakest}.",
    ])


# ----------------------------------------------------------------------------------------------- usage
def _plain_torch_lines(meta: RunMeta, weights: str) -> list[str]:
    """A plain-PyTorch rebuild of an MLP (its modules map one-to-one onto nn.Sequential); [] for other nets."""
    config = meta.architecture.config
    if meta.architecture.name != "mlp":
        return []
    layers, width = ["nn.Flatten()"], 28 * 28
    for size in config.get("hidden", []):
        layers += [f"nn.Linear({width}, {size})", _ACTIVATIONS.get(config.get("activation", "relu"), "nn.ReLU()")]
        if config.get("dropout"):
            layers.append(f"nn.Dropout({config['dropout']!r})")
        width = size
    layers.append(f"nn.Linear({width}, 10)")
    norm, temperature = meta.normalization, meta.calibration.temperature
    return ["import torch", "from safetensors.torch import load_file", "from torch import nn", "",
            f"model = nn.Sequential({', '.join(layers)}).eval()",
            f"state = load_file({json.dumps(weights)})  # the MLP's tensors are named layers.<index>.<weight|bias>",
            'model.load_state_dict({name.removeprefix("layers."): tensor for name, tensor in state.items()})',
            "pixels = torch.zeros(1, 28, 28, dtype=torch.uint8)  # dataset-form images, uint8 (n, 28, 28)",
            f"x = ((pixels.float() * {norm.scale!r} - {norm.mean!r}) / {norm.std!r}).unsqueeze(1)",
            f"probabilities = torch.softmax(model(x) / {temperature!r}, dim=1)"]


def _usage_text(meta: RunMeta, run_path: str) -> str:
    """Loading the model with fmnist, and without it (ONNX, or the safetensors weights and the architecture)."""
    folder = run_path.rstrip("/")
    onnx_file, weights = f"{folder}/model.onnx", f"{folder}/model.safetensors"
    classes = json.dumps(list(meta.classes))
    custom = meta.architecture.name == "custom"  # loading imports the code the run names: only with trust
    trust, trust_flag = (", trust_code=True", " --trust-code") if custom else ("", "")
    parts = [
        "With fmnist installed" + (" (this run names its own network's code: load it only if you trust that code)"
                                   if custom else "") + ":",
        _code("python", ["import fmnist", "", f"classifier = fmnist.Classifier.load({json.dumps(folder)}{trust})",
                         "print(classifier.top_k(images, k=3))  # images: uint8 (n, 28, 28), light garment on black"]),
        _code("sh", [f"fmnist predict {shlex.quote(folder)} photo.jpg{trust_flag}   # any photo: converted to 28x28 "
                     "first"]),
        "Without fmnist: export the model once to ONNX (preprocessing and calibration inside the graph), then any "
        "onnxruntime reads it:",
        _code("sh", [f"fmnist export {shlex.quote(folder)}{trust_flag}   # writes {onnx_file} "
                     "(pip install 'fmnist[onnx]')"]),
        _code("python", ["import numpy as np", "import onnxruntime as ort", "",
                         f"session = ort.InferenceSession({json.dumps(onnx_file)})",
                         "images = np.zeros((1, 28, 28), np.uint8)  # dataset-form pixels, light garment on black",
                         f'probabilities, logits = session.run(None, {{"{ONNX_INPUT}": images}})',
                         f"classes = {classes}", "print(classes[int(probabilities[0].argmax())])"]),
        f"Or read the weights directly: `model.safetensors` holds the tensors of "
        f"`fmnist.models.create_model({json.dumps(meta.architecture.name)}, **{json.dumps(meta.architecture.config)})`"
        "; `model.json` holds the architecture, input scaling and calibration temperature.",
    ]
    plain = _plain_torch_lines(meta, weights)
    if plain:
        parts += ["For this MLP that is, in plain PyTorch:", _code("python", plain)]
    return "\n\n".join(parts)


_SCORES = ("loss", "accuracy", "val_loss", "val_accuracy", "test_loss", "test_accuracy")


def _history_cell(row: Mapping[str, Any], key: str) -> str:
    """One history value as the card prints it: scores with 4 decimals like the results, the rest as they are."""
    value = row.get(key)
    if value is None:
        return "-"
    if key in _SCORES:
        return _score(value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def _history_text(history: Sequence[Mapping[str, Any]]) -> str:
    """The last `HISTORY_ROWS` epochs (history.csv holds every one)."""
    if not history:
        return "No complete epoch."
    columns = [key for key in ("epoch", *_SCORES, "lr", "seconds") if any(key in row for row in history)]
    shown = history[-HISTORY_ROWS:]
    table = _table(columns, [[_history_cell(row, key) for key in columns] for row in shown])
    if len(shown) < len(history):
        table += f"\n\nThe last {len(shown)} of {len(history)} epochs; history.csv holds all."
    return table

"""Every figure fmnist draws. Each function takes plain data, returns a matplotlib Figure, and never trains.

Importing this module changes no process-wide setting: matplotlib picks its backend as usual (a headless one
where there is no display, inline in Jupyter), and the `fmnist` command selects `Agg` at its entry point.
`save_figure` writes atomically (temporary file, then rename).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from fmnist.data import CLASS_NAMES
from fmnist.files import publish

RIGHT = "#1a9641"
WRONG = "#d7191c"


def save_figure(figure: Figure, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Save a figure as PNG atomically and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".png", delete=False)
    handle.close()
    try:
        figure.savefig(handle.name, dpi=dpi, bbox_inches="tight", facecolor="white")
        publish(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise
    finally:
        plt.close(figure)
    return path


def _show_image(axis, image: np.ndarray) -> None:
    axis.imshow(image, cmap="gray_r", vmin=0, vmax=255 if image.dtype == np.uint8 else None)
    axis.set_xticks([])
    axis.set_yticks([])


def sample_grid(images: np.ndarray, labels: np.ndarray, per_class: int = 10, seed: int = 0,
                class_names: Sequence[str] = CLASS_NAMES) -> Figure:
    """One row per class with `per_class` random examples, labelled on the left."""
    rng = np.random.default_rng(seed)
    rows = len(class_names)
    figure, axes = plt.subplots(rows, per_class, figsize=(per_class * 0.9 + 1.4, rows * 0.95), squeeze=False)
    for row, name in enumerate(class_names):
        members = np.flatnonzero(labels == row)
        chosen = rng.choice(members, size=min(per_class, len(members)), replace=False) if len(members) else []
        for column in range(per_class):
            axis = axes[row, column]
            if column < len(chosen):
                _show_image(axis, images[chosen[column]])
            else:
                axis.axis("off")
        axes[row, 0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=10)
    figure.subplots_adjust(wspace=0.05, hspace=0.05, top=0.95)
    figure.suptitle("Fashion-MNIST: random examples per class", fontsize=12, y=0.975)
    return figure


def smoothed_loss_floor(label_smoothing: float, classes: int = 10) -> float:
    """The lowest cross-entropy a model can reach against label-smoothed targets: their entropy."""
    right = 1.0 - label_smoothing + label_smoothing / classes
    other = label_smoothing / classes
    return float(-right * np.log(right) - (classes - 1) * other * np.log(other)) if label_smoothing else 0.0


def training_curves(history: Sequence[Mapping[str, float]], label_smoothing: float = 0.0) -> Figure:
    """Loss and accuracy per epoch, train and (when present) validation.

    With label smoothing the train loss is measured against softened targets and cannot reach zero, so it can sit
    above the validation loss; a footnote says so, because a learner would otherwise read it as a bug.
    """
    epochs = [row["epoch"] for row in history]
    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(11, 4))
    if label_smoothing:
        figure.text(0.5, -0.02, f"Train loss is measured with label smoothing {label_smoothing:g}, so it cannot fall "
                    f"below {smoothed_loss_floor(label_smoothing):.2f}; validation loss uses the true labels.",
                    ha="center", va="top", fontsize=9, color="#555555")
    for axis, metric, title in ((loss_axis, "loss", "Loss"), (accuracy_axis, "accuracy", "Accuracy")):
        axis.plot(epochs, [row[metric] for row in history], "o-", label="train", color="#2c7bb6")
        if any(row.get(f"val_{metric}") is not None for row in history):
            values = [row.get(f"val_{metric}") for row in history]
            axis.plot(epochs, [np.nan if v is None else v for v in values], "s-", label="validation", color="#fdae61")
        axis.set_title(title)
        axis.set_xlabel("epoch")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        axis.grid(alpha=0.3)
        axis.legend()
    return figure


def confusion_matrix(matrix: np.ndarray, class_names: Sequence[str] = CLASS_NAMES, normalize: bool = True) -> Figure:
    """Heatmap of a confusion matrix (rows: true class, columns: predicted), with counts in the cells."""
    counts = np.asarray(matrix)
    shown = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1) if normalize else counts
    figure, axis = plt.subplots(figsize=(8.5, 7.5))
    image = axis.imshow(shown, cmap="Blues", vmin=0)
    figure.colorbar(image, ax=axis, fraction=0.046, pad=0.04, label="fraction of true class" if normalize else "count")
    ticks = np.arange(len(class_names))
    axis.set_xticks(ticks, class_names, rotation=45, ha="right")
    axis.set_yticks(ticks, class_names)
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    threshold = shown.max() / 2 if shown.size else 0
    for i in range(counts.shape[0]):
        for j in range(counts.shape[1]):
            axis.text(j, i, str(int(counts[i, j])), ha="center", va="center", fontsize=8,
                      color="white" if shown[i, j] > threshold else "black")
    axis.set_title(f"Confusion matrix (accuracy {np.trace(counts) / max(counts.sum(), 1):.2%})")
    return figure


def prediction_grid(images: np.ndarray, probabilities: np.ndarray, labels: np.ndarray, columns: int = 6,
                    class_names: Sequence[str] = CLASS_NAMES) -> Figure:
    """Each image captioned with predicted class, its probability and the true class: green right, red wrong."""
    count = len(images)
    rows = max(1, int(np.ceil(count / columns)))
    figure, axes = plt.subplots(rows, columns, figsize=(columns * 2.0, rows * 2.7), squeeze=False)
    for index, axis in enumerate(axes.flat):
        if index >= count:
            axis.axis("off")
            continue
        _show_image(axis, images[index])
        predicted = int(np.argmax(probabilities[index]))
        color = RIGHT if predicted == int(labels[index]) else WRONG
        axis.set_xlabel(f"{class_names[predicted]} {probabilities[index][predicted]:.0%}\n"
                        f"({class_names[int(labels[index])]})", color=color, fontsize=9)
        for spine in axis.spines.values():
            spine.set_edgecolor(color)
            spine.set_linewidth(2)
    figure.suptitle("Predictions: predicted class, probability (true class)", fontsize=12)
    figure.tight_layout()
    return figure


def image_with_probabilities(image: np.ndarray, probabilities: np.ndarray, label: int | None = None,
                             class_names: Sequence[str] = CLASS_NAMES) -> Figure:
    """An image beside a bar chart of its 10 class probabilities (predicted bar red/green against the truth)."""
    figure, (image_axis, bar_axis) = plt.subplots(1, 2, figsize=(8, 3.2), gridspec_kw={"width_ratios": [1, 1.6]})
    _show_image(image_axis, image)
    predicted = int(np.argmax(probabilities))
    colors = ["#999999"] * len(class_names)
    if label is not None:
        colors[int(label)] = RIGHT
        if predicted != int(label):
            colors[predicted] = WRONG
    else:
        colors[predicted] = "#2c7bb6"
    bar_axis.barh(range(len(class_names)), probabilities, color=colors)
    bar_axis.set_yticks(range(len(class_names)), class_names)
    bar_axis.invert_yaxis()
    bar_axis.set_xlim(0, 1)
    bar_axis.set_xlabel("probability")
    title = f"{class_names[predicted]} {probabilities[predicted]:.1%}"
    if label is not None:
        title += f" (true: {class_names[int(label)]})"
    image_axis.set_title(title, color=RIGHT if label is None or predicted == int(label) else WRONG, fontsize=10)
    figure.tight_layout()
    return figure


def probability_grid(images: np.ndarray, probabilities: np.ndarray, labels: np.ndarray | None = None,
                     columns: int = 3, class_names: Sequence[str] = CLASS_NAMES) -> Figure:
    """The TensorFlow tutorial's figure: each image beside a bar chart of its 10 probabilities. The caption says
    the predicted class, its probability and the true class (green when right, red when wrong); the true class's
    bar is green and a wrong prediction's bar red."""
    count = len(images)
    rows = max(1, int(np.ceil(count / columns)))
    figure, axes = plt.subplots(rows, 2 * columns, figsize=(columns * 4.4, rows * 2.1), squeeze=False,
                                gridspec_kw={"width_ratios": [1, 1.3] * columns})
    for index in range(rows * columns):
        image_axis, bar_axis = axes.flat[2 * index], axes.flat[2 * index + 1]
        if index >= count:
            image_axis.axis("off")
            bar_axis.axis("off")
            continue
        row = np.asarray(probabilities[index])
        predicted = int(row.argmax())
        truth = None if labels is None else int(labels[index])
        colors = ["#999999"] * len(class_names)
        colors[predicted] = RIGHT if truth in (None, predicted) else WRONG
        if truth is not None:
            colors[truth] = RIGHT
        _show_image(image_axis, images[index])
        caption = f"{class_names[predicted]} {row[predicted]:.0%}" + ("" if truth is None else
                                                                     f"\n({class_names[truth]})")
        image_axis.set_xlabel(caption, color=colors[predicted], fontsize=8)
        bar_axis.bar(range(len(class_names)), row, color=colors)
        bar_axis.set_ylim(0, 1)
        bar_axis.set_xticks(range(len(class_names)), [str(i) for i in range(len(class_names))], fontsize=7)
        bar_axis.tick_params(axis="y", labelsize=7)
    legend = ", ".join(f"{i} {name}" for i, name in enumerate(class_names))
    figure.suptitle(f"Predicted class, probability (true class); bars: {legend}", fontsize=9)
    figure.tight_layout()
    return figure


def confident_mistakes(images: np.ndarray, probabilities: np.ndarray, labels: np.ndarray, count: int = 12,
                       class_names: Sequence[str] = CLASS_NAMES) -> Figure:
    """The `count` wrong predictions the model was most sure of."""
    predicted = probabilities.argmax(axis=1)
    wrong = np.flatnonzero(predicted != labels)
    order = wrong[np.argsort(-probabilities[wrong, predicted[wrong]])][:count]
    figure = prediction_grid(images[order], probabilities[order], labels[order], columns=6, class_names=class_names)
    figure.suptitle(f"The {len(order)} most confident mistakes (of {len(wrong)})", fontsize=12)
    return figure


def photo_predictions(originals: Sequence, inputs: np.ndarray, probabilities: Sequence[Mapping[str, float]],
                      names: Sequence[str]) -> Figure:
    """Per photo, one row: the original, the 28x28 image the model saw, and the 10 probability bars."""
    rows = len(inputs)
    figure, axes = plt.subplots(rows, 3, figsize=(10, 2.6 * rows), squeeze=False,
                                gridspec_kw={"width_ratios": [1.2, 1, 2]})
    for row in range(rows):
        original_axis, input_axis, bar_axis = axes[row]
        original = originals[row]
        if hasattr(original, "convert"):  # a PIL image of any mode and size: a small RGB copy is enough to show
            original = original.copy()
            original.thumbnail((512, 512))
            original = original.convert("RGB")
        original_axis.imshow(np.asarray(original), cmap="gray" if np.asarray(original).ndim == 2 else None)
        original_axis.set_title(names[row], fontsize=9)
        input_axis.imshow(inputs[row], cmap="gray", vmin=0, vmax=255)
        input_axis.set_title("what the model sees", fontsize=9)
        for axis in (original_axis, input_axis):
            axis.set_xticks([])
            axis.set_yticks([])
        classes = list(probabilities[row])
        values = [probabilities[row][c] for c in classes]
        best = int(np.argmax(values))
        bar_axis.barh(range(len(classes)), values, color=["#2c7bb6" if i == best else "#999999"
                                                          for i in range(len(classes))])
        bar_axis.set_yticks(range(len(classes)), classes, fontsize=8)
        bar_axis.invert_yaxis()
        bar_axis.set_xlim(0, 1)
        bar_axis.set_title(f"{classes[best]} {values[best]:.0%}", fontsize=10)
    figure.tight_layout()
    return figure


def compare_curves(histories: Mapping[str, Sequence[Mapping[str, float]]]) -> Figure:
    """Several runs' loss and accuracy per epoch on shared axes: solid train, dashed validation (when present)."""
    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = plt.get_cmap("tab10")
    for index, (name, history) in enumerate(histories.items()):
        epochs = [row["epoch"] for row in history]
        for axis, metric in ((loss_axis, "loss"), (accuracy_axis, "accuracy")):
            axis.plot(epochs, [row.get(metric, np.nan) for row in history], "-", color=colors(index % 10),
                      label=f"{name} train")
            if any(f"val_{metric}" in row for row in history):
                axis.plot(epochs, [row.get(f"val_{metric}", np.nan) for row in history], "--",
                          color=colors(index % 10), label=f"{name} validation")
    for axis, title in ((loss_axis, "Loss"), (accuracy_axis, "Accuracy")):
        axis.set_title(title)
        axis.set_xlabel("epoch")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        axis.grid(alpha=0.3)
    accuracy_axis.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    return figure


def embedding_maps(pixel_points: np.ndarray, feature_points: np.ndarray, labels: np.ndarray, predicted: np.ndarray,
                   method: str, class_names: Sequence[str] = CLASS_NAMES) -> Figure:
    """Raw pixels and the network's features of the same images in 2-D, coloured by true class, mistakes ringed."""
    figure, axes = plt.subplots(1, 2, figsize=(14, 6.6))
    colors = plt.get_cmap("tab10")
    wrong = predicted != labels
    titles = (f"raw pixels ({method.upper()})",
              f"network features, penultimate layer ({method.upper()}); {int(wrong.sum())} mistakes ringed")
    for axis, points, title in zip(axes, (pixel_points, feature_points), titles, strict=True):
        for k, name in enumerate(class_names):
            members = labels == k
            axis.scatter(points[members, 0], points[members, 1], s=5, color=colors(k), alpha=0.7, label=name,
                         linewidths=0)
        axis.scatter(points[wrong, 0], points[wrong, 1], s=22, facecolors="none", edgecolors="black",
                     linewidths=0.6, label="misclassified")
        axis.set_title(title, fontsize=10)
        axis.set_xticks([])
        axis.set_yticks([])
    handles, names = axes[1].get_legend_handles_labels()
    figure.legend(handles, names, loc="lower center", ncol=6, markerscale=3, frameon=False, fontsize=9)
    figure.suptitle(f"What the network learned: {len(labels):,} test images", fontsize=12)
    figure.tight_layout(rect=(0, 0.09, 1, 0.96))
    return figure

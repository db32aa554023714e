"""Every figure in `fmnist.plots`: it renders, `save_figure` writes a real PNG atomically, and it shows the right thing.

Small generated arrays only (no dataset, no training): the whole file runs in a few seconds.
"""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.colors import same_color
from matplotlib.figure import Figure
from PIL import Image

from fmnist import plots
from fmnist.data import CLASS_NAMES
from fmnist.files import FILE_MODE

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------------------------- helpers
def images_and_labels(n: int = 60, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random uint8 images whose labels cycle 0..9; every image carries its own index in pixel (0, 0)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    images[:, 0, 0] = np.arange(n) % 256
    return images, (np.arange(n) % 10).astype(np.uint8)


def probabilities_for(predicted: np.ndarray, confidence: np.ndarray | float = 0.8) -> np.ndarray:
    """Rows of probabilities that sum to 1 with `confidence` on the `predicted` class."""
    predicted = np.asarray(predicted)
    confidence = np.broadcast_to(np.asarray(confidence, dtype=np.float64), predicted.shape)
    rows = np.tile(((1 - confidence) / 9)[:, None], (1, 10))
    rows[np.arange(len(predicted)), predicted] = confidence
    return rows


def save_and_open(figure: Figure, path: Path) -> Image.Image:
    """Save through `plots.save_figure` and check what lands on disk is a complete PNG and nothing else."""
    written = plots.save_figure(figure, path)
    assert written == path
    content = path.read_bytes()
    assert content.startswith(PNG_SIGNATURE) and len(content) > 2000
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temporary left beside it
    assert not plt.fignum_exists(figure.number)  # save_figure closes the figure
    image = Image.open(path)
    image.load()  # decodes the whole file: fails on a truncated PNG
    assert image.format == "PNG"
    return image


def visible_axes(figure: Figure):
    return [axis for axis in figure.axes if axis.axison]


# ----------------------------------------------------------------------------------------------- figures
def test_sample_grid_shows_each_class_on_its_row(tmp_path):
    images, labels = images_and_labels(40)
    labels = labels.copy()
    labels[labels == 9] = 8  # class 9 gets no examples at all: its row must stay empty, not crash
    figure = plots.sample_grid(images, labels, per_class=3, seed=1)
    axes = np.array(figure.axes).reshape(10, 3)
    for row, name in enumerate(CLASS_NAMES):
        assert axes[row, 0].get_ylabel() == name
        for axis in axes[row]:
            if row == 9:
                assert not axis.axison and not axis.images
                continue
            shown = np.asarray(axis.images[0].get_array())
            assert labels[shown[0, 0]] == row  # the image drawn on row k is one of class k
            np.testing.assert_array_equal(shown, images[shown[0, 0]])
    assert "random examples" in figure.get_suptitle()
    picture = save_and_open(figure, tmp_path / "samples.png")
    assert picture.size[0] > 200 and picture.size[1] > 400  # ten rows: clearly taller than a thumbnail


def test_sample_grid_row_with_fewer_images_than_columns(tmp_path):
    images, labels = images_and_labels(12)  # classes 0 and 1 have 2 images, the rest 1
    figure = plots.sample_grid(images, labels, per_class=2)
    axes = np.array(figure.axes).reshape(10, 2)
    assert axes[0, 1].axison and axes[1, 1].axison
    assert all(not axes[row, 1].axison for row in range(2, 10))
    save_and_open(figure, tmp_path / "few.png")


def test_sample_grid_same_seed_same_choice():
    images, labels = images_and_labels(60)

    def shown(seed):
        figure = plots.sample_grid(images, labels, per_class=4, seed=seed)
        picks = [int(np.asarray(axis.images[0].get_array())[0, 0]) for axis in figure.axes]
        plt.close(figure)
        return picks

    assert shown(3) == shown(3)
    assert shown(3) != shown(4)


HISTORY = [{"epoch": 1, "loss": 0.9, "accuracy": 0.70}, {"epoch": 2, "loss": 0.6, "accuracy": 0.80},
           {"epoch": 3, "loss": 0.5, "accuracy": 0.84}]


def test_training_curves_without_validation(tmp_path):
    figure = plots.training_curves(HISTORY)
    loss_axis, accuracy_axis = figure.axes
    assert (loss_axis.get_title(), accuracy_axis.get_title()) == ("Loss", "Accuracy")
    for axis, metric in ((loss_axis, "loss"), (accuracy_axis, "accuracy")):
        (line,) = axis.get_lines()
        assert list(line.get_xdata()) == [1, 2, 3]
        assert list(line.get_ydata()) == [row[metric] for row in HISTORY]
        assert [text.get_text() for text in axis.get_legend().get_texts()] == ["train"]
    picture = save_and_open(figure, tmp_path / "curves.png")
    assert picture.size[0] > 1.8 * picture.size[1] > 300  # two panels side by side


def test_training_curves_with_validation_and_a_gap(tmp_path):
    # The shape `fmnist plot` reads back from history.csv: floats, and None where a column is empty.
    history = [{**row, "epoch": float(row["epoch"]), "val_loss": 1.0 - 0.1 * i, "val_accuracy": 0.6 + 0.05 * i}
               for i, row in enumerate(HISTORY)]
    history[1]["val_loss"] = history[1]["val_accuracy"] = None
    figure = plots.training_curves(history)
    for axis, metric in zip(figure.axes, ("loss", "accuracy"), strict=True):
        train_line, val_line = axis.get_lines()
        assert [text.get_text() for text in axis.get_legend().get_texts()] == ["train", "validation"]
        values = np.asarray(val_line.get_ydata(), dtype=float)
        assert np.isnan(values[1])
        assert values[0] == history[0][f"val_{metric}"] and values[2] == history[2][f"val_{metric}"]
    save_and_open(figure, tmp_path / "curves-val.png")


def _confusion(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    matrix = rng.integers(0, 20, size=(10, 10))
    matrix[np.diag_indices(10)] += rng.integers(50, 100, size=10)
    return matrix


@pytest.mark.parametrize("normalize", [True, False])
def test_confusion_matrix_title_and_cells(normalize, tmp_path):
    matrix = _confusion()
    accuracy = np.trace(matrix) / matrix.sum()
    figure = plots.confusion_matrix(matrix, normalize=normalize)
    axis, colorbar = figure.axes
    title = axis.get_title()
    assert f"{accuracy:.2%}" in title
    shown = float(re.search(r"accuracy ([\d.]+)%", title).group(1)) / 100
    assert shown == pytest.approx(accuracy, abs=5e-5)
    cells = {(round(text.get_position()[1]), round(text.get_position()[0])): text.get_text() for text in axis.texts}
    assert len(cells) == 100
    assert all(cells[i, j] == str(matrix[i, j]) for i in range(10) for j in range(10))  # raw counts in the cells
    assert [label.get_text() for label in axis.get_yticklabels()] == list(CLASS_NAMES)
    assert colorbar.get_ylabel() == ("fraction of true class" if normalize else "count")
    if normalize:
        np.testing.assert_allclose(np.asarray(axis.images[0].get_array()).sum(axis=1), 1.0)
    picture = save_and_open(figure, tmp_path / "confusion.png")
    assert picture.size[0] > 400 and picture.size[1] > 400


def test_confusion_matrix_of_an_empty_class_does_not_divide_by_zero(tmp_path):
    matrix = _confusion()
    matrix[3] = 0
    figure = plots.confusion_matrix(matrix)
    assert np.isfinite(np.asarray(figure.axes[0].images[0].get_array())).all()
    save_and_open(figure, tmp_path / "confusion.png")


def test_prediction_grid_colours_right_green_and_wrong_red(tmp_path):
    images, labels = images_and_labels(8)
    predicted = labels.copy()
    wrong = np.array([1, 4, 6])
    predicted[wrong] = (labels[wrong] + 1) % 10
    probabilities = probabilities_for(predicted, np.linspace(0.5, 0.9, 8))
    figure = plots.prediction_grid(images, probabilities, labels, columns=3)
    axes = figure.axes
    assert len(axes) == 9 and len(visible_axes(figure)) == 8 and not axes[8].axison  # 3x3, one cell empty
    for index in range(8):
        axis = axes[index]
        expected = plots.WRONG if index in wrong else plots.RIGHT
        assert same_color(axis.xaxis.label.get_color(), expected), index
        assert all(same_color(spine.get_edgecolor(), expected) for spine in axis.spines.values())
        caption = axis.get_xlabel()
        assert caption.startswith(f"{CLASS_NAMES[predicted[index]]} {probabilities[index, predicted[index]]:.0%}")
        assert caption.endswith(f"({CLASS_NAMES[labels[index]]})")
    picture = save_and_open(figure, tmp_path / "predictions.png")
    assert picture.size[0] > 300 and picture.size[1] > 300


def test_probability_grid_pairs_each_image_with_its_bars(tmp_path):
    images, labels = images_and_labels(5)
    predicted = labels.copy()
    predicted[1] = (labels[1] + 1) % 10  # one mistake
    probabilities = probabilities_for(predicted, 0.8)
    figure = plots.probability_grid(images, probabilities, labels, columns=3)
    axes = figure.axes
    assert len(axes) == 12  # 2 rows x 3 columns x (image, bars)
    right_bars, wrong_bars = axes[1].patches, axes[3].patches
    assert len(right_bars) == 10
    np.testing.assert_allclose([bar.get_height() for bar in right_bars], probabilities[0])
    assert same_color(right_bars[labels[0]].get_facecolor(), plots.RIGHT)
    assert same_color(wrong_bars[predicted[1]].get_facecolor(), plots.WRONG)
    assert same_color(wrong_bars[labels[1]].get_facecolor(), plots.RIGHT)
    assert axes[2].get_xlabel() == f"{CLASS_NAMES[predicted[1]]} 80%\n({CLASS_NAMES[labels[1]]})"
    assert same_color(axes[2].xaxis.label.get_color(), plots.WRONG)
    assert not axes[10].axison and not axes[11].axison  # the sixth cell is empty
    picture = save_and_open(figure, tmp_path / "grid.png")
    assert picture.size[0] > picture.size[1] > 300


def test_image_with_probabilities_wrong_prediction(tmp_path):
    image = images_and_labels(1)[0][0]
    probabilities = probabilities_for(np.array([4]), 0.7)[0]
    figure = plots.image_with_probabilities(image, probabilities, label=2)
    image_axis, bar_axis = figure.axes
    bars = bar_axis.patches
    assert len(bars) == 10
    np.testing.assert_allclose([bar.get_width() for bar in bars], probabilities)
    assert same_color(bars[4].get_facecolor(), plots.WRONG)  # predicted
    assert same_color(bars[2].get_facecolor(), plots.RIGHT)  # truth
    assert same_color(bars[0].get_facecolor(), "#999999")
    assert image_axis.get_title() == "Coat 70.0% (true: Pullover)"
    assert same_color(image_axis.title.get_color(), plots.WRONG)
    assert [label.get_text() for label in bar_axis.get_yticklabels()] == list(CLASS_NAMES)
    picture = save_and_open(figure, tmp_path / "probabilities.png")
    assert picture.size[0] > picture.size[1] > 150


def test_image_with_probabilities_right_prediction_and_no_label(tmp_path):
    image = images_and_labels(1)[0][0] / 255.0  # float images are drawn too
    probabilities = probabilities_for(np.array([7]), 0.9)[0]
    right = plots.image_with_probabilities(image, probabilities, label=7)
    assert same_color(right.axes[1].patches[7].get_facecolor(), plots.RIGHT)
    assert same_color(right.axes[0].title.get_color(), plots.RIGHT)
    save_and_open(right, tmp_path / "right" / "p.png")

    unlabelled = plots.image_with_probabilities(image, probabilities)
    image_axis, bar_axis = unlabelled.axes
    assert image_axis.get_title() == "Sneaker 90.0%"  # no "(true: ...)" without a label
    assert same_color(bar_axis.patches[7].get_facecolor(), "#2c7bb6")
    assert not any(same_color(bar.get_facecolor(), plots.WRONG) for bar in bar_axis.patches)
    picture = save_and_open(unlabelled, tmp_path / "unlabelled" / "p.png")
    assert picture.size[0] > 300


def test_confident_mistakes_shows_only_mistakes_most_confident_first(tmp_path):
    images, labels = images_and_labels(40)
    predicted = labels.copy()
    wrong = np.arange(0, 40, 3)  # 14 mistakes
    predicted[wrong] = (labels[wrong] + 3) % 10
    confidence = np.random.default_rng(0).uniform(0.3, 0.99, size=40)
    probabilities = probabilities_for(predicted, confidence)
    figure = plots.confident_mistakes(images, probabilities, labels, count=12)
    assert figure.get_suptitle() == "The 12 most confident mistakes (of 14)"
    shown = visible_axes(figure)
    assert len(shown) == 12
    indices = [int(np.asarray(axis.images[0].get_array())[0, 0]) for axis in shown]
    expected = sorted(wrong, key=lambda i: -confidence[i])[:12]
    assert indices == expected
    assert all(same_color(axis.xaxis.label.get_color(), plots.WRONG) for axis in shown)
    save_and_open(figure, tmp_path / "mistakes.png")


def test_confident_mistakes_without_any_mistake(tmp_path):
    images, labels = images_and_labels(10)
    figure = plots.confident_mistakes(images, probabilities_for(labels), labels)
    assert figure.get_suptitle() == "The 0 most confident mistakes (of 0)"
    assert not visible_axes(figure)
    save_and_open(figure, tmp_path / "none.png")


# ----------------------------------------------------------------------------------------------- save_figure
def test_save_figure_creates_folders_and_replaces_an_old_file(tmp_path):
    path = tmp_path / "a" / "b" / "curves.png"
    save_and_open(plots.training_curves(HISTORY[:1]), path)
    first = path.read_bytes()
    save_and_open(plots.training_curves(HISTORY), path)
    assert path.read_bytes() != first
    assert path.stat().st_mode & 0o777 == FILE_MODE  # not the temporary file's 0600


def test_label_smoothing_footnote_names_the_loss_floor(tmp_path):
    assert plots.smoothed_loss_floor(0.0) == 0.0
    assert plots.smoothed_loss_floor(0.1) == pytest.approx(0.5003, abs=1e-4)  # entropy of the softened targets
    plain = [text.get_text() for text in plots.training_curves(HISTORY).texts]
    smoothed = [text.get_text() for text in plots.training_curves(HISTORY, label_smoothing=0.1).texts]
    assert plain == [] and len(smoothed) == 1
    assert "label smoothing 0.1" in smoothed[0] and "below 0.50" in smoothed[0]
    save_and_open(plots.training_curves(HISTORY, label_smoothing=0.1), tmp_path / "smoothed.png")


def test_save_figure_is_atomic_when_saving_fails(tmp_path, monkeypatch):
    path = tmp_path / "plots" / "curves.png"
    figure = plots.training_curves(HISTORY)

    def broken_savefig(target, *args, **kwargs):
        Path(target).write_bytes(PNG_SIGNATURE + b"half a picture")  # fail after writing part of the file
        raise OSError("disk full")

    monkeypatch.setattr(figure, "savefig", broken_savefig)
    with pytest.raises(OSError, match="disk full"):
        plots.save_figure(figure, path)
    assert list(path.parent.iterdir()) == []  # neither the target nor the temporary file
    assert not plt.fignum_exists(figure.number)  # closed even on failure

    save_and_open(plots.training_curves(HISTORY), path)
    good = path.read_bytes()
    figure = plots.training_curves(HISTORY[:2])
    monkeypatch.setattr(figure, "savefig", broken_savefig)
    with pytest.raises(OSError):
        plots.save_figure(figure, path)
    assert path.read_bytes() == good  # the previous picture survives a failed save
    assert [p.name for p in path.parent.iterdir()] == ["curves.png"]


def test_save_figure_cleans_up_on_keyboard_interrupt(tmp_path, monkeypatch):
    figure = plots.training_curves(HISTORY)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(figure, "savefig", interrupted)
    with pytest.raises(KeyboardInterrupt):
        plots.save_figure(figure, tmp_path / "x.png")
    assert list(tmp_path.iterdir()) == []

"""fmnist.report on small hand-made inputs: the exact text the CLI prints, without training or data."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest

from fmnist import config, events, report

CLASSES = ["T-shirt/top", "Trouser", "Bag"]


@pytest.mark.parametrize("number,expected", [(0, "0 epochs"), (1, "1 epoch"), (2, "2 epochs")])
def test_count_is_plural_unless_one(number, expected):
    assert report.count(number, "epoch") == expected


def test_epoch_line_shows_the_validation_columns_only_when_present():
    assert report.epoch_line(3, {"loss": 0.5, "accuracy": 0.8, "seconds": 1.25}) == (
        "epoch   3  loss 0.5000  accuracy 0.8000  1.2s")
    row = {"loss": 0.5, "accuracy": 0.8, "lr": 0.1, "val_accuracy": 0.75, "seconds": 10.0}
    assert report.epoch_line(12, row) == "epoch  12  loss 0.5000  accuracy 0.8000  val_accuracy 0.7500  10.0s"


def test_train_summary_says_why_it_stopped_and_counts_one_epoch():
    metrics = {"stop_reason": "no improvement for 2 epochs", "test_accuracy": 0.9, "test_loss": 0.3,
               "test_loss_calibrated": 0.25, "epochs_run": 1, "train_seconds": 4.56}
    assert report.train_summary_lines(metrics, Path("runs/x")) == [
        "stopped early: no improvement for 2 epochs",
        "test accuracy 0.9000, test loss 0.3000 (0.2500 calibrated), 1 epoch in 4.6 s of training",
        "run folder: runs/x",
    ]


def test_class_count_table_has_a_row_per_class_and_totals():
    lines = report.class_count_table(CLASSES, {"train": [6, 5, 4], "test": [1, 2, 3]})
    assert lines[0] == "class            train    test"
    assert lines[1] == "0 T-shirt/top        6       1"
    assert lines[-1] == "total               15       6"


def test_answer_lines_flag_unsure_and_unusual_and_draw_bars():
    answer = {"top": [{"class": "Bag", "probability": 0.5}, {"class": "Trouser", "probability": 0.1}],
              "unsure": True, "unusual": True}
    lines = report.answer_lines("shoe.jpg", answer)
    assert lines[0] == "shoe.jpg: Bag (50.0%)  [this does not look like a Fashion-MNIST garment; unsure]"
    assert lines[1] == "    Bag           50.00% " + "#" * 15
    assert lines[2] == "    Trouser       10.00% ###"


def test_labelled_image_lines_mark_a_wrong_prediction_and_sort_by_probability():
    item = {"index": 7, "predicted": "Bag", "probability": 0.6, "true": "Trouser",
            "probabilities": {"T-shirt/top": 0.1, "Trouser": 0.3, "Bag": 0.6}}
    lines = report.labelled_image_lines(item)
    assert lines[0] == "test image 7: Bag (60.0%), true Trouser [WRONG]"
    assert [line.split()[0] for line in lines[1:]] == ["Bag", "Trouser", "T-shirt/top"]
    assert [line.split()[0] for line in report.labelled_image_lines(item, top=2)[1:]] == ["Bag", "Trouser"]


def test_predictions_csv_keeps_failed_files_and_quotes_commas():
    rows = [{"file": "a,b.png", "top": [{"class": "Bag", "probability": 0.5}], "unsure": True, "unusual": False,
             "probabilities": {"T-shirt/top": 0.25, "Trouser": 0.25, "Bag": 0.5}},
            {"file": "broken.jpg", "error": "cannot read"}]
    text = report.predictions_csv(rows, CLASSES)
    assert text.splitlines()[1] == '"a,b.png",Bag,0.500000,True,False,,0.250000,0.250000,0.500000'
    parsed = list(csv.reader(io.StringIO(text)))
    assert parsed[0] == ["file", "predicted", "probability", "unsure", "unusual", "error", *CLASSES]
    assert parsed[2] == ["broken.jpg", "", "", "", "", "cannot read", "", "", ""]


def test_evaluation_lines_report_an_uncalibrated_run():
    result = {"test_size": 10000, "calibrated": False, "temperature": 1.0, "loss": 0.3, "accuracy": 0.9,
              "tta": {"loss": 0.29, "accuracy": 0.91},
              "per_class": [{"class": "Bag", "precision": 0.95, "recall": 0.9, "f1": 0.925, "support": 1000}],
              "most_confused": [{"true": "Shirt", "predicted": "T-shirt/top", "count": 120}]}
    lines = report.evaluation_lines("Classifier(mlp)", result)
    assert lines[0] == "Classifier(mlp) on 10,000 test images"
    assert lines[1] == "probabilities not calibrated (the run had no validation split)"
    assert f"{'Bag':<14}     0.950     0.900     0.925     1000" in lines
    assert lines[-1] == "         Shirt -> T-shirt/top   120 images"
    assert lines[2] == "test loss 0.3000  test accuracy 0.9000  (TTA: loss 0.2900, accuracy 0.9100)"
    assert report.evaluation_lines("m", {**result, "tta": None})[2] == "test loss 0.3000  test accuracy 0.9000"


def test_runs_table_aligns_names_and_shows_dashes_for_missing_values():
    rows = [{"name": "demo", "preset": "fast", "model": "cnn", "test_accuracy": 0.9123, "train_seconds": 61.4,
             "epochs": 5, "created": "2024-05-01T12:30:59", "state": "done"},
            {"name": "a-much-longer-run", "preset": None, "model": None, "test_accuracy": None, "train_seconds": None,
             "epochs": None, "created": None, "state": "partial"}]
    lines = report.runs_table(rows)
    assert lines[0].startswith("run                ")
    assert lines[1] == "demo               fast               cnn          91.23%       61      5  2024-05-01 12:30"
    assert lines[2] == "a-much-longer-run  -                  -           partial        -      -  -"


def test_compare_table_puts_runs_in_columns():
    rows = [{"preset": "fast", "model": "cnn", "test_accuracy": 0.9, "val_accuracy": None, "train_seconds": 12.34,
             "epochs": 3, "state": "done"},
            {"preset": "classic", "model": "mlp", "test_accuracy": 0.85, "val_accuracy": 0.8, "train_seconds": 5.0,
             "epochs": 2, "state": "done"}]
    lines = report.compare_table(["a", "b"], rows)
    assert lines[0] == " " * 14 + f"{'a':>16}{'b':>16}"
    assert f"{'test_accuracy':<14}{'90.00%':>16}{'85.00%':>16}" in lines
    assert f"{'val_accuracy':<14}{'-':>16}{'80.00%':>16}" in lines


def test_sweep_table_stars_the_best_trial_and_names_its_folder():
    trials = [{"trial": "t1", "best": True, "rank": 1, "metric": 0.9, "epochs_run": 2, "epochs_planned": 3,
               "status": "done", "test_accuracy": 0.88, "params": {"lr": 0.01}, "run": "trials/t1"},
              {"trial": "t2", "best": False, "rank": 2, "metric": None, "epochs_run": 0, "epochs_planned": 0,
               "status": "failed", "test_accuracy": None, "params": {}, "run": "trials/t2", "error": "boom"}]
    lines = report.sweep_table("val_accuracy", trials, Path("out"))
    assert lines[0] == ""
    assert lines[2].startswith("   *1  t1     ") and "2/3" in lines[2] and lines[2].endswith("88.00%  lr=0.01")
    best, also = Path("out/trials/t1"), Path("out/best")
    assert lines[-1] == f"* best: t1 (val_accuracy 0.9000), run folder {best} (also {also})"
    assert report.sweep_failures(trials) == ["t2 failed: boom"]
    result = events.TrialResult("t1", 2, "val_accuracy", 0.5)
    assert report.sweep_event_line(result) == "t1 epoch 2: val_accuracy 0.5000"
    assert report.sweep_event_line(events.TrialError("t2")) == "t2 failed"


def test_presets_table_shows_each_cpu_class_measured_fastest_first():
    presets = {"fast": {"description": "a quick CNN"}, "new": {"description": "untested"}}
    results = {"fast": {"AVX2": {"test_accuracy": 0.9, "train_seconds": 142.4},
                        "AVX512-BF16": {"test_accuracy": 0.91, "train_seconds": 42.4}}}
    lines = report.presets_table(presets, results)
    assert lines[0].split()[:5] == ["preset", "AVX512-BF16", "CPU", "AVX2", "CPU"]
    assert lines[1] == f"{'fast':<18} {'91.00% in 42 s':<20}{'90.00% in 142 s':<20}a quick CNN"
    assert lines[2] == f"{'new':<18} {'-':<20}{'-':<20}untested"
    assert "per CPU class" in lines[3]


def test_preset_results_of_the_older_form_are_read_per_class():
    entry = {"test_accuracy": 0.95, "train_seconds": 1846.7, "cpu_class": "AMX"}
    assert config.results_by_class(entry) == {"AMX": entry}
    assert config.results_by_class({"AVX2": entry}) == {"AVX2": entry}


@pytest.mark.parametrize("seconds,text", [(180, "3m"), (90, "1m30s"), (45, "45s"), (0.4, "0s")])
def test_durations_read_like_a_budget(seconds, text):
    assert report.duration(seconds) == text

"""The model card (README.md) every run folder gets: front matter, numbers equal to metrics.json, usable snippets."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from sklearn.metrics import precision_recall_fscore_support
from test_train import learnable_arrays, small

from fmnist import checkpoint, export, model_card, training
from fmnist.data import CLASS_NAMES
from fmnist.predict import Classifier
from fmnist.runs import list_runs


def front_matter(card: str) -> dict:
    """The YAML between the first two `---` lines, parsed."""
    match = re.match(r"---\n(.*?)\n---\n", card, re.S)
    assert match, card[:200]
    return yaml.safe_load(match.group(1))


def section(card: str, title: str) -> str:
    return card.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def table_rows(text: str) -> list[list[str]]:
    """The body rows of the first Markdown table in `text`, as cells."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split(" | ")] for line in lines[2:]]


def code_block(text: str, language: str, containing: str) -> str:
    blocks = re.findall(rf"```{language}\n(.*?)```", text, re.S)
    return next(block for block in blocks if containing in block)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A folder holding `runs/demo`, trained by a relative path (as `fmnist train --out runs/demo` does)."""
    folder = tmp_path_factory.mktemp("cards")
    previous = os.getcwd()
    os.chdir(folder)
    try:
        training.train(small("classic-adam", epochs=2, validation=120, hidden=[32], tta=True),
                       arrays=learnable_arrays(), out_dir=Path("runs/demo"))
    finally:
        os.chdir(previous)
    return folder


@pytest.fixture(scope="module")
def run(root) -> Path:
    return root / "runs" / "demo"


@pytest.fixture(scope="module")
def card(run) -> str:
    return (run / model_card.CARD_FILE).read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def metrics(run) -> dict:
    return json.loads((run / checkpoint.METRICS_FILE).read_text())


def test_the_front_matter_is_what_a_model_hub_reads(card, metrics):
    values = front_matter(card)
    assert values["library_name"] == "pytorch" and values["license"] == "mit"
    assert values["tags"] == ["image-classification", "fashion-mnist"]
    assert values["datasets"] == ["fashion_mnist"] and values["metrics"] == ["accuracy"]
    result = values["model-index"][0]["results"][0]
    assert values["model-index"][0]["name"] == "demo"
    assert result["task"]["type"] == "image-classification" and result["dataset"]["type"] == "fashion_mnist"
    accuracy, tta = result["metrics"]
    assert accuracy["type"] == "accuracy" and accuracy["value"] == metrics["test_accuracy"]
    assert tta["value"] == metrics["test_accuracy_tta"]


def test_the_numbers_are_those_of_metrics_json(card, metrics):
    results = dict(table_rows(section(card, "Results")))
    assert results["test accuracy"] == f"{metrics['test_accuracy']:.4f}"
    assert results["test loss"] == f"{metrics['test_loss']:.4f}"
    assert results["test accuracy, TTA (flips, 1-pixel shifts)"] == f"{metrics['test_accuracy_tta']:.4f}"
    assert results["validation accuracy (last epoch)"] == f"{metrics['val_accuracy']:.4f}"
    rows = table_rows(section(card, "Per-class scores"))
    assert [row[0] for row in rows] == list(CLASS_NAMES)
    for row, scores in zip(rows, metrics["per_class"], strict=True):
        assert row == [scores["class"], f"{scores['precision']:.4f}", f"{scores['recall']:.4f}",
                       f"{scores['f1']:.4f}", str(scores["support"])]
    calibration = section(card, "Calibration")
    assert f"T = {metrics['calibration']['temperature']:.4f}" in calibration
    assert f"{metrics['calibration']['ece_after']:.4f} after" in calibration


def test_the_per_class_scores_match_scikit_learn_on_the_saved_model(run, metrics):
    (_, _), (x_test, y_test) = learnable_arrays()
    predicted = Classifier.load(run).predict(x_test)
    precision, recall, f1, support = precision_recall_fscore_support(y_test, predicted, labels=range(10),
                                                                     zero_division=0)
    np.testing.assert_allclose([row["f1"] for row in metrics["per_class"]], f1)
    np.testing.assert_allclose([row["precision"] for row in metrics["per_class"]], precision)
    assert [row["support"] for row in metrics["per_class"]] == support.tolist()
    saved = json.loads((run / checkpoint.META_FILE).read_text())["metrics"]
    assert saved["per_class"] == metrics["per_class"] and saved["macro_f1"] == metrics["macro_f1"]
    assert metrics["train_size"] == 320 - 120


def test_the_commands_name_the_run_and_leak_no_absolute_path(card, root):
    usage = section(card, "How to use it")
    assert 'fmnist.Classifier.load("runs/demo")' in usage
    assert "fmnist predict runs/demo photo.jpg" in usage and "fmnist export runs/demo" in usage
    assert f'InferenceSession("runs/demo/{export.ONNX_FILE}")' in usage
    assert f'{{"{export.INPUT_NAME}": images}}' in usage  # the exported graph's input name
    assert str(root) not in card


def test_the_plain_pytorch_snippet_answers_like_classifier(card, root, run, monkeypatch):
    snippet = code_block(section(card, "How to use it"), "python", "load_file")
    monkeypatch.chdir(root)
    namespace: dict = {}
    exec(snippet, namespace)  # the card's own code, as a reader would paste it
    classifier = Classifier.load(run)
    expected = classifier.predict_proba(np.zeros((1, 28, 28), np.uint8))
    np.testing.assert_allclose(namespace["probabilities"].detach().numpy(), expected, atol=1e-6)
    images = learnable_arrays()[1][0][:4]  # real images through the rebuilt network too, not only a blank one
    with torch.no_grad():
        logits = namespace["model"]((torch.from_numpy(images).float() / 255).unsqueeze(1))
    np.testing.assert_allclose(torch.softmax(logits / classifier.temperature, 1).numpy(),
                               classifier.predict_proba(images), atol=1e-5)


def test_runs_lists_a_folder_with_a_card_as_done(root):
    rows = list_runs(root / "runs")
    assert [(row["name"], row["state"]) for row in rows] == [("demo", "done")]


def test_overwrite_names_the_run_not_its_staging_folder(tmp_path):
    folder = tmp_path / "run"
    training.train(small("classic-adam"), arrays=learnable_arrays(), out_dir=folder)
    training.train(small("classic-adam", seed=1), arrays=learnable_arrays(), out_dir=folder)  # replaced whole
    card = (folder / model_card.CARD_FILE).read_text()
    assert 'Classifier.load("run")' in card and ".new-" not in card
    assert f"{json.loads((folder / 'metrics.json').read_text())['test_accuracy']:.4f}" in card
    assert checkpoint.final_dir(tmp_path / ".run.new-123-a1b2c3") == folder
    assert checkpoint.final_dir(folder) == folder


def test_a_resumed_run_rewrites_its_card(tmp_path):
    stop = training.StopRequest()

    def stop_after_first_epoch(event):
        if type(event).__name__ == "EpochEnd":
            stop.request()

    folder = tmp_path / "run"
    config = small("classic-adam", epochs=3)
    training.train(config, arrays=learnable_arrays(), out_dir=folder, progress=stop_after_first_epoch, stop=stop)
    assert "1 of 3 (interrupted" in (folder / model_card.CARD_FILE).read_text()
    result = training.train(arrays=learnable_arrays(), resume=folder)
    card = (folder / model_card.CARD_FILE).read_text()
    assert "| epochs | 3 of 3 |" in card and len(table_rows(section(card, "Training history"))) == 3
    assert front_matter(card)["model-index"][0]["results"][0]["metrics"][0]["value"] == \
        result.metrics["test_accuracy"]


def test_the_card_is_written_before_model_json(tmp_path, monkeypatch):
    result = training.train(small("classic-adam"), arrays=learnable_arrays())

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save_model", killed)
    with pytest.raises(KeyboardInterrupt):
        training.write_run(tmp_path, result.model, result.config, result.history, result.metrics)
    assert (tmp_path / model_card.CARD_FILE).is_file() and not (tmp_path / checkpoint.META_FILE).exists()


# ----------------------------------------------------------------------------------------------- the pure renderer
def hand_made_meta(calibration: checkpoint.Calibration | None = None) -> checkpoint.RunMeta:
    config = training.resolve_config("fast", {"description": "a note | with a pipe\nand a newline"})
    return checkpoint.RunMeta(architecture=config.architecture(), preset="fast", classes=list(CLASS_NAMES),
                              normalization=checkpoint.Normalization(mean=0.286, std=0.353),
                              calibration=calibration or checkpoint.Calibration(note="no validation split"),
                              config=config.to_dict(), created="2025-01-01T00:00:00+00:00")


def hand_made_metrics(**extra) -> dict:
    per_class = [{"class": name, "precision": 0.9, "recall": 0.91, "f1": 0.905, "support": 1000}
                 for name in CLASS_NAMES]
    per_class[6] = {"class": "Shirt", "precision": 0.8, "recall": 0.76, "f1": 0.7796, "support": 1000}
    return {"preset": "fast", "test_accuracy": 0.93125, "test_loss": 0.2345, "epochs_run": 5, "epochs_planned": 5,
            "train_seconds": 61.5, "parameters": 94_346, "test_size": 10_000, "train_size": 55_000,
            "stop_reason": None, "interrupted": False, "device": "cpu", "cpu": "AMD EPYC", "cpu_class": "AVX2",
            "threads": 2, "precision": "fp32", "torch": "2.13.0", "per_class": per_class, "macro_f1": 0.892, **extra}


def test_render_with_calibration_and_tta():
    calibration = checkpoint.Calibration(fitted=True, temperature=1.2345, images=5000, ece_before=0.109,
                                         ece_after=0.007)
    metrics = hand_made_metrics(test_accuracy_tta=0.9351, val_accuracy=0.932, val_loss=0.25)
    card = model_card.render(hand_made_meta(calibration), metrics, [], "runs/fast")
    values = front_matter(card)
    assert [m["value"] for m in values["model-index"][0]["results"][0]["metrics"]] == [0.93125, 0.9351]
    assert "| test accuracy, TTA (flips, 1-pixel shifts) | 0.9351 |" in card
    assert "| validation accuracy (last epoch) | 0.9320 |" in card
    assert "T = 1.2345" in card and "0.1090 before, 0.0070 after" in card
    assert "| Shirt | 0.8000 | 0.7600 | 0.7796 | 1000 |" in card
    assert "weakest class of this run is Shirt (F1 0.7796)" in card
    assert "ConvNet: 3 stages of 32-64-128 channels" in card and "(x / 255 - 0.286) / 0.353" in card
    assert "\n> a note | with a pipe and a newline\n" in card  # the run's own note, on one line
    assert "No complete epoch." in card and "For this MLP" not in card  # a ConvNet gets no plain-torch rebuild


def test_render_without_calibration_tta_or_per_class_scores():
    metrics = hand_made_metrics()
    del metrics["per_class"], metrics["macro_f1"]
    card = model_card.render(hand_made_meta(), metrics, [{"epoch": 1, "loss": 0.5, "accuracy": 0.8, "lr": 0.1,
                                                          "seconds": 12.0}], 'runs/we"ird: name')
    values = front_matter(card)
    assert values["model-index"][0]["name"] == 'we"ird: name'
    assert len(values["model-index"][0]["results"][0]["metrics"]) == 1
    assert "TTA" not in section(card, "Results") and "Not calibrated (no validation split)" in card
    assert "Not recorded for this run" in card
    assert table_rows(section(card, "Training history")) == [["1", "0.5000", "0.8000", "0.1", "12"]]


def test_a_missing_accuracy_is_not_a_number_in_the_front_matter():
    metrics = hand_made_metrics(test_accuracy=float("nan"))
    value = front_matter(model_card.render(hand_made_meta(), metrics, []))["model-index"][0]["results"][0]
    assert np.isnan(value["metrics"][0]["value"])


def test_a_custom_network_card_says_to_trust_its_code():
    config = training.resolve_config("fast", {"model": "custom", "custom": "custom_nets:TinyNet"})
    meta = checkpoint.RunMeta(architecture=config.architecture(), preset="fast", classes=list(CLASS_NAMES),
                              normalization=checkpoint.Normalization(mean=0.286, std=0.353),
                              calibration=checkpoint.Calibration(note="no validation split"),
                              config=config.to_dict(), created="2025-01-01T00:00:00+00:00")
    card = model_card.render(meta, hand_made_metrics(), [], "runs/mine")
    assert 'fmnist.Classifier.load("runs/mine", trust_code=True)' in card
    assert "fmnist predict runs/mine photo.jpg --trust-code" in card and "only if you trust that code" in card
    assert "trust_code" not in model_card.render(hand_made_meta(), hand_made_metrics(), [], "runs/fast")

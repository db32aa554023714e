"""Confidence calibration: ECE, temperature scaling, and the honest "unsure" / "unusual" flags."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_train import learnable_arrays, small

from fmnist import evaluate, training
from fmnist.predict import Classifier


def test_ece_matches_a_hand_computed_case():
    # Two bins used: confidence 0.9 (2 images, 1 right) and 0.6 (2 images, 2 right).
    probabilities = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.4, 0.6]])
    labels = np.array([0, 1, 0, 1])
    expected = 0.5 * abs(0.9 - 0.5) + 0.5 * abs(0.6 - 1.0)
    assert evaluate.expected_calibration_error(probabilities, labels, bins=10) == pytest.approx(expected)


def test_perfectly_calibrated_predictions_have_zero_ece():
    probabilities = np.tile([1.0, 0.0], (10, 1))
    assert evaluate.expected_calibration_error(probabilities, np.zeros(10, int)) == pytest.approx(0.0)


def test_temperature_scaling_recovers_a_known_temperature():
    generator = torch.Generator().manual_seed(0)
    true_logits = torch.randn(4000, 10, generator=generator) * 2
    labels = torch.multinomial(F.softmax(true_logits, 1), 1, generator=generator).squeeze(1)
    overconfident = true_logits * 3.0  # a model 3x too sure of itself
    temperature = evaluate.fit_temperature(overconfident, labels)
    assert temperature == pytest.approx(3.0, rel=0.1)
    before = evaluate.expected_calibration_error(F.softmax(overconfident, 1).numpy(), labels.numpy())
    after = evaluate.expected_calibration_error(F.softmax(overconfident / temperature, 1).numpy(), labels.numpy())
    assert after < before / 2


def test_training_with_validation_calibrates_and_predict_flags(tmp_path):
    arrays = learnable_arrays(n_train=640)
    result = training.train(small("classic-sgd", epochs=2, validation=200), arrays=arrays, out_dir=tmp_path / "run")
    calibration = result.metrics["calibration"]
    assert calibration["fitted"] and calibration["images"] == 200
    assert calibration["temperature"] > 0 and 0 <= calibration["ece_after"] <= 1
    classifier = Classifier.load(tmp_path / "run")
    assert classifier.calibrated and classifier.temperature == pytest.approx(calibration["temperature"])
    # The calibrated test loss training reports is the loss of the probabilities the classifier gives.
    (x_test, y_test) = arrays[1]
    report = evaluate.classification_report(classifier.predict_proba(x_test), y_test, classifier.classes)
    assert result.metrics["test_loss_calibrated"] == pytest.approx(report["loss"], abs=1e-4)
    assert result.metrics["test_loss_calibrated"] != pytest.approx(result.metrics["test_loss"], abs=1e-4)
    images = arrays[1][0][:5]
    answers = classifier.answer(images, k=2)
    assert len(answers) == 5 and len(answers[0]["top"]) == 2
    for answer in answers:
        top = answer["top"][0]["probability"]
        assert answer["unsure"] == (top < 0.5)
        assert sum(answer["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    # "unusual" compares the top logit with the held-out threshold stored at training time.
    top_logit = float(classifier.logits(images[:1]).max())
    classifier.unusual_logit_threshold = top_logit + 1.0
    assert classifier.answer(images[:1])[0]["unusual"] is True
    classifier.unusual_logit_threshold = top_logit - 1.0
    assert classifier.answer(images[:1])[0]["unusual"] is False
    assert classifier.answer(np.zeros((1, 28, 28), np.uint8), unsure_below=1.01)[0]["unsure"] is True


def test_training_without_validation_says_it_is_uncalibrated():
    result = training.train(small("classic-adam"), arrays=learnable_arrays())
    assert result.metrics["calibration"] == {
        "fitted": False, "temperature": 1.0,
        "note": "no validation split: train with --validation 5000 to calibrate confidence"}

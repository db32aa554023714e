"""A trained model answering questions: class probabilities for arrays of 28x28 images.

`Classifier.load(run_dir).predict_proba(x)` takes uint8 (0..255) or float (0..1) arrays of shape (n, 28, 28)
or a single (28, 28) image, applies the normalisation stored with the model, and returns softmax probabilities.
`Predictor` holds what every engine shares (input checks, calibration, answers), so the onnxruntime predictor in
`fmnist.export` answers exactly like the torch one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fmnist.checkpoint import RunMeta, load_model
from fmnist.data import preprocess
from fmnist.devices import resolve_device
from fmnist.errors import ImageError, ModelFileError
from fmnist.evaluate import class_probabilities, inference_chunk

UNSURE_BELOW = 0.5  # a calibrated top probability under this is reported as "unsure"


def check_images(images: np.ndarray) -> np.ndarray:
    """Images as an (n, 28, 28) uint8 or float array, refusing shapes, dtypes and ranges no model can use."""
    array = np.asarray(images)
    if array.ndim == 2:
        array = array[None]
    if array.ndim == 4 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim != 3 or array.shape[1:] != (28, 28):
        raise ImageError(f"expected images of shape (n, 28, 28) or (28, 28), got {array.shape}; "
                         "convert photos with fmnist.images first")
    if np.issubdtype(array.dtype, np.floating):
        if array.size and (np.nanmin(array) < -1e-6 or np.nanmax(array) > 1 + 1e-6 or np.isnan(array).any()):
            raise ImageError("float images must hold values in 0..1 (uint8 images may hold 0..255)")
    elif array.dtype != np.uint8:
        raise ImageError(f"unsupported image dtype {array.dtype}; use uint8 (0..255) or float (0..1)")
    return array


class Predictor:
    """What every engine shares: the metadata, calibration, and answers built on `logits` and `predict_proba`.

    Subclasses implement `logits` and `predict_proba`; `predict`, `top_k` and `answer` then behave the same
    whichever engine (torch, onnxruntime) computes the numbers.
    """

    def __init__(self, meta: RunMeta):
        self.meta = meta
        self.classes: list[str] = list(meta.classes)
        self.temperature = meta.calibration.temperature
        self.calibrated = meta.calibration.fitted
        self.unusual_logit_threshold = meta.calibration.unusual_logit_threshold

    def __repr__(self) -> str:
        accuracy = self.meta.metrics.get("test_accuracy")
        shown = f", test_accuracy={accuracy:.4f}" if isinstance(accuracy, float) else ""
        return f"{type(self).__name__}({self.meta.architecture.name}, preset={self.meta.preset!r}{shown})"

    def logits(self, images: np.ndarray, batch_size: int | None = None) -> np.ndarray:
        """Raw model outputs, shape (n, 10)."""
        raise NotImplementedError

    def predict_proba(self, images: np.ndarray, batch_size: int | None = None, tta: bool = False,
                      calibrated: bool = True) -> np.ndarray:
        """Softmax probabilities, shape (n, 10); `tta` averages the test-time views (mirror image and
        1-pixel shifts, `fmnist.data.tta_views`)."""
        raise NotImplementedError

    def answer(self, images: np.ndarray, k: int = 3, unsure_below: float = UNSURE_BELOW) -> list[dict[str, Any]]:
        """Per image: top-k classes with calibrated probabilities, all probabilities, and honest flags.

        `unsure` when the top probability is under `unsure_below`; `unusual` when the top logit is below what
        99% of held-out images scored (the input looks unlike the training images, e.g. not clothing at all).
        """
        logits = self.logits(images)
        probabilities = torch.softmax(torch.from_numpy(logits) / self.temperature, 1).numpy()
        answers = []
        for row_logits, row in zip(logits, probabilities, strict=True):
            order = np.argsort(-row)
            answers.append({
                "top": [{"class": self.classes[j], "probability": float(row[j])} for j in order[:k]],
                "probabilities": {name: float(p) for name, p in zip(self.classes, row, strict=True)},
                "unsure": bool(row[order[0]] < unsure_below),
                "unusual": bool(self.unusual_logit_threshold is not None
                                and row_logits.max() < self.unusual_logit_threshold),
            })
        return answers

    def check(self, label: str = "the model") -> None:
        """Refuse a model that cannot answer, before it is asked: a blank image must give one finite probability per
        class, summing to 1. Weights and temperature are checked when read; this catches what only running shows
        (a negative batch-norm variance, logits that overflow), so a service never starts only to answer 500."""
        blank = np.zeros((1, 28, 28), np.uint8)
        try:
            probabilities = np.asarray(self.predict_proba(blank), dtype=np.float64)
        except (RuntimeError, ValueError) as error:
            detail = " ".join(str(error).split())[:160] or type(error).__name__
            raise ModelFileError(f"{label}: the model fails on a blank image ({detail}); the run folder is damaged, "
                                 "retrain or restore it") from None
        if probabilities.shape != (1, len(self.classes)) or not np.isfinite(probabilities).all() \
                or probabilities.min() < 0 or abs(probabilities.sum() - 1) > 1e-3:
            shown = np.array2string(probabilities.ravel()[:10], precision=3, threshold=10)
            raise ModelFileError(f"{label}: the model answers a blank image with {shown}, not {len(self.classes)} "
                                 "probabilities; the weights or calibration are broken, retrain or restore it")

    def evaluate(self, images: np.ndarray, labels: np.ndarray, tta: bool = False) -> dict[str, Any]:
        """Keras' `model.evaluate(x, y)`, and more: loss and accuracy of the calibrated probabilities, the
        per-class precision/recall/F1, the confusion matrix and the most confused pairs
        (`fmnist.evaluate.classification_report`)."""
        from fmnist.evaluate import classification_report

        labels = np.asarray(labels)
        if labels.shape != (len(images),):
            raise ValueError(f"labels must be one class index per image: {len(images)} images, labels of shape "
                             f"{labels.shape}")
        return classification_report(self.predict_proba(images, tta=tta), labels, self.classes)

    def predict(self, images: np.ndarray, batch_size: int | None = None) -> np.ndarray:
        """The most probable class index per image."""
        return self.predict_proba(images, batch_size).argmax(axis=1)

    def top_k(self, images: np.ndarray, k: int = 3) -> list[list[tuple[str, float]]]:
        """Per image, the `k` most probable (class name, probability) pairs."""
        probabilities = self.predict_proba(images)
        order = np.argsort(-probabilities, axis=1)[:, :k]
        return [[(self.classes[j], float(row[j])) for j in idx] for row, idx in zip(probabilities, order, strict=True)]


class Classifier(Predictor):
    """A loaded torch model plus the metadata it was saved with (classes, normalisation, metrics).

    `device` ("cpu", "auto", "cuda", "cuda:N") is where the forward passes run; inputs and answers stay NumPy.
    """

    def __init__(self, model: nn.Module, meta: RunMeta, device: str | torch.device = "cpu"):
        super().__init__(meta)
        self.device = device if isinstance(device, torch.device) else resolve_device(device)
        self.model = model.to(self.device).eval()
        self._mean, self._std = meta.normalization.mean, meta.normalization.std
        self._channels_last = meta.channels_last
        if self._channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)

    @classmethod
    def load(cls, run_dir: str | os.PathLike, device: str | torch.device = "cpu", trust_code: bool = False
             ) -> Classifier:
        """Load a run folder written by `fmnist train` (safetensors + JSON, nothing executable), checked by one
        prediction on a blank image (`check`).

        A run of your own network (`train(..., model=...)`) names the Python class to rebuild it from; loading it
        imports that module, which runs its code, so it needs `trust_code=True`: pass it only for runs you trust
        (yours, or from someone you would run a script from). Without it such a run raises `UntrustedCodeError`."""
        model, meta = load_model(run_dir, trust_code=trust_code)
        classifier = cls(model, meta, device)
        classifier.run_dir = Path(run_dir)
        classifier.check(str(run_dir))
        return classifier

    def prepare(self, images: np.ndarray) -> torch.Tensor:
        """Validate and scale images to the model's input tensor (n, 1, 28, 28)."""
        return self._scaled(check_images(images))

    def _scaled(self, array: np.ndarray) -> torch.Tensor:
        """Checked images to the model's input on its device (never changing the caller's array)."""
        return preprocess(array, self._mean, self._std, self._channels_last).to(self.device)

    def _batches(self, images: np.ndarray, batch_size: int | None):
        """Model inputs chunk by chunk (`evaluate.inference_chunk` images unless `batch_size` says): small tensors
        stay in cache, and no full-size float copy is made."""
        array = check_images(images)
        batch_size = batch_size or inference_chunk(self.model)
        for start in range(0, len(array), batch_size):
            yield self._scaled(array[start:start + batch_size])

    def logits(self, images: np.ndarray, batch_size: int | None = None) -> np.ndarray:
        """Raw model outputs, shape (n, 10)."""
        with torch.inference_mode():
            outputs = [self.model(batch).float().cpu() for batch in self._batches(images, batch_size)]
        return torch.cat(outputs).numpy() if outputs else np.zeros((0, len(self.classes)), np.float32)

    def predict_proba(self, images: np.ndarray, batch_size: int | None = None, tta: bool = False,
                      calibrated: bool = True) -> np.ndarray:
        """Softmax probabilities, shape (n, 10); `tta` averages the test-time views (mirror image and
        1-pixel shifts, `fmnist.data.tta_views`).

        With `calibrated`, logits are divided by the temperature fitted on the validation split (1.0 when the
        model was trained without one), so a 90% answer is right about 90% of the time.
        """
        temperature = self.temperature if calibrated else 1.0
        with torch.inference_mode():
            outputs = [class_probabilities(self.model, batch, temperature, tta).cpu()
                       for batch in self._batches(images, batch_size)]
        return torch.cat(outputs).numpy() if outputs else np.zeros((0, len(self.classes)), np.float32)

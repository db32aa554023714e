"""Loss, accuracy, per-class precision/recall/F1, confusion matrix and the most-confused pairs.

Metrics come from scikit-learn (a trusted implementation) over probabilities computed here in batches,
in eval mode under `torch.inference_mode()`. Test-time augmentation averages the probabilities of each image, its
mirror image (valid for clothing, which is left-right symmetric in the dataset's sense) and 1-pixel shifts of both.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fmnist import data
from fmnist.data import CLASS_NAMES


def class_probabilities(model: nn.Module, batch: torch.Tensor, temperature: float = 1.0,
                        tta: bool = False) -> torch.Tensor:
    """softmax(model(batch) / temperature), averaged over the weighted test-time views with `tta`: the one TTA
    rule (`fmnist.data.tta_views`)."""
    if not tta:
        return F.softmax(model(batch).float() / temperature, dim=1)
    return sum(weight * F.softmax(model(view).float() / temperature, dim=1)
               for view, weight in zip(data.tta_views(batch), data.TTA_WEIGHTS, strict=True))


# Images per forward pass at inference, measured on 2 cores of a Zen 5 (`python benchmarks/inference_chunks.py`,
# results/inference_chunks-2026-12-02T231053.json, 10,000 images): conv nets in chunks of 64, whose activations stay
# in the caches (Keras CNN 37.5k images/s against 32.8k at 256 and 15.1k at 1024; `default` 6.6k against 3.5k at
# 256; `fast` 17.2k against 18.7k at 256, within this VM's noise), dense nets in chunks of 512 (Dense 128: 879k
# against 818k at 256). A GPU wants big chunks.
CONV_CHUNK, DENSE_CHUNK, GPU_CHUNK = 64, 512, 1024


def inference_chunk(model: nn.Module) -> int:
    """How many images to feed `model` at once for the fastest inference on its device."""
    if next(model.parameters()).device.type != "cpu":
        return GPU_CHUNK
    return CONV_CHUNK if any(isinstance(layer, nn.Conv2d) for layer in model.modules()) else DENSE_CHUNK


def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int | None = None, tta: bool = False
                   ) -> torch.Tensor:
    """Logits (or, with `tta`, log of the view-averaged probabilities) for a prepared input tensor.

    Batches (`inference_chunk` images unless `batch_size` says) move to the model's device and the logits come
    back to the CPU, wherever `x` and the model live.
    """
    batch_size = batch_size or inference_chunk(model)
    was_training = model.training
    model.eval()
    outputs = []
    channels_last = is_channels_last(model)
    device = next(model.parameters()).device
    with torch.inference_mode():
        for start in range(0, len(x), batch_size):
            batch = x[start:start + batch_size].to(device)
            if channels_last:
                batch = batch.contiguous(memory_format=torch.channels_last)
            logits = torch.log(class_probabilities(model, batch, tta=True)) if tta else model(batch).float()
            outputs.append(logits.cpu())
    model.train(was_training)
    return torch.cat(outputs) if outputs else torch.empty(0, 10)


def is_channels_last(model: nn.Module) -> bool:
    """Whether the model's convolution weights are in channels-last layout (its inputs should be too)."""
    for parameter in model.parameters():
        if parameter.dim() == 4:
            return parameter.is_contiguous(memory_format=torch.channels_last) and not parameter.is_contiguous()
    return False


def loss_and_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int | None = None,
                      tta: bool = False) -> tuple[float, float]:
    """Mean cross-entropy and accuracy on a prepared tensor set."""
    logits = predict_logits(model, x, batch_size, tta)
    if tta:  # already log-probabilities
        y = y.cpu()
        return F.nll_loss(logits, y).item(), (logits.argmax(1) == y).float().mean().item()
    return logit_scores(logits, y)


def logit_scores(logits: torch.Tensor, y: torch.Tensor, temperature: float = 1.0) -> tuple[float, float]:
    """Cross-entropy of softmax(logits / temperature) and accuracy, from logits already computed."""
    y = y.cpu()
    return F.cross_entropy(logits / temperature, y).item(), (logits.argmax(1) == y).float().mean().item()


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """ECE: the gap between confidence and accuracy, averaged over equal-width confidence bins (weighted)."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == np.asarray(labels)
    edges = np.linspace(0.0, 1.0, bins + 1)
    total = 0.0
    for low, high in zip(edges[:-1], edges[1:], strict=True):
        inside = (confidence > low) & (confidence <= high)
        if inside.any():
            total += inside.mean() * abs(confidence[inside].mean() - correct[inside].mean())
    return float(total)


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Temperature scaling (Guo et al. 2017): the T minimising the NLL of softmax(logits / T) on held-out data.

    One scalar, so it cannot change which class wins, only how sure the model says it is.
    """
    log_temperature = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_temperature], lr=0.1, max_iter=200)
    logits, labels = logits.detach().float(), labels.long()

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_temperature.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_temperature.detach().exp().clamp(0.05, 20.0))


def most_confused_pairs(matrix: np.ndarray, top: int = 5, class_names: Sequence[str] = CLASS_NAMES) -> list[dict]:
    """The off-diagonal cells with the most images: which true class is most often taken for which."""
    off_diagonal = np.array(matrix, dtype=np.int64)
    np.fill_diagonal(off_diagonal, 0)
    order = np.argsort(-off_diagonal, axis=None)[:top]
    pairs = []
    for flat in order:
        true, predicted = divmod(int(flat), off_diagonal.shape[1])
        if off_diagonal[true, predicted] == 0:
            break
        pairs.append({"true": class_names[true], "predicted": class_names[predicted],
                      "count": int(off_diagonal[true, predicted])})
    return pairs


def classification_report(probabilities: np.ndarray, labels: np.ndarray,
                          class_names: Sequence[str] = CLASS_NAMES) -> dict[str, Any]:
    """Accuracy, loss, per-class precision/recall/F1/support, confusion matrix and most-confused pairs."""
    from sklearn.metrics import accuracy_score, confusion_matrix, log_loss, precision_recall_fscore_support

    labels = np.asarray(labels).astype(np.int64)
    predicted = probabilities.argmax(axis=1)
    classes = list(range(len(class_names)))
    precision, recall, f1, support = precision_recall_fscore_support(labels, predicted, labels=classes,
                                                                     zero_division=0)
    matrix = confusion_matrix(labels, predicted, labels=classes)
    return {
        "accuracy": float(accuracy_score(labels, predicted)),
        "loss": float(log_loss(labels, np.clip(probabilities, 1e-12, 1.0), labels=classes)),
        "per_class": [
            {"class": name, "precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for name, p, r, f, s in zip(class_names, precision, recall, f1, support, strict=True)
        ],
        "macro_f1": float(np.mean(f1)),
        "confusion_matrix": matrix.tolist(),
        "most_confused": most_confused_pairs(matrix, class_names=class_names),
    }

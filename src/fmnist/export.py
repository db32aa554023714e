"""ONNX: write a run folder as one self-contained .onnx file, and answer questions from it with onnxruntime.

The graph takes what the dataset holds — uint8 pixels (batch, 28, 28), light garment on black — and does the
normalisation itself, so a consumer in any language needs no knowledge of fmnist to use it. It returns the
calibrated `probabilities` (what `Classifier.predict_proba` returns) and the raw `logits`; classes, temperature
and the full model.json travel in the file's metadata. `OnnxClassifier` reads such a file and behaves like the
torch `Classifier`. onnx, onnxscript and onnxruntime are an optional extra: `pip install 'fmnist[onnx]'`.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from fmnist.checkpoint import RunMeta, load_model, parse_meta
from fmnist.data import TTA_WEIGHTS, tta_views
from fmnist.errors import FmnistError, ModelFileError
from fmnist.files import atomic_write_bytes
from fmnist.hardware import usable_cores
from fmnist.predict import Predictor, check_images

ONNX_FILE = "model.onnx"
OPSET = 18  # the dynamo exporter's own opset (no conversion step); runs on every onnxruntime >= 1.14
INPUT_NAME = "images"
OUTPUT_NAMES = ("probabilities", "logits")
PARITY_TOLERANCE = 1e-4  # largest probability difference from torch accepted when checking a fresh export
# images per onnxruntime call unless the caller says, chosen by `benchmarks/inference_chunks.py` on 2 Zen 5 cores
# (results/inference_chunks-2026-12-03T002916.json): conv nets' activations stay in cache in small chunks (Keras CNN
# 77.6k images/s at 64 against 50.4k at 1024; `fast` 29.7k against 22.8k), dense nets want bigger products (Dense 128
# 1.44M at 512 against 1.16M at 64).
ONNX_CONV_CHUNK = 64
ONNX_DENSE_CHUNK = 512


def onnx_chunk(architecture: str) -> int:
    """Images per onnxruntime call for a network: dense chunks for the MLP, conv chunks for the rest."""
    return ONNX_DENSE_CHUNK if architecture == "mlp" else ONNX_CONV_CHUNK


class OnnxUnavailableError(FmnistError):
    """onnx or onnxruntime is not installed (they are the optional `onnx` extra)."""


def _require(module: str) -> Any:
    """Import an optional package, or say in one line how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise OnnxUnavailableError(f"ONNX support needs the {module} package, which is not installed; "
                                   "run pip install 'fmnist[onnx]'") from None


def _require_exporter() -> Any:
    """onnx, after checking that the exporter's back end (onnxscript) and onnxruntime (the parity check) import."""
    onnx = _require("onnx")
    _require("onnxscript")
    _require("onnxruntime")
    return onnx


def _graph_module(model: Any, meta: RunMeta) -> Any:
    """The model wrapped so the graph starts at dataset bytes and ends at calibrated probabilities."""
    import torch
    from torch import nn

    from fmnist.data import preprocess

    mean, std, temperature = meta.normalization.mean, meta.normalization.std, meta.calibration.temperature

    class Graph(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            # The same preprocessing function as training and Classifier, so the graph scales alike to the bit.
            logits = self.model(preprocess(images, mean, std)).float()
            return torch.softmax(logits / temperature, dim=1), logits

    return Graph().eval()


def _metadata(meta: RunMeta) -> dict[str, str]:
    """The metadata_props written into the file: strings as they are, everything else as JSON text."""
    from fmnist import __version__

    norm, calibration = meta.normalization, meta.calibration
    values = {
        "classes": meta.classes,
        "preprocessing": (f"input '{INPUT_NAME}': uint8 (batch, 28, 28), pixels 0..255 in dataset form (light "
                          f"garment on black; convert photos with fmnist.images.prepare); the graph computes "
                          f"(x / 255 - {norm.mean}) / {norm.std}"),
        "outputs": ("probabilities: softmax(logits / temperature), calibrated, shape (batch, 10); "
                    "logits: raw scores, shape (batch, 10); class order as in 'classes'"),
        "normalization": norm.model_dump(),
        "preset": meta.preset,
        "architecture": meta.architecture.model_dump(),
        "test_accuracy": meta.metrics.get("test_accuracy"),
        "temperature": calibration.temperature,
        "calibrated": calibration.fitted,
        "unusual_logit_threshold": calibration.unusual_logit_threshold,
        "fmnist_version": __version__,
        "model_json": meta.model_dump(),
    }
    return {key: value if isinstance(value, str) else json.dumps(value) for key, value in values.items()}


def _torch_to_onnx(module: Any) -> bytes:
    """Export with torch's dynamo exporter (torch.export + onnxscript), which folds batch norm into the
    convolutions; the older TorchScript exporter is deprecated and announces its removal."""
    import torch

    torch_onnx_log = logging.getLogger("torch.onnx")
    level = torch_onnx_log.level
    torch_onnx_log.setLevel(logging.ERROR)  # it logs a line for each torchvision operator it cannot find
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.export's own deprecation notices, not the user's concern
            program = torch.onnx.export(module, (torch.zeros(2, 28, 28, dtype=torch.uint8),), dynamo=True,
                                        input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                                        opset_version=OPSET, dynamic_shapes=({0: torch.export.Dim("batch")},),
                                        verbose=False)
    finally:
        torch_onnx_log.setLevel(level)
    return program.model_proto.SerializeToString()


def export_onnx(run_dir: str | os.PathLike, out: str | os.PathLike | None = None, trust_code: bool = False) -> Path:
    """Write the run's model as ONNX (default RUN/model.onnx; a folder `out` gets model.onnx), atomically.

    Before anything is written the graph is validated by onnx.checker and compared with the torch model on a
    few images, so a file that exists is one that answers like `Classifier`. A run of your own network imports
    the code it names to rebuild it, which runs that code: only with `trust_code=True` (the ONNX file it writes
    holds a graph, no code, and loads without it).
    """
    _require_exporter()  # before loading anything: one line if a package is missing
    model, meta = load_model(run_dir, trust_code=trust_code)
    target = Path(run_dir) / ONNX_FILE if out is None else Path(out)
    return atomic_write_bytes(target / ONNX_FILE if target.is_dir() else target, onnx_payload(model, meta))


def onnx_payload(model: Any, meta: RunMeta) -> bytes:
    """A model and its model.json as a serialised ONNX graph, checked by onnx.checker and against torch."""
    onnx = _require_exporter()
    from fmnist.predict import Classifier

    model_proto = onnx.load_from_string(_torch_to_onnx(_graph_module(model, meta)))
    model_proto.producer_name = "fmnist"
    model_proto.doc_string = "Fashion-MNIST classifier exported by `fmnist export`; see metadata 'preprocessing'."
    for key, value in _metadata(meta).items():
        entry = model_proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(model_proto, full_check=True)
    payload = model_proto.SerializeToString()

    samples = np.random.default_rng(0).integers(0, 256, size=(16, 28, 28), dtype=np.uint8)
    expected = Classifier(model, meta).predict_proba(samples)
    difference = float(np.abs(OnnxClassifier.from_bytes(payload).predict_proba(samples) - expected).max())
    if not difference <= PARITY_TOLERANCE:
        raise RuntimeError(f"the exported graph disagrees with the torch model (max probability difference "
                           f"{difference:.2g}); nothing was written. Please report this with your torch version")
    return payload


class OnnxClassifier(Predictor):
    """An exported model run by onnxruntime, with the interface of the torch `Classifier`.

    The graph takes uint8 pixels, so float images (0..1) are rounded to the nearest of the 256 levels first.
    """

    def __init__(self, session: Any, meta: RunMeta, path: Path | None = None):
        super().__init__(meta)
        self.session = session
        self.path = path

    @classmethod
    def load(cls, path: str | os.PathLike, threads: int | None = None) -> OnnxClassifier:
        """Load a .onnx file made by `fmnist export`, or a run folder holding `model.onnx`.

        `threads` sets onnxruntime's intra-op threads; the default is every core this process may use.
        """
        path = Path(path)
        if path.is_dir():
            path = path / ONNX_FILE
        if not path.is_file():
            raise ModelFileError(f"{path}: no such ONNX file; make it with `fmnist export RUN --format onnx`")
        return cls._from_source(str(path), threads, path)

    @classmethod
    def from_bytes(cls, payload: bytes, threads: int | None = None) -> OnnxClassifier:
        """Load a serialised model held in memory."""
        return cls._from_source(payload, threads, None)

    @classmethod
    def _from_source(cls, source: str | bytes, threads: int | None, path: Path | None) -> OnnxClassifier:
        ort = _require("onnxruntime")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or usable_cores()
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only: no notes about folded initialisers on the user's terminal
        label = path or "model"
        try:
            session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        except Exception as error:  # onnxruntime raises its own exception types for every kind of bad file
            first = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise ModelFileError(f"{label}: not a loadable ONNX model ({first}); export it again with "
                                 "`fmnist export RUN`") from None
        props = session.get_modelmeta().custom_metadata_map
        try:
            meta = parse_meta(json.loads(props["model_json"]), str(label))
        except (KeyError, json.JSONDecodeError):
            raise ModelFileError(f"{label}: an ONNX model, but not one exported by fmnist (no model_json "
                                 "metadata); export a run with `fmnist export RUN`") from None
        names = {item.name for item in session.get_outputs()}
        if [item.name for item in session.get_inputs()] != [INPUT_NAME] or not names >= set(OUTPUT_NAMES):
            raise ModelFileError(f"{label}: inputs or outputs are not fmnist's ({INPUT_NAME} -> "
                                 f"{', '.join(OUTPUT_NAMES)}); export it again with `fmnist export RUN`")
        return cls(session, meta, path)

    def _pixels(self, images: np.ndarray) -> np.ndarray:
        array = check_images(images)
        if array.dtype != np.uint8:
            array = np.rint(array.astype(np.float32) * 255.0).clip(0, 255).astype(np.uint8)
        return np.ascontiguousarray(array)

    def _run(self, pixels: np.ndarray, output: str, batch_size: int | None) -> np.ndarray:
        batch_size = batch_size or onnx_chunk(self.meta.architecture.name)
        outputs = [self.session.run([output], {INPUT_NAME: pixels[start:start + batch_size]})[0]
                   for start in range(0, len(pixels), batch_size)]
        return np.concatenate(outputs) if outputs else np.zeros((0, len(self.classes)), np.float32)

    def logits(self, images: np.ndarray, batch_size: int | None = None) -> np.ndarray:
        """Raw model outputs, shape (n, 10)."""
        return self._run(self._pixels(images), "logits", batch_size)

    def predict_proba(self, images: np.ndarray, batch_size: int | None = None, tta: bool = False,
                      calibrated: bool = True) -> np.ndarray:
        """Softmax probabilities, shape (n, 10); `tta` averages the test-time views (`fmnist.data.tta_views`).

        Calibrated probabilities come straight from the graph; uncalibrated ones are the softmax of its logits.
        """
        import torch

        pixels = self._pixels(images)
        views = tta_views(pixels) if tta else [pixels]
        if calibrated:
            results = [self._run(view, "probabilities", batch_size) for view in views]
        else:
            results = [torch.softmax(torch.from_numpy(self._run(view, "logits", batch_size)), 1).numpy()
                       for view in views]
        return sum(weight * result for weight, result in zip(TTA_WEIGHTS, results, strict=True)) if tta else results[0]

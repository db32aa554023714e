"""A trained run as an MLflow pyfunc model: uint8 images (N, 28, 28) in, calibrated probabilities (N, 10) out.

    model = mlflow.pyfunc.load_model("runs:/<run id>/model")
    probabilities = model.predict(x_test[:5])        # uint8 (5, 28, 28) -> float32 (5, 10)

A module of its own because the class must subclass mlflow's `PythonModel` (importing mlflow takes seconds, so only
`fmnist.tracking` imports this, when it logs a model) and must be importable by name: MLflow then pickles a
reference to `ClassifierModel`, not its code, and the weights travel as plain files (`model.safetensors` and
`model.json`), never pickled. Loading the model needs fmnist installed, like `fmnist.Classifier.load`.
"""

import shutil
import tempfile
from pathlib import Path

import numpy as np
from mlflow.models import ModelSignature
from mlflow.pyfunc import PythonModel, save_model
from mlflow.types import Schema, TensorSpec

from fmnist import __version__
from fmnist.checkpoint import META_FILE, WEIGHTS_FILE

RUN_ARTIFACT = "run"  # the pyfunc artifact holding the run folder's two model files
SIGNATURE = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, 28, 28))]),
                           outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 10))]))


class ClassifierModel(PythonModel):
    """`fmnist.Classifier` behind MLflow's pyfunc interface: the same probabilities as `Classifier.predict_proba`."""

    def load_context(self, context) -> None:
        """Load the run's model files from the model's artifacts (checked as `Classifier.load` checks them)."""
        from fmnist.predict import Classifier

        self.classifier = Classifier.load(context.artifacts[RUN_ARTIFACT])

    def predict(self, context, model_input: np.ndarray, params: dict | None = None) -> np.ndarray:
        """Calibrated class probabilities, shape (N, 10), for uint8 images of shape (N, 28, 28)."""
        return self.classifier.predict_proba(np.asarray(model_input))


def save_pyfunc(run_dir: Path, path: Path) -> Path:
    """Write the pyfunc model folder of a finished run at `path` (which must not exist yet); return `path`.

    Only the two model files are copied in (not the history, plots or resume checkpoint), and the requirements are
    given, so MLflow neither bundles the whole run nor spends seconds inferring them by importing the model.
    """
    import torch

    with tempfile.TemporaryDirectory(prefix="fmnist-pyfunc-") as scratch:
        files = Path(scratch) / RUN_ARTIFACT
        files.mkdir()
        for name in (META_FILE, WEIGHTS_FILE):
            shutil.copy2(Path(run_dir) / name, files / name)
        save_model(str(path), python_model=ClassifierModel(), artifacts={RUN_ARTIFACT: str(files)},
                   signature=SIGNATURE,
                   pip_requirements=[f"fmnist=={__version__}", f"torch=={torch.__version__.split('+')[0]}",
                                     f"numpy=={np.__version__}"])
    return Path(path)

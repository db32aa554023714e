"""What the network learned, as a picture: its penultimate-layer features of the test set mapped to 2-D.

The last linear layer only draws straight boundaries, so everything the network learned lives in the features it
feeds that layer. Mapped to 2-D (UMAP when `umap-learn` is installed, else t-SNE from scikit-learn) beside the
same map of the raw pixels, the classes that overlap in the network's own space are the ones it confuses.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fmnist.errors import ConfigError
from fmnist.predict import Classifier


def penultimate_features(classifier: Classifier, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """One row per image: the input of the model's last linear layer (what the classifier head sees)."""
    heads = [module for module in classifier.model.modules() if isinstance(module, nn.Linear)]
    if not heads:
        raise ConfigError("this model has no linear output layer to take features from")
    captured: list[torch.Tensor] = []
    hook = heads[-1].register_forward_hook(lambda module, inputs, output: captured.append(inputs[0].detach()))
    try:
        x = classifier.prepare(images)
        with torch.inference_mode():
            for start in range(0, len(x), batch_size):
                classifier.model(x[start:start + batch_size])
    finally:
        hook.remove()
    if not captured:
        return np.zeros((0, heads[-1].in_features), np.float32)
    return torch.cat(captured).float().flatten(1).cpu().numpy()


def available_methods() -> list[str]:
    """UMAP first when umap-learn is installed (looked up without importing it: the import is slow)."""
    import importlib.util

    return ["umap", "tsne"] if importlib.util.find_spec("umap") is not None else ["tsne"]


def embed_2d(features: np.ndarray, method: str = "auto", seed: int = 0) -> tuple[np.ndarray, str]:
    """2-D coordinates for each row, and the method used ("umap" or "tsne"). Wide inputs go through PCA to 50 first."""
    from sklearn.decomposition import PCA

    if method == "auto":
        method = available_methods()[0]
    if method not in ("umap", "tsne"):
        raise ConfigError(f"unknown embedding method {method!r}; choose umap, tsne or auto")
    if method == "umap" and "umap" not in available_methods():
        raise ConfigError("UMAP needs the umap-learn package: pip install 'fmnist[embedding]' (or use --method tsne)")
    if len(features) < 10:
        raise ConfigError(f"{len(features)} points are too few for a 2-D map; use at least 10")
    values = features.astype(np.float32)
    if values.shape[1] > 50:
        values = PCA(n_components=50, random_state=seed).fit_transform(values)
    if method == "umap":
        import umap

        reducer = umap.UMAP(n_components=2, n_neighbors=min(15, len(values) - 1), random_state=seed, n_jobs=1)
        return reducer.fit_transform(values), "umap"
    from sklearn.manifold import TSNE

    perplexity = float(min(30, (len(values) - 1) / 3))
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(values), "tsne"


def stratified_sample(labels: np.ndarray, count: int, seed: int = 0) -> np.ndarray:
    """Up to `count` indices with the classes in their proportions (sorted, so the picture is reproducible)."""
    if count >= len(labels):
        return np.arange(len(labels))
    from sklearn.model_selection import train_test_split

    chosen, _ = train_test_split(np.arange(len(labels)), train_size=count, stratify=labels, random_state=seed)
    return np.sort(chosen)

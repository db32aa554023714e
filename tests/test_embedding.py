"""`fmnist plot RUN --embedding`: penultimate-layer features, their 2-D map beside the pixels', and the figure."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_train import learnable_arrays, small

from fmnist import embedding, plots, training
from fmnist.cli import main
from fmnist.errors import ConfigError
from fmnist.predict import Classifier


@pytest.fixture(scope="module", params=["classic-adam", "fast"])
def run(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("embedding") / request.param
    overrides = {"widths": [8, 16, 32]} if request.param == "fast" else {}
    training.train(small(request.param, epochs=1, **overrides), arrays=learnable_arrays(), out_dir=folder)
    return folder


def test_features_have_one_row_per_image_and_the_head_width(run):
    classifier = Classifier.load(run)
    images = learnable_arrays()[1][0][:37]
    features = embedding.penultimate_features(classifier, images, batch_size=16)
    head = [m for m in classifier.model.modules() if isinstance(m, torch.nn.Linear)][-1]
    assert features.shape == (37, head.in_features) and np.isfinite(features).all()
    logits = classifier.logits(images)  # the features are what the head turns into the logits
    weight, bias = head.weight.detach().numpy(), head.bias.detach().numpy()
    np.testing.assert_allclose(features @ weight.T + bias, logits, atol=1e-4)


def test_tsne_map_and_figure(run, tmp_path):
    (x, y) = learnable_arrays()[1]
    classifier = Classifier.load(run)
    points, method = embedding.embed_2d(embedding.penultimate_features(classifier, x[:60]), method="tsne")
    assert method == "tsne" and points.shape == (60, 2) and np.isfinite(points).all()
    pixels, _ = embedding.embed_2d(x[:60].reshape(60, -1) / 255.0, method="tsne")
    figure = plots.embedding_maps(pixels, points, y[:60], classifier.predict(x[:60]), method)
    path = plots.save_figure(figure, tmp_path / "embedding.png")
    assert path.stat().st_size > 20_000


def test_stratified_sample_keeps_class_shares():
    labels = np.repeat(np.arange(10), [100, 200, 300, 100, 100, 100, 100, 100, 100, 100])
    chosen = embedding.stratified_sample(labels, 130)
    assert len(chosen) == 130 and np.all(np.diff(chosen) > 0)
    assert np.bincount(labels[chosen])[2] == 30
    assert len(embedding.stratified_sample(labels, 10_000)) == len(labels)


def test_bad_requests_are_config_errors():
    with pytest.raises(ConfigError, match="unknown embedding method"):
        embedding.embed_2d(np.zeros((20, 3)), method="pca")
    with pytest.raises(ConfigError, match="too few"):
        embedding.embed_2d(np.zeros((5, 3)), method="tsne")


@pytest.mark.slow
def test_umap_when_installed():
    pytest.importorskip("umap", reason="umap-learn is not installed (the embedding extra); t-SNE is used instead")
    features = np.random.default_rng(0).normal(size=(80, 12)).astype(np.float32)
    points, method = embedding.embed_2d(features, method="auto")
    assert method == "umap" and points.shape == (80, 2)


def test_plot_cli_embedding(run, use_real_data, capsys):
    assert main(["plot", str(run), "--embedding", "--points", "120", "--method", "tsne"]) == 0
    out = capsys.readouterr().out
    assert "mapping 120 test images to 2-D with TSNE" in out
    assert (run / "plots" / "embedding.png").stat().st_size > 20_000
    assert main(["plot", str(run), "--embedding", "--points", "3"]) == 2
    assert "--points 3 is too few" in capsys.readouterr().err

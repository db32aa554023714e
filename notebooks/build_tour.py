"""Writes notebooks/tour.ipynb from the cells below (outputs empty): edit here, run, commit both.

    python notebooks/build_tour.py

Keeping the tour as plain Python makes diffs readable and lets the test check that the committed notebook is this.
"""

from __future__ import annotations

import json
from pathlib import Path

CELLS: list[tuple[str, str]] = [
    ("markdown", """# A tour of Fashion-MNIST with fmnist

Fashion-MNIST is 70,000 small grayscale photos of clothing in 10 classes: a drop-in replacement for the handwritten
digits of MNIST that is harder and more like real work. In this notebook we go the whole way with fmnist's Python
API: look at the data, train the classic dense network, see where it fails, train a convolutional network, try a
photo the way a phone would take it, and save the model.

Everything runs on a laptop CPU in a few minutes: we train on part of the data for few epochs. The same calls with
the presets' full settings reach the accuracies in the README."""),
    ("code", """import matplotlib.pyplot as plt
import numpy as np

import fmnist
from fmnist import plots

(x_train, y_train), (x_test, y_test) = fmnist.load_data()  # the Keras contract: uint8 arrays
print(x_train.shape, x_train.dtype, y_train.shape, x_test.shape)
print(fmnist.CLASS_NAMES)"""),
    ("markdown", """## 1. Look at the data

Each image is 28x28 pixels, 0 (black) to 255 (white), a light garment on a black background. The classes are
balanced: 6,000 training images each. A grid per class shows how much they vary, and which ones look alike
(shirts, T-shirts, pullovers and coats)."""),
    ("code", """print("images per class:", np.bincount(y_train))
plots.sample_grid(x_train, y_train, per_class=8);"""),
    ("markdown", """## 2. Normalise

Networks learn best from small numbers around zero, so pixels are scaled to 0..1 (`x / 255`), as the Keras
tutorials do. fmnist stores this choice with the model, so predictions later scale new images the same way."""),
    ("code", """x = fmnist.data.preprocess(x_train[:5])
print(x.shape, x.dtype, float(x.min()), float(x.max()))
print("mean pixel of the training set:", round(float(x_train.mean() / 255), 4))"""),
    ("markdown", """## 3. The classic dense network

The TensorFlow tutorial's model: flatten the image, one hidden layer of 128 ReLU units, 10 outputs, Adam, batches
of 32. `train` takes a preset and overrides; here 3 epochs on 20,000 images, holding out 2,000 to validate. The
history holds loss and accuracy per epoch, for training and validation."""),
    ("code", """print(fmnist.summary("classic-adam"))  # the network, layer by layer, like Keras' model.summary()"""),
    ("markdown", """What one training step does, written out in plain PyTorch on fmnist's data and model: a batch goes
forward, the loss compares the 10 outputs with the labels, `backward` computes how each weight moved the loss, and
the optimiser nudges every weight against that. `fmnist.train` repeats exactly this, with progress, validation,
checkpoints and calibration around it."""),
    ("code", """import torch
import torch.nn.functional as F

from fmnist.models import create_model

model = create_model("mlp", hidden=[128])
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, eps=1e-7)
inputs = fmnist.data.preprocess(x_train[:32])            # (32, 1, 28, 28) floats in 0..1
targets = torch.as_tensor(y_train[:32], dtype=torch.long)
for step in range(3):
    loss = F.cross_entropy(model(inputs), targets)      # forward: logits -> loss
    optimizer.zero_grad()
    loss.backward()                                      # backward: a gradient for every weight
    optimizer.step()                                     # update
    print(f"step {step}: loss {loss.item():.3f}")"""),
    ("code", """from fmnist.training import resolve_config, train

dense = train(resolve_config("classic-adam", {"epochs": 3, "train_subset": 20000, "validation": 2000}),
              out_dir="runs/tour-dense")
print(f"test accuracy {dense.metrics['test_accuracy']:.2%} after {dense.metrics['train_seconds']:.1f} s of training")
plots.training_curves(dense.history);"""),
    ("markdown", """## 4. Evaluate

A `Classifier` is a trained model plus what it needs to answer: class names, scaling, calibration. Its
probabilities feed scikit-learn's metrics: precision and recall per class tell which classes are hard."""),
    ("code", """classifier = fmnist.Classifier.load("runs/tour-dense")  # the same model as dense.classifier
probabilities = classifier.predict_proba(x_test)
report = classifier.evaluate(x_test, y_test)   # like Keras' model.evaluate, plus the per-class report
print(f"accuracy {report['accuracy']:.2%}, loss {report['loss']:.3f}")
for row in report["per_class"]:
    print(f"{row['class']:<12} precision {row['precision']:.2f}  recall {row['recall']:.2f}")"""),
    ("markdown", """## 5. Predictions as pictures

Each test image with the predicted class and its probability, green when right and red when wrong; then, as in
the TensorFlow tutorial, images beside the bars of all 10 probabilities."""),
    ("code", """plots.prediction_grid(x_test[:18], probabilities[:18], y_test[:18]);"""),
    ("code", """plots.probability_grid(x_test[:15], probabilities[:15], y_test[:15]);"""),
    ("markdown", """## 6. Where it fails

The confusion matrix counts, for each true class (row), what the model said (column). The mass off the diagonal
sits among the upper-body garments. The most confident mistakes show why: some are hard even for a person."""),
    ("code", """plots.confusion_matrix(np.array(report["confusion_matrix"]))
print(report["most_confused"][:3])"""),
    ("code", """plots.confident_mistakes(x_test, probabilities, y_test, count=12);"""),
    ("markdown", """## 7. A convolutional network

A dense network sees 784 unrelated numbers; a convolutional one looks at small patches everywhere in the image,
so it learns edges and textures once and uses them anywhere. The `fast` preset (batch norm, one-cycle learning
rate, flips) reaches about 92% in a minute on the full data; here 3 epochs on 30,000 images."""),
    ("code", """cnn = train(resolve_config("fast", {"epochs": 3, "train_subset": 30000, "validation": 2000}),
            out_dir="runs/tour-cnn")
for name, result in (("dense", dense), ("cnn", cnn)):
    print(f"{name:>5}: test accuracy {result.metrics['test_accuracy']:.2%}, "
          f"{result.metrics['parameters']:,} parameters, {result.metrics['train_seconds']:.0f} s")"""),
    ("markdown", """## 8. A photo, the way a phone sees it

Real photos are the opposite of the dataset: a dark garment on a light background, large, off-centre, in colour.
We make one from a test image, then `fmnist.images.prepare` repeats the dataset's recipe (gray, invert, trim,
fit to 28x28, match intensity) and shows each step."""),
    ("code", """from PIL import Image

from fmnist import images

garment = Image.fromarray(255 - x_test[1]).resize((240, 240), Image.Resampling.LANCZOS)  # dark on light, large
photo = Image.new("RGB", (420, 320), (235, 228, 220))
photo.paste(Image.merge("RGB", [garment] * 3), (130, 40))
prepared = images.prepare(photo)

figure, axes = plt.subplots(1, len(prepared.steps) + 1, figsize=(13, 2.6))
axes[0].imshow(photo)
axes[0].set_title("photo")
for axis, (step, picture) in zip(axes[1:], prepared.steps.items(), strict=True):
    axis.imshow(picture, cmap="gray")
    axis.set_title(step)
for axis in axes:
    axis.axis("off")
cnn_classifier = fmnist.Classifier.load("runs/tour-cnn")
answer = cnn_classifier.answer(prepared.image)[0]
print("true class:", fmnist.CLASS_NAMES[y_test[1]], "| model:", answer["top"][0], "| unsure:", answer["unsure"])"""),
    ("markdown", """## 9. Save and load

`train(..., out_dir=...)` already saved each model: weights as safetensors (no code runs when loading) and a
JSON file with the architecture, scaling and metrics. Loading it in a fresh process gives the same answers."""),
    ("code", """import os

print(sorted(os.listdir("runs/tour-cnn")))
reloaded = fmnist.Classifier.load("runs/tour-cnn")
same = np.allclose(reloaded.predict_proba(x_test[:100]), cnn_classifier.predict_proba(x_test[:100]))
print(reloaded, "| same probabilities after reloading:", same)"""),
    ("markdown", """## 10. What the network learned

The network's last layer only draws straight lines between classes, so what it learned is in the features it
feeds that layer. Mapped to 2-D beside the raw pixels (UMAP, or t-SNE without umap-learn), the clothing classes
that the pixels mix up pull apart, except the upper-body garments, which stay close: the confusion matrix's story
as a picture. From the command line: `fmnist plot runs/tour-cnn --embedding`."""),
    ("code", """from fmnist import embedding

chosen = embedding.stratified_sample(y_test, 1500)
pixel_map, method = embedding.embed_2d(x_test[chosen].reshape(len(chosen), -1) / 255.0)
feature_map, _ = embedding.embed_2d(embedding.penultimate_features(cnn_classifier, x_test[chosen]))
predicted = cnn_classifier.predict(x_test[chosen])
plots.embedding_maps(pixel_map, feature_map, y_test[chosen], predicted, method);"""),
    ("markdown", """## 11. Your own network

`train` takes any PyTorch module that maps a batch of images, shape (N, 1, 28, 28), to 10 scores per image, and
gives it the whole loop: progress, validation, early stopping, calibration and metrics. Here a small network
defined in this notebook trains in memory for one epoch on 4,000 images. Its weights are whatever it was built
with, so seed torch first. To keep a run folder (`out_dir=`), put the class in a .py module: loading the run
imports it again, and since importing runs that module's code, loading asks for `trust_code=True`."""),
    ("code", """from torch import nn


class TinyCNN(nn.Module):
    \"\"\"Two 3x3 convolutions, each followed by 2x2 max-pooling, then a dense layer of 10 outputs.\"\"\"

    def __init__(self, width: int = 8):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Linear(2 * width * 7 * 7, 10)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


torch.manual_seed(0)
mine = train(resolve_config("classic-adam", {"epochs": 1, "train_subset": 4000, "validation": 500}), model=TinyCNN())
print(f"your network: test accuracy {mine.metrics['test_accuracy']:.2%}, {mine.metrics['parameters']:,} parameters")
print(mine.classifier.top_k(x_test[:2], k=2))"""),
    ("markdown", """## Where next

- `fmnist train --preset best` reaches 95% (about half an hour on 2 cores); `fmnist train --list-presets` shows all.
- `fmnist serve runs/tour-cnn` opens a web page to draw or upload clothes; `fmnist export` writes ONNX.
- `benchmarks/compare.py` runs the classic Keras programs side by side with these."""),
]


def notebook() -> dict:
    cells = []
    for index, (kind, source) in enumerate(CELLS):
        cell = {"cell_type": kind, "id": f"tour-{index:02d}", "metadata": {},
                "source": source.splitlines(keepends=True)}
        if kind == "code":
            cell.update(execution_count=None, outputs=[])
        cells.append(cell)
    return {"cells": cells, "nbformat": 4, "nbformat_minor": 5,
            "metadata": {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
                         "language_info": {"name": "python"}}}


def text() -> str:
    return json.dumps(notebook(), indent=1, ensure_ascii=False) + "\n"


if __name__ == "__main__":
    path = Path(__file__).with_name("tour.ipynb")
    path.write_text(text())
    print(f"wrote {path}")

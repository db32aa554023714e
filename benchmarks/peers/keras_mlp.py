"""The TensorFlow tutorial's classifier ("Basic classification: Classify images of clothing"), in plain Keras 3.

Flatten -> Dense(128, relu) -> Dense(10) logits, Adam (learning rate 1e-3), batch 32, 10 epochs, pixels x/255,
Glorot-uniform weights and zero biases (Keras' defaults). The same network and settings as fmnist's preset
`classic-adam`. https://www.tensorflow.org/tutorials/keras/classification

    .venv/bin/python benchmarks/peers/keras_mlp.py            # the full tutorial, then its timings
    .venv/bin/python benchmarks/peers/keras_mlp.py --epochs 1 --train-subset 2000 --json
"""

from __future__ import annotations

import time

from _common import epoch_timer, load_data, main, peak_rss_mib, report

EPOCHS = 10


def run(epochs: int | None = None, train_subset: int | None = None, test_subset: int | None = None) -> dict:
    """Train and evaluate the tutorial model; return its timings, accuracy and memory."""
    import keras

    (x_train, y_train), (x_test, y_test) = load_data(train_subset, test_subset)
    x_train, x_test = x_train / 255.0, x_test / 255.0  # as the tutorial does (float64 arrays)

    model = keras.Sequential([
        keras.Input(shape=(28, 28)),
        keras.layers.Flatten(),
        keras.layers.Dense(128, activation="relu"),
        keras.layers.Dense(10),
    ])
    model.compile(optimizer="adam",
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])

    timer = epoch_timer()
    started = time.perf_counter()
    history = model.fit(x_train, y_train, epochs=epochs or EPOCHS, callbacks=[timer], verbose=0)
    fit_seconds = time.perf_counter() - started

    config = {"description": "TF tutorial: Dense 128, Adam 1e-3, batch 32, 10 epochs", "preset": "classic-adam",
              "epochs": epochs or EPOCHS, "batch_size": 32, "train_size": len(y_train)}
    return report("keras_mlp", config, model, history, timer, fit_seconds, peak_rss_mib(), x_test, y_test)


if __name__ == "__main__":
    main(run, __doc__)

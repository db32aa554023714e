"""Géron's Fashion-MNIST classifier (Hands-On Machine Learning, chapter 10, "Building an Image Classifier Using
the Sequential API"), in plain Keras 3.

Flatten -> Dense(300, relu) -> Dense(100, relu) -> Dense(10, softmax), plain SGD (learning rate 0.01, Keras'
default for "sgd"), batch 32, 30 epochs, the first 5,000 training images held out for validation, pixels x/255.
The same network and settings as fmnist's preset `classic-sgd`, which also holds out 5,000 images (a stratified
random choice rather than the first 5,000; both train on 55,000).

    .venv/bin/python benchmarks/peers/keras_sgd.py
    .venv/bin/python benchmarks/peers/keras_sgd.py --epochs 1 --train-subset 2000 --json
"""

from __future__ import annotations

import time

from _common import epoch_timer, load_data, main, peak_rss_mib, report, validation_size

EPOCHS = 30


def run(epochs: int | None = None, train_subset: int | None = None, test_subset: int | None = None) -> dict:
    """Train with validation and evaluate the book's model; return its timings, accuracy and memory."""
    import keras

    (x_train_full, y_train_full), (x_test, y_test) = load_data(train_subset, test_subset)
    held_out = validation_size(train_subset)  # 5,000 (a tenth of a smoke-test subset)
    x_valid, x_train = x_train_full[:held_out] / 255.0, x_train_full[held_out:] / 255.0
    y_valid, y_train = y_train_full[:held_out], y_train_full[held_out:]
    x_test = x_test / 255.0

    model = keras.Sequential([
        keras.Input(shape=(28, 28)),
        keras.layers.Flatten(),
        keras.layers.Dense(300, activation="relu"),
        keras.layers.Dense(100, activation="relu"),
        keras.layers.Dense(10, activation="softmax"),
    ])
    model.compile(loss="sparse_categorical_crossentropy",
                  optimizer=keras.optimizers.SGD(learning_rate=0.01),
                  metrics=["accuracy"])

    timer = epoch_timer()
    started = time.perf_counter()
    history = model.fit(x_train, y_train, epochs=epochs or EPOCHS, validation_data=(x_valid, y_valid),
                        callbacks=[timer], verbose=0)
    fit_seconds = time.perf_counter() - started

    config = {"description": "Géron: Dense 300 -> 100, SGD 0.01, batch 32, 30 epochs, 5,000 validation images",
              "preset": "classic-sgd", "epochs": epochs or EPOCHS, "batch_size": 32, "validation": held_out,
              "train_size": len(y_train)}
    return report("keras_sgd", config, model, history, timer, fit_seconds, peak_rss_mib(), x_test, y_test)


if __name__ == "__main__":
    main(run, __doc__)

"""The typical Keras CNN for Fashion-MNIST, in plain Keras 3.

Conv2D(32, 3x3, relu) -> MaxPooling2D(2) -> Conv2D(64, 3x3, relu) -> MaxPooling2D(2) -> Flatten -> Dense(128,
relu) -> Dense(10) logits, 'valid' padding, no dropout, Adam (learning rate 1e-3), batch 32, 10 epochs, pixels
x/255 as float32 with a channel axis. The same network (fmnist.models.KerasCNN, 225,034 parameters) and settings as
fmnist's preset `keras-cnn`.

    .venv/bin/python benchmarks/peers/keras_cnn.py
    .venv/bin/python benchmarks/peers/keras_cnn.py --epochs 1 --train-subset 2000 --json
"""

from __future__ import annotations

import time

from _common import epoch_timer, load_data, main, peak_rss_mib, report

EPOCHS = 10


def run(epochs: int | None = None, train_subset: int | None = None, test_subset: int | None = None) -> dict:
    """Train and evaluate the CNN; return its timings, accuracy and memory."""
    import keras
    from keras import layers

    (x_train, y_train), (x_test, y_test) = load_data(train_subset, test_subset)
    x_train = x_train.reshape(-1, 28, 28, 1).astype("float32") / 255
    x_test = x_test.reshape(-1, 28, 28, 1).astype("float32") / 255

    model = keras.Sequential([
        keras.Input(shape=(28, 28, 1)),
        layers.Conv2D(32, (3, 3), activation="relu"),
        layers.MaxPooling2D((2, 2)),
        layers.Conv2D(64, (3, 3), activation="relu"),
        layers.MaxPooling2D((2, 2)),
        layers.Flatten(),
        layers.Dense(128, activation="relu"),
        layers.Dense(10),
    ])
    model.compile(optimizer="adam",
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])

    timer = epoch_timer()
    started = time.perf_counter()
    history = model.fit(x_train, y_train, batch_size=32, epochs=epochs or EPOCHS, callbacks=[timer], verbose=0)
    fit_seconds = time.perf_counter() - started

    config = {"description": "Keras CNN: Conv32-pool-Conv64-pool-Dense128, Adam, batch 32, 10 epochs",
              "preset": "keras-cnn", "epochs": epochs or EPOCHS, "batch_size": 32, "parameters": model.count_params(),
              "train_size": len(y_train)}
    return report("keras_cnn", config, model, history, timer, fit_seconds, peak_rss_mib(), x_test, y_test)


if __name__ == "__main__":
    main(run, __doc__)

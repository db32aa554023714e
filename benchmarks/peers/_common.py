"""Timing and reporting shared by the Keras peers, so that each peer program stays the plain tutorial code.

Every peer measures the same things in the same way as `benchmarks/compare.py` measures fmnist:

- fit: `model.fit(..., verbose=0)`, since fmnist's API prints nothing either (a per-step progress bar would cost
  Keras time the library does not need to spend); the wall time of each epoch (a callback reading
  `time.perf_counter` at epoch begin/end, so an epoch includes its validation pass, as Keras' own progress bar
  does) and of the whole `model.fit` call;
- evaluate: wall time of `model.evaluate(x_test, y_test)` and the test accuracy;
- batch inference: `model.predict(x_test, batch_size=1000)` on the 10,000 test images after one warm-up call
  (1000 = the batch `fmnist.predict.Classifier` uses), and also with Keras' default batch size (32), which is what
  `model.predict(x_test)` does;
- single-image latency: median of 50 calls of `model.predict(one_image)` and of `model(one_image, training=False)`
  (both are what people write), after one warm-up call each;
- peak memory: `resource.getrusage(RUSAGE_SELF).ru_maxrss` after fit and at the end.

The data come from `fmnist.load_data()`: the same uint8 arrays, byte for byte, as
`keras.datasets.fashion_mnist.load_data()`, which needs the internet to download them.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

# Before TensorFlow is imported anywhere: no C++ info/warning lines, the TensorFlow backend.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

PREDICT_BATCH = 1000  # the batch fmnist.predict.Classifier uses; Keras' own default is 32
KERAS_DEFAULT_BATCH = 32
LATENCY_CALLS = 50
FULL_VALIDATION = 5000  # Géron holds out the first 5,000 training images; fmnist's classic-sgd holds out 5,000 too


def validation_size(train_subset: int | None) -> int:
    """Images held out for validation: 5,000, or a tenth of a small training subset (smoke runs)."""
    return FULL_VALIDATION if train_subset is None else max(1, train_subset // 10)


def load_data(train_subset: int | None = None, test_subset: int | None = None):
    """`((x_train, y_train), (x_test, y_test))` as uint8 arrays, optionally the first N images of each split."""
    import fmnist  # the Keras contract, read from the local dataset: Keras' loader would download it

    (x_train, y_train), (x_test, y_test) = fmnist.load_data()
    if train_subset:
        x_train, y_train = x_train[:train_subset], y_train[:train_subset]
    if test_subset:
        x_test, y_test = x_test[:test_subset], y_test[:test_subset]
    return (x_train, y_train), (x_test, y_test)


def peak_rss_mib() -> float:
    """This process's peak resident memory so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def epoch_timer():
    """A Keras callback whose `.seconds` lists each epoch's wall time (validation included)."""
    import keras

    class EpochTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.seconds: list[float] = []
            self._started = 0.0

        def on_epoch_begin(self, epoch, logs=None):
            self._started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds.append(time.perf_counter() - self._started)

    return EpochTimer()


def timed(function: Callable[[], Any]) -> tuple[Any, float]:
    """`(result, seconds)` of one call."""
    started = time.perf_counter()
    result = function()
    return result, time.perf_counter() - started


def median_ms(function: Callable[[], Any], calls: int = LATENCY_CALLS) -> float:
    """Median wall time of `calls` calls in milliseconds, after one untimed warm-up call."""
    function()
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def keras_inference(model, x_test) -> dict[str, Any]:
    """Batch throughput and single-image latency of a trained Keras model, measured the same way as fmnist's."""
    model.predict(x_test[:PREDICT_BATCH], batch_size=PREDICT_BATCH, verbose=0)  # warm-up: traces predict_function
    _, batch_seconds = timed(lambda: model.predict(x_test, batch_size=PREDICT_BATCH, verbose=0))
    _, default_seconds = timed(lambda: model.predict(x_test, verbose=0))  # Keras' default batch of 32
    one = x_test[:1]
    return {
        "predict_batch_size": PREDICT_BATCH,
        "batch_predict_seconds": batch_seconds,
        "batch_images_per_s": len(x_test) / batch_seconds,
        "default_predict_batch_size": KERAS_DEFAULT_BATCH,
        "default_batch_predict_seconds": default_seconds,
        "default_batch_images_per_s": len(x_test) / default_seconds,
        "latency_predict_ms": median_ms(lambda: model.predict(one, verbose=0)),
        "latency_call_ms": median_ms(lambda: model(one, training=False)),
        "latency_calls": LATENCY_CALLS,
    }


def report(program: str, config: dict[str, Any], model, history, timer, fit_seconds: float, peak_fit: float,
           x_test, y_test) -> dict[str, Any]:
    """Evaluate, time inference and collect everything a peer reports into one JSON-able dict."""
    import keras
    import tensorflow as tf

    (test_loss, test_accuracy), evaluate_seconds = timed(lambda: model.evaluate(x_test, y_test, verbose=0))
    evaluated_at = time.time()  # compare.py: process launch -> trained and evaluated, start-up included
    last = {key: float(values[-1]) for key, values in history.history.items()}
    result = {
        "side": "keras", "program": program, "config": config,
        "epochs_run": len(timer.seconds), "epoch_seconds": timer.seconds, "fit_seconds": fit_seconds,
        "train_accuracy": last.get("accuracy"), "val_accuracy": last.get("val_accuracy"),
        "test_accuracy": float(test_accuracy), "test_loss": float(test_loss), "evaluate_seconds": evaluate_seconds,
        "evaluated_at": evaluated_at, "test_size": len(y_test), "train_size": config.get("train_size"),
        **keras_inference(model, x_test),
        "peak_rss_mib_fit": peak_fit,
        "versions": {"keras": keras.__version__, "tensorflow": tf.__version__, "backend": keras.backend.backend()},
    }
    result["peak_rss_mib"] = peak_rss_mib()
    return result


def describe(result: dict[str, Any]) -> str:
    """The human-readable summary a peer prints when run as a script."""
    seconds = result["epoch_seconds"]
    lines = [
        f"{result['program']}: {result['config'].get('description', '')}",
        f"  fit: {result['epochs_run']} epochs in {result['fit_seconds']:.1f} s; per epoch "
        + ", ".join(f"{s:.2f}" for s in seconds) + " s"
        + (f" (median {statistics.median(seconds):.2f} s)" if seconds else ""),
        f"  evaluate: {result['evaluate_seconds']:.2f} s, test accuracy {result['test_accuracy']:.4f} "
        f"on {result['test_size']:,} images",
        f"  batch predict: {result['batch_predict_seconds']:.3f} s = {result['batch_images_per_s']:,.0f} images/s "
        f"(batch_size={result['predict_batch_size']}); Keras default batch_size={result['default_predict_batch_size']}:"
        f" {result['default_batch_images_per_s']:,.0f} images/s",
        f"  one image: model.predict {result['latency_predict_ms']:.2f} ms, model(x, training=False) "
        f"{result['latency_call_ms']:.2f} ms (median of {result['latency_calls']} calls)",
        f"  peak memory: {result['peak_rss_mib_fit']:.0f} MiB after fit, {result['peak_rss_mib']:.0f} MiB at the end",
    ]
    return "\n".join(lines)


def main(run: Callable[..., dict[str, Any]], doc: str | None) -> None:
    """Command line of every peer: `--epochs`, `--train-subset`, `--test-subset`, `--json` (one line, for scripts),
    `--mixed-bfloat16`."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, help="override the number of epochs (smoke runs)")
    parser.add_argument("--train-subset", type=int, help="train on the first N training images only")
    parser.add_argument("--test-subset", type=int, help="evaluate on the first N test images only")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON line instead")
    parser.add_argument("--mixed-bfloat16", action="store_true",
                        help="Keras' mixed_bfloat16 policy (bf16 compute, fp32 variables) instead of float32")
    args = parser.parse_args()
    if args.mixed_bfloat16:
        import keras

        keras.mixed_precision.set_global_policy("mixed_bfloat16")
    result = run(epochs=args.epochs, train_subset=args.train_subset, test_subset=args.test_subset)
    import keras

    result["config"]["precision"] = keras.mixed_precision.global_policy().name  # the policy the run trained under
    if args.json:
        sys.stdout.write(json.dumps(result) + "\n")
    else:
        print(describe(result))

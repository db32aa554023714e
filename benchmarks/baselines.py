"""scikit-learn baselines on Fashion-MNIST, beside the numbers the dataset's authors published for them.

Logistic regression, a random forest and an RBF-kernel SVM, trained on the same x/255 pixels the Keras peers and
fmnist's classic presets use (784 features, the standard 60,000/10,000 split), each timed (fit and predict, wall
clock) and scored on the 10,000 test images. Every classifier, the SVM included, trains on all 60,000 images: the
SVM's fit grows with about the 1.7th power of the training images (6 s on 10,000, 20 s on 20,000 here, 2 cores),
so the full set was estimated at about 2 minutes to fit and 1 minute to predict; `--svm-train 20000` trains it on
the first 20,000 images only where that is too slow.

Published numbers: Xiao, Rasul & Vollgraf (2017), "Fashion-MNIST: a Novel Image Dataset for Benchmarking Machine
Learning Algorithms", arXiv:1708.07747, Table 3 (https://arxiv.org/abs/1708.07747), from the authors' scikit-learn
benchmark (https://github.com/zalandoresearch/fashion-mnist#benchmark, benchmark/runner.py; all results at
http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/). Their runs differ from these in three ways: features
standardised with StandardScaler instead of x/255, scikit-learn of 2017 (SVC's default gamma was then 'auto' =
1/784, which on standardised features is what today's gamma='scale' gives on any scaling), and the mean over
repeated fits on shuffled training data.

    .venv/bin/python benchmarks/baselines.py                      # all three on the full data: about 5 minutes
    .venv/bin/python benchmarks/baselines.py --svm-train 20000    # the SVM on the first 20,000 images only
    .venv/bin/python benchmarks/baselines.py --tiny           # 2,000 / 1,000 images: a smoke test

Writes benchmarks/results/baselines-<YYYY-MM-DDTHHMM>.json and benchmarks/results/baselines.md; `--tiny` writes
to a temporary folder (or `--out DIR`), never over the real results.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from _machine import cpu_name

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
SOURCE = "Xiao, Rasul & Vollgraf 2017, arXiv:1708.07747, Table 3 (https://arxiv.org/abs/1708.07747)"
BENCHMARK_URL = "https://github.com/zalandoresearch/fashion-mnist#benchmark"
SVM_TRAIN_DEFAULT = 0  # all training images
TINY = {"train_subset": 2000, "test_subset": 1000}

# The best configuration of each classifier in the paper's Table 3 (test accuracy on Fashion-MNIST).
PUBLISHED: dict[str, dict[str, Any]] = {
    "logistic_regression": {"classifier": "LogisticRegression", "parameters": "C=1 multi_class=ovr penalty=l1",
                            "accuracy": 0.842,
                            "also": "C=1 multi_class=ovr penalty=l2: 0.841 (the same table)"},
    "random_forest": {"classifier": "RandomForestClassifier",
                      "parameters": "criterion=entropy max_depth=100 n_estimators=100", "accuracy": 0.873},
    "svm_rbf": {"classifier": "SVC", "parameters": "C=10 kernel=rbf", "accuracy": 0.897},
}


def classifiers(seed: int = 0) -> dict[str, tuple[Any, str]]:
    """Each baseline with the parameters used here and why they were chosen."""
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.svm import SVC

    return {
        "logistic_regression": (
            LogisticRegression(C=1.0, max_iter=1000),
            "today's default: multinomial, L2, lbfgs, C=1 (max_iter raised to 1000 so it converges; scikit-learn "
            ">= 1.7 has no multi_class='ovr', and L1 needs the slower liblinear/saga solvers)"),
        "random_forest": (
            RandomForestClassifier(n_estimators=100, criterion="entropy", max_depth=100, n_jobs=-1,
                                   random_state=seed),
            "the paper's best: criterion=entropy, max_depth=100, n_estimators=100 (n_jobs=-1: every core)"),
        "svm_rbf": (
            SVC(C=10, kernel="rbf", gamma="scale"),
            "the paper's best: C=10, RBF kernel; gamma='scale' (see the module docstring)"),
    }


def machine() -> dict[str, Any]:
    """CPU model, cores, versions and load: the context every number needs."""
    cpu = cpu_name()
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "scikit-learn": metadata.version("scikit-learn"), "numpy": metadata.version("numpy"),
            "load_average_at_start": os.getloadavg()}


def run_one(name: str, estimator: Any, x_train, y_train, x_test, y_test) -> dict[str, Any]:
    """Fit and score one classifier, timing both."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        started = time.perf_counter()
        estimator.fit(x_train, y_train)
        fit_seconds = time.perf_counter() - started
    started = time.perf_counter()
    predicted = estimator.predict(x_test)
    predict_seconds = time.perf_counter() - started
    record = {"name": name, "train_size": len(y_train), "test_size": len(y_test),
              "fit_seconds": fit_seconds, "predict_seconds": predict_seconds,
              "test_accuracy": float((predicted == y_test).mean()),
              "warnings": sorted({str(w.message).splitlines()[0] for w in caught})}
    if hasattr(estimator, "n_iter_"):
        record["iterations"] = int(max(estimator.n_iter_.ravel()))
    if hasattr(estimator, "support_"):
        record["support_vectors"] = int(len(estimator.support_))
    return record


def markdown(result: dict[str, Any]) -> str:
    """The results table, each row beside the published number."""
    m = result["machine"]
    lines = ["# scikit-learn baselines", ""]
    if result["tiny"]:
        lines += ["**TINY SMOKE RUN** (2,000 training / 1,000 test images): the numbers mean nothing.", ""]
    lines += [
        f"Written by `benchmarks/baselines.py` on {result['date']}: `{result['command']}`; raw numbers in "
        f"`{result['json_name']}`. Machine: {m['cpu']}, {m['cores']} cores, scikit-learn {m['scikit-learn']}.",
        "",
        "Features: the 784 pixels scaled x/255 (as the Keras peers and fmnist's classic presets). Test accuracy on "
        f"{result['test_size']:,} test images. Published: the best configuration of each classifier in {SOURCE}, "
        f"from the authors' benchmark ({BENCHMARK_URL}): StandardScaler features, mean over repeated fits.",
        "",
        "| classifier | parameters here | trained on | fit s | predict s | test accuracy | published (parameters) |",
        "|---|---|---|---|---|---|---|",
    ]
    for record in result["results"]:
        published = PUBLISHED[record["name"]]
        lines.append(
            f"| {published['classifier']} | {record['parameters']} | {record['train_size']:,} | "
            f"{record['fit_seconds']:.1f} | {record['predict_seconds']:.1f} | {record['test_accuracy']:.2%} | "
            f"{published['accuracy']:.1%} ({published['parameters']}) |")
    lines += ["", "Why these parameters:", ""]
    lines += [f"- {record['name']}: {record['why']}" for record in result["results"]]
    warned = [r for r in result["results"] if r["warnings"]]
    if warned:
        lines += ["", "Warnings: " + "; ".join(f"{r['name']}: {' / '.join(r['warnings'])}" for r in warned)]
    lines += ["", "For the neural networks on the same data, see compare.md and time_to_accuracy.md."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=list(PUBLISHED), default=list(PUBLISHED),
                        help="classifiers to run")
    parser.add_argument("--svm-train", type=int, default=SVM_TRAIN_DEFAULT,
                        help="train the SVM on the first N images only (default 0 = all)")
    parser.add_argument("--train-subset", type=int, help="train every classifier on the first N images only")
    parser.add_argument("--test-subset", type=int, help="score on the first N test images only")
    parser.add_argument("--tiny", action="store_true", help="2,000 training / 1,000 test images: a smoke test")
    parser.add_argument("--out", type=Path, help="folder for the JSON and markdown (default benchmarks/results; "
                                                 "with --tiny a new temporary folder)")
    args = parser.parse_args()
    if args.tiny:
        args.train_subset = args.train_subset or TINY["train_subset"]
        args.test_subset = args.test_subset or TINY["test_subset"]

    import fmnist  # the local dataset, as uint8 arrays (the Keras contract)

    (x_train, y_train), (x_test, y_test) = fmnist.load_data()
    if args.train_subset:
        x_train, y_train = x_train[:args.train_subset], y_train[:args.train_subset]
    if args.test_subset:
        x_test, y_test = x_test[:args.test_subset], y_test[:args.test_subset]
    x_train = x_train.reshape(len(x_train), -1).astype("float32") / 255
    x_test = x_test.reshape(len(x_test), -1).astype("float32") / 255

    now = datetime.now(timezone.utc)
    json_name = f"baselines-{now.strftime('%Y-%m-%dT%H%M')}{'-tiny' if args.tiny else ''}.json"
    result: dict[str, Any] = {
        "date": now.strftime("%Y-%m-%d %H:%M UTC"), "tiny": args.tiny, "json_name": json_name,
        "command": "python benchmarks/baselines.py " + " ".join(sys.argv[1:]), "machine": machine(),
        "source": SOURCE, "benchmark": BENCHMARK_URL, "published": PUBLISHED, "test_size": len(y_test),
        "results": [],
    }
    for name, (estimator, why) in classifiers().items():
        if name not in args.only:
            continue
        n = len(y_train) if name != "svm_rbf" or not args.svm_train else min(args.svm_train, len(y_train))
        print(f"{name}: fitting on {n:,} images ...", flush=True)
        record = run_one(name, estimator, x_train[:n], y_train[:n], x_test, y_test)
        params = estimator.get_params()
        shown = {"logistic_regression": ("C", "max_iter", "solver"),
                 "random_forest": ("n_estimators", "criterion", "max_depth"),
                 "svm_rbf": ("C", "kernel", "gamma")}[name]
        record.update(why=why, parameters=" ".join(f"{key}={params[key]}" for key in shown),
                      published=PUBLISHED[name])
        result["results"].append(record)
        print(f"  {record['test_accuracy']:.4f} test accuracy, fit {record['fit_seconds']:.1f} s, predict "
              f"{record['predict_seconds']:.1f} s (published: {PUBLISHED[name]['accuracy']:.3f})", flush=True)
    result["machine"]["load_average_at_end"] = os.getloadavg()

    out = args.out or (Path(tempfile.mkdtemp(prefix="fmnist-baselines-tiny-")) if args.tiny else RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    (out / json_name).write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    (out / "baselines.md").write_text(table)
    print()
    print(table)
    print(f"Source of the published numbers: {SOURCE}; {BENCHMARK_URL}")
    print(f"wrote {out / json_name} and {out / 'baselines.md'}")


if __name__ == "__main__":
    main()

"""The Keras peers, the side-by-side comparison and the scikit-learn baselines run end to end (tiny sizes).

Every program runs as a child process, as the benchmarks run them, so TensorFlow never shares a process with
torch here (only the import check below loads it into the test process). The numbers are not checked, only that
each program finishes, reports every field and writes its files where it was told to.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PEERS = ROOT / "benchmarks" / "peers"
COMPARE = ROOT / "benchmarks" / "compare.py"
BASELINES = ROOT / "benchmarks" / "baselines.py"
PEER_PRESETS = {"keras_mlp": "classic-adam", "keras_sgd": "classic-sgd", "keras_earlystop": "classic-earlystop",
                "keras_cnn": "keras-cnn"}
REPORTED = ("epoch_seconds", "fit_seconds", "evaluate_seconds", "test_accuracy", "batch_images_per_s",
            "default_batch_images_per_s", "latency_predict_ms", "latency_call_ms", "peak_rss_mib", "peak_rss_mib_fit")


@pytest.fixture(scope="module")
def tensorflow_installed() -> None:
    """Skip (not fail) where the optional peers extra is not installed."""
    pytest.importorskip("tensorflow", reason="the Keras peers need TensorFlow: pip install -e '.[peers]'")


def run(command: list[str], timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    completed = subprocess.run([sys.executable, *command], capture_output=True, text=True, cwd=ROOT, env=env,
                               timeout=timeout)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed


def load_compare():
    if str(COMPARE.parent) not in sys.path:  # as when run as a script: its sibling `_machine` is importable
        sys.path.insert(0, str(COMPARE.parent))
    spec = importlib.util.spec_from_file_location("compare", COMPARE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("peer", list(PEER_PRESETS))
def test_peer_runs_one_epoch_and_reports_everything(peer, tensorflow_installed, use_real_data):
    completed = run([str(PEERS / f"{peer}.py"), "--epochs", "1", "--train-subset", "500", "--test-subset", "200",
                     "--json"], timeout=180)
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    assert result["side"] == "keras" and result["program"] == peer
    assert result["config"]["preset"] == PEER_PRESETS[peer]
    assert result["epochs_run"] == 1 and len(result["epoch_seconds"]) == 1
    assert result["test_size"] == 200 and 0.0 <= result["test_accuracy"] <= 1.0
    assert result["predict_batch_size"] == 1000 and result["default_predict_batch_size"] == 32
    for key in REPORTED:
        value = result[key][0] if isinstance(result[key], list) else result[key]
        assert value > 0, key
    if peer == "keras_sgd":  # a tenth of the subset held out, as compare.py tells fmnist's classic-sgd
        assert result["config"]["validation"] == 50 and result["val_accuracy"] is not None


def test_peer_trains_under_mixed_bfloat16_when_asked(tensorflow_installed, use_real_data):
    """compare.py --bf16 runs the peers with Keras' mixed_bfloat16 policy; the record says which policy trained."""
    command = [str(PEERS / "keras_mlp.py"), "--epochs", "1", "--train-subset", "300", "--test-subset", "100", "--json"]
    plain = json.loads(run(command, timeout=180).stdout.strip().splitlines()[-1])
    mixed = json.loads(run([*command, "--mixed-bfloat16"], timeout=180).stdout.strip().splitlines()[-1])
    assert plain["config"]["precision"] == "float32" and mixed["config"]["precision"] == "mixed_bfloat16"
    compare = load_compare()
    assert "--mixed-bfloat16" in compare.peer_command("keras_cnn", False, bf16=True)
    assert "--mixed-bfloat16" not in compare.peer_command("keras_cnn", False)
    assert "mixed_bfloat16" in compare.precision_text({"precision": "bf16"})


@pytest.mark.slow
def test_compare_tiny_end_to_end(tmp_path, tensorflow_installed, use_real_data):
    results = ROOT / "benchmarks" / "results"
    before = sorted(results.iterdir()) if results.exists() else []
    completed = run([str(COMPARE), "--tiny", "--out", str(tmp_path)], timeout=600)

    assert "fmnist side by side with Keras" in completed.stdout
    [json_file] = tmp_path.glob("compare-*-tiny.json")
    result = json.loads(json_file.read_text())
    assert result["tiny"] is True and result["reps"] == 1
    assert {"cpu", "cores", "torch", "tensorflow", "keras"} <= set(result["machine"])
    assert set(result["pairs"]) == {"mlp", "sgd", "earlystop", "cnn"}
    for name, pair in result["pairs"].items():
        for side in ("keras", "fmnist"):
            for key in ("epoch_seconds", "wall_to_result_seconds", "test_accuracy", "peak_rss_mib",
                        "batch_images_per_s", "latency_predict_ms", "latency_call_ms"):
                assert pair[side][key] is not None, (name, side, key)
        assert {"epoch_speedup", "wall_to_result_speedup", "accuracy_difference", "memory_ratio", "batch_speedup",
                "latency_predict_speedup"} <= set(pair["ratios"])
    sides = {(run["pair"], run["side"]) for run in result["runs"]}
    assert sides == {(p, s) for p in result["pairs"] for s in ("keras", "fmnist")} | {("fast", "fmnist")}
    assert [t["status"] for t in result["targets"]] and all("tiny" in t["status"] for t in result["targets"])
    assert result["fast"]["goal_accuracy"] == result["pairs"]["cnn"]["keras"]["test_accuracy"]["median"]

    table = (tmp_path / "compare.md").read_text()
    assert "TINY SMOKE RUN" in table and "| Keras peer | fmnist |" in table
    for peer, preset in PEER_PRESETS.items():
        assert f"`{peer}.py` vs `{preset}`" in table
    assert "## Targets" in table and "`fast`" in table
    assert (sorted(results.iterdir()) if results.exists() else []) == before  # the real results untouched


def test_compare_targets_are_met_or_missed_by_the_numbers():
    compare = load_compare()

    def side(epoch_seconds, accuracy, images_per_s):
        run = {"epoch_seconds": [epoch_seconds], "epochs_run": 1, "fit_seconds": epoch_seconds,
               "wall_to_result_seconds": epoch_seconds + 5, "wall_seconds": epoch_seconds + 6,
               "test_accuracy": accuracy, "evaluate_seconds": 0.1, "peak_rss_mib": 500.0,
               "batch_images_per_s": images_per_s, "latency_predict_ms": 1.0, "latency_call_ms": 1.0}
        return compare.side_summary([run])

    pairs = {}
    for name, (keras, fm) in {"mlp": ((4.0, 0.880, 1e4), (0.9, 0.878, 4e4)),  # 4.4x, -0.2 points: met
                              "cnn": ((10.0, 0.910, 1e4), (4.0, 0.900, 4e4))}.items():  # 2.5x but -1 point: missed
        k, f = side(*keras), side(*fm)
        pairs[name] = {"keras": k, "fmnist": f, "ratios": compare.pair_summary(k, f)}
    targets = {t["pair"]: t for t in compare.evaluate_targets(pairs, tiny=False)}
    assert targets["mlp"]["status"] == "met"
    assert targets["cnn"]["status"] == "missed"  # fast enough, but not the same accuracy
    assert targets["all"]["status"] == "met"  # 4x the images/s in both pairs
    assert pairs["cnn"]["ratios"]["accuracy_difference"] == pytest.approx(-0.01)


def test_baselines_tiny(tmp_path, use_real_data):
    completed = run([str(BASELINES), "--tiny", "--out", str(tmp_path)], timeout=300)
    [json_file] = tmp_path.glob("baselines-*-tiny.json")
    result = json.loads(json_file.read_text())
    assert [r["name"] for r in result["results"]] == ["logistic_regression", "random_forest", "svm_rbf"]
    for record in result["results"]:
        assert record["train_size"] == 2000 and record["test_size"] == 1000
        assert 0.5 < record["test_accuracy"] <= 1.0 and record["fit_seconds"] > 0
        assert record["published"]["accuracy"] > 0.8
    assert "arxiv.org/abs/1708.07747" in result["source"]
    table = (tmp_path / "baselines.md").read_text()
    assert "TINY SMOKE RUN" in table and "89.7%" in table and "arXiv:1708.07747" in completed.stdout

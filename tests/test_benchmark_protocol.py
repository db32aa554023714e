"""benchmarks/time_to_accuracy.py: the pure parts of its protocol on hand-made inputs, and one end-to-end smoke run.

The benchmark's numbers are only as good as its bookkeeping: seeds summarised right, rows of other CPU classes kept,
oneDNN's ISA line read right and the class limits set as documented. The smoke run writes into a temporary folder
and must leave benchmarks/results and src/fmnist/preset_results.json alone.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from fmnist.config import resolve_config

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "time_to_accuracy.py"


def load_benchmark():
    """Import the script as a module, the way it runs: its sibling `_machine` importable."""
    if str(SCRIPT.parent) not in sys.path:
        sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("time_to_accuracy", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tta = load_benchmark()


def run_record(seed: int, accuracy: float, seconds: float, tta_accuracy: float | None = None, **extra) -> dict:
    """A child's result record with the fields the summary reads."""
    return {"seed": seed, "test_accuracy": accuracy, "test_accuracy_tta": tta_accuracy, "time_seconds": seconds,
            "train_seconds": seconds - 1, "eval_seconds": 1.0, "data_seconds": 2.0, "warmup_seconds": 3.0,
            "peak_rss_mib": 500.0, "throughput_images_per_s": 1000.0, "latency_ms_p50": 0.5, "epochs": 5,
            "parameters": 94186, "precision": "bf16", "cpu_class": "AVX512-BF16", "aten_cpu_capability": "AVX512",
            **extra}


CONTEXT = {"cpu": "Test CPU", "cores": 2, "torch": "2.x", "python": "3.11", "threads": 2, "commit": "abc1234",
           "date": "2026-12-01T10:00:00+00:00", "protocol": tta.PROTOCOL, "command": "python benchmarks/...",
           "env": {}, "onednn_isa_line": "onednn_verbose,v1,info,cpu,isa:Intel AVX2", "onednn_isa": "Intel AVX2",
           "probe_cpu_class": "AVX2"}


SEEN = {"native": "AVX512-BF16", "avx2": "AVX2", "avx512-bf16": "AVX512-BF16"}  # what each child would report


def row(preset: str, cpu_class: str, accuracies=(0.92, 0.93), budget=None, overrides=None) -> dict:
    runs = [run_record(seed, accuracy, 60.0 + seed, cpu_class=SEEN[cpu_class])
            for seed, accuracy in enumerate(accuracies)]
    return tta.make_row(preset, runs, {**CONTEXT, "cpu_class": cpu_class}, budget, overrides or {})


# ----------------------------------------------------------------------------------------------- seeds
def test_stats_gives_mean_sample_std_min_max():
    summary = tta.stats([0.90, 0.92, 0.94])
    assert summary["mean"] == pytest.approx(0.92)
    assert summary["std"] == pytest.approx(0.02)  # sample standard deviation (n - 1)
    assert (summary["min"], summary["max"], summary["n"]) == (0.90, 0.94, 3)


def test_stats_of_one_run_has_no_std_and_of_none_is_none():
    assert tta.stats([0.9])["std"] is None
    assert tta.stats([None, None]) is None
    assert tta.stats([None, 0.5, 0.7])["mean"] == pytest.approx(0.6)


def test_summarise_over_seeds():
    runs = [run_record(0, 0.91, 50.0, 0.92), run_record(1, 0.93, 70.0, 0.94)]
    summary = tta.summarise(runs)
    assert summary["test_accuracy"]["mean"] == pytest.approx(0.92)
    assert summary["test_accuracy_tta"]["max"] == pytest.approx(0.94)
    assert summary["time_seconds"]["std"] == pytest.approx(14.142135, rel=1e-6)
    assert summary["seeds"] == [0, 1] and summary["epochs"] == [5]
    assert summary["precision"] == "bf16" and summary["cpu_class_seen"] == "AVX512-BF16"


def test_summarise_without_tta_reports_none():
    assert tta.summarise([run_record(0, 0.88, 20.0)])["test_accuracy_tta"] is None


@pytest.mark.parametrize(("preset", "override", "expected"),
                         [("fast", None, 5), ("default", None, 3), ("best", None, 1), ("classic-adam", None, 1),
                          ("fast", 2, 2), ("best", 4, 4)])
def test_seeds_per_preset(preset, override, expected):
    assert tta.seeds_for(preset, override) == expected


# ----------------------------------------------------------------------------------------------- rows
def test_merge_rows_replaces_by_key_and_keeps_other_classes():
    stored = {"fast|native": {"key": "fast|native", "v": 1}, "fast|avx2": {"key": "fast|avx2", "v": 2}}
    merged = tta.merge_rows(stored, [{"key": "fast|native", "v": 3}, {"key": "default|avx2", "v": 4}])
    assert {key: value["v"] for key, value in merged.items()} == {"fast|native": 3, "fast|avx2": 2,
                                                                  "default|avx2": 4}
    assert stored["fast|native"]["v"] == 1  # the stored rows are not changed in place


def test_row_key_names_preset_budget_set_and_class():
    assert row("fast", "avx2")["key"] == "fast|AVX2|emulated"
    assert row("fast", "native", budget="3m")["key"] == "fast budget 3m|AVX512-BF16|native"
    assert row("fast", "avx512-bf16")["key"] == "fast|AVX512-BF16|emulated"
    assert row("fast", "native", overrides={"epochs": 1})["label"] == "fast +set"


def test_markdown_puts_classes_side_by_side_with_provenance():
    rows = [row("fast", "avx2", (0.90, 0.92)), row("fast", "native"), row("default", "native", (0.93,))]
    text = tta.markdown({"rows": {r["key"]: r for r in rows}})
    table = [line for line in text.splitlines() if line.startswith("| fast") or line.startswith("| default")]
    assert [line.split(" | ")[:3] for line in table] == [
        ["| fast", "AVX512-BF16", "native"], ["| fast", "AVX2", "emulated: --cpu-class avx2"],
        ["| default", "AVX512-BF16", "native"]]
    assert "91.00 ± 1.41 (90.00-92.00)" in table[1]  # mean ± sample std (min-max), in percent
    assert "| 93.00 |" in table[2]  # one seed: no spread
    assert tta.PROTOCOL in text and "Warm-up excluded" in text
    assert all("Test CPU" in line and "abc1234" in line and "bf16" in line for line in table)


def test_load_store_does_not_merge_the_old_protocol(tmp_path, capsys):
    path = tmp_path / "time_to_accuracy.json"
    path.write_text(json.dumps({"presets": {"fast": {"time_to": {}}}}))
    assert tta.load_store(path)["rows"] == {}
    assert "old protocol" in capsys.readouterr().err
    assert tta.load_store(tmp_path / "missing.json") == {"format": 2, "protocol": tta.PROTOCOL, "rows": {}}


def test_preset_results_take_only_native_runs_of_the_preset_as_it_is(tmp_path):
    path = tmp_path / "preset_results.json"
    path.write_text(json.dumps({"presets": {"best": {"test_accuracy": 0.95, "cpu_class": "AMX"},
                                            "fast": {"AVX2": {"test_accuracy": 0.91}}}}))
    tta.update_preset_results([row("fast", "native", (0.90, 0.94)), row("default", "avx2"),
                               row("keras-cnn", "native", budget="3m"), row("classic-adam", "native",
                                                                           overrides={"epochs": 1})], path)
    presets = json.loads(path.read_text())["presets"]
    assert set(presets) == {"best", "fast"}
    assert presets["best"] == {"AMX": {"test_accuracy": 0.95, "cpu_class": "AMX"}}  # older form, kept per class
    assert presets["fast"]["AVX2"] == {"test_accuracy": 0.91}  # another class's result stays
    fast = presets["fast"]["AVX512-BF16"]
    assert fast["test_accuracy"] == pytest.approx(0.92) and fast["seeds"] == 2
    assert fast["cpu"] == "Test CPU" and fast["commit"] == "abc1234"


def test_rows_stored_under_the_requested_class_are_rekeyed_by_the_class_seen(tmp_path):
    old = {**row("fast", "native"), "key": "fast|native"}
    path = tmp_path / "time_to_accuracy.json"
    path.write_text(json.dumps({"format": 2, "rows": {"fast|native": old}}))
    assert list(tta.load_store(path)["rows"]) == ["fast|AVX512-BF16|native"]


# ----------------------------------------------------------------------------------------------- CPU classes
@pytest.mark.parametrize(("output", "isa"), [
    ("onednn_verbose,v1,info,oneDNN v3.12.0 (commit 80afa71)\nonednn_verbose,v1,info,cpu,runtime:OpenMP,nthr:2\n"
     "onednn_verbose,v1,info,cpu,isa:Intel AVX2\nonednn_verbose,v1,info,gpu,runtime:none\n", "Intel AVX2"),
    ("onednn_verbose,info,cpu,isa:Intel AVX-512 with Intel DL Boost and bfloat16 support\n",
     "Intel AVX-512 with Intel DL Boost and bfloat16 support"),
    ("dnnl_verbose,info,Detected ISA is Intel AVX-512 with Intel DL Boost\n", "Intel AVX-512 with Intel DL Boost"),
])
def test_parse_isa_line(output, isa):
    line, found = tta.parse_isa_line("some other output\n" + output)
    assert found == isa and line.endswith(isa)


def test_parse_isa_line_ignores_primitive_lines():
    exec_line = "onednn_verbose,v1,primitive,exec,cpu,convolution,brg_conv_fwd:avx2,forward_training,src:f32"
    assert tta.parse_isa_line(exec_line + "\n{\"cpu_class\": \"AVX2\"}\n") is None


@pytest.mark.parametrize(("isa", "cpu_class"), [
    ("Intel AVX2", "AVX2"), ("Intel AVX2 with Intel DL Boost", "AVX2"),
    ("Intel AVX2 with Intel DL Boost, float16 and bfloat16 support", "AVX2"),
    ("Intel AVX-512 with AVX512BW, AVX512VL, and AVX512DQ extensions", "AVX512"),
    ("Intel AVX-512 with Intel DL Boost", "AVX512"),
    ("Intel AVX-512 with Intel DL Boost and bfloat16 support", "AVX512-BF16"),
    ("Intel AVX-512 with float16, Intel DL Boost and bfloat16 support", "AVX512-BF16"),
    ("Intel AVX-512 with float16, Intel DL Boost and bfloat16 support and Intel AMX with bfloat16 and 8-bit "
     "integer support", "AMX"),
    ("Intel AVX", "SSE"), ("Intel SSE4.1", "SSE"),
])
def test_isa_class(isa, cpu_class):
    assert tta.isa_class(isa) == cpu_class


def test_class_env_sets_each_class_and_clears_inherited_limits():
    base = {"PATH": "/bin", "ONEDNN_MAX_CPU_ISA": "SSE41", "ATEN_CPU_CAPABILITY": "default", "ONEDNN_VERBOSE": "1",
            "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"}
    assert tta.class_env("native", base) == {"PATH": "/bin"}
    assert tta.class_env("avx2", base) == {"PATH": "/bin", "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2",
                                           "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
    assert tta.class_env("avx512-bf16", base) == {"PATH": "/bin", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}
    assert base["ONEDNN_MAX_CPU_ISA"] == "SSE41"  # the caller's environment is not changed


def probe(isa: str | None, cpu_class: str, aten: str = "AVX2") -> dict:
    return {"onednn_isa": isa, "cpu_class": cpu_class, "aten_cpu_capability": aten}


def test_class_mismatch_accepts_a_limit_that_took_effect():
    assert tta.class_mismatch("avx2", probe("Intel AVX2", "AVX2")) is None
    bf16 = "Intel AVX-512 with Intel DL Boost and bfloat16 support"
    assert tta.class_mismatch("avx512-bf16", probe(bf16, "AVX512-BF16", "AVX512")) is None
    assert tta.class_mismatch("native", probe(None, "AMX")) is None


def test_class_mismatch_refuses_with_the_reason():
    assert "lacks" in tta.class_mismatch("avx512-bf16", probe("Intel AVX2", "AVX2"))
    assert "did not take effect" in tta.class_mismatch("avx2", probe("Intel AVX-512 with Intel DL Boost", "AVX512"))
    assert "no ISA line" in tta.class_mismatch("avx2", probe(None, "AVX2"))
    assert "cpu_class()" in tta.class_mismatch("avx2", probe("Intel AVX2", "AVX512"))
    assert "ATen" in tta.class_mismatch("avx2", probe("Intel AVX2", "AVX2", aten="AVX512"))


# ----------------------------------------------------------------------------------------------- warm-up
def test_warmup_is_the_same_preset_shortened():
    config = resolve_config("fast", {"seed": 3})
    warm = tta.warmup_config(config)
    assert (warm.epochs, warm.train_subset, warm.validation, warm.budget) == (1, 2048, 256, None)
    same = ("model", "widths", "batch_size", "precision", "channels_last", "flip", "optimizer", "seed")
    assert all(getattr(warm, name) == getattr(config, name) for name in same)
    assert config.epochs == 5 and config.train_subset is None  # the timed config is untouched


def test_warmup_of_a_small_run_stays_inside_it():
    config = resolve_config("classic-sgd", {"train_subset": 1000, "test_subset": 300, "budget": "2m"})
    warm = tta.warmup_config(config)
    assert (warm.train_subset, warm.validation, warm.test_subset, warm.budget) == (1000, 250, 300, None)
    tiny = resolve_config("fast", {"train_subset": 3, "monitor": "val_accuracy"})
    assert (tta.warmup_config(tiny).validation, tta.warmup_config(tiny).monitor) == (0, "accuracy")


def test_track_test_is_refused_before_anything_runs(capsys):
    assert tta.main(["--presets", "classic-adam", "--set", '{"track_test": true}', "--results", "/nonexistent"]) == 2
    assert "track_test" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- end to end
@pytest.mark.slow  # about 15 s on 2 cores: two interpreters start torch, and the run trains on the real dataset
def test_smoke_run_writes_every_results_file(tmp_path, use_real_data):
    """One tiny run end to end, into a folder that already holds another class's row: both rows must remain."""
    preset_results = ROOT / "src" / "fmnist" / "preset_results.json"
    before = preset_results.read_bytes()
    other = row("fast", "avx512-bf16")
    (tmp_path / "time_to_accuracy.json").write_text(json.dumps({"format": 2, "rows": {other["key"]: other}}))
    command = [sys.executable, str(SCRIPT), "--presets", "classic-adam", "--seeds", "1", "--results", str(tmp_path),
               "--set", json.dumps({"train_subset": 1000, "test_subset": 300, "epochs": 1})]
    completed = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]

    dated = json.loads(next(tmp_path.glob("time_to_accuracy-*-native.json")).read_text())
    new = dated["rows"][0]
    assert new["key"] == f"classic-adam +set|{new['cpu_class_seen']}|native" and new["precision"] == "fp32"
    assert new["test_accuracy"]["n"] == 1 and 0.1 < new["test_accuracy"]["mean"] <= 1.0
    assert new["time_seconds"]["mean"] == pytest.approx(new["train_seconds"]["mean"] + new["eval_seconds"]["mean"])
    assert new["onednn_isa_line"].startswith("onednn_verbose") and new["protocol"] == tta.PROTOCOL
    assert new["cpu"] and new["torch"] and new["commit"] and new["cpu_class_seen"]
    run = dated["runs"][0]
    assert run["test_size"] == 300 and run["epochs"] == 1 and run["warmup_seconds"] > 0
    assert all("test_accuracy" not in epoch for epoch in run["history"])  # never measured per epoch

    stored = json.loads((tmp_path / "time_to_accuracy.json").read_text())["rows"]
    assert set(stored) == {"fast|AVX512-BF16|emulated", new["key"]}
    table = (tmp_path / "time_to_accuracy.md").read_text()
    assert f"| classic-adam +set | {new['cpu_class_seen']} | native | fp32 | 1 | 1 |" in table
    assert "| fast | AVX512-BF16 | emulated: --cpu-class avx512-bf16 |" in table
    assert preset_results.read_bytes() == before

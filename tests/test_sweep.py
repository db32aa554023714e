"""Sweeps: spec validation (no Ray needed), the CLI's one-line errors, and one small ASHA sweep end to end."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from test_train import learnable_arrays

from fmnist import sweep
from fmnist.cli import main
from fmnist.errors import ConfigError
from fmnist.events import EpochStart, TrialResult, TrialStart
from fmnist.predict import Classifier

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "sweep-fast.yaml"


def spec(**values):
    base = {"preset": "fast", "space": {"lr": {"loguniform": [0.02, 0.5]}}}
    return sweep.parse_spec({**base, **values})


def error_of(**values) -> str:
    with pytest.raises(ConfigError) as caught:
        spec(**values)
    message = str(caught.value)
    assert "\n" not in message
    return message


# ----------------------------------------------------------------------------------------------- the spec
def test_the_example_spec_is_valid():
    pytest.importorskip("yaml")
    loaded = sweep.load_spec(EXAMPLE)
    assert (loaded.name, loaded.preset, loaded.search, loaded.trial_count()) == ("fast", "fast", "random", 8)
    assert loaded.asha == {"grace_period": 1, "reduction_factor": 2} and loaded.max_epochs() == 5


def test_defaults_and_a_validation_split_for_val_metrics():
    plain = spec()
    assert (plain.metric, plain.mode, plain.search, plain.samples, plain.asha, plain.trial_threads) == (
        "val_accuracy", "max", "random", 8, None, 1)
    assert "validation" not in plain.fixed  # fast has its own split
    adam = spec(preset="classic-adam")
    assert adam.fixed["validation"] == sweep.DEFAULT_VALIDATION
    assert "validation" not in spec(preset="classic-adam", metric="accuracy").fixed
    assert spec(metric="val_loss").mode == "min"
    assert spec(asha=True).asha == sweep.ASHA_DEFAULTS


def test_grid_repeats_get_their_own_seeds():
    grid = spec(search="grid", samples=3, space={"label_smoothing": {"grid": [0.0, 0.1]}})
    assert grid.space["seed"] == {"grid": [0, 1, 2]} and grid.samples == 1
    assert grid.trial_count() == 6
    assert "repeats would be identical" in error_of(search="grid", samples=2, fixed={"seed": 3},
                                                    space={"lr": {"grid": [0.1, 0.2]}})


@pytest.mark.parametrize(("values", "expected"), [
    ({"metrc": "val_accuracy"}, "unknown spec key 'metrc'; did you mean 'metric'?"),
    ({"preset": "fsat"}, "preset 'fsat' is unknown; did you mean 'fast'?"),
    ({"preset": None}, "preset: name the base preset"),
    ({"metric": "test_accuracy"}, "never on the test set"),
    ({"search": "bayes"}, "search 'bayes' is not one of grid, random"),
    ({"samples": 0}, "samples must be a positive integer"),
    ({"trial_threads": "two"}, "trial_threads must be a positive integer"),
    ({"space": {}}, "space is empty"),
    ({"space": {"label_smothing": {"choice": [0.0]}}}, "'label_smothing'; did you mean 'label_smoothing'?"),
    ({"fixed": {"epoch": 3}}, "fixed: unknown setting 'epoch'; did you mean 'epochs'?"),
    ({"fixed": {"threads": 2}}, "trial_threads"),
    ({"space": {"preset": {"choice": ["fast"]}}}, "top level"),
    ({"space": {"lr": 0.1}}, "space.lr: give exactly one distribution"),
    ({"space": {"lr": {"logunifrom": [0.01, 0.1]}}}, "did you mean 'loguniform'?"),
    ({"space": {"lr": {"loguniform": [0.0, 0.1]}}}, "loguniform needs positive bounds"),
    ({"space": {"lr": {"uniform": [0.5, 0.1]}}}, "low < high"),
    ({"space": {"lr": {"choice": []}}}, "non-empty list"),
    ({"space": {"epochs": {"uniform": [2, 6]}}}, "use randint"),
    ({"space": {"depth": {"randint": [1, 2.5]}}}, "randint needs integers"),
    ({"space": {"label_smoothing": {"grid": [0.0, 0.1]}}}, "grid needs `search: grid`"),
    ({"search": "grid"}, "search: grid takes only grid"),
    ({"fixed": {"lr": 0.1}}, "lr is both fixed and searched"),
    ({"space": {"optimizer": {"choice": ["sgd", "adagrad"]}}}, "space.optimizer value 'adagrad': optimizer 'adagrad'"),
    ({"space": {"widths": {"choice": [[16, 32, 64], [32, -64]]}}}, "widths must be a list of integers from 1 to 1024"),
    ({"fixed": {"batch_size": 0}}, "first trial's settings are invalid: batch_size must be in (0, 16384], got 0"),
    ({"fixed": {"validation": 0}}, "needs a validation split"),
    ({"asha": {"grace_period": 5}}, "asha.grace_period 5 leaves no epoch to stop at"),
    ({"asha": {"grace_priod": 1}}, "did you mean 'grace_period'?"),
    ({"asha": {"reduction_factor": 1}}, "reduction_factor must be a number above 1"),
    ({"asha": "yes"}, "asha must be a mapping"),
])
def test_spec_errors_name_the_key_and_the_fix(values, expected):
    assert expected in error_of(**values)


@pytest.mark.parametrize(("values", "expected"), [
    ({1: "x"}, "unknown spec key 1"),
    ({"name": "x"}, "name is not a spec key"),  # a sweep is named after its file
    ({"fixed": [1]}, "fixed must be a mapping of settings"),
    ({"space": {"lr": {"uniform": [True, 0.5]}}}, "uniform needs numbers"),
    ({"space": {"lr": {"choice": [0.1], "grid": [0.2]}}}, "give exactly one distribution"),
    ({"asha": {"grace_period": 1.0}}, "asha.grace_period must be a positive integer"),
    ({"asha": {1: 2}}, "asha: unknown key 1"),
])
def test_spec_schema_edges_are_one_line_errors(values, expected):
    with pytest.raises(ConfigError) as caught:  # some keys here are not keyword names, so no error_of()
        sweep.parse_spec({"preset": "fast", "space": {"lr": {"choice": [0.1]}}, **values})
    assert expected in str(caught.value) and "\n" not in str(caught.value)


def test_spec_keeps_values_as_written_and_round_trips():
    parsed = spec(asha={"reduction_factor": 3}, fixed=None, space={"depth": {"randint": [2, 2]}})
    assert parsed.asha == {"grace_period": 1, "reduction_factor": 3} and parsed.fixed == {}
    assert parsed.space == {"depth": {"randint": [2, 2]}}
    assert sweep.SweepSpec(**parsed.to_dict()) == parsed


def test_load_spec_reports_file_problems_in_one_line(tmp_path):
    pytest.importorskip("yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("preset: fast\nspace: {lr: {choice: [0.1, 0.2]}\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: not valid YAML at line \d+") as caught:
        sweep.load_spec(broken)
    assert "\n" not in str(caught.value)
    listed = tmp_path / "list.yaml"
    listed.write_text("- preset: fast\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        sweep.load_spec(listed)
    with pytest.raises(ConfigError, match="no such sweep spec"):
        sweep.load_spec(tmp_path / "missing.yaml")
    typo = tmp_path / "sweep-typo.yaml"
    typo.write_text("preset: fast\nspace: {lr: {choise: [0.1]}}\n")
    with pytest.raises(ConfigError, match=r"sweep-typo\.yaml: space\.lr: unknown distribution 'choise'"):
        sweep.load_spec(typo)


def test_rank_puts_the_best_first_and_trials_without_a_metric_last():
    trials = [{"trial": "a", "metric": 0.5}, {"trial": "b", "metric": None}, {"trial": "c", "metric": 0.9}]
    assert [t["trial"] for t in sweep.rank(trials, "max")] == ["c", "a", "b"]
    ranked = sweep.rank(trials, "min")
    assert [t["trial"] for t in ranked] == ["a", "c", "b"] and [t["best"] for t in ranked] == [True, False, False]
    assert [t["rank"] for t in ranked] == [1, 2, 3]
    assert not any(t["best"] for t in sweep.rank([{"trial": "x", "metric": None}], "max"))


# ----------------------------------------------------------------------------------------------- trial endings
def test_a_trial_cut_off_between_epochs_becomes_a_run_folder(tmp_path):
    """What Tune does to a trial ASHA stops (SystemExit while it waits to report), without Ray."""
    import torch

    from fmnist.training import train

    tiny = sweep.parse_spec({"preset": "classic-adam", "fixed": {"epochs": 3, "validation": 40},
                             "space": {"lr": {"choice": [0.01]}}})
    run = tmp_path / "trials" / "trial-004"
    threads = torch.get_num_threads()

    def cut(event):
        if isinstance(event, EpochStart) and event.epoch == 2:
            raise SystemExit(0)

    with pytest.raises(SystemExit):
        train({"preset": "classic-adam", **tiny.fixed, "lr": 0.01}, out_dir=run, arrays=learnable_arrays(),
              progress=cut)
    assert not (run / "model.json").exists() and (run / "resume.json").exists()
    row = sweep._collect(run, {"lr": 0.01}, None, True, learnable_arrays(), tiny)
    assert (row["status"], row["stopped_early"], row["epochs_run"]) == ("stopped early", True, 1)
    assert row["epochs_planned"] == 3
    assert row["metric"] is not None and row["run"] == "trials/trial-004"
    assert Classifier.load(run).meta.metrics["interrupted"] is True
    assert torch.get_num_threads() == threads  # finishing the trial (threads=1 in its config) left this process alone
    assert sweep._collect(tmp_path / "trials" / "trial-005", {}, None, False, learnable_arrays(), tiny)["status"] \
        == "interrupted"


def test_a_failed_trial_keeps_its_traceback(tmp_path):
    error = RuntimeError("\x1b[36mray::ImplicitFunc.train()\x1b[39m\nTraceback ...\n"
                         "fmnist.errors.ConfigError: validation 400 leaves no training images (of 320)")
    row = sweep._collect(tmp_path / "trials" / "trial-001", {"validation": 400}, error, True, (), spec())
    assert row["status"] == "failed" and row["metric"] is None
    assert row["error"] == ("ConfigError: validation 400 leaves no training images (of 320) "
                            "(traceback in trials/trial-001/error.txt)")
    text = (tmp_path / "trials" / "trial-001" / "error.txt").read_text()
    assert text.startswith("ray::ImplicitFunc.train()") and "\x1b" not in text


# ----------------------------------------------------------------------------------------------- the CLI
def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


@pytest.mark.parametrize("missing", ["ray", "yaml"])
def test_cli_says_how_to_install_the_extra(missing, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, missing, None)  # makes `import missing` raise ImportError
    monkeypatch.delitem(sys.modules, "ray.tune", raising=False)
    assert main(["sweep", str(EXAMPLE)]) == 2
    assert "pip install 'fmnist[sweep]'" in one_line_error(capsys)


def test_cli_rejects_a_bad_spec_in_one_line(tmp_path, capsys):
    pytest.importorskip("yaml")
    pytest.importorskip("ray.tune")
    bad = tmp_path / "bad.yaml"
    bad.write_text("preset: fast\nspace: {lr: {grid: [0.1, 0.2]}}\n")
    assert main(["sweep", str(bad), "--out", str(tmp_path / "out")]) == 2
    assert "space.lr: grid needs `search: grid`" in one_line_error(capsys)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_a_small_asha_sweep_end_to_end(tmp_path):
    pytest.importorskip("ray.tune")
    # One trial at a time, the good learning rate first: ASHA then compares the hopeless one against it after
    # epoch 1 and stops it, so both ways a trial can end are exercised deterministically.
    tiny = sweep.parse_spec({"preset": "classic-adam", "search": "grid",
                             "fixed": {"epochs": 2, "validation": 40, "batch_size": 32},
                             "space": {"lr": {"grid": [0.01, 1e-6]}},
                             "asha": {"grace_period": 1, "reduction_factor": 2}}, name="tiny")
    out = tmp_path / "sweep"
    events = []
    trials = sweep.run_sweep(tiny, out, arrays=learnable_arrays(), max_concurrent=1, progress=events.append)

    assert [t["trial"] for t in trials] == ["trial-000", "trial-001"]
    good, stopped = trials
    assert good["best"] and not stopped["best"] and good["params"] == {"lr": 0.01}
    assert (good["status"], good["epochs_run"], good["epochs_planned"]) == ("completed", 2, 2)
    assert (stopped["status"], stopped["epochs_run"], stopped["stopped_early"]) == ("stopped early", 1, True)
    assert good["metric"] > stopped["metric"]
    for trial in trials:  # every trial, stopped or not, is an ordinary run folder
        run = out / trial["run"]
        assert Classifier.load(run).predict_proba(learnable_arrays()[1][0][:3]).shape == (3, 10)
    assert json.loads((out / stopped["run"] / "metrics.json").read_text())["interrupted"] is True

    report = json.loads((out / "sweep.json").read_text())
    assert report["best"] == "trial-000" and report["metric"] == "val_accuracy"
    values = [t["metric"] for t in report["trials"]]
    assert values == sorted(values, reverse=True)
    assert report["spec"]["preset"] == "classic-adam"
    assert (out / "best").resolve() == (out / "trials" / "trial-000").resolve()
    assert Classifier.load(out / "best").meta.config["lr"] == 0.01
    assert "**trial-000** (best)" in (out / "sweep.md").read_text()
    assert {TrialStart, TrialResult} <= {type(event) for event in events}

    with pytest.raises(sweep.SweepError, match="already holds a sweep"):
        sweep.run_sweep(tiny, out, arrays=learnable_arrays())

"""`fmnist runs` and `fmnist compare`: the run folders on disk as a table, and several runs side by side."""

from __future__ import annotations

import json

import pytest
from test_train import learnable_arrays, small

from fmnist import training
from fmnist.cli import main
from fmnist.runs import list_runs, read_history, summary


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    training.train(small("classic-adam", epochs=2), arrays=learnable_arrays(), out_dir=root / "adam")
    training.train(small("classic-sgd", epochs=3), arrays=learnable_arrays(), out_dir=root / "sweep" / "trial-1")
    training.train(small("classic-adam", epochs=1), arrays=learnable_arrays(),
                   out_dir=root / "sweep-x" / "trials" / "t0")  # the layout `fmnist sweep` writes
    (root / "sweep-x" / "best").symlink_to("trials/t0")  # listed once, not again through the link
    unfinished = root / "stopped"
    training.train(small("classic-adam", epochs=1), arrays=learnable_arrays(), out_dir=unfinished)
    (unfinished / "model.json").unlink()  # as if training had been killed after its first epoch checkpoint
    (root / "notes").mkdir()
    (root / "notes" / "readme.txt").write_text("not a run")
    return root


def test_list_runs_finds_finished_nested_and_unfinished_runs(runs_root):
    rows = {row["name"]: row for row in list_runs(runs_root)}
    assert set(rows) == {"adam", "sweep/trial-1", "stopped", "sweep-x/trials/t0"}
    assert rows["adam"]["preset"] == "classic-adam" and rows["adam"]["epochs"] == 2
    assert 0 <= rows["adam"]["test_accuracy"] <= 1 and rows["adam"]["state"] == "done"
    assert rows["sweep/trial-1"]["epochs"] == 3
    assert rows["stopped"]["state"] == "unfinished" and rows["stopped"]["test_accuracy"] is None


def test_runs_cli_table_and_json(runs_root, capsys):
    assert main(["runs", str(runs_root)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["run", "preset", "model"]
    assert any(line.startswith("adam ") and "classic-adam" in line and "%" in line for line in table)
    assert any("stopped" in line and "unfinished" in line for line in table)
    assert main(["runs", str(runs_root), "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 4


def test_runs_of_a_missing_folder_is_one_line(tmp_path, capsys):
    assert main(["runs", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no such folder" in err


def test_compare_prints_metrics_side_by_side_and_draws_curves(runs_root, tmp_path, capsys):
    figure = tmp_path / "both.png"
    assert main(["compare", str(runs_root / "adam"), str(runs_root / "sweep" / "trial-1"), "--out", str(figure)]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines()[1:] if line.strip() and not line.startswith("wrote")}
    assert "classic-adam" in lines["preset"] and "classic-sgd" in lines["preset"]
    assert lines["epochs"].split()[1:] == ["2", "3"]
    assert figure.stat().st_size > 10_000
    assert len(read_history(runs_root / "sweep" / "trial-1")) == 3


def test_compare_needs_two_real_runs(runs_root, tmp_path, capsys):
    assert main(["compare", str(runs_root / "adam")]) == 2
    assert "at least two" in capsys.readouterr().err
    assert main(["compare", str(runs_root / "adam"), str(runs_root / "notes")]) == 2
    assert "not a run folder" in capsys.readouterr().err
    with pytest.raises(Exception, match="not a run folder"):
        summary(tmp_path)

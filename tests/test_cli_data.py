"""The `fmnist data ...` commands: in-process through `fmnist.cli.main`, and once as a real subprocess."""

from __future__ import annotations

import gzip
import os
import re
import subprocess
import sys

import pytest

from fmnist import data
from fmnist.cli import main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _single_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("fmnist: error: ")
    assert "Traceback" not in stderr
    return lines[0]


def test_data_info_on_the_real_dataset(use_real_data, capsys):
    assert main(["data", "info"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert f"in {use_real_data.path} (found via {use_real_data.origin})" in out
    if use_real_data.format == "idx":
        assert "checksums: all 4 files match the published MD5" in out
    for index, name in enumerate(data.CLASS_NAMES):
        assert re.search(rf"^{index} {re.escape(name)}\s+6000\s+1000$", out, re.MULTILINE), name
    assert re.search(r"^total\s+60000\s+10000$", out, re.MULTILINE)
    assert re.search(r"^train pixels: mean 0\.28\d\d, std 0\.35\d\d", out, re.MULTILINE)
    assert "shape (60000, 28, 28), dtype uint8" in out


def test_data_info_tiny_idx_without_verify(tiny_idx_dir, capsys):
    assert main(["data", "info", "--data-dir", str(tiny_idx_dir), "--no-verify"]) == 0
    out, _ = capsys.readouterr()
    assert "(IDX)" in out and "found via argument" in out and "checksums: skipped (--no-verify)" in out
    assert re.search(r"^0 T-shirt/top\s+5\s+2$", out, re.MULTILINE)
    assert re.search(r"^total\s+50\s+20$", out, re.MULTILINE)


def test_data_info_tiny_csv(tiny_csv_dir, capsys):
    assert main(["data", "info", "--data-dir", str(tiny_csv_dir)]) == 0
    out, _ = capsys.readouterr()
    assert "(CSV)" in out and "checksums" not in out
    assert re.search(r"^9 Ankle boot\s+5\s+2$", out, re.MULTILINE)


def test_data_info_checksum_mismatch_is_exit_2(tiny_idx_dir, capsys):
    assert main(["data", "info", "--data-dir", str(tiny_idx_dir)]) == 2
    _, err = capsys.readouterr()
    line = _single_error_line(err)
    assert "MD5" in line and "--no-verify" in line


def test_data_show_writes_a_png(tiny_idx_dir, tmp_path, capsys):
    out_path = tmp_path / "tmp" / "x.png"
    code = main(["data", "show", "--data-dir", str(tiny_idx_dir), "--no-verify", "--out", str(out_path),
                 "--per-class", "3", "--split", "test"])
    assert code == 0
    out, err = capsys.readouterr()
    assert f"wrote {out_path}" in out and err == ""
    content = out_path.read_bytes()
    assert len(content) > 1000 and content.startswith(PNG_SIGNATURE)
    assert [p.name for p in out_path.parent.iterdir()] == ["x.png"]  # no temporary left beside it


def test_data_info_missing_dir_is_exit_2(tmp_path, capsys):
    missing = tmp_path / "nonexistent"
    assert main(["data", "info", "--data-dir", str(missing)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert str(missing) in _single_error_line(err)


def test_data_show_bad_data_is_exit_2(tiny_idx_dir, tmp_path, capsys):
    (tiny_idx_dir / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x05ab"))
    out_path = tmp_path / "x.png"
    assert main(["data", "show", "--data-dir", str(tiny_idx_dir), "--no-verify", "--out", str(out_path)]) == 2
    assert "train-labels-idx1-ubyte.gz" in _single_error_line(capsys.readouterr().err)
    assert not out_path.exists()


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as excinfo:
        main(["data", "nonsense"])
    assert excinfo.value.code == 2
    assert "Traceback" not in capsys.readouterr().err


def test_subprocess_corrupt_gzip_is_one_line_exit_2(tiny_idx_dir):
    (tiny_idx_dir / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b\x08\x00" + b"garbage" * 50)
    result = subprocess.run(
        [sys.executable, "-m", "fmnist", "data", "info", "--data-dir", str(tiny_idx_dir)],
        capture_output=True, text=True, timeout=120, env=dict(os.environ), check=False,
    )
    assert result.returncode == 2, result.stderr
    line = _single_error_line(result.stderr)
    assert "train-images-idx3-ubyte.gz" in line and "corrupt gzip" in line

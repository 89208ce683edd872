"""The notebook API (docs/api.md): its example runs and prints what the page says."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import octpipe as op
from octpipe.cli import main

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "api.md"


def _blocks(kind: str) -> list[str]:
    return re.findall(rf"```{kind}\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)


def test_import_octpipe_stays_light():
    """The API is imported on first use: a bare ``import octpipe`` loads neither torch nor dask."""
    code = "import sys, octpipe; print('torch' in sys.modules, 'dask' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
    assert callable(op.anomaly_map) and "anomaly_map" in op.__all__
    with pytest.raises(AttributeError):
        op.no_such_function  # noqa: B018


def test_the_documented_example_runs_and_prints_what_the_page_says(tmp_path, monkeypatch, capsys):
    (tmp_path / "models").symlink_to(ROOT / "models")
    monkeypatch.chdir(tmp_path)
    assert main(["--no-progress", "phantom", "-o", "phantoms", "--n", "1", "--shape", "3,496,256", "--formats",
                 "vol", "--healthy-fraction", "0"]) == 0
    assert main(["--no-progress", "ingest", "phantoms", "-o", "cohort.zarr", "--workers", "0"]) == 0
    capsys.readouterr()
    (code,), (expected,) = _blocks("python"), _blocks("text")
    exec(compile(code, str(DOC), "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    want = expected.splitlines()
    assert len(printed) == len(want)
    for got, line in zip(printed, want, strict=True):
        if "volume_score" in code and re.fullmatch(r"\(3, 496, 256\) [\d.]+", line):  # the score: close, not equal
            assert got.split(") ")[0] == line.split(") ")[0]
            assert float(got.split(") ")[1]) == pytest.approx(float(line.split(") ")[1]), abs=0.05)
        else:
            assert got == line


def test_store_view_and_errors(tmp_path):
    with pytest.raises(op.OctpipeError, match="not an octpipe store"):
        op.open_store(tmp_path)
    with pytest.raises(op.OctpipeError, match="no such model folder"):
        op.load_model(tmp_path / "nope")

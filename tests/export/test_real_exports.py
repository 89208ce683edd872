"""``octpipe export`` never dies: every file and folder of ../shared/data/real and a fixed cohort sample.

Each input either exports (its volumes have their maps, report and summary) or exits 1 with
one ``error:`` line naming the file (failed images of a folder: one ``failed`` line each), and
never raises (a traceback). Slow: about 5-15 s per input on a shared 2-core machine.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from octpipe.cli import main
from octpipe.export.run import SUMMARY_NAME
from tests.conftest import REAL_DATA

BUNDLED = Path(__file__).resolve().parents[2] / "models" / "fanogan-phantom"
COHORTS = REAL_DATA.parent / "cohorts"
#: Cohort images per class folder (the first ones in sorted order: a fixed sample).
PER_CLASS = 2


def _real_inputs() -> list[Path]:
    if not REAL_DATA.is_dir():
        return []
    files = sorted(p for p in REAL_DATA.rglob("*") if p.is_file())
    folders = sorted(p for p in REAL_DATA.rglob("*") if p.is_dir())
    return files + folders


def _cohort_sample() -> list[Path]:
    if not COHORTS.is_dir():
        return []
    out = []
    for folder in sorted(p for p in COHORTS.rglob("*") if p.is_dir()):
        images = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        out.extend(images[:PER_CLASS])
    return out


INPUTS = _real_inputs() + _cohort_sample()


def _id(path: Path) -> str:
    for root in (REAL_DATA, COHORTS):
        if path.is_relative_to(root):
            return f"{root.name}/{path.relative_to(root)}"
    return str(path)


@pytest.mark.slow
@pytest.mark.skipif(not INPUTS, reason=f"real data folder {REAL_DATA} not present")
@pytest.mark.parametrize("source", INPUTS, ids=_id)
def test_export_succeeds_or_fails_in_one_line(source, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["--no-progress", "export", str(source), "--model", str(BUNDLED), "-o", str(out), "--workers", "0",
                 "--device", "cpu"])  # an exception escaping main() here is the traceback this test forbids
    captured = capsys.readouterr()
    err = [line for line in captured.err.splitlines() if line.strip()]
    assert "Traceback" not in captured.err
    assert code in (0, 1), (code, err)
    done = sorted(p.parent for p in out.glob(f"*/{SUMMARY_NAME}")) if out.is_dir() else []
    for folder in done:
        for name in ("anomaly.nii.gz", "source.nii.gz", "anomaly.json", "report.html", "windows.csv"):
            assert (folder / name).is_file(), (folder, name)
    if code == 0:
        assert done and (out / "index.csv").is_file() and (out / "index.html").is_file()
        assert all(line.startswith("note: ") for line in err), err
        return
    failed = [line for line in err if line.startswith("  failed ")]
    if not failed:  # a file or single-volume folder that failed: one line naming it, nothing written
        names = [source.name] + ([p.name for p in source.iterdir()] if source.is_dir() else [])
        assert len(err) == 1 and any(err[0].startswith(f"error: {name}: ") for name in names), err
        assert not done
        return
    # a folder of independent B-scans: the failed ones are listed, each in one line, the rest exported
    assert all(line.startswith(("  failed ", "note: ")) for line in err), err
    with (out / "index.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert sum(r["status"] == "failed" for r in rows) == len(failed)
    assert sum(r["status"] == "ok" for r in rows) == len(done)


SPECTRALIS_LINE = REAL_DATA / "halirutan_spectralis-raw-data" / "test-data" / "Willis_B_716_0.vol"


@pytest.mark.skipif(not SPECTRALIS_LINE.is_file(), reason=f"{SPECTRALIS_LINE} not present")
def test_single_bscan_spectralis_vol_exports_as_file_and_from_a_store(tmp_path, capsys):
    """The README's example file: one B-scan, B-scan spacing 0 in the header; both routes export it."""
    common = ["--model", str(BUNDLED), "--workers", "0", "--device", "cpu"]
    assert main(["--no-progress", "export", str(SPECTRALIS_LINE), "-o", str(tmp_path / "file"), *common]) == 0
    assert len(list((tmp_path / "file").glob(f"*/{SUMMARY_NAME}"))) == 1
    store = tmp_path / "s.zarr"
    assert main(["--no-progress", "ingest", str(SPECTRALIS_LINE), "-o", str(store), "--workers", "0"]) == 0
    assert main(["--no-progress", "export", str(store), "-o", str(tmp_path / "store"), *common]) == 0
    with (tmp_path / "store" / "index.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["status"] for r in rows] == ["ok"], rows
    assert "Traceback" not in capsys.readouterr().err

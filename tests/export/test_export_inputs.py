"""``octpipe export`` on every kind of input: files, B-scan folders, single B-scans, failures, --spacing-mm.

Fast tests: small phantoms (or one real B-scan when ../shared/data/real is present), the bundled
model, ``--workers 0``.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from octpipe.cli import main
from octpipe.export.run import FAILED_NAME, SUMMARY_NAME
from tests.conftest import small_phantom

BUNDLED = Path(__file__).resolve().parents[2] / "models" / "fanogan-phantom"
FAST = ["--workers", "0", "--stride", "32", "--precision", "fp32", "--device", "cpu"]
GEOMETRY = {"shape": (3, 496, 256), "spacing_mm": (0.24, 0.00387, 0.0113)}


def _export(capsys, *argv: str) -> tuple[int, str, list[str]]:
    code = main(["--no-progress", "export", *argv])
    out, err = capsys.readouterr()
    return code, out, [line for line in err.splitlines() if line.strip()]


def _rows(out: Path) -> list[dict[str, str]]:
    with (out / "index.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def _done(out: Path) -> list[Path]:
    return sorted(p.parent for p in out.glob(f"*/{SUMMARY_NAME}"))


def _single_bscan_vol(folder: Path) -> Path:
    from octpipe.io.writers.heyex_vol import write_heyex_vol

    ph = small_phantom(5, "srf", shape=(1, 496, 256), spacing_mm=(0.12, 0.00387, 0.0113))
    return write_heyex_vol(folder / "one.vol", ph.data, spacing_mm=(0.0, 0.00387, 0.0113), laterality="OD",
                           scan_pattern=1)


def _png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def _bscan_u8(seed: int, shape=(496, 256)) -> np.ndarray:
    from octpipe.preprocess.intensity import linear_to_display

    ph = small_phantom(seed, shape=(1, *shape), spacing_mm=(0.12, 0.00387, 0.0113))
    return np.round(linear_to_display(ph.data[0]) * 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# Single B-scans: no B-scan spacing
# --------------------------------------------------------------------------------------------
def test_single_bscan_vol_exports_with_a_nominal_slice_thickness_and_no_enface(capsys, tmp_path):
    src = _single_bscan_vol(tmp_path)
    out = tmp_path / "out"
    code, stdout, err = _export(capsys, str(src), "--model", str(BUNDLED), "-o", str(out), *FAST)
    assert code == 0, err
    (folder,) = _done(out)
    img = nib.load(folder / "anomaly.nii.gz")
    assert img.shape == (256, 1, 496)
    np.testing.assert_allclose(np.abs(np.diag(img.affine))[:3], [0.0113, 0.0113, 0.00387], rtol=1e-6)
    sidecar = json.loads((folder / "anomaly.json").read_text())
    assert sidecar["spacing_mm"][0] == 0.0 and sidecar["geometry_spacing_mm"][0] == pytest.approx(0.0113)
    assert "nominal slice thickness of 0.0113 mm" in sidecar["geometry_note"]
    assert "single B-scan" in sidecar["enface_note"]
    assert not (folder / "enface.png").exists() and not (folder / "sectors.csv").exists()
    assert list((folder / "dicom").glob("*.dcm")) and (folder / "report.html").is_file()
    assert "nominal slice thickness" in (folder / "report.html").read_text()


def test_real_single_bscan_spectralis_vol_exports(capsys, tmp_path, real_data):
    """valid.vol: one circular B-scan, B-scan spacing 0 in the file (died with a spacing ValueError before)."""
    src = real_data / "halirutan_spectralis-raw-data" / "test-data" / "valid.vol"
    out = tmp_path / "out"
    code, _, err = _export(capsys, str(src), "--model", str(BUNDLED), "-o", str(out), *FAST)
    assert code == 0, err
    (folder,) = _done(out)
    affine = nib.load(folder / "anomaly.nii.gz").affine
    assert affine[1, 1] == pytest.approx(0.01789, rel=1e-3)  # nominal = lateral spacing
    assert json.loads((folder / SUMMARY_NAME).read_text())["enface_note"]


# --------------------------------------------------------------------------------------------
# --spacing-mm
# --------------------------------------------------------------------------------------------
def test_spacing_override_is_used_and_recorded(capsys, tmp_path):
    src = _single_bscan_vol(tmp_path)
    out = tmp_path / "out"
    code, _, err = _export(capsys, str(src), "--model", str(BUNDLED), "-o", str(out), "--spacing-mm", "0.05,,",
                           *FAST)
    assert code == 0, err
    (folder,) = _done(out)
    sidecar = json.loads((folder / "anomaly.json").read_text())
    assert sidecar["spacing_mm"][0] == pytest.approx(0.05) and sidecar["spacing_source"] == "user"
    assert sidecar["geometry_note"] is None
    assert nib.load(folder / "anomaly.nii.gz").affine[1, 1] == pytest.approx(0.05)


@pytest.mark.parametrize("value", ["1,2", "a,b,c", "0,0,0.01", ",,"])
def test_bad_spacing_is_a_usage_error(capsys, tmp_path, value):
    src = _single_bscan_vol(tmp_path)
    code, _, err = _export(capsys, str(src), "--model", str(BUNDLED), "-o", str(tmp_path / "out"),
                           "--spacing-mm", value)
    assert code == 2 and "--spacing-mm" in "\n".join(err)
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------
# Folders
# --------------------------------------------------------------------------------------------
def test_bscan_folder_of_a_numbered_sequence_exports_as_one_volume(capsys, tmp_path):
    from octpipe.testing.phantom_files import write_phantom_files

    ph = small_phantom(2, "irf", **GEOMETRY)
    folder = Path(write_phantom_files(ph, tmp_path / "src", formats=["png"])["png"])
    out = tmp_path / "out"
    code, stdout, err = _export(capsys, str(folder), "--model", str(BUNDLED), "-o", str(out), *FAST)
    assert code == 0, err
    (done,) = _done(out)
    assert nib.load(done / "anomaly.nii.gz").shape == (256, 3, 496)
    assert len(list((done / "overlays").glob("bscan_*.png"))) == 3
    assert [r["status"] for r in _rows(out)] == ["ok"]
    assert "1 written, 0 skipped, 0 failed" in stdout


def test_folder_of_independent_bscans_gives_one_export_per_image_and_lists_failures(capsys, tmp_path):
    src = tmp_path / "scans"
    _png(src / "patient_a.png", _bscan_u8(1))
    _png(src / "patient_b.png", _bscan_u8(2, shape=(496, 320)))
    blank = _png(src / "blank.png", np.random.default_rng(0).integers(0, 255, (496, 256)).astype(np.uint8))
    blank.write_bytes(blank.read_bytes()[:20000])  # truncated: cannot be decoded
    out = tmp_path / "out"
    code, stdout, err = _export(capsys, str(src), "--model", str(BUNDLED), "-o", str(out), *FAST)
    assert code == 1
    assert "2 written, 0 skipped, 1 failed" in stdout
    (line,) = [e for e in err if "failed" in e]
    assert "blank.png" in line and "image file is truncated" in line
    assert len(_done(out)) == 2
    rows = _rows(out)
    assert sorted(r["status"] for r in rows) == ["failed", "ok", "ok"]
    (bad,) = [r for r in rows if r["status"] == "failed"]
    assert "truncated" in bad["reason"] and "blank" not in bad["reason"] and not (out / bad["volume_id"]).exists()
    html = (out / "index.html").read_text()
    assert bad["volume_id"] in html and "truncated" in html
    for path in out.rglob("*"):  # file names can carry patient names: none reaches an output file
        if path.is_file():
            data = path.read_bytes()
            assert b"patient_a" not in data and b"patient_b" not in data and b"blank" not in data, path
    # a rerun skips what is done and still lists the failure
    code, stdout, _ = _export(capsys, str(src), "--model", str(BUNDLED), "-o", str(out), *FAST)
    assert code == 1 and "0 written, 2 skipped, 1 failed" in stdout
    # once the bad image is gone and the rest is done, the failure leaves the index
    (src / "blank.png").unlink()
    code, _, err = _export(capsys, str(src), "--model", str(BUNDLED), "-o", str(out), *FAST)
    assert code == 0, err
    assert [r["status"] for r in _rows(out)] == ["ok", "ok"]


def test_empty_folder_and_a_folder_of_non_oct_files_fail_in_one_line(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "readme.txt").write_text("not an OCT file\n")
    for name in ("empty", "docs"):
        code, _, err = _export(capsys, str(tmp_path / name), "--model", str(BUNDLED), "-o", str(tmp_path / "out"))
        assert code == 1 and len(err) == 1, err
        assert err[0].startswith(f"error: {name}: no OCT file or B-scan image in the folder")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------
# Failures: one line, exit 1, nothing that looks done
# --------------------------------------------------------------------------------------------
def test_segmentation_failure_is_one_line_exit_1_and_writes_nothing(capsys, tmp_path, monkeypatch):
    import octpipe.preprocess.layers as layers

    real = layers.segment_ilm_bm

    def no_bm(*args, **kwargs):  # the segmentation finds no BM at all (no retina in the image)
        result = real(*args, **kwargs)
        result.bm[...] = np.nan
        return result

    monkeypatch.setattr(layers, "segment_ilm_bm", no_bm)
    src = _png(tmp_path / "scan.png", _bscan_u8(3))
    out = tmp_path / "out"
    code, stdout, err = _export(capsys, str(src), "--model", str(BUNDLED), "-o", str(out), *FAST)
    assert code == 1 and stdout == ""
    assert err == ["error: scan.png: no retina found (segmentation found no BM in B-scan 0)"]
    assert not out.exists()
    # into an existing export folder: it is left as it was
    out.mkdir()
    (out / "keep.txt").write_text("x")
    code, _, err = _export(capsys, str(src), "--model", str(BUNDLED), "-o", str(out), *FAST)
    assert code == 1 and len(err) == 1
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_unreadable_input_and_output_in_place_of_a_file_are_one_line(capsys, tmp_path):
    bad = tmp_path / "scan.vol"
    bad.write_bytes(b"HSF-OCT-103" + bytes(64))
    code, _, err = _export(capsys, str(bad), "--model", str(BUNDLED), "-o", str(tmp_path / "out"))
    assert code == 1 and len(err) == 1 and err[0].startswith("error: scan.vol: ")
    src = _single_bscan_vol(tmp_path)
    (tmp_path / "file.txt").write_text("x")
    code, _, err = _export(capsys, str(src), "--model", str(BUNDLED), "-o", str(tmp_path / "file.txt"), *FAST)
    assert code == 1 and err == ["error: file.txt: is a file, not an output folder"]
    code, _, err = _export(capsys, str(tmp_path / "missing.vol"), "--model", str(BUNDLED), "-o", str(tmp_path / "o"))
    assert code == 1 and err == ["error: missing.vol: no such file or folder"]


def test_a_store_volume_that_fails_is_listed_and_the_rest_goes_on(tmp_path, monkeypatch):
    import octpipe.export.volume as volume_export
    from octpipe.io.writers.heyex_vol import write_heyex_vol
    from octpipe.pipeline import ingest
    from octpipe.store import volume_ids

    for seed in (1, 2):
        ph = small_phantom(seed, **GEOMETRY)
        write_heyex_vol(tmp_path / "src" / f"p{seed}.vol", ph.data, spacing_mm=ph.spacing_mm, laterality="OD")
    store = tmp_path / "s.zarr"
    ingest([tmp_path / "src"], store, workers=0)
    bad, good = volume_ids(store)
    real = volume_export.compute_anomaly

    def flaky(vol, *args, **kwargs):
        if vol.volume_id == bad:
            raise IndexError("simulated bug")
        return real(vol, *args, **kwargs)

    monkeypatch.setattr(volume_export, "compute_anomaly", flaky)
    out = tmp_path / "out"
    assert main(["--no-progress", "export", str(store), "--model", str(BUNDLED), "-o", str(out), *FAST]) == 1
    rows = {r["volume_id"]: r for r in _rows(out)}
    assert rows[good]["status"] == "ok" and rows[good]["rank"] == "1"
    assert rows[bad]["status"] == "failed" and rows[bad]["reason"] == "IndexError: simulated bug"
    assert json.loads((out / FAILED_NAME).read_text())[bad]["reason"] == "IndexError: simulated bug"
    monkeypatch.setattr(volume_export, "compute_anomaly", real)
    assert main(["--no-progress", "export", str(store), "--model", str(BUNDLED), "-o", str(out), *FAST]) == 0
    assert sorted(r["status"] for r in _rows(out)) == ["ok", "ok"] and not (out / FAILED_NAME).exists()


def test_spacing_and_images_options_do_not_apply_to_a_store(capsys, tmp_path):
    from octpipe.store import open_store

    store = tmp_path / "s.zarr"
    open_store(store)
    for option in (["--spacing-mm", "0.1,,"], ["--images", "bscans"]):
        code, _, err = _export(capsys, str(store), "--model", str(BUNDLED), "-o", str(tmp_path / "out"), *option)
        assert code == 2 and option[0] in "\n".join(err)
    assert not (tmp_path / "out").exists()

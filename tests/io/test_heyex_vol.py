"""Tests for octpipe.io.heyex_vol: real Spectralis files, round trips, errors, privacy."""

from __future__ import annotations

import struct
import tracemalloc
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest

from octpipe.errors import CorruptFileError, FormatError, OctpipeError
from octpipe.io._common import file_sha256
from octpipe.io.heyex_vol import read_heyex_vol, read_heyex_vol_slo
from octpipe.io.writers.heyex_vol import write_heyex_vol

REAL = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "real"
SPECTRALIS = REAL / "halirutan_spectralis-raw-data" / "test-data"

# name -> (scan pattern, ScaleX mm, BScanHdrSize), from SOURCES.md section 1
REAL_FILES = {
    "Willis_B_716_0.vol": ("line", 0.01182, 55296),
    "Willis_B_716_2.vol": ("circle", 0.01472, 55296),
    "Willis_B_716_4.vol": ("circle", 0.01472, 55296),
    "valid.vol": ("circle", 0.01789, 46080),
}

FILE_HEADER = 2048
OFF_SIZE_X, OFF_NUM_BSCANS = 12, 16


def _real(name: str) -> Path:
    path = SPECTRALIS / name
    if not path.is_file():
        pytest.skip(f"real data not available: {path}")
    return path


def _small_volume(rng: np.random.Generator, shape=(3, 64, 32)):
    data = rng.random(shape, dtype=np.float32)
    n_b, n_z, n_x = shape
    ilm = (10 + 3 * rng.random((n_b, n_x))).astype(np.float32)
    bm = (40 + 3 * rng.random((n_b, n_x))).astype(np.float32)
    bm[1, 5] = np.nan
    return data, {"ILM": ilm, "BM": bm}


@pytest.fixture
def written(tmp_path: Path) -> tuple[Path, np.ndarray, dict[str, np.ndarray]]:
    data, layers = _small_volume(np.random.default_rng(0))
    path = write_heyex_vol(tmp_path / "small.vol", data, spacing_mm=(0.12, 0.0039, 0.0118),
                           laterality="OS", layers=layers)
    return path, data, layers


# ------------------------------------------------------------------ real files


@pytest.mark.parametrize("name", sorted(REAL_FILES))
def test_real_files(name: str) -> None:
    pattern, scale_x, hdr_size = REAL_FILES[name]
    path = _real(name)
    vol = read_heyex_vol(path)
    assert vol.shape == (1, 496, 768)
    assert vol.scan_pattern == pattern
    assert vol.spacing_mm[2] == pytest.approx(scale_x, abs=5e-6)
    assert vol.spacing_mm[1] == pytest.approx(0.00387, abs=5e-6)
    assert vol.spacing_source == "file"
    assert vol.laterality == "OD"
    assert vol.vendor == "heidelberg" and vol.intensity == "linear"
    assert vol.data.dtype == np.float32 and vol.invalid is not None
    assert list(vol.layers) == ["ILM", "BM", "RNFL"]
    assert vol.meta["bscan_header_size"] == hdr_size
    assert vol.meta["slo_shape"] == (768, 768)
    assert vol.provenance is not None and vol.provenance.sha256 == file_sha256(path)
    assert vol.provenance.reader == "heyex_vol" and vol.provenance.format == "heyex-vol"
    assert read_heyex_vol_slo(path).shape == (768, 768)


def test_real_line_matches_eyepy() -> None:
    eyepy = pytest.importorskip("eyepy")
    path = _real("Willis_B_716_0.vol")
    vol = read_heyex_vol(path)
    ev = eyepy.import_heyex_vol(path)
    raw = np.asarray(ev._raw_data)
    assert raw.shape == vol.shape
    valid = ~vol.invalid
    np.testing.assert_array_equal(vol.data[valid], raw[valid])
    for name in ("ILM", "BM"):
        np.testing.assert_array_equal(vol.layers[name], ev.layers[name].data)
    assert np.isnan(vol.layers["RNFL"]).all()
    assert np.isfinite(vol.layers["ILM"]).sum() == 759


# ------------------------------------------------------------------ round trip


def test_round_trip(written) -> None:
    path, data, layers = written
    vol = read_heyex_vol(path)
    assert vol.shape == data.shape
    np.testing.assert_array_equal(vol.data, data)
    assert not vol.invalid.any()
    assert vol.spacing_mm == (0.12, 0.0039, 0.0118)
    assert vol.laterality == "OS"
    assert vol.scan_pattern == "volume"
    assert vol.bscan_order == "inferior_first"
    assert set(vol.layers) == {"ILM", "BM"}
    for name, rows in layers.items():
        np.testing.assert_array_equal(vol.layers[name], rows)
    assert np.isnan(vol.layers["BM"][1, 5])
    slo = read_heyex_vol_slo(path)
    assert slo.dtype == np.uint8 and slo.shape == vol.meta["slo_shape"]


def test_written_file_read_by_eyepy(written) -> None:
    eyepy = pytest.importorskip("eyepy")
    path, data, layers = written
    ev = eyepy.import_heyex_vol(path)
    assert ev.shape == data.shape
    assert ev.scale_z == pytest.approx(0.12)
    assert ev.scale_y == pytest.approx(0.0039)
    assert ev.scale_x == pytest.approx(0.0118)
    assert ev.laterality == "OS"
    np.testing.assert_array_equal(np.asarray(ev._raw_data), data)
    for name, rows in layers.items():
        np.testing.assert_array_equal(ev.layers[name].data, rows)


def test_nan_pixels_read_back_invalid(tmp_path: Path) -> None:
    data = np.full((2, 8, 4), 0.5, dtype=np.float32)
    data[0, 1, 2] = np.nan
    data[1, 3, 0] = np.inf
    before = data.copy()
    path = write_heyex_vol(tmp_path / "nan.vol", data, spacing_mm=(0.1, 0.004, 0.01), laterality="OD")
    np.testing.assert_array_equal(data, before)  # input not mutated
    vol = read_heyex_vol(path)
    expected = np.zeros(data.shape, dtype=bool)
    expected[0, 1, 2] = expected[1, 3, 0] = True
    np.testing.assert_array_equal(vol.invalid, expected)
    assert vol.data[0, 1, 2] == 0 and vol.data[1, 3, 0] == 0
    assert vol.data[~expected].min() == pytest.approx(0.5)


@pytest.mark.parametrize(("pattern", "n_bscans", "name"),
                         [(1, 1, "line"), (2, 1, "circle"), (4, 3, "volume"), (5, 4, "radial")])
def test_scan_patterns_round_trip(tmp_path: Path, pattern: int, n_bscans: int, name: str) -> None:
    data = np.ones((n_bscans, 8, 16), dtype=np.float32)
    path = write_heyex_vol(tmp_path / "p.vol", data, spacing_mm=(0.0, 0.004, 0.01), laterality="OD",
                           scan_pattern=pattern, layers={"RPE": np.full((n_bscans, 16), 5.0)})
    vol = read_heyex_vol(path)
    assert vol.scan_pattern == name
    assert vol.meta["scan_pattern_code"] == pattern
    assert list(vol.layers) == [
        "ILM", "BM", "RNFL", "GCL", "IPL", "INL", "OPL", "ONL", "ELM", "IOS",
        "OPT", "CHO", "VIT", "ANT", "PR1", "PR2", "RPE",
    ]
    assert np.isnan(vol.layers["ILM"]).all()
    assert (vol.layers["RPE"] == 5.0).all()


def test_writer_refuses_overwrite_and_bad_args(written, tmp_path: Path) -> None:
    path, data, _ = written
    with pytest.raises(OctpipeError, match="output exists"):
        write_heyex_vol(path, data, spacing_mm=(0.1, 0.004, 0.01), laterality="OD")
    write_heyex_vol(path, data, spacing_mm=(0.1, 0.004, 0.01), laterality="OD", overwrite=True)
    assert read_heyex_vol(path).laterality == "OD"
    ok = {"spacing_mm": (0.1, 0.004, 0.01), "laterality": "OD"}
    with pytest.raises(ValueError, match="laterality"):
        write_heyex_vol(tmp_path / "x.vol", data, spacing_mm=(0.1, 0.004, 0.01), laterality="R")
    with pytest.raises(ValueError, match="unknown layer"):
        write_heyex_vol(tmp_path / "x.vol", data, layers={"XYZ": np.zeros((3, 32))}, **ok)
    with pytest.raises(ValueError, match="exactly one B-scan"):
        write_heyex_vol(tmp_path / "x.vol", data, scan_pattern=1, **ok)
    with pytest.raises(ValueError, match="patient_id"):
        write_heyex_vol(tmp_path / "x.vol", data, patient_id="x" * 30, **ok)
    assert not (tmp_path / "x.vol").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["small.vol"]  # no temp files left


# ------------------------------------------------------------------ errors


def test_not_a_vol_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.vol"
    path.write_bytes(b"just some text, not an OCT file" * 100)
    with pytest.raises(FormatError, match="notes.vol"):
        read_heyex_vol(path)
    empty = tmp_path / "empty.vol"
    empty.write_bytes(b"")
    with pytest.raises(FormatError):
        read_heyex_vol_slo(empty)


@pytest.mark.parametrize("where", ["header", "slo", "bscan_header", "bscan_pixels"])
def test_truncated(written, tmp_path: Path, where: str) -> None:
    path, _, _ = written
    raw = path.read_bytes()
    slo_end = FILE_HEADER + 256 * 256
    cut = {"header": 1000, "slo": FILE_HEADER + 500, "bscan_header": slo_end + 100,
           "bscan_pixels": len(raw) - 10}[where]
    bad = tmp_path / f"cut_{where}.vol"
    bad.write_bytes(raw[:cut])
    with pytest.raises(CorruptFileError, match="truncated") as info:
        read_heyex_vol(bad)
    assert bad.name in str(info.value)
    assert "\n" not in str(info.value)
    if where != "header":
        assert f"file has {cut}" in str(info.value)


@pytest.mark.parametrize(("offset", "value", "what"),
                         [(OFF_NUM_BSCANS, 4000, "truncated"), (OFF_NUM_BSCANS, 2**31, "NumBScans"),
                          (OFF_SIZE_X, 2**30, "SizeX"), (OFF_SIZE_X, 8000, "truncated"),
                          (OFF_NUM_BSCANS, 0, "NumBScans")])
def test_absurd_header_values(written, tmp_path: Path, offset: int, value: int, what: str) -> None:
    path, _, _ = written
    raw = bytearray(path.read_bytes())
    struct.pack_into("<I", raw, offset, value)
    bad = tmp_path / "absurd.vol"
    bad.write_bytes(bytes(raw))
    tracemalloc.start()
    try:
        with pytest.raises(CorruptFileError, match=what) as info:
            read_heyex_vol(bad)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * len(raw)
    assert "absurd.vol" in str(info.value)


def test_num_seg_must_fit(written, tmp_path: Path) -> None:
    path, _, _ = written
    raw = bytearray(path.read_bytes())
    first_bscan = FILE_HEADER + 256 * 256
    struct.pack_into("<I", raw, first_bscan + 48, 10_000)  # NumSeg (12s I 4d -> offset 48)
    bad = tmp_path / "numseg.vol"
    bad.write_bytes(bytes(raw))
    with pytest.raises(CorruptFileError, match="NumSeg 10000"):
        read_heyex_vol(bad)


def test_bad_bscan_magic(written, tmp_path: Path) -> None:
    path, _, _ = written
    raw = bytearray(path.read_bytes())
    raw[FILE_HEADER + 256 * 256:FILE_HEADER + 256 * 256 + 7] = b"XXXXXXX"
    bad = tmp_path / "magic.vol"
    bad.write_bytes(bytes(raw))
    with pytest.raises(CorruptFileError, match="B-scan 0"):
        read_heyex_vol(bad)


# ------------------------------------------------------------------ privacy


def test_no_patient_identifier_leaks(tmp_path: Path) -> None:
    data, layers = _small_volume(np.random.default_rng(1), shape=(2, 16, 8))
    path = write_heyex_vol(tmp_path / "p.vol", data, spacing_mm=(0.1, 0.004, 0.01), laterality="OD",
                           layers=layers, patient_id="Doe^Jane-SECRET123", exam_time=datetime(2020, 5, 17, 9, 30))
    assert b"SECRET123" in path.read_bytes()  # the writer stores it as given
    vol = read_heyex_vol(path)
    assert "SECRET123" not in repr(vol.meta)
    assert "SECRET123" not in str(vars(vol))
    assert "Doe" not in str(vars(vol)) and "2020" not in repr(vol.meta)

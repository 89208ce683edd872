"""Tests of the oct-converter adapters (Topcon, Zeiss, Bioptigen) and the numpy 2 shim."""

from __future__ import annotations

import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from octpipe.errors import CorruptFileError, FormatError, OctpipeError, UnsupportedFormatError
from octpipe.io import octconverter
from octpipe.io.octconverter import read_bioptigen_oct, read_topcon_fda, read_topcon_fds, read_zeiss_img
from octpipe.volume import OctVolume

REAL = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "real"
PANIMG_OCT = REAL / "DIAGNijmegen_rse-panimg" / "tests" / "resources" / "oct"
REAL_FDA = PANIMG_OCT / "fda_minimized.fda"
REAL_FDS = PANIMG_OCT / "fds_minimized.fds"

NUMPY_FROMSTRING = np.fromstring  # numpy's own, captured before any read


def _real(path: Path) -> Path:
    if not path.is_file():
        pytest.skip(f"real test file missing: {path}")
    return path


@pytest.fixture
def real_fda() -> Path:
    return _real(REAL_FDA)


@pytest.fixture
def real_fds() -> Path:
    return _real(REAL_FDS)


def _assert_numpy_untouched() -> None:
    import oct_converter.readers.fda as fda_module
    import oct_converter.readers.fds as fds_module

    assert np.fromstring is NUMPY_FROMSTRING
    assert fda_module.np is np and fds_module.np is np


def _topcon_chunk(data: bytes, name: bytes) -> tuple[int, int]:
    """(payload position, size) of a Topcon chunk, found by walking the chunk list."""
    pos = 15
    while data[pos]:
        n = data[pos]
        size = int.from_bytes(data[pos + 1 + n:pos + 5 + n], "little")
        if data[pos + 1:pos + 1 + n] == name:
            return pos + 5 + n, size
        pos += 5 + n + size
    raise KeyError(name)


# --------------------------------------------------------------------------- numpy 2 shim


def test_shim_fromstring_matches_numpy1_semantics():
    out = octconverter._binary_fromstring(b"\x01\x00\x02\x00", dtype=np.uint16)
    assert out.tolist() == [1, 2] and out.flags.writeable and out.flags.owndata
    assert octconverter._binary_fromstring(b"\x07\x08", dtype=np.uint8, count=1).tolist() == [7]
    assert octconverter._binary_fromstring(b"", dtype=np.uint8).size == 0
    assert octconverter._binary_fromstring("1 2 3", dtype=np.int64, sep=" ").tolist() == [1, 2, 3]


def test_shim_is_scoped_and_restored_after_errors():
    import oct_converter.readers.fda as fda_module

    with octconverter._numpy2_compat():
        assert fda_module.np is not np
        assert fda_module.np.fromstring(b"\x05", dtype=np.uint8).tolist() == [5]
        assert fda_module.np.uint16 is np.uint16  # everything else is numpy's
        assert np.fromstring is NUMPY_FROMSTRING  # numpy itself is never touched
    _assert_numpy_untouched()
    with pytest.raises(RuntimeError), octconverter._numpy2_compat():
        raise RuntimeError("boom")
    _assert_numpy_untouched()


@pytest.mark.skipif(int(np.__version__.split(".")[0]) < 2, reason="numpy 1 still has binary fromstring")
def test_numpy2_binary_fromstring_still_removed_after_reads(real_fds):
    read_topcon_fds(real_fds)
    with pytest.raises(ValueError):
        np.fromstring(b"\x01", dtype=np.uint8)
    _assert_numpy_untouched()


# --------------------------------------------------------------------------- Topcon, real files


def test_real_fda_reads_one_jpeg2000_bscan(real_fda):
    vol = read_topcon_fda(real_fda)
    assert isinstance(vol, OctVolume)
    assert vol.shape == (1, 650, 512) and vol.data.dtype == np.float32
    assert vol.data.min() >= 0 and vol.data.max() <= 255 and vol.data.std() > 1
    assert (vol.vendor, vol.intensity, vol.laterality) == ("topcon", "display", "OS")
    # oct-converter's [x, y, z] = [6 mm / 512, 6 mm / 1 B-scan, 3.5 um] -> (between, axial, lateral)
    assert vol.spacing_source == "file"
    assert vol.spacing_mm == pytest.approx((6.0, 0.0035, 6.0 / 512))
    assert vol.meta["source_dtype"] == "uint8" and vol.meta["scan_mode"] == 2
    # the contours cover the original 128 B-scans, not the 1 kept: dropped, with the reason
    assert vol.layers == {} and len(vol.meta["layers_dropped"]) == 4
    assert vol.provenance is not None and vol.provenance.reader == "topcon_fda"
    assert "203040" not in repr(vol.meta)  # device serial number in @HW_INFO_03
    _assert_numpy_untouched()


def test_real_fds_reads_format_fixture(real_fds):
    vol = read_topcon_fds(real_fds)
    assert vol.shape == (4, 3, 2)
    assert vol.spacing_mm == pytest.approx((1.5, 0.0035, 3.0)) and vol.spacing_source == "file"
    assert vol.meta["source_dtype"] == "uint16" and vol.laterality == "OS"
    # raw counts, never rescaled
    data = real_fds.read_bytes()
    start, _ = _topcon_chunk(data, b"@IMG_SCAN_03")
    raw = np.frombuffer(data[start + 22:start + 22 + 48], dtype="<u2").reshape(2, 3, 4, order="F")
    np.testing.assert_array_equal(vol.data, raw.transpose(2, 1, 0).astype(np.float32))
    _assert_numpy_untouched()


def test_fda_reader_refuses_fds_and_vice_versa(real_fda, real_fds):
    with pytest.raises(FormatError, match="not a Topcon FDA file"):
        read_topcon_fda(real_fds)
    with pytest.raises(FormatError, match="not a Topcon FDS file"):
        read_topcon_fds(real_fda)


@pytest.mark.parametrize("which", ["fda", "fds"])
def test_real_topcon_truncated_is_refused(which, real_fda, real_fds, tmp_path):
    source = real_fda if which == "fda" else real_fds
    reader = read_topcon_fda if which == "fda" else read_topcon_fds
    data = source.read_bytes()
    for cut in (0, 10, 40, len(data) // 3, len(data) - 1):
        path = tmp_path / f"cut{cut}.{which}"
        path.write_bytes(data[:cut])
        with pytest.raises(OctpipeError) as info:
            reader(path)
        assert path.name in str(info.value) and "\n" not in str(info.value)
    _assert_numpy_untouched()


def test_real_fds_absurd_image_size_is_refused_without_allocating(real_fds, tmp_path):
    data = bytearray(real_fds.read_bytes())
    start, _ = _topcon_chunk(bytes(data), b"@IMG_SCAN_03")
    struct.pack_into("<II", data, start + 1, 2**31, 2**20)  # width, height
    path = tmp_path / "huge.fds"
    path.write_bytes(bytes(data))
    tracemalloc.start()
    try:
        with pytest.raises(CorruptFileError, match="@IMG_SCAN_03 declares"):
            read_topcon_fds(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 20 * 2**20


def test_real_fda_absurd_jpeg_size_is_refused(real_fda, tmp_path):
    data = bytearray(real_fda.read_bytes())
    start, _ = _topcon_chunk(bytes(data), b"@IMG_JPEG")
    struct.pack_into("<i", data, start + 25, 2**30)  # size of the first JPEG 2000 stream
    path = tmp_path / "jpeg.fda"
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match="B-scan 0 declares"):
        read_topcon_fda(path)


def test_fds_without_oct_chunk_is_unsupported(real_fds, tmp_path):
    data = bytearray(real_fds.read_bytes())
    start, _ = _topcon_chunk(bytes(data), b"@IMG_SCAN_03")
    name_at = start - 4 - len(b"@IMG_SCAN_03")
    data[name_at:name_at + 12] = b"@IMG_SCAN_99"
    path = tmp_path / "angio.fds"
    path.write_bytes(bytes(data))
    with pytest.raises(UnsupportedFormatError, match="@IMG_SCAN_03"):
        read_topcon_fds(path)


def test_oct_converter_failure_is_wrapped_and_shim_restored(real_fds, tmp_path):
    data = bytearray(real_fds.read_bytes())
    start, _ = _topcon_chunk(bytes(data), b"@CAPTURE_INFO_02")
    name_at = start - 4 - len(b"@CAPTURE_INFO_02")
    data[name_at:name_at + 16] = b"@CAPTURE_INFO_77"  # oct-converter then fails on the missing capture date
    path = tmp_path / "nodate.fds"
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match="oct-converter could not read the file: TypeError") as info:
        read_topcon_fds(path)
    assert "\n" not in str(info.value) and "nodate.fds" in str(info.value)
    _assert_numpy_untouched()


def test_real_fds_bit_flips_never_crash(real_fds, tmp_path):
    original = real_fds.read_bytes()
    rng = np.random.default_rng(0)
    path = tmp_path / "flip.fds"
    for pos in rng.integers(0, 600, 60):
        data = bytearray(original)
        data[pos] ^= 1 << int(rng.integers(0, 8))
        path.write_bytes(bytes(data))
        try:
            vol = read_topcon_fds(path)
        except OctpipeError as err:
            assert path.name in str(err) and "\n" not in str(err)
        else:
            assert vol.data.ndim == 3 and vol.data.dtype == np.float32
    _assert_numpy_untouched()


# --------------------------------------------------------------------------- Zeiss


def _zeiss_bytes(vol: np.ndarray) -> bytes:
    """(n, rows, cols) uint8 -> the raw layout oct-converter reads: (rows, cols, n), Fortran order."""
    return np.transpose(vol, (1, 2, 0)).ravel(order="F").tobytes()


def test_zeiss_img_synthetic(tmp_path):
    rng = np.random.default_rng(1)
    vol = rng.integers(0, 256, size=(3, 8, 4), dtype=np.uint8)
    path = tmp_path / "P123456_Macular Cube 512x128_9-1-2015_10-2-3_OS_sn98765_cube_z.img"
    path.write_bytes(_zeiss_bytes(vol))
    out = read_zeiss_img(path, rows=8, cols=4)
    np.testing.assert_array_equal(out.data, vol.astype(np.float32))
    assert (out.vendor, out.intensity, out.laterality, out.spacing_source) == ("zeiss", "display", "OS", "default")
    assert out.spacing_mm == pytest.approx((6.0 / 3, 2.0 / 8, 6.0 / 4))
    text = repr(out.meta) + out.volume_id
    assert "P123456" not in text and "98765" not in text
    interlaced = read_zeiss_img(path, rows=8, cols=4, interlaced=True)
    assert interlaced.shape == (6, 4, 4)
    _assert_numpy_untouched()


def test_zeiss_img_size_checks(tmp_path):
    path = tmp_path / "scan.img"
    path.write_bytes(bytes(100))
    with pytest.raises(CorruptFileError, match="not a whole number of 8x4"):
        read_zeiss_img(path, rows=8, cols=4)
    with pytest.raises(ValueError, match="positive integers"):
        read_zeiss_img(path, rows=0, cols=4)
    with pytest.raises(ValueError, match="rows == 2 \\* cols"):
        read_zeiss_img(path, rows=10, cols=10, interlaced=True)
    with pytest.raises(OctpipeError, match="file not found"):
        read_zeiss_img(tmp_path / "missing.img")


# --------------------------------------------------------------------------- Bioptigen


def _field(key: str, payload: bytes = b"", length: int | None = None) -> bytes:
    k = key.encode()
    return struct.pack("<I", len(k)) + k + struct.pack("<I", len(payload) if length is None else length) + payload


def _bioptigen_bytes(frames: np.ndarray, scantype: int = 1, az_mm: float = 6.0, el_mm: float = 5.0,
                     depth_mm: float = 2.0) -> bytes:
    """A Bioptigen .OCT file laid out as oct-converter's ``boct_binary`` structs read it.

    ``frames`` is (n_timepoints, n_bscans, n_ascans, depth) uint16; each frame is stored
    A-scan by A-scan.
    """
    n_t, n_s, n_a, depth = frames.shape

    def integer(key: str, v: int) -> bytes:
        return _field(key, struct.pack("<I", v))

    def real(key: str, v: float) -> bytes:
        return _field(key, struct.pack("<d", v))

    out = struct.pack("<IH", 0x1A2B3C4D, 1) + _field("FRAMEHEADER", length=0)
    out += integer("FRAMECOUNT", n_t * n_s) + integer("LINECOUNT", n_a) + integer("LINELENGTH", depth)
    out += integer("SAMPLEFORMAT", 2) + _field("DESCRIPTION", b"synthetic")
    out += real("XMIN", 0.0) + real("XMAX", 1.0) + _field("XCAPTION", b"x")
    out += real("YMIN", 0.0) + real("YMAX", 1.0) + _field("YCAPTION", b"y")
    out += integer("SCANTYPE", scantype) + real("SCANDEPTH", depth_mm) + real("SCANLENGTH", az_mm)
    out += real("AZSCANLENGTH", az_mm) + real("ELSCANLENGTH", el_mm) + real("OBJECTDISTANCE", 0.0)
    out += real("SCANANGLE", 0.0) + integer("SCANS", n_s) + integer("FRAMES", n_t) + integer("DOPPLERFLAG", 0)
    out += _field("CONFIG", bytes(4)) + bytes(4)
    for t in range(n_t):
        for s in range(n_s):
            out += _field("FRAMEDATA", length=0)
            out += _field("FRAMEDATETIME", struct.pack("<8H", 2020, 1, 3, 2, 10, 20, 30, 0))
            out += real("FRAMETIMESTAMP", 0.0) + integer("FRAMELINES", n_a)
            pixels = np.ascontiguousarray(frames[t, s], dtype="<u2").tobytes()
            out += _field("FRAMESAMPLES", length=len(pixels)) + pixels + bytes(4)
    return out


def test_bioptigen_rect_time_series(tmp_path):
    rng = np.random.default_rng(2)
    frames = rng.integers(0, 65535, size=(2, 3, 5, 7), dtype=np.uint16)
    path = tmp_path / "scan_OD_001.OCT"
    path.write_bytes(_bioptigen_bytes(frames))
    for t in (0, 1):
        vol = read_bioptigen_oct(path, timepoint=t)
        assert vol.shape == (3, 7, 5)  # (n_bscans, depth, n_ascans)
        np.testing.assert_array_equal(vol.data, frames[t].transpose(0, 2, 1).astype(np.float32))
        assert (vol.vendor, vol.laterality, vol.scan_pattern) == ("bioptigen", "OD", "volume")
        assert vol.meta["n_timepoints"] == 2
    assert vol.spacing_mm == pytest.approx((5.0 / 2, 2.0 / 7, 6.0 / 5))
    assert vol.spacing_source == "estimated"
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        read_bioptigen_oct(path, timepoint=2)
    _assert_numpy_untouched()


def test_bioptigen_linear_scan_stacks_all_frames(tmp_path):
    rng = np.random.default_rng(3)
    frames = rng.integers(0, 65535, size=(1, 4, 5, 7), dtype=np.uint16)
    path = tmp_path / "line.OCT"
    path.write_bytes(_bioptigen_bytes(frames, scantype=0))
    vol = read_bioptigen_oct(path)
    assert vol.shape == (4, 7, 5) and vol.scan_pattern == "line" and vol.laterality is None
    assert vol.spacing_mm[0] == 0.0
    np.testing.assert_array_equal(vol.data, frames[0].transpose(0, 2, 1).astype(np.float32))


def test_bioptigen_damaged_files(tmp_path):
    rng = np.random.default_rng(4)
    full = _bioptigen_bytes(rng.integers(0, 65535, size=(1, 3, 5, 7), dtype=np.uint16))
    for cut in (len(full) - 10, len(full) // 2, 40):
        path = tmp_path / f"cut{cut}.OCT"
        path.write_bytes(full[:cut])
        with pytest.raises(OctpipeError) as info:
            read_bioptigen_oct(path)
        assert path.name in str(info.value) and "\n" not in str(info.value)
    junk = tmp_path / "junk.OCT"
    junk.write_bytes(b"\xff" * 64)
    with pytest.raises(FormatError, match="not a Bioptigen"):
        read_bioptigen_oct(junk)
    _assert_numpy_untouched()


def test_real_fda_bit_flips_never_crash(real_fda, tmp_path):
    original = real_fda.read_bytes()
    jpeg_start, _ = _topcon_chunk(original, b"@IMG_JPEG")
    rng = np.random.default_rng(5)
    header_flips = rng.integers(0, jpeg_start + 40, 25)
    image_flips = rng.integers(jpeg_start + 40, jpeg_start + 4000, 15)
    positions = np.concatenate([header_flips, image_flips])
    path = tmp_path / "flip.fda"
    for pos in positions:
        data = bytearray(original)
        data[pos] ^= 1 << int(rng.integers(0, 8))
        path.write_bytes(bytes(data))
        try:
            vol = read_topcon_fda(path)
        except OctpipeError as err:
            assert path.name in str(err) and "\n" not in str(err)
        else:
            assert vol.data.ndim == 3 and vol.data.dtype == np.float32
    _assert_numpy_untouched()


def test_concurrent_reads_are_serialised_and_restore_numpy(real_fds):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=4) as pool:
        shapes = list(pool.map(lambda _: read_topcon_fds(real_fds).shape, range(8)))
    assert shapes == [(4, 3, 2)] * 8
    _assert_numpy_untouched()

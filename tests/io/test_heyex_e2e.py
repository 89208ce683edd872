"""Tests of the Heidelberg E2E reader on the real minimized file and on synthetic files."""

from __future__ import annotations

import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from octpipe.errors import CorruptFileError, FormatError, OctpipeError
from octpipe.io.heyex_e2e import count_heyex_e2e_series, decode_ufloat16, inspect_heyex_e2e, read_heyex_e2e
from octpipe.testing.heyex_e2e_files import encode_ufloat16, write_heyex_e2e_minimal
from octpipe.volume import OctVolume

REAL = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "real"
PANIMG_OCT = REAL / "DIAGNijmegen_rse-panimg" / "tests" / "resources" / "oct"
REAL_E2E = PANIMG_OCT / "e2e_minimized.E2E"

# Layout facts of the real file (see SOURCES.md and the module docstring): the B-scan
# chunk header starts at byte 348, its image header at 408, its pixels at 428.
REAL_BSCAN_CHUNK = 348


@pytest.fixture
def real_e2e() -> Path:
    if not REAL_E2E.is_file():
        pytest.skip(f"real test file missing: {REAL_E2E}")
    return REAL_E2E


def _write_cut(tmp_path: Path, source: Path | bytes, n: int, name: str = "cut.E2E") -> Path:
    data = source.read_bytes() if isinstance(source, Path) else source
    out = tmp_path / name
    out.write_bytes(data[:n])
    return out


def _volume(rng: np.random.Generator, n: int = 3, rows: int = 16, cols: int = 256) -> np.ndarray:
    """Log-uniform linear reflectivity in [1e-6, 1]."""
    return np.exp(rng.uniform(np.log(1e-6), 0.0, size=(n, rows, cols)))


def _assert_fails_cleanly(path: Path) -> OctpipeError:
    with pytest.raises(OctpipeError) as info:
        read_heyex_e2e(path)
    message = str(info.value)
    assert path.name in message and "\n" not in message
    return info.value


# --------------------------------------------------------------------------- ufloat16


def test_decode_ufloat16_known_codes():
    codes = np.array([0xFC00, 0xF800, 0xFA00, 0xFC01, 0x0000, 0xFFFF], dtype=np.uint16)
    values = decode_ufloat16(codes)
    assert values.dtype == np.float32
    assert values[:3].tolist() == [1.0, 0.5, 0.75]
    # Mantissa bits are read in normal order: 0xFC01 is 1 + 1/1024 (a bit-reversed
    # reading, as in eyepy 0.21/oct-converter 0.7, would give 1.5).
    assert values[3] == np.float32(1 + 1 / 1024)
    assert values[4] == np.float32(2.0**-63)
    assert values[5] > 1.99


def test_ufloat16_round_trip_relative_error():
    rng = np.random.default_rng(0)
    x = np.exp(rng.uniform(np.log(1e-12), np.log(1.98), size=5000))
    back = decode_ufloat16(encode_ufloat16(x)).astype(np.float64)
    assert np.max(np.abs(back - x) / x) <= 2.0**-11 + 1e-7


def test_ufloat16_edges_and_errors():
    assert encode_ufloat16([np.nan, 0.0, 1e-30]).tolist() == [0xFFFF, 0, 0]
    assert decode_ufloat16(encode_ufloat16([np.nan]))[0] > 1.99
    for bad in (-0.1, 2.0, np.inf):
        with pytest.raises(ValueError, match=r"\[0, 2\)"):
            encode_ufloat16([bad])
    with pytest.raises(ValueError, match="65535"):
        decode_ufloat16([70000])
    codes = np.array([1, 2, 3], dtype=np.uint16)
    decode_ufloat16(codes)
    assert codes.tolist() == [1, 2, 3]  # input untouched


# --------------------------------------------------------------------------- real file


def test_real_minimized_file_reads_one_plausible_bscan(real_e2e):
    volumes = read_heyex_e2e(real_e2e)
    assert len(volumes) == 1
    vol = volumes[0]
    assert isinstance(vol, OctVolume)
    assert vol.shape == (1, 496, 512)
    assert vol.data.dtype == np.float32
    assert vol.laterality == "OS"  # both laterality chunks say 'L'
    assert (vol.vendor, vol.intensity, vol.bscan_order) == ("heidelberg", "linear", "inferior_first")
    assert vol.meta["index_source"] == "chunk_walk"  # its directory is stale
    assert vol.spacing_source == "default" and vol.spacing_mm == (0.12, 0.0039, 0.0113)
    assert vol.provenance is not None
    assert (vol.provenance.reader, vol.provenance.format, vol.provenance.series) == ("heyex_e2e", "heyex-e2e", 0)
    assert vol.volume_id and vol.volume_id == read_heyex_e2e(real_e2e)[0].volume_id
    # Spectralis linear reflectivity: about [0, 1], mostly dark, a bright retina band.
    data = vol.data[0]
    assert np.isfinite(data).all() and data.min() >= 0 and data.max() <= 1.0
    assert vol.invalid is not None and not vol.invalid.any()
    assert np.median(data) < 1e-3
    assert 1e-3 < np.percentile(data, 99) < 0.5
    assert data[180:300].mean() > 10 * data[:60].mean()
    assert vol.layers == {}


def test_real_minimized_file_inspection(real_e2e):
    (info,) = inspect_heyex_e2e(real_e2e)
    assert (info.index, info.n_bscans, info.bscan_shape, info.laterality) == (0, 1, (496, 512), "OS")
    assert info.index_source == "chunk_walk"
    assert count_heyex_e2e_series(real_e2e) == 1


@pytest.mark.parametrize("cut", [0, 20, 100, 300, 418, 300_000, 508_331])
def test_real_file_truncated_is_refused(real_e2e, tmp_path, cut):
    path = _write_cut(tmp_path, real_e2e, cut)
    err = _assert_fails_cleanly(path)
    assert isinstance(err, (FormatError, CorruptFileError))


def test_real_file_cut_before_the_bscan_is_truncated(real_e2e, tmp_path):
    # The localizer stub before the B-scan keeps its original (stale) size; as the last
    # chunk, a size that runs past the end of the file means truncation.
    path = _write_cut(tmp_path, real_e2e, REAL_BSCAN_CHUNK)
    with pytest.raises(CorruptFileError, match="truncated: the chunk at byte 262"):
        read_heyex_e2e(path)


def test_file_without_bscans_is_refused(real_e2e, tmp_path):
    data = bytearray(real_e2e.read_bytes())
    struct.pack_into("<I", data, REAL_BSCAN_CHUNK + 52, 9999)  # chunk type: no longer an image
    path = tmp_path / "nobscan.E2E"
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match="no OCT B-scans found"):
        read_heyex_e2e(path)


def test_real_file_absurd_image_size_is_refused_without_allocating(real_e2e, tmp_path):
    data = bytearray(real_e2e.read_bytes())
    image_header = REAL_BSCAN_CHUNK + 60
    struct.pack_into("<II", data, image_header + 12, 60_000, 60_000)  # height, width
    path = tmp_path / "huge.E2E"
    path.write_bytes(bytes(data))
    tracemalloc.start()
    try:
        with pytest.raises(CorruptFileError, match="60000x60000"):
            read_heyex_e2e(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 20 * 2**20


def test_real_file_absurd_chunk_size_is_refused(real_e2e, tmp_path):
    data = bytearray(real_e2e.read_bytes())
    struct.pack_into("<I", data, REAL_BSCAN_CHUNK + 24, 0xFFFFFFF0)  # chunk payload size
    path = tmp_path / "size.E2E"
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match="truncated"):
        read_heyex_e2e(path)


def test_real_file_wrong_magic_is_a_format_error(real_e2e, tmp_path):
    data = bytearray(real_e2e.read_bytes())
    data[0:4] = b"XMDb"
    path = tmp_path / "magic.E2E"
    path.write_bytes(bytes(data))
    with pytest.raises(FormatError, match="not a Heidelberg E2E file"):
        read_heyex_e2e(path)


def test_real_file_bit_flips_never_crash(real_e2e, tmp_path):
    original = real_e2e.read_bytes()
    rng = np.random.default_rng(1)
    positions = np.concatenate([rng.integers(0, REAL_BSCAN_CHUNK + 80, 160), rng.integers(428, len(original), 40)])
    path = tmp_path / "flipped.E2E"
    outcomes = {"ok": 0, "error": 0}
    for pos in positions:
        data = bytearray(original)
        data[pos] ^= 1 << int(rng.integers(0, 8))
        path.write_bytes(bytes(data))
        try:
            volumes = read_heyex_e2e(path)
        except OctpipeError as err:
            assert path.name in str(err) and "\n" not in str(err)
            outcomes["error"] += 1
        else:
            assert volumes and all(v.data.dtype == np.float32 and v.shape[1:] == (496, 512) for v in volumes)
            outcomes["ok"] += 1
    assert outcomes["ok"] > 0 and outcomes["error"] > 0


# --------------------------------------------------------------------------- synthetic files


def test_synthetic_round_trip_values_order_layers_spacing(tmp_path):
    rng = np.random.default_rng(2)
    vol = _volume(rng)
    vol[1, 3, 5] = np.nan  # "empty" pixel
    ilm = np.tile(np.linspace(2.0, 5.0, 256), (3, 1))
    bm = ilm + 8.0
    bm[2, 10] = np.nan
    path = write_heyex_e2e_minimal(tmp_path / "one.E2E", [vol], lateralities=["OD"], layers=[{0: ilm, 1: bm}],
                                   reverse_bscans=True)
    (out,) = read_heyex_e2e(path)
    assert out.shape == (3, 16, 256) and out.laterality == "OD"
    assert out.meta["index_source"] == "directory"
    assert out.scan_pattern == "volume" and out.meta["scan_pattern_code"] == 3
    valid = np.isfinite(vol)
    assert out.invalid is not None and out.invalid[1, 3, 5] and out.invalid.sum() == 1
    assert out.data[1, 3, 5] == 0.0
    np.testing.assert_allclose(out.data[valid], vol[valid], rtol=2.0**-11)  # B-scans back in slice order
    assert set(out.layers) == {"ILM", "BM"}
    np.testing.assert_allclose(out.layers["ILM"], ilm, rtol=1e-6)
    assert np.isnan(out.layers["BM"][2, 10]) and np.isfinite(out.layers["BM"]).sum() == bm.size - 1
    # axial scale from the B-scan header; lateral and B-scan spacing estimated from degrees
    between, axial, lateral = out.spacing_mm
    assert axial == pytest.approx(0.0039)
    assert lateral == pytest.approx(20.0 * 0.2896 / 256)
    assert between == pytest.approx(0.4 * 0.2896)
    assert out.spacing_source == "estimated"
    assert out.meta["spacing_sources"] == {"bscan": "estimated", "axial": "file", "lateral": "estimated"}


def test_synthetic_two_series_give_two_volumes(tmp_path):
    rng = np.random.default_rng(3)
    a, b = _volume(rng, 2, 8, 64), _volume(rng, 3, 8, 32)
    path = write_heyex_e2e_minimal(tmp_path / "two.E2E", [a, b], lateralities=["OD", "OS"])
    volumes = read_heyex_e2e(path)
    assert [v.shape for v in volumes] == [(2, 8, 64), (3, 8, 32)]
    assert [v.laterality for v in volumes] == ["OD", "OS"]
    assert [v.provenance.series for v in volumes if v.provenance] == [0, 1]
    assert volumes[0].volume_id != volumes[1].volume_id
    assert count_heyex_e2e_series(path) == 2
    (only,) = read_heyex_e2e(path, series=[1])
    assert only.shape == (3, 8, 32) and only.volume_id == volumes[1].volume_id
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        read_heyex_e2e(path, series=[2])


def test_series_are_ordered_by_key_and_grouped(tmp_path):
    rng = np.random.default_rng(4)
    a, b = _volume(rng, 1, 8, 16), _volume(rng, 2, 8, 16)
    path = write_heyex_e2e_minimal(tmp_path / "keys.E2E", [a, b], series_keys=[(7, 1, 1), (3, 9, 9)])
    assert [v.shape[0] for v in read_heyex_e2e(path)] == [2, 1]


def test_same_series_key_merges_and_checks_sizes(tmp_path):
    rng = np.random.default_rng(5)
    a, b = _volume(rng, 2, 8, 16), _volume(rng, 3, 8, 16)
    path = write_heyex_e2e_minimal(tmp_path / "dup.E2E", [a, b], series_keys=[(1, 1, 1)] * 2)
    (vol,) = read_heyex_e2e(path)
    assert vol.shape == (3, 8, 16) and vol.meta["duplicate_bscans_ignored"] == 2
    c = _volume(rng, 3, 8, 32)
    path = write_heyex_e2e_minimal(tmp_path / "mixed.E2E", [a, c], series_keys=[(1, 1, 1)] * 2)
    with pytest.raises(CorruptFileError, match="different sizes"):
        read_heyex_e2e(path)


@pytest.mark.parametrize("directory", ["stale", "missing"])
def test_stale_or_missing_directory_reads_via_chunk_walk(tmp_path, directory):
    rng = np.random.default_rng(6)
    vols = [_volume(rng, 2, 8, 32), _volume(rng, 1, 8, 32)]
    good = read_heyex_e2e(write_heyex_e2e_minimal(tmp_path / "good.E2E", vols, lateralities=["OS", "OD"]))
    other = read_heyex_e2e(write_heyex_e2e_minimal(tmp_path / "other.E2E", vols, lateralities=["OS", "OD"],
                                                   directory=directory))
    assert [v.meta["index_source"] for v in good] == ["directory"] * 2
    assert [v.meta["index_source"] for v in other] == ["chunk_walk"] * 2
    for g, o in zip(good, other, strict=True):
        np.testing.assert_array_equal(g.data, o.data)
        assert (g.laterality, g.spacing_mm) == (o.laterality, o.spacing_mm)


def test_directory_pointing_outside_the_file_falls_back_to_walk(tmp_path):
    rng = np.random.default_rng(7)
    path = write_heyex_e2e_minimal(tmp_path / "far.E2E", [_volume(rng, 2, 8, 32)])
    data = bytearray(path.read_bytes())
    struct.pack_into("<I", data, 36 + 40, 0x7FFF0000)  # main directory 'current'
    path.write_bytes(bytes(data))
    (vol,) = read_heyex_e2e(path)
    assert vol.meta["index_source"] == "chunk_walk" and vol.shape == (2, 8, 32)


def test_synthetic_truncations_are_refused(tmp_path):
    rng = np.random.default_rng(8)
    full = write_heyex_e2e_minimal(tmp_path / "full.E2E", [_volume(rng, 3, 8, 32)], lateralities=["OD"],
                                   layers=[{0: np.full((3, 32), 2.0)}]).read_bytes()
    chunk_starts = [i for i in range(len(full)) if full.startswith(b"MDbData\0", i)]
    for n, cut in enumerate([len(full) // 2, len(full) - 1, chunk_starts[-1], chunk_starts[3] + 30]):
        _assert_fails_cleanly(_write_cut(tmp_path, full, cut, f"cut{n}.E2E"))


def test_patient_name_never_reaches_the_volume(tmp_path):
    rng = np.random.default_rng(9)
    name = "Zyxwvut Qwertyson"
    path = write_heyex_e2e_minimal(tmp_path / "anon.E2E", [_volume(rng, 2, 8, 16)], lateralities=["OD"],
                                   patient_name=name, series_keys=[(424242, 1, 1)])
    assert b"Zyxwvut" in path.read_bytes()  # the record is in the file...
    (vol,) = read_heyex_e2e(path)
    text = repr(vol) + str(vol.meta) + str(vol.provenance) + vol.volume_id
    for secret in ("Zyxwvut", "Qwertyson", "424242"):
        assert secret not in text  # ...but not in the result
    assert "Zyxwvut" not in repr(inspect_heyex_e2e(path))


def test_not_an_e2e_file(tmp_path):
    for name, content in [("empty.E2E", b""), ("text.E2E", b"hello, not an E2E file at all" * 10)]:
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(FormatError):
            read_heyex_e2e(path)
    with pytest.raises(OctpipeError, match="file not found"):
        read_heyex_e2e(tmp_path / "missing.E2E")
    with pytest.raises(OctpipeError, match="cannot open"):
        read_heyex_e2e(tmp_path)


def test_writer_validates_its_input(tmp_path):
    ok = np.full((1, 4, 8), 0.1)
    with pytest.raises(ValueError, match="3-D"):
        write_heyex_e2e_minimal(tmp_path / "a.E2E", [np.zeros((4, 8))])
    with pytest.raises(ValueError, match="'OD', 'OS' or None"):
        write_heyex_e2e_minimal(tmp_path / "a.E2E", [ok], lateralities=["R"])
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        write_heyex_e2e_minimal(tmp_path / "a.E2E", [-ok])
    with pytest.raises(ValueError, match="layer 0 must have shape"):
        write_heyex_e2e_minimal(tmp_path / "a.E2E", [ok], layers=[{0: np.zeros((2, 8))}])
    write_heyex_e2e_minimal(tmp_path / "a.E2E", [ok])
    with pytest.raises(OctpipeError, match="output exists"):
        write_heyex_e2e_minimal(tmp_path / "a.E2E", [ok])


def test_multiple_volume_preamble_and_inspection(tmp_path):
    rng = np.random.default_rng(10)
    path = write_heyex_e2e_minimal(tmp_path / "plain.E2E", [_volume(rng, 2, 8, 16)], lateralities=["OS"],
                                   layers=[{0: np.full((2, 16), 3.0), 16: np.full((2, 16), 6.0)}])
    wrapped = tmp_path / "multi.E2E"
    wrapped.write_bytes(b"E2EMultipleVolumeFile".ljust(64, b"\0") + path.read_bytes())
    (info,) = inspect_heyex_e2e(wrapped)
    assert (info.n_bscans, info.laterality, info.layer_names, info.index_source) == (2, "OS", ("ILM", "RPE"),
                                                                                      "directory")
    (vol,) = read_heyex_e2e(wrapped)
    np.testing.assert_array_equal(vol.data, read_heyex_e2e(path)[0].data)
    assert set(vol.layers) == {"ILM", "RPE"}

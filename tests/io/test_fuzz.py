"""Fuzzing every reader: mutated phantom and real files end in an OctpipeError or a valid volume.

Never another exception, a hang, or a peak allocation above twice what reading the intact
file takes (4 MiB at least). The default run uses few hypothesis examples (derandomized, so
it is the same every run); the slow test runs many more. ``benchmarks/fuzz.py`` reports
case counts per reader and outcome.
"""

from __future__ import annotations

import struct
from collections import Counter

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from octpipe.errors import CorruptFileError, OctpipeError
from octpipe.testing.fuzz import (
    BAD_OUTCOMES,
    EXTREME_INTS,
    READER_FORMATS,
    Mutation,
    Seed,
    apply_mutation,
    baseline_peak,
    run_case,
)
from tests.conftest import REAL_DATA

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow/tifffile warn about damaged EXIF/tags

_FLOATS = (float("nan"), float("inf"), float("-inf"), 3.4028235e38, 1e30)


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> dict[str, list[Seed]]:
    from octpipe.testing.fuzz import build_seeds

    return build_seeds(tmp_path_factory.mktemp("fuzz-seeds"), real_dir=REAL_DATA)


@pytest.fixture(scope="module")
def budgets(seeds) -> dict[str, int]:
    """Twice the peak allocation of reading each intact seed (at least 4 MiB)."""
    return {s.name: 2 * max(baseline_peak(s), 4 << 20) for group in seeds.values() for s in group}


def mutations(seed: Seed) -> st.SearchStrategy[Mutation]:
    n = len(seed.data)
    head = min(n, 4096)
    options = [
        st.one_of(st.sampled_from(seed.boundaries), st.integers(0, n - 1)).map(lambda k: Mutation("truncate", (k,))),
        st.lists(st.tuples(st.one_of(st.integers(0, head - 1), st.integers(0, n - 1)), st.integers(0, 7)),
                 min_size=1, max_size=8).map(lambda f: Mutation("bitflip", tuple(f))),
        st.tuples(st.integers(0, n - 1), st.sampled_from((1, 4, 16, 256)), st.sampled_from((0, 0xFF))).map(
            lambda p: Mutation("splice", p)),
    ]
    if seed.int_fields:
        options.append(st.tuples(st.integers(0, len(seed.int_fields) - 1),
                                 st.one_of(st.sampled_from(EXTREME_INTS), st.integers(-(1 << 31), (1 << 32) - 1)))
                       .map(lambda p: Mutation("int_field", p)))
    if seed.float_regions:
        options.append(st.tuples(st.integers(0, len(seed.float_regions) - 1), st.floats(0, 1),
                                 st.sampled_from(_FLOATS), st.sampled_from((1, 7, 64, 1 << 20)))
                       .map(lambda p: Mutation("nan_pixels", p)))
    return st.one_of(options)


def _check(seed: Seed, mutation: Mutation, budgets: dict[str, int]):
    out = run_case(seed, apply_mutation(seed, mutation), budget_bytes=budgets[seed.name], timeout_s=30)
    assert out.kind not in BAD_OUTCOMES, f"{seed.name} {mutation.describe()}: {out.kind}: {out.detail}"
    return out


def _fuzz(reader: str, seeds, budgets, data) -> None:
    group = seeds[reader]
    if not group:
        pytest.skip(f"no seed files for {reader} (real data missing)")
    seed = data.draw(st.sampled_from(group), label="seed")
    mutation = data.draw(mutations(seed), label="mutation")
    _check(seed, mutation, budgets)


_FAST = settings(max_examples=25, deadline=None, derandomize=True, database=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.mark.parametrize("reader", [r for r in READER_FORMATS if r != "octconverter"])
@_FAST
@given(data=st.data())
def test_reader_survives_random_mutations(reader, seeds, budgets, data):
    _fuzz(reader, seeds, budgets, data)


@settings(_FAST, max_examples=12)
@given(data=st.data())
def test_octconverter_survives_random_mutations(seeds, budgets, data):
    # oct-converter is slow on the real .fda file (~0.15 s a case): fewer examples by default
    _fuzz("octconverter", seeds, budgets, data)


@pytest.mark.slow
@pytest.mark.parametrize("reader", list(READER_FORMATS))
@settings(max_examples=600, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_reader_survives_many_mutations(reader, seeds, budgets, data):
    _fuzz(reader, seeds, budgets, data)


# --------------------------------------------------------------------------- exhaustive, per structure


@pytest.mark.parametrize("reader", list(READER_FORMATS))
def test_truncation_at_every_header_boundary(reader, seeds, budgets):
    if not seeds[reader]:
        pytest.skip(f"no seed files for {reader}")
    kinds: Counter[str] = Counter()
    for seed in seeds[reader]:
        for at in seed.boundaries[:80]:
            if at >= len(seed.data) - 1:
                continue
            kinds[_check(seed, Mutation("truncate", (at,)), budgets).kind] += 1
    assert kinds["error"] > 0  # most truncations are refused with a reason
    if reader in ("heyex_vol", "dicom", "nifti"):  # formats whose every byte is needed: nothing reads
        assert set(kinds) == {"error"}, kinds


@pytest.mark.parametrize("reader", [pytest.param(r, marks=pytest.mark.slow) if r == "octconverter" else r
                                    for r in READER_FORMATS])  # octconverter's cases take 13-16 s
def test_extreme_size_fields(reader, seeds, budgets):
    """Oversized, zero and negative sizes: refused before any allocation beyond the budget."""
    done = 0
    n_fields = 8 if reader == "octconverter" else 20  # oct-converter takes ~0.15 s a case
    for seed in seeds[reader]:
        for index in range(min(len(seed.int_fields), n_fields)):
            for value in (0, -1, 0x7FFFFFFF, 0xFFFFFFFF):
                _check(seed, Mutation("int_field", (index, value)), budgets)
                done += 1
    if not done:
        pytest.skip(f"no size fields known for {reader}")


def test_vol_size_fields_are_refused(seeds, budgets):
    """Every .vol geometry field set to an impossible value gives a CorruptFileError naming it."""
    seed = seeds["heyex_vol"][0]
    for index in range(6):  # SizeX, NumBScans, SizeZ, SizeXSlo, SizeYSlo, BScanHdrSize
        for value in (-1, 0xFFFFFFFF, 0x7FFFFFFF):
            out = _check(seed, Mutation("int_field", (index, value)), budgets)
            assert out.kind == "error" and ("implausible" in out.detail or "truncated" in out.detail), out


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_vol_nan_inf_pixels_are_marked_invalid(seeds, value, tmp_path):
    from octpipe.io import read_volume

    seed = seeds["heyex_vol"][0]
    region = next(r for r in seed.float_regions if r[1] - r[0] > 4 * 64)  # B-scan pixels, not boundaries
    raw = apply_mutation(seed, Mutation("nan_pixels", (seed.float_regions.index(region), 0.0, value, 5)))
    path = tmp_path / "nan.vol"
    path.write_bytes(raw)
    vol = read_volume(path)
    assert vol.invalid is not None and int(vol.invalid.sum()) == 5
    assert np.isfinite(vol.data).all()


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nifti_nan_inf_voxels_are_marked_invalid(seeds, value, tmp_path):
    from octpipe.io import read_volume

    seed = seeds["nifti"][0]  # uncompressed .nii
    start = 352
    raw = bytearray(seed.data)
    raw[start:start + 12] = struct.pack("<fff", value, value, value)
    path = tmp_path / "nan.nii"
    path.write_bytes(bytes(raw))
    vol = read_volume(path)
    assert vol.invalid is not None and int(vol.invalid.sum()) == 3
    assert np.isfinite(vol.data).all()


def test_nifti_gz_huge_shape_refused_before_allocation(seeds, budgets, tmp_path):
    import gzip

    seed = seeds["nifti"][0]
    raw = bytearray(seed.data)
    raw[42:48] = struct.pack("<hhh", 400, 400, 400)  # dim[1..3]: 256 MB, under the 32 GiB cap
    gz = Seed("huge.nii.gz", "nifti", "nifti", gzip.compress(bytes(raw)), ".nii.gz")
    out = run_case(gz, gz.data, budget_bytes=budgets[seed.name])
    assert out.kind == "error" and "gzip bytes can hold" in out.detail, out


def test_png_huge_chunk_length_no_huge_read(seeds, budgets):
    """A PNG chunk length of 4 GiB made Pillow allocate 4 GiB before failing (fixed by BoundedReader)."""
    seed = next(s for s in seeds["images"] if s.suffix == ".png")
    idat = seed.data.find(b"IDAT") - 4
    raw = bytearray(seed.data)
    raw[idat:idat + 4] = (0xFFFFFFFF).to_bytes(4, "big")
    out = run_case(seed, bytes(raw), budget_bytes=budgets[seed.name])
    assert out.kind in ("error", "ok"), out  # "oversize" before the fix


def test_tiff_huge_dimensions_refused_before_decoding(seeds, budgets):
    seed = next(s for s in seeds["images"] if s.suffix == ".tif")
    for index in range(len(seed.int_fields)):
        out = _check(seed, Mutation("int_field", (index, 0x7FFFFFFF)), budgets)
        assert out.kind in ("error", "ok")


def test_dicom_damaged_length_no_huge_read(seeds, budgets, tmp_path):
    """A DICOM element length made huge by a bit flip: refused without reading gigabytes."""
    seed = seeds["dicom"][0]
    raw = bytearray(seed.data)
    pixel = raw.find(b"\xe0\x7f\x10\x00")  # (7FE0,0010) Pixel Data, explicit VR OB/OW: 4-byte length at +8
    raw[pixel + 8:pixel + 12] = (0xFFFFFFF0).to_bytes(4, "little")
    out = run_case(seed, bytes(raw), budget_bytes=budgets[seed.name])
    assert out.kind in ("error", "ok"), out  # "oversize" (a 4 GiB read) before the fix


def test_dicom_unknown_vr_is_a_corrupt_file_error(seeds, tmp_path):
    from octpipe.io.dicom import read_dicom

    seed = seeds["dicom"][0]
    raw = bytearray(seed.data)
    at = raw.find(b"\x28\x00\x01\x01")  # (0028,0101) BitsStored; its VR follows the tag
    raw[at + 4:at + 6] = b"\x55\xd3"
    path = tmp_path / "vr.dcm"
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptFileError, match="vr.dcm: "):
        read_dicom(path)


def test_read_volumes_wraps_unforeseen_errors_in_one_line(tmp_path, monkeypatch):
    import octpipe.io.heyex_vol as hv
    from octpipe.io import read_volume

    def boom(path):
        raise struct.error("unpack requires a buffer of 4 bytes\nsecond line")

    monkeypatch.setattr(hv, "read_heyex_vol", boom)
    path = tmp_path / "x.vol"
    path.write_bytes(b"HSF-OCT-103" + bytes(100))
    with pytest.raises(OctpipeError) as info:
        read_volume(path)
    assert "\n" not in str(info.value) and "x.vol" in str(info.value) and "struct.error" not in str(info.value)
    assert "reader failed: error: unpack requires" in str(info.value)


def test_fda_damaged_bscan_height_refused(seeds, budgets):
    """A flipped bit in the @IMG_JPEG height made oct-converter build a 100x larger, mostly empty volume."""
    fda = [s for s in seeds["octconverter"] if s.format == "topcon-fda"]
    if not fda:
        pytest.skip("real .fda file not present")
    seed = fda[0]
    at = seed.data.find(b"@IMG_JPEG") + len(b"@IMG_JPEG") + 4  # chunk payload: <B6I header
    height_at = at + 1 + 4 * 3
    raw = bytearray(seed.data)
    raw[height_at + 2] ^= 1  # height + 65536
    out = run_case(seed, bytes(raw), budget_bytes=budgets[seed.name])
    assert out.kind == "error" and "codestream" in out.detail, out

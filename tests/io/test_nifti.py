from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from octpipe.errors import CorruptFileError, FormatError, OctpipeError, UnsupportedFormatError
from octpipe.io.nifti import OCTPIPE_INTENT_NAME, nifti_affine, read_nifti, write_nifti

SPACING = (0.12, 0.00387, 0.0113)  # (between B-scans, axial, lateral) mm


@pytest.fixture
def volume() -> np.ndarray:
    return np.random.default_rng(7).random((3, 40, 32)).astype(np.float32)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_round_trip(tmp_path: Path, volume: np.ndarray, suffix: str) -> None:
    before = volume.copy()
    path = write_nifti(tmp_path / f"vol{suffix}", volume, spacing_mm=SPACING, description="phantom 1")
    np.testing.assert_array_equal(volume, before)  # input not mutated
    vol = read_nifti(path)
    assert vol.shape == (3, 40, 32)
    np.testing.assert_array_equal(vol.data, volume)
    np.testing.assert_allclose(vol.spacing_mm, SPACING, atol=1e-6)
    assert vol.spacing_source == "file"
    assert vol.laterality is None
    assert vol.intensity == "display"
    assert vol.scan_pattern == "volume"
    assert vol.meta["octpipe_layout"] is True
    assert vol.meta["description"] == "phantom 1"
    assert vol.provenance is not None and vol.provenance.format == "nifti"
    assert not list(tmp_path.glob(".*"))  # no temp file left behind


def test_file_layout_follows_the_documented_convention(tmp_path: Path, volume: np.ndarray) -> None:
    path = write_nifti(tmp_path / "vol.nii.gz", volume, spacing_mm=SPACING)
    img = nib.load(path)
    bscan, axial, lateral = SPACING
    # zooms are spacing_mm permuted to (lateral, bscan, axial): i = A-scan, j = B-scan, k = depth
    np.testing.assert_allclose(img.header.get_zooms(), (lateral, bscan, axial), rtol=1e-6)
    assert img.shape == (32, 3, 40)
    stored = np.asarray(img.dataobj)
    assert stored.dtype == np.float32
    np.testing.assert_array_equal(stored, volume.transpose(2, 0, 1))
    assert stored[5, 2, 17] == volume[2, 17, 5]
    np.testing.assert_allclose(img.affine, nifti_affine(volume.shape, SPACING), rtol=1e-6)
    assert img.header.get_qform(coded=True)[1] == 1  # scanner
    assert img.header.get_sform(coded=True)[1] == 2  # aligned
    assert img.header.get_xyzt_units()[0] == "mm"
    assert img.header["intent_name"].item().decode() == OCTPIPE_INTENT_NAME


def test_affine_maps_voxels_to_mm() -> None:
    affine = nifti_affine((3, 40, 32), SPACING)
    i, j, k = 5, 2, 17  # A-scan 5 of B-scan 2, depth row 17
    x, y, z, _ = affine @ np.array([i, j, k, 1.0])
    assert (x, y, z) == pytest.approx((5 * SPACING[2], 2 * SPACING[0], -17 * SPACING[1]))


def test_integer_input_is_stored_as_float32(tmp_path: Path) -> None:
    data = np.arange(2 * 5 * 4, dtype=np.uint16).reshape(2, 5, 4) * 1000
    vol = read_nifti(write_nifti(tmp_path / "u16.nii", data, spacing_mm=SPACING))
    assert nib.load(tmp_path / "u16.nii").get_data_dtype() == np.float32
    np.testing.assert_array_equal(vol.data, data.astype(np.float32))


def test_single_bscan_round_trip(tmp_path: Path) -> None:
    data = np.random.default_rng(1).random((1, 12, 9)).astype(np.float32)
    vol = read_nifti(write_nifti(tmp_path / "one.nii", data, spacing_mm=(0.2, 0.004, 0.01)))
    np.testing.assert_array_equal(vol.data, data)
    assert vol.scan_pattern == "line"


def test_foreign_3d_uses_index_convention(tmp_path: Path) -> None:
    arr = np.arange(4 * 3 * 5, dtype=np.int16).reshape(4, 3, 5)  # (i, j, k) = (A-scan, B-scan, depth)
    affine = np.array([[0, 0.5, 0, 10], [0.25, 0, 0, 0], [0, 0, 2.0, 0], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(arr, affine), tmp_path / "foreign.nii")
    vol = read_nifti(tmp_path / "foreign.nii")
    assert vol.shape == (3, 5, 4)
    np.testing.assert_array_equal(vol.data, arr.transpose(1, 2, 0).astype(np.float32))
    assert vol.spacing_mm == pytest.approx((0.5, 2.0, 0.25))  # column norms of j, k, i
    assert vol.spacing_source == "file"
    assert vol.meta["octpipe_layout"] is False


def test_foreign_2d_is_one_bscan(tmp_path: Path) -> None:
    arr = np.arange(4 * 5, dtype=np.uint8).reshape(4, 5)  # (i, j) = (A-scan, depth)
    nib.save(nib.Nifti1Image(arr, np.diag([0.5, 0.25, 1.0, 1.0])), tmp_path / "two.nii")
    vol = read_nifti(tmp_path / "two.nii")
    assert vol.shape == (1, 5, 4)
    np.testing.assert_array_equal(vol.data[0], arr.T.astype(np.float32))
    assert vol.spacing_mm == pytest.approx((0.0, 0.25, 0.5))


def test_trailing_singleton_axis_is_dropped(tmp_path: Path) -> None:
    arr = np.ones((4, 3, 5, 1), np.float32)
    nib.save(nib.Nifti1Image(arr, np.eye(4)), tmp_path / "t1.nii.gz")
    assert read_nifti(tmp_path / "t1.nii.gz").shape == (3, 5, 4)


def test_4d_is_refused(tmp_path: Path) -> None:
    nib.save(nib.Nifti1Image(np.zeros((4, 3, 5, 2), np.float32), np.eye(4)), tmp_path / "four.nii")
    with pytest.raises(UnsupportedFormatError, match="four.nii"):
        read_nifti(tmp_path / "four.nii")


def test_not_nifti(tmp_path: Path) -> None:
    path = tmp_path / "junk.nii"
    path.write_bytes(b"\x00\x01not a nifti file" * 40)
    with pytest.raises(FormatError, match="junk.nii"):
        read_nifti(path)


@pytest.mark.parametrize("keep", [100, 352, 2000, -5])
def test_truncated_nii(tmp_path: Path, volume: np.ndarray, keep: int) -> None:
    raw = write_nifti(tmp_path / "vol.nii", volume, spacing_mm=SPACING).read_bytes()
    cut = tmp_path / "cut.nii"
    cut.write_bytes(raw[:keep])
    with pytest.raises(CorruptFileError, match="cut.nii"):
        read_nifti(cut)


@pytest.mark.parametrize("fraction", [0.02, 0.5])
def test_truncated_nii_gz(tmp_path: Path, volume: np.ndarray, fraction: float) -> None:
    raw = write_nifti(tmp_path / "vol.nii", volume, spacing_mm=SPACING).read_bytes()
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(gzip.compress(raw)[: int(len(gzip.compress(raw)) * fraction)])
    with pytest.raises(CorruptFileError, match="cut.nii.gz"):
        read_nifti(cut)


@pytest.mark.parametrize(
    ("name", "data", "kw"),
    [
        ("a.nii", np.zeros((4, 4)), {}),
        ("a.nii", np.zeros((2, 4, 4), np.complex64), {}),
        ("a.nii", np.zeros((2, 4, 4), bool), {}),
        ("a.img", np.zeros((2, 4, 4)), {}),
        ("a.nii", np.zeros((2, 4, 4)), {"spacing_mm": (0.0, 0.004, 0.01)}),
        ("a.nii", np.zeros((2, 4, 4)), {"description": "x" * 81}),
    ],
)
def test_writer_rejects_bad_input(tmp_path: Path, name: str, data: np.ndarray, kw: dict) -> None:
    kw.setdefault("spacing_mm", SPACING)
    with pytest.raises(ValueError):
        write_nifti(tmp_path / name, data, **kw)


def test_writer_overwrite(tmp_path: Path, volume: np.ndarray) -> None:
    path = write_nifti(tmp_path / "v.nii.gz", volume, spacing_mm=SPACING)
    with pytest.raises(OctpipeError, match="overwrite"):
        write_nifti(path, volume, spacing_mm=SPACING)
    write_nifti(path, volume * 2, spacing_mm=SPACING, overwrite=True)
    np.testing.assert_array_equal(read_nifti(path).data, volume * 2)


def test_zero_voxel_size_falls_back_to_defaults(tmp_path: Path) -> None:
    img = nib.Nifti1Image(np.ones((4, 3, 5), np.float32), None)
    img.header["pixdim"][1:4] = [0.0, 0.2, 0.3]  # no qform/sform, i voxel size missing
    nib.save(img, tmp_path / "zero.nii")
    vol = read_nifti(tmp_path / "zero.nii")
    assert vol.spacing_source == "default"


def test_header_image_pair(tmp_path: Path) -> None:
    nib.save(nib.Nifti1Pair(np.ones((4, 3, 5), np.float32), np.diag([0.1, 0.2, 0.3, 1.0])), tmp_path / "pair.img")
    vol = read_nifti(tmp_path / "pair.hdr")
    assert vol.shape == (3, 5, 4)
    assert vol.spacing_mm == pytest.approx((0.2, 0.3, 0.1))
    (tmp_path / "pair.img").unlink()
    with pytest.raises(CorruptFileError, match="pair.hdr"):
        read_nifti(tmp_path / "pair.hdr")

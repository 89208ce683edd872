from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from octpipe.errors import CorruptFileError, FormatError, OctpipeError, UnsupportedFormatError
from octpipe.io.images import DEFAULT_SPACING_MM, read_bscan_image
from octpipe.io.nifti import OCTPIPE_INTENT_NAME, nifti_affine, nifti_label_map_values, read_nifti, write_nifti

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


# --------------------------------------------------------------------------- single B-scans (2-D, colour)

H, W = 24, 37  # B-scan height (depth rows) and width (A-scans): not square, so a transposition shows
LPS_IDENTITY = np.diag([-1.0, -1.0, 1.0, 1.0])  # what SimpleITK / ITK write for an identity direction
SWAP_XY = np.array([[0.0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])  # i -> world y, j -> world x


@pytest.fixture(scope="module")
def picture() -> dict[str, np.ndarray]:
    """An asymmetric RGB picture (rows = depth), its grey version, both as PIL would hand them over."""
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    rgb[:4, :6] = (250, 10, 10)  # a red corner at the top left: flips and rotations cannot hide
    grey = rng.integers(0, 256, (H, W), dtype=np.uint8)
    grey[:4, :6] = 255
    return {"rgb": rgb, "grey": grey}


def _png_reference(tmp_path: Path, pixels: np.ndarray) -> np.ndarray:
    from PIL import Image

    path = tmp_path / ("ref-rgb.png" if pixels.ndim == 3 else "ref-grey.png")
    Image.fromarray(pixels).save(path)
    vol = read_bscan_image(path)
    assert vol.shape == (1, H, W) and vol.invalid is None
    return vol.data


def _rgb24(rgb_hwc: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (W, H) RGB24 structured array (x = column), as nibabel writes RGB24."""
    out = np.zeros((W, H), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    for c, name in enumerate("RGB"):
        out[name] = rgb_hwc[..., c].T
    return out


# name -> (source picture, function making the NIfTI array, affine). The PNG is array[row, col]; NIfTI
# B-scans are stored array[x, y] (x = column), as nnU-Net / ITK conversions keep them.
LAYOUTS = {
    "grey-2d": ("grey", lambda g: g.T, np.eye(4)),
    "grey-2d-itk-lps": ("grey", lambda g: g.T, LPS_IDENTITY),
    "grey-singleton-last": ("grey", lambda g: g.T[:, :, None], LPS_IDENTITY),
    "grey-singleton-middle": ("grey", lambda g: g.T[:, None, :], np.eye(4)),
    "grey-singleton-first": ("grey", lambda g: g.T[None], np.eye(4)),
    "grey-rows-flipped-by-affine": ("grey", lambda g: g.T[:, ::-1], np.diag([1.0, -1.0, 1.0, 1.0])),
    "grey-row-major-by-affine": ("grey", lambda g: g, SWAP_XY),
    "rgb-last": ("rgb", lambda c: c.transpose(1, 0, 2), np.eye(4)),
    "rgb-last-float": ("rgb", lambda c: c.transpose(1, 0, 2).astype(np.float32), np.eye(4)),
    "rgba-last": ("rgb", lambda c: np.concatenate([c, np.full((H, W, 1), 9, np.uint8)], 2).transpose(1, 0, 2),
                  np.eye(4)),
    "rgb-first": ("rgb", lambda c: c.transpose(2, 1, 0), np.eye(4)),
    "rgb-last-row-major-by-affine": ("rgb", lambda c: c, SWAP_XY),
    "rgb-vector-5d": ("rgb", lambda c: c.transpose(1, 0, 2)[:, :, None, None, :], np.eye(4)),
    "rgb24": ("rgb", _rgb24, np.eye(4)),
    "rgb24-singleton": ("rgb", lambda c: _rgb24(c)[:, :, None], LPS_IDENTITY),
}


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_bscan_reads_like_its_png(tmp_path: Path, picture: dict, layout: str, suffix: str) -> None:
    source, make, affine = LAYOUTS[layout]
    expected = _png_reference(tmp_path, picture[source])
    img = nib.Nifti1Image(make(picture[source]), affine)
    if layout == "rgb-vector-5d":
        img.header.set_intent("vector")
    path = tmp_path / f"{layout}{suffix}"
    nib.save(img, path)
    vol = read_nifti(path)
    assert vol.shape == (1, H, W)
    np.testing.assert_array_equal(vol.data, expected)  # exact: same grey values, same orientation
    assert vol.scan_pattern == "line"
    assert vol.meta["octpipe_layout"] is False
    assert vol.meta["channels"] == (1 if source == "grey" else 4 if "rgba" in layout else 3)


def test_rgb24_datatype_is_written_as_rgb(tmp_path: Path, picture: dict) -> None:
    nib.save(nib.Nifti1Image(_rgb24(picture["rgb"]), np.eye(4)), tmp_path / "rgb24.nii")
    assert int(nib.load(tmp_path / "rgb24.nii").header["datatype"]) == 128  # NIFTI_TYPE_RGB24
    assert read_nifti(tmp_path / "rgb24.nii").meta["channels"] == 3


def test_orientation_is_recorded(tmp_path: Path, picture: dict) -> None:
    grey = picture["grey"]
    cases = {"index": (grey.T, np.eye(4)), "transposed": (grey, SWAP_XY),
             "rows reversed": (grey.T, np.diag([-1.0, 1.0, 1.0, 1.0]))}
    for expected, (arr, affine) in cases.items():
        nib.save(nib.Nifti1Image(arr, affine), tmp_path / "o.nii")
        vol = read_nifti(tmp_path / "o.nii")
        assert vol.meta["orientation"] == expected
        if expected == "rows reversed":  # one axis reversed: depth is turned back to run down
            np.testing.assert_array_equal(vol.data[0], grey[::-1].astype(np.float32))


def test_colour_becomes_grey_like_images(tmp_path: Path) -> None:
    equal = np.full((40, 30, 3), 1234.5, np.float32)  # equal channels keep their value exactly
    equal[5, 7] = 77.25
    nib.save(nib.Nifti1Image(equal, np.eye(4)), tmp_path / "equal.nii")
    vol = read_nifti(tmp_path / "equal.nii")
    assert vol.shape == (1, 30, 40)
    assert vol.data[0, 7, 5] == np.float32(77.25) and vol.data[0, 0, 0] == np.float32(1234.5)
    colour = np.zeros((40, 30, 3), np.float32)
    colour[..., 0], colour[..., 1], colour[..., 2] = 100.0, 50.0, 10.0
    colour[0, 0] = (0, 0, 200)  # > 16 distinct values are not needed for float data
    nib.save(nib.Nifti1Image(colour, np.eye(4)), tmp_path / "colour.nii")
    grey = read_nifti(tmp_path / "colour.nii").data[0]
    assert grey[1, 1] == pytest.approx(0.299 * 100 + 0.587 * 50 + 0.114 * 10)
    assert grey[0, 0] == pytest.approx(0.114 * 200)


@pytest.mark.parametrize("n_bscans", [3, 4])
def test_small_octpipe_volume_stays_a_volume(tmp_path: Path, n_bscans: int) -> None:
    data = np.random.default_rng(n_bscans).random((n_bscans, 40, 32)).astype(np.float32)
    vol = read_nifti(write_nifti(tmp_path / "small.nii.gz", data, spacing_mm=SPACING))
    assert vol.shape == (n_bscans, 40, 32)
    np.testing.assert_array_equal(vol.data, data)
    assert vol.scan_pattern == "volume" and vol.meta["channels"] == 1


@pytest.mark.parametrize("shape", [(6, 40, 3), (6, 4, 32)])  # 3 A-scans / 4 depth rows: a 3-4 axis first/last
@pytest.mark.parametrize("keep_intent", [True, False])
def test_octpipe_volume_with_a_colour_sized_axis_stays_a_volume(tmp_path: Path, shape: tuple, keep_intent: bool
                                                                ) -> None:
    data = np.random.default_rng(0).random(shape).astype(np.float32)
    path = write_nifti(tmp_path / "v.nii", data, spacing_mm=SPACING)
    assert 3 <= min(nib.load(path).shape[0], nib.load(path).shape[2]) <= 4  # looks like a colour axis by shape
    if not keep_intent:  # a tool that re-saved the file dropped the intent: octpipe's affine still tells
        img = nib.load(path)
        img.header["intent_name"] = b""
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj), img.affine, img.header), tmp_path / "resaved.nii")
        path = tmp_path / "resaved.nii"
    vol = read_nifti(path)
    assert vol.shape == shape
    np.testing.assert_array_equal(vol.data, data)


def test_same_shape_without_octpipe_marks_is_colour(tmp_path: Path) -> None:
    arr = np.random.default_rng(0).random((40, 6, 3)).astype(np.float32)  # (x, y, 3) with an identity affine
    nib.save(nib.Nifti1Image(arr, np.eye(4)), tmp_path / "c.nii")
    vol = read_nifti(tmp_path / "c.nii")
    assert vol.shape == (1, 6, 40) and vol.meta["channels"] == 3


def test_foreign_volume_of_three_bscans_is_a_volume(tmp_path: Path) -> None:
    arr = np.random.default_rng(1).random((32, 3, 40)).astype(np.float32)  # B-scan axis (j) of length 3
    nib.save(nib.Nifti1Image(arr, np.eye(4)), tmp_path / "three.nii")
    vol = read_nifti(tmp_path / "three.nii")
    assert vol.shape == (3, 40, 32)
    np.testing.assert_array_equal(vol.data, arr.transpose(1, 2, 0))


def test_single_bscan_spacing_from_a_known_unit(tmp_path: Path) -> None:
    arr = np.random.default_rng(2).random((W, H)).astype(np.float32)
    for unit, sizes in (("mm", (0.0113, 0.00387)), ("micron", (11.3, 3.87)), ("meter", (1.13e-5, 3.87e-6))):
        img = nib.Nifti1Image(arr, np.diag([*sizes, 1.0, 1.0]))
        img.header.set_xyzt_units(xyz=unit)
        nib.save(img, tmp_path / "s.nii")
        vol = read_nifti(tmp_path / "s.nii")
        assert vol.spacing_source == "file", unit
        assert vol.spacing_mm == pytest.approx((0.0, 0.00387, 0.0113)), unit
    nib.save(nib.Nifti1Image(arr[:, :, None], np.diag([0.02, 0.005, 999.0, 1.0])), tmp_path / "t.nii")
    assert read_nifti(tmp_path / "t.nii").spacing_mm == pytest.approx((0.0, 0.005, 0.02))  # unknown unit, affine: mm


def test_single_bscan_spacing_follows_a_transposition(tmp_path: Path) -> None:
    arr = np.random.default_rng(2).random((H, W)).astype(np.float32)  # row-major, i = depth
    affine = SWAP_XY @ np.diag([0.004, 0.011, 1.0, 1.0])  # i (depth) 0.004 mm along y, j (column) 0.011 along x
    img = nib.Nifti1Image(arr, affine)
    img.header.set_xyzt_units(xyz="mm")
    nib.save(img, tmp_path / "rm.nii")
    vol = read_nifti(tmp_path / "rm.nii")
    np.testing.assert_array_equal(vol.data[0], arr)
    assert vol.spacing_mm == pytest.approx((0.0, 0.004, 0.011))


@pytest.mark.parametrize("case", ["identity", "itk-unit-pixels", "no-transform"])
def test_single_bscan_without_spacing_gets_the_default(tmp_path: Path, case: str) -> None:
    arr = np.random.default_rng(2).random((W, H)).astype(np.float32)
    if case == "identity":  # nibabel, nnU-Net: unit pixels, unknown unit
        img = nib.Nifti1Image(arr, np.eye(4))
    elif case == "itk-unit-pixels":  # SimpleITK: spacing 1 x 1 mm (999 along the singleton axis)
        img = nib.Nifti1Image(arr[:, :, None], np.diag([-1.0, -1.0, 999.0, 1.0]))
        img.header.set_xyzt_units(xyz="mm")
    else:  # no sform/qform, unknown unit: the pixdim says nothing usable
        img = nib.Nifti1Image(arr, None)
        img.header["pixdim"][1:3] = [0.01, 0.004]
    nib.save(img, tmp_path / "d.nii")
    vol = read_nifti(tmp_path / "d.nii")
    assert vol.spacing_source == "default"
    assert vol.spacing_mm == DEFAULT_SPACING_MM


def test_volume_spacing_in_micrometres_is_converted(tmp_path: Path) -> None:
    img = nib.Nifti1Image(np.random.default_rng(0).random((8, 3, 10)).astype(np.float32), np.diag([11.3, 120, 3.87, 1]))
    img.header.set_xyzt_units(xyz="micron")
    nib.save(img, tmp_path / "um.nii")
    vol = read_nifti(tmp_path / "um.nii")
    assert vol.spacing_mm == pytest.approx((0.12, 0.00387, 0.0113)) and vol.spacing_source == "file"


@pytest.mark.parametrize("layout", ["2d-uint8", "singleton-int16", "rgb-last-uint8", "rgb24", "volume-uint8"])
def test_label_map_is_refused(tmp_path: Path, layout: str) -> None:
    labels = np.random.default_rng(4).integers(0, 5, (W, H)).astype(np.uint8)  # 5 classes
    labels[0, 0], labels[1, 0], labels[2, 0], labels[3, 0], labels[4, 0] = 0, 1, 2, 3, 4
    arr = {"2d-uint8": labels, "singleton-int16": labels.astype(np.int16)[:, :, None],
           "rgb-last-uint8": np.stack([labels * 50] * 3, axis=-1), "volume-uint8": np.stack([labels] * 6, axis=1),
           "rgb24": _rgb24(np.stack([labels.T * 50] * 3, axis=-1))}[layout]
    nib.save(nib.Nifti1Image(arr, np.eye(4)), tmp_path / "labels.nii.gz")
    with pytest.raises(FormatError, match=r"labels\.nii\.gz: looks like a label map \(5 values\)"):
        read_nifti(tmp_path / "labels.nii.gz")
    assert nifti_label_map_values(tmp_path / "labels.nii.gz") == 5


def test_few_float_values_are_not_a_label_map(tmp_path: Path) -> None:
    arr = (np.arange(W * H).reshape(W, H) % 5).astype(np.float32)  # a float image is intensity, not labels
    nib.save(nib.Nifti1Image(arr, np.eye(4)), tmp_path / "f.nii")
    assert read_nifti(tmp_path / "f.nii").shape == (1, H, W)
    assert nifti_label_map_values(tmp_path / "f.nii") is None


def test_label_map_values_never_raises(tmp_path: Path, volume: np.ndarray) -> None:
    assert nifti_label_map_values(write_nifti(tmp_path / "v.nii", volume, spacing_mm=SPACING)) is None
    (tmp_path / "junk.nii").write_bytes(b"not nifti" * 50)
    assert nifti_label_map_values(tmp_path / "junk.nii") is None
    assert nifti_label_map_values(tmp_path / "missing.nii") is None


def test_discovery_skips_nifti_label_maps(tmp_path: Path, picture: dict) -> None:
    from octpipe.inputs import discover_inputs

    folder = tmp_path / "Dataset001"
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    nib.save(nib.Nifti1Image(picture["rgb"].transpose(1, 0, 2), np.eye(4)), folder / "imagesTr" / "oct_0000.nii.gz")
    labels = (np.arange(W * H).reshape(W, H) % 5).astype(np.uint8)
    nib.save(nib.Nifti1Image(labels, np.eye(4)), folder / "labelsTr" / "oct.nii.gz")
    inputs, rows = discover_inputs([folder])
    assert [Path(i.path).name for i in inputs] == ["oct_0000.nii.gz"]
    assert len(rows) == 1 and rows[0]["status"] == "skipped" and rows[0]["format"] == "nifti"
    assert rows[0]["error"] == "looks like a label map (5 values), not a B-scan"


def test_colour_bscan_nan_is_marked_invalid(tmp_path: Path) -> None:
    arr = np.random.default_rng(5).random((W, H, 3)).astype(np.float32)
    arr[3, 4, 1] = np.nan
    nib.save(nib.Nifti1Image(arr, np.eye(4)), tmp_path / "nan.nii")
    vol = read_nifti(tmp_path / "nan.nii")
    assert vol.invalid is not None and vol.invalid.sum() == 1 and vol.invalid[0, 4, 3]
    assert np.isfinite(vol.data).all()


@pytest.mark.parametrize("keep", [200, 352, 352 + 3 * W * H - 10])
def test_truncated_rgb24(tmp_path: Path, picture: dict, keep: int) -> None:
    nib.save(nib.Nifti1Image(_rgb24(picture["rgb"]), np.eye(4)), tmp_path / "rgb.nii")
    cut = tmp_path / "cut.nii"
    cut.write_bytes((tmp_path / "rgb.nii").read_bytes()[:keep])
    with pytest.raises(CorruptFileError, match="cut.nii") as info:
        read_nifti(cut)
    assert "\n" not in str(info.value)


def test_absurd_colour_dims_refused_before_allocation(tmp_path: Path, picture: dict) -> None:
    import struct

    nib.save(nib.Nifti1Image(picture["rgb"].transpose(1, 0, 2), np.eye(4)), tmp_path / "rgb.nii")
    raw = bytearray((tmp_path / "rgb.nii").read_bytes())
    raw[42:48] = struct.pack("<hhh", 30000, 30000, 3)  # dim[1..3]
    (tmp_path / "big.nii").write_bytes(bytes(raw))
    with pytest.raises(CorruptFileError, match="big.nii: header says"):
        read_nifti(tmp_path / "big.nii")

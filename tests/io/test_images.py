from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from octpipe.errors import CorruptFileError, FormatError, OctpipeError
from octpipe.io._common import file_sha256
from octpipe.io.images import DEFAULT_SPACING_MM, read_bscan_folder, read_bscan_image
from octpipe.io.writers.images import write_bscan_folder

REAL = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "real"
BILAL = REAL / "BilalHassan90_OCT-Biomarker-Segmentation"
ZEISS = REAL / "ashkan-abbasi66_OCTseg-Zeiss"


@pytest.fixture
def volume() -> np.ndarray:
    return np.random.default_rng(3).integers(0, 256, size=(3, 40, 32), dtype=np.uint8)


# ----------------------------------------------------------------- folder writer + reader


def test_folder_round_trip(tmp_path: Path, volume: np.ndarray) -> None:
    before = volume.copy()
    folder = write_bscan_folder(tmp_path / "scans", volume)
    np.testing.assert_array_equal(volume, before)  # input not mutated
    files = sorted(folder.iterdir())
    assert [p.name for p in files] == ["bscan_000.png", "bscan_001.png", "bscan_002.png"]
    for path in files:
        with Image.open(path) as img:
            assert img.mode == "L"
    vol = read_bscan_folder(folder)
    assert vol.shape == (3, 40, 32)
    assert vol.data.dtype == np.float32
    np.testing.assert_array_equal(vol.data, volume.astype(np.float32))
    assert vol.spacing_mm == DEFAULT_SPACING_MM
    assert vol.spacing_source == "default"
    assert vol.intensity == "display"
    assert vol.scan_pattern == "volume"
    assert vol.laterality is None
    assert vol.meta["bit_depth"] == 8
    assert vol.provenance is not None
    assert vol.provenance.sha256 == file_sha256(files)


def test_folder_writer_refuses_non_uint8(tmp_path: Path) -> None:
    for bad in (np.zeros((2, 4, 4), np.uint16), np.zeros((2, 4, 4), np.float32), np.zeros((4, 4), np.uint8)):
        with pytest.raises(ValueError):
            write_bscan_folder(tmp_path / "out", bad)


def test_folder_writer_overwrite(tmp_path: Path, volume: np.ndarray) -> None:
    folder = write_bscan_folder(tmp_path / "scans", volume)
    with pytest.raises(OctpipeError, match="overwrite"):
        write_bscan_folder(folder, volume[:2])
    write_bscan_folder(folder, volume[:2], overwrite=True)
    assert sorted(p.name for p in folder.iterdir()) == ["bscan_000.png", "bscan_001.png"]  # stale file removed
    np.testing.assert_array_equal(read_bscan_folder(folder).data, volume[:2].astype(np.float32))


def test_folder_natural_sort_and_filtering(tmp_path: Path) -> None:
    for k in (1, 2, 10):
        Image.fromarray(np.full((6, 5), k, np.uint8)).save(tmp_path / f"Image {k}.PNG")
    (tmp_path / "notes.txt").write_text("ignored")
    (tmp_path / ".hidden.png").write_bytes(b"ignored")
    vol = read_bscan_folder(tmp_path)
    assert vol.data[:, 0, 0].tolist() == [1, 2, 10]


def test_folder_with_odd_size_names_the_file(tmp_path: Path, volume: np.ndarray) -> None:
    folder = write_bscan_folder(tmp_path / "scans", volume)
    Image.fromarray(np.zeros((40, 31), np.uint8)).save(folder / "bscan_003.png")
    with pytest.raises(CorruptFileError, match="bscan_003.png") as info:
        read_bscan_folder(folder)
    assert info.value.path is not None and info.value.path.name == "bscan_003.png"


def test_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(FormatError):
        read_bscan_folder(tmp_path)  # empty
    with pytest.raises(FileNotFoundError):
        read_bscan_folder(tmp_path / "missing")
    (tmp_path / "fake.png").write_bytes(b"not an image at all")
    with pytest.raises(FormatError, match="fake.png"):
        read_bscan_folder(tmp_path)


def test_single_image_folder_is_a_line(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((8, 6), np.uint8)).save(tmp_path / "only.bmp")
    vol = read_bscan_folder(tmp_path)
    assert vol.shape == (1, 8, 6) and vol.scan_pattern == "line"


# ----------------------------------------------------------------- single images


def test_rgb_and_rgba_become_luminance(tmp_path: Path) -> None:
    rgb = np.zeros((4, 6, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 100, 50
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    rgba = np.concatenate([rgb, np.full((4, 6, 1), 7, np.uint8)], axis=-1)
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    expected = 0.299 * 200 + 0.587 * 100 + 0.114 * 50
    for name in ("rgb.png", "rgba.png"):
        vol = read_bscan_image(tmp_path / name)
        assert vol.shape == (1, 4, 6)
        np.testing.assert_allclose(vol.data, expected, rtol=1e-6)


def test_grey_stored_as_rgb_keeps_values(tmp_path: Path, volume: np.ndarray) -> None:
    Image.fromarray(np.repeat(volume[0][..., None], 3, axis=-1)).save(tmp_path / "grey_rgb.png")
    np.testing.assert_array_equal(read_bscan_image(tmp_path / "grey_rgb.png").data[0], volume[0])


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16bit_values_are_kept(tmp_path: Path, suffix: str) -> None:
    data = (np.arange(40 * 32, dtype=np.uint16).reshape(40, 32) * 51).astype(np.uint16)
    Image.fromarray(data).save(tmp_path / f"deep{suffix}")
    vol = read_bscan_image(tmp_path / f"deep{suffix}")
    np.testing.assert_array_equal(vol.data[0], data.astype(np.float32))
    assert vol.meta["bit_depth"] == 16
    assert vol.data.max() > 255  # not rescaled to 8 bits


def test_multipage_tiff_is_a_volume(tmp_path: Path, volume: np.ndarray) -> None:
    tifffile.imwrite(tmp_path / "stack.tif", volume, photometric="minisblack")
    vol = read_bscan_image(tmp_path / "stack.tif")
    assert vol.shape == (3, 40, 32)
    np.testing.assert_array_equal(vol.data, volume.astype(np.float32))
    assert vol.scan_pattern == "volume"
    assert vol.provenance is not None and vol.provenance.format == "tiff"


def test_multipage_tiff_in_a_folder_is_refused(tmp_path: Path, volume: np.ndarray) -> None:
    tifffile.imwrite(tmp_path / "stack.tif", volume, photometric="minisblack")
    with pytest.raises(CorruptFileError, match="stack.tif"):
        read_bscan_folder(tmp_path)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP", "TIFF"])
def test_formats_and_suffix_independence(tmp_path: Path, volume: np.ndarray, fmt: str) -> None:
    path = tmp_path / "scan.img"  # the content decides the format, not the name
    Image.fromarray(volume[0]).save(path, format=fmt)
    vol = read_bscan_image(path)
    assert vol.shape == (1, 40, 32)
    if fmt != "JPEG":
        np.testing.assert_array_equal(vol.data[0], volume[0])


def test_image_errors(tmp_path: Path, volume: np.ndarray) -> None:
    (tmp_path / "junk.png").write_bytes(b"\x00" * 100)
    with pytest.raises(FormatError, match="junk.png"):
        read_bscan_image(tmp_path / "junk.png")
    Image.fromarray(volume[0]).save(tmp_path / "full.png")
    raw = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CorruptFileError, match="cut.png"):
        read_bscan_image(tmp_path / "cut.png")
    with pytest.raises(FileNotFoundError):
        read_bscan_image(tmp_path / "missing.png")
    with pytest.raises(FormatError):
        read_bscan_image(tmp_path)


# ----------------------------------------------------------------- real exported scans


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real data not available: {path}")
    return path


def test_real_raw_scans() -> None:
    folder = _require(BILAL / "Raw Scans")
    files = sorted(p for p in folder.iterdir() if p.is_file())
    assert len(files) == 20
    for path in files:
        vol = read_bscan_image(path)
        with Image.open(path) as img:
            width, height = img.size
        assert vol.shape == (1, height, width), path.name
        assert vol.data.dtype == np.float32
        assert 0 <= vol.data.min() and vol.data.max() <= 255
        assert vol.spacing_source == "default" and vol.scan_pattern == "line"


def test_real_rgb_jpeg_becomes_grey() -> None:
    path = _require(BILAL / "Raw Scans" / "Cirrus_1.jpeg")
    with Image.open(path) as img:
        assert img.mode == "RGB"
        grey = np.asarray(img.convert("L"), dtype=np.float32)
    vol = read_bscan_image(path)
    assert vol.shape == (1, *grey.shape)
    np.testing.assert_allclose(vol.data[0], grey, atol=0.51)  # PIL rounds the same luminance


def test_real_volume_folder() -> None:
    folder = _require(BILAL / "OCT Volumes" / "1" / "Raw Scans")
    vol = read_bscan_folder(folder)
    assert vol.shape[0] == 19
    with Image.open(folder / "Image 1.TIFF") as img:
        width, height = img.size
        first = np.asarray(img, dtype=np.float32)
    assert vol.shape == (19, height, width)
    valid = ~vol.invalid[0] if vol.invalid is not None else np.ones(first.shape, bool)
    np.testing.assert_array_equal(vol.data[0][valid], first[valid])  # natural sort: Image 1 first, not Image 10
    with Image.open(folder / "Image 2.TIFF") as img:
        second = np.asarray(img, dtype=np.float32)
        valid = ~vol.invalid[1] if vol.invalid is not None else np.ones(first.shape, bool)
        np.testing.assert_array_equal(vol.data[1][valid], second[valid])
    assert vol.scan_pattern == "volume"


def test_real_spectralis_white_fill_is_invalid() -> None:
    """Heyex's white fill beside a tilted scan is marked invalid; the scan itself is not."""
    path = _require(BILAL / "Raw Scans" / "Spectralis_1.tif")
    with Image.open(path) as img:
        grey = np.asarray(img.convert("L"), dtype=np.float32)
    vol = read_bscan_image(path)
    assert vol.invalid is not None
    inv = vol.invalid[0]
    white, black = grey >= 250, grey <= 5
    assert inv[:40].sum() > 5000  # the white wedge along the top
    assert np.mean(inv[:40][white[:40]]) > 0.95
    assert np.mean((white | black)[inv]) > 0.9  # and black padding at the right edge (plus a 2-px margin)
    assert inv[100:400, 755:].mean() > 0.5
    assert not inv[100:400, :740].any()  # retina and choroid untouched
    assert (vol.data[0][inv] == 0).all()
    assert vol.meta["fill_fraction"] == pytest.approx(inv.mean())


@pytest.mark.parametrize("value", [255, 0, 128])
@pytest.mark.parametrize("jpeg", [False, True])
def test_fill_regions_of_any_value_are_found(tmp_path: Path, value: int, jpeg: bool) -> None:
    rng = np.random.default_rng(3)
    img = np.clip(rng.gamma(1.5, 25.0, size=(200, 300)), 0, 254).astype(np.uint8)  # speckle everywhere
    yy, xx = np.mgrid[:200, :300]
    wedge = yy < 30 - xx * 0.1  # a rotation wedge along the top
    pad = (xx >= 270) & (yy >= 60)  # padding on the right
    img[wedge | pad] = value
    path = tmp_path / ("b.jpg" if jpeg else "b.png")
    Image.fromarray(img).save(path, quality=90) if jpeg else Image.fromarray(img).save(path)
    inv = read_bscan_image(path).invalid
    assert inv is not None
    fill = wedge | pad
    # all of the fill, except at most a 2-px JPEG fringe; nothing of the speckle beyond fringe and margin
    from scipy import ndimage as ndi
    core = ndi.binary_erosion(fill, iterations=2, border_value=1)
    outside = ~ndi.binary_dilation(fill, iterations=6)  # fringe (3 px) and margin (2 px) allowed
    assert inv[0][core].mean() > 0.95  # JPEG ringing at mid-grey reaches a few px further
    assert not inv[0][outside].any()


def test_speckle_only_image_has_no_fill(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    img = np.clip(rng.gamma(1.5, 25.0, size=(120, 160)), 0, 255).astype(np.uint8)
    Image.fromarray(img).save(tmp_path / "s.png")
    assert read_bscan_image(tmp_path / "s.png").invalid is None


def test_wide_black_area_is_image_not_fill(tmp_path: Path) -> None:
    """A vitreous clipped to black by the export is dark image, not fill (only black strips are)."""
    rng = np.random.default_rng(5)
    img = np.clip(rng.gamma(1.5, 25.0, size=(200, 300)), 1, 255).astype(np.uint8)
    img[:80] = 0  # 40 % of the height: a clipped vitreous
    Image.fromarray(img).save(tmp_path / "v.png")
    assert read_bscan_image(tmp_path / "v.png").invalid is None


def test_real_zeiss_bmp() -> None:
    files = sorted(_require(ZEISS).rglob("*.bmp"))
    assert files
    for path in files:
        vol = read_bscan_image(path)
        with Image.open(path) as img:
            width, height = img.size
        assert vol.shape == (1, height, width)
        assert vol.provenance is not None and vol.provenance.format == "bmp"

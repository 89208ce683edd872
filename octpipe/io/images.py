"""Exported B-scan images: single files, multi-page TIFFs and folders of B-scans.

Readers
    :func:`read_bscan_image` reads one PNG, JPEG, TIFF or BMP file; a multi-page
    TIFF becomes a volume with one page per B-scan. :func:`read_bscan_folder` reads
    every PNG/JPEG/TIFF/BMP in a folder, in natural sort order (``Image 2`` before
    ``Image 10``), as one volume.

Conventions
    - Each image is one B-scan: rows are the axial direction (y), columns the A-scans
      (x). The volume is ``(n_bscans, n_axial, n_ascans)``.
    - Colour images (RGB, RGBA, palette, CMYK) become grey by ITU-R BT.601 luminance,
      ``0.299 R + 0.587 G + 0.114 B``, computed in float (not rounded); alpha is
      dropped. An image whose three channels are equal keeps its values exactly.
    - Values are never rescaled: an 8-bit image holds 0..255, a 16-bit image keeps
      its 0..65535 values, both as float32. ``meta["bit_depth"]`` records the
      source depth (8, 16, 32, or 1 for bilevel images) so later stages know the
      range; ``intensity`` is ``"display"``.
    - Image files carry no geometry, so ``spacing_mm`` is :data:`DEFAULT_SPACING_MM`
      (Spectralis-like) with ``spacing_source="default"``; laterality is unknown.
    - **Fill regions** are marked invalid (``OctVolume.invalid``, data 0 there): the
      constant areas that exports put outside the scanned field (Heyex's white fill
      beside a tilted scan, black or grey padding, rotation wedges). See
      :func:`fill_mask`: a region is fill when it is flat (no speckle: local standard
      deviation under :data:`FILL_FLAT_STD` of full scale), touches the image border,
      and covers at least :data:`FILL_MIN_FRACTION` of the image; the JPEG fringe
      around it, within :data:`FILL_FRINGE_TOLERANCE` of its value, is included. Real
      tissue and vitreous carry speckle, so they are not flat; a black area counts as
      fill only as a strip along the border (a vitreous or choroid clipped to black by
      the export's display mapping is wide, and is image).

Writer
    :func:`octpipe.io.writers.images.write_bscan_folder` writes ``bscan_000.png``,
    ``bscan_001.png``, ... as 8-bit greyscale PNGs, which :func:`read_bscan_folder` reads
    back exactly.
"""

from __future__ import annotations

import re
import struct
from pathlib import Path

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageSequence, UnidentifiedImageError

from octpipe.errors import CorruptFileError, FormatError, OctpipeError, UnsupportedFormatError
from octpipe.io._common import (
    DEFLATE_MAX_RATIO,
    BoundedReader,
    file_sha256,
    make_provenance,
)
from octpipe.volume import OctVolume

__all__ = ["read_bscan_image", "read_bscan_folder", "fill_mask", "DEFAULT_SPACING_MM",
           "IMAGE_SUFFIXES"]

#: Spacing (between B-scans, axial, lateral) in mm used when a file has none:
#: a Heidelberg Spectralis 49-line, 20x20 degree macular volume (0.12 mm between
#: B-scans, 3.87 um axial, 11.3 um lateral).
DEFAULT_SPACING_MM: tuple[float, float, float] = (0.12, 0.00387, 0.0113)

#: File suffixes (lower case) that :func:`read_bscan_folder` picks up.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")

#: Local standard deviation (fraction of full scale, 5x5 window) below which pixels are flat.
FILL_FLAT_STD = 0.006
#: Smallest fill region, as a fraction of the image.
FILL_MIN_FRACTION = 0.002
#: Flat regions at most this dark (fraction of full scale) are fill only as a strip along
#: the border (padding, a rotation wedge): no wider or taller than :data:`FILL_DARK_STRIP`.
FILL_DARK_LEVEL = 0.03
#: Largest extent of a dark fill strip, as a fraction of the image's height or width.
FILL_DARK_STRIP = 0.2
#: Pixels next to a fill region within this fraction of full scale of its value join it.
FILL_FRINGE_TOLERANCE = 0.06
#: Width in pixels of that fringe.
FILL_FRINGE_PX = 3
#: Pixels added all round a fill region whatever their value (the JPEG fringe at its edge).
FILL_MARGIN_PX = 2

_LUMA = (0.299, 0.587, 0.114)
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def _luminance(pixels: npt.NDArray[np.generic]) -> npt.NDArray[np.float32]:
    """Grey values of an ``(..., samples)`` colour array, ITU-R BT.601 weights.

    Only the first three samples are used (alpha is dropped). When the three
    channels are equal the values come back exactly.
    """
    rgb = pixels[..., :3]
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    if np.array_equal(r, g) and np.array_equal(g, b):
        return r.astype(np.float32)
    gray = _LUMA[0] * r.astype(np.float64) + _LUMA[1] * g.astype(np.float64) + _LUMA[2] * b.astype(np.float64)
    return gray.astype(np.float32)


def _natural_key(name: str) -> list[tuple[int, int | str]]:
    """Sort key that orders embedded numbers by value (``a2`` < ``a10``)."""
    parts = re.split(r"(\d+)", name.lower())
    return [(0, int(p)) if p.isdigit() else (1, p) for p in parts if p != ""]


def _bit_depth(dtype: np.dtype) -> int:
    return 1 if dtype == np.bool_ else 8 * dtype.itemsize


def _is_tiff(path: Path) -> bool:
    with open(path, "rb") as fh:
        head = fh.read(4)
    return head in _TIFF_MAGIC


def _check_decoded_size(path: Path, n_bytes: int, *, compressed: bool) -> None:
    """Refuse an image whose header promises more pixels than the file can hold (before decoding it)."""
    size = path.stat().st_size
    limit = size * DEFLATE_MAX_RATIO if compressed else size
    if n_bytes <= 0 or n_bytes > limit:
        raise CorruptFileError(f"image header promises {n_bytes} bytes of pixels, which a {size}-byte file "
                               "cannot hold", path)


def _tiff_pages(path: Path) -> tuple[list[npt.NDArray[np.float32]], int]:
    """Pages of a TIFF as 2-D float32 arrays, and the source bit depth (tifffile)."""
    import tifffile

    frames: list[npt.NDArray[np.float32]] = []
    depth = 8
    with tifffile.TiffFile(path) as tif:
        for page in tif.pages:
            if getattr(page, "is_reduced", False):  # thumbnails / pyramid levels
                continue
            _check_decoded_size(path, int(np.prod(page.shape, dtype=np.int64)) * np.dtype(page.dtype).itemsize
                                if page.dtype is not None else 0, compressed=int(page.compression) != 1)
            arr = page.asarray()
            axes = page.axes
            photometric = int(page.photometric)
            if photometric == 3:  # PALETTE: look the indices up in the colour map
                cmap = page.colormap
                if cmap is None:
                    raise CorruptFileError("palette TIFF without a colour map", path)
                arr = np.moveaxis(np.asarray(cmap)[:, arr], 0, -1)
                axes = axes + "S"
                photometric = 2
            if "S" in axes:
                arr = np.moveaxis(arr, axes.index("S"), -1)
                axes = axes.replace("S", "") + "S"
            squeeze = tuple(i for i, a in enumerate(axes) if a not in "YXS" and arr.shape[i] == 1)
            arr = np.squeeze(arr, axis=squeeze) if squeeze else arr
            axes = "".join(a for i, a in enumerate(axes) if i not in squeeze)
            if axes not in ("YX", "YXS"):
                raise UnsupportedFormatError(f"TIFF page with axes {page.axes!r} is not a 2-D image", path)
            depth = _bit_depth(arr.dtype)
            if axes == "YXS":
                if arr.shape[-1] >= 3 and photometric in (2, 6):  # RGB / YCbCr decoded to RGB
                    gray = _luminance(arr)
                elif arr.shape[-1] in (1, 2) and photometric in (0, 1):  # grey (+ alpha)
                    gray = arr[..., 0].astype(np.float32)
                else:
                    raise UnsupportedFormatError(
                        f"TIFF photometric {page.photometric!r} with {arr.shape[-1]} samples is not supported", path
                    )
            elif photometric == 1:  # MINISBLACK
                gray = arr.astype(np.float32)
            elif photometric == 0:  # MINISWHITE: 0 is white; flip to the usual sense (max - value)
                if arr.dtype == np.bool_:
                    gray = (~arr).astype(np.float32)
                elif arr.dtype.kind == "u":
                    gray = (float(np.iinfo(arr.dtype).max) - arr.astype(np.float64)).astype(np.float32)
                else:
                    raise UnsupportedFormatError(f"MINISWHITE TIFF of {arr.dtype} is not supported", path)
            else:
                raise UnsupportedFormatError(f"TIFF photometric {page.photometric!r} is not supported", path)
            frames.append(gray)
    if not frames:
        raise CorruptFileError("TIFF has no image pages", path)
    return frames, depth


def _pil_frame(img: Image.Image, path: Path) -> tuple[npt.NDArray[np.float32], int]:
    """One PIL frame as a 2-D float32 array and its bit depth."""
    mode = img.mode
    if mode in ("1",):
        return np.asarray(img, dtype=bool).astype(np.float32), 1
    if mode == "L":
        return np.asarray(img).astype(np.float32), 8
    if mode == "LA":
        return np.asarray(img)[..., 0].astype(np.float32), 8
    if mode in ("RGB", "RGBA", "RGBX"):
        return _luminance(np.asarray(img)), 8
    if mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV"):
        return _luminance(np.asarray(img.convert("RGB"))), 8
    if mode.startswith("I;16"):
        return np.asarray(img).astype(np.float32), 16
    if mode in ("I", "F"):
        arr = np.asarray(img)
        return arr.astype(np.float32), 32
    raise UnsupportedFormatError(f"image mode {mode!r} is not supported", path)


def _read_frames(path: Path) -> tuple[list[npt.NDArray[np.float32]], int, str]:
    """All frames of one image file, its bit depth and its format name."""
    try:
        if _is_tiff(path):
            try:
                frames, depth = _tiff_pages(path)
                return frames, depth, "tiff"
            except OctpipeError:
                raise
            except Exception:  # e.g. a compression tifffile cannot decode here: let Pillow try
                pass
        # BoundedReader: a damaged chunk length must not make Pillow allocate more than the file holds
        with BoundedReader(path) as fh, Image.open(fh) as img:
            fmt = (img.format or "image").lower()
            width, height = img.size
            bands = len(img.getbands())
            _check_decoded_size(path, width * height * bands * (2 if img.mode.startswith("I;16") else 1)
                                // (8 if img.mode == "1" else 1), compressed=True)
            if fmt == "tiff":
                out = [_pil_frame(frame, path) for frame in ImageSequence.Iterator(img)]
                return [f for f, _ in out], out[0][1], fmt
            img.load()
            frame, depth = _pil_frame(img, path)
            return [frame], depth, fmt
    except (OctpipeError, FileNotFoundError):
        raise
    except UnidentifiedImageError as exc:
        raise FormatError("not a readable image (PNG, JPEG, TIFF or BMP)", path) from exc
    except Image.DecompressionBombError as exc:
        raise CorruptFileError(f"image too large to be a B-scan: {exc}", path) from exc
    except (OSError, ValueError, SyntaxError, EOFError, struct.error, MemoryError, OverflowError, TypeError,
            IndexError, KeyError, ZeroDivisionError) as exc:
        raise CorruptFileError(f"cannot decode image: {type(exc).__name__}: {exc}", path) from exc


def fill_mask(frame: npt.ArrayLike, *, full_scale: float = 255.0) -> npt.NDArray[np.bool_]:
    """Pixels of one B-scan image that are export fill, not image (see the module notes).

    Parameters
    ----------
    frame : array_like, shape (height, width)
        Grey values as stored.
    full_scale : float
        The value of white (255 for 8-bit, 65535 for 16-bit images).

    Returns
    -------
    ndarray of bool, shape (height, width)
        True on fill pixels.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> img = rng.integers(0, 120, size=(60, 80)).astype(np.float32)  # speckle
    >>> img[:20, :30] = 255.0  # a white wedge in the corner
    >>> m = fill_mask(img)
    >>> bool(m[:20, :30].all()), int(m[20:, :].sum() + m[:, 30:].sum())
    (True, 0)
    """
    from scipy import ndimage as ndi

    g = np.asarray(frame, dtype=np.float64)
    if g.ndim != 2 or min(g.shape) < 8 or not np.isfinite(g).all():
        return np.zeros(np.shape(g), dtype=bool)
    scale = max(float(full_scale), 1e-12)
    mean = ndi.uniform_filter(g, 5, mode="nearest")
    var = ndi.uniform_filter(g * g, 5, mode="nearest") - mean * mean
    flat = var < (FILL_FLAT_STD * scale) ** 2
    labels, n = ndi.label(flat)
    if n == 0:
        return np.zeros(g.shape, dtype=bool)
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    border = border[border > 0]
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    out = np.zeros(g.shape, dtype=bool)
    boxes = ndi.find_objects(labels)
    for lab in border[sizes[border] >= max(32, FILL_MIN_FRACTION * g.size)]:
        region = labels == lab
        value = float(np.median(g[region]))
        rows, cols = boxes[lab - 1]
        strip = (rows.stop - rows.start) <= FILL_DARK_STRIP * g.shape[0] or \
            (cols.stop - cols.start) <= FILL_DARK_STRIP * g.shape[1]
        if value <= FILL_DARK_LEVEL * scale and not strip:
            continue  # a wide dark area (a vitreous clipped to black) is image, not fill
        near = np.abs(g - value) <= FILL_FRINGE_TOLERANCE * scale
        out |= ndi.binary_dilation(region, structure=np.ones((3, 3), bool), iterations=FILL_FRINGE_PX,
                                    mask=near) | region
    if out.any() and FILL_MARGIN_PX > 0:  # JPEG ringing and speckle right at the fill boundary
        out = ndi.binary_dilation(out, structure=np.ones((3, 3), bool), iterations=FILL_MARGIN_PX)
    return out


def _volume(data: npt.NDArray[np.float32], *, depth: int, fmt: str, source: Path,
            reader: str, sha256: str | None) -> OctVolume:
    prov, vid = make_provenance(source, reader=reader, format=fmt, sha256=sha256)
    full_scale = float(2 ** depth - 1) if depth in (1, 8, 16) else float(np.nanmax(data)) if data.size else 1.0
    invalid = np.stack([fill_mask(frame, full_scale=full_scale) for frame in data])
    if invalid.any():
        data = np.where(invalid, np.float32(0.0), data)
    return OctVolume(
        data=data,
        invalid=invalid if invalid.any() else None,
        spacing_mm=DEFAULT_SPACING_MM,
        spacing_source="default",
        laterality=None,
        scan_pattern="volume" if data.shape[0] > 1 else "line",
        vendor="unknown",
        intensity="display",
        volume_id=vid,
        provenance=prov,
        meta={"bit_depth": depth, "n_bscans": int(data.shape[0]), "fill_fraction": float(invalid.mean())},
    )


def read_bscan_image(path: str | Path) -> OctVolume:
    """Read one exported B-scan image (or a multi-page TIFF) as an :class:`OctVolume`.

    Parameters
    ----------
    path : str or Path
        A PNG, JPEG, TIFF or BMP file. The format is taken from the file's content,
        not its name. Each page of a multi-page TIFF is one B-scan.

    Returns
    -------
    OctVolume
        ``data`` of shape ``(n_pages, height, width)``, float32, values as stored
        (grey from luminance for colour images); default spacing
        (``spacing_source="default"``), ``intensity="display"``,
        ``scan_pattern`` ``"line"`` (one image) or ``"volume"``,
        ``meta["bit_depth"]`` the source bit depth.

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist.
    FormatError
        The file is not an image, or ``path`` is a folder.
    CorruptFileError
        The image cannot be decoded (truncated), or the pages of a TIFF differ in size.
    UnsupportedFormatError
        The pixel layout (mode, photometric) is not supported.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> from PIL import Image
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "b.png"
    >>> Image.fromarray(np.zeros((40, 32), np.uint8)).save(p)
    >>> read_bscan_image(p).shape
    (1, 40, 32)
    """
    path = Path(path)
    if path.is_dir():
        raise FormatError("is a folder; use read_bscan_folder", path)
    frames, depth, fmt = _read_frames(path)
    shape = frames[0].shape
    if len(shape) != 2 or min(shape) < 1:
        raise CorruptFileError(f"decoded image has shape {shape}, not a 2-D B-scan", path)
    for i, frame in enumerate(frames):
        if frame.shape != shape:
            raise CorruptFileError(f"page {i} has size {frame.shape}, page 0 has {shape}", path)
    return _volume(np.stack(frames), depth=depth, fmt=fmt, source=path, reader="images", sha256=None)


def _read_single(path: Path) -> tuple[npt.NDArray[np.float32], int, str]:
    frames, depth, fmt = _read_frames(path)
    if len(frames) != 1:
        raise CorruptFileError(f"holds {len(frames)} pages; a B-scan folder needs one image per file", path)
    return frames[0], depth, fmt


def _list_images(folder: Path) -> list[Path]:
    files = [
        p for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
    ]
    return sorted(files, key=lambda p: _natural_key(p.name))


def read_bscan_folder(folder: str | Path) -> OctVolume:
    """Read a folder of exported B-scan images as one volume.

    Parameters
    ----------
    folder : str or Path
        A folder holding ``.png``, ``.jpg``, ``.jpeg``, ``.tif``, ``.tiff`` or
        ``.bmp`` files (any case), one B-scan each. Hidden files and other
        suffixes are ignored. B-scans are ordered by natural sort of the file
        names (``Image 2`` before ``Image 10``).

    Returns
    -------
    OctVolume
        ``data`` of shape ``(n_files, height, width)``, float32, values as stored;
        default spacing, ``intensity="display"``, ``scan_pattern`` ``"volume"``
        (more than one file) or ``"line"``. The provenance hash covers all files'
        bytes in order.

    Raises
    ------
    FileNotFoundError
        ``folder`` does not exist.
    FormatError
        ``folder`` is a file, holds no image files, or a file is not an image.
    CorruptFileError
        An image differs in size or bit depth from the first one (the message names
        it), holds several pages, or cannot be decoded.

    Examples
    --------
    >>> import tempfile
    >>> from octpipe.io.writers.images import write_bscan_folder
    >>> d = write_bscan_folder(tempfile.mkdtemp() + "/scans", np.zeros((3, 40, 32), np.uint8))
    >>> read_bscan_folder(d).shape
    (3, 40, 32)
    """
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"no such folder: {folder}")
    if not folder.is_dir():
        raise FormatError("not a folder", folder)
    files = _list_images(folder)
    if not files:
        raise FormatError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in the folder", folder)
    first, depth0, _ = _read_single(files[0])
    data = np.empty((len(files), *first.shape), dtype=np.float32)
    data[0] = first
    for i, path in enumerate(files[1:], start=1):
        frame, depth, _ = _read_single(path)
        if frame.shape != first.shape:
            raise CorruptFileError(
                f"image size {frame.shape[1]}x{frame.shape[0]} (WxH) differs from {files[0].name} "
                f"({first.shape[1]}x{first.shape[0]})", path)
        if depth != depth0:
            raise CorruptFileError(f"bit depth {depth} differs from {files[0].name} ({depth0})", path)
        data[i] = frame
    return _volume(data, depth=depth0, fmt="image-folder", source=folder, reader="image_folder",
                   sha256=file_sha256(files))

"""Fuzz the whole chain (read -> layers -> ingest -> patches -> export) with real B-scans gone wrong.

Where :mod:`octpipe.testing.fuzz` damages the *bytes* of files, this module damages the
*images* the way exports go wrong, writes each result as a real file and runs the real
commands on it through the in-process CLI entry point :func:`octpipe.cli.main`.

Sources
    A fixed sample of real B-scans from ``../shared/data`` (:func:`chain_sources`):
    Spectralis ``.vol`` files and the E2E B-scan (display domain of their linear data),
    the BilalHassan90 raw scans and its 19-B-scan volume, the Zeiss ONH images, and the
    first few OCTDL / Kermany / Kermany-lesion images of each cohort folder. Most cases
    shrink the B-scan first (block mean, longest side at most :data:`REDUCE_PX`), so that
    a run of thousands of cases fits in half an hour on two cores; a fraction keep the
    source size, and one ``blank_frame`` case in :data:`BIG_VOLUME_EVERY` is a volume of
    device size (:data:`BIG_VOLUME_FRAMES` full-size B-scans), where memory that grows
    with the input shows.

Mutations (:data:`MUTATIONS`; pure functions, never changing their input)
    ``crop_rows`` / ``crop_cols`` (a few rows or columns left), ``rotate_90``,
    ``rotate_small`` (1-15 degrees, the corners filled with a black or white wedge),
    ``pad_border`` (white or black borders), ``saturate`` (clipped high), ``jpeg_heavy``
    (JPEG quality 2-10), ``blank_frame`` (a folder of numbered PNG B-scans, one all black
    or all white), ``nan_inf`` (NaN/Inf in a float32 NIfTI), ``flip_vertical`` (upside
    down), ``narrow_16bit`` (16-bit PNG/TIFF holding e.g. 1000..1010), ``constant``,
    ``tiny`` (1x1 to 4x4), ``huge_aspect`` (e.g. 4 x 3000), ``rgb_unequal`` (colour with
    unequal channels) and ``one_row`` (1 pixel tall).

One case (:func:`run_case`)
    The case's file (or folder) is written in the caller's process; the command then runs
    in a fresh child process forked from a forkserver that has octpipe, torch and the
    readers imported, so every case starts from the same state, a hang can be killed and
    memory can be measured per case:

    - **hang**: no result within the command's time limit (:func:`time_limit`: a fixed part
      plus a part per MiB of input).
    - **memory**: the child's peak resident memory *growth* exceeds
      ``2 * input_bytes + ALLOWANCE_BYTES[command]``. The peak is the kernel's VmHWM after
      resetting it at the child's start (``/proc/self/clear_refs``; ``ru_maxrss`` where
      that is refused), so it counts every allocation (NumPy, torch, C libraries), not
      only Python's. ``input_bytes`` is the decoded input as float32 (4 bytes per grey
      pixel of every frame) or the file size, whichever is larger: what octpipe must hold
      at least once. The allowance covers what a command costs whatever its input (the
      pages of the preloaded libraries the child touches, lazy imports, the model, a
      Zarr store's buffers); it was measured on intact real B-scans and given room. A
      child whose resident memory passes four times its budget is killed (``memory``).
    - **traceback**: ``Traceback`` in the output, a line ``error: unexpected ...``
      (octpipe's marker for an unforeseen exception), or an exception escaping ``main``.
    - **crash**: the child died without reporting (a signal: segfault, abort, OOM kill).
    - **bad_exit**: neither a result (exit 0) nor exit 1 with an error line (``error: ``,
      ``failed: `` or an export's ``failed NAME: ...``), e.g. exit 2 or a silent exit 1.
    - **ok** (exit 0) and **error** (exit 1 with an error line) are the contract.

    ``traceback``, ``hang``, ``memory``, ``crash`` and ``bad_exit`` (:data:`BAD_OUTCOMES`)
    are bugs. For ``ok`` results the QC flags written by the command are collected
    (layers' ``qc``, the store's per-volume ``qc``, the export's ``qc_flags``);
    ``unflagged`` marks an ``ok`` on a degenerate input (no retina can be in it) that
    carries no QC flag: not a contract violation, but worth a look.

The benchmark (``benchmarks/chain_fuzz.py``) and the tests
(``tests/testing/test_chain_fuzz.py``) drive this module.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import math
import multiprocessing
import random
import re
import resource
import shutil
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "MUTATIONS", "COMMANDS", "OUTCOMES", "BAD_OUTCOMES", "DEGENERATE_MUTATIONS", "TIMEOUT_S", "TIMEOUT_S_PER_MIB",
    "ALLOWANCE_BYTES", "time_limit",
    "REDUCE_PX", "BIG_VOLUME_FRAMES", "BIG_VOLUME_EVERY", "DEFAULT_MODEL", "ChainSource", "chain_sources",
    "chain_cases", "case_pixels", "write_case", "run_case", "command_argv", "memory_budget", "crop_rows", "crop_cols",
    "rotate_90", "rotate_small", "pad_border", "saturate", "jpeg_artefacts", "blank_frame", "insert_non_finite",
    "flip_vertical", "narrow_range_16", "constant_image", "tiny_image", "huge_aspect", "rgb_unequal", "one_row",
]

#: The commands a case can run (``patches`` needs the store of a successful ``ingest``).
COMMANDS = ("layers", "ingest", "patches", "export")
#: Every outcome of :func:`run_case`; :data:`BAD_OUTCOMES` are bugs.
OUTCOMES = ("ok", "error", "traceback", "hang", "memory", "crash", "bad_exit")
BAD_OUTCOMES = ("traceback", "hang", "memory", "crash", "bad_exit")
#: Seconds a command may take before its case counts as a hang: this much plus
#: :data:`TIMEOUT_S_PER_MIB` per MiB of input (generous, for a loaded 2-core machine: a
#: 49-B-scan 496x768 volume, 71 MiB as float32, takes layers about 55 s and export about 50 s).
TIMEOUT_S = {"layers": 120.0, "ingest": 120.0, "patches": 60.0, "export": 240.0}
TIMEOUT_S_PER_MIB = {"layers": 4.0, "ingest": 4.0, "patches": 1.0, "export": 6.0}
#: Fixed part of the memory budget, bytes (see the module notes).
ALLOWANCE_BYTES = {"layers": 256 << 20, "ingest": 320 << 20, "patches": 192 << 20, "export": 768 << 20}
#: Longest side of a shrunk source B-scan, pixels.
REDUCE_PX = 320
#: B-scans of the device-size volumes that :func:`chain_cases` adds (a Spectralis macular volume has 49).
BIG_VOLUME_FRAMES = 49
#: One ``blank_frame`` case in this many is such a volume.
BIG_VOLUME_EVERY = 20
#: The bundled model that ``export`` cases use.
DEFAULT_MODEL = Path(__file__).resolve().parents[2] / "models" / "fanogan-phantom"
#: Mutations that leave nothing a retina could be found in (an ``ok`` there should carry a QC flag).
DEGENERATE_MUTATIONS = ("constant", "tiny", "one_row", "crop_rows")

_ERROR_LINE = re.compile(r"^\s*(error: |failed: |failed \S)")
#: Imported once by the forkserver, so that each case's child starts warm (pydantic, which typer
#: imports on first use, alone costs a child 0.3 s). A package reinstalled into the venv during a
#: long run then meets its stale half in the children (ImportError tracebacks): the benchmark
#: records such changes.
_PRELOAD = ["octpipe.cli", "octpipe.io", "octpipe.io.images", "octpipe.io.nifti", "octpipe.io.heyex_vol",
            "octpipe.io.heyex_e2e", "octpipe.io.dicom", "octpipe.pipeline", "octpipe.manifest",
            "octpipe.preprocess.prepare", "octpipe.preprocess.layers", "octpipe.preprocess.scale", "octpipe.patches",
            "octpipe.store", "octpipe.export.run", "octpipe.export.anomaly", "octpipe.export.dicom",
            "octpipe.export.report", "torch", "nibabel", "tifffile", "PIL.Image", "PIL.PngImagePlugin",
            "PIL.JpegImagePlugin", "PIL.TiffImagePlugin", "PIL.BmpImagePlugin", "scipy.ndimage", "scipy.sparse",
            "scipy.optimize", "zarr", "matplotlib", "matplotlib.pyplot", "pydicom", "highdicom", "pydantic",
            "typer.rich_utils", "octpipe.testing.chain_fuzz"]


# --------------------------------------------------------------------------- mutations


def _full_scale(image: npt.NDArray[Any]) -> float:
    if image.dtype == np.uint16:
        return 65535.0
    if image.dtype.kind == "f":
        finite = image[np.isfinite(image)]
        return 1.0 if finite.size == 0 or float(finite.max()) <= 1.0 else 255.0
    return 255.0


def crop_rows(image: npt.NDArray[Any], *, start: int, n_rows: int) -> npt.NDArray[Any]:
    """Keep ``n_rows`` rows from ``start`` (an export cropped to a sliver of depth).

    Examples
    --------
    >>> crop_rows(np.zeros((10, 4), np.uint8), start=8, n_rows=5).shape
    (2, 4)
    """
    if n_rows < 1 or not 0 <= start < image.shape[0]:
        raise ValueError(f"need n_rows >= 1 and 0 <= start < {image.shape[0]}, got {n_rows}, {start}")
    return image[start:start + n_rows].copy()


def crop_cols(image: npt.NDArray[Any], *, start: int, n_cols: int) -> npt.NDArray[Any]:
    """Keep ``n_cols`` columns (A-scans) from ``start``.

    Examples
    --------
    >>> crop_cols(np.zeros((10, 4), np.uint8), start=1, n_cols=2).shape
    (10, 2)
    """
    if n_cols < 1 or not 0 <= start < image.shape[1]:
        raise ValueError(f"need n_cols >= 1 and 0 <= start < {image.shape[1]}, got {n_cols}, {start}")
    return image[:, start:start + n_cols].copy()


def rotate_90(image: npt.NDArray[Any], *, k: int) -> npt.NDArray[Any]:
    """Rotate by ``k`` quarter turns (an export saved sideways).

    Examples
    --------
    >>> rotate_90(np.zeros((10, 4), np.uint8), k=1).shape
    (4, 10)
    """
    return np.ascontiguousarray(np.rot90(image, k=k, axes=(0, 1)))


def rotate_small(image: npt.NDArray[Any], *, angle_deg: float, fill: float) -> npt.NDArray[Any]:
    """Rotate by a small angle, the canvas grown and its corners filled with ``fill`` (the wedges).

    Examples
    --------
    >>> out = rotate_small(np.full((40, 60), 100, np.uint8), angle_deg=10.0, fill=255)
    >>> out.shape[0] > 40, int(out[0, 0])
    (True, 255)
    """
    from scipy import ndimage as ndi

    out = ndi.rotate(image.astype(np.float32), angle_deg, axes=(1, 0), reshape=True, order=1, mode="constant",
                     cval=float(fill))
    if image.dtype.kind in "ui":
        info = np.iinfo(image.dtype)
        return np.clip(np.round(out), info.min, info.max).astype(image.dtype)
    return out.astype(image.dtype)


def pad_border(image: npt.NDArray[Any], *, top: int, bottom: int, left: int, right: int,
               value: float) -> npt.NDArray[Any]:
    """Add constant borders (``value`` 0: black, full scale: white).

    Examples
    --------
    >>> pad_border(np.zeros((4, 4), np.uint8), top=1, bottom=0, left=2, right=0, value=255).shape
    (5, 6)
    """
    pad = ((top, bottom), (left, right)) + ((0, 0),) * (image.ndim - 2)
    return np.pad(image, pad, mode="constant", constant_values=value)


def saturate(image: npt.NDArray[Any], *, gain: float) -> npt.NDArray[Any]:
    """Multiply by ``gain`` and clip at full scale (an export with the contrast pushed too far).

    Examples
    --------
    >>> saturate(np.array([[10, 100, 200]], np.uint8), gain=2.0).tolist()
    [[20, 200, 255]]
    """
    top = _full_scale(image)
    out = np.clip(image.astype(np.float64) * gain, 0.0, top)
    return np.round(out).astype(image.dtype) if image.dtype.kind in "ui" else out.astype(image.dtype)


def jpeg_artefacts(image: npt.NDArray[np.uint8], *, quality: int) -> npt.NDArray[np.uint8]:
    """The image after a JPEG round trip at ``quality`` (2-10: blocks and ringing).

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> img = rng.integers(0, 255, (32, 32), dtype=np.uint8)
    >>> bool((jpeg_artefacts(img, quality=3) != img).mean() > 0.5)
    True
    """
    from PIL import Image

    if image.dtype != np.uint8:
        raise ValueError(f"JPEG needs uint8, got {image.dtype}")
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    with Image.open(buf) as img:
        return np.asarray(img).copy()


def blank_frame(frames: Sequence[npt.NDArray[Any]], *, index: int, value: float) -> list[npt.NDArray[Any]]:
    """The B-scans of a volume with frame ``index`` replaced by a constant (all black or all white).

    Examples
    --------
    >>> out = blank_frame([np.ones((2, 2), np.uint8)] * 3, index=1, value=0)
    >>> [int(f.max()) for f in out]
    [1, 0, 1]
    """
    if not 0 <= index < len(frames):
        raise ValueError(f"index must be in 0..{len(frames) - 1}, got {index}")
    out = [np.array(f, copy=True) for f in frames]
    out[index] = np.full_like(out[index], value)
    return out


def insert_non_finite(volume: npt.NDArray[np.floating], *, pattern: str, value: float, start: float = 0.0,
                      size: float = 0.1, seed: int = 0) -> npt.NDArray[np.float32]:
    """A float32 copy of ``volume`` (``(n, rows, cols)`` or 2-D) with NaN/Inf written into it.

    ``pattern``: ``rows`` (a band of rows in every frame), ``cols`` (a band of columns),
    ``scatter`` (a fraction ``size`` of the voxels), ``frame`` (the whole frame nearest
    ``start``), ``all`` (every voxel). ``start`` and ``size`` are fractions.

    Examples
    --------
    >>> v = insert_non_finite(np.zeros((2, 10, 10)), pattern="rows", value=float("nan"), start=0.5, size=0.2)
    >>> int(np.isnan(v).sum())
    40
    """
    out = np.array(volume, dtype=np.float32, copy=True)
    v3 = out if out.ndim == 3 else out[None]
    n, rows, cols = v3.shape
    if pattern == "rows":
        a = min(int(start * rows), rows - 1)
        v3[:, a:a + max(1, int(size * rows))] = value
    elif pattern == "cols":
        a = min(int(start * cols), cols - 1)
        v3[:, :, a:a + max(1, int(size * cols))] = value
    elif pattern == "scatter":
        rng = np.random.default_rng(seed)
        v3[rng.random(v3.shape) < size] = value
    elif pattern == "frame":
        v3[min(int(start * n), n - 1)] = value
    elif pattern == "all":
        v3[...] = value
    else:
        raise ValueError(f"pattern must be rows, cols, scatter, frame or all, got {pattern!r}")
    return out


def flip_vertical(image: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """The B-scan upside down (choroid on top).

    Examples
    --------
    >>> flip_vertical(np.array([[1], [2]], np.uint8)).ravel().tolist()
    [2, 1]
    """
    return np.ascontiguousarray(image[::-1])


def narrow_range_16(image: npt.NDArray[Any], *, low: int, span: int) -> npt.NDArray[np.uint16]:
    """A 16-bit image holding only ``low .. low + span`` (a raw export with the range unused).

    Examples
    --------
    >>> narrow_range_16(np.array([[0, 128, 255]], np.uint8), low=1000, span=10).tolist()
    [[1000, 1005, 1010]]
    """
    g = image.astype(np.float64) / max(_full_scale(image), 1e-12)
    return (low + np.round(np.clip(g, 0.0, 1.0) * span)).astype(np.uint16)


def constant_image(image: npt.NDArray[Any], *, value: float) -> npt.NDArray[Any]:
    """An image of the same shape and dtype holding ``value`` everywhere.

    Examples
    --------
    >>> constant_image(np.zeros((2, 3), np.uint8), value=7).tolist()
    [[7, 7, 7], [7, 7, 7]]
    """
    return np.full_like(image, value)


def _resample(image: npt.NDArray[Any], height: int, width: int) -> npt.NDArray[Any]:
    rows = np.minimum((np.arange(height) + 0.5) * image.shape[0] / height, image.shape[0] - 1).astype(int)
    cols = np.minimum((np.arange(width) + 0.5) * image.shape[1] / width, image.shape[1] - 1).astype(int)
    return np.ascontiguousarray(image[rows][:, cols])


def tiny_image(image: npt.NDArray[Any], *, size: int) -> npt.NDArray[Any]:
    """The image resampled (nearest) to ``size`` x ``size`` pixels.

    Examples
    --------
    >>> tiny_image(np.arange(100, dtype=np.uint8).reshape(10, 10), size=3).tolist()
    [[11, 15, 18], [51, 55, 58], [81, 85, 88]]
    """
    return _resample(image, size, size)


def huge_aspect(image: npt.NDArray[Any], *, height: int, width: int) -> npt.NDArray[Any]:
    """The image resampled (nearest) to an extreme shape such as 4 x 3000 or 3000 x 4.

    Examples
    --------
    >>> huge_aspect(np.zeros((10, 10), np.uint8), height=2, width=500).shape
    (2, 500)
    """
    return _resample(image, height, width)


def rgb_unequal(image: npt.NDArray[np.uint8], *, variant: str) -> npt.NDArray[np.uint8]:
    """An RGB image with unequal channels made from a grey one.

    ``variant``: ``tint`` (G and B darker, a sepia cast), ``shift`` (the channels offset
    by a few columns: a mis-registered colour export), ``red`` (only the red channel),
    ``inverted_blue`` (the blue channel inverted).

    Examples
    --------
    >>> out = rgb_unequal(np.full((2, 8), 200, np.uint8), variant="tint")
    >>> out.shape, out[0, 0].tolist()
    ((2, 8, 3), [200, 150, 100])
    """
    g = image.astype(np.float64)
    if variant == "tint":
        rgb = [g, g * 0.75, g * 0.5]
    elif variant == "shift":
        rgb = [g, np.roll(g, 3, axis=1), np.roll(g, -3, axis=1)]
    elif variant == "red":
        rgb = [g, np.zeros_like(g), np.zeros_like(g)]
    elif variant == "inverted_blue":
        rgb = [g, g, 255.0 - g]
    else:
        raise ValueError(f"variant must be tint, shift, red or inverted_blue, got {variant!r}")
    return np.clip(np.round(np.stack(rgb, axis=-1)), 0, 255).astype(np.uint8)


def one_row(image: npt.NDArray[Any], *, row: int) -> npt.NDArray[Any]:
    """Only row ``row``: an image one pixel tall.

    Examples
    --------
    >>> one_row(np.zeros((10, 4), np.uint8), row=3).shape
    (1, 4)
    """
    return image[row:row + 1].copy()


#: Mutation kind -> function. Every kind but ``blank_frame`` and ``nan_inf`` maps one uint8 image.
MUTATIONS: dict[str, Callable[..., Any]] = {
    "crop_rows": crop_rows,
    "crop_cols": crop_cols,
    "rotate_90": rotate_90,
    "rotate_small": rotate_small,
    "pad_border": pad_border,
    "saturate": saturate,
    "jpeg_heavy": jpeg_artefacts,
    "blank_frame": blank_frame,
    "nan_inf": insert_non_finite,
    "flip_vertical": flip_vertical,
    "narrow_16bit": narrow_range_16,
    "constant": constant_image,
    "tiny": tiny_image,
    "huge_aspect": huge_aspect,
    "rgb_unequal": rgb_unequal,
    "one_row": one_row,
}


# --------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class ChainSource:
    """One real input.

    ``kind`` is ``image`` (a picture file), ``vendor`` (.vol/.E2E read by octpipe) or
    ``volume`` (a folder of numbered B-scan images, ``n_frames`` of them).
    """

    name: str
    path: str
    kind: str
    n_frames: int = 1


def _natural(name: str) -> list[tuple[int, int | str]]:
    return [(0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"(\d+)", name.lower()) if p]


def _image_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".tif", ".tiff",
                                                                     ".bmp")), key=lambda p: _natural(p.name))


def chain_sources(data: str | Path | None, *, per_folder: int = 2) -> list[ChainSource]:
    """The fixed sample of real inputs under ``data`` (``../shared/data``, holding ``real/`` and ``cohorts/``).

    Every Spectralis ``.vol``, the E2E B-scan, the 20 BilalHassan90 raw scans and its
    19-B-scan volume, the Zeiss ONH images, and the first ``per_folder`` images (natural
    order) of each OCTDL and Kermany class folder and of the Kermany lesion crops.
    Missing folders are left out; an absent ``data`` gives an empty list.
    """
    if data is None or not Path(data).is_dir():
        return []
    data = Path(data)
    out: list[ChainSource] = []

    def add(path: Path, kind: str, n_frames: int = 1) -> None:
        out.append(ChainSource(str(path.relative_to(data)), str(path), kind, n_frames))

    real = data / "real"
    for p in sorted((real / "halirutan_spectralis-raw-data" / "test-data").glob("*.vol")):
        add(p, "vendor")
    e2e = real / "DIAGNijmegen_rse-panimg" / "tests" / "resources" / "oct" / "e2e_minimized.E2E"
    if e2e.is_file():
        add(e2e, "vendor")
    bilal = real / "BilalHassan90_OCT-Biomarker-Segmentation"
    for p in _image_files(bilal / "Raw Scans"):
        add(p, "image")
    vol = bilal / "OCT Volumes" / "1" / "Raw Scans"
    if _image_files(vol):
        add(vol, "volume", len(_image_files(vol)))
    zeiss = real / "ashkan-abbasi66_OCTseg-Zeiss" / "my-example-datasets" / "onh-3subsets"
    for sub in ("train", "eval", "test", "predict"):
        for p in _image_files(zeiss / sub / "img"):
            add(p, "image")
    co = data / "cohorts"
    octdl = co / "code-world-ad_OpticIntel-OCT-Disease-Detection-System" / "dataset"
    for split in ("train", "val"):
        for cls in sorted(p.name for p in (octdl / split).glob("*") if p.is_dir()):
            for p in _image_files(octdl / split / cls)[:per_folder]:
                add(p, "image")
    kermany = co / "Goodsea_heysaw" / "deploy" / "val"
    for cls in sorted(p.name for p in kermany.glob("*") if p.is_dir()):
        for p in _image_files(kermany / cls)[:per_folder]:
            add(p, "image")
    crops = co / "akulistus_oct-segmentation-model" / "annotation" / "YOLO-style-annotations-raw" / "train" / "images"
    for p in _image_files(crops)[:per_folder + 1]:
        add(p, "image")
    return out


@functools.lru_cache(maxsize=64)
def _load_grey(path: str, frame: int) -> npt.NDArray[np.float32]:
    """One source B-scan as grey float32 on a 0..255 display scale (cached; treat as read-only)."""
    p = Path(path)
    if p.is_dir():
        p = _image_files(p)[frame]
        frame = 0
    if p.suffix.lower() in (".vol", ".e2e"):
        from octpipe.io import read_volume
        from octpipe.preprocess.intensity import linear_to_display

        vol = read_volume(p)
        data = np.nan_to_num(vol.data[frame], nan=0.0, posinf=0.0, neginf=0.0)
        grey = linear_to_display(data) * 255.0
    else:
        from PIL import Image

        with Image.open(p) as img:
            grey = np.asarray(img.convert("L"), dtype=np.float32)
    grey = np.asarray(grey, dtype=np.float32)
    grey.setflags(write=False)
    return grey


def _reduce(image: npt.NDArray[np.float32], factor: int) -> npt.NDArray[np.float32]:
    """Block mean by ``factor`` (edges cropped to whole blocks)."""
    if factor <= 1:
        return np.array(image, copy=True)
    h, w = (image.shape[0] // factor) * factor, (image.shape[1] // factor) * factor
    return image[:h, :w].reshape(h // factor, factor, w // factor, factor).mean(axis=(1, 3)).astype(np.float32)


def _base_frames(case: dict[str, Any]) -> list[npt.NDArray[np.float32]]:
    """The case's source frame(s), shrunk, as float32 0..255."""
    frames = []
    for k in range(case["n_frames"]):
        if case["source_kind"] == "volume":
            grey = _load_grey(case["path"], case["frame"] + k)
        else:  # a single B-scan made into a short volume: shifted copies, as neighbouring B-scans look
            grey = np.roll(_load_grey(case["path"], case["frame"]), 3 * k, axis=1)
        frames.append(_reduce(grey, case["reduce"]))
    return frames


def _u8(image: npt.NDArray[np.float32]) -> npt.NDArray[np.uint8]:
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def case_pixels(case: dict[str, Any]) -> list[npt.NDArray[Any]]:
    """The mutated B-scan(s) of ``case``: one array per frame (one frame unless the case is a volume).

    The base is the source B-scan, shrunk by ``case["reduce"]``, as uint8 (float32 0..1 or
    0..255 for ``nan_inf``); ``case["params"]`` are the mutation's keyword arguments.
    """
    kind, params = case["mutation"], case["params"]
    base = _base_frames(case)
    if kind == "nan_inf":
        vol = np.stack(base) / (255.0 if case["float_scale"] == 1 else 1.0)
        return list(insert_non_finite(vol, **params))
    if kind == "blank_frame":
        return blank_frame([_u8(f) for f in base], **params)
    return [MUTATIONS[kind](_u8(f), **params) for f in base]


# --------------------------------------------------------------------------- cases


def _draw_params(kind: str, shape: tuple[int, int], n_frames: int, rng: random.Random) -> dict[str, Any]:
    h, w = shape
    if kind == "crop_rows":
        return {"start": rng.randrange(h), "n_rows": rng.randint(1, 8)}
    if kind == "crop_cols":
        return {"start": rng.randrange(w), "n_cols": rng.randint(1, 8)}
    if kind == "rotate_90":
        return {"k": rng.choice((1, 3))}
    if kind == "rotate_small":
        return {"angle_deg": round(rng.choice((-1, 1)) * rng.uniform(1.0, 15.0), 2), "fill": rng.choice((0, 255))}
    if kind == "pad_border":
        sides = {s: 0 for s in ("top", "bottom", "left", "right")}
        for s in rng.sample(sorted(sides), rng.randint(1, 4)):
            sides[s] = rng.choice((1, 2, 5, 20, 60, 200))
        return {**sides, "value": rng.choice((0, 255))}
    if kind == "saturate":
        return {"gain": round(rng.uniform(2.0, 12.0), 2)}
    if kind == "jpeg_heavy":
        return {"quality": rng.randint(2, 10)}
    if kind == "blank_frame":
        return {"index": rng.randrange(n_frames), "value": rng.choice((0, 255))}
    if kind == "nan_inf":
        return {"pattern": rng.choice(("rows", "cols", "scatter", "frame", "all")),
                "value": rng.choice(("nan", "inf", "-inf")), "start": round(rng.random(), 3),
                "size": rng.choice((0.001, 0.05, 0.3)), "seed": rng.randrange(1 << 16)}
    if kind == "narrow_16bit":
        return {"low": rng.choice((0, 1000, 30000, 65000)), "span": rng.choice((1, 10, 100))}
    if kind == "constant":
        return {"value": rng.choice((0, 1, 128, 254, 255))}
    if kind == "tiny":
        return {"size": rng.randint(1, 4)}
    if kind == "huge_aspect":
        long_side = rng.choice((1000, 3000, 6000))
        short = rng.choice((1, 2, 4, 12))
        return {"height": short, "width": long_side} if rng.random() < 0.5 else {"height": long_side, "width": short}
    if kind == "rgb_unequal":
        return {"variant": rng.choice(("tint", "shift", "red", "inverted_blue"))}
    if kind == "one_row":
        return {"row": rng.randrange(h)}
    return {}


_FORMATS = {  # mutation -> formats it is written in
    "narrow_16bit": ("png16", "tif16"),
    "jpeg_heavy": ("jpeg",),
    "nan_inf": ("nifti", "nifti-plain"),
    "blank_frame": ("folder",),
    "rgb_unequal": ("png", "tif", "jpeg"),
}


def chain_cases(seed: int, n: int, sources: Sequence[ChainSource], *, mutations: Sequence[str] | None = None,
                reduce_px: int = REDUCE_PX, full_size_fraction: float = 0.05,
                big_volume_every: int = BIG_VOLUME_EVERY) -> Iterator[dict[str, Any]]:
    """``n`` reproducible case descriptions (JSON-able dicts), cycling through the mutation kinds.

    Case ``i`` has mutation ``mutations[i % len(mutations)]``, so any ``n`` >= the number
    of kinds covers every kind; the source, its frame, the shrinking, the parameters
    and the file format are drawn from ``random.Random(seed)``.

    Parameters
    ----------
    seed : int
        Seed of the draws.
    n : int
        Number of cases.
    sources : sequence of ChainSource
        From :func:`chain_sources`; must not be empty.
    mutations : sequence of str, optional
        Kinds to cycle through (default all of :data:`MUTATIONS`).
    reduce_px : int
        Shrink the source (block mean, integer factor) until its longest side is at most this.
    full_size_fraction : float
        Fraction of cases that keep the source size.
    big_volume_every : int
        Every this-many-th ``blank_frame`` case (the 10th, 30th, ... when 20) is a volume of
        the size a device exports: :data:`BIG_VOLUME_FRAMES` full-size B-scans (shifted
        copies of one real B-scan); 0: none.

    Yields
    ------
    dict
        ``id``, ``source``, ``path``, ``source_kind``, ``frame``, ``n_frames``, ``reduce``,
        ``mutation``, ``params``, ``format`` (``png``, ``tif``, ``jpeg``, ``bmp``,
        ``png16``, ``tif16``, ``nifti``, ``nifti-plain``, ``folder``), ``quality`` (JPEG)
        and ``float_scale`` (``nan_inf``: 1 or 255).
    """
    if not sources:
        raise ValueError("no sources: is ../shared/data present?")
    kinds = list(mutations or MUTATIONS)
    unknown = [k for k in kinds if k not in MUTATIONS]
    if unknown:
        raise ValueError(f"unknown mutations {unknown}; known: {', '.join(MUTATIONS)}")
    rng = random.Random(seed)
    volumes = [s for s in sources if s.kind == "volume"]
    n_blank = 0
    for i in range(n):
        kind = kinds[i % len(kinds)]
        multi = kind in ("blank_frame", "nan_inf")
        big = False
        if kind == "blank_frame":
            big = big_volume_every > 0 and n_blank % big_volume_every == big_volume_every // 2
            n_blank += 1
        if big:
            src = rng.choice([s for s in sources if s.kind != "volume"])
        elif kind == "blank_frame" and volumes and rng.random() < 0.6:
            src = rng.choice(volumes)
        else:
            src = rng.choice(sources)
        n_frames = 1
        if kind == "blank_frame":
            n_frames = BIG_VOLUME_FRAMES if big else rng.randint(2, 6)
        elif kind == "nan_inf":
            n_frames = rng.choice((1, 1, 3))
        if src.kind == "volume":
            n_frames = min(n_frames, src.n_frames)
            frame = rng.randrange(src.n_frames - n_frames + 1)
        else:
            frame = 0
        h, w = _load_grey(src.path, frame).shape
        factor = 1 if rng.random() < full_size_fraction or big else max(1, math.ceil(max(h, w) / reduce_px))
        shape = (h // factor, w // factor)
        formats = _FORMATS.get(kind, ("png", "png", "tif", "jpeg", "bmp"))
        fmt = rng.choice(formats)
        case = {
            "id": i, "source": src.name, "path": src.path, "source_kind": src.kind, "frame": frame,
            "n_frames": n_frames if multi else 1, "reduce": factor, "mutation": kind,
            "params": _draw_params(kind, shape, n_frames, rng), "format": fmt,
            "quality": rng.randint(75, 95) if fmt == "jpeg" else None,
            "float_scale": rng.choice((1, 255)) if kind == "nan_inf" else None,
        }
        if kind == "jpeg_heavy":
            case["quality"] = case["params"]["quality"]
        if kind == "nan_inf":
            case["params"]["value"] = float(case["params"]["value"])
        yield case


# --------------------------------------------------------------------------- files


def _write_image(path: Path, image: npt.NDArray[Any], fmt: str, quality: int | None) -> None:
    from PIL import Image

    if fmt in ("tif", "tif16"):
        import tifffile

        tifffile.imwrite(path, image, photometric="rgb" if image.ndim == 3 else "minisblack")
        return
    if fmt == "png16":
        Image.fromarray(image.astype(np.uint16)).save(path, format="PNG")
        return
    pil = {"png": "PNG", "jpeg": "JPEG", "bmp": "BMP"}[fmt]
    kwargs = {"quality": int(quality or 90)} if fmt == "jpeg" else {}
    Image.fromarray(image).save(path, format=pil, **kwargs)


def _write_nifti(path: Path, frames: list[npt.NDArray[np.float32]], *, octpipe_layout: bool) -> None:
    import nibabel as nib

    vol = np.stack(frames).astype(np.float32)
    if octpipe_layout:  # octpipe's own convention (octpipe.io.nifti): (x, z, y), intent octpipe-xzy
        spacing = (0.0113, 0.12, 0.00387)
        affine = np.diag([spacing[0], spacing[1], -spacing[2], 1.0])
        img = nib.Nifti1Image(np.ascontiguousarray(vol.transpose(2, 0, 1)), affine)
        img.header["intent_name"] = b"octpipe-xzy"
        img.set_qform(affine, code=1)
        img.set_sform(affine, code=2)
    else:  # a foreign file: one B-scan stored array[x, y] (ITK style) or a plain (x, z, y) volume
        data = vol[0].T if vol.shape[0] == 1 else vol.transpose(2, 0, 1)
        img = nib.Nifti1Image(np.ascontiguousarray(data), np.eye(4))
    img.header.set_data_dtype(np.float32)
    img.header.set_xyzt_units(xyz="mm")
    nib.save(img, str(path))


_SUFFIX = {"png": ".png", "png16": ".png", "tif": ".tif", "tif16": ".tif", "jpeg": ".jpg", "bmp": ".bmp",
           "nifti": ".nii", "nifti-plain": ".nii", "folder": ""}


def write_case(case: dict[str, Any], folder: str | Path) -> tuple[Path, int]:
    """Write the mutated case into ``folder``; return the input's path and its size in bytes.

    The size (the base of :func:`memory_budget`) is the decoded input as float32 (4 bytes
    per grey pixel of every frame), or the bytes on disk when larger.
    """
    path, input_bytes, _ = _write_case(case, folder)
    return path, input_bytes


def _write_case(case: dict[str, Any], folder: str | Path) -> tuple[Path, int, list[int]]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    frames = case_pixels(case)
    fmt = case["format"]
    if fmt == "folder":
        path = folder / "scans"
        path.mkdir(exist_ok=True)
        width = max(3, len(str(len(frames) - 1)))
        for k, f in enumerate(frames):
            _write_image(path / f"bscan_{k:0{width}d}.png", f, "png", None)
        on_disk = sum(p.stat().st_size for p in path.iterdir())
    elif fmt.startswith("nifti"):
        path = folder / "case.nii"
        _write_nifti(path, frames, octpipe_layout=fmt == "nifti")
        on_disk = path.stat().st_size
    else:
        path = folder / f"case{_SUFFIX[fmt]}"
        _write_image(path, frames[0], fmt, case.get("quality"))
        on_disk = path.stat().st_size
    pixels = sum(int(f.shape[0]) * int(f.shape[1]) for f in frames)
    return path, max(4 * pixels, on_disk), [len(frames), *frames[0].shape]


def memory_budget(command: str, input_bytes: int) -> int:
    """Largest peak memory growth allowed for ``command`` on ``input_bytes``: twice the input plus the allowance."""
    return 2 * int(input_bytes) + ALLOWANCE_BYTES[command]


def time_limit(command: str, input_bytes: int) -> float:
    """Seconds ``command`` may run on ``input_bytes`` before the case counts as a hang."""
    return TIMEOUT_S[command] + TIMEOUT_S_PER_MIB[command] * input_bytes / 2**20


def command_argv(command: str, source: Path, out: Path, *, model: str | Path = DEFAULT_MODEL) -> list[str]:
    """The ``octpipe`` arguments of ``command`` for the input ``source``, writing under ``out``."""
    if command == "layers":
        return ["--no-progress", "layers", str(source), "-o", str(out / "layers.npz")]
    if command == "ingest":
        return ["--no-progress", "ingest", str(source), "-o", str(out / "store.zarr"), "--workers", "0"]
    if command == "patches":
        return ["--no-progress", "patches", str(out / "store.zarr"), "--split", "test", "--workers", "0"]
    if command == "export":
        return ["--no-progress", "export", str(source), "--model", str(model), "-o", str(out / "export"),
                "--workers", "0", "--device", "cpu", "--stride", "64"]
    raise ValueError(f"command must be one of {', '.join(COMMANDS)}, got {command!r}")


# --------------------------------------------------------------------------- the child process


def _status_kb(field: str, pid: str = "self") -> int | None:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _child(argv: list[str], conn: Any, entry: str = "octpipe.cli:main") -> None:
    """Run ``main(argv)`` (``entry`` names it, ``module:function``) and send back exit code, output, seconds, memory."""
    import importlib
    import warnings

    warnings.simplefilter("ignore")
    hwm_reset = True
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # reset the peak RSS (VmHWM) to the current RSS
    except OSError:
        hwm_reset = False
    base_kb = (_status_kb("VmRSS") if hwm_reset else None) or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    conn.send(("start", _status_kb("VmRSS")))  # the parent's baseline for its kill limit
    err, out = io.StringIO(), io.StringIO()
    escaped = ""
    t0 = time.perf_counter()
    module, name = entry.split(":")
    main = getattr(importlib.import_module(module), name)
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            code = main(argv)
        except BaseException:  # noqa: BLE001 - anything escaping main is the finding
            escaped = traceback.format_exc()
            code = -1
    seconds = time.perf_counter() - t0
    peak_kb = (_status_kb("VmHWM") if hwm_reset else None) or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    conn.send(("result", {"exit_code": code, "stderr": err.getvalue()[-20000:], "stdout": out.getvalue()[-4000:],
               "escaped": escaped[-4000:], "seconds": seconds, "peak_growth_bytes": max(0, peak_kb - base_kb) * 1024,
               "memory_method": "VmHWM" if hwm_reset else "ru_maxrss"}))
    conn.close()


@functools.lru_cache(maxsize=1)
def _context() -> Any:
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    return ctx


def _run_child(argv: list[str], *, timeout_s: float, kill_bytes: int,
               entry: str = "octpipe.cli:main") -> dict[str, Any]:
    """Run ``entry(argv)`` in a child process; kill it past ``timeout_s`` or ``kill_bytes`` of resident growth."""
    ctx = _context()
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(argv, child, entry), daemon=True)
    t0 = time.perf_counter()
    proc.start()
    child.close()
    base_kb = None
    result: dict[str, Any] | None = None
    outcome = ""
    try:
        while True:
            if parent.poll(0.1):
                try:
                    tag, payload = parent.recv()
                except EOFError:
                    break
                if tag == "result":
                    result = payload
                    break
                base_kb = payload
                continue
            if not proc.is_alive():
                break
            rss = _status_kb("VmRSS", str(proc.pid))
            if rss is not None and base_kb is not None and (rss - base_kb) * 1024 > kill_bytes:
                outcome = "memory"
                break
            if time.perf_counter() - t0 > timeout_s:
                outcome = "hang"
                break
    finally:
        if proc.is_alive() and result is None:
            proc.kill()
        proc.join(10)
        parent.close()
    wall = time.perf_counter() - t0
    if result is None:
        code = proc.exitcode
        died = f"killed by signal {-code}" if code is not None and code < 0 else f"child ended (exit {code}) " \
            "without a result"
        return {"exit_code": None, "stderr": "", "stdout": "", "escaped": "", "seconds": wall,
                "peak_growth_bytes": None, "killed": outcome or died,
                "signal": -code if code is not None and code < 0 and not outcome else None}
    return result


# --------------------------------------------------------------------------- one case


def _qc_flags(command: str, out: Path) -> list[str] | None:
    """The QC flags the command wrote (None where it writes none)."""
    flags: set[str] = set()
    try:
        if command == "layers":
            with np.load(out / "layers.npz") as z:
                flags.update(json.loads(str(z["qc"])).get("flags", []))
        elif command == "ingest":
            for meta in (out / "store.zarr" / "volumes").glob("*/zarr.json"):
                attrs = json.loads(meta.read_text()).get("attributes", {})
                flags.update(attrs.get("qc", {}).get("flags", []))
        elif command == "export":
            for summary in (out / "export").glob("*/summary.json"):
                flags.update(json.loads(summary.read_text()).get("qc_flags", []))
        else:
            return None
    except (OSError, ValueError, KeyError):
        return None
    return sorted(flags)


def _classify(raw: dict[str, Any]) -> tuple[str, str, bool]:
    """Outcome, the error line (or first stderr line) and whether a traceback was seen."""
    stderr, stdout = raw.get("stderr", ""), raw.get("stdout", "")
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    error_lines = [ln for ln in lines if _ERROR_LINE.match(ln)]
    first = (error_lines or lines or [""])[0].strip()[:400]
    tb = bool(raw.get("escaped")) or "Traceback (most recent call last)" in stderr + stdout or \
        any(ln.startswith("error: unexpected ") for ln in lines)
    if raw.get("killed"):
        kind = raw["killed"] if raw["killed"] in ("hang", "memory") else "crash"
        return kind, first or raw["killed"], tb
    if tb:
        escaped = raw.get("escaped", "").strip().splitlines()
        return "traceback", first or (escaped[-1] if escaped else "Traceback"), True
    code = raw.get("exit_code")
    if code == 0:
        return "ok", first, False
    if code == 1 and error_lines:
        return "error", first, False
    return "bad_exit", first or f"exit {code} with no error line", False


def run_case(case: dict[str, Any], workdir: str | Path, command: str, *, model: str | Path = DEFAULT_MODEL,
             timeout_s: float | None = None, keep: bool = True) -> dict[str, Any]:
    """Write ``case`` into ``workdir`` (unless already there), run ``command`` on it in a child process, classify.

    Parameters
    ----------
    case : dict
        From :func:`chain_cases`.
    workdir : path
        The case's own folder: the input goes there, the outputs under ``workdir/out``.
        ``patches`` runs on ``workdir/out/store.zarr`` after a successful ``ingest`` of the
        same case in the same ``workdir``; when ingest has not run there, it runs first. The
        ingest is summarised under ``setup``; when it did not succeed, ``patches`` is not
        run and reports outcome ``not_run``.
    command : str
        One of :data:`COMMANDS`.
    model : path
        Model folder for ``export``.
    timeout_s : float, optional
        Time limit (default :func:`time_limit`).
    keep : bool
        Keep ``workdir`` afterwards (false: remove it, unless a ``patches`` case follows).

    Returns
    -------
    dict
        ``case``, ``command``, ``mutation``, ``params``, ``source``, ``format``, ``shape``
        (of the first mutated frame), ``n_frames``, ``argv``, ``exit_code``, ``outcome``
        (one of :data:`OUTCOMES`, or ``not_run``), ``stderr_line`` (the error line, else the
        first stderr line), ``stderr_first`` (the first stderr line), ``traceback`` (bool),
        ``seconds``, ``peak_memory_bytes`` (growth), ``budget_bytes``, ``input_bytes``,
        ``memory_method``, ``time_limit_s``, ``finding`` (what went wrong, in one line: the
        error line, or the memory, time or signal that decided), ``qc_flags`` (for ``ok``),
        ``unflagged`` and, on a bad outcome, ``detail`` (the end of the output).
    """
    if command not in COMMANDS:
        raise ValueError(f"command must be one of {', '.join(COMMANDS)}, got {command!r}")
    work = Path(workdir)
    out = work / "out"
    out.mkdir(parents=True, exist_ok=True)
    meta_file = work / "input.json"
    if meta_file.is_file():
        meta = json.loads(meta_file.read_text())
    else:
        path, input_bytes, shape = _write_case(case, work / "input")
        meta = {"path": str(path), "input_bytes": input_bytes, "shape": shape}
        meta_file.write_text(json.dumps(meta))
    source, input_bytes = Path(meta["path"]), int(meta["input_bytes"])
    setup = None
    ingest_file = work / "ingest.json"
    if command == "patches":
        if ingest_file.is_file():
            setup = json.loads(ingest_file.read_text())
        else:
            setup = run_case(case, work, "ingest", model=model, timeout_s=timeout_s)
    record: dict[str, Any] = {
        "case": case["id"], "command": command, "mutation": case["mutation"], "params": case["params"],
        "source": case["source"], "format": case["format"], "shape": meta["shape"][1:],
        "n_frames": meta["shape"][0], "input_bytes": input_bytes,
        "budget_bytes": memory_budget(command, input_bytes),
    }
    if setup is not None:
        record["setup"] = {k: setup[k] for k in ("command", "outcome", "exit_code", "stderr_line", "seconds")}
        if setup["outcome"] != "ok":
            record.update(argv=[], exit_code=None, outcome="not_run", stderr_line="ingest did not succeed",
                          stderr_first="", traceback=False, seconds=0.0, peak_memory_bytes=None, qc_flags=None,
                          unflagged=False)
            return record
    argv = command_argv(command, source, out, model=model)
    limit = timeout_s or time_limit(command, input_bytes)
    raw = _run_child(argv, timeout_s=limit, kill_bytes=4 * record["budget_bytes"])
    kind, line, tb = _classify(raw)
    peak = raw.get("peak_growth_bytes")
    finding = ""
    if kind in ("ok", "error") and peak is not None and peak > record["budget_bytes"]:
        kind = "memory"
    if kind == "memory":
        mib = 2**20
        budget = record["budget_bytes"]
        seen = f"{peak / mib:.0f} MiB" if peak is not None else f"over {4 * budget / mib:.0f} MiB (killed)"
        finding = (f"peak memory growth {seen} > budget {budget / mib:.0f} MiB (2 x input {input_bytes / mib:.1f} "
                   f"MiB + allowance {ALLOWANCE_BYTES[command] / mib:.0f} MiB)")
    elif kind == "hang":
        finding = f"no result within {limit:.0f} s"
    elif kind == "crash":
        finding = raw.get("killed", "the child died")
    first = next((ln.strip() for ln in raw.get("stderr", "").splitlines() if ln.strip()), "")[:400]
    record.update(argv=[a.replace(str(work), "<case>") for a in argv], exit_code=raw.get("exit_code"),
                  outcome=kind, stderr_line=line, stderr_first=first, traceback=tb,
                  seconds=round(float(raw["seconds"]), 3), peak_memory_bytes=peak,
                  memory_method=raw.get("memory_method"), time_limit_s=round(limit, 1), finding=finding or line)
    record["qc_flags"] = _qc_flags(command, out) if kind == "ok" else None
    record["unflagged"] = (kind == "ok" and case["mutation"] in DEGENERATE_MUTATIONS and command != "patches"
                           and record["qc_flags"] == [])
    if kind in BAD_OUTCOMES:
        record["detail"] = (raw.get("escaped") or raw.get("stderr", ""))[-3000:]
        if raw.get("signal"):
            record["signal"] = raw["signal"]
    if command == "ingest":  # what a later patches run of this case needs to know
        ingest_file.write_text(json.dumps({k: record[k] for k in ("command", "outcome", "exit_code", "stderr_line",
                                                                  "seconds")}))
    if not keep:
        shutil.rmtree(work, ignore_errors=True)
    return record

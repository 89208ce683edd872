"""Batch ingestion: discover inputs, read and normalise each on Dask, write the store.

One Dask task per input file on a ``dask.distributed`` cluster (a LocalCluster of
worker processes by default, or any scheduler address). Each task reads its file,
brings it to the display domain, normalises it to [-1, 1] and writes one volume group
per series atomically (see :mod:`octpipe.store`). A bad file becomes a ``failed``
manifest row and the batch goes on; a rerun skips volumes already complete (by the
source's sha256) unless ``overwrite``.
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import os
import re
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal, NamedTuple

from octpipe import __version__
from octpipe.errors import FormatError, OctpipeError
from octpipe.io import read_volumes
from octpipe.io._common import file_sha256
from octpipe.io.detect import detect_format
from octpipe.volume import override_spacing

if TYPE_CHECKING:
    import numpy as np

    from octpipe.preprocess.prepare import PreprocessConfig

#: A ``--spacing-mm`` value as :func:`octpipe.volume.parse_spacing` returns it (None = keep the file's).
Spacing = tuple[float | None, float | None, float | None]

__all__ = [
    "InputFile", "IngestResult", "discover_inputs", "ingest", "ingest_one", "MANIFEST_FIELDS", "git_hash",
    "local_cluster", "annotation_sidecar", "classify_image_folder", "ImageFolderDecision", "IMAGE_MODES",
]

#: Manifest columns, in order (the schema is ``data_manifests/ingest-manifest.schema.json``). ``images`` says how
#: an image input was taken: ``volume`` (a folder of B-scans read as one volume), ``bscan`` (an image file on its
#: own), empty for vendor files and rows that read nothing.
MANIFEST_FIELDS = ("volume_id", "path", "sha256", "format", "images", "series", "shape", "spacing_mm",
                   "spacing_source", "laterality", "status", "error", "seconds")

#: Values of ``--images`` / ``images=``: decide from the evidence, or force one reading.
IMAGE_MODES = ("auto", "volume", "bscans")


@dataclass(frozen=True)
class InputFile:
    """One input: a file, or a folder of B-scan images read as one volume.

    ``images`` is ``"volume"`` for a folder read as one volume, ``"bscan"`` for an image
    file taken on its own, empty otherwise; ``images_reason`` says why (see
    :func:`classify_image_folder`).
    """

    path: str
    rel: str
    format: str
    images: str = ""
    images_reason: str = ""


@dataclass
class IngestResult:
    """What an ingest run did."""

    rows: list[dict[str, object]]
    manifest: Path
    store: Path
    log: Path
    seconds: float
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when no input failed."""
        return self.counts.get("failed", 0) == 0


def git_hash() -> str:
    """The git commit of the octpipe checkout, or ``"unknown"`` for an installed copy."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def _row(**values: object) -> dict[str, object]:
    row: dict[str, object] = dict.fromkeys(MANIFEST_FIELDS, "")
    row.update(values)
    return row


def _image_size(path: Path) -> tuple[int, int, int] | None:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return (*im.size, getattr(im, "n_frames", 1))
    except (OSError, ValueError):
        return None


#: An image with this few distinct grey values is a label map, not a B-scan.
LABEL_MAP_MAX_VALUES = 16


def _label_map_values(path: Path) -> int | None:
    """Number of distinct values when ``path`` looks like a label/mask image, else None."""
    import numpy as np
    from PIL import Image

    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("L") if im.mode not in ("L", "I;16", "I") else im)
    except (OSError, ValueError):
        return None
    n = len(np.unique(arr))
    return n if n <= LABEL_MAP_MAX_VALUES else None


class ImageFolderDecision(NamedTuple):
    """What :func:`classify_image_folder` decided: ``kind`` and the one-line ``reason``."""

    kind: Literal["volume", "bscans"]
    reason: str


#: At least this many numbered images make a volume on their own; two images (``X-1``, ``X-2``: two visits of
#: one patient in public datasets) need zero-padded numbers (``bscan_000``, ``bscan_001``) to count.
MIN_SEQUENCE = 3


def _fmt_size(size: tuple[int, ...]) -> str:
    return f"{size[0]}x{size[1]}"


def _cite(text: str, cite_names: bool) -> str:
    return f" ({text})" if cite_names else ""


def _size_problem(names_and_sizes: Sequence[tuple[str, tuple[int, ...] | None]], *,
                  cite_names: bool = True) -> str | None:
    """Why these images cannot be stacked into one volume (unknown, multi-page or mixed sizes), else None."""
    for name, size in names_and_sizes:
        if size is None:
            return "the size of an image cannot be read" + _cite(name, cite_names)
        if len(size) > 2 and size[2] != 1:
            return f"an image holds {size[2]} pages" + _cite(name, cite_names)
    counts = Counter(tuple(size[:2]) for _, size in names_and_sizes)  # type: ignore[index]
    if len(counts) > 1:
        common = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        sizes = ", ".join(f"{_fmt_size(s)} ({n})" for s, n in common[:3])
        more = f" and {len(common) - 3} more sizes" if len(common) > 3 else ""
        return f"image sizes differ (WxH: {sizes}{more})"
    return None


def classify_image_folder(names_and_sizes: Iterable[tuple[str, tuple[int, ...] | None]], *,
                          cite_names: bool = True) -> ImageFolderDecision:
    """Decide whether the B-scan images of one folder are one volume or independent B-scans.

    Pure: looks only at the file names and image sizes. The images are one volume when
    all of these hold, else they are independent B-scans (one volume each):

    1. there are at least two images, every size is known, single-page and the same;
    2. the names differ only by one number: split at digit runs, the text between the
       numbers is the same in every name (case-insensitive, extension included) and
       exactly one of the numbers varies (``Image 7.TIFF``, ``bscan_007.png``;
       ``NORMAL-4872585-1.jpeg`` / ``NORMAL-5246808-2.jpeg`` vary in two);
    3. those numbers are distinct and near-consecutive: of the ``hi - lo + 1`` values
       from the lowest to the highest, at most ``n // 4`` are missing (a few dropped
       B-scans);
    4. there are at least :data:`MIN_SEQUENCE` (3) images, or the two numbers are
       zero-padded to one width (``bscan_000``, ``bscan_001``): two images numbered
       ``-1`` and ``-2`` are, in public datasets, two visits of one patient.

    Parameters
    ----------
    names_and_sizes : iterable of (str, tuple or None)
        File name (no folder) and size ``(width, height)`` or ``(width, height,
        n_pages)``; None when the size cannot be read.
    cite_names : bool, default True
        Quote file names in the reason (two that show the problem, or the name pattern).
        False keeps names out of it, for names that may carry patient names
        (``--hash-paths``).

    Returns
    -------
    ImageFolderDecision
        ``kind`` ``"volume"`` or ``"bscans"``, and a one-line ``reason``.

    Examples
    --------
    >>> classify_image_folder([(f"Image {i}.TIFF", (496, 512)) for i in range(1, 20)])
    ImageFolderDecision(kind='volume', reason='19 images of 496x512 numbered 1..19 (Image <n>.TIFF)')
    >>> classify_image_folder([(f"bscan_{i:03d}.png", (256, 248)) for i in range(2)]).kind
    'volume'
    >>> kermany = ["NORMAL-4872585-1.jpeg", "NORMAL-5156112-1.jpeg", "NORMAL-5246808-2.jpeg"]
    >>> kind, reason = classify_image_folder([(n, (512, 496)) for n in kermany])
    >>> kind, reason
    ('bscans', 'names differ in 2 numbers (NORMAL-4872585-1.jpeg, NORMAL-5246808-2.jpeg)')
    >>> classify_image_folder([("CNV-6294785-1.jpeg", (512, 496)), ("CNV-6294785-2.jpeg", (512, 496))]).kind
    'bscans'
    >>> classify_image_folder([("a1.png", (512, 496)), ("a2.png", (768, 496)), ("a3.png", (512, 496))])
    ImageFolderDecision(kind='bscans', reason='image sizes differ (WxH: 512x496 (2), 768x496 (1))')
    >>> classify_image_folder([(f"scan{i}.png", (64, 64)) for i in (1, 5, 9)]).kind
    'bscans'
    """
    items = [(str(name), None if size is None else tuple(size)) for name, size in names_and_sizes]
    n = len(items)
    if n < 2:
        return ImageFolderDecision("bscans", "a single image" if n else "no images")
    problem = _size_problem(items, cite_names=cite_names)
    if problem:
        return ImageFolderDecision("bscans", problem)
    size = _fmt_size(items[0][1])  # type: ignore[arg-type]
    split = [re.split(r"(\d+)", name) for name, _ in items]
    texts = [tuple(t.lower() for t in parts[0::2]) for parts in split]
    if len(set(texts)) > 1:
        other = next(i for i, t in enumerate(texts) if t != texts[0])
        return ImageFolderDecision("bscans", "names differ in more than a number"
                                   + _cite(f"{items[0][0]}, {items[other][0]}", cite_names))
    numbers = [parts[1::2] for parts in split]
    if not numbers[0]:
        return ImageFolderDecision("bscans", "names carry no number")
    varying = [k for k in range(len(numbers[0])) if len({nums[k] for nums in numbers}) > 1]
    if len(varying) != 1:
        if not varying:
            return ImageFolderDecision("bscans", "names differ only in letter case")
        other = next(i for i in range(n) if numbers[i][varying[-1]] != numbers[0][varying[-1]])
        return ImageFolderDecision("bscans", f"names differ in {len(varying)} numbers"
                                   + _cite(f"{items[0][0]}, {items[other][0]}", cite_names))
    k = varying[0]
    digits = [nums[k] for nums in numbers]
    values = sorted(int(d) for d in digits)
    if len(set(values)) < n:
        dup, times = Counter(values).most_common(1)[0]
        return ImageFolderDecision("bscans", f"numbers repeat ({dup} appears {times} times)")
    lo, hi = values[0], values[-1]
    missing = hi - lo + 1 - n
    if missing > n // 4:
        return ImageFolderDecision("bscans", f"numbers {lo}..{hi} are not a consecutive sequence "
                                             f"({missing} of {hi - lo + 1} missing)")
    padded = len({len(d) for d in digits}) == 1 and len(digits[0]) >= 2 and any(d.startswith("0") for d in digits)
    if n < MIN_SEQUENCE and not padded:
        return ImageFolderDecision("bscans", f"only {n} numbered images, not zero-padded "
                                             "(could be two visits of one patient)")
    parts = split[0]
    template = "".join(parts[:2 * k + 1]) + "<n>" + "".join(parts[2 * k + 2:])
    gaps = f", {missing} missing" if missing else ""
    return ImageFolderDecision("volume", f"{n} images of {size} numbered {lo}..{hi}{gaps}"
                               + _cite(template, cite_names))


def _image_folder_inputs(here: Path, images: list[tuple[Path, str]], rel: str, mode: str, *,
                         cite_names: bool = True) -> tuple[list[InputFile], list[dict[str, object]]]:
    """The inputs (and failed rows) for the B-scan images ``images`` of the folder ``here``."""
    if not images:
        return [], []
    named = [(p.name, _image_size(p)) for p, _ in images]
    decision = classify_image_folder(named, cite_names=cite_names)
    if len(images) == 1 or mode == "bscans" or (mode == "auto" and decision.kind == "bscans"):
        reason = decision.reason if mode == "auto" or len(images) == 1 else f"--images bscans (auto: {decision.reason})"
        return [InputFile(str(p), r, "image", images="bscan", images_reason=reason) for p, r in images], []
    if mode == "volume":
        problem = _size_problem(named, cite_names=cite_names)
        if problem:
            return [], [_row(path=rel, format="bscan-folder", images="volume", status="failed",
                             error=f"--images volume: cannot stack {len(images)} images as one volume: {problem}")]
        reason = f"--images volume (auto: {decision.reason})" if decision.kind == "bscans" else decision.reason
    else:
        reason = decision.reason
    return [InputFile(str(here), rel, "bscan-folder", images="volume", images_reason=reason)], []


def discover_inputs(sources: Sequence[str | Path], *, exclude: Sequence[str | Path] = (), images: str = "auto",
                    recursive: bool = True, cite_names: bool = True) -> tuple[
        list[InputFile], list[dict[str, object]]]:
    """Find every OCT input under ``sources`` (files and folders, recursively).

    Non-OCT files are returned as ``skipped`` manifest rows, and so are images with at
    most :data:`LABEL_MAP_MAX_VALUES` grey values (annotation masks exported beside the
    B-scans). Folders ending in ``.zarr`` and hidden entries are not entered. The B-scan
    images of one folder are one volume (format ``bscan-folder``) when
    :func:`classify_image_folder` says so (same size, names numbered in sequence);
    otherwise each image is its own input (format ``image``).

    Parameters
    ----------
    sources : sequence of paths
        Files and folders.
    exclude : sequence of paths
        Folders not to enter (the store being written).
    images : {"auto", "volume", "bscans"}
        How the images of a folder are taken: decided per folder (``auto``), always one
        volume per folder (``volume``; a folder whose images differ in size becomes a
        ``failed`` row), or always one input per image (``bscans``).
    recursive : bool
        Enter sub-folders (default); False looks only at the files directly in each
        source folder.
    cite_names : bool, default True
        Quote file names in the reasons of the folder decision; False for names that may
        carry patient names (``--hash-paths``).

    Returns
    -------
    inputs : list of InputFile
    skipped : list of dict
        Manifest rows for what is not an OCT input (or cannot be read).

    Raises
    ------
    ValueError
        ``images`` is not one of :data:`IMAGE_MODES`.
    """
    if images not in IMAGE_MODES:
        raise ValueError(f"images must be one of {', '.join(IMAGE_MODES)}, got {images!r}")
    excluded = {Path(p).resolve() for p in exclude}
    inputs: list[InputFile] = []
    rows: list[dict[str, object]] = []

    def consider(path: Path, rel: str) -> InputFile | None:
        try:
            fmt = detect_format(path)
        except FormatError as exc:
            rows.append(_row(path=rel, status="skipped", error=_sidecar_reason(path) or exc.reason))
            return None
        except OctpipeError as exc:
            rows.append(_row(path=rel, status="failed", error=exc.reason))
            return None
        return InputFile(str(path), rel, fmt, images="bscan" if fmt == "image" else "")

    for source in sources:
        source = Path(source)
        if not source.exists():
            rows.append(_row(path=str(source), status="failed", error="no such file or folder"))
            continue
        if source.is_file():
            found = consider(source, source.name)
            if found:
                inputs.append(found)
            continue
        for dirpath, dirnames, filenames in os.walk(source):
            here = Path(dirpath)
            dirnames[:] = sorted(d for d in dirnames if recursive and not d.startswith(".")
                                 and not d.endswith(".zarr") and (here / d).resolve() not in excluded)
            found_images: list[tuple[Path, str]] = []
            for name in sorted(filenames):
                if name.startswith("."):
                    continue
                path = here / name
                rel = os.path.join(source.name, os.path.relpath(path, source))
                found = consider(path, rel)
                if found is None:
                    continue
                if found.format == "image":
                    n_values = _label_map_values(path)
                    if n_values is not None:
                        rows.append(_row(path=rel, format="image", status="skipped",
                                         error=f"looks like a label map ({n_values} grey values), not a B-scan"))
                        continue
                    found_images.append((path, rel))
                elif found.format == "nifti":  # label maps (nnU-Net labelsTr) beside the images: skip them too
                    from octpipe.io.nifti import nifti_label_map_values

                    n_values = nifti_label_map_values(path)
                    if n_values is not None:
                        rows.append(_row(path=rel, format="nifti", status="skipped",
                                         error=f"looks like a label map ({n_values} values), not a B-scan"))
                        continue
                    inputs.append(found)
                else:
                    inputs.append(found)
            folder_rel = os.path.normpath(os.path.join(source.name, os.path.relpath(here, source)))
            new_inputs, new_rows = _image_folder_inputs(here, found_images, folder_rel, images,
                                                        cite_names=cite_names)
            inputs.extend(new_inputs)
            rows.extend(new_rows)
    return inputs, rows


def _sidecar_reason(path: Path) -> str:
    """Why a non-OCT file beside the inputs is skipped when it is octpipe's annotation of one.

    >>> _sidecar_reason(Path("phantom-0001_truth.npz"))
    'annotation sidecar (read with its volume)'
    >>> _sidecar_reason(Path("notes.txt"))
    ''
    """
    stem = path.name.removesuffix(".npz").removesuffix(".json")
    if stem != path.name and stem.endswith("_truth"):
        return "annotation sidecar (read with its volume)"
    return ""


def annotation_sidecar(path: str | Path) -> Path | None:
    """The annotation file that goes with an input, if any.

    octpipe's convention (what ``octpipe phantom`` writes): ``NAME_truth.npz`` beside
    ``NAME.vol`` / ``NAME.dcm`` / ``NAME.nii.gz`` / the folder ``NAME_png``, holding
    ``lesion_mask`` in the source geometry.
    """
    p = Path(path)
    stem = p.name.split(".")[0]
    stem = stem.removesuffix("_png")
    candidate = p.with_name(f"{stem}_truth.npz")
    return candidate if candidate.is_file() else None


def _load_mask(path: Path | None, shape: tuple[int, ...]) -> np.ndarray | None:
    import numpy as np

    if path is None:
        return None
    try:
        with np.load(path) as data:
            mask = data["lesion_mask"]
    except (OSError, KeyError, ValueError) as exc:
        raise OctpipeError(f"annotation {path.name} unreadable: {exc}", path) from exc
    if mask.shape != shape:
        raise OctpipeError(f"annotation {path.name} has shape {mask.shape}, volume has {shape}", path)
    return mask


def hashed_path(rel: str, salt: str) -> str:
    """A path replaced by a salted hash that keeps only a short file extension.

    The same path in the same store always gives the same name, so reruns and manifests
    still line up; the name cannot be read back without the original path.

    Examples
    --------
    >>> hashed_path("Doe_John/1937-05-19.vol", "salt") == hashed_path("Doe_John/1937-05-19.vol", "salt")
    True
    >>> hashed_path("Doe_John/1937-05-19.vol", "salt").endswith(".vol")
    True
    """
    from octpipe.privacy import pseudonymous_id

    suffix = Path(rel).suffix.lower()
    keep = suffix if 1 < len(suffix) <= 6 and suffix[1:].isalnum() and not suffix[1:].isdigit() else ""
    return f"file-{pseudonymous_id(salt, rel)}{keep}"


def ingest_one(item: InputFile, store: str, salt: str, complete: dict[tuple[str, int], str], *,
               overwrite: bool = False, config: PreprocessConfig | None = None,
               label: int | None = None, spacing: Spacing | None = None) -> list[dict[str, object]]:
    """Ingest one input into the store; return its manifest rows (one per series).

    Runs every preprocessing stage (:func:`octpipe.preprocess.prepare.prepare_volume`).
    Never raises for a bad input: an :class:`~octpipe.errors.OctpipeError` becomes a
    ``failed`` row with the one-line reason.

    Parameters
    ----------
    item : InputFile
        The input (from :func:`discover_inputs`).
    store : str
        The store path.
    salt : str
        The store's pseudonym salt.
    complete : dict
        ``{(sha256, series): volume_id}`` of volumes already complete.
    overwrite : bool
        Redo complete volumes.
    config : PreprocessConfig, optional
        Preprocessing settings.
    label : {0, 1}, optional
        Label of an input without annotations.
    spacing : tuple of 3 (float or None), optional
        The user's spacing (z, y, x) in mm (:func:`octpipe.volume.parse_spacing`); None
        fields keep the file's. Replaces the file's before preprocessing, and the store
        and manifest record ``spacing_source="user"``.
    """
    import numpy as np

    from octpipe.preprocess.prepare import PreprocessConfig, prepare_volume
    from octpipe.store import store_volume_id, write_volume

    config = config or PreprocessConfig()
    t0 = time.perf_counter()
    base = {"path": item.rel, "format": item.format, "images": item.images}
    sha = ""
    try:
        sha = file_sha256(item.path) if os.path.isfile(item.path) else ""
        if sha and not overwrite and (sha, 0) in complete:
            ids = [(s, v) for (h, s), v in sorted(complete.items()) if h == sha]
            return [_row(**base, sha256=sha, series=s, volume_id=v, status="skipped", error="already complete",
                         seconds=round(time.perf_counter() - t0, 3)) for s, v in ids]
        volumes = read_volumes(item.path, format=item.format)
    except OctpipeError as exc:
        return [_row(**base, sha256=sha, status="failed", error=exc.reason,
                     seconds=round(time.perf_counter() - t0, 3))]
    sidecar = annotation_sidecar(item.path)
    rows = []
    for series, vol in enumerate(volumes):
        t1 = time.perf_counter()
        file_spacing, file_spacing_source = list(vol.spacing_mm), vol.spacing_source
        vol = override_spacing(vol, spacing)
        prov = vol.provenance
        digest = prov.sha256 if prov else sha
        vid = store_volume_id(salt, digest, series)
        common = dict(base, sha256=digest, series=series, volume_id=vid, shape="x".join(map(str, vol.shape)),
                      spacing_mm=";".join(f"{s:.6g}" for s in vol.spacing_mm), spacing_source=vol.spacing_source,
                      laterality=vol.laterality or "")
        if (digest, series) in complete and not overwrite:
            rows.append(_row(**common, status="skipped", error="already complete",
                             seconds=round(time.perf_counter() - t1, 3)))
            continue
        try:
            mask = _load_mask(sidecar, vol.shape) if len(volumes) == 1 else None
            prepared = prepare_volume(vol, config, mask=mask)
        except (OctpipeError, ValueError) as exc:
            reason = exc.reason if isinstance(exc, OctpipeError) else str(exc)
            rows.append(_row(**common, status="failed", error=f"preprocessing: {reason}",
                             seconds=round(time.perf_counter() - t1, 3)))
            continue
        volume_label = (int(prepared.mask.any()) if prepared.mask is not None
                        else (label if label is not None else -1))
        arrays: dict[str, object] = {"image": prepared.image, "layers": prepared.layers, "flat": prepared.flat,
                                     "flatmap": prepared.flatmap}
        array_attrs: dict[str, dict[str, object]] = {
            "image": {"axes": ["z", "y", "x"], "range": [-1, 1]},
            "layers": {"names": ["ILM", "BM"], "axes": ["layer", "z", "x"], "units": "row (pixel centre)",
                       "source": prepared.qc.get("source", "")},
            "flat": {"axes": ["z", "y", "x"], "range": [-1, 1]},
            "flatmap": {"names": ["bm_ref", "scale"], "axes": ["param", "z", "x"]},
        }
        if prepared.mask is not None:
            arrays["mask"] = prepared.mask
        if vol.invalid is not None and vol.invalid.any():
            arrays["valid"] = np.isfinite(prepared.image).astype(np.uint8)
        # the spacing used: the file's, the user's, or estimated from the retina when neither
        dz, dy, dx = prepared.spacing_mm
        common.update(spacing_mm=";".join(f"{s:.6g}" for s in prepared.spacing_mm),
                      spacing_source=prepared.spacing_source)
        attrs = {
            "source": item.rel, "sha256": digest, "series": series, "format": item.format,
            "reader": prov.reader if prov else "", "source_shape": list(vol.shape),
            "shape": list(prepared.image.shape),
            "source_spacing_mm": [dz, dy, dx], "spacing_mm": [dz, dy, dx * prepared.factor],
            "spacing_source": prepared.spacing_source, "file_spacing_mm": file_spacing,
            "file_spacing_source": file_spacing_source,
            "images": item.images, "images_reason": item.images_reason,
            "laterality": vol.laterality, "scan_pattern": vol.scan_pattern,
            "vendor": vol.vendor, "bscan_order": vol.bscan_order, "source_intensity": vol.intensity,
            "label": volume_label, "annotated": prepared.mask is not None,
            "column_factor": prepared.factor,
            "flatten": {"height": prepared.height, "bm_row": prepared.bm_row},
            "display_range": list(prepared.display_range),
            "qc": prepared.qc,
            "preprocess": config.to_dict(),
            "octpipe_version": __version__,
        }
        written = write_volume(store, vid, arrays, attrs, array_attrs=array_attrs, overwrite=overwrite)
        rows.append(_row(**common, status="ok" if written else "skipped",
                         error="" if written else "duplicate: same content as another input",
                         seconds=round(time.perf_counter() - t1 + (t1 - t0) / len(volumes), 3)))
    return rows


def _stored_row(volume_id: str, attrs: Mapping[str, object]) -> dict[str, object]:
    """The manifest row of a complete volume, rebuilt from its store attributes."""
    shape = attrs.get("source_shape") or []
    spacing = attrs.get("source_spacing_mm") or []
    return _row(volume_id=volume_id, path=attrs.get("source", ""), sha256=attrs.get("sha256", ""),
                format=attrs.get("format", ""), images=attrs.get("images", ""), series=attrs.get("series", 0),
                shape="x".join(map(str, shape)), spacing_mm=";".join(f"{float(v):.6g}" for v in spacing),
                spacing_source=attrs.get("spacing_source", ""), laterality=attrs.get("laterality") or "",
                status="ok")


def _describe_complete(stored: Mapping[str, Mapping[str, object]], rows: list[dict[str, object]]
                       ) -> list[dict[str, object]]:
    """Rows skipped as already complete, with the volume's shape, spacing and laterality from the store."""
    out = []
    for r in rows:
        vid = str(r.get("volume_id", ""))
        if r["status"] == "skipped" and r["error"] == "already complete" and vid in stored:
            r = dict(_stored_row(vid, stored[vid]), path=r["path"], status="skipped", error="already complete",
                     seconds=r["seconds"])
        out.append(r)
    return out


def _whole_store_manifest(store: Path, stored: Mapping[str, Mapping[str, object]], rows: list[dict[str, object]]
                          ) -> list[dict[str, object]]:
    """The run's rows plus one row per complete volume it did not touch, so the manifest covers the store.

    A volume written by an earlier run keeps that run's row (or, when the run was killed before
    writing its manifest, a row rebuilt from the store); earlier failures of inputs not given
    again are kept too.
    """
    from octpipe.manifest import load_manifest

    try:
        earlier = load_manifest(store / "manifest.csv") if (store / "manifest.csv").is_file() else []
    except (OSError, ValueError, OctpipeError):  # an unreadable earlier manifest: rebuild from the store
        earlier = []
    earlier_ok = {r["volume_id"]: r for r in earlier if r.get("status") == "ok" and r.get("volume_id")}
    seen = {str(r["volume_id"]) for r in rows if r.get("volume_id")}
    paths = {str(r["path"]) for r in rows}
    whole = list(rows)
    whole += [earlier_ok.get(vid) or _stored_row(vid, a) for vid, a in stored.items() if vid not in seen]
    whole += [r for r in earlier if r.get("status") != "ok" and r.get("path") not in paths
              and r.get("volume_id", "") not in stored]
    whole.sort(key=lambda r: (str(r["path"]), str(r["series"])))
    return whole


#: First line of the manifest beside the store: the one file that holds the source paths.
PATHS_NOTE = ("# octpipe ingest manifest: the only file that maps volume ids to source paths (file and folder "
              "names can carry patient names; the store and its exports record salted hashes). Keep it private.")


def _readable_paths(manifest: Path, salt: str) -> dict[str, str]:
    """``{hashed name: path}`` from an earlier manifest beside the store, so earlier volumes keep their paths."""
    from octpipe.manifest import load_manifest

    try:
        rows = load_manifest(manifest) if manifest.is_file() else []
    except (OSError, ValueError, OctpipeError):
        return {}
    return {hashed_path(r["path"], salt): r["path"] for r in rows if r.get("path")}


def _with_paths(rows: Iterable[dict[str, object]], readable: Mapping[str, str]) -> list[dict[str, object]]:
    """Rows with hashed names put back to the paths the user gave (for the manifest beside the store)."""
    out = [dict(r, path=readable.get(str(r["path"]), r["path"])) for r in rows]
    return sorted(out, key=lambda r: (str(r["path"]), str(r["series"])))


def _write_csv(path: Path, rows: Iterable[dict[str, object]], *, comment: str = "") -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as fh:
        if comment:
            fh.write(comment + "\n")
        writer = csv.DictWriter(fh, fieldnames=MANIFEST_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def ingest(
    sources: Sequence[str | Path],
    store: str | Path,
    *,
    workers: int | None = None,
    scheduler: str | None = None,
    manifest: str | Path | None = None,
    overwrite: bool = False,
    memory_limit: str = "auto",
    config: PreprocessConfig | None = None,
    label: int | None = None,
    progress: bool = False,
    echo: Callable[[str], object] | None = None,
    keep_paths: bool = False,
    images: str = "auto",
    spacing: Spacing | None = None,
) -> IngestResult:
    """Ingest every OCT file under ``sources`` into the Zarr ``store``.

    Parameters
    ----------
    sources : sequence of paths
        Files and folders (searched recursively).
    store : path
        The store (created when missing).
    workers : int, optional
        Worker processes of the LocalCluster; default all cores. ``0`` runs every task
        in this process without Dask (for debugging and small tests).
    scheduler : str, optional
        Address of an existing ``dask.distributed`` scheduler (``tcp://host:8786``);
        ``workers`` is then ignored.
    manifest : path, optional
        Where to write the CSV manifest too; default ``<store>-manifest.csv`` beside the
        store. The store always keeps its own ``manifest.csv``.
    overwrite : bool
        Redo volumes that are already complete.
    memory_limit : str
        Memory limit per LocalCluster worker (dask syntax, e.g. ``"2GB"``).
    config : PreprocessConfig, optional
        Preprocessing settings (the paper's by default).
    label : {0, 1}, optional
        Volume label for inputs without annotations: 0 healthy (e.g. a folder of normal
        scans for training), 1 diseased. Annotated inputs take theirs from the mask.
    progress : bool
        Show a progress bar.
    echo : callable, optional
        Receives one line per failed input as it happens.
    keep_paths : bool, default False
        Record the inputs' relative paths in the store (its ``source`` attributes and
        manifest copy) and the logs. By default these get :func:`hashed_path` names, since
        file and folder names often carry patient names; the readable mapping from volume id
        to source path is then written only to the manifest beside the store (``manifest``),
        which says so in its first line. Volumes stay traceable through their ``sha256``.
    images : {"auto", "volume", "bscans"}
        How the B-scan images of a folder are taken (see :func:`discover_inputs`): one
        volume when their names are numbered in sequence (``auto``, default), always one
        volume per folder, or always one volume per image. The manifest's ``images``
        column says which was taken for each row.
    spacing : tuple of 3 (float or None), optional
        Spacing (z, y, x) in mm for every input of this run, None fields keeping the
        file's (:func:`octpipe.volume.parse_spacing`); recorded as
        ``spacing_source="user"``.

    Returns
    -------
    IngestResult

    Raises
    ------
    OctpipeError
        Another process is writing the store (see :func:`octpipe.store.store_lock`), or
        ``store`` is a folder that is not a store.
    ValueError
        ``images`` is not one of :data:`IMAGE_MODES`.
    """
    from octpipe.store import store_lock

    if images not in IMAGE_MODES:  # before the store is created or locked
        raise ValueError(f"images must be one of {', '.join(IMAGE_MODES)}, got {images!r}")
    with store_lock(store, command="ingest"):
        return _ingest_locked(sources, store, workers=workers, scheduler=scheduler, manifest=manifest,
                              overwrite=overwrite, memory_limit=memory_limit, config=config, label=label,
                              progress=progress, echo=echo, keep_paths=keep_paths, images=images, spacing=spacing)


def _ingest_locked(
    sources: Sequence[str | Path],
    store: str | Path,
    *,
    workers: int | None = None,
    scheduler: str | None = None,
    manifest: str | Path | None = None,
    overwrite: bool = False,
    memory_limit: str = "auto",
    config: PreprocessConfig | None = None,
    label: int | None = None,
    progress: bool = False,
    echo: Callable[[str], object] | None = None,
    keep_paths: bool = False,
    images: str = "auto",
    spacing: Spacing | None = None,
) -> IngestResult:
    """:func:`ingest` while holding the store lock."""
    from octpipe.store import complete_volumes, open_store

    t0 = time.perf_counter()
    store = Path(store)
    root = open_store(store)
    salt = str(root.attrs["pseudonym_salt"])
    manifest_path = Path(manifest) if manifest else store.with_name(store.name.removesuffix(".zarr") + "-manifest.csv")
    inputs, rows = discover_inputs(sources, exclude=[store], images=images, cite_names=keep_paths)
    readable: dict[str, str] = {}  # hashed name -> the path given, for the manifest beside the store only
    if not keep_paths:  # file and folder names can carry patient names: record salted hashes instead
        readable = _readable_paths(manifest_path, salt)
        readable.update({hashed_path(item.rel, salt): item.rel for item in inputs})
        readable.update({hashed_path(str(r["path"]), salt): str(r["path"]) for r in rows})
        inputs = [replace(item, rel=hashed_path(item.rel, salt)) for item in inputs]
        for r in rows:
            r["path"] = hashed_path(str(r["path"]), salt)
    if echo:  # sources that are missing or unreadable fail before any task runs: say so too
        for r in rows:
            if r["status"] == "failed":
                echo(f"failed: {readable.get(str(r['path']), r['path'])}: {r['error']}")
    complete = complete_volumes(store)
    from octpipe.preprocess.prepare import PreprocessConfig

    config = config or PreprocessConfig()
    kwargs = {"overwrite": overwrite, "config": config, "label": label, "spacing": spacing}

    bar = None
    if progress:
        from rich.progress import Progress

        bar = Progress(transient=False)
        task = bar.add_task("ingest", total=len(inputs))
        bar.start()

    def collect(new_rows: list[dict[str, object]]) -> None:
        rows.extend(new_rows)
        if echo:
            for r in new_rows:
                if r["status"] == "failed":
                    echo(f"failed: {readable.get(str(r['path']), r['path'])}: {r['error']}")
        if bar is not None:
            bar.advance(task)

    try:
        if workers == 0 and scheduler is None:
            for item in inputs:
                collect(ingest_one(item, str(store), salt, complete, **kwargs))
        else:
            _run_on_dask(inputs, store, salt, complete, kwargs, workers, scheduler, memory_limit, collect)
    finally:
        if bar is not None:
            bar.stop()

    from octpipe.store import complete_volume_attrs

    stored = complete_volume_attrs(store)  # every complete volume's attributes, read once
    rows = _describe_complete(stored, rows)
    rows.sort(key=lambda r: (str(r["path"]), str(r["series"])))
    counts = {s: sum(r["status"] == s for r in rows) for s in ("ok", "skipped", "failed")}
    whole = _whole_store_manifest(store, stored, rows)
    _write_csv(store / "manifest.csv", whole)
    _write_csv(manifest_path, _with_paths(whole, readable), comment=PATHS_NOTE)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    logs = store / "logs"
    logs.mkdir(exist_ok=True)
    log = logs / f"ingest-{stamp}.log"
    seconds = round(time.perf_counter() - t0, 2)
    with open(log, "w") as fh:
        for r in rows:
            fh.write(f"{r['status']}\t{r['path']}\t{r['volume_id']}\t{r['error']}\n")
        fh.write(f"# {counts} in {seconds} s\n")
    (logs / f"ingest-{stamp}.json").write_text(json.dumps({
        "command": "ingest", "octpipe_version": __version__, "git": git_hash(),
        "config": {"sources": [str(s) if keep_paths else hashed_path(str(s), salt) for s in sources],
                   "keep_paths": keep_paths, "store": str(store), "workers": workers,
                   "scheduler": scheduler, "overwrite": overwrite, "memory_limit": memory_limit,
                   "label": label, "images": images, "spacing_mm": None if spacing is None else list(spacing),
                   "preprocess": config.to_dict()},
        "counts": counts, "seconds": seconds,
    }, indent=2))
    return IngestResult(rows=_with_paths(rows, readable), manifest=manifest_path, store=store, log=log,
                        seconds=seconds, counts=counts)


def local_cluster(n_workers: int, *, memory_limit: str = "auto"):
    """A LocalCluster of single-threaded worker processes tuned for per-volume tasks.

    Two settings measured by ``benchmarks/ingest.py``: Dask's default
    ``MALLOC_TRIM_THRESHOLD_=65536`` for workers makes glibc return medium buffers to the
    OS after every volume (4.6x the page faults, 15-22 % more CPU per volume), so it is
    unset; and Zarr's codec thread pool is limited to one thread per worker, so one
    worker uses one core and workers scale with cores.
    """
    import dask
    from dask.distributed import LocalCluster

    environ = "distributed.nanny.pre-spawn-environ"
    with dask.config.set({f"{environ}.MALLOC_TRIM_THRESHOLD_": None, f"{environ}.ZARR_THREADING__MAX_WORKERS": 1}):
        return LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=":0",
                            memory_limit=memory_limit, silence_logs=40)


def _run_on_dask(inputs, store, salt, complete, kwargs, workers, scheduler, memory_limit, collect) -> None:
    from dask.distributed import Client, as_completed

    cluster = None
    if scheduler:
        client = Client(scheduler)
    else:
        cluster = local_cluster(workers or os.cpu_count() or 1, memory_limit=memory_limit)
        client = Client(cluster)
    try:
        futures = client.map(ingest_one, inputs, store=str(store), salt=salt, complete=complete,
                             pure=False, **kwargs)
        owner = {f.key: item for f, item in zip(futures, inputs, strict=True)}
        for future in as_completed(futures):
            try:
                collect(future.result())
            except Exception as exc:  # a worker died or a reader bug: record it, go on
                item = owner[future.key]
                collect([_row(path=item.rel, format=item.format, images=item.images, status="failed",
                              error=f"task failed: {type(exc).__name__}: {exc}".splitlines()[0])])
    finally:
        client.close()
        if cluster is not None:
            cluster.close()

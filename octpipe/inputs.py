"""Input discovery: which files and folders under the given sources are OCT inputs, and how each is read.

:func:`discover_inputs` walks the sources and returns one :class:`InputFile` per OCT file
or folder of B-scan images read as one volume (:func:`classify_image_folder` decides from
the names and sizes alone), and a manifest row for everything else (skipped or failed,
with the reason). Nothing is read beyond the headers that tell the format.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

from octpipe.errors import FormatError, OctpipeError
from octpipe.io.detect import detect_format
from octpipe.manifest import manifest_row as _row

__all__ = [
    "InputFile", "discover_inputs", "annotation_sidecar", "classify_image_folder", "ImageFolderDecision",
    "IMAGE_MODES", "LABEL_MAP_MAX_VALUES", "MIN_SEQUENCE",
]

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

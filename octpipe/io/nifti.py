"""NIfTI-1: write volumes for research tools, read them (and foreign NIfTI) back.

Axis convention (octpipe files)
    An octpipe volume is ``(n_bscans, n_axial, n_ascans)`` = (z, y, x). In the
    NIfTI file it is stored transposed to ``(n_ascans, n_bscans, n_axial)``, so the
    voxel axes are

    ============  ======================  ===============================
    voxel axis    octpipe axis            world axis of the affine
    ============  ======================  ===============================
    i             x, A-scan (lateral)     +x (R), step = lateral mm
    j             z, B-scan (slow axis)   +y (A), step = B-scan spacing mm
    k             y, depth (axial)        -z (S), step = axial mm
    ============  ======================  ===============================

    i.e. the affine (:func:`nifti_affine`) is ``diag(lateral, bscan, -axial, 1)``
    with voxel (0, 0, 0) at the origin. Depth runs towards -z, so in a RAS viewer
    (ITK-SNAP, 3D Slicer, FSLeyes) a coronal slice is a B-scan shown the usual way
    up (vitreous on top), an axial slice is an en-face image, and distances are in
    mm. The header's zooms (pixdim) are therefore ``(lateral, bscan, axial)``, i.e.
    ``spacing_mm`` permuted by ``(2, 0, 1)``. The position of the scan in the eye
    is not known, so the world frame is nominal. qform (code 1, scanner) and sform
    (code 2, aligned) both hold the affine; xyzt units are mm. Data are float32.
    ``intent_name`` is ``"octpipe-xzy"`` to mark the convention; ``descrip``
    holds the caller's description. NIfTI has no laterality field: keep it in a
    side-car if needed.

Reading
    :func:`read_nifti` first decides whether a file is a *volume* or *one B-scan*,
    then maps its voxel axes (i, j, k) to octpipe's (z, y, x).

    Volume or B-scan (trailing axes of length 1 are dropped first, e.g. a 4-D file
    with one time point; other 4-D+ data are refused):

    1. Files marked ``octpipe-xzy`` (:func:`write_nifti`) are volumes, inverted
       exactly, whatever their shape (a 1-B-scan file stays a 1-B-scan volume).
    2. A colour axis is recognised, in this order: the RGB24 / RGBA32 datatype
       (unambiguous); NIfTI's vector layout (5-D ``(x, y, z, 1, c)`` with intent
       VECTOR, RGB_VECTOR or RGBA_VECTOR, ``c`` = 3 or 4; a 3-D file with such an
       intent and a last axis of 3 or 4 likewise); otherwise, for a 3-D scalar
       array, a *first or last* axis of size 3 or 4 while both other axes are at
       least 5, as nnU-Net raw datasets keep RGB B-scans (``(x, y, 3)`` or
       ``(3, x, y)``). That last, shape-only rule is not applied when the
       sform/qform direction is octpipe's own, ``diag(+1, +1, -1)`` (depth towards
       -z): such a file is an octpipe volume that lost its intent. An octpipe
       volume keeps its B-scan axis in the *middle* (j), so a genuine volume of
       3 or 4 B-scans is never taken for colour; only a volume with 3-4 A-scans
       or depth samples and neither octpipe mark would be. Colour becomes grey
       as in :mod:`octpipe.io.images`: equal channels keep their values exactly,
       else ITU-R BT.601 luminance; alpha is dropped.
    3. Without the colour axis, a 2-D image, or a 3-D one with an axis of length
       1, is one B-scan, ``(1, n_axial, n_ascans)``; any other 3-D image is a
       volume.

    Volumes (octpipe's and foreign ones) use the *index* convention of the table
    above: i = A-scan, j = B-scan, k = depth with k = 0 the top row of each
    B-scan. The affine's direction and origin are ignored; its column norms give
    the spacing.

    Orientation of a single B-scan. Its two voxel axes, in file order, are
    (a, b) once the colour axis and an axis of length 1 are dropped. By default
    a is the A-scan axis (columns, left to right) and b the depth axis (rows,
    top to bottom): the array is stored ``array[x, y]``, as ITK, SimpleITK and
    nnU-Net's 2-D conversions store a picture, so a PNG and its NIfTI conversion
    read alike. When (a, b) = (i, j) and the file has a sform or qform (code > 0),
    its in-plane direction is used: if i points mainly along world y and j along
    world x, the array is stored row-major and is transposed; and depth runs down
    when the row axis points the same way (sign) as the column axis. Both plain
    frames, nibabel's identity (RAS) and ITK's identity direction (LPS, i.e.
    ``diag(-1, -1, 1)`` in RAS), are therefore read as stored; an affine that
    reverses one of the two axes only reverses the rows (the lateral sense has
    no anatomical meaning without laterality, depth-down does). A direction that
    leaves the world x-y plane is ignored. A B-scan in a plane holding k
    (channels first, or an axis i or j of length 1) follows the volume
    convention: k is depth, k = 0 the top row, direction ignored.

Spacing
    Voxel sizes are the column norms of the sform (else the qform, else the raw
    pixdim), in the header's spatial unit (xyzt_units metre and micrometre are
    converted to mm). Volumes take them as before: an unknown unit is read as mm,
    a zero or non-finite size makes the whole triple the default
    (:data:`~octpipe.io.images.DEFAULT_SPACING_MM`, ``spacing_source="default"``).
    A single B-scan takes (0, axial, lateral) from its row and column axes with
    ``spacing_source="file"`` only when the unit is known: a unit in
    xyzt_units, or an explicit sform/qform (its world space is mm by NIfTI
    convention); and not when both sizes are exactly 1 (the placeholder that
    picture converters write). Otherwise it gets the default spacing.

Other
    An integer (or RGB) image with at most 16 distinct values
    (:data:`octpipe.inputs.LABEL_MAP_MAX_VALUES`) is a label map, not OCT: the
    reader raises :class:`~octpipe.errors.FormatError` and
    :func:`nifti_label_map_values` lets discovery skip it. Laterality is None and
    ``intensity`` is ``"display"``; values keep the file's scaling
    (``scl_slope``/``scl_inter`` applied), as float32.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import numpy.typing as npt
from nibabel.filebasedimages import ImageFileError
from nibabel.openers import ImageOpener
from nibabel.spatialimages import HeaderDataError

from octpipe.errors import CorruptFileError, FormatError, OctpipeError, UnsupportedFormatError
from octpipe.io._common import DEFLATE_MAX_RATIO, atomic_output, check_writable, file_sha256, make_provenance
from octpipe.io.images import DEFAULT_SPACING_MM, _luminance
from octpipe.volume import OctVolume

__all__ = ["write_nifti", "read_nifti", "nifti_affine", "nifti_label_map_values", "OCTPIPE_INTENT_NAME"]

#: ``intent_name`` written by :func:`write_nifti` to mark the octpipe axis convention.
OCTPIPE_INTENT_NAME = "octpipe-xzy"
#: Largest volume read_nifti will decode (float32 bytes); a larger header is taken as corrupt.
_MAX_VOLUME_BYTES = 1 << 35  # 32 GiB
#: Volume axes (z, y, x) -> file axes (i, j, k) = (x, z, y).
_TO_FILE = (2, 0, 1)
#: File axes (i, j, k) = (x, z, y) -> volume axes (z, y, x).
_FROM_FILE = (1, 2, 0)
#: Structured datatypes nibabel gives RGB24 / RGBA32 voxels.
_RGB_FIELDS = (("R", "G", "B"), ("R", "G", "B", "A"))
#: NIFTI_INTENT_VECTOR, NIFTI_INTENT_RGB_VECTOR, NIFTI_INTENT_RGBA_VECTOR.
_VECTOR_INTENTS = (1007, 2003, 2004)
#: xyzt_units spatial code -> mm per unit (1 metre, 2 mm, 3 micrometre).
_UNIT_MM = {1: 1000.0, 2: 1.0, 3: 0.001}
#: A shape-only colour axis needs both other axes at least this long.
_MIN_IMAGE_SIDE = 5
#: Direction matrix of the affine :func:`write_nifti` writes (i -> +x, j -> +y, k -> -z).
_OCTPIPE_DIRECTION = np.diag([1.0, 1.0, -1.0])


def _check_spacing(spacing_mm: tuple[float, float, float]) -> tuple[float, float, float]:
    spacing = tuple(float(s) for s in spacing_mm)
    if len(spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing_mm must be 3 finite values > 0 (mm), got {spacing_mm}")
    return spacing  # type: ignore[return-value]


def nifti_affine(shape: tuple[int, int, int], spacing_mm: tuple[float, float, float]) -> npt.NDArray[np.float64]:
    """Return the voxel-to-mm affine that :func:`write_nifti` uses for a volume.

    Parameters
    ----------
    shape : tuple of 3 ints
        The octpipe volume shape ``(n_bscans, n_axial, n_ascans)`` (checked, not
        otherwise used: the affine does not depend on it).
    spacing_mm : tuple of 3 floats
        (between B-scans, axial, lateral) in mm, each > 0.

    Returns
    -------
    ndarray of float64, shape (4, 4)
        ``diag(lateral, bscan, -axial, 1)``: file voxel (i, j, k) = (A-scan,
        B-scan, depth) to world mm; see the module docstring.

    Raises
    ------
    ValueError
        ``shape`` is not 3 positive ints or a spacing is not finite and > 0.

    Examples
    --------
    >>> nifti_affine((3, 40, 32), (0.12, 0.004, 0.01)).diagonal().tolist()
    [0.01, 0.12, -0.004, 1.0]
    """
    if len(shape) != 3 or not all(int(n) >= 1 for n in shape):
        raise ValueError(f"shape must be 3 positive ints (n_bscans, n_axial, n_ascans), got {shape}")
    bscan, axial, lateral = _check_spacing(spacing_mm)
    return np.diag([lateral, bscan, -axial, 1.0])


def write_nifti(
    path: str | Path,
    data: npt.ArrayLike,
    *,
    spacing_mm: tuple[float, float, float],
    overwrite: bool = False,
    description: str = "",
) -> Path:
    """Write a volume as NIfTI-1 (``.nii`` or ``.nii.gz``) with the octpipe axis convention.

    Parameters
    ----------
    path : str or Path
        Output file; must end in ``.nii`` or ``.nii.gz`` (gzip-compressed).
    data : array_like, shape (n_bscans, n_axial, n_ascans)
        Real-valued volume; stored as float32 (values unchanged, no rescaling).
    spacing_mm : tuple of 3 floats
        (between B-scans, axial, lateral) in mm, each > 0.
    overwrite : bool
        Replace an existing file.
    description : str
        Free text for the header's ``descrip`` field (ASCII, at most 80 characters).

    Returns
    -------
    Path
        The written file (written to a temporary file, then renamed into place).

    Raises
    ------
    ValueError
        ``data`` is not a non-empty 3-D real array, the suffix is wrong, a spacing
        is out of range or ``description`` is too long / not ASCII.
    OctpipeError
        ``path`` exists and ``overwrite`` is false.

    Examples
    --------
    >>> import tempfile
    >>> p = write_nifti(tempfile.mkdtemp() + "/v.nii.gz", np.zeros((3, 40, 32)), spacing_mm=(0.12, 0.004, 0.01))
    >>> nib.load(p).header.get_zooms()
    (np.float32(0.01), np.float32(0.12), np.float32(0.004))
    """
    arr = np.asarray(data)
    if arr.dtype.kind not in "uif":
        raise ValueError(f"data must be real-valued (int, uint or float), got {arr.dtype}")
    if arr.ndim != 3 or min(arr.shape) < 1:
        raise ValueError(f"data must be 3-D (n_bscans, n_axial, n_ascans) and non-empty, got shape {arr.shape}")
    name = Path(path).name
    if not (name.endswith(".nii") or name.endswith(".nii.gz")):
        raise ValueError(f"path must end in .nii or .nii.gz, got {name!r}")
    if not description.isascii() or len(description) > 80:
        raise ValueError(f"description must be ASCII and at most 80 characters, got {len(description)} characters")
    affine = nifti_affine(arr.shape, spacing_mm)
    path = check_writable(path, overwrite=overwrite)

    stored = np.ascontiguousarray(arr.transpose(_TO_FILE), dtype=np.float32)
    img = nib.Nifti1Image(stored, affine)
    header = img.header
    header.set_data_dtype(np.float32)
    header.set_xyzt_units(xyz="mm", t="sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=2)
    header["intent_name"] = OCTPIPE_INTENT_NAME.encode("ascii")
    header["descrip"] = description.encode("ascii")
    header["scl_slope"] = 1.0
    header["scl_inter"] = 0.0

    suffix = ".nii.gz" if name.endswith(".nii.gz") else ".nii"
    with atomic_output(path, suffix=suffix) as tmp:  # nibabel picks the format from the suffix
        nib.save(img, tmp)
    return path


def _source_files(img: nib.Nifti1Pair | nib.Nifti2Pair, path: Path) -> list[Path]:
    """Return the file(s) holding an image: one for .nii, header + image for a .hdr/.img pair."""
    files = []
    for key in ("header", "image"):
        holder = img.file_map.get(key)
        name = getattr(holder, "filename", None)
        if name is not None and Path(name) not in files:
            files.append(Path(name))
    return files or [path]


def _one_line(exc: BaseException) -> str:
    """An exception's message as one line (nibabel's span several)."""
    return " ".join(str(exc).split())[:300]


def _starts_like_nifti(path: Path) -> bool:
    """Tell whether a file begins with a NIfTI-1/2 ``sizeof_hdr`` (348 or 540), gzipped or not."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
            if head[:2] == b"\x1f\x8b":
                fh.seek(0)
                with gzip.GzipFile(fileobj=fh) as gz:
                    head = gz.read(4)
    except (OSError, EOFError, zlib.error):
        return False
    if len(head) < 4:
        return False
    return any(int.from_bytes(head, order) in (348, 540) for order in ("little", "big"))


def _column_norms(header: nib.Nifti1Header, header_file: Path) -> list[float]:
    """Voxel sizes (i, j, k) in the header's unit: column norms of the sform, else the qform, else the raw pixdim.

    nibabel replaces a zero pixdim by 1 in its fallback affine; the raw pixdim is used
    instead so that a missing voxel size stays 0 (and the caller falls back to defaults).
    """
    if int(header["sform_code"]) > 0:
        columns = np.linalg.norm(np.asarray(header.get_sform(), dtype=np.float64)[:3, :3], axis=0)
    elif int(header["qform_code"]) > 0:
        columns = np.linalg.norm(np.asarray(header.get_qform(), dtype=np.float64)[:3, :3], axis=0)
    else:
        try:  # the header as stored, before nibabel's load-time fixes
            with ImageOpener(header_file) as fh:
                pixdim = type(header).from_fileobj(fh, check=False)["pixdim"]
        except (OSError, EOFError, ValueError, HeaderDataError, zlib.error):
            pixdim = header["pixdim"]
        columns = np.abs(np.asarray(pixdim, dtype=np.float64)[1:4])
    return [float(n) for n in columns]


def _to_mm(size: float, scale: float) -> float:
    """A header voxel size (float32 in the file) in mm, as the shortest decimal (0.12, not 0.1199999973)."""
    return float(str(np.float32(size * scale))) if np.isfinite(size) else float("nan")


def _header_text(field: npt.NDArray[np.bytes_]) -> str:
    """Decode a fixed-length header string field (up to the first NUL)."""
    return bytes(np.asarray(field).item()).split(b"\x00")[0].decode("ascii", "replace").strip()


def _rgb_channels(dtype: np.dtype) -> int:
    """3 or 4 for nibabel's RGB24 / RGBA32 structured datatypes, else 0."""
    return len(dtype.names) if dtype.names in _RGB_FIELDS else 0


def _direction(header: nib.Nifti1Header) -> npt.NDArray[np.float64] | None:
    """Unit columns of the sform (else qform) 3x3 part; None without either or when not finite.

    A zero column stays zero.
    """
    if int(header["sform_code"]) > 0:
        affine = header.get_sform()
    elif int(header["qform_code"]) > 0:
        affine = header.get_qform()
    else:
        return None
    matrix = np.asarray(affine, dtype=np.float64)[:3, :3]
    if not np.isfinite(matrix).all():
        return None
    norms = np.linalg.norm(matrix, axis=0)
    return np.divide(matrix, norms, out=np.zeros_like(matrix), where=norms > 0)


def _colour_axis(shape: tuple[int, ...], intent_code: int) -> int | None:
    """The axis of a 3-D scalar array that holds RGB(A) samples, by shape (and vector intent); else None."""
    if intent_code in _VECTOR_INTENTS and shape[-1] in (3, 4):
        return len(shape) - 1
    for axis in (len(shape) - 1, 0):  # channels last (nibabel, nnU-Net) or first
        others = [n for i, n in enumerate(shape) if i != axis]
        if shape[axis] in (3, 4) and min(others) >= _MIN_IMAGE_SIDE:
            return axis
    return None


def _plane_orientation(direction: npt.NDArray[np.float64] | None) -> tuple[bool, bool]:
    """(transpose, reverse rows) for a B-scan stored in the file's (i, j) plane; see the module docstring."""
    if direction is None:
        return False, False
    u, v = direction[:, 0], direction[:, 1]
    if not (np.abs(u).max() > 0 and np.abs(v).max() > 0):
        return False, False
    axis_u, axis_v = int(np.argmax(np.abs(u))), int(np.argmax(np.abs(v)))
    if {axis_u, axis_v} != {0, 1}:  # not in the world x-y plane (or degenerate): index convention
        return False, False
    transpose = axis_u == 1  # i runs along world y: the array is stored row-major
    column, row = (v, u) if transpose else (u, v)
    return transpose, bool(np.sign(column[0]) != np.sign(row[1]))


class _LabelMapError(FormatError):
    """An integer image with few distinct values: a label map, not OCT."""

    def __init__(self, n_values: int, kind: str, path: Path) -> None:
        self.n_values = n_values
        super().__init__(f"looks like a label map ({n_values} values), not {kind}", path)


def _label_map_values(data: npt.NDArray[np.float32]) -> int | None:
    """Distinct values of ``data`` when at most LABEL_MAP_MAX_VALUES, else None (a sample decides most cases)."""
    from octpipe.inputs import LABEL_MAP_MAX_VALUES

    flat = data.ravel()
    step = max(1, flat.size // 65536)
    if step > 1 and len(np.unique(flat[::step])) > LABEL_MAP_MAX_VALUES:
        return None
    n = len(np.unique(flat))
    return n if n <= LABEL_MAP_MAX_VALUES else None


def nifti_label_map_values(path: str | Path) -> int | None:
    """Number of distinct values when a NIfTI file is a label map, else None.

    For input discovery (:func:`octpipe.inputs.discover_inputs`): a label map is an
    integer or RGB image with at most :data:`octpipe.inputs.LABEL_MAP_MAX_VALUES`
    distinct (grey) values, which :func:`read_nifti` refuses. Only the header is read
    for a float image (octpipe's own files); a file that cannot be read gives None (the
    reader reports it when the file is ingested).

    Parameters
    ----------
    path : str or Path
        A NIfTI file.

    Returns
    -------
    int or None

    Examples
    --------
    >>> import tempfile
    >>> p = tempfile.mkdtemp() + "/labels.nii.gz"
    >>> nib.save(nib.Nifti1Image(np.arange(40, dtype=np.uint8).reshape(8, 5) % 3, np.eye(4)), p)
    >>> nifti_label_map_values(p)
    3
    """
    try:
        dtype = nib.load(path).header.get_data_dtype()
        if dtype.kind not in "uib" and not _rgb_channels(dtype):
            return None
        read_nifti(path)
    except _LabelMapError as exc:
        return exc.n_values
    except Exception:  # noqa: BLE001 - discovery never fails on a damaged file; reading it will say why
        return None
    return None


def read_nifti(path: str | Path) -> OctVolume:
    """Read a NIfTI-1/2 image as an :class:`OctVolume`.

    Parameters
    ----------
    path : str or Path
        A ``.nii``, ``.nii.gz`` or ``.hdr``/``.img`` file.

    Returns
    -------
    OctVolume
        ``data`` float32 ``(n_bscans, n_axial, n_ascans)`` following the rules in
        the module docstring (a volume, or one grey B-scan ``(1, n_axial,
        n_ascans)``); ``spacing_source`` ``"file"`` or ``"default"``,
        ``laterality=None``, ``intensity="display"``, ``scan_pattern``
        ``"volume"`` or ``"line"``. ``meta`` holds ``octpipe_layout`` (True for
        files written by :func:`write_nifti`), the stored ``dtype``,
        ``description`` (the header's ``descrip``), ``channels`` (1, 3 or 4) and
        ``orientation`` (for a B-scan: ``"index"``, ``"transposed"``,
        ``"rows reversed"`` or both; ``"index"`` for a volume). NaN/Inf voxels
        are 0 in ``data`` and True in ``invalid`` (None when there are none).

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist.
    FormatError
        The file is not NIfTI, or it is a label map (an integer image with few
        distinct values).
    CorruptFileError
        The file is truncated or its header does not fit its data.
    UnsupportedFormatError
        The image is 4-D or more, or its data type is complex.

    Examples
    --------
    >>> import tempfile
    >>> p = write_nifti(tempfile.mkdtemp() + "/v.nii", np.ones((2, 8, 4)), spacing_mm=(0.1, 0.004, 0.01))
    >>> v = read_nifti(p)
    >>> v.shape, v.spacing_mm
    ((2, 8, 4), (0.1, 0.004, 0.01))

    An RGB B-scan stored ``(x, y, 3)``, as nnU-Net keeps it, is one grey B-scan:

    >>> q = tempfile.mkdtemp() + "/rgb.nii.gz"
    >>> nib.save(nib.Nifti1Image(np.zeros((32, 40, 3), np.float32), np.eye(4)), q)
    >>> read_nifti(q).shape
    (1, 40, 32)
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    if path.is_dir():
        raise FormatError("is a folder, not a NIfTI file", path)
    try:
        img = nib.load(path)
    except ImageFileError as exc:
        if _starts_like_nifti(path):
            raise CorruptFileError("NIfTI header is truncated or damaged", path) from exc
        raise FormatError(f"not a NIfTI file ({_one_line(exc)})", path) from exc
    except (EOFError, OSError, ValueError, zlib.error, gzip.BadGzipFile, HeaderDataError, OverflowError) as exc:
        raise CorruptFileError(f"cannot read the NIfTI header: {_one_line(exc)}", path) from exc
    try:
        return _volume_from_image(img, path)
    except OctpipeError:
        raise
    except (HeaderDataError, OverflowError, ValueError, TypeError, zlib.error, EOFError) as exc:
        raise CorruptFileError(f"damaged NIfTI header: {type(exc).__name__}: {_one_line(exc)}", path) from exc


def _read_values(img: nib.Nifti1Pair | nib.Nifti2Pair, path: Path) -> tuple[npt.NDArray[np.float32], int, int | None]:
    """Check the header against the file and decode the voxels as float32.

    Returns the values (shape as stored, trailing length-1 axes beyond the third
    dropped; the RGB fields of RGB24/RGBA32 as a last axis; NIfTI's 5-D vector layout
    as ``(x, y, z, c)``), the number of colour samples (0 when scalar) and the colour
    axis when the layout says it (else None).
    """
    header = img.header
    shape = tuple(int(n) for n in img.shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    dtype = header.get_data_dtype()
    rgb = _rgb_channels(dtype)
    if not rgb and (dtype.kind not in "uifb" or dtype.names is not None):
        raise UnsupportedFormatError(f"data type {dtype} is not supported (need real-valued or RGB voxels)", path)
    vector = (not rgb and len(shape) == 5 and shape[3] == 1 and shape[4] in (3, 4)
              and int(header["intent_code"]) in _VECTOR_INTENTS)
    if len(shape) > 3 and not vector:
        raise UnsupportedFormatError(f"{len(shape)}-D image {shape}; only 2-D and 3-D images are supported", path)
    if len(shape) < 2 or min(shape) < 1:
        raise CorruptFileError(f"image shape {shape} is not a 2-D or 3-D image", path)
    n_voxels = int(np.prod(shape, dtype=np.int64))
    if n_voxels * 4 * max(rgb, 1) > _MAX_VOLUME_BYTES:
        raise CorruptFileError(f"header says shape {shape}, over {_MAX_VOLUME_BYTES >> 30} GiB", path)
    files = _source_files(img, path)
    image_file = files[-1]
    if not image_file.exists():
        raise CorruptFileError(f"image file {image_file.name} of the header/image pair is missing", path)
    offset = float(header.get_data_offset())
    if not (np.isfinite(offset) and 0 <= offset < _MAX_VOLUME_BYTES):
        raise CorruptFileError(f"implausible vox_offset {offset}", path)
    needed = int(offset) + n_voxels * dtype.itemsize
    have = image_file.stat().st_size
    if str(image_file).endswith(".gz"):
        # the decoded size is unknown before decompressing, but deflate expands at most 1032-fold:
        # refuse a shape that this file cannot hold before anything of that size is allocated
        if needed > have * DEFLATE_MAX_RATIO:
            raise CorruptFileError(f"header says {needed} bytes (shape {shape}, {dtype}), more than "
                                   f"{have} gzip bytes can hold", path)
    elif have < needed:
        raise CorruptFileError(f"header says {needed} bytes (shape {shape}, {dtype}) but the file has {have}",
                               path)
    try:
        if rgb:  # structured voxels (no scaling applies to RGB types): fields become a last axis
            raw = np.asarray(img.dataobj).reshape(shape)
            values = np.stack([raw[name] for name in dtype.names], axis=-1).astype(np.float32)
            return values, rgb, len(shape)
        with np.errstate(all="ignore"):  # a damaged scl_slope gives inf/NaN, marked invalid later
            values = np.asarray(img.dataobj, dtype=np.float32).reshape(shape)
    except (EOFError, OSError, ValueError, zlib.error, gzip.BadGzipFile) as exc:
        raise CorruptFileError(f"cannot read the image data (truncated?): {_one_line(exc)}", path) from exc
    if vector:
        return values.reshape(*shape[:3], shape[4]), shape[4], 3
    return values, 0, None


def _volume_from_image(img: nib.Nifti1Pair | nib.Nifti2Pair, path: Path) -> OctVolume:
    """The body of :func:`read_nifti` once nibabel has parsed the header."""
    if not isinstance(img, (nib.Nifti1Pair, nib.Nifti2Pair)):  # the Image classes are subclasses
        raise FormatError(f"not a NIfTI file (nibabel read it as {type(img).__name__})", path)

    header = img.header
    dtype = header.get_data_dtype()
    values, channels, colour_axis = _read_values(img, path)
    intent = _header_text(header["intent_name"])
    direction = _direction(header)
    octpipe_mark = intent == OCTPIPE_INTENT_NAME or (
        direction is not None and bool(np.allclose(direction, _OCTPIPE_DIRECTION, atol=1e-6)))
    if colour_axis is None and values.ndim == 3 and not octpipe_mark:
        colour_axis = _colour_axis(values.shape, int(header["intent_code"]))
        channels = values.shape[colour_axis] if colour_axis is not None else 0
    ours = intent == OCTPIPE_INTENT_NAME and colour_axis is None and values.ndim == 3

    axes = list(range(values.ndim))  # the file voxel axis of each axis of `grey`
    if colour_axis is not None:
        grey = _luminance(np.moveaxis(values, colour_axis, -1))
        axes.remove(colour_axis)
    else:
        grey = values
    is_volume = grey.ndim == 3 and (ours or 1 not in grey.shape)
    column_axis = row_axis = 0
    if is_volume:
        data, orientation = grey.transpose(_FROM_FILE), "index"
    else:
        while grey.ndim > 2:  # drop an axis of length 1 (the first one)
            drop = grey.shape.index(1)
            grey = grey[(slice(None),) * drop + (0,)]
            del axes[drop]
        transpose, reverse = _plane_orientation(direction) if axes == [0, 1] else (False, False)
        bscan = grey if transpose else grey.T  # grey[a, b]: by default a = column, b = row
        if reverse:
            bscan = bscan[::-1]
        data = bscan[None]
        steps = [name for name, done in (("transposed", transpose), ("rows reversed", reverse)) if done]
        orientation = ", ".join(steps) or "index"
        column_axis, row_axis = (axes[1], axes[0]) if transpose else (axes[0], axes[1])

    if not ours and (dtype.kind in "uib" or _rgb_channels(dtype)):
        n_values = _label_map_values(grey)  # the values as stored in order: no copy of a transposed volume
        if n_values is not None:
            raise _LabelMapError(n_values, "an OCT volume" if is_volume else "a B-scan", path)

    files = _source_files(img, path)
    norms = _column_norms(header, files[0])
    unit_scale = _UNIT_MM.get(int(header["xyzt_units"]) & 7)
    explicit = int(header["sform_code"]) > 0 or int(header["qform_code"]) > 0
    if is_volume:
        scale = 1.0 if unit_scale is None else unit_scale  # volumes: an unknown unit is mm
        candidate = (_to_mm(norms[1], scale), _to_mm(norms[2], scale), _to_mm(norms[0], scale))
        spacing_ok = all(np.isfinite(s) and s > 0 for s in candidate)
    else:
        scale = unit_scale if unit_scale is not None else (1.0 if explicit else None)
        lateral, axial = norms[column_axis], norms[row_axis]
        placeholder = lateral == 1.0 and axial == 1.0
        candidate = (0.0, _to_mm(axial, scale or 1.0), _to_mm(lateral, scale or 1.0))
        spacing_ok = (scale is not None and not placeholder
                      and all(np.isfinite(s) and s > 0 for s in candidate[1:]))
    spacing, source = (candidate, "file") if spacing_ok else (DEFAULT_SPACING_MM, "default")
    descrip = _header_text(header["descrip"])

    prov, vid = make_provenance(path, reader="nifti", format="nifti", sha256=file_sha256(files))
    data = np.ascontiguousarray(data, dtype=np.float32)
    invalid = ~np.isfinite(data)  # NaN/Inf voxels (or a damaged scl_slope): "no data", as in .vol files
    if invalid.any():
        data = data.copy() if not data.flags.writeable else data
        data[invalid] = 0.0
    return OctVolume(
        data=data,
        invalid=invalid if invalid.any() else None,
        spacing_mm=spacing,
        spacing_source=source,
        laterality=None,
        scan_pattern="volume" if data.shape[0] > 1 else "line",
        vendor="unknown",
        intensity="display",
        volume_id=vid,
        provenance=prov,
        meta={"octpipe_layout": ours, "dtype": str(dtype), "description": descrip,
              "channels": channels or 1, "orientation": orientation},
    )

"""Write minimal Heidelberg ``.E2E`` files, as test fixtures (not Heyex-compatible exports).

:func:`write_heyex_e2e_minimal` builds the ``CMDb`` container that :mod:`octpipe.io.heyex_e2e`
reads, from the reader's own field tables, with the variants the reader must handle: several
series, a stale or missing directory, B-scans stored last to first, and a patient record
(type 9, which the reader never decodes) for the privacy tests. :func:`encode_ufloat16` is the
inverse of the reader's :func:`~octpipe.io.heyex_e2e.decode_ufloat16`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt

from octpipe.io._binary import Field as _Field
from octpipe.io._binary import pack, struct_for
from octpipe.io._common import check_writable
from octpipe.io._heyex import FLT_MAX
from octpipe.io.heyex_e2e import (
    _BSCAN_META,
    _BSCAN_META_FIELDS,
    _CHUNK_HEADER,
    _CHUNK_HEADER_FIELDS,
    _DIRECTORY_ENTRY,
    _DIRECTORY_ENTRY_FIELDS,
    _DIRECTORY_HEADER,
    _DIRECTORY_HEADER_FIELDS,
    _FILE_HEADER,
    _FILE_HEADER_FIELDS,
    _FIRST_CHUNK,
    _IMAGE_BSCAN,
    _IMAGE_HEADER,
    _IMAGE_HEADER_FIELDS,
    _LATERALITY,
    _LATERALITY_FIELDS,
    _LAYER_HEADER,
    _LAYER_HEADER_FIELDS,
    _MAGIC_DATA,
    _MAGIC_DIR,
    _MAGIC_FILE,
    _MAGIC_MAIN_DIR,
    _TYPE_BSCAN_META,
    _TYPE_IMAGE,
    _TYPE_LATERALITY,
    _TYPE_LAYER,
    _TYPE_PATIENT,
)

__all__ = ["write_heyex_e2e_minimal", "encode_ufloat16"]


# A patient record (type 9), put into test files for the privacy tests. The reader never
# decodes type-9 payloads.
_PATIENT_FIELDS: tuple[_Field, ...] = (
    _Field("first_name", "31s", "first name", identifying=True),
    _Field("surname", "66s", "surname", identifying=True),
    _Field("birth_date", "I", "birth date", identifying=True),
    _Field("sex", "1s", "sex", identifying=True),
    _Field("patient_id", "25s", "patient id", identifying=True),
)


_PATIENT = struct_for(_PATIENT_FIELDS)


def encode_ufloat16(values: npt.ArrayLike) -> npt.NDArray[np.uint16]:
    """Encode linear reflectivity as E2E "ufloat16" codes (inverse of :func:`decode_ufloat16`).

    The mantissa is rounded to the nearest of 1024 steps (relative error <= 2 ** -11).
    Values below ``2 ** -63`` become code 0; NaN becomes 0xFFFF, the "empty" code.

    Parameters
    ----------
    values : array_like of float
        Values in [0, 2) or NaN.

    Returns
    -------
    ndarray of uint16
        Same shape as ``values``.

    Raises
    ------
    ValueError
        If a value is negative, infinite or >= 2.

    Examples
    --------
    >>> encode_ufloat16([1.0, 0.5, 0.75]).tolist()
    [64512, 63488, 64000]
    """
    x = np.asarray(values, dtype=np.float64)
    empty = np.isnan(x)
    bad = ~empty & ~((x >= 0) & (x < 2.0))
    if np.any(bad):
        raise ValueError(f"ufloat16 values must be in [0, 2) or NaN, got {x[bad].ravel()[0]!r}")
    safe = np.where(empty | (x <= 0), 1.0, x)
    frac, exp2 = np.frexp(safe)  # safe = frac * 2**exp2, frac in [0.5, 1)
    exponent = exp2.astype(np.int64) - 1 + 63
    mantissa = np.rint((2.0 * frac - 1.0) * 1024.0).astype(np.int64)
    carry = mantissa >= 1024
    mantissa[carry] = 0
    exponent[carry] += 1
    codes = np.clip((exponent << 10) | mantissa, 0, 0xFFFF)
    codes = np.where(exponent < 0, 0, codes)
    codes = np.where(x <= 0, 0, codes)
    codes = np.where(empty, 0xFFFF, codes)
    return codes.astype(np.uint16)


_Spec = tuple[tuple[int, int, int], int, int, int, bytes]  # key, slice_id, ind, type, payload


def _magic12(magic: bytes) -> bytes:
    return magic.rstrip(b"\0").ljust(12, b"\0")


def _chunk_specs(volumes: list[npt.NDArray[np.float64]], lateralities: Sequence[str | None],
                 layers: Sequence[Mapping[int, npt.ArrayLike] | None], keys: Sequence[tuple[int, int, int]],
                 scale_y_mm: float, scan_width_deg: float, bscan_distance_deg: float,
                 patient_name: str | None, reverse_bscans: bool) -> list[_Spec]:
    """(key, slice_id, ind, type, payload) for every data chunk, in file order."""
    specs: list[_Spec] = []
    eye = {"OD": b"R", "OS": b"L"}
    for vol, lat, lay, key in zip(volumes, lateralities, layers, keys, strict=True):
        n, height, width = vol.shape
        if lat is not None:
            payload = pack(_LATERALITY_FIELDS, _LATERALITY, {"laterality": eye[lat]}) + bytes(27 - _LATERALITY.size)
            specs.append((key, -1, 0, _TYPE_LATERALITY, payload))
        if patient_name is not None:
            first, _, last = patient_name.partition(" ")
            payload = pack(_PATIENT_FIELDS, _PATIENT, {"first_name": first.encode("latin-1"),
                                                       "surname": last.encode("latin-1"), "sex": b"U"})
            specs.append((key, -1, 0, _TYPE_PATIENT, payload))
        order = range(n - 1, -1, -1) if reverse_bscans else range(n)
        for j in order:
            slice_id = 2 * j
            centre_y = (j - (n - 1) / 2) * bscan_distance_deg
            meta = {"size_y": height, "size_x": width, "start_x": -scan_width_deg / 2, "end_x": scan_width_deg / 2,
                    "start_y": centre_y, "end_y": centre_y, "scale_y": scale_y_mm, "img_size_width": width,
                    "n_bscans": n, "current_bscan": j, "scan_pattern": 3 if n > 1 else 1, "center_x": 0.0,
                    "center_y": centre_y}
            specs.append((key, slice_id, 0, _TYPE_BSCAN_META, pack(_BSCAN_META_FIELDS, _BSCAN_META, meta)))
            pixels = encode_ufloat16(vol[j]).astype("<u2").tobytes()
            head = pack(_IMAGE_HEADER_FIELDS, _IMAGE_HEADER, {
                "size": _IMAGE_HEADER.size + len(pixels), "image_type": _IMAGE_BSCAN, "n_values": height * width,
                "height": height, "width": width})
            specs.append((key, slice_id, 1, _TYPE_IMAGE, head + pixels))
            for layer_id, rows in sorted((lay or {}).items()):
                values = np.asarray(rows, dtype=np.float64)
                if values.shape != (n, width):
                    raise ValueError(f"layer {layer_id} must have shape {(n, width)}, got {values.shape}")
                values = values[j]
                values = np.where(np.isfinite(values), values, FLT_MAX)
                head = pack(_LAYER_HEADER_FIELDS, _LAYER_HEADER, {"layer_id": layer_id, "width": width})
                specs.append((key, slice_id, 0, _TYPE_LAYER, head + values.astype("<f4").tobytes()))
    return specs


def write_heyex_e2e_minimal(path: str | Path, volumes: Sequence[npt.ArrayLike], *,
                            lateralities: Sequence[str | None] | None = None,
                            layers: Sequence[Mapping[int, npt.ArrayLike] | None] | None = None,
                            series_keys: Sequence[tuple[int, int, int]] | None = None,
                            scale_y_mm: float = 0.0039, scan_width_deg: float = 20.0,
                            bscan_distance_deg: float = 0.4, patient_name: str | None = None,
                            directory: Literal["valid", "stale", "missing"] = "valid",
                            reverse_bscans: bool = False, overwrite: bool = False) -> Path:
    """Write a minimal E2E file, as a test fixture (not a Heyex-compatible export).

    The file has the ``CMDb`` header, the main directory, one directory chunk listing
    every data chunk, and per series: a laterality chunk, optionally a patient chunk,
    and per B-scan a B-scan header (10004), the image in ufloat16 and one chunk per
    boundary (10019). B-scan ``j`` has slice id ``2 * j``.

    Parameters
    ----------
    path : str or Path
        Output file.
    volumes : sequence of array_like
        One (n_bscans, n_axial, n_ascans) array of linear reflectivity in [0, 2) per
        series; NaN is written as the "empty" code.
    lateralities : sequence of {"OD", "OS", None}, optional
        Eye per series; None writes no laterality chunk. Default: none.
    layers : sequence of mapping, optional
        Per series, Heyex boundary index -> (n_bscans, n_ascans) rows; NaN is written
        as FLT_MAX.
    series_keys : sequence of (int, int, int), optional
        (patient, study, series) numbers per series; default ``(1, 1, k + 1)``.
    scale_y_mm : float
        Axial scale written in the B-scan headers.
    scan_width_deg : float
        Scan angle written as start/end x (lateral spacing is estimated from it).
    bscan_distance_deg : float
        Distance between B-scan centres, degrees.
    patient_name : str, optional
        "First Last" written into a patient chunk of each series (privacy tests).
    directory : {"valid", "stale", "missing"}
        ``"stale"`` writes directory entries that point 13 bytes past their chunks;
        ``"missing"`` writes no directory chunk (main directory ``current`` = 0).
    reverse_bscans : bool
        Write the B-scans of a series last to first (to test ordering by slice).
    overwrite : bool
        Replace an existing file.

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    ValueError
        If a volume is not 3-D or values are outside [0, 2), or the per-series
        sequences do not match ``volumes`` in length.
    OctpipeError
        If ``path`` exists and ``overwrite`` is false.

    Examples
    --------
    >>> import tempfile
    >>> p = write_heyex_e2e_minimal(Path(tempfile.mkdtemp()) / "d.E2E", [np.full((1, 4, 8), 0.5)])
    >>> p.read_bytes()[:4]
    b'CMDb'
    """
    vols = [np.asarray(v, dtype=np.float64) for v in volumes]
    if not vols:
        raise ValueError("volumes must hold at least one series")
    for v in vols:
        if v.ndim != 3 or min(v.shape) < 1:
            raise ValueError(f"each volume must be a non-empty 3-D array (n_bscans, n_axial, n_ascans), got {v.shape}")
    lats = list(lateralities) if lateralities is not None else [None] * len(vols)
    lays = list(layers) if layers is not None else [None] * len(vols)
    keys = list(series_keys) if series_keys is not None else [(1, 1, k + 1) for k in range(len(vols))]
    for name, seq in (("lateralities", lats), ("layers", lays), ("series_keys", keys)):
        if len(seq) != len(vols):
            raise ValueError(f"{name} must have one entry per volume ({len(vols)}), got {len(seq)}")
    if any(lat not in ("OD", "OS", None) for lat in lats):
        raise ValueError(f"lateralities must be 'OD', 'OS' or None, got {lats}")
    if directory not in ("valid", "stale", "missing"):
        raise ValueError(f"directory must be 'valid', 'stale' or 'missing', got {directory!r}")
    specs = _chunk_specs(vols, lats, lays, keys, scale_y_mm, scan_width_deg, bscan_distance_deg, patient_name,
                         reverse_bscans)

    n = len(specs)
    with_dir = directory != "missing"
    dir_pos = _FIRST_CHUNK
    first_data = dir_pos + (_DIRECTORY_HEADER.size + n * _DIRECTORY_ENTRY.size if with_dir else 0)
    offsets, pos = [], first_data
    for spec in specs:
        offsets.append(pos)
        pos += _CHUNK_HEADER.size + len(spec[4])

    out = bytearray()
    out += pack(_FILE_HEADER_FIELDS, _FILE_HEADER, {"magic": _magic12(_MAGIC_FILE), "version": 100,
                                                    "unknown": b"\xff" * 18})
    out += pack(_DIRECTORY_HEADER_FIELDS, _DIRECTORY_HEADER, {
        "magic": _magic12(_MAGIC_MAIN_DIR), "version": 100, "num_entries": n if with_dir else 0,
        "current": dir_pos if with_dir else 0})
    shift = 13 if directory == "stale" else 0
    entry_pos = [dir_pos + _DIRECTORY_HEADER.size + k * _DIRECTORY_ENTRY.size for k in range(n)]
    # What a directory entry repeats of its chunk's header: payload size, key, slice, type.
    shared = [{"size": len(payload), "patient_id": pid, "study_id": study, "series_id": ser, "slice_id": slice_id,
               "ind": ind, "type": typ} for (pid, study, ser), slice_id, ind, typ, payload in specs]
    if with_dir:
        out += pack(_DIRECTORY_HEADER_FIELDS, _DIRECTORY_HEADER, {
            "magic": _magic12(_MAGIC_DIR), "version": 100, "num_entries": n, "current": dir_pos, "prev": 0})
        for k in range(n):
            out += pack(_DIRECTORY_ENTRY_FIELDS, _DIRECTORY_ENTRY,
                        {"pos": entry_pos[k], "start": offsets[k] + shift, **shared[k]})
    for k, spec in enumerate(specs):
        out += pack(_CHUNK_HEADER_FIELDS, _CHUNK_HEADER,
                    {"magic": _magic12(_MAGIC_DATA), "entry_pos": entry_pos[k], "pos": offsets[k], **shared[k]})
        out += spec[4]
    target = check_writable(path, overwrite=overwrite)
    target.write_bytes(bytes(out))
    return target

"""Readers, one module per format; every reader returns an OctVolume.

:func:`read_volume` and :func:`read_volumes` detect the format from the bytes
(:func:`~octpipe.io.detect.detect_format`) and call the right reader. Vendor modules
are imported only when their format is met. Writers of phantom files in these formats
are in :mod:`octpipe.io.writers`.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from octpipe.errors import OctpipeError, UnsupportedFormatError
from octpipe.io.detect import FORMATS, detect_format
from octpipe.volume import OctVolume

__all__ = ["read_volume", "read_volumes", "detect_format", "FORMATS", "READERS"]

#: format -> (module, function). Functions return an OctVolume, or a list for E2E.
READERS = {
    "heyex-vol": ("octpipe.io.heyex_vol", "read_heyex_vol"),
    "heyex-e2e": ("octpipe.io.heyex_e2e", "read_heyex_e2e"),
    "heyex-xml": ("octpipe.io.heyex_xml", "read_heyex_xml"),
    "topcon-fda": ("octpipe.io.octconverter", "read_topcon_fda"),
    "topcon-fds": ("octpipe.io.octconverter", "read_topcon_fds"),
    "zeiss-img": ("octpipe.io.octconverter", "read_zeiss_img"),
    "bioptigen-oct": ("octpipe.io.octconverter", "read_bioptigen_oct"),
    "dicom": ("octpipe.io.dicom", "read_dicom"),
    "nifti": ("octpipe.io.nifti", "read_nifti"),
    "image": ("octpipe.io.images", "read_bscan_image"),
    "bscan-folder": ("octpipe.io.images", "read_bscan_folder"),
}


def read_volumes(path: str | Path, *, format: str | None = None) -> list[OctVolume]:
    """Read every volume in ``path`` (several for a multi-series E2E file).

    Parameters
    ----------
    path : str or Path
        A vendor file or a folder of B-scan images.
    format : str, optional
        Skip detection and use this format (one of :data:`FORMATS`).

    Returns
    -------
    list of OctVolume

    Raises
    ------
    OctpipeError
        A one-line reason naming the file: unknown format, truncated or corrupt file, ...
    """
    path = Path(path)
    fmt = format or detect_format(path)
    if fmt not in READERS:
        raise UnsupportedFormatError(f"no reader for format {fmt!r}; known: {', '.join(READERS)}", path)
    module, name = READERS[fmt]
    reader = getattr(importlib.import_module(module), name)
    try:
        result = reader(path)
    except OctpipeError:
        raise
    except MemoryError as exc:
        raise OctpipeError("not enough memory to read this file", path) from exc
    except Exception as exc:  # noqa: BLE001
        # a reader bug or a library error we did not foresee (struct.error, zlib.error, NotImplementedError,
        # RecursionError ...): still one line, naming the file, so a batch records it and goes on
        text = " ".join(str(exc).split())[:300]
        raise OctpipeError(f"{fmt} reader failed: {type(exc).__name__}: {text}", path) from exc
    volumes = result if isinstance(result, list) else [result]
    if not volumes:
        raise OctpipeError("no OCT volume found", path)
    return volumes


def read_volume(path: str | Path, *, series: int = 0, format: str | None = None) -> OctVolume:
    """Read one volume from ``path`` (series ``series`` of a multi-series file).

    Examples
    --------
    >>> import numpy as np, tempfile, os
    >>> from octpipe.io.writers.heyex_vol import write_heyex_vol
    >>> p = write_heyex_vol(os.path.join(tempfile.mkdtemp(), "a.vol"), np.ones((2, 8, 4), np.float32),
    ...                     spacing_mm=(0.1, 0.004, 0.01), laterality="OD")
    >>> read_volume(p).shape
    (2, 8, 4)
    """
    volumes = read_volumes(path, format=format)
    if not 0 <= series < len(volumes):
        raise OctpipeError(f"series {series} requested, file has {len(volumes)}", path)
    return volumes[series]

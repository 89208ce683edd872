"""Write a volume as a folder of PNG B-scans, which :func:`octpipe.io.images.read_bscan_folder` reads.

:func:`write_bscan_folder` writes ``bscan_000.png``, ``bscan_001.png``, ... as 8-bit greyscale
PNGs, which the reader reads back exactly.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import numpy.typing as npt
from PIL import Image

from octpipe.errors import OctpipeError
from octpipe.io._common import atomic_output, check_uint8_volume

__all__ = ["write_bscan_folder"]

_BSCAN_NAME = re.compile(r"^bscan_(\d+)\.png$")


def write_bscan_folder(folder: str | Path, data_uint8: npt.NDArray[np.uint8], *, overwrite: bool = False) -> Path:
    """Write a volume as one 8-bit greyscale PNG per B-scan.

    Files are named ``bscan_000.png``, ``bscan_001.png``, ... (zero-padded to at
    least three digits, more when there are over 1000 B-scans), so natural and
    plain sort orders agree. Each file is written under a temporary name and
    renamed into place.

    Parameters
    ----------
    folder : str or Path
        Output folder; created when missing.
    data_uint8 : ndarray of uint8, shape (n_bscans, n_axial, n_ascans)
        The volume. Other dtypes are refused (no silent rescaling).
    overwrite : bool
        Allow writing into a folder that already holds files. Old
        ``bscan_<n>.png`` files beyond the new count are removed so the folder
        reads back as exactly this volume; other files are left alone.

    Returns
    -------
    Path
        The folder.

    Raises
    ------
    ValueError
        ``data_uint8`` is not a non-empty 3-D uint8 array.
    OctpipeError
        ``folder`` exists, is not empty and ``overwrite`` is false, or is a file.

    Examples
    --------
    >>> import tempfile
    >>> d = write_bscan_folder(tempfile.mkdtemp() + "/out", np.zeros((2, 8, 8), np.uint8))
    >>> sorted(p.name for p in d.iterdir())
    ['bscan_000.png', 'bscan_001.png']
    """
    check_uint8_volume(data_uint8)
    folder = Path(folder)
    if folder.exists():
        if not folder.is_dir():
            raise OctpipeError("output exists and is not a folder", folder)
        if any(folder.iterdir()) and not overwrite:
            raise OctpipeError("output folder exists and is not empty; pass overwrite=True (--overwrite)", folder)
    folder.mkdir(parents=True, exist_ok=True)
    n = data_uint8.shape[0]
    width = max(3, len(str(n - 1)))
    written = set()
    for i in range(n):
        name = f"bscan_{i:0{width}d}.png"
        with atomic_output(folder / name) as tmp:
            Image.fromarray(np.ascontiguousarray(data_uint8[i])).save(tmp, format="PNG")
        written.add(name)
    for old in folder.iterdir():
        if _BSCAN_NAME.match(old.name) and old.name not in written and old.is_file():
            old.unlink()
    return folder

"""Helpers shared by the readers and writers (hashing, provenance, safe writes, argument checks)."""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from octpipe.errors import OctpipeError
from octpipe.privacy import volume_id
from octpipe.volume import Provenance

__all__ = ["file_sha256", "make_provenance", "check_writable", "atomic_output",
           "check_uint8_volume", "BoundedReader", "DEFLATE_MAX_RATIO"]

#: Largest expansion of deflate (zlib, gzip, PNG) data: 1032 output bytes per input byte.
#: A header that promises more decoded bytes than this times the compressed size is damaged.
DEFLATE_MAX_RATIO = 1032


class BoundedReader(io.BufferedReader):
    """A read-only binary file whose ``read(n)`` never asks for more than the bytes left.

    ``BufferedReader.read(n)`` allocates ``n`` bytes before reading, so a library that
    reads a length field from a damaged file (``fh.read(0xFFFFFFFF)``) makes a 4 GiB
    allocation even when the file is small. Handing this reader to such a library
    (Pillow, pydicom) caps every read at the file size.

    Examples
    --------
    >>> import tempfile
    >>> p = tempfile.mktemp()
    >>> _ = open(p, "wb").write(b"abc")
    >>> with BoundedReader(p) as fh:
    ...     fh.read(1 << 40)
    b'abc'
    """

    def __init__(self, path: str | Path) -> None:
        super().__init__(io.FileIO(os.fspath(path), "rb"))
        self.size = os.fstat(self.fileno()).st_size

    def read(self, n: int | None = -1) -> bytes:  # noqa: D102 - as io.BufferedReader.read
        if n is None or n < 0:
            return super().read()
        return super().read(max(0, min(n, self.size - self.tell())))



def file_sha256(paths: str | Path | Iterable[str | Path]) -> str:
    """Hex SHA-256 of a file's bytes, or of several files' bytes in order."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def make_provenance(path: str | Path, *, reader: str, format: str, series: int = 0,
                    sha256: str | None = None) -> tuple[Provenance, str]:
    """Return ``(Provenance, volume_id)`` for a source file or folder listing."""
    digest = sha256 if sha256 is not None else file_sha256(path)
    prov = Provenance(path=str(path), sha256=digest, reader=reader, format=format, series=series)
    return prov, volume_id(digest, series)


def check_writable(path: str | Path, *, overwrite: bool) -> Path:
    """Refuse to replace an existing output unless ``overwrite`` is true."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise OctpipeError("output exists; pass overwrite=True (--overwrite) to replace it", path)
    parent = path.parent
    if not parent.exists():
        os.makedirs(parent, exist_ok=True)
    return path


def _umask() -> int:
    """The process umask, read without changing it (os.umask would, racing other threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


@contextmanager
def atomic_output(path: str | Path, *, suffix: str = "") -> Iterator[Path]:
    """Write ``path`` through a temporary file in the same folder, moved into place on success.

    Yields the (empty, existing) temporary file, named ``.<name>.<random>.tmp<suffix>``
    so folder readers skip it; pass the real suffix (e.g. ``".nii.gz"``) for writers
    that choose the format from the file name. When the block ends normally the
    temporary file replaces ``path`` (:func:`os.replace`); on any exception,
    ``KeyboardInterrupt`` included, it is removed and ``path`` is left as it was.
    The folder must exist (see :func:`check_writable`).
    """
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual permissions
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def check_uint8_volume(data_uint8: object) -> None:
    """Refuse anything but a non-empty 3-D uint8 ndarray ``(n_bscans, n_axial, n_ascans)`` (ValueError)."""
    if not isinstance(data_uint8, np.ndarray) or data_uint8.dtype != np.uint8:
        raise ValueError(f"data_uint8 must be a uint8 ndarray, got {getattr(data_uint8, 'dtype', type(data_uint8))}")
    if data_uint8.ndim != 3 or min(data_uint8.shape) < 1:
        raise ValueError(f"data_uint8 must be 3-D (n_bscans, n_axial, n_ascans) and non-empty, got {data_uint8.shape}")

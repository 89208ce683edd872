"""Detect an OCT file's format from its bytes, not its name.

Magic numbers decide wherever a format has one. Two formats have none: Zeiss Cirrus
``.img`` cubes (raw bytes) and Bioptigen ``.OCT`` files (a header of tagged fields); for
those the extension is used as a hint and the reader checks the content.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

from octpipe.errors import CorruptFileError, FormatError, OctpipeError

__all__ = ["detect_format", "FORMATS", "IMAGE_FORMATS"]

#: Every format name :func:`detect_format` can return.
FORMATS = (
    "heyex-vol", "heyex-e2e", "heyex-xml", "topcon-fda", "topcon-fds", "zeiss-img", "bioptigen-oct",
    "dicom", "nifti", "image", "bscan-folder",
)
IMAGE_FORMATS = ("png", "jpeg", "tiff", "bmp")
_HEAD = 4096


def _image_kind(head: bytes) -> str | None:
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if head.startswith(b"BM") and len(head) >= 26:
        offset = struct.unpack_from("<I", head, 10)[0]
        header = struct.unpack_from("<I", head, 14)[0]
        if header in (12, 40, 52, 56, 64, 108, 124) and 14 + header <= offset < 1 << 24:
            return "bmp"
    return None


def _is_nifti(head: bytes, path: Path) -> bool:
    if head[:2] == b"\x1f\x8b":  # gzip: look at the decompressed header
        try:
            with gzip.open(path, "rb") as fh:
                head = fh.read(352)
        except (OSError, EOFError, zlib.error):
            return False
    if len(head) < 348:
        return False
    for endian in "<>":
        size = struct.unpack_from(endian + "i", head, 0)[0]
        if size == 348 and head[344:348] in (b"n+1\x00", b"ni1\x00"):
            return True
        if size == 540 and head[4:8] in (b"n+2\x00", b"ni2\x00"):
            return True
    return False


def detect_format(path: str | Path) -> str:
    """Return the format of ``path`` (one of :data:`FORMATS`).

    Parameters
    ----------
    path : str or Path
        A file, or a folder of B-scan images.

    Returns
    -------
    str
        The format name.

    Raises
    ------
    FormatError
        When the bytes match no supported OCT format (the message says what was seen).
    CorruptFileError
        When the file is empty.
    OctpipeError
        When the file cannot be opened.

    Examples
    --------
    >>> import tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "x.bin")
    >>> _ = open(p, "wb").write(b"HSF-OCT-103" + bytes(100))
    >>> detect_format(p)
    'heyex-vol'
    """
    path = Path(path)
    if path.is_dir():
        return "bscan-folder"
    try:
        with open(path, "rb") as fh:
            head = fh.read(_HEAD)
    except OSError as exc:
        raise OctpipeError(f"cannot read: {exc.strerror or exc}", path) from exc
    if not head:
        raise CorruptFileError("empty file (0 bytes)", path)
    if head.startswith(b"HSF-OCT-"):
        return "heyex-vol"
    if head.startswith(b"CMDb"):
        return "heyex-e2e"
    if head.startswith(b"FOCT"):
        kind = head[4:7]
        if kind in (b"FDA", b"FAA"):
            return "topcon-fda"
        if kind == b"FDS":
            return "topcon-fds"
        raise FormatError(f"Topcon container of unsupported kind {kind!r}", path)
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    if _is_nifti(head, path):
        return "nifti"
    if _image_kind(head):
        return "image"
    if head.startswith(b"MATLAB 5.0 MAT-file") or head.startswith(b"MATLAB 7.3 MAT-file"):
        raise FormatError("a MATLAB .mat file, not an OCT export", path)
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if text.startswith(b"<") and b"HEDX" in head:
        return "heyex-xml"
    suffix = path.suffix.lower()
    if suffix == ".img" and not path.with_suffix(".hdr").exists():
        return "zeiss-img"
    if suffix == ".oct":
        return "bioptigen-oct"
    printable = sum(32 <= b < 127 or b in (9, 10, 13) for b in head[:256]) / min(len(head), 256)
    what = "text" if printable > 0.95 else f"bytes {head[:8].hex(' ')}"
    raise FormatError(f"not a supported OCT format (starts with {what})", path)

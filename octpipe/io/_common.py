"""Helpers shared by the readers and writers (hashing, provenance, safe writes)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

from octpipe.errors import OctpipeError
from octpipe.privacy import pseudonymous_id
from octpipe.volume import Provenance

__all__ = ["file_sha256", "make_provenance", "volume_id_for", "check_writable"]


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


def volume_id_for(sha256: str, series: int = 0) -> str:
    """Pseudonymous volume id from the source hash and series index.

    The id depends on the file's content only, never on a patient field, so it
    is stable across copies and renames and reveals nothing about the patient.
    """
    return pseudonymous_id(sha256, series, prefix="v", length=16)


def make_provenance(path: str | Path, *, reader: str, format: str, series: int = 0,
                    sha256: str | None = None) -> tuple[Provenance, str]:
    """Return ``(Provenance, volume_id)`` for a source file or folder listing."""
    digest = sha256 if sha256 is not None else file_sha256(path)
    prov = Provenance(path=str(path), sha256=digest, reader=reader, format=format, series=series)
    return prov, volume_id_for(digest, series)


def check_writable(path: str | Path, *, overwrite: bool) -> Path:
    """Refuse to replace an existing output unless ``overwrite`` is true."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise OctpipeError("output exists; pass overwrite=True (--overwrite) to replace it", path)
    parent = path.parent
    if not parent.exists():
        os.makedirs(parent, exist_ok=True)
    return path

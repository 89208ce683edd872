"""Pseudonymous identifiers.

Patient identity never leaves a reader: everything octpipe writes carries a
salted hash instead. The salt comes from ``OCTPIPE_SALT`` when set, so a site can
keep its pseudonyms private; otherwise a fixed project salt keeps ids stable.
"""

from __future__ import annotations

import hashlib
import os

__all__ = ["pseudonymous_id", "volume_id"]

_DEFAULT_SALT = "octpipe-v1"


def pseudonymous_id(*parts: object, prefix: str = "", length: int = 16) -> str:
    """Return a salted, truncated SHA-256 of ``parts``.

    Parameters
    ----------
    *parts : object
        Values that identify the thing (patient id, eye, series uid, file hash).
        Their ``str`` forms are joined with a unit separator.
    prefix : str
        Text put in front of the hash, e.g. ``"vol-"``.
    length : int
        Number of hex digits kept, 8 to 64.

    Returns
    -------
    str
        ``prefix`` followed by ``length`` hex digits.

    Examples
    --------
    >>> pseudonymous_id("PAT001", "OD", prefix="p-") == pseudonymous_id("PAT001", "OD", prefix="p-")
    True
    """
    if not 8 <= length <= 64:
        raise ValueError(f"length must be in [8, 64], got {length}")
    salt = os.environ.get("OCTPIPE_SALT", _DEFAULT_SALT)
    text = "\x1f".join([salt, *map(str, parts)])
    return prefix + hashlib.sha256(text.encode("utf-8")).hexdigest()[:length]


def volume_id(sha256: str, series: int = 0, *, salt: str | None = None) -> str:
    """The volume id of one series of a source: ``v`` and 16 hex digits of a salted hash.

    The one volume-id function: readers (:attr:`octpipe.OctVolume.volume_id`), file exports
    and stores all name a volume with it. It depends on the source's content hash and the
    series index only, never on a patient field or a path, so it is stable across copies and
    renames and reveals nothing about the patient.

    Parameters
    ----------
    sha256 : str
        Hex SHA-256 of the source's bytes.
    series : int
        Series index within the source (an E2E file holds several).
    salt : str, optional
        A store's pseudonym salt (:func:`octpipe.store.store_salt`): ids in a store are
        salted per store, so two stores of the same files do not share ids. Without it the
        id is the reader's (salted only by ``OCTPIPE_SALT``).

    Returns
    -------
    str

    Examples
    --------
    >>> vid = volume_id("ab" * 32, 0)
    >>> vid.startswith("v") and len(vid) == 17
    True
    >>> volume_id("ab" * 32, 0, salt="s1") != volume_id("ab" * 32, 0, salt="s2")
    True
    """
    parts = (sha256, series) if salt is None else (salt, sha256, series)
    return pseudonymous_id(*parts, prefix="v", length=16)

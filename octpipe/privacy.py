"""Pseudonymous identifiers.

Patient identity never leaves a reader: everything octpipe writes carries a
salted hash instead. The salt comes from ``OCTPIPE_SALT`` when set, so a site can
keep its pseudonyms private; otherwise a fixed project salt keeps ids stable.
"""

from __future__ import annotations

import hashlib
import os

__all__ = ["pseudonymous_id"]

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

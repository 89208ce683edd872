"""Declarative little-endian binary records: field tables used both to parse and to build headers.

A record is a tuple of :class:`Field`; :func:`struct_for` turns it into a
:class:`struct.Struct`, :func:`unpack` reads one record into ``{name: value}`` and
:func:`pack` builds one from such a mapping (missing fields are written as zeros).
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["Field", "struct_for", "value_count", "unpack", "pack"]


@dataclass(frozen=True)
class Field:
    """One binary field: its name, :mod:`struct` code and meaning.

    ``fmt`` is one struct code with an optional count: ``"I"``, ``"6f"`` (six
    values), ``"12s"`` (one 12-byte string) or ``"168x"`` (padding, no value).
    Fields flagged ``identifying`` (patient and visit identifiers, dates, device
    ids) are dropped by :func:`unpack` unless asked for.
    """

    name: str
    fmt: str
    meaning: str
    identifying: bool = False


def struct_for(fields: Sequence[Field]) -> struct.Struct:
    """The little-endian :class:`struct.Struct` of a field table (no alignment padding)."""
    return struct.Struct("<" + "".join(f.fmt for f in fields))


def value_count(field: Field) -> int:
    """How many values ``struct`` produces for a field (0 for padding, 1 for a string)."""
    code = field.fmt[-1]
    if code == "x":
        return 0
    if code == "s":
        return 1
    return int(field.fmt[:-1] or 1)


def unpack(fields: Sequence[Field], codec: struct.Struct, buf: bytes | bytearray | memoryview | mmap.mmap,
           offset: int = 0, *, keep_identifying: bool = False, decode_text: bool = True) -> dict[str, Any]:
    """Unpack the record at ``offset`` of ``buf`` into ``{name: value}``, in table order.

    Parameters
    ----------
    fields : sequence of Field
        The record's field table.
    codec : struct.Struct
        ``struct_for(fields)``.
    buf : bytes-like or mmap
        Holds at least ``offset + codec.size`` bytes (else :class:`struct.error`).
    offset : int
        Position of the record in ``buf``.
    keep_identifying : bool
        Also return the fields flagged ``identifying`` (default: drop them).
    decode_text : bool
        Decode strings as ASCII up to the first NUL, stripped (default); when false
        they stay ``bytes`` as stored.

    Returns
    -------
    dict
        A field of count 1 gives one value, a multi-value field (``"6f"``) a tuple;
        padding gives nothing.
    """
    values = codec.unpack_from(buf, offset)
    out: dict[str, Any] = {}
    pos = 0
    for field in fields:
        n = value_count(field)
        if n == 0:
            continue
        chunk = values[pos:pos + n]
        pos += n
        if field.identifying and not keep_identifying:
            continue
        value: Any = chunk if n > 1 else chunk[0]
        if decode_text and isinstance(value, bytes):
            value = value.split(b"\0", 1)[0].decode("ascii", errors="replace").strip()
        out[field.name] = value
    return out


def pack(fields: Sequence[Field], codec: struct.Struct, values: Mapping[str, object]) -> bytes:
    """Pack ``values`` with a field table; missing fields are written as zeros.

    String fields take ``bytes`` as they are, anything else as ASCII text; a
    multi-value field takes a sequence of its values.
    """
    flat: list[object] = []
    for field in fields:
        n = value_count(field)
        if n == 0:
            continue
        value = values.get(field.name)
        if field.fmt.endswith("s"):
            flat.append(b"" if value is None else value if isinstance(value, bytes) else str(value).encode("ascii"))
        elif n > 1:
            flat.extend([0] * n if value is None else list(value))  # type: ignore[call-overload]
        else:
            flat.append(0 if value is None else value)
    return codec.pack(*flat)

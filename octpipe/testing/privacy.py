"""Privacy checks for tests: fake patient identifiers and a byte search of everything a run wrote.

:data:`IDENTIFIERS` are real-looking but invented values that privacy tests write into
phantom inputs (DICOM, ``.vol``, E2E, XML). :func:`assert_no_identifiers` then searches
every byte of every output file, and any captured stdout/stderr text, for each of them in
the encodings a leak could take: ASCII/UTF-8 in several cases, UTF-16 (E2E and Windows
tools), DICOM person names (``LAST^FIRST``) and dates (``YYYYMMDD``, ``YYYY-MM-DD``,
``DD.MM.YYYY``, ``MM/DD/YYYY``). Reusable by any writer's tests (export included).
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Iterable, Mapping
from pathlib import Path

__all__ = ["IDENTIFIERS", "identifier_needles", "find_identifiers", "assert_no_identifiers"]

#: Invented identifiers that privacy tests put into inputs. Long and distinctive, so a hit is a leak.
IDENTIFIERS: dict[str, str] = {
    "last_name": "Zwackelmann",
    "first_name": "Hortensia",
    "birth_date": "1937-05-19",
    "patient_id": "PZX4417983",
    "visit_id": "VQ77120931",
    "device_serial": "SN-HRA-88412907",
    "institution": "Klinik Quarzbrunn",
}


def _date_forms(text: str) -> list[str]:
    try:
        d = _dt.date.fromisoformat(text)
    except ValueError:
        return []
    return [d.strftime("%Y%m%d"), d.isoformat(), d.strftime("%d.%m.%Y"), d.strftime("%m/%d/%Y"),
            d.strftime("%d/%m/%Y")]


def identifier_needles(identifiers: Mapping[str, str] | Iterable[str]) -> dict[bytes, str]:
    """Every byte string that would reveal one of ``identifiers`` -> which identifier it reveals.

    Parameters
    ----------
    identifiers : mapping or iterable of str
        The identifying values (a mapping's values are used).

    Returns
    -------
    dict
        ``{needle bytes: description}``.

    Examples
    --------
    >>> needles = identifier_needles({"birth_date": "1937-05-19"})
    >>> b"19370519" in needles and "1937-05-19".encode("utf-16-le") in needles
    True
    """
    values = list(identifiers.values()) if isinstance(identifiers, Mapping) else list(identifiers)
    texts: dict[str, str] = {}
    for value in values:
        for form in {value, value.upper(), value.lower(), *_date_forms(value)}:
            texts.setdefault(form, value)
    if isinstance(identifiers, Mapping) and {"last_name", "first_name"} <= set(identifiers):
        last, first = identifiers["last_name"], identifiers["first_name"]
        for form in (f"{last}^{first}", f"{first} {last}", f"{last}, {first}", f"{last} {first}"):
            texts.setdefault(form, f"{last}^{first}")
            texts.setdefault(form.upper(), f"{last}^{first}")
    needles: dict[bytes, str] = {}
    for text, what in texts.items():
        for encoding in ("utf-8", "utf-16-le", "utf-16-be"):
            needles[text.encode(encoding)] = f"{what!r} ({encoding}: {text!r})"
    return needles


def _files(paths: Iterable[str | Path]) -> list[Path]:
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted(q for q in p.rglob("*") if q.is_file()))
        elif p.is_file():
            out.append(p)
    return out


def find_identifiers(paths: Iterable[str | Path], identifiers: Mapping[str, str] | Iterable[str], *,
                     texts: Mapping[str, str] | None = None) -> list[str]:
    """Where any identifier occurs: ``"file: identifier (encoding: form)"`` per hit.

    Parameters
    ----------
    paths : iterable of path
        Files and folders (searched recursively, hidden files included); every byte is searched,
        including file names.
    identifiers : mapping or iterable of str
        What must not occur.
    texts : mapping of str to str, optional
        Extra named texts to search (captured stdout/stderr).

    Returns
    -------
    list of str
        One line per hit; empty when nothing leaked.
    """
    needles = identifier_needles(identifiers)
    hits = []
    sources: list[tuple[str, bytes]] = [(name, text.encode("utf-8")) for name, text in (texts or {}).items()]
    for f in _files(paths):
        sources.append((f"{f} (name)", str(f).encode("utf-8")))
        sources.append((str(f), f.read_bytes()))
    for where, data in sources:
        for needle, what in needles.items():
            if needle in data:
                hits.append(f"{where}: {what}")
    return hits


def assert_no_identifiers(paths: Iterable[str | Path], identifiers: Mapping[str, str] | Iterable[str] = IDENTIFIERS,
                          *, texts: Mapping[str, str] | None = None) -> int:
    """Raise AssertionError listing every place an identifier occurs; return the number of files searched.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp()); _ = (d / "a.txt").write_text("volume v1234")
    >>> assert_no_identifiers([d], {"patient_id": "PZX4417983"})
    1
    """
    files = _files(paths)
    hits = find_identifiers(files, identifiers, texts=texts)
    if hits:
        raise AssertionError(f"{len(hits)} identifier hit(s):\n" + "\n".join(hits[:50]))
    return len(files)

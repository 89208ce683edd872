"""Exceptions raised by octpipe.

Every error caused by an input file is an :class:`OctpipeError` whose message
names the file and the reason in one line, so a batch can record it and go on.
"""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "OctpipeError",
    "FormatError",
    "CorruptFileError",
    "UnsupportedFormatError",
    "ConfigError",
]


class OctpipeError(Exception):
    """Base class of every error octpipe raises on purpose.

    Parameters
    ----------
    message : str
        The reason, in one line.
    path : str or Path, optional
        The file the error is about; it is put in front of the message.
    """

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        self.path = None if path is None else Path(path)
        self.reason = message
        text = message if path is None else f"{Path(path).name}: {message}"
        super().__init__(text)


class FormatError(OctpipeError):
    """The file is not in the format the reader expected."""


class CorruptFileError(OctpipeError):
    """The file has the right format but is truncated or inconsistent."""


class UnsupportedFormatError(OctpipeError):
    """The format, or a variant of it, is recognised but not supported."""


class ConfigError(OctpipeError):
    """A configuration value is out of its valid range."""

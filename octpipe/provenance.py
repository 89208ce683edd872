"""Provenance of what a run writes: the octpipe version and the git commit of the code that wrote it.

Every run saves these next to its outputs (DESIGN.md). Where a volume came from (its
file, reader and digest) is another matter: :class:`octpipe.volume.Provenance`.
"""

from __future__ import annotations

import datetime as _dt
import subprocess
from pathlib import Path

from octpipe import __version__

__all__ = ["git_hash", "provenance"]


def git_hash() -> str:
    """The git commit of the octpipe checkout, or ``"unknown"`` for an installed copy."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def provenance() -> dict[str, str]:
    """``{"octpipe_version", "git_hash", "created"}`` for stamping outputs."""
    return {"octpipe_version": __version__, "git_hash": git_hash(),
            "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")}

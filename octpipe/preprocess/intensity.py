"""Intensity domains: device linear reflectivity to a [0, 1] display domain.

Heidelberg Spectralis stores linear reflectivity as float32 (about [0, 1]; FLT_MAX
marks empty pixels). Viewers show a compressed version of it. Two mappings are in use:

``"log"`` (default)
    ``(ln(x + 2.44e-4) + 8.3) / 8.285`` clipped to [0, 1]. eyepy and oct-converter use
    it since it was found to match Heyex XML/PNG exports within about 3 grey levels;
    choosing it makes .vol/.E2E input look like the 8-bit exports users also have, so
    a model trained on one sees the same contrast on the other.
``"root4"``
    ``x ** 0.25`` (LibOctData, OCTSEG, AURA). Kept as an option.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import numpy.typing as npt

__all__ = ["linear_to_display", "display_to_linear", "DISPLAY_TRANSFORMS"]

DISPLAY_TRANSFORMS = ("log", "root4")
_LOG_OFFSET = 2.44e-4
_LOG_SHIFT = 8.3
_LOG_SCALE = 8.285


def linear_to_display(linear: npt.ArrayLike, *, method: Literal["log", "root4"] = "log") -> npt.NDArray[np.float32]:
    """Map linear reflectivity to the display domain [0, 1].

    Parameters
    ----------
    linear : array_like
        Linear reflectivity (>= 0). Non-finite values map to 0.
    method : {"log", "root4"}
        The mapping; see the module docstring for why ``"log"`` is the default.

    Returns
    -------
    ndarray of float32
        Values in [0, 1], same shape as the input.

    Examples
    --------
    >>> float(linear_to_display([1.0])[0]) > 0.99
    True
    """
    x = np.asarray(linear, dtype=np.float64)
    x = np.where(np.isfinite(x) & (x < 1e30), np.maximum(x, 0.0), 0.0)
    if method == "log":
        out = (np.log(x + _LOG_OFFSET) + _LOG_SHIFT) / _LOG_SCALE
    elif method == "root4":
        out = np.sqrt(np.sqrt(x))
    else:
        raise ValueError(f"method must be one of {DISPLAY_TRANSFORMS}, got {method!r}")
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def display_to_linear(display: npt.ArrayLike, *, method: Literal["log", "root4"] = "log") -> npt.NDArray[np.float32]:
    """Inverse of :func:`linear_to_display` on (0, 1) (clipped values do not come back).

    Examples
    --------
    >>> x = np.array([0.01, 0.1, 0.5], dtype=np.float32)
    >>> bool(np.allclose(display_to_linear(linear_to_display(x)), x, rtol=1e-4))
    True
    """
    d = np.clip(np.asarray(display, dtype=np.float64), 0.0, 1.0)
    if method == "log":
        out = np.maximum(np.exp(d * _LOG_SCALE - _LOG_SHIFT) - _LOG_OFFSET, 0.0)
    elif method == "root4":
        out = d**4
    else:
        raise ValueError(f"method must be one of {DISPLAY_TRANSFORMS}, got {method!r}")
    return out.astype(np.float32)

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

from octpipe.preprocess.blocks import map_blocks, slabs

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
    if method not in DISPLAY_TRANSFORMS:
        raise ValueError(f"method must be one of {DISPLAY_TRANSFORMS}, got {method!r}")

    def one(block: np.ndarray) -> np.ndarray:
        x = np.asarray(block, dtype=np.float64)
        x = np.where(np.isfinite(x) & (x < 1e30), np.maximum(x, 0.0), 0.0)
        y = (np.log(x + _LOG_OFFSET) + _LOG_SHIFT) / _LOG_SCALE if method == "log" else np.sqrt(np.sqrt(x))
        return np.clip(y, 0.0, 1.0)

    return map_blocks(one, linear)


def display_to_linear(display: npt.ArrayLike, *, method: Literal["log", "root4"] = "log") -> npt.NDArray[np.float32]:
    """Inverse of :func:`linear_to_display` on (0, 1) (clipped values do not come back).

    Examples
    --------
    >>> x = np.array([0.01, 0.1, 0.5], dtype=np.float32)
    >>> bool(np.allclose(display_to_linear(linear_to_display(x)), x, rtol=1e-4))
    True
    """
    if method not in DISPLAY_TRANSFORMS:
        raise ValueError(f"method must be one of {DISPLAY_TRANSFORMS}, got {method!r}")

    def one(block: np.ndarray) -> np.ndarray:
        d = np.clip(np.asarray(block, dtype=np.float64), 0.0, 1.0)
        return np.maximum(np.exp(d * _LOG_SCALE - _LOG_SHIFT) - _LOG_OFFSET, 0.0) if method == "log" else d**4

    return map_blocks(one, display)


def display_full_scale(meta: dict, data: npt.NDArray[np.floating]) -> float:
    """The value that means "white" for display-domain data from a reader.

    Uses the bit depth the reader recorded (``meta["bits_stored"]`` for DICOM,
    ``meta["bit_depth"]`` for images); otherwise 1.0 for data already in [0, 1], 255 for
    8-bit ranges and 65535 for 16-bit ranges.
    """
    bits = meta.get("bits_stored") or meta.get("bit_depth")
    if isinstance(bits, (int, np.integer)) and 1 <= int(bits) <= 32:
        return float((1 << int(bits)) - 1)
    finite = data[np.isfinite(data)]
    top = float(finite.max()) if finite.size else 1.0
    if top <= 1.0:
        return 1.0
    if top <= 255.0:
        return 255.0
    if top <= 65535.0:
        return 65535.0
    return top


def to_display(
    data: npt.ArrayLike,
    *,
    domain: Literal["linear", "display"],
    full_scale: float = 1.0,
    method: Literal["log", "root4"] = "log",
) -> npt.NDArray[np.float32]:
    """Bring a volume from its reader's intensity domain to the display domain [0, 1].

    Parameters
    ----------
    data : array_like
        Reader output.
    domain : {"linear", "display"}
        ``OctVolume.intensity``.
    full_scale : float
        For display data, the value of white (see :func:`display_full_scale`).
    method : {"log", "root4"}
        Mapping for linear data (see the module docstring).

    Returns
    -------
    ndarray of float32 in [0, 1]
    """
    if domain == "linear":
        return linear_to_display(data, method=method)
    if domain != "display":
        raise ValueError(f"domain must be 'linear' or 'display', got {domain!r}")
    if not full_scale > 0:
        raise ValueError(f"full_scale must be > 0, got {full_scale}")
    scale = np.float32(full_scale)

    def one(block: np.ndarray) -> np.ndarray:
        x = np.asarray(block, dtype=np.float32)
        return np.clip(np.where(np.isfinite(x), x, 0.0) / scale, 0.0, 1.0)

    return map_blocks(one, data)


def normalize_volume(
    display: npt.ArrayLike,
    *,
    invalid: npt.ArrayLike | None = None,
    percentiles: tuple[float, float] | None = None,
) -> tuple[npt.NDArray[np.float32], tuple[float, float]]:
    """Normalise one volume to [-1, 1], the paper's per-volume rule.

    Parameters
    ----------
    display : array_like
        Display-domain volume.
    invalid : array_like of bool, optional
        Pixels to ignore when finding the range; they are set to -1.
    percentiles : (float, float), optional
        Robust range (e.g. ``(0.5, 99.5)``) instead of the minimum and maximum (default,
        as in the paper).

    Returns
    -------
    normalised : ndarray of float32 in [-1, 1]
    (low, high) : tuple of float
        The input values mapped to -1 and 1, so the mapping can be undone or recorded.

    Examples
    --------
    >>> out, (lo, hi) = normalize_volume(np.array([[[0.2, 0.6]]]))
    >>> out.tolist(), round(lo, 3), round(hi, 3)
    ([[[-1.0, 1.0]]], 0.2, 0.6)
    """
    x = np.asarray(display, dtype=np.float32)
    valid = np.isfinite(x)
    if invalid is not None:
        valid &= ~np.asarray(invalid, dtype=bool)
    if not valid.any():
        raise ValueError("volume has no valid pixels to normalise")
    if percentiles is None:  # without copying the valid values out
        low = float(np.min(x, where=valid, initial=np.inf))
        high = float(np.max(x, where=valid, initial=-np.inf))
    else:
        lo_p, hi_p = percentiles
        if not 0 <= lo_p < hi_p <= 100:
            raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {percentiles}")
        low, high = (float(v) for v in np.percentile(x[valid], [lo_p, hi_p], overwrite_input=True))
    scale = high - low if high > low else 1.0
    out = np.empty(x.shape, dtype=np.float32)
    for sl in slabs(x.shape):  # small temporaries
        out[sl] = np.where(valid[sl], np.clip((x[sl] - low) / scale * 2.0 - 1.0, -1.0, 1.0), -1.0)
    return out, (low, high)

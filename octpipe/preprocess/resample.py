"""Lateral (column) resampling: area averaging down, linear interpolation back up.

The paper halves Spectralis columns (512 -> 256, about 22 µm per pixel). Spectralis widths
vary (384, 512, 768, 1024, 1536 A-scans), so the factor is an integer chosen from a target
lateral spacing, or given directly. Column ``j`` of the result is the mean of source
columns ``[j*f, (j+1)*f)``; a last, shorter block averages the columns that remain.
Boundaries use the same averaging (NaN-aware); label masks take the largest label in each
block, so a lesion pixel is never lost (a patch is anomalous if one pixel is).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from octpipe.preprocess.blocks import slabs

__all__ = [
    "lateral_factor",
    "downsample_columns",
    "downsample_boundaries",
    "downsample_labels",
    "upsample_columns",
    "source_columns",
]


def lateral_factor(spacing_x_mm: float, *, factor: int | None = None, target_spacing_mm: float | None = None) -> int:
    """Integer column factor from an explicit ``factor`` or a target lateral spacing.

    Examples
    --------
    >>> lateral_factor(0.0113, target_spacing_mm=0.0226)
    2
    >>> lateral_factor(0.0057, target_spacing_mm=0.0226)
    4
    """
    if factor is not None:
        if int(factor) != factor or factor < 1:
            raise ValueError(f"factor must be an integer >= 1, got {factor}")
        return int(factor)
    if target_spacing_mm is None:
        raise ValueError("give factor or target_spacing_mm")
    if not spacing_x_mm > 0 or not target_spacing_mm > 0:
        raise ValueError(f"spacings must be > 0, got {spacing_x_mm} and {target_spacing_mm}")
    return max(1, int(round(target_spacing_mm / spacing_x_mm)))


def _blocks(n: int, factor: int) -> tuple[int, int]:
    if factor < 1:
        raise ValueError(f"factor must be >= 1, got {factor}")
    return n // factor, n % factor


def downsample_columns(
    volume: npt.ArrayLike, factor: int, *, invalid: npt.ArrayLike | None = None
) -> npt.NDArray[np.float32]:
    """Area-average blocks of ``factor`` columns along the last axis.

    Parameters
    ----------
    volume : array_like, shape (..., n_ascans)
        Image or volume.
    factor : int
        Columns per output column.
    invalid : array_like of bool, optional
        Pixels left out of the averages; an output pixel whose block is all invalid is NaN.

    Returns
    -------
    ndarray of float32, shape (..., ceil(n_ascans / factor))

    Examples
    --------
    >>> downsample_columns(np.array([[1, 3, 5, 7, 9]]), 2).tolist()
    [[2.0, 6.0, 9.0]]
    """
    x = np.asarray(volume)
    inv = None if invalid is None else np.asarray(invalid, dtype=bool)
    if x.ndim < 2:
        return _downsample(x, factor, inv)
    full, rest = _blocks(x.shape[-1], factor)
    out = np.empty((*x.shape[:-1], full + bool(rest)), dtype=np.float32)
    for sl in slabs(x.shape):  # B-scan slabs: the float64 temporaries stay small
        out[sl] = _downsample(x[sl], factor, None if inv is None else inv[sl])
    return out


def _downsample(x: np.ndarray, factor: int, invalid: np.ndarray | None) -> npt.NDArray[np.float32]:
    """:func:`downsample_columns` of one slab."""
    n = x.shape[-1]
    full, rest = _blocks(n, factor)
    if invalid is None and (x.dtype.kind in "iub" or np.isfinite(x).all()):
        # fast path: no pixel to leave out; float32 block means (float64 accumulation)
        head = x[..., : full * factor].reshape(*x.shape[:-1], full, factor).mean(-1, dtype=np.float64)
        parts = [head] if not rest else [head, x[..., full * factor:].mean(-1, keepdims=True, dtype=np.float64)]
        return np.concatenate(parts, -1).astype(np.float32)
    x = x.astype(np.float64)
    weights = np.ones_like(x) if invalid is None else (~np.asarray(invalid, dtype=bool)).astype(np.float64)
    weights = np.where(np.isfinite(x), weights, 0.0)
    xw = np.where(weights > 0, x, 0.0) * weights
    parts_sum = [xw[..., : full * factor].reshape(*x.shape[:-1], full, factor).sum(-1)]
    parts_w = [weights[..., : full * factor].reshape(*x.shape[:-1], full, factor).sum(-1)]
    if rest:
        parts_sum.append(xw[..., full * factor:].sum(-1, keepdims=True))
        parts_w.append(weights[..., full * factor:].sum(-1, keepdims=True))
    total, count = np.concatenate(parts_sum, -1), np.concatenate(parts_w, -1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(count > 0, total / np.maximum(count, 1e-300), np.nan)
    return out.astype(np.float32)


def downsample_boundaries(rows: npt.ArrayLike, factor: int) -> npt.NDArray[np.float32]:
    """Average boundary rows (…, n_ascans) over the same column blocks (NaN = missing)."""
    return downsample_columns(rows, factor)


def downsample_labels(mask: npt.ArrayLike, factor: int) -> npt.NDArray[np.uint8]:
    """Largest label in each block of columns, so no lesion pixel is lost."""
    m = np.asarray(mask)
    n = m.shape[-1]
    full, rest = _blocks(n, factor)
    parts = [m[..., : full * factor].reshape(*m.shape[:-1], full, factor).max(-1)]
    if rest:
        parts.append(m[..., full * factor:].max(-1, keepdims=True))
    return np.concatenate(parts, -1).astype(np.uint8)


def source_columns(n_out: int, factor: int, n_source: int) -> npt.NDArray[np.float64]:
    """Centre of each downsampled column in source column coordinates."""
    starts = np.arange(n_out) * factor
    stops = np.minimum(starts + factor, n_source)
    return (starts + stops - 1) / 2.0


def upsample_columns(values: npt.ArrayLike, factor: int, n_source: int) -> npt.NDArray[np.float32]:
    """Back to ``n_source`` columns by linear interpolation between block centres.

    The inverse of :func:`downsample_columns` for maps and boundaries computed on the
    downsampled grid; beyond the outer centres the edge values are held.
    """
    v = np.asarray(values, dtype=np.float64)
    centres = source_columns(v.shape[-1], factor, n_source)
    target = np.arange(n_source, dtype=np.float64)
    flat = v.reshape(-1, v.shape[-1])
    # rows without NaN (nearly all) share one set of weights: a vectorised np.interp
    pos = np.clip(np.interp(target, centres, np.arange(centres.size, dtype=np.float64)), 0, centres.size - 1)
    i0 = np.floor(pos).astype(np.int64)
    i1 = np.minimum(i0 + 1, centres.size - 1)
    w = (pos - i0).astype(np.float64)
    out = flat[:, i0] * (1.0 - w) + flat[:, i1] * w
    for i in np.flatnonzero(~np.isfinite(flat).all(axis=1)):
        row = flat[i]
        ok = np.isfinite(row)
        out[i] = np.interp(target, centres[ok], row[ok]) if ok.any() else np.nan
    return out.reshape(*v.shape[:-1], n_source).astype(np.float32)

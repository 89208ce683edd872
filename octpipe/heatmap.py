"""Patch-to-volume reassembly: sliding windows, weighted merging and the way back to the source.

Pure functions on numpy arrays (no files, no model):

- :func:`window_index` lays 64×64 windows over every B-scan of the flattened retina with a
  stride (default 16), the last window flush with the border (:func:`octpipe.patches.grid_starts`);
- :func:`window_weights` is the per-pixel weight of a window: ``constant``, ``gaussian``
  (σ = 0.125·size, as MONAI) or ``hann`` (``hann(n + 2)[1:-1]`` per axis, never zero);
- :class:`WindowMerger` accumulates ``Σ w·v`` and ``Σ w`` in two separate float32 arrays and
  divides only at the end (NaN where no window reached), for pixel maps and for scalar window
  scores spread over their footprint;
- :func:`to_source_geometry` undoes the flattening (to the downsampled grid), then the column
  downsampling (to the source grid), and zeroes everything outside ILM..BM.

With an identity model (reconstruction = input) the merged reconstruction equals the flattened
image and the residual map is zero for every weighting and stride (tests check it).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from octpipe.patches import grid_starts
from octpipe.preprocess.blocks import slabs
from octpipe.preprocess.flatten import unflatten_image
from octpipe.preprocess.resample import upsample_columns

__all__ = [
    "WEIGHTINGS",
    "window_index",
    "window_weights",
    "WindowMerger",
    "retina_mask",
    "source_retina",
    "to_source_geometry",
]

#: Window weightings of :func:`window_weights`.
WEIGHTINGS = ("constant", "gaussian", "hann")


def window_index(flat_shape: tuple[int, int, int], *, size: int = 64, stride: int = 16) -> npt.NDArray[np.int64]:
    """Every window of a flattened volume as rows ``(bscan, row, col)`` of its top-left corner.

    Parameters
    ----------
    flat_shape : (n_bscans, height, width)
        Shape of the flattened area.
    size : int, default 64
        Window side in pixels (the model's patch size).
    stride : int, default 16
        Step between windows; the last window of each axis ends flush with the border.

    Returns
    -------
    ndarray of int64, shape (n, 3)
        B-scan-major order.

    Raises
    ------
    ValueError
        If the window is larger than the area or ``stride < 1``.

    Examples
    --------
    >>> window_index((2, 64, 80), size=64, stride=16).tolist()
    [[0, 0, 0], [0, 0, 16], [1, 0, 0], [1, 0, 16]]
    """
    nz, h, w = flat_shape
    rows = grid_starts(h, size, stride)
    cols = grid_starts(w, size, stride)
    b, r, c = np.meshgrid(np.arange(nz), rows, cols, indexing="ij")
    return np.stack([b.ravel(), r.ravel(), c.ravel()], axis=1).astype(np.int64)


def window_weights(size: int, mode: str = "gaussian", *, sigma_scale: float = 0.125) -> npt.NDArray[np.float32]:
    """Per-pixel weight of a ``size``×``size`` window, all values > 0.

    Parameters
    ----------
    size : int
        Window side.
    mode : {'constant', 'gaussian', 'hann'}, default 'gaussian'
        ``constant``: plain averaging. ``gaussian``: exp(−d²/2σ²) around the centre with
        σ = ``sigma_scale``·size, clamped below at 1e-3 of the peak. ``hann``: outer product of
        ``hann(size + 2)[1:-1]`` (torchio's choice, which never reaches zero).
    sigma_scale : float, default 0.125
        σ as a fraction of the window side (MONAI's default).

    Returns
    -------
    ndarray of float32, shape (size, size)
        Peak 1.

    Raises
    ------
    ValueError
        If ``mode`` is unknown.
    """
    if mode == "constant":
        return np.ones((size, size), np.float32)
    if mode == "gaussian":
        centre = (size - 1) / 2.0
        d = np.arange(size, dtype=np.float64) - centre
        g = np.exp(-(d**2) / (2.0 * (sigma_scale * size) ** 2))
        w = np.outer(g, g)
        return np.maximum(w / w.max(), 1e-3).astype(np.float32)
    if mode == "hann":
        n = size + 2
        h = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n) / (n - 1))
        h = h[1:-1]
        w = np.outer(h, h)
        return (w / w.max()).astype(np.float32)
    raise ValueError(f"weighting must be one of {', '.join(WEIGHTINGS)}, got {mode!r}")


class WindowMerger:
    """Accumulate window values into a volume: ``Σ w·v`` and ``Σ w`` kept apart, divided at the end.

    Parameters
    ----------
    shape : (n_bscans, height, width)
        The flattened area.
    size : int
        Window side.
    mode : str, default 'gaussian'
        Weighting (:func:`window_weights`).

    Examples
    --------
    >>> m = WindowMerger((1, 4, 6), 4, "constant")
    >>> m.add(np.array([[0, 0, 0], [0, 0, 2]]), np.stack([np.full((4, 4), 1.0), np.full((4, 4), 3.0)]))
    >>> m.result()[0, 0].tolist()
    [1.0, 1.0, 2.0, 2.0, 3.0, 3.0]
    """

    def __init__(self, shape: tuple[int, int, int], size: int, mode: str = "gaussian") -> None:
        self.shape = tuple(int(s) for s in shape)
        self.size = int(size)
        self.weights = window_weights(self.size, mode)
        self.sum = np.zeros(self.shape, np.float32)
        self.wsum = np.zeros(self.shape, np.float32)

    def add(self, index: npt.ArrayLike, values: npt.ArrayLike) -> None:
        """Add windows at ``index`` ``(n, 3)``: pixel values ``(n, size, size)`` or scalars ``(n,)``."""
        idx = np.asarray(index, dtype=np.int64)
        v = np.asarray(values, dtype=np.float32)
        if v.ndim == 1:
            v = np.broadcast_to(v[:, None, None], (v.shape[0], self.size, self.size))
        if v.shape != (idx.shape[0], self.size, self.size):
            raise ValueError(f"values {v.shape} do not match {idx.shape[0]} windows of {self.size}x{self.size}")
        s = self.size
        w = self.weights
        for (b, r, c), patch in zip(idx, v, strict=True):
            self.sum[b, r:r + s, c:c + s] += w * patch
            self.wsum[b, r:r + s, c:c + s] += w

    def result(self) -> npt.NDArray[np.float32]:
        """``Σ w·v / Σ w``; NaN where no window reached."""
        out = np.full(self.shape, np.nan, np.float32)
        np.divide(self.sum, self.wsum, out=out, where=self.wsum > 0)
        return out


def retina_mask(ilm: npt.ArrayLike, bm: npt.ArrayLike, n_axial: int) -> npt.NDArray[np.bool_]:
    """True for pixels between ILM and BM (inclusive) per A-scan; ``(z, n_axial, x)``.

    Missing boundaries (NaN) give an empty A-scan.
    """
    top = np.asarray(ilm, dtype=np.float64)[:, None, :]
    bottom = np.asarray(bm, dtype=np.float64)[:, None, :]
    rows = np.arange(n_axial, dtype=np.float64)[None, :, None]
    with np.errstate(invalid="ignore"):
        return (rows >= np.floor(top)) & (rows <= np.ceil(bottom))


def source_retina(layers: npt.ArrayLike, *, factor: int, n_axial: int, n_ascans: int
                  ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_]]:
    """ILM/BM rows on the source grid and the ILM..BM mask ``(z, n_axial, n_ascans)`` there.

    Parameters
    ----------
    layers : (2, z, x') array
        ILM and BM rows on the downsampled grid (the store's ``layers``).
    factor, n_axial, n_ascans : int
        Column downsampling factor and the source B-scan size.
    """
    lay = np.asarray(layers, dtype=np.float32)
    if factor != 1 or lay.shape[-1] != n_ascans:
        lay = upsample_columns(lay, factor, n_ascans)
    return lay, retina_mask(lay[0], lay[1], n_axial)


def to_source_geometry(
    flat_map: npt.ArrayLike,
    flatmap: npt.ArrayLike,
    inside: npt.ArrayLike,
    *,
    bm_row: int,
    factor: int,
) -> npt.NDArray[np.float32]:
    """A map on the flattened grid → the source B-scan grid, zero outside ILM..BM.

    Parameters
    ----------
    flat_map : (z, height, x') array
        Map on the flattened, column-downsampled grid (NaN = not covered).
    flatmap : (2, z, x') array
        BM reference row and scale per A-scan (the store's ``flatmap``).
    inside : (z, n_axial, n_ascans) bool array
        ILM..BM on the source grid (:func:`source_retina`); it also gives the source size.
    bm_row : int
        Row of BM in the flattened area.
    factor : int
        Column downsampling factor.

    Returns
    -------
    ndarray of float32, shape of ``inside``
    """
    ins = np.asarray(inside, dtype=bool)
    _, n_axial, n_ascans = ins.shape
    m = np.nan_to_num(np.asarray(flat_map, dtype=np.float32), nan=0.0)
    fm = np.asarray(flatmap)
    out = np.empty(ins.shape, dtype=np.float32)
    for sl in slabs(ins.shape):  # B-scan by B-scan: the float64 sampling grids stay small
        down = unflatten_image(m[sl], fm[:, sl], n_axial=n_axial, bm_row=bm_row, order=1, fill=0.0)
        up = upsample_columns(down, factor, n_ascans) if (factor != 1 or down.shape[-1] != n_ascans) else down
        out[sl] = np.where(ins[sl], up, 0.0)
    return out

"""Image statistics that compare phantoms with real B-scans.

All statistics are taken in the display domain (the log mapping of
:func:`octpipe.preprocess.intensity.linear_to_display`) on the same regions defined by
the ILM and BM rows, so a phantom and a real Spectralis file are measured by exactly
the same code.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from scipy import ndimage as ndi

__all__ = ["bscan_statistics"]


def _lag_corr(res: np.ndarray, mask: np.ndarray, axis: int) -> float:
    a = np.moveaxis(res, axis, 0)
    m = np.moveaxis(mask, axis, 0)
    both = m[:-1] & m[1:]
    x, y = a[:-1][both], a[1:][both]
    if x.size < 10:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def bscan_statistics(
    display: npt.ArrayLike,
    ilm: npt.ArrayLike,
    bm: npt.ArrayLike,
) -> dict[str, float]:
    """Statistics of one display-domain B-scan, by region.

    Parameters
    ----------
    display : array_like, shape (n_axial, n_ascans)
        Display-domain image in [0, 1].
    ilm, bm : array_like, shape (n_ascans,)
        Boundary rows; columns where either is NaN are ignored.

    Returns
    -------
    dict
        ``retina_p10/p25/p50/p75/p90/p95``, ``retina_mean``, ``retina_std``: the histogram
        inside ILM..BM. ``vitreous_median``: above ILM (more than 15 rows up).
        ``contrast_bright_dark``: p95 - p10 inside the retina (bright bands vs dark bands).
        ``contrast_retina_vitreous``: retina median minus vitreous median.
        ``rpe_mean``, ``onl_mean``: mean of the 2-8 rows above BM (RPE complex) and of the
        darkest 10-row window of each A-scan's inner retina (ONL), and their difference
        ``contrast_rpe_onl``. ``speckle_std``: spread of the residual after a local mean
        (3 × 25 px) inside the retina; ``speckle_corr_axial``/``speckle_corr_lateral``:
        lag-1 correlations of that residual.
    """
    d = np.asarray(display, dtype=np.float64)
    ilm = np.asarray(ilm, dtype=np.float64)
    bm = np.asarray(bm, dtype=np.float64)
    if d.ndim != 2 or ilm.shape != (d.shape[1],) or bm.shape != (d.shape[1],):
        raise ValueError(
            f"display must be (n_axial, n_ascans) with ilm/bm (n_ascans,), got {d.shape}, {ilm.shape}, {bm.shape}"
        )
    ok = np.isfinite(ilm) & np.isfinite(bm)
    if ok.sum() < 10:
        raise ValueError("fewer than 10 A-scans have both ILM and BM")
    rows = np.arange(d.shape[0], dtype=np.float64)[:, None]
    ilm_f = np.where(ok, ilm, -1.0)[None, :]
    bm_f = np.where(ok, bm, -1.0)[None, :]
    retina = ok[None, :] & (rows >= ilm_f + 2) & (rows <= bm_f - 1)
    vitreous = ok[None, :] & (rows < ilm_f - 15)
    rpe = ok[None, :] & (rows >= bm_f - 8) & (rows <= bm_f - 2)
    v = d[retina]
    pct = np.percentile(v, [10, 25, 50, 75, 90, 95])
    # ONL: darkest 10-row window between ILM and the RPE of each A-scan
    win = ndi.uniform_filter1d(d, 10, axis=0)
    onl = []
    for c in np.flatnonzero(ok):
        lo, hi = int(ilm[c]) + 5, int(bm[c]) - 20
        if hi > lo:
            onl.append(win[lo:hi, c].min())
    res = d - ndi.uniform_filter(d, (3, 25))
    out = {f"retina_p{p}": float(x) for p, x in zip((10, 25, 50, 75, 90, 95), pct, strict=True)}
    out.update(
        retina_mean=float(v.mean()),
        retina_std=float(v.std()),
        vitreous_median=float(np.median(d[vitreous])) if vitreous.any() else float("nan"),
        contrast_bright_dark=float(pct[5] - pct[0]),
        contrast_retina_vitreous=float(pct[2] - (np.median(d[vitreous]) if vitreous.any() else np.nan)),
        rpe_mean=float(d[rpe].mean()),
        onl_mean=float(np.mean(onl)) if onl else float("nan"),
        speckle_std=float(res[retina].std()),
        speckle_corr_axial=_lag_corr(res, retina, 0),
        speckle_corr_lateral=_lag_corr(res, retina, 1),
    )
    out["contrast_rpe_onl"] = out["rpe_mean"] - out["onl_mean"]
    return out

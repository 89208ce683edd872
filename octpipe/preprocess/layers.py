"""ILM and Bruch's membrane (BM) segmentation for flattening.

The two surfaces that octpipe flattens to are found per volume, in vectorised numpy,
with every parameter given in µm and converted with the volume's spacing:

1. **Prepare.** Invalid pixels (FLT_MAX margins, NaN) are filled from the nearest valid
   pixel of the same B-scan; the display-domain image is smoothed with an anisotropic
   Gaussian and differentiated axially.
2. **ILM, first pass.** A dynamic programme over the A-scans of all B-scans at once
   (Viterbi; the same optimum as a shortest path through a column graph) picks one
   row per A-scan minimising ``-edge + prior + smoothness``: the edge term is the
   normalised dark→bright gradient, the prior penalises tissue above the candidate
   (the ILM is the first edge under the dark vitreous, so the IS/OS junction, which
   is as strong, loses), and the smoothness term charges every pixel of jump between
   neighbouring A-scans, with a hard limit from a maximum slope.
3. **BM, first pass.** A second dynamic programme below ``ILM + min thickness``
   looks for the lower edge of the **outermost** bright band: the bright→dark
   gradient gated by the brightness just above the edge, minus a penalty when another
   such candidate lies deeper. The lifted RPE over a PED or drusen and the
   photoreceptors over subretinal fluid therefore lose to the thin BM line below
   them; a low slope limit keeps the path on Bruch's membrane, which never moves.
4. **Outliers.** Each surface is compared with its median over a (z, x) window; points
   that deviate more than a threshold, and A-scans without valid pixels, become NaN
   and are inpainted by interpolation across A-scans, then across B-scans.
5. **Second pass.** Both surfaces are re-found in a narrow band around the first
   result, on the gradient of a lightly smoothed image in a domain where the edge
   sits where the boundary is (linear reflectivity for the ILM, display domain for BM
   by default, see :class:`LayerParams`), and located to a sub-pixel row by a
   parabola through the gradient peak; a calibrated offset (µm) can be added.
6. **QC.** Fraction of A-scans with a plausible thickness (BM − ILM within
   100–1000 µm), fraction inpainted per surface, edge contrast, and flags.

:func:`choose_layers` swaps in the device's own layers (Heyex ILM/BM) when they are
present and plausible.

Rows follow the phantom and Heyex convention: pixel ``r`` covers rows
``[r - 0.5, r + 0.5)``, so a surface at row ``y`` separates pixel centres above ``y``
from those below.

Examples
--------
>>> from octpipe.testing.phantoms import make_phantom
>>> from octpipe.preprocess.intensity import linear_to_display
>>> ph = make_phantom(np.random.default_rng(0), shape=(2, 248, 256), spacing_mm=(0.24, 0.00774, 0.0226))
>>> res = segment_ilm_bm(linear_to_display(ph.data), spacing_mm=ph.spacing_mm)
>>> res.ilm.shape, res.ilm.dtype.name, res.qc["source"]
((2, 256), 'float32', 'octpipe')
>>> bool(np.mean(np.abs(res.ilm - ph.ilm)) < 1.0 and np.mean(np.abs(res.bm - ph.bm)) < 1.5)
True
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from scipy import ndimage as ndi
from scipy import signal

from octpipe.preprocess.intensity import display_to_linear, linear_to_display

__all__ = ["LayerParams", "LayerResult", "segment_ilm_bm", "choose_layers", "layer_qc"]

_DEBUG: dict | None = None  # TEMP
Domain = Literal["linear", "sqrt", "display"]
_DOMAINS = ("linear", "sqrt", "display")


@dataclass(frozen=True)
class LayerParams:
    """Parameters of :func:`segment_ilm_bm`; every length is in µm.

    Lengths are converted to pixels with the volume's spacing, so one parameter set
    serves any axial/lateral sampling. Slopes are ratios of lengths (µm axial per µm
    lateral), and the jump allowed between neighbouring A-scans is
    ``slope × lateral spacing``.

    Parameters
    ----------
    sigma_axial_um, sigma_lateral_um : float
        Gaussian smoothing before the first pass (AURA uses about 12 and 17 µm).
    bm_sigma_axial_um : float
        Axial smoothing for the BM first pass; small, so that the thin BM line under a
        PED survives.
    refine_sigma_axial_um, refine_sigma_lateral_um : float
        Smoothing before the second (sub-pixel) pass.
    ilm_max_slope, bm_max_slope : float
        Largest slope of each surface between neighbouring A-scans (µm/µm).
    ilm_slope_cost, bm_slope_cost : float
        Smoothness weight: the cost, in units of a full-strength edge, of one A-scan
        step at slope 1.
    ilm_above_um : float
        Height of the window above an ILM candidate that must be dark (vitreous).
    ilm_above_weight : float
        Weight of the tissue-above penalty of the ILM cost.
    bm_above_um : float
        Height of the window above a BM candidate that must hold the bright band.
    bm_below_um : float
        Depth below a BM candidate searched for a deeper candidate (at least the
        height of the largest PED expected).
    bm_deeper_weight : float
        Weight of the penalty for a deeper BM candidate.
    min_thickness_um, max_thickness_um : float
        Plausible retina thickness BM − ILM; also the BM search range below the ILM.
    ilm_band_um, bm_band_um : float
        Half-width of the second-pass band around the first-pass surfaces. The ILM
        band is wider: a vessel in the nerve fibre layer leaves a haze above the ILM
        that the first pass can follow, and the linear-domain second pass cannot be
        fooled by it.
    outlier_um : float
        Deviation from the local median beyond which a first-pass point is an outlier.
    refine_outlier_um : float
        The same for the second pass.
    outlier_window_lateral_um : float
        Lateral extent of the median window.
    ilm_outlier_window_z_um, bm_outlier_window_z_um : float
        Through-plane extent of the median window (0 = within each B-scan). The ILM
        changes fast between B-scans near the foveal pit, the BM does not.
    smooth_lateral_um : float
        Gaussian smoothing of the final surfaces along the A-scans (0 = none).
    ilm_domain, bm_domain : {"linear", "sqrt", "display"}
        Intensity domain of the second pass. In the linear domain a blurred step has
        its steepest rise on the boundary; the log display domain moves it towards the
        dark side.
    ilm_offset_um, bm_offset_um : float
        Calibrated offsets added to the second-pass rows (positive = deeper).
    display_method : {"log", "root4"}
        The display mapping of the input (see :mod:`octpipe.preprocess.intensity`),
        needed to go back to linear reflectivity.
    qc_min_thickness_ok_fraction : float
        Below this fraction of plausible thickness, flag ``thickness_out_of_range``.
    qc_max_inpainted_fraction : float
        Above this fraction of inpainted A-scans, flag ``<surface>_inpainted``.
    qc_min_contrast : float
        Below this median display-domain step across a surface, flag ``no_retina``
        (ILM) or ``bm_low_contrast`` (BM).
    vendor_min_finite_fraction : float
        Vendor layers must be finite on at least this fraction of A-scans.
    vendor_max_median_difference_um : float
        Vendor layers must agree with ours within this median absolute difference.
    """

    sigma_axial_um: float = 8.0
    sigma_lateral_um: float = 15.0
    bm_sigma_axial_um: float = 4.0
    refine_sigma_axial_um: float = 2.0
    refine_sigma_lateral_um: float = 15.0
    ilm_max_slope: float = 3.0
    bm_max_slope: float = 0.35
    ilm_slope_cost: float = 0.15
    bm_slope_cost: float = 0.6
    ilm_above_um: float = 40.0
    ilm_above_weight: float = 1.5
    ilm_above_mean: bool = True
    ilm_first_edge_um: float = 400.0
    ilm_first_edge_gap_um: float = 60.0
    ilm_first_edge_weight: float = 1.0
    bm_above_um: float = 12.0
    bm_below_um: float = 80.0
    bm_deeper_weight: float = 1.0
    bm_gate_low: float = 0.55
    bm_gate_high: float = 0.75
    bm_reference_width_um: float = 2000.0
    bm_reference_sigma_um: float = 200.0
    bm_reference_tolerance_um: float = 15.0
    bm_search_um: float = 30.0
    min_thickness_um: float = 100.0
    max_thickness_um: float = 1000.0
    ilm_band_um: float = 30.0
    ilm_refine_first_edge_weight: float = 0.5
    bm_band_um: float = 12.0
    outlier_um: float = 20.0
    refine_outlier_um: float = 10.0
    outlier_window_lateral_um: float = 150.0
    ilm_outlier_window_z_um: float = 0.0
    bm_outlier_window_z_um: float = 250.0
    smooth_lateral_um: float = 0.0
    ilm_domain: Domain = "linear"
    bm_domain: Domain = "sqrt"
    ilm_offset_um: float = 0.0
    bm_offset_um: float = 0.0
    display_method: Literal["log", "root4"] = "log"
    qc_min_thickness_ok_fraction: float = 0.9
    qc_max_inpainted_fraction: float = 0.2
    qc_min_contrast: float = 0.1
    vendor_min_finite_fraction: float = 0.8
    vendor_max_median_difference_um: float = 30.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("ilm_domain", "bm_domain"):
                if value not in _DOMAINS:
                    raise ValueError(f"{f.name} must be one of {_DOMAINS}, got {value!r}")
                continue
            if f.name == "ilm_above_mean":
                if not isinstance(value, bool):
                    raise ValueError(f"ilm_above_mean must be a bool, got {value!r}")
                continue
            if f.name == "display_method":
                if value not in ("log", "root4"):
                    raise ValueError(f"display_method must be 'log' or 'root4', got {value!r}")
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{f.name} must be a finite number, got {value!r}")
            if f.name.endswith("_offset_um"):
                continue
            if value < 0:
                raise ValueError(f"{f.name} must be >= 0, got {value!r}")
        for name in ("ilm_max_slope", "bm_max_slope", "outlier_um", "refine_outlier_um",
                     "bm_above_um", "ilm_above_um", "max_thickness_um", "ilm_band_um", "bm_band_um"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if not self.min_thickness_um < self.max_thickness_um:
            raise ValueError(f"min_thickness_um must be < max_thickness_um, got "
                             f"{self.min_thickness_um} and {self.max_thickness_um}")
        for name in ("qc_min_thickness_ok_fraction", "qc_max_inpainted_fraction", "vendor_min_finite_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)!r}")


@dataclass(frozen=True)
class LayerResult:
    """ILM and BM of one volume, with quality-control measures.

    Attributes
    ----------
    ilm, bm : ndarray of float32, shape (n_bscans, n_ascans)
        Rows in the input's pixel geometry (NaN only where nothing could be found or
        inpainted, e.g. a volume without any valid pixel in a B-scan).
    qc : dict
        ``thickness_ok_fraction`` (BM − ILM within the plausible range),
        ``inpainted_fraction`` ({"ilm": f, "bm": f}), ``contrast`` ({"ilm": c, "bm": c},
        median display-domain step), ``source`` ("octpipe" or "vendor"), ``flags``
        (list of str, empty when all is well) and, after :func:`choose_layers`,
        ``vendor`` (the checks made on the vendor layers).
    spacing_mm : tuple of float
        (between B-scans, axial, lateral) spacing of the input.
    params : LayerParams
        The parameters used.
    """

    ilm: npt.NDArray[np.float32]
    bm: npt.NDArray[np.float32]
    qc: dict[str, Any] = field(default_factory=dict)
    spacing_mm: tuple[float, float, float] = (0.0, 1.0, 1.0)
    params: LayerParams = field(default_factory=LayerParams)


# ---------------------------------------------------------------------------------------
# helpers


def _odd(n: float) -> int:
    """Nearest odd integer >= 1."""
    k = max(1, int(round(n)))
    return k if k % 2 else k + 1


def _dp_path(cost: npt.NDArray[np.float32], max_jump: int, jump_cost: float,
             centre: npt.NDArray[np.intp] | None = None) -> npt.NDArray[np.intp]:
    """Minimum-cost path through each B-scan, one row per A-scan.

    Minimises ``sum_x cost[z, y_x, x] + jump_cost * |y_x - y_{x-1}|`` subject to
    ``|y_x - y_{x-1}| <= max_jump``, for all B-scans at once (Viterbi over the columns).
    The min-convolution with the L1 jump cost is done in O(log max_jump) stages of
    shifts (1, 2, 4, ..., remainder): a binary decomposition reaches every jump with
    exactly its L1 cost.

    Parameters
    ----------
    cost : ndarray, shape (n_bscans, n_rows, n_ascans)
    max_jump : int
        Largest jump in rows between neighbouring A-scans (>= 0).
    jump_cost : float
        Cost per row of jump.
    centre : ndarray of int, shape (n_bscans, n_ascans), optional
        When given, ``cost`` is a band: its row ``o`` at A-scan ``x`` is the image row
        ``centre[z, x] + o``, and jumps are measured in image rows.

    Returns
    -------
    ndarray of intp, shape (n_bscans, n_ascans)
        Row indices into ``cost`` (band rows when ``centre`` is given).
    """
    nz, ny, nx = cost.shape
    stages: list[int] = []
    reach = 0
    step = 1
    while reach < max_jump:
        s = min(step, max_jump - reach)
        stages.append(s)
        reach += s
        step *= 2
    # in band mode the previous A-scan's band is re-indexed into this one's, with a
    # margin of max_jump rows on each side so that jumps from outside the band count
    m = max_jump if centre is not None else 0
    n = ny + 2 * m
    pad = max(stages) if stages else 0
    acc = np.ascontiguousarray(cost[:, :, 0], dtype=np.float32)
    back = np.zeros((nx, nz, ny), dtype=np.int32)
    buf = np.full((nz, n + 2 * pad), np.inf, dtype=np.float32)
    obuf = np.zeros((nz, n + 2 * pad), dtype=np.int32)
    cost_t = np.ascontiguousarray(np.moveaxis(cost, 2, 0), dtype=np.float32)  # (nx, nz, ny)
    rows = np.arange(n)[None, :] - m
    zero = np.zeros((nz, n), dtype=np.int32)
    for x in range(1, nx):
        if centre is not None:
            # band row o of this A-scan is band row o - delta of the previous one
            delta = (centre[:, x - 1] - centre[:, x])[:, None]
            src = rows - delta
            inside = (src >= 0) & (src < ny)
            best = np.where(inside, np.take_along_axis(acc, np.clip(src, 0, ny - 1), axis=1),
                            np.float32(np.inf)).astype(np.float32)
        else:
            best = acc
        off = zero
        for s in stages:
            pen = np.float32(jump_cost * s)
            buf[:, pad:pad + n] = best
            obuf[:, pad:pad + n] = off
            new_best = best.copy()
            new_off = off.copy()
            for sign in (1, -1):
                lo = pad + sign * s
                cand = buf[:, lo:lo + n] + pen
                better = cand < new_best
                np.copyto(new_best, cand, where=better)
                np.copyto(new_off, obuf[:, lo:lo + n] + np.int32(sign * s), where=better)
            best, off = new_best, new_off
        best, off = best[:, m:m + ny], off[:, m:m + ny]
        if centre is not None:
            off = off - (centre[:, x - 1] - centre[:, x])[:, None]
            stuck = ~np.isfinite(best).any(axis=1)
            if stuck.any():  # bands too far apart to connect: restart from the best previous row
                prev = np.argmin(acc[stuck], axis=1)
                best[stuck] = acc[stuck].min(axis=1, keepdims=True) + np.float32(jump_cost * max_jump)
                off[stuck] = prev[:, None] - np.arange(ny)[None, :]
        back[x] = off
        acc = best + cost_t[x]
    path = np.empty((nz, nx), dtype=np.intp)
    path[:, -1] = np.argmin(acc, axis=1)
    zi = np.arange(nz)
    for x in range(nx - 1, 0, -1):
        path[:, x - 1] = path[:, x] + back[x][zi, path[:, x]]
    return path


def _window_mean(a: npt.NDArray[np.float32], start: int, stop: int) -> npt.NDArray[np.float32]:
    """Mean of ``a[:, y + start : y + stop, :]`` for every row ``y`` (clipped at the borders)."""
    ny = a.shape[1]
    c = np.zeros((a.shape[0], ny + 1, a.shape[2]), dtype=np.float64)
    np.cumsum(a, axis=1, out=c[:, 1:])
    y = np.arange(ny)
    lo = np.clip(y + start, 0, ny)
    hi = np.clip(y + stop, 0, ny)
    n = np.maximum(hi - lo, 1)[None, :, None]
    return ((c[:, hi] - c[:, lo]) / n).astype(np.float32)


def _window_max(a: npt.NDArray[np.float32], start: int, stop: int) -> npt.NDArray[np.float32]:
    """Maximum of ``a[:, y + start : y + stop, :]`` for every row ``y`` (padded with the minimum)."""
    size = stop - start
    if size <= 0:
        raise ValueError(f"window must be non-empty, got [{start}, {stop})")
    ny = a.shape[1]
    low = float(a.min()) if a.size else 0.0
    pad_lo, pad_hi = max(0, -start), max(0, stop)
    ap = np.pad(a, ((0, 0), (pad_lo, pad_hi), (0, 0)), constant_values=low)
    out = ndi.maximum_filter1d(ap, size=size, axis=1, mode="constant", cval=low)
    off = pad_lo + start + size // 2  # scipy centres the window on index size // 2
    return out[:, off:off + ny]


def _inpaint(surf: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Fill NaN by linear interpolation across A-scans, then across B-scans."""
    out = np.array(surf, dtype=np.float64)
    nz, nx = out.shape
    x = np.arange(nx)
    empty = []
    for z in range(nz):
        ok = np.isfinite(out[z])
        if ok.all():
            continue
        if ok.sum() >= 1:
            out[z] = np.interp(x, x[ok], out[z, ok])
        else:
            empty.append(z)
    if empty and len(empty) < nz:
        zz = np.arange(nz)
        ok = np.ones(nz, dtype=bool)
        ok[empty] = False
        for xi in range(nx):
            out[~ok, xi] = np.interp(zz[~ok], zz[ok], out[ok, xi])
    return out


def _reject_outliers(surf: npt.NDArray[np.float64], missing: npt.NDArray[np.bool_], *, size: tuple[int, int],
                     threshold_px: float) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_]]:
    """Mark points far from the local median (and ``missing`` ones) NaN, then inpaint.

    Returns the inpainted surface and the mask of replaced points.
    """
    filled = _inpaint(np.where(missing, np.nan, surf))
    if not np.isfinite(filled).any():
        return filled, np.ones(surf.shape, dtype=bool)
    med = ndi.median_filter(np.nan_to_num(filled), size=size, mode="nearest")
    bad = missing | ~np.isfinite(surf) | (np.abs(np.nan_to_num(surf) - med) > threshold_px)
    return _inpaint(np.where(bad, np.nan, surf)), bad


def _local_linear(values: npt.NDArray[np.float64], weight: npt.NDArray[np.float64],
                  sigma: float) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Weighted local-linear regression along the last axis with a Gaussian kernel.

    Returns the fit and the kernel-weighted sum of ``weight`` (how much data the fit
    rests on). A straight line is reproduced exactly, borders included.
    """
    half = max(1, int(math.ceil(4.0 * sigma)))
    d = np.arange(-half, half + 1, dtype=np.float64)
    w = np.exp(-0.5 * (d / max(sigma, 1e-6)) ** 2)[None, :]

    def conv(a: npt.NDArray[np.float64], k: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        return signal.fftconvolve(a, k, mode="same", axes=1)

    # sums over u of w(u - x) (u - x)^k: the kernel is flipped by convolution, hence the signs
    s0 = conv(weight, w)
    s1 = -conv(weight, w * d)
    s2 = conv(weight, w * d * d)
    t0 = conv(weight * values, w)
    t1 = -conv(weight * values, w * d)
    det = s0 * s2 - s1 * s1
    with np.errstate(divide="ignore", invalid="ignore"):
        fit = np.where(np.abs(det) > 1e-9 * np.maximum(s0 * s2, 1e-300), (s2 * t0 - s1 * t1) / det,
                       t0 / np.maximum(s0, 1e-300))
    return fit, s0


def _lower_envelope(surf: npt.NDArray[np.float64], *, width_px: float, sigma_px: float, tol_px: float,
                    n_iter: int = 3) -> npt.NDArray[np.float64]:
    """Smooth surface through ``surf`` (per B-scan) that bridges stretches lifted above it.

    A first guess comes from a percentile closing over ``width_px`` A-scans (the 90th
    percentile of the rows, i.e. the deep side, then the 10th of that): stretches lifted
    by lesions narrower than about the window are ignored, while straight surfaces come
    back unchanged. A robust local-linear regression then follows the surface in detail:
    points more than ``tol_px`` above (smaller rows than) the fit, or ``2 * tol_px``
    below it, get no weight; where too little data is left (inside a wide PED) the
    previous fit is kept.
    """
    if not np.isfinite(surf).all():
        return surf
    size = (1, max(3, int(round(width_px))))
    fit = ndi.percentile_filter(ndi.percentile_filter(surf, 90, size=size, mode="nearest"), 10, size=size,
                                mode="nearest")
    keep = ((surf >= fit - tol_px) & (surf <= fit + 2.0 * tol_px)).astype(np.float64)
    for scale in (4.0, 2.0, 1.0):
        sig = sigma_px * scale
        ref_mass = math.sqrt(2.0 * math.pi) * sig
        for _ in range(n_iter):
            new, mass = _local_linear(surf, keep, sig)
            fit = np.where(mass > 0.25 * ref_mass, new, fit)
            keep = ((surf >= fit - tol_px) & (surf <= fit + 2.0 * tol_px)).astype(np.float64)
    return fit


def _climb(g: npt.NDArray[np.float32], idx: npt.NDArray[np.intp], steps: int = 3) -> npt.NDArray[np.intp]:
    """Move ``idx`` (band axis 1 of ``g``) uphill to the nearest local maximum, at most ``steps`` rows."""
    nb = g.shape[1]
    i = idx.copy()
    for _ in range(steps):
        here = np.take_along_axis(g, i[:, None, :], axis=1)[:, 0]
        up = np.take_along_axis(g, np.clip(i - 1, 0, nb - 1)[:, None, :], axis=1)[:, 0]
        dn = np.take_along_axis(g, np.clip(i + 1, 0, nb - 1)[:, None, :], axis=1)[:, 0]
        i = np.where((up > here) & (up >= dn), np.clip(i - 1, 0, nb - 1),
                     np.where(dn > here, np.clip(i + 1, 0, nb - 1), i))
    return i


def _parabolic_peak(g: npt.NDArray[np.float32], idx: npt.NDArray[np.intp]) -> npt.NDArray[np.float64]:
    """Sub-pixel offset of the peak of ``g`` (band axis 1) at integer ``idx`` (parabola through 3 points)."""
    nb = g.shape[1]
    i = np.clip(idx, 1, nb - 2)
    gm = np.take_along_axis(g, (i - 1)[:, None, :], axis=1)[:, 0]
    g0 = np.take_along_axis(g, i[:, None, :], axis=1)[:, 0]
    gp = np.take_along_axis(g, (i + 1)[:, None, :], axis=1)[:, 0]
    den = gm - 2.0 * g0 + gp
    with np.errstate(divide="ignore", invalid="ignore"):
        d = np.where(den < 0, 0.5 * (gm - gp) / den, 0.0)
    return i + np.clip(d, -0.5, 0.5)


def _to_domain(display: npt.NDArray[np.float32], domain: str, method: str) -> npt.NDArray[np.float32]:
    if domain == "display":
        return display
    lin = display_to_linear(display, method=method)  # type: ignore[arg-type]
    return np.sqrt(lin) if domain == "sqrt" else lin


def _fill_invalid(display: npt.NDArray[np.float32], invalid: npt.NDArray[np.bool_]) -> npt.NDArray[np.float32]:
    """Replace invalid pixels by the nearest valid pixel of the same B-scan."""
    out = display.copy()
    for z in range(display.shape[0]):
        bad = invalid[z]
        if not bad.any() or bad.all():
            continue
        idx = ndi.distance_transform_edt(bad, return_distances=False, return_indices=True)
        out[z] = display[z][idx[0], idx[1]]
    out[np.broadcast_to(invalid.all(axis=(1, 2))[:, None, None], out.shape)] = 0.0
    return out


def _levels(s: npt.NDArray[np.float32], valid: npt.NDArray[np.bool_]) -> tuple[np.ndarray, np.ndarray]:
    """Dark (20th percentile) and bright (99th percentile) level per B-scan, shape (nz, 1, 1)."""
    nz = s.shape[0]
    lo = np.zeros(nz, dtype=np.float32)
    hi = np.ones(nz, dtype=np.float32)
    for z in range(nz):
        v = s[z][valid[z]]
        if v.size:
            lo[z], hi[z] = np.percentile(v, [20.0, 99.0])
    hi = np.maximum(hi, lo + 1e-3)
    return lo[:, None, None], hi[:, None, None]


def _column_scale(g: npt.NDArray[np.float32], region: npt.NDArray[np.bool_] | None = None) -> np.ndarray:
    """Typical strongest edge per B-scan: median over A-scans of the column maximum, shape (nz, 1, 1)."""
    gg = g if region is None else np.where(region, g, 0.0)
    colmax = gg.max(axis=1)  # (nz, nx)
    scale = np.median(colmax, axis=1)
    return np.maximum(scale, 1e-6).astype(np.float32)[:, None, None]


# ---------------------------------------------------------------------------------------
# main entry


def segment_ilm_bm(
    display: npt.ArrayLike,
    *,
    spacing_mm: tuple[float, float, float],
    invalid: npt.ArrayLike | None = None,
    params: LayerParams | None = None,
    domain: Literal["display", "linear"] = "display",
) -> LayerResult:
    """Segment the ILM and Bruch's membrane of a volume.

    Parameters
    ----------
    display : array_like, shape (n_bscans, n_axial, n_ascans)
        Display-domain volume in [0, 1] (:func:`~octpipe.preprocess.intensity.linear_to_display`
        of a ``.vol``), or linear reflectivity with ``domain="linear"``. Non-finite
        values count as invalid. The input is not modified.
    spacing_mm : (float, float, float)
        (between B-scans, axial, lateral) in mm. The B-scan spacing may be 0 (single
        B-scans, radial or circle scans): nothing is then smoothed across B-scans.
    invalid : array_like of bool, optional
        Pixels to ignore (e.g. ``OctVolume.invalid``), same shape as ``display``.
    params : LayerParams, optional
        Defaults to ``LayerParams()``.
    domain : {"display", "linear"}
        Intensity domain of ``display``; linear data is mapped with
        ``params.display_method`` first.

    Returns
    -------
    LayerResult
        ``ilm`` and ``bm`` rows (float32, (n_bscans, n_ascans)) and ``qc``.

    Raises
    ------
    ValueError
        If the volume is not 3-D, has no valid pixel, is too short axially, or the
        spacing is invalid.

    Examples
    --------
    >>> from octpipe.testing.phantoms import make_phantom
    >>> ph = make_phantom(np.random.default_rng(1), shape=(1, 248, 128), spacing_mm=(0.0, 0.00774, 0.0452))
    >>> res = segment_ilm_bm(ph.data, spacing_mm=ph.spacing_mm, domain="linear")
    >>> float(np.median(np.abs(res.bm - ph.bm))) < 1.5
    True
    """
    p = LayerParams() if params is None else params
    if not isinstance(p, LayerParams):
        raise ValueError(f"params must be a LayerParams, got {type(p).__name__}")
    if domain not in ("display", "linear"):
        raise ValueError(f"domain must be 'display' or 'linear', got {domain!r}")
    arr = np.asarray(display)
    if arr.ndim != 3:
        raise ValueError(f"display must be 3-D (n_bscans, n_axial, n_ascans), got shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"display must hold real numbers, got dtype {arr.dtype}")
    nz, ny, nx = arr.shape
    if min(nz, nx) < 1 or ny < 8:
        raise ValueError(f"volume shape {arr.shape} is too small (need n_axial >= 8)")
    try:
        dz_mm, dy_mm, dx_mm = (float(v) for v in spacing_mm)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"spacing_mm must be 3 numbers (z, y, x) in mm, got {spacing_mm!r}") from exc
    if not (math.isfinite(dz_mm) and dz_mm >= 0 and dy_mm > 0 and dx_mm > 0 and math.isfinite(dy_mm)
            and math.isfinite(dx_mm)):
        raise ValueError(f"spacing_mm must be (z >= 0, y > 0, x > 0) finite mm, got {spacing_mm!r}")
    bad = ~np.isfinite(arr) | (np.abs(arr) > 1e30) if arr.dtype.kind == "f" else np.zeros(arr.shape, bool)
    if invalid is not None:
        inv = np.asarray(invalid)
        if inv.shape != arr.shape:
            raise ValueError(f"invalid must have the volume's shape {arr.shape}, got {inv.shape}")
        bad = bad | inv.astype(bool)
    if bad.all():
        raise ValueError("volume has no valid pixel")
    x = np.where(bad, 0.0, arr).astype(np.float32)
    if domain == "linear":
        x = linear_to_display(x, method=p.display_method)
    else:
        x = np.clip(x, 0.0, 1.0)
    # rows or A-scans that are exactly 0 in a B-scan that has data are empty margins
    # (Spectralis leaves a few blank rows at the top), not dark tissue
    empty = x <= 0.0
    has_data = ~(empty | bad).all(axis=(1, 2), keepdims=True)
    blank = ((empty | bad).all(axis=2, keepdims=True) | (empty | bad).all(axis=1, keepdims=True)) & has_data
    bad = bad | blank
    if bad.any():
        x = _fill_invalid(x, bad)
    valid = ~bad

    dy_um, dx_um = dy_mm * 1e3, dx_mm * 1e3
    ax = lambda um: um / dy_um  # noqa: E731  µm -> axial px
    lat = lambda um: um / dx_um  # noqa: E731  µm -> lateral px
    min_th = int(round(ax(p.min_thickness_um)))
    max_th = int(round(ax(p.max_thickness_um)))
    if ny <= min_th + 4:
        raise ValueError(f"axial field {ny} px x {dy_um:.2f} µm is shorter than the minimum retina "
                         f"thickness {p.min_thickness_um} µm")
    empty_cols = (valid.sum(axis=1) < 0.5 * ny)  # (nz, nx): A-scans without data

    # ---- first pass: ILM --------------------------------------------------------------
    s = ndi.gaussian_filter(x, sigma=(0.0, ax(p.sigma_axial_um), lat(p.sigma_lateral_um)), mode="nearest")
    g = np.gradient(s, axis=1)
    lo, hi = _levels(s, valid)
    level = np.clip((s - lo) / (hi - lo), 0.0, 1.0)
    gp = np.clip(g, 0.0, None)
    edge = np.minimum(gp / _column_scale(gp), 1.0)
    n_above = max(1, int(round(ax(p.ilm_above_um))))
    above = _window_mean(level, -n_above, 0) if p.ilm_above_mean else _window_max(level, -n_above, 0)
    above[:, :2] = 0.0
    cost = -edge + p.ilm_above_weight * above
    if p.ilm_first_edge_weight > 0:
        n_gap = max(2, int(round(ax(p.ilm_first_edge_gap_um))))
        n_far = max(n_gap + 1, int(round(ax(p.ilm_first_edge_um))))
        strong = np.clip((edge - 0.35) / 0.4, 0.0, 1.0)
        cost += p.ilm_first_edge_weight * _window_max(strong, -n_far, -n_gap + 1)
    cost[:, ny - min_th:, :] = 2.0  # no room for a retina below
    jump = max(1, int(math.ceil(p.ilm_max_slope * dx_um / dy_um)))
    ilm0 = _dp_path(cost, jump, p.ilm_slope_cost * dy_um / dx_um).astype(np.float64)
    del cost, above

    # ---- first pass: BM ---------------------------------------------------------------
    # (a) lower edge of the RPE complex: a bright->dark edge under a band nearly as
    #     bright as the brightest of the outer retina, preferring the deeper of two
    #     such edges close together (RPE over the ellipsoid zone).
    sb = ndi.gaussian_filter(x, sigma=(0.0, ax(p.bm_sigma_axial_um), lat(p.sigma_lateral_um)), mode="nearest")
    gb = np.gradient(sb, axis=1)
    rows = np.arange(ny)[None, :, None]
    ilm_i = ilm0[:, None, :]
    region = (rows >= ilm_i + min_th) & (rows <= ilm_i + max_th)
    gn = np.clip(-gb, 0.0, None)
    edge_b = np.minimum(gn / _column_scale(gn, region), 1.0)
    ref = np.where(region, sb, -np.inf).max(axis=1, keepdims=True)
    ref = np.maximum(ndi.median_filter(ref, size=(1, 1, _odd(lat(p.outlier_window_lateral_um))), mode="nearest"),
                     lo + 1e-3)
    n_up = max(1, int(round(ax(p.bm_above_um))))
    rel = (_window_mean(sb, -n_up, 0) - lo) / (ref - lo)
    gate = np.clip((rel - p.bm_gate_low) / max(p.bm_gate_high - p.bm_gate_low, 1e-6), 0.0, 1.0)
    q = np.where(region, edge_b * gate, 0.0).astype(np.float32)
    n_skip = max(2, int(round(ax(p.bm_above_um))))
    n_down = max(n_skip + 1, int(round(ax(p.bm_below_um))))
    cost = np.where(region, -q + p.bm_deeper_weight * _window_max(q, n_skip, n_down), 2.0).astype(np.float32)
    jump_b = max(1, int(math.ceil(p.bm_max_slope * dx_um / dy_um)))
    lam_b = p.bm_slope_cost * dy_um / dx_um
    bm_a = _dp_path(cost, jump_b, lam_b).astype(np.float64)
    del cost, gate, rel
    # (b) Bruch's membrane does not move with lesions: a smooth surface through the
    #     RPE edge that ignores stretches lifted above it (PED, drusen) guides a search
    #     for the strongest bright->dark edge near it (the BM line under a PED).
    kx0 = _odd(lat(p.outlier_window_lateral_um))
    kz0 = _odd(p.bm_outlier_window_z_um / (dz_mm * 1e3)) if dz_mm > 0 and nz > 1 else 1
    bm_a, _ = _reject_outliers(bm_a, empty_cols, size=(kz0, kx0), threshold_px=ax(p.outlier_um))
    bm_ref = _lower_envelope(bm_a, width_px=lat(p.bm_reference_width_um), sigma_px=lat(p.bm_reference_sigma_um),
                             tol_px=ax(p.bm_reference_tolerance_um))
    half_s = max(2, int(round(ax(p.bm_search_um))))
    centre = np.clip(np.round(bm_ref).astype(np.intp), 0, ny - 1)
    offs = np.arange(-half_s, half_s + 1)
    ridx = np.clip(centre[:, None, :] + offs[None, :, None], 0, ny - 1)
    band = np.take_along_axis(edge_b, ridx, axis=1)
    bpath = _dp_path(-band.astype(np.float32), jump_b, lam_b, centre=centre - half_s)
    bm0 = (centre - half_s + bpath).astype(np.float64)
    if _DEBUG is not None:
        _DEBUG.update(bm_a=bm_a, bm_ref=bm_ref, bm0=bm0, ilm0=ilm0)
    del q, band, region, edge_b

    # ---- outliers and inpainting ------------------------------------------------------
    kx = _odd(lat(p.outlier_window_lateral_um))

    def kz(um: float) -> int:
        return _odd(um / (dz_mm * 1e3)) if dz_mm > 0 and nz > 1 else 1

    jumps = {True: jump, False: jump_b}
    lambdas = {True: p.ilm_slope_cost * dy_um / dx_um, False: p.bm_slope_cost * dy_um / dx_um}
    ilm1, ilm_bad = _reject_outliers(ilm0, empty_cols, size=(kz(p.ilm_outlier_window_z_um), kx),
                                     threshold_px=ax(p.outlier_um))
    bm1, bm_bad = _reject_outliers(bm0, empty_cols, size=(kz(p.bm_outlier_window_z_um), kx),
                                   threshold_px=ax(p.outlier_um))

    # ---- second pass: narrow band, sub-pixel ------------------------------------------
    # the band is sampled along the first-pass surface and smoothed along it, so steep
    # stretches (foveal pit, cysts, PED walls) are not blurred by lateral smoothing
    sig2 = (0.0, ax(p.refine_sigma_axial_um), 0.0)
    sig2_lat = lat(p.refine_sigma_lateral_um)
    surfaces = []
    for surf0, dom, sign, offset_um, band_um in ((ilm1, p.ilm_domain, 1.0, p.ilm_offset_um, p.ilm_band_um),
                                                 (bm1, p.bm_domain, -1.0, p.bm_offset_um, p.bm_band_um)):
        if not np.isfinite(surf0).all():
            surfaces.append(surf0)
            continue
        half = max(2, int(round(ax(band_um))))
        img = ndi.gaussian_filter(_to_domain(x, dom, p.display_method), sigma=sig2, mode="nearest")
        grad = sign * np.gradient(img, axis=1)
        centre = np.clip(np.round(surf0).astype(np.intp), 0, ny - 1)
        offs = np.arange(-half, half + 1)
        ridx = np.clip(centre[:, None, :] + offs[None, :, None], 0, ny - 1)
        band = np.take_along_axis(grad, ridx, axis=1)  # (nz, nb, nx), flattened to the surface
        if sig2_lat > 0:
            band = ndi.gaussian_filter1d(band, sig2_lat, axis=2, mode="nearest")
        bscale = _column_scale(np.clip(band, 0, None))
        strength = np.clip(band / bscale, -1.0, 1.0)
        bcost = -strength
        if sign > 0 and p.ilm_refine_first_edge_weight > 0:
            # the ILM is the first strong edge from the vitreous: a bright spot (HRF)
            # just under it has a stronger linear-domain edge but lies below the ILM edge
            bcost = bcost + p.ilm_refine_first_edge_weight * _window_max(np.clip(strength, 0.0, 1.0), -half, -1)
        bpath = _dp_path(bcost.astype(np.float32), jumps[sign > 0], lambdas[sign > 0], centre=centre - half)
        sub = _parabolic_peak(band, _climb(band, bpath))
        surfaces.append(centre - half + sub + ax(offset_um))
    ilm2, bm2 = surfaces

    ilm3, ilm_bad2 = _reject_outliers(ilm2, empty_cols, size=(kz(p.ilm_outlier_window_z_um), kx),
                                      threshold_px=ax(p.refine_outlier_um))
    bm3, bm_bad2 = _reject_outliers(bm2, empty_cols, size=(kz(p.bm_outlier_window_z_um), kx),
                                    threshold_px=ax(p.refine_outlier_um))
    if p.smooth_lateral_um > 0:
        sx = lat(p.smooth_lateral_um)
        ilm3 = ndi.gaussian_filter1d(ilm3, sx, axis=1, mode="nearest") if np.isfinite(ilm3).all() else ilm3
        bm3 = ndi.gaussian_filter1d(bm3, sx, axis=1, mode="nearest") if np.isfinite(bm3).all() else bm3
    ilm_f = np.clip(ilm3, -0.5, ny - 0.5).astype(np.float32)
    bm_f = np.clip(bm3, -0.5, ny - 0.5).astype(np.float32)

    inpainted = {"ilm": float(np.mean(ilm_bad | ilm_bad2)), "bm": float(np.mean(bm_bad | bm_bad2))}
    qc = layer_qc(x, ilm_f, bm_f, spacing_mm=(dz_mm, dy_mm, dx_mm), params=p, inpainted=inpainted)
    qc["source"] = "octpipe"
    return LayerResult(ilm=ilm_f, bm=bm_f, qc=qc, spacing_mm=(dz_mm, dy_mm, dx_mm), params=p)


def _median(values: npt.NDArray[np.floating]) -> float:
    """Median of the finite values, NaN (without a warning) when there are none."""
    v = values[np.isfinite(values)]
    return float(np.median(v)) if v.size else float("nan")


def layer_qc(
    display: npt.NDArray[np.floating],
    ilm: npt.NDArray[np.floating],
    bm: npt.NDArray[np.floating],
    *,
    spacing_mm: tuple[float, float, float],
    params: LayerParams | None = None,
    inpainted: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """Quality-control measures of an ILM/BM pair on a display-domain volume.

    Parameters
    ----------
    display : ndarray, shape (n_bscans, n_axial, n_ascans)
        Display-domain volume.
    ilm, bm : ndarray, shape (n_bscans, n_ascans)
        Surface rows.
    spacing_mm : (float, float, float)
        (z, y, x) spacing in mm.
    params : LayerParams, optional
        Thresholds (``qc_*``, thickness range).
    inpainted : mapping, optional
        Fraction of inpainted A-scans per surface (``{"ilm": f, "bm": f}``).

    Returns
    -------
    dict
        ``thickness_ok_fraction``, ``thickness_um`` (median), ``inpainted_fraction``,
        ``contrast`` and ``flags``.

    Examples
    --------
    >>> vol = np.zeros((1, 100, 4), np.float32); vol[:, 20:60] = 0.7
    >>> qc = layer_qc(vol, np.full((1, 4), 19.5), np.full((1, 4), 59.5), spacing_mm=(0, 0.004, 0.01))
    >>> qc["thickness_ok_fraction"], qc["flags"]
    (1.0, [])
    """
    p = LayerParams() if params is None else params
    dy_um = float(spacing_mm[1]) * 1e3
    ilm = np.asarray(ilm, dtype=np.float64)
    bm = np.asarray(bm, dtype=np.float64)
    th = (bm - ilm) * dy_um
    finite = np.isfinite(th)
    ok = finite & (th >= p.min_thickness_um) & (th <= p.max_thickness_um)
    ok_frac = float(ok.mean()) if ok.size else 0.0
    inp = {"ilm": 0.0, "bm": 0.0} if inpainted is None else {k: float(v) for k, v in inpainted.items()}
    # display-domain step across each surface: mean of a slab below minus a slab above
    ny = display.shape[1]
    w = max(2, int(round(15.0 / dy_um)))
    gap = max(1, int(round(4.0 / dy_um)))
    contrast = {}
    for name, surf, sign in (("ilm", ilm, 1.0), ("bm", bm, -1.0)):
        if not np.isfinite(surf).any():
            contrast[name] = float("nan")
            continue
        r = np.round(np.nan_to_num(surf, nan=-1e6)).astype(np.intp)
        offs_up = np.arange(-gap - w, -gap)
        offs_dn = np.arange(gap, gap + w)
        up = np.take_along_axis(display, np.clip(r[:, None, :] + offs_up[None, :, None], 0, ny - 1), axis=1)
        dn = np.take_along_axis(display, np.clip(r[:, None, :] + offs_dn[None, :, None], 0, ny - 1), axis=1)
        step = sign * (dn.mean(axis=1) - up.mean(axis=1))
        contrast[name] = _median(np.where(np.isfinite(surf), step, np.nan))
    flags = []
    if not (contrast["ilm"] >= p.qc_min_contrast):
        flags.append("no_retina")
    if not (contrast["bm"] >= p.qc_min_contrast):
        flags.append("bm_low_contrast")
    if ok_frac < p.qc_min_thickness_ok_fraction:
        flags.append("thickness_out_of_range")
    for name in ("ilm", "bm"):
        if inp.get(name, 0.0) > p.qc_max_inpainted_fraction:
            flags.append(f"{name}_inpainted")
    if not (np.isfinite(ilm).all() and np.isfinite(bm).all()):
        flags.append("missing_values")
    return {
        "thickness_ok_fraction": ok_frac,
        "thickness_um": _median(th),
        "inpainted_fraction": inp,
        "contrast": contrast,
        "flags": flags,
    }


def choose_layers(
    result: LayerResult,
    vendor_layers: Mapping[str, npt.ArrayLike] | None,
    *,
    use_vendor: bool = True,
) -> LayerResult:
    """Use the device's ILM/BM when present and plausible, else ours.

    Vendor layers are accepted (both surfaces together, so that thickness and
    flattening stay consistent) when each is finite on at least
    ``params.vendor_min_finite_fraction`` of the A-scans, the thickness BM − ILM is
    plausible on at least ``params.qc_min_thickness_ok_fraction`` of the A-scans where
    both are finite, and each agrees with our surface within
    ``params.vendor_max_median_difference_um`` (median absolute difference) — the last
    check is skipped when our own result is flagged (``no_retina``, thickness out of
    range), since then it is not a fair referee. Gaps of accepted vendor layers (e.g.
    the optic disc) are inpainted by interpolation.

    Parameters
    ----------
    result : LayerResult
        Our segmentation (:func:`segment_ilm_bm`).
    vendor_layers : mapping of str to array, or None
        ``OctVolume.layers``; keys ``"ILM"`` and ``"BM"`` are used, NaN = missing.
    use_vendor : bool
        False always keeps ours (recorded in ``qc["vendor"]``).

    Returns
    -------
    LayerResult
        A new result; ``qc["source"]`` is ``"vendor"`` or ``"octpipe"`` and
        ``qc["vendor"]`` records the checks.

    Examples
    --------
    >>> ours = LayerResult(np.full((1, 8), 20.0, np.float32), np.full((1, 8), 70.0, np.float32),
    ...                    qc={"source": "octpipe", "flags": []}, spacing_mm=(0.0, 0.004, 0.01))
    >>> vendor = {"ILM": np.full((1, 8), 21.0), "BM": np.full((1, 8), 71.0)}
    >>> choose_layers(ours, vendor).qc["source"]
    'vendor'
    """
    p = result.params
    checks: dict[str, Any] = {"used": False}
    qc = dict(result.qc)
    qc["source"] = "octpipe"

    def done(c: dict[str, Any]) -> LayerResult:
        qc["vendor"] = c
        return replace(result, qc=qc)

    if not use_vendor:
        checks["reason"] = "use_vendor=False"
        return done(checks)
    if not vendor_layers or "ILM" not in vendor_layers or "BM" not in vendor_layers:
        checks["reason"] = "no vendor ILM/BM"
        return done(checks)
    try:
        v_ilm = np.asarray(vendor_layers["ILM"], dtype=np.float64)
        v_bm = np.asarray(vendor_layers["BM"], dtype=np.float64)
    except (TypeError, ValueError):
        checks["reason"] = "vendor layers are not numeric arrays"
        return done(checks)
    if v_ilm.shape != result.ilm.shape or v_bm.shape != result.bm.shape:
        checks["reason"] = f"vendor layer shape {v_ilm.shape}/{v_bm.shape} != {result.ilm.shape}"
        return done(checks)
    dy_um = float(result.spacing_mm[1]) * 1e3
    fin = {"ilm": float(np.isfinite(v_ilm).mean()), "bm": float(np.isfinite(v_bm).mean())}
    checks["finite_fraction"] = fin
    both = np.isfinite(v_ilm) & np.isfinite(v_bm)
    th = (v_bm - v_ilm)[both] * dy_um
    th_ok = float(np.mean((th >= p.min_thickness_um) & (th <= p.max_thickness_um))) if th.size else 0.0
    checks["thickness_ok_fraction"] = th_ok
    diff = {}
    for name, vend, ours in (("ilm", v_ilm, result.ilm), ("bm", v_bm, result.bm)):
        d = np.abs(vend - ours.astype(np.float64)) * dy_um
        diff[name] = _median(d)
    checks["median_difference_um"] = diff
    reasons = []
    if min(fin.values()) < p.vendor_min_finite_fraction:
        reasons.append(f"finite on {min(fin.values()):.0%} < {p.vendor_min_finite_fraction:.0%} of A-scans")
    if th_ok < p.qc_min_thickness_ok_fraction:
        reasons.append(f"plausible thickness on {th_ok:.0%} of A-scans")
    ours_flagged = any(f in result.qc.get("flags", []) for f in ("no_retina", "thickness_out_of_range"))
    if not ours_flagged:
        for name, value in diff.items():
            if not value <= p.vendor_max_median_difference_um:
                reasons.append(f"{name} differs from ours by {value:.1f} µm (median)")
    if reasons:
        checks["reason"] = "; ".join(reasons)
        return done(checks)
    ilm = _inpaint(v_ilm).astype(np.float32)
    bm = _inpaint(v_bm).astype(np.float32)
    checks["used"] = True
    qc["source"] = "vendor"
    qc["inpainted_fraction"] = {"ilm": 1.0 - fin["ilm"], "bm": 1.0 - fin["bm"]}
    th_all = (bm.astype(np.float64) - ilm) * dy_um
    qc["thickness_ok_fraction"] = float(np.mean((th_all >= p.min_thickness_um) & (th_all <= p.max_thickness_um)))
    qc["vendor"] = checks
    return replace(result, ilm=ilm, bm=bm, qc=qc)

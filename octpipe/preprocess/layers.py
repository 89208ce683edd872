"""ILM and Bruch's membrane (BM) segmentation for flattening.

The two surfaces that octpipe flattens to are found per volume in vectorised numpy,
with every parameter given in µm and converted with the volume's spacing:

1. **Prepare.** Invalid pixels (FLT_MAX margins, NaN, blank rows or A-scans) are
   filled from the nearest valid pixel of the same B-scan; the display-domain image
   is smoothed with an anisotropic Gaussian and differentiated axially.
2. **ILM, first pass.** A dynamic programme over the A-scans of all B-scans at once
   (Viterbi; the same optimum as a shortest path through a column graph) picks one
   row per A-scan minimising ``-edge + priors + smoothness``. The edge term is the
   normalised dark→bright gradient. The priors encode that the ILM is the first
   edge under the dark vitreous: tissue above a candidate costs, and so does a strong
   edge higher up (so the IS/OS junction and cysts, as strong, lose). The smoothness
   term charges every pixel of jump between neighbouring A-scans, with a hard limit
   from a maximum slope.
3. **BM, first pass.** (a) A second programme below ``ILM + min thickness`` follows
   the lower edge of the RPE complex: a bright→dark gradient under a band nearly as
   bright as the brightest of the outer retina, with a penalty when such an edge lies
   deeper (the RPE under subretinal fluid, under the ellipsoid zone). (b) Bruch's
   membrane does not move with lesions, the RPE does (PED, drusen): a smooth surface
   through (a) that ignores stretches lifted above it (percentile closing, then a
   robust local-linear fit) guides a banded search for the strongest bright→dark edge
   near it (mostly under it), which is the thin BM line under a PED. A candidate with a
   dark cavity under it and an RPE-like edge deeper (the floor of a huge cyst, subretinal
   fluid) is the cavity's roof, not BM.
4. **Outliers.** Each surface is compared with its median over a (z, x) window;
   points that deviate more than a threshold, and A-scans without data, become NaN
   and are inpainted by interpolation across A-scans, then across B-scans.
5. **Second pass.** Both surfaces are re-found in a narrow band around the first
   result. The band is sampled along the surface and smoothed along it (steep walls
   stay sharp), in a domain where the edge of a blurred boundary sits on the boundary:
   linear reflectivity for the ILM (the display domain's log puts the steepest rise
   about one pixel above it), square-root reflectivity for BM. A parabola through the
   gradient peak gives a sub-pixel row; a calibrated offset (µm) can be added.
6. **QC.** Fraction of A-scans with a plausible thickness (BM − ILM within 100–1000
   µm), fraction inpainted per surface, contrast across each surface, and flags.

Steps 2, 3 and 5 work on each B-scan alone, so they run on blocks of a few B-scans
(:data:`BLOCK_PIXELS`): their temporaries stay a few tens of MiB whatever the volume's
size, and the result is the same as for the whole volume at once. Only the outlier step
and BM's smooth reference, on (B-scan, A-scan) surfaces, look across B-scans.

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
>>> res.ilm.shape, res.ilm.dtype.name, res.qc["source"], res.qc["flags"]
((2, 256), 'float32', 'octpipe', [])
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

from octpipe.preprocess.blocks import map_blocks, slabs
from octpipe.preprocess.intensity import display_to_linear, linear_to_display

__all__ = ["LayerParams", "LayerResult", "segment_ilm_bm", "choose_layers", "layer_qc"]

Domain = Literal["linear", "sqrt", "display"]
_DOMAINS = ("linear", "sqrt", "display")
#: Pixels segmented together (whole B-scans, at least one): bounds the temporaries of the per-B-scan passes.
BLOCK_PIXELS = 1 << 21
# Parameters that must be strictly positive (the others must be >= 0, offsets any sign).
_POSITIVE = (
    "ilm_max_slope", "bm_max_slope", "ilm_above_um", "ilm_first_edge_um", "ilm_below_to_um", "ilm_tissue_level",
    "ilm_tissue_bright",
    "bm_above_um", "bm_below_um", "bm_cavity_to_um", "bm_cavity_level", "bm_search_depth_um",
    "bm_reference_width_um", "bm_reference_sigma_um", "bm_reference_tolerance_um", "bm_stiff_width_um",
    "bm_stiff_sigma_um", "bm_search_um", "bm_search_above_um",
    "max_thickness_um", "ilm_band_um", "bm_band_um", "outlier_um", "refine_outlier_um",
    "outlier_window_lateral_um",
)
_FRACTIONS = (
    "bm_gate_low", "bm_gate_high", "qc_min_thickness_ok_fraction", "qc_max_inpainted_fraction",
    "vendor_min_finite_fraction", "qc_max_border_fraction",
)


@dataclass(frozen=True)
class LayerParams:
    """Parameters of :func:`segment_ilm_bm`; every length is in µm.

    Lengths are converted to pixels with the volume's spacing, so one parameter set
    serves any axial and lateral sampling. Slopes are ratios of lengths (µm axial per
    µm lateral): the jump allowed between neighbouring A-scans is
    ``slope × lateral spacing``. The defaults were tuned on seeded phantoms at full and
    half Spectralis resolution and checked on real Spectralis ``.vol`` files.

    Parameters
    ----------
    sigma_axial_um, sigma_lateral_um : float
        Gaussian smoothing before the first passes.
    bm_sigma_axial_um : float
        Axial smoothing for the BM first pass; small, so that the thin BM line under a
        PED survives.
    refine_sigma_axial_um, refine_sigma_lateral_um : float
        Smoothing for the second pass (the lateral one along the surface).
    ilm_max_slope, bm_max_slope : float
        Largest slope of each surface between neighbouring A-scans (µm/µm).
    ilm_slope_cost, bm_slope_cost : float
        Smoothness weight: the cost, in units of a full-strength edge, of one A-scan
        step at slope 1.
    ilm_above_um, ilm_above_weight : float
        Window above an ILM candidate whose mean brightness is penalised, and weight.
    ilm_first_edge_um, ilm_first_edge_gap_um, ilm_first_edge_weight : float
        Window above an ILM candidate (from ``gap`` to ``first_edge`` µm above it)
        where a strong dark→bright edge is penalised, and weight.
    ilm_refine_first_edge_weight : float
        The same penalty inside the second-pass band (a bright focus just under the
        ILM has a stronger linear-domain edge than the ILM).
    ilm_below_from_um, ilm_below_to_um, ilm_below_weight, ilm_tissue_level, ilm_tissue_bright : float
        Window under an ILM candidate that must hold tissue: where its mean brightness
        (0 = dark level, 1 = brightest) exceeds that of the same window above the
        candidate by less than ``ilm_tissue_level`` and is itself below
        ``ilm_tissue_bright``, the candidate costs up to ``ilm_below_weight``, and its
        edge does not count as a first edge for the candidates under it. A detached
        hyaloid or a membrane in the vitreous is a thin bright line with the same
        vitreous under it as over it; a dim inner retina (thin nerve fibre layer near the
        fovea, a dim export) is darker than the outer retina but still brighter than the
        vitreous over it; a saturated vertical artefact band is as bright over the ILM as
        under it, and bright.
    bm_above_um : float
        Height of the bright band that must lie above a BM candidate.
    bm_gate_low, bm_gate_high : float
        Brightness of that band, as a fraction between the dark level and the
        brightest of the outer retina, at which a BM candidate starts and ends to count.
    bm_below_um, bm_deeper_weight : float
        Depth below a candidate searched for a deeper candidate (at least the height
        of the largest subretinal fluid or PED expected), and weight of that penalty.
    bm_cavity_from_um, bm_cavity_to_um, bm_cavity_level, bm_cavity_weight : float
        Window under a BM candidate whose mean brightness (same scale as the gate) below
        ``bm_cavity_level`` marks a dark cavity (a cyst, subretinal fluid); a candidate
        over a cavity costs up to ``bm_cavity_weight`` times the strongest RPE-like edge
        anywhere deeper (down to ``bm_search_depth_um``): it is the cavity's roof. The
        choroid under Bruch's membrane is not as dark as the vitreous.
    bm_dive_slope : float
        Slope (µm/µm) beyond which the end of a first BM pass that reaches the image
        bottom counts as a dive into an optic disc (see ``_terminal_dives``).
    bm_search_depth_um : float
        Depth under the ILM searched for BM (at least ``max_thickness_um``): a retina
        lifted by a huge cystoid cavity can be thicker than the plausible range.
    bm_reference_width_um : float
        Width of the percentile closing that bridges lifted stretches (wider than the
        widest PED expected).
    bm_reference_sigma_um : float
        Scale of the robust local-linear fit of the BM reference surface.
    bm_reference_tolerance_um : float
        Points lifted more than this above the reference are ignored by the fit.
    bm_stiff_width_um, bm_stiff_sigma_um : float
        The same for a stiffer surface that bridges lesions wider than the closing (a
        large PED, subretinal material); it replaces the reference where the reference
        lies more than twice the tolerance above it.
    bm_search_um, bm_search_above_um : float
        Depth of the band under (above) the reference where BM is searched. Bruch's
        membrane lies on or under the reference, which bridges lifted stretches: where
        the RPE edge of the first pass is lifted above it, the band reaches only
        ``bm_search_above_um`` above it, so that the lifted RPE over drusen or a PED is
        not taken.
    min_thickness_um, max_thickness_um : float
        Plausible retina thickness BM − ILM; also the BM search range below the ILM.
    ilm_band_um, bm_band_um : float
        Half-width of the second-pass band around the first-pass surfaces. The ILM
        band is wider: a vessel in the nerve fibre layer leaves a haze above the ILM
        that the display-domain first pass can follow and the linear second pass not.
    outlier_um, refine_outlier_um : float
        Deviation from the local median beyond which a point of the first (second)
        pass is an outlier.
    outlier_window_lateral_um : float
        Lateral extent of the median window.
    ilm_outlier_window_z_um, bm_outlier_window_z_um : float
        Through-plane extent of the median window (0 = within each B-scan). The ILM
        changes fast between B-scans near the foveal pit, the BM does not.
    smooth_lateral_um : float
        Gaussian smoothing of the final surfaces along the A-scans (0 = none).
    ilm_domain, bm_domain : {"linear", "sqrt", "display"}
        Intensity domain of the second pass.
    ilm_offset_um, bm_offset_um : float
        Calibrated offsets added to the second-pass rows (positive = deeper).
    display_method : {"log", "root4"}
        The display mapping of the input (see :mod:`octpipe.preprocess.intensity`),
        used to go back to linear reflectivity.
    qc_min_thickness_ok_fraction : float
        Below this fraction of plausible thickness, flag ``thickness_out_of_range``.
    qc_max_inpainted_fraction : float
        Above this fraction of inpainted A-scans, flag ``ilm_inpainted``/``bm_inpainted``.
    qc_max_border_fraction : float
        Above this fraction of A-scans whose ILM lies on the top rows (or BM on the bottom
        rows) of the image, flag ``ilm_at_border``/``bm_at_border``: the retina runs out of
        the scanned window (a cupped disc, a wrap-around, a crop), where the surface found is
        the image's edge rather than the anatomy.
    qc_min_ilm_contrast, qc_min_bm_contrast : float
        Below this median step across the surface, relative to the image's range (99th
        minus 20th percentile), flag ``no_retina`` (ILM) or ``bm_low_contrast`` (BM).
        Real B-scans of five devices mostly give 0.38-0.69 (ILM, 0.23 on the dimmest
        crop) and 0.11-0.40 (BM); uniform noise 0.15-0.23 (ILM), which the next
        measure tells apart.
    qc_min_retina_contrast : float
        Below this mean brightness of the retina (ILM to BM) over that of everything above
        the ILM, relative to the same range, flag ``no_retina`` too. A path through noise
        can find a step where it looks for one (up to 0.23 on uniform noise); the retina
        as a whole is not brighter than the noise over it (0.02-0.03), and a real retina
        is (0.16 and more on the 969 real B-scans of six devices in ../shared/data).
    vendor_min_finite_fraction : float
        Vendor layers must be finite on at least this fraction of A-scans.
    vendor_max_median_difference_um : float
        Vendor layers must agree with ours within this median absolute difference.

    Raises
    ------
    ValueError
        If a value is not a finite number, negative, zero where it must be positive, a
        fraction outside [0, 1], or an unknown domain.

    Examples
    --------
    >>> LayerParams(bm_search_um=40.0).bm_search_um
    40.0
    >>> LayerParams(ilm_max_slope=0)
    Traceback (most recent call last):
    ...
    ValueError: ilm_max_slope must be > 0, got 0
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
    ilm_first_edge_um: float = 400.0
    ilm_first_edge_gap_um: float = 60.0
    ilm_first_edge_weight: float = 1.0
    ilm_refine_first_edge_weight: float = 0.5
    ilm_below_from_um: float = 20.0
    ilm_below_to_um: float = 100.0
    ilm_below_weight: float = 1.0
    ilm_tissue_level: float = 0.12
    ilm_tissue_bright: float = 0.3
    bm_above_um: float = 12.0
    bm_gate_low: float = 0.55
    bm_gate_high: float = 0.75
    bm_below_um: float = 400.0
    bm_deeper_weight: float = 1.0
    bm_cavity_from_um: float = 8.0
    bm_cavity_to_um: float = 40.0
    bm_cavity_level: float = 0.12
    bm_cavity_weight: float = 1.0
    bm_dive_slope: float = 0.1
    bm_search_depth_um: float = 1600.0
    bm_reference_width_um: float = 2000.0
    bm_reference_sigma_um: float = 200.0
    bm_reference_tolerance_um: float = 15.0
    bm_stiff_width_um: float = 3500.0
    bm_stiff_sigma_um: float = 300.0
    bm_search_um: float = 30.0
    bm_search_above_um: float = 12.0
    min_thickness_um: float = 100.0
    max_thickness_um: float = 1000.0
    ilm_band_um: float = 30.0
    bm_band_um: float = 12.0
    outlier_um: float = 20.0
    refine_outlier_um: float = 10.0
    outlier_window_lateral_um: float = 150.0
    ilm_outlier_window_z_um: float = 0.0
    bm_outlier_window_z_um: float = 250.0
    smooth_lateral_um: float = 10.0
    ilm_domain: Domain = "linear"
    bm_domain: Domain = "sqrt"
    ilm_offset_um: float = 0.0
    bm_offset_um: float = 0.0
    display_method: Literal["log", "root4"] = "log"
    qc_min_thickness_ok_fraction: float = 0.9
    qc_max_inpainted_fraction: float = 0.2
    qc_max_border_fraction: float = 0.05
    qc_min_ilm_contrast: float = 0.2
    qc_min_bm_contrast: float = 0.08
    qc_min_retina_contrast: float = 0.08
    vendor_min_finite_fraction: float = 0.8
    vendor_max_median_difference_um: float = 30.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("ilm_domain", "bm_domain"):
                if value not in _DOMAINS:
                    raise ValueError(f"{f.name} must be one of {_DOMAINS}, got {value!r}")
                continue
            if f.name == "display_method":
                if value not in ("log", "root4"):
                    raise ValueError(f"display_method must be 'log' or 'root4', got {value!r}")
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{f.name} must be a finite number, got {value!r}")
            if not f.name.endswith("_offset_um") and value < 0:
                raise ValueError(f"{f.name} must be >= 0, got {value!r}")
        for name in _POSITIVE:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        for name in _FRACTIONS:
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)!r}")
        if not self.bm_gate_low < self.bm_gate_high:
            raise ValueError(f"bm_gate_low must be < bm_gate_high, got {self.bm_gate_low} and {self.bm_gate_high}")
        if not self.min_thickness_um < self.max_thickness_um:
            raise ValueError(f"min_thickness_um must be < max_thickness_um, got "
                             f"{self.min_thickness_um} and {self.max_thickness_um}")
        if not self.ilm_below_from_um < self.ilm_below_to_um:
            raise ValueError(f"ilm_below_from_um must be < ilm_below_to_um, got {self.ilm_below_from_um} and "
                             f"{self.ilm_below_to_um}")
        if not self.ilm_first_edge_gap_um < self.ilm_first_edge_um:
            raise ValueError(f"ilm_first_edge_gap_um must be < ilm_first_edge_um, got "
                             f"{self.ilm_first_edge_gap_um} and {self.ilm_first_edge_um}")


@dataclass(frozen=True)
class LayerResult:
    """ILM and BM of one volume, with quality-control measures.

    Attributes
    ----------
    ilm, bm : ndarray of float32, shape (n_bscans, n_ascans)
        Rows in the input's pixel geometry. NaN only where nothing could be found or
        inpainted (a B-scan without any valid pixel in a volume of one B-scan).
    qc : dict
        ``thickness_ok_fraction`` (BM − ILM within the plausible range),
        ``thickness_um`` (median), ``inpainted_fraction`` (``{"ilm": f, "bm": f}``),
        ``contrast`` (``{"ilm": c, "bm": c}``, median display-domain step across the
        surface), ``source`` (``"octpipe"`` or ``"vendor"``), ``flags`` (list of str,
        empty when all is well) and, after :func:`choose_layers`, ``vendor`` (the
        checks made on the vendor layers).
    spacing_mm : tuple of float
        (between B-scans, axial, lateral) spacing of the input, mm.
    params : LayerParams
        The parameters used.
    """

    ilm: npt.NDArray[np.float32]
    bm: npt.NDArray[np.float32]
    qc: dict[str, Any]
    spacing_mm: tuple[float, float, float]
    params: LayerParams = field(default_factory=LayerParams)

    @property
    def boundaries(self) -> npt.NDArray[np.float32]:
        """ILM and BM stacked, shape (2, n_bscans, n_ascans), the store's ``layers`` layout."""
        return np.stack([self.ilm, self.bm]).astype(np.float32)


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
    back = np.zeros((nx, nz, ny), dtype=np.int32 if n + max_jump > 32000 else np.int16)
    buf = np.full((nz, n + 2 * pad), np.inf, dtype=np.float32)
    obuf = np.zeros((nz, n + 2 * pad), dtype=back.dtype)
    cost_t = np.ascontiguousarray(np.moveaxis(cost, 2, 0), dtype=np.float32)  # (nx, nz, ny)
    rows = np.arange(n)[None, :] - m
    zero = np.zeros((nz, n), dtype=back.dtype)
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
                np.copyto(new_off, obuf[:, lo:lo + n] + back.dtype.type(sign * s), where=better)
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
    """Mean of ``a[:, y + start : y + stop, :]`` for every row ``y`` (edge rows repeated beyond the borders)."""
    size = stop - start
    if size <= 0:
        raise ValueError(f"window must be non-empty, got [{start}, {stop})")
    ny = a.shape[1]
    pad_lo, pad_hi = max(0, -start), max(0, stop)
    ap = np.pad(a, ((0, 0), (pad_lo, pad_hi), (0, 0)), mode="edge")
    out = ndi.uniform_filter1d(ap, size=size, axis=1, mode="nearest")
    off = pad_lo + start + size // 2  # scipy centres the window on index size // 2
    return out[:, off:off + ny]


def _window_max(a: npt.NDArray[np.float32], start: int, stop: int, *, low: float = 0.0) -> npt.NDArray[np.float32]:
    """Maximum of ``a[:, y + start : y + stop, :]`` for every row ``y`` (padded with ``low``, at most ``a.min()``)."""
    size = stop - start
    if size <= 0:
        raise ValueError(f"window must be non-empty, got [{start}, {stop})")
    ny = a.shape[1]
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


def _extend_linearly(surf: npt.NDArray[np.float64], pad: int) -> npt.NDArray[np.float64]:
    """``surf`` (per row) extended by ``pad`` columns at each end along the line of its end stretches.

    The slope at each end is the difference of the medians of two adjacent stretches of a
    quarter of ``pad`` (robust to a small lesion there). Without it, a percentile closing
    wider than the B-scan sees ``mode="nearest"`` padding, which on a steep or curved
    surface drags the envelope far under the data near the scan edges.
    """
    nz, nx = surf.shape
    q = max(1, min(pad // 4, nx // 2))
    steps = np.arange(1, pad + 1, dtype=np.float64)
    out = np.empty((nz, nx + 2 * pad), dtype=np.float64)
    out[:, pad:pad + nx] = surf
    if nx < 2 * q:
        out[:, :pad] = surf[:, :1]
        out[:, pad + nx:] = surf[:, -1:]
        return out
    m0, m1 = np.median(surf[:, :q], axis=1), np.median(surf[:, q:2 * q], axis=1)
    n0, n1 = np.median(surf[:, -q:], axis=1), np.median(surf[:, -2 * q:-q], axis=1)
    left0 = m0 - (m1 - m0) * (q - 1) / (2.0 * q)  # the line at column 0
    right0 = n0 + (n0 - n1) * (q - 1) / (2.0 * q)  # ... and at the last column
    out[:, :pad] = (left0[:, None] - ((m1 - m0) / q)[:, None] * steps[None, :])[:, ::-1]
    out[:, pad + nx:] = right0[:, None] + ((n0 - n1) / q)[:, None] * steps[None, :]
    return out


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
    n = max(3, int(round(width_px)))
    pad = n // 2 + 1
    ext = _extend_linearly(surf, pad)
    fit = ndi.percentile_filter(ndi.percentile_filter(ext, 90, size=(1, n), mode="nearest"), 10, size=(1, n),
                                mode="nearest")[:, pad:pad + surf.shape[1]]
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
    """Sub-pixel position of the peak of ``g`` (band axis 1) near integer ``idx`` (parabola through 3 points)."""
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
    """The display-domain volume in the second-pass domain (display, linear or square-root reflectivity)."""
    if domain == "display":
        return display
    lin = display_to_linear(display, method=method)  # type: ignore[arg-type]
    return np.sqrt(lin) if domain == "sqrt" else lin


def _fill_invalid_(display: npt.NDArray[np.float32], invalid: npt.NDArray[np.bool_]) -> npt.NDArray[np.float32]:
    """Replace, in place, invalid pixels by the nearest valid pixels of the same B-scan, median-smoothed.

    The nearest pixel alone would copy speckle and the JPEG fringe of an export's fill
    boundary into the fill as bright streaks, which read as edges; a 9x9 median of the
    nearest-pixel fill keeps the level and drops them.
    """
    for z in range(display.shape[0]):
        bad = invalid[z]
        if not bad.any():
            continue
        if bad.all():
            display[z] = 0.0
            continue
        idx = ndi.distance_transform_edt(bad, return_distances=False, return_indices=True)
        near = display[z][idx[0], idx[1]]  # valid pixels only, which the fill leaves as they are
        display[z] = np.where(bad, ndi.median_filter(near, size=9, mode="nearest"), display[z])
    return display


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


# ---------------------------------------------------------------------------------------
# the passes


@dataclass(frozen=True)
class _Geometry:
    """Pixel sizes in µm and the conversions of the parameters."""

    nz: int
    ny: int
    nx: int
    dz_um: float
    dy_um: float
    dx_um: float

    def ax(self, um: float) -> float:
        """µm -> axial px."""
        return um / self.dy_um

    def lat(self, um: float) -> float:
        """µm -> lateral px."""
        return um / self.dx_um

    def kz(self, um: float) -> int:
        """Odd through-plane window size for ``um`` (1 without B-scan spacing)."""
        return _odd(um / self.dz_um) if self.dz_um > 0 and self.nz > 1 else 1

    def jump(self, slope: float) -> int:
        """Largest jump in rows between neighbouring A-scans for a slope (µm/µm)."""
        return max(1, int(math.ceil(slope * self.dx_um / self.dy_um)))

    def jump_cost(self, slope_cost: float) -> float:
        """Cost per row of jump for a cost per A-scan step at slope 1."""
        return slope_cost * self.dy_um / self.dx_um


def _prepare(display: npt.ArrayLike, spacing_mm: tuple[float, float, float], invalid: npt.ArrayLike | None,
             domain: str, p: LayerParams) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_], _Geometry]:
    """Check the input; return the display-domain volume (invalid pixels filled), the valid mask, the geometry."""
    if domain not in ("display", "linear"):
        raise ValueError(f"domain must be 'display' or 'linear', got {domain!r}")
    arr = np.asarray(display)
    if arr.ndim != 3:
        raise ValueError(f"display must be 3-D (n_bscans, n_axial, n_ascans), got shape {arr.shape}")
    if arr.dtype.kind not in "fiu":
        raise ValueError(f"display must hold real numbers, got dtype {arr.dtype}")
    nz, ny, nx = arr.shape
    if min(nz, nx) < 1:
        raise ValueError(f"volume shape {arr.shape} is empty")
    try:
        dz_mm, dy_mm, dx_mm = (float(v) for v in spacing_mm)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"spacing_mm must be 3 numbers (z, y, x) in mm, got {spacing_mm!r}") from exc
    if not (all(math.isfinite(v) for v in (dz_mm, dy_mm, dx_mm)) and dz_mm >= 0 and dy_mm > 0 and dx_mm > 0):
        raise ValueError(f"spacing_mm must be finite (z >= 0, y > 0, x > 0) mm, got {spacing_mm!r}")
    geo = _Geometry(nz, ny, nx, dz_mm * 1e3, dy_mm * 1e3, dx_mm * 1e3)
    if ny < geo.ax(p.min_thickness_um) + 8:
        raise ValueError(f"volume shape {arr.shape} is too small: the axial field of {ny} px x {geo.dy_um:.2f} µm "
                         f"cannot hold a retina of at least {p.min_thickness_um} µm")
    bad = np.empty(arr.shape, dtype=bool)
    for z in range(nz):  # NaN/inf, FLT_MAX fill values (per B-scan: no full-size float temporaries)
        data = arr[z].astype(np.float32, copy=False)
        bad[z] = ~np.isfinite(data) | (np.abs(data) >= 1e30)
    if invalid is not None:
        inv = np.asarray(invalid)
        if inv.shape != arr.shape:
            raise ValueError(f"invalid must have the volume's shape {arr.shape}, got {inv.shape}")
        bad |= inv.astype(bool, copy=False)
    if bad.all():
        raise ValueError("volume has no valid pixel (all NaN, infinite or marked invalid)")
    x = np.where(bad, np.float32(0.0), arr.astype(np.float32, copy=False))
    if domain == "linear":
        if x.min() < 0:
            raise ValueError(f"linear reflectivity must be >= 0, got minimum {float(x.min())}")
        map_blocks(lambda b: linear_to_display(b, method=p.display_method), x, out=x)
    else:
        lo_v = float(np.min(x, where=~bad, initial=np.inf))
        hi_v = float(np.max(x, where=~bad, initial=-np.inf))
        if lo_v < -1e-6 or hi_v > 1.0 + 1e-6:
            raise ValueError(f"display data must lie in [0, 1], got [{lo_v:.4g}, {hi_v:.4g}]; map it first "
                             "(octpipe.preprocess.intensity.to_display) or pass domain='linear'")
        np.clip(x, 0.0, 1.0, out=x)
    # rows or A-scans that are exactly 0 in a B-scan with data are empty margins
    # (Spectralis leaves a few blank rows at the top), not dark tissue
    empty = (x <= 0.0) | bad
    has_data = ~empty.all(axis=(1, 2), keepdims=True)
    blank_rows = empty.all(axis=2, keepdims=True) if nx >= 16 else np.zeros((nz, ny, 1), dtype=bool)
    bad = bad | ((blank_rows | empty.all(axis=1, keepdims=True)) & has_data)
    if bad.any():
        _fill_invalid_(x, bad)
    np.logical_not(bad, out=bad)
    return x, bad, geo


def _bscan_blocks(geo: _Geometry) -> list[slice]:
    """Consecutive B-scans of about :data:`BLOCK_PIXELS` pixels in all (at least one B-scan each)."""
    return list(slabs((geo.nz, geo.ny, geo.nx), BLOCK_PIXELS))


def _first_pass_ilm(x: npt.NDArray[np.float32], valid: npt.NDArray[np.bool_], geo: _Geometry,
                    p: LayerParams) -> tuple[npt.NDArray[np.float64], np.ndarray, np.ndarray]:
    """Integer ILM rows (first dark→bright edge under the vitreous) and the dark/bright levels."""
    ny = geo.ny
    s = ndi.gaussian_filter(x, sigma=(0.0, geo.ax(p.sigma_axial_um), geo.lat(p.sigma_lateral_um)), mode="nearest")
    lo, hi = _levels(s, valid)
    gp = np.clip(np.gradient(s, axis=1), 0.0, None)
    edge = np.minimum(gp / _column_scale(gp), 1.0)
    del gp
    level = np.clip((s - lo) / (hi - lo), 0.0, 1.0)
    cost = -edge + np.float32(p.ilm_above_weight) * _window_mean(level, -max(1, round(geo.ax(p.ilm_above_um))), 0)
    cost[:, :2] = -edge[:, :2]  # nothing above the first rows
    del s
    # the retina lies under the ILM: a thin bright line in the vitreous (a detached hyaloid,
    # a membrane) has dark vitreous under it, the ILM has tissue
    b0 = max(1, round(geo.ax(p.ilm_below_from_um)))
    b1 = max(b0 + 1, round(geo.ax(p.ilm_below_to_um)))
    # measured against the window as far above it: the vitreous over a dim retina is darker
    # still, the vitreous over a detached hyaloid is not (a contrast, whatever the noise floor)
    bright = _window_mean(level, b0, b1)
    tissue = np.clip((bright - _window_mean(level, -b1, -b0 + 1)) / np.float32(p.ilm_tissue_level), 0.0, 1.0)
    # a bright window is tissue whatever lies over it (a saturated vertical artefact band
    # is as bright over the ILM as under it)
    np.maximum(tissue, np.clip(bright / np.float32(p.ilm_tissue_bright), 0.0, 1.0), out=tissue)
    del bright
    if p.ilm_below_weight > 0:
        cost += np.float32(p.ilm_below_weight) * (1.0 - tissue)
    del level
    if p.ilm_first_edge_weight > 0:
        gap = max(2, round(geo.ax(p.ilm_first_edge_gap_um)))
        far = max(gap + 1, round(geo.ax(p.ilm_first_edge_um)))
        # edges of about half the typical strength or more, with tissue under them
        strong = np.clip((edge - 0.35) / 0.4, 0.0, 1.0) * tissue
        cost += np.float32(p.ilm_first_edge_weight) * _window_max(strong, -far, -gap + 1)
        del strong
    del tissue
    cost[:, max(1, ny - round(geo.ax(p.min_thickness_um))):, :] = 2.0  # no room for a retina below
    ilm = _dp_path(cost.astype(np.float32, copy=False), geo.jump(p.ilm_max_slope), geo.jump_cost(p.ilm_slope_cost))
    return ilm.astype(np.float64), lo, hi


def _bm_edge(x: npt.NDArray[np.float32], ilm: npt.NDArray[np.float64], geo: _Geometry, p: LayerParams
             ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_], npt.NDArray[np.float32]]:
    """The BM-smoothed image, the search region under the ILM and the normalised bright→dark edge."""
    ny = x.shape[1]
    sb = ndi.gaussian_filter(x, sigma=(0.0, geo.ax(p.bm_sigma_axial_um), geo.lat(p.sigma_lateral_um)),
                             mode="nearest")
    rows = np.arange(ny)[None, :, None]
    top = ilm[:, None, :] + round(geo.ax(p.min_thickness_um))
    region = (rows >= top) & (rows <= ilm[:, None, :] + round(geo.ax(max(p.max_thickness_um, p.bm_search_depth_um))))
    gn = np.clip(-np.gradient(sb, axis=1), 0.0, None)
    edge = np.minimum(gn / _column_scale(gn, region), 1.0)
    return sb, region, edge


def _bm_rpe_pass(x: npt.NDArray[np.float32], ilm: npt.NDArray[np.float64], lo: np.ndarray, geo: _Geometry,
                 p: LayerParams) -> npt.NDArray[np.float64]:
    """BM pass (a): integer rows of the RPE-complex edge under a band nearly as bright as the outer retina."""
    sb, region, edge = _bm_edge(x, ilm, geo, p)
    ref = np.where(region, sb, -np.inf).max(axis=1, keepdims=True)
    ref = ndi.median_filter(ref, size=(1, 1, _odd(geo.lat(p.outlier_window_lateral_um))), mode="nearest")
    ref = np.maximum(ref, lo + 1e-3)
    n_up = max(1, round(geo.ax(p.bm_above_um)))
    rel = (_window_mean(sb, -n_up, 0) - lo) / (ref - lo)
    gate = np.clip((rel - p.bm_gate_low) / (p.bm_gate_high - p.bm_gate_low), 0.0, 1.0)
    del rel
    c0 = max(1, round(geo.ax(p.bm_cavity_from_um)))
    c1 = max(c0 + 1, round(geo.ax(p.bm_cavity_to_um)))
    # a dark cavity (cyst, subretinal fluid, PED content: as dark as the vitreous) right
    # under a candidate: the choroid under Bruch's membrane is not that dark
    under = (_window_mean(sb, c0, c1) - lo) / (ref - lo)
    cavity = np.clip(1.0 - under / np.float32(p.bm_cavity_level), 0.0, 1.0)
    del under, sb
    q = np.where(region, edge * gate, 0.0).astype(np.float32)
    del gate, edge
    deeper = _window_max(q, n_up, max(n_up + 1, round(geo.ax(p.bm_below_um))))
    cost = -q + np.float32(p.bm_deeper_weight) * deeper
    if p.bm_cavity_weight > 0:
        # an RPE-like edge anywhere deeper, under a cavity: the candidate is the roof of the cavity
        far = _window_max(q, c1, max(c1 + 1, round(geo.ax(p.bm_search_depth_um))))
        cost = cost + np.float32(p.bm_cavity_weight) * cavity * far
        del far
    cost = np.where(region, cost, np.float32(2.0)).astype(np.float32)
    del q, deeper, region, cavity
    return _dp_path(cost, geo.jump(p.bm_max_slope), geo.jump_cost(p.bm_slope_cost)).astype(np.float64)


def _bm_band_pass(x: npt.NDArray[np.float32], ilm: npt.NDArray[np.float64], reference: npt.NDArray[np.float64],
                  lifted: npt.NDArray[np.bool_], geo: _Geometry, p: LayerParams) -> npt.NDArray[np.float64]:
    """BM pass (b): integer rows of the strongest bright→dark edge in a band around the smooth reference.

    Where the RPE edge of pass (a) is lifted above the reference (``lifted``), the band
    reaches only ``bm_search_above_um`` above it: the lifted RPE is no candidate there.
    """
    ny = x.shape[1]
    edge = _bm_edge(x, ilm, geo, p)[2]
    half = max(2, round(geo.ax(p.bm_search_um)))
    start = np.clip(np.round(reference).astype(np.intp), 0, ny - 1) - half
    band = np.take_along_axis(edge, np.clip(start[:, None, :] + np.arange(2 * half + 1)[None, :, None], 0, ny - 1),
                              axis=1)
    up = max(1, round(geo.ax(min(p.bm_search_um, p.bm_search_above_um))))
    above = (np.arange(2 * half + 1) < half - up)[None, :, None] & lifted[:, None, :]
    band = np.where(above, np.float32(-1.0), band)
    path = _dp_path(-band, geo.jump(p.bm_max_slope), geo.jump_cost(p.bm_slope_cost), centre=start)
    return (start + path).astype(np.float64)


def _terminal_dives(bm_a: npt.NDArray[np.float64], geo: _Geometry, p: LayerParams) -> npt.NDArray[np.bool_]:
    """A-scans at either end of a B-scan where the first BM pass dives to the image bottom.

    At an optic disc at the edge of a macular scan there is no RPE: the path follows the
    disc's edges down to the last rows, and the deep-biased reference would carry that
    dive inwards. The dive is the end stretch that reaches the bottom rows, back through
    the deepest tenth of the image and then to where the path last ran flatter than
    ``bm_dive_slope`` (over 300 µm of A-scans); those A-scans are bridged from their
    neighbours instead. A dive over more than a third of the B-scan, or one that lies on
    the bottom rows for less than 30 % of its length (a tilted retina leaving the image at
    a corner), is left alone.
    """
    nz, nx = bm_a.shape
    out = np.zeros((nz, nx), dtype=bool)
    bottom = geo.ny - 1 - max(1, round(geo.ax(p.bm_above_um)))
    w = max(2, round(geo.lat(300.0)))
    if nx < 3 * w:
        return out
    for z in range(nz):
        for surf, flip in ((bm_a[z], False), (bm_a[z, ::-1], True)):
            at_bottom = np.nonzero(surf[2 * nx // 3:] >= bottom)[0]
            if at_bottom.size == 0:
                continue
            c = 2 * nx // 3 + int(at_bottom[0])
            # walk back through the deepest tenth of the image, where the dive levels out on
            # the bottom, then while it descends steeply (µm per µm over w A-scans)
            while c > 0 and surf[c - 1] >= bottom - 0.1 * geo.ny:
                c -= 1
            while c - w >= 0 and (surf[c] - surf[c - w]) * geo.dy_um / (w * geo.dx_um) > p.bm_dive_slope:
                c -= 1
            # at a disc the path then lies on the last rows over a long stretch (the search
            # ran out of image); a tilted retina leaving the image reaches them at the corner
            if nx - c <= nx // 3 and np.mean(surf[c:] >= bottom) >= 0.3:
                if flip:
                    out[z, :nx - c] = True
                else:
                    out[z, c:] = True
    return out


def _first_pass_bm(x: npt.NDArray[np.float32], ilm: npt.NDArray[np.float64], lo: np.ndarray,
                   empty_cols: npt.NDArray[np.bool_], geo: _Geometry, p: LayerParams,
                   blocks: list[slice]) -> npt.NDArray[np.float64]:
    """Integer BM rows: RPE-complex edge (a), smooth reference that ignores lifts, banded search (b)."""
    bm_a = np.concatenate([_bm_rpe_pass(x[b], ilm[b], lo[b], geo, p) for b in blocks])
    missing = empty_cols | _terminal_dives(bm_a, geo, p)
    # (b) smooth reference under the lifted stretches, then the strongest edge near it
    bm_a, _ = _reject_outliers(bm_a, missing, size=(geo.kz(p.bm_outlier_window_z_um),
                                                       _odd(geo.lat(p.outlier_window_lateral_um))),
                               threshold_px=geo.ax(p.outlier_um))
    tol = geo.ax(p.bm_reference_tolerance_um)
    reference = _lower_envelope(bm_a, width_px=geo.lat(p.bm_reference_width_um),
                                sigma_px=geo.lat(p.bm_reference_sigma_um), tol_px=tol)
    if not np.isfinite(reference).all():
        return bm_a
    if p.bm_stiff_width_um > p.bm_reference_width_um or p.bm_stiff_sigma_um > p.bm_reference_sigma_um:
        # a stiffer surface bridges lesions wider than the reference's closing (a large PED,
        # subretinal material); it replaces the reference only where that lies well above it
        stiff = _lower_envelope(bm_a, width_px=geo.lat(max(p.bm_stiff_width_um, p.bm_reference_width_um)),
                                sigma_px=geo.lat(max(p.bm_stiff_sigma_um, p.bm_reference_sigma_um)), tol_px=tol)
        if np.isfinite(stiff).all():
            reference = np.where(reference < stiff - 2.0 * tol, stiff, reference)
    lifted = bm_a < reference - tol
    return np.concatenate([_bm_band_pass(x[b], ilm[b], reference[b], lifted[b], geo, p) for b in blocks])


def _refine(x: npt.NDArray[np.float32], surf: npt.NDArray[np.float64], blocks: list[slice], **kw: Any
            ) -> npt.NDArray[np.float64]:
    """Sub-pixel rows of the edge in a band around ``surf`` (:func:`_refine_block`, block by block)."""
    if not np.isfinite(surf).all():
        return surf
    return np.concatenate([_refine_block(x[b], surf[b], **kw) for b in blocks])


def _refine_block(x: npt.NDArray[np.float32], surf: npt.NDArray[np.float64], *, sign: float, domain: str,
                  band_um: float, offset_um: float, max_slope: float, slope_cost: float, first_edge_weight: float,
                  geo: _Geometry, p: LayerParams) -> npt.NDArray[np.float64]:
    """Sub-pixel rows of the edge (``sign`` +1 dark→bright, -1 bright→dark) in a band around ``surf``."""
    ny = geo.ny
    img = ndi.gaussian_filter(_to_domain(x, domain, p.display_method),
                              sigma=(0.0, geo.ax(p.refine_sigma_axial_um), 0.0), mode="nearest")
    grad = np.gradient(img, axis=1)
    if sign < 0:
        grad = -grad
    del img
    half = max(2, round(geo.ax(band_um)))
    start = np.clip(np.round(surf).astype(np.intp), 0, ny - 1) - half
    band = np.take_along_axis(grad, np.clip(start[:, None, :] + np.arange(2 * half + 1)[None, :, None], 0, ny - 1),
                              axis=1)  # (nz, nb, nx): the image flattened to the surface
    del grad
    sigma = geo.lat(p.refine_sigma_lateral_um)
    if sigma > 0:
        band = ndi.gaussian_filter1d(band, sigma, axis=2, mode="nearest")
    strength = np.clip(band / _column_scale(np.clip(band, 0.0, None)), -1.0, 1.0)
    cost = -strength
    if first_edge_weight > 0:
        # the ILM is the first strong edge from the vitreous; a bright focus just under it
        # has a stronger linear-domain edge but lies below the ILM edge
        cost = cost + np.float32(first_edge_weight) * _window_max(np.clip(strength, 0.0, 1.0), -half, -1)
    path = _dp_path(cost.astype(np.float32), geo.jump(max_slope), geo.jump_cost(slope_cost), centre=start)
    return start + _parabolic_peak(band, _climb(band, path)) + geo.ax(offset_um)


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
        Display-domain volume in [0, 1] (e.g. :func:`~octpipe.preprocess.intensity.linear_to_display`
        of a ``.vol``), or linear reflectivity with ``domain="linear"``. Non-finite
        values and FLT_MAX fill values count as invalid. The input is not modified.
    spacing_mm : (float, float, float)
        (between B-scans, axial, lateral) in mm. The B-scan spacing may be 0 (single
        B-scans, circle scans): nothing is then compared across B-scans.
    invalid : array_like of bool, optional
        Pixels to ignore (e.g. ``OctVolume.invalid``), same shape as ``display``.
    params : LayerParams, optional
        Defaults to ``LayerParams()``.
    domain : {"display", "linear"}
        Intensity domain of ``display``. Linear data is mapped with
        ``params.display_method`` first; the result is the same as passing
        ``linear_to_display(data)``.

    Returns
    -------
    LayerResult
        ``ilm`` and ``bm`` rows (float32, (n_bscans, n_ascans)) and ``qc``.

    Raises
    ------
    ValueError
        If the volume is not 3-D, has no valid pixel, lies outside [0, 1] in the
        display domain, is too short axially, or the spacing or parameters are invalid.

    Examples
    --------
    >>> from octpipe.testing.phantoms import make_phantom
    >>> ph = make_phantom(np.random.default_rng(1), shape=(1, 248, 128), spacing_mm=(0.1, 0.00774, 0.0452))
    >>> res = segment_ilm_bm(ph.data, spacing_mm=(0.0, 0.00774, 0.0452), domain="linear")  # one B-scan
    >>> float(np.median(np.abs(res.bm - ph.bm))) < 1.5
    True
    """
    p = LayerParams() if params is None else params
    if not isinstance(p, LayerParams):
        raise ValueError(f"params must be a LayerParams, got {type(p).__name__}")
    x, valid, geo = _prepare(display, spacing_mm, invalid, domain, p)
    empty_cols = valid.sum(axis=1) < 0.5 * geo.ny  # (nz, nx): A-scans without data

    blocks = _bscan_blocks(geo)
    firsts = [_first_pass_ilm(x[b], valid[b], geo, p) for b in blocks]
    ilm0, lo = np.concatenate([f[0] for f in firsts]), np.concatenate([f[1] for f in firsts])
    del firsts
    bm0 = _first_pass_bm(x, ilm0, lo, empty_cols, geo, p, blocks)

    kx = _odd(geo.lat(p.outlier_window_lateral_um))
    size_ilm, size_bm = (geo.kz(p.ilm_outlier_window_z_um), kx), (geo.kz(p.bm_outlier_window_z_um), kx)
    ilm1, ilm_bad = _reject_outliers(ilm0, empty_cols, size=size_ilm, threshold_px=geo.ax(p.outlier_um))
    bm1, bm_bad = _reject_outliers(bm0, empty_cols, size=size_bm, threshold_px=geo.ax(p.outlier_um))

    ilm2 = _refine(x, ilm1, blocks, sign=1.0, domain=p.ilm_domain, band_um=p.ilm_band_um, offset_um=p.ilm_offset_um,
                   max_slope=p.ilm_max_slope, slope_cost=p.ilm_slope_cost,
                   first_edge_weight=p.ilm_refine_first_edge_weight, geo=geo, p=p)
    bm2 = _refine(x, bm1, blocks, sign=-1.0, domain=p.bm_domain, band_um=p.bm_band_um, offset_um=p.bm_offset_um,
                  max_slope=p.bm_max_slope, slope_cost=p.bm_slope_cost, first_edge_weight=0.0, geo=geo, p=p)
    ilm3, ilm_bad2 = _reject_outliers(ilm2, empty_cols, size=size_ilm, threshold_px=geo.ax(p.refine_outlier_um))
    bm3, bm_bad2 = _reject_outliers(bm2, empty_cols, size=size_bm, threshold_px=geo.ax(p.refine_outlier_um))
    if p.smooth_lateral_um > 0:
        sx = geo.lat(p.smooth_lateral_um)
        ilm3 = ndi.gaussian_filter1d(ilm3, sx, axis=1, mode="nearest") if np.isfinite(ilm3).all() else ilm3
        bm3 = ndi.gaussian_filter1d(bm3, sx, axis=1, mode="nearest") if np.isfinite(bm3).all() else bm3
    ilm = np.clip(ilm3, -0.5, geo.ny - 0.5).astype(np.float32)
    bm = np.clip(bm3, -0.5, geo.ny - 0.5).astype(np.float32)

    inpainted = {"ilm": float(np.mean(ilm_bad | ilm_bad2)), "bm": float(np.mean(bm_bad | bm_bad2))}
    spacing = (geo.dz_um / 1e3, geo.dy_um / 1e3, geo.dx_um / 1e3)
    qc = layer_qc(x, ilm, bm, spacing_mm=spacing, params=p, inpainted=inpainted, valid=valid)
    qc["source"] = "octpipe"
    return LayerResult(ilm=ilm, bm=bm, qc=qc, spacing_mm=spacing, params=p)


# ---------------------------------------------------------------------------------------
# quality control and vendor layers


def _median(values: npt.NDArray[np.floating]) -> float:
    """Median of the finite values; NaN (without a warning) when there are none."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    return float(np.median(v)) if v.size else float("nan")


def layer_qc(
    display: npt.ArrayLike,
    ilm: npt.ArrayLike,
    bm: npt.ArrayLike,
    *,
    spacing_mm: tuple[float, float, float],
    params: LayerParams | None = None,
    inpainted: Mapping[str, float] | None = None,
    valid: npt.ArrayLike | None = None,
) -> dict[str, Any]:
    """Quality-control measures of an ILM/BM pair on a display-domain volume.

    Parameters
    ----------
    display : array_like, shape (n_bscans, n_axial, n_ascans)
        Display-domain volume in [0, 1].
    ilm, bm : array_like, shape (n_bscans, n_ascans)
        Surface rows (NaN = missing).
    spacing_mm : (float, float, float)
        (z, y, x) spacing in mm.
    params : LayerParams, optional
        Thresholds (``qc_*``, thickness range).
    inpainted : mapping, optional
        Fraction of inpainted A-scans per surface (``{"ilm": f, "bm": f}``).
    valid : array_like of bool, optional
        Pixels with data (the volume's shape); the retina's contrast ignores the others
        (fill regions).

    Returns
    -------
    dict
        ``thickness_ok_fraction``, ``thickness_um`` (median), ``inpainted_fraction``,
        ``contrast`` (median step in display units: below − above the ILM, above −
        below BM), ``relative_contrast`` (the same over the image's 20th-99th
        percentile range, which the flags use, with ``retina``: the retina's mean over
        that of everything above the ILM) and ``flags``: ``no_retina``, ``bm_low_contrast``,
        ``thickness_out_of_range``, ``ilm_inpainted``, ``bm_inpainted``, ``ilm_at_border``,
        ``bm_at_border``, ``missing_values``; ``border_fraction`` per surface.

    Examples
    --------
    >>> vol = np.zeros((1, 100, 4), np.float32); vol[:, 20:60] = 0.7
    >>> qc = layer_qc(vol, np.full((1, 4), 19.5), np.full((1, 4), 59.5), spacing_mm=(0, 0.004, 0.01))
    >>> qc["thickness_ok_fraction"], qc["flags"]
    (1.0, [])
    """
    p = LayerParams() if params is None else params
    vol = np.asarray(display, dtype=np.float32)
    ilm = np.asarray(ilm, dtype=np.float64)
    bm = np.asarray(bm, dtype=np.float64)
    if vol.ndim != 3 or ilm.shape != vol.shape[::2] or bm.shape != ilm.shape:
        raise ValueError(f"need a 3-D volume and (n_bscans, n_ascans) surfaces, got {vol.shape}, {ilm.shape}, "
                         f"{bm.shape}")
    dy_um = float(spacing_mm[1]) * 1e3
    thick = (bm - ilm) * dy_um
    ok = np.isfinite(thick) & (thick >= p.min_thickness_um) & (thick <= p.max_thickness_um)
    ok_frac = float(ok.mean()) if ok.size else 0.0
    inp = {"ilm": 0.0, "bm": 0.0} if inpainted is None else {k: float(v) for k, v in inpainted.items()}
    ny = vol.shape[1]
    width = max(2, round(15.0 / dy_um))  # slabs of 15 µm, 4 µm away from the surface
    gap = max(1, round(4.0 / dy_um))
    up = np.arange(-gap - width, -gap)
    down = np.arange(gap, gap + width)
    contrast = {}
    for name, surf, sign in (("ilm", ilm, 1.0), ("bm", bm, -1.0)):
        finite = np.isfinite(surf)
        r = np.round(np.where(finite, surf, 0.0)).astype(np.intp)
        above = np.take_along_axis(vol, np.clip(r[:, None, :] + up[None, :, None], 0, ny - 1), axis=1).mean(axis=1)
        below = np.take_along_axis(vol, np.clip(r[:, None, :] + down[None, :, None], 0, ny - 1), axis=1).mean(axis=1)
        contrast[name] = _median(np.where(finite, sign * (below - above), np.nan))
    # contrast relative to the image's own range (99th - 20th percentile): dim and
    # low-dynamic-range exports have the same anatomy at a smaller scale
    sample = vol[:: max(1, vol.shape[0] // 8)].ravel()
    sample = sample[:: max(1, sample.size // 2_000_000)]
    low, high = np.percentile(sample, [20.0, 99.0]) if sample.size else (0.0, 1.0)
    span = max(float(high - low), 1e-3)
    relative = {name: value / span for name, value in contrast.items()}
    relative["retina"] = _retina_contrast(vol, ilm, bm, None if valid is None else np.asarray(valid, dtype=bool)) / span
    flags = []
    # the step across the ILM is measured where the path found it, which noise can feign;
    # the retina between ILM and BM against everything above the ILM it cannot
    if not relative["ilm"] >= p.qc_min_ilm_contrast or relative["retina"] < p.qc_min_retina_contrast:
        flags.append("no_retina")
    if not relative["bm"] >= p.qc_min_bm_contrast:
        flags.append("bm_low_contrast")
    if ok_frac < p.qc_min_thickness_ok_fraction:
        flags.append("thickness_out_of_range")
    flags.extend(f"{name}_inpainted" for name in ("ilm", "bm") if inp.get(name, 0.0) > p.qc_max_inpainted_fraction)
    border = {"ilm": _fraction(ilm <= 1.5), "bm": _fraction(bm >= ny - 2.5)}  # on the first/last two rows
    flags.extend(f"{name}_at_border" for name in ("ilm", "bm") if border[name] > p.qc_max_border_fraction)
    if not (np.isfinite(ilm).all() and np.isfinite(bm).all()):
        flags.append("missing_values")
    return {
        "thickness_ok_fraction": ok_frac,
        "border_fraction": border,
        "rows": ny,
        "thickness_um": _median(thick),
        "inpainted_fraction": inp,
        "contrast": contrast,
        "relative_contrast": relative,
        "flags": flags,
    }


def _retina_contrast(vol: npt.NDArray[np.float32], ilm: npt.NDArray[np.float64], bm: npt.NDArray[np.float64],
                     valid: npt.NDArray[np.bool_] | None) -> float:
    """Mean brightness between ILM and BM minus the mean above the ILM (up to 8 B-scans).

    NaN where less than 1 % of the pixels lie above the ILM (a retina cut by the top of the
    image): there is nothing to compare with.
    """
    step = max(1, vol.shape[0] // 8)
    sub, top, bottom = vol[::step], ilm[::step, None, :], bm[::step, None, :]
    rows = np.arange(vol.shape[1])[None, :, None]
    above = rows < top - 1.0  # NaN surfaces compare False: those A-scans are left out
    inside = (rows > top + 1.0) & (rows < bottom - 1.0)
    if valid is not None:
        above &= valid[::step]
        inside &= valid[::step]
    if above.sum() < 0.01 * sub.size or not inside.any():
        return float("nan")
    return float(sub[inside].mean() - sub[above].mean())


def _fraction(mask: np.ndarray) -> float:
    """Mean of a boolean array, 0.0 when empty (NaN comparisons count as False)."""
    return float(mask.mean()) if mask.size else 0.0


def choose_layers(
    result: LayerResult,
    vendor_layers: Mapping[str, npt.ArrayLike] | None,
    *,
    use_vendor: bool = True,
) -> LayerResult:
    """Use the device's ILM/BM when present and plausible, else ours.

    Vendor layers are accepted (both surfaces together, so that thickness and
    flattening stay consistent) when

    - each is finite on at least ``params.vendor_min_finite_fraction`` of the A-scans,
    - BM − ILM is within [``min_thickness_um``, ``max_thickness_um``] on at least
      ``params.qc_min_thickness_ok_fraction`` of the A-scans where both are finite,
    - each agrees with our surface within ``params.vendor_max_median_difference_um``
      (median absolute difference). This check is skipped when our result is flagged
      ``no_retina`` or ``thickness_out_of_range``: then it is no fair referee.

    Gaps in accepted vendor layers (e.g. BM across the optic disc) are inpainted by
    interpolation and counted in ``qc["inpainted_fraction"]``.

    Parameters
    ----------
    result : LayerResult
        Our segmentation (:func:`segment_ilm_bm`); its ``params`` and ``spacing_mm``
        give the thresholds.
    vendor_layers : mapping of str to array, or None
        ``OctVolume.layers``; keys ``"ILM"`` and ``"BM"`` are used, NaN = missing.
    use_vendor : bool
        False always keeps ours (recorded in ``qc["vendor"]``).

    Returns
    -------
    LayerResult
        A new result; ``qc["source"]`` is ``"vendor"`` or ``"octpipe"`` and
        ``qc["vendor"]`` records the checks (``used``, ``reason`` when rejected,
        ``finite_fraction``, ``thickness_ok_fraction``, ``median_difference_um``).

    Examples
    --------
    >>> ours = LayerResult(np.full((1, 8), 20.0, np.float32), np.full((1, 8), 70.0, np.float32),
    ...                    qc={"source": "octpipe", "flags": []}, spacing_mm=(0.0, 0.004, 0.01))
    >>> choose_layers(ours, {"ILM": np.full((1, 8), 21.0), "BM": np.full((1, 8), 71.0)}).qc["source"]
    'vendor'
    >>> choose_layers(ours, {"ILM": np.full((1, 8), 21.0), "BM": np.full((1, 8), 30.0)}).qc["vendor"]["used"]
    False
    """
    p = result.params
    qc = dict(result.qc)
    qc["source"] = "octpipe"
    checks: dict[str, Any] = {"used": False}
    qc["vendor"] = checks

    def rejected(reason: str) -> LayerResult:
        checks["reason"] = reason
        return replace(result, qc=qc)

    if not use_vendor:
        return rejected("use_vendor=False")
    if not vendor_layers or "ILM" not in vendor_layers or "BM" not in vendor_layers:
        return rejected("no vendor ILM and BM")
    try:
        v_ilm = np.asarray(vendor_layers["ILM"], dtype=np.float64)
        v_bm = np.asarray(vendor_layers["BM"], dtype=np.float64)
    except (TypeError, ValueError):
        return rejected("vendor layers are not numeric arrays")
    if v_ilm.shape != result.ilm.shape or v_bm.shape != result.bm.shape:
        return rejected(f"vendor layer shapes {v_ilm.shape}, {v_bm.shape} differ from {result.ilm.shape}")
    v_ilm = np.where(np.abs(v_ilm) < 1e30, v_ilm, np.nan)  # FLT_MAX = missing
    v_bm = np.where(np.abs(v_bm) < 1e30, v_bm, np.nan)
    dy_um = float(result.spacing_mm[1]) * 1e3
    finite = {"ilm": float(np.isfinite(v_ilm).mean()), "bm": float(np.isfinite(v_bm).mean())}
    both = np.isfinite(v_ilm) & np.isfinite(v_bm)
    thick = (v_bm - v_ilm)[both] * dy_um
    thick_ok = float(np.mean((thick >= p.min_thickness_um) & (thick <= p.max_thickness_um))) if thick.size else 0.0
    diff = {"ilm": _median(np.abs(v_ilm - result.ilm) * dy_um), "bm": _median(np.abs(v_bm - result.bm) * dy_um)}
    checks.update(finite_fraction=finite, thickness_ok_fraction=thick_ok, median_difference_um=diff)
    reasons = []
    if min(finite.values()) < p.vendor_min_finite_fraction:
        reasons.append(f"finite on {min(finite.values()):.0%} < {p.vendor_min_finite_fraction:.0%} of A-scans")
    if thick_ok < p.qc_min_thickness_ok_fraction:
        reasons.append(f"plausible thickness on {thick_ok:.0%} of A-scans")
    if not any(f in result.qc.get("flags", []) for f in ("no_retina", "thickness_out_of_range")):
        reasons.extend(f"{name.upper()} differs from ours by {value:.1f} µm (median)" for name, value in diff.items()
                       if not value <= p.vendor_max_median_difference_um)
    if reasons:
        return rejected("; ".join(reasons))
    ilm = _inpaint(v_ilm).astype(np.float32)
    bm = _inpaint(v_bm).astype(np.float32)
    checks["used"] = True
    qc["source"] = "vendor"
    qc["inpainted_fraction"] = {"ilm": 1.0 - finite["ilm"], "bm": 1.0 - finite["bm"]}
    thick_all = (bm.astype(np.float64) - ilm) * dy_um
    qc["thickness_ok_fraction"] = float(np.mean((thick_all >= p.min_thickness_um) & (thick_all <= p.max_thickness_um)))
    qc["thickness_um"] = _median(thick_all)
    # flags of our own surfaces stay (they describe the image); those of the surfaces are redone
    redone = ("thickness_out_of_range", "ilm_inpainted", "bm_inpainted", "missing_values", "ilm_at_border",
              "bm_at_border")
    flags = [f for f in result.qc.get("flags", []) if f not in redone]
    if qc["thickness_ok_fraction"] < p.qc_min_thickness_ok_fraction:
        flags.append("thickness_out_of_range")
    if "rows" in qc:
        qc["border_fraction"] = {"ilm": _fraction(ilm <= 1.5), "bm": _fraction(bm >= qc["rows"] - 2.5)}
        flags.extend(f"{n}_at_border" for n in ("ilm", "bm") if qc["border_fraction"][n] > p.qc_max_border_fraction)
    flags.extend(f"{n}_inpainted" for n in ("ilm", "bm") if qc["inpainted_fraction"][n] > p.qc_max_inpainted_fraction)
    if not (np.isfinite(ilm).all() and np.isfinite(bm).all()):
        flags.append("missing_values")
    qc["flags"] = flags
    return replace(result, ilm=ilm, bm=bm, qc=qc)

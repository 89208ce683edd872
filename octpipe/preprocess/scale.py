"""Pixel spacing of B-scans whose file does not say it: an estimate from the retina itself.

Resized and cropped exports (the common research format: JPEG or PNG B-scans of any size)
carry no spacing. Every length octpipe's segmentation and flattening use is in µm, so a
wrong default scale would change their result with the export size. Instead the scale is
measured on the image, in units of the retina's own thickness:

1. Segment ILM and BM with the current spacing guess (the Spectralis default at first).
2. The median retinal thickness BM − ILM in pixels, over the A-scans where it is plausible,
   is set to :data:`PRIOR_THICKNESS_UM` (the median ILM–BM thickness of macular B-scans,
   300 µm; measured on the real Spectralis files with known spacing and the Kermany normal
   B-scans: 305-356 µm). The axial spacing follows; the lateral spacing keeps the default
   ratio of lateral to axial spacing (an export resized as a whole keeps its aspect).
3. Repeat from 1 with the new guess until it changes by less than 2 % (two or three rounds).
4. Where the segmentation itself changes with the scale (a detached hyaloid taken for the
   ILM at one scale and not at a slightly finer one), that repetition would swing between
   the two readings for ever. Once a finer guess has given a retina too thin and a coarser
   one a retina too thick, the guess is bisected (in log spacing) between them instead;
   when the two are within 2 % of each other, the reading whose retina stands out more
   from what lies over it (QC ``relative_contrast["retina"]``: a hyaloid taken for the ILM
   puts the dark gap under it into the "retina") is kept, at its own spacing.

The same B-scan resized by any factor then gets spacing scaled by the inverse factor, and
hence the same boundaries in its own pixels (``tests/preprocess/test_scale.py`` checks
0.5x and 2x). The result is recorded as ``spacing_source = "estimated"``; a user who knows
the spacing passes ``--spacing-mm`` (``spacing_source = "user"``) and nothing is estimated.
It is an anatomical prior, not a measurement: a retina much thicker or thinner than usual
(large oedema, atrophy) gets a proportionally wrong scale, which is what keeps its
segmentation windows in proportion to it.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import replace

import numpy as np
import numpy.typing as npt

from octpipe.volume import OctVolume

__all__ = ["MAX_AXIAL_FIELD_MM", "PRIOR_THICKNESS_UM", "estimate_spacing", "resolve_spacing", "spacing_flags"]

#: Median ILM–BM thickness of a macular B-scan that sets the scale of an image without spacing.
PRIOR_THICKNESS_UM = 300.0

#: B-scans used for the estimate (evenly spread over the volume).
_MAX_BSCANS = 5

#: Largest axial field of view (rows x axial spacing) an estimate may give. Retinal OCT
#: devices image 1.9-2.6 mm axially, and a crop only shrinks the field; the real B-scans
#: without spacing in ../shared/data get 0.5-2.95 mm. A larger estimate means the "retina"
#: measured was a thin band (the RPE alone; a Kermany normal whose dim inner retina was
#: missed once ran to 10 mm): the spacing is held at this bound and the segmentation
#: flagged ``spacing_implausible``.
MAX_AXIAL_FIELD_MM = 3.5


def estimate_spacing(
    display: npt.ArrayLike,
    spacing_mm: tuple[float, float, float],
    *,
    invalid: npt.ArrayLike | None = None,
    max_rounds: int = 10,
    tolerance: float = 0.02,
) -> tuple[tuple[float, float, float], dict[str, object]]:
    """Axial and lateral spacing of a volume from its retinal thickness in pixels.

    Parameters
    ----------
    display : array_like, shape (n_bscans, n_axial, n_ascans)
        Display-domain volume in [0, 1].
    spacing_mm : (float, float, float)
        The starting guess (z, y, x) in mm; its x/y ratio is kept and z is returned unchanged.
    invalid : array_like of bool, optional
        Pixels to ignore, as for :func:`~octpipe.preprocess.layers.segment_ilm_bm`.
    max_rounds : int
        Most segment-and-rescale rounds.
    tolerance : float
        Stop when the axial spacing changes by less than this fraction.

    Returns
    -------
    spacing_mm : (float, float, float)
        The estimate (4 significant digits); the input when no retina was found.
    info : dict
        ``thickness_px`` (median, at the estimate), ``rounds``, ``converged``,
        ``bracketed`` (the two thicknesses in px between which the segmentation jumps,
        where it does), ``implausible`` (the estimate would exceed
        :data:`MAX_AXIAL_FIELD_MM` and was held there) and ``reason`` when the guess was
        kept or held.

    Examples
    --------
    >>> from octpipe.testing.phantoms import make_phantom
    >>> from octpipe.preprocess.intensity import linear_to_display
    >>> ph = make_phantom(np.random.default_rng(0), shape=(1, 496, 256), spacing_mm=(0.0, 0.00387, 0.0226))
    >>> est, info = estimate_spacing(linear_to_display(ph.data), (0.0, 0.00387, 0.0226))
    >>> bool(0.5 < est[1] / 0.00387 < 2.0), info["converged"]
    (True, True)
    """
    from octpipe.preprocess.layers import segment_ilm_bm

    arr = np.asarray(display, dtype=np.float32)
    inv = None if invalid is None else np.asarray(invalid, dtype=bool)
    if arr.ndim == 3 and arr.shape[0] > _MAX_BSCANS:
        pick = np.unique(np.linspace(0, arr.shape[0] - 1, _MAX_BSCANS).round().astype(int))
        arr = arr[pick]
        inv = None if inv is None else inv[pick]
    dz, dy0, dx0 = (float(s) for s in spacing_mm)
    ratio = dx0 / dy0
    # in log spacing s, the misfit g(s) = log(thickness at s / prior) is 0 at the estimate
    log_max = math.log(MAX_AXIAL_FIELD_MM / arr.shape[1])
    tried: dict[float, tuple[float, float, float]] = {}  # s -> (g, thickness_px, retina contrast)
    info: dict[str, object] = {"rounds": 0, "converged": False}
    s, final = math.log(dy0), None
    for rounds in range(1, max_rounds + 1):
        dy = math.exp(s)
        try:
            res = segment_ilm_bm(arr, spacing_mm=(dz, dy, dy * ratio), invalid=inv)
        except ValueError as exc:  # e.g. too few rows for a retina at this scale
            info["reason"] = str(exc)
            break
        thick = (res.bm.astype(np.float64) - res.ilm)
        thick = thick[np.isfinite(thick) & (thick > 0)]
        info["rounds"] = rounds
        if thick.size == 0 or "no_retina" in res.qc["flags"]:
            info["reason"] = "no retina found"
            break
        t_px = float(np.median(thick))
        g = math.log(t_px * dy * 1e3 / PRIOR_THICKNESS_UM)
        tried[s] = (g, t_px, float(res.qc["relative_contrast"]["retina"]))
        if abs(g) < tolerance:  # one more step lands within the tolerance
            final, info["converged"] = (min(s - g, log_max), t_px), True
            break
        if s >= log_max - 1e-9 and g < 0:  # thinner than a retina even at the largest field
            final, info["converged"] = (log_max, t_px), True
            break
        step = min(s - g, log_max)
        bracket = _bracket(tried)
        if bracket is not None:
            lo, hi = bracket
            if hi - lo < tolerance:
                # the segmentation changes with the scale here (e.g. a detached hyaloid is
                # taken for the ILM on one side, and the dark gap under it for retina): keep
                # the reading whose retina stands out more from what lies over it
                side = max((lo, hi), key=lambda v: tried[v][2])
                final, info["converged"] = (side, tried[side][1]), True
                info["bracketed"] = [round(tried[lo][1], 2), round(tried[hi][1], 2)]
                break
            if not lo + 0.1 * (hi - lo) < step < hi - 0.1 * (hi - lo):
                step = 0.5 * (lo + hi)
        s = step
    else:
        info["reason"] = f"no convergence in {max_rounds} rounds"
    if not tried:  # no retina at any round: keep the guess
        return (dz, dy0, dx0), info
    if final is None:  # the round that fitted the prior best
        best = min(tried, key=lambda v: abs(tried[v][0]))
        final = (best, tried[best][1])
    s, t_px = final
    info["thickness_px"] = round(t_px, 2)
    info["implausible"] = s >= log_max - 1e-9 and t_px * math.exp(s) * 1e3 < PRIOR_THICKNESS_UM * (1 - tolerance)
    if info["implausible"]:
        info["reason"] = (f"a retina {t_px:.1f} px thick would make the axial field "
                          f"{PRIOR_THICKNESS_UM / 1e3 / t_px * arr.shape[1]:.1f} mm; held at {MAX_AXIAL_FIELD_MM} mm")

    def sig(v: float) -> float:
        return float(f"{v:.4g}") if v > 0 and math.isfinite(v) else v

    dy = math.exp(s)
    return (dz, sig(dy), sig(dy * ratio)), info


def _bracket(tried: dict[float, tuple[float, float, float]]) -> tuple[float, float] | None:
    """The narrowest pair of neighbouring log spacings whose misfits change sign from - to +."""
    order = sorted(tried)
    pairs = [(a, b) for a, b in itertools.pairwise(order) if tried[a][0] < 0 < tried[b][0]]
    return min(pairs, key=lambda ab: ab[1] - ab[0]) if pairs else None


def resolve_spacing(vol: OctVolume, display: npt.ArrayLike) -> OctVolume:
    """``vol`` with an image-based spacing estimate when its spacing is only octpipe's default.

    Volumes whose spacing came from the file, an earlier estimate or the user are returned
    unchanged. The estimate's details go to ``meta["spacing_estimate"]``.

    Parameters
    ----------
    vol : OctVolume
    display : array_like
        ``vol.data`` in the display domain, [0, 1].

    Returns
    -------
    OctVolume
    """
    if vol.spacing_source != "default":
        return vol
    spacing, info = estimate_spacing(display, vol.spacing_mm, invalid=vol.invalid)
    if "thickness_px" not in info:
        return replace(vol, meta={**vol.meta, "spacing_estimate": info})
    return replace(vol, spacing_mm=spacing, spacing_source="estimated",
                   meta={**vol.meta, "spacing_estimate": info})


def spacing_flags(vol: OctVolume) -> list[str]:
    """QC flags of a volume's spacing estimate: ``["spacing_implausible"]`` or ``[]``."""
    est = vol.meta.get("spacing_estimate") if vol.spacing_source == "estimated" else None
    return ["spacing_implausible"] if isinstance(est, dict) and est.get("implausible") else []

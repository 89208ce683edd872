"""Full-volume anomaly maps from a trained f-AnoGAN (the computation; files are written elsewhere).

For one prepared volume (the store's ``image``, ``layers``, ``flat`` and ``flatmap``, or the same
arrays from :func:`octpipe.preprocess.prepare.prepare_volume` for a single file):

1. every 64×64 window of the flattened retina (stride 16 by default, last window flush with the
   border) is scored in one forward pass: A_R, A_D, A = A_R + κ·A_D, z distance, and the
   reconstruction G(E(x));
2. the pixel residuals ``|x − G(E(x))|`` and the window scores A are merged into the flattened
   grid with a window weighting (sum and weight kept apart, divided at the end);
3. both maps go back through the flattening and the column downsampling to the source B-scan
   grid, zero outside ILM..BM;
4. calibration against the model's held-out normal patches (``calibration.json``): the residual
   map is divided by the normal RMS residual (``sqrt(mean A_R)``), so 1 is a typical healthy
   residual; window scores become percentiles of the normal A distribution.

The volume score is the 99th percentile of the window scores A over windows whose footprint is
at least half retina (robust to one noisy window, sensitive to a lesion covering 1 % of the
retina), reported with its percentile among the normal patch scores and the fraction of windows
above the normal 99th percentile (about 1 % for a healthy volume).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from octpipe.errors import OctpipeError
from octpipe.heatmap import WindowMerger, retina_mask, source_retina, to_source_geometry, window_index
from octpipe.models.fanogan.model import FAnoGANModel
from octpipe.models.fanogan.score import SCORE_NAMES, calibration_percentile, score_and_reconstruct
from octpipe.patches import extract_patches
from octpipe.preprocess.blocks import slabs
from octpipe.preprocess.flatten import flatten_image
from octpipe.preprocess.prepare import PreparedVolume
from octpipe.preprocess.resample import upsample_columns

__all__ = ["MapSettings", "VolumeAnomaly", "compute_anomaly"]


@dataclass(frozen=True)
class MapSettings:
    """How windows are laid and merged.

    Attributes
    ----------
    stride : int, default 16
        Window step in pixels (the patch size is the model's).
    weighting : {'gaussian', 'hann', 'constant'}, default 'gaussian'
        Window weighting of the merge.
    batch_size : int or None
        Windows per forward pass; None (default) = 32 for float32 on a CPU, else 256
        (:func:`~octpipe.models.fanogan.score.resolve_batch_size`).
    device, precision : str
        As :func:`octpipe.models.fanogan.score.score_patches` (``auto``).
    threshold_z : float, default 3.0
        Residual (in normal-RMS units) at which a voxel counts as anomalous in the thresholded
        segmentation.
    """

    stride: int = 16
    weighting: str = "gaussian"
    batch_size: int | None = None
    device: str = "auto"
    precision: str = "auto"
    threshold_z: float = 3.0

    def __post_init__(self) -> None:
        if self.stride < 1:
            raise OctpipeError(f"stride must be >= 1, got {self.stride}")
        if self.batch_size is not None and self.batch_size < 1:
            raise OctpipeError(f"batch size must be >= 1, got {self.batch_size}")


@dataclass
class VolumeAnomaly:
    """Maps and scores of one volume.

    Attributes
    ----------
    windows : ndarray (n, 3)
        Window corners ``(bscan, row, col)`` on the flattened grid.
    window_scores : dict of str to ndarray
        A_R, A_D and A per window, and ``A_percentile`` when calibrated (the z distance is not
        computed for maps).
    window_retina : ndarray (n,)
        Fraction of each window inside ILM..BM.
    residual_flat, reconstruction_flat, score_flat : ndarray (z, h, x')
        Merged pixel residual, merged reconstruction and merged window A on the flattened grid.
    residual : ndarray (z, y, x)
        Calibrated residual map on the source grid (units of the normal RMS residual; raw
        ``|x − G(E(x))|`` when the model has no calibration), 0 outside ILM..BM.
    score_percentile : ndarray (z, y, x) or None
        Merged window A as a percentile of normal patch scores on the source grid.
    background : ndarray (z, y, x)
        The volume as the model saw it, in [0, 1], on the source grid (for overlays).
    inside : ndarray of bool (z, y, x)
        ILM..BM on the source grid.
    layers : ndarray (2, z, x)
        ILM and BM rows on the source grid.
    summary : dict
        Volume score and the rest of the report's numbers.
    """

    windows: np.ndarray
    window_scores: dict[str, np.ndarray]
    window_retina: np.ndarray
    residual_flat: np.ndarray
    reconstruction_flat: np.ndarray
    score_flat: np.ndarray
    residual: np.ndarray
    score_percentile: np.ndarray | None
    background: np.ndarray
    inside: np.ndarray
    layers: np.ndarray
    summary: dict[str, Any] = field(default_factory=dict)


def _check_fit(model: FAnoGANModel, flat: np.ndarray, volume_id: str) -> None:
    size = model.image_size
    if model.config.model.channels != 1:
        raise OctpipeError(f"the model expects {model.config.model.channels} channels; OCT volumes have 1")
    if flat.shape[1] < size or flat.shape[2] < size:
        raise OctpipeError(f"volume {volume_id}: the flattened area {flat.shape[1]}x{flat.shape[2]} is smaller "
                           f"than the model's {size}x{size} patches")


def compute_anomaly(vol: PreparedVolume, model: FAnoGANModel, settings: MapSettings | None = None) -> VolumeAnomaly:
    """Score every window of a volume and build its anomaly maps (module docstring).

    Parameters
    ----------
    vol : PreparedVolume
        The prepared volume (:func:`~octpipe.preprocess.prepare.prepare_volume`, or
        :func:`octpipe.store.read_prepared`).
    model : FAnoGANModel
        A trained model with an encoder (``load_run``).
    settings : MapSettings, optional
        Stride, weighting, batch size, device and precision.

    Returns
    -------
    VolumeAnomaly

    Raises
    ------
    OctpipeError
        If the model does not fit the volume (patch size, channels) or has no encoder.
    """
    settings = settings or MapSettings()
    flat = vol.flat
    _check_fit(model, flat, vol.volume_id)
    size = model.image_size
    index = window_index(flat.shape, size=size, stride=settings.stride)
    patches = extract_patches(flat, index, (size, size))
    scores, recon = score_and_reconstruct(model, patches[:, None], batch_size=settings.batch_size,
                                          device=settings.device, precision=settings.precision, latent=False)
    del scores["z_distance"]  # not needed for maps; skipping it saves an encoder pass per window
    recon = recon[:, 0]

    res_merge = WindowMerger(flat.shape, size, settings.weighting)
    res_merge.add(index, np.abs(patches - recon))
    rec_merge = WindowMerger(flat.shape, size, settings.weighting)
    rec_merge.add(index, recon)
    score_merge = WindowMerger(flat.shape, size, settings.weighting)
    score_merge.add(index, scores["A"])
    residual_flat, recon_flat, score_flat = res_merge.result(), rec_merge.result(), score_merge.result()

    nz, n_axial, n_ascans = vol.source_shape
    layers_src, inside = source_retina(vol.layers, factor=vol.factor, n_axial=n_axial, n_ascans=n_ascans)
    residual = to_source_geometry(residual_flat, vol.flatmap, inside, bm_row=vol.bm_row, factor=vol.factor)
    score_src = to_source_geometry(score_flat, vol.flatmap, inside, bm_row=vol.bm_row, factor=vol.factor)
    background = np.empty(inside.shape, dtype=np.float32)
    for sl in slabs(inside.shape):  # B-scan slabs: no full-size float64 temporaries
        b = np.clip((vol.image[sl] + 1.0) / 2.0, 0.0, 1.0)
        background[sl] = upsample_columns(b, vol.factor, n_ascans) if b.shape[-1] != n_ascans else b

    # retina fraction of each window, from the flattened retina mask
    inside_ds = retina_mask(vol.layers[0], vol.layers[1], vol.image.shape[1]).astype(np.uint8)
    inside_flat = flatten_image(inside_ds, vol.flatmap, height=flat.shape[1], bm_row=vol.bm_row, order=0, fill=0)
    window_retina = extract_patches(inside_flat, index, (size, size)).reshape(len(index), -1).mean(1)

    calibration = model.calibration
    score_pct = None
    if calibration is not None:
        rms = float(np.sqrt(max(calibration["scores"]["A_R"]["mean"], 1e-12)))
        residual /= np.float32(rms)
        scores["A_percentile"] = calibration_percentile(scores["A"], calibration).astype(np.float32)
        score_pct = np.zeros(inside.shape, dtype=np.float32)
        score_pct[inside] = calibration_percentile(score_src[inside], calibration)
    del score_src
    summary = _summary(vol, scores, window_retina, residual, inside, calibration, settings)
    return VolumeAnomaly(windows=index, window_scores=scores, window_retina=window_retina.astype(np.float32),
                         residual_flat=residual_flat, reconstruction_flat=recon_flat, score_flat=score_flat,
                         residual=residual, score_percentile=score_pct,
                         background=background, inside=inside, layers=layers_src,
                         summary=summary)


def _summary(vol: PreparedVolume, scores: dict[str, np.ndarray], window_retina: np.ndarray, residual: np.ndarray,
             inside: np.ndarray, calibration: dict[str, Any] | None, settings: MapSettings) -> dict[str, Any]:
    retinal = window_retina >= 0.5
    a = scores["A"][retinal] if retinal.any() else scores["A"]
    volume_score = float(np.percentile(a, 99))
    out: dict[str, Any] = {
        "volume_id": vol.volume_id,
        "n_windows": int(len(scores["A"])),
        "n_retinal_windows": int(retinal.sum()),
        "volume_score": volume_score,
        "volume_score_definition": "99th percentile of window A over windows at least half inside ILM..BM",
        "max_window_score": float(a.max()),
        "calibrated": calibration is not None,
        "threshold_z": settings.threshold_z,
    }
    if calibration is not None:
        p99 = float(np.percentile(calibration["scores"]["A"]["sorted"], 99))
        from octpipe.export.calibrate import summary_percentile

        out.update(summary_percentile(volume_score, calibration,
                                      lambda v: float(calibration_percentile([v], calibration)[0])))
        out.update({
            "normal_A_p99": p99,
            "anomalous_window_fraction": float((a > p99).mean()),
            "anomalous_voxel_fraction": float((residual[inside] >= settings.threshold_z).mean())
            if inside.any() else 0.0,
            "calibration_n": int(calibration["n"]),
        })
    for name in SCORE_NAMES:
        if name in scores:
            out[f"mean_{name}"] = float(scores[name].mean())
    return out

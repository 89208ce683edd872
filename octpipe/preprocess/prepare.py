"""One volume through every preprocessing stage of the paper.

``read`` (an :class:`~octpipe.volume.OctVolume`) -> display domain -> spacing estimated from
the retina when the file has none (:mod:`octpipe.preprocess.scale`) -> per-volume [-1, 1]
normalisation -> column downsampling -> ILM/BM (vendor layers when present and plausible,
else octpipe's segmentation) -> flattening to BM. The result, a
:class:`PreparedVolume`, is what the store keeps for every volume. Pure: no files.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from octpipe.preprocess.flatten import FlattenConfig, axial_factor, flatten_geometry, flatten_image, flatten_map
from octpipe.preprocess.intensity import DISPLAY_TRANSFORMS, display_full_scale, normalize_volume, to_display
from octpipe.preprocess.resample import (
    downsample_boundaries,
    downsample_columns,
    downsample_labels,
    lateral_factor,
)
from octpipe.volume import OctVolume

__all__ = ["PreprocessConfig", "PreparedVolume", "prepare_volume", "segment_source", "layer_params"]


@dataclass(frozen=True)
class PreprocessConfig:
    """Preprocessing parameters (all stages).

    Parameters
    ----------
    display_transform : {"log", "root4"}
        Linear reflectivity to display mapping (see :mod:`octpipe.preprocess.intensity`).
    normalize_percentiles : (float, float) or None
        Robust normalisation range; None is the paper's min/max rule.
    target_spacing_mm : float or None
        Lateral spacing after downsampling (the paper: 512 -> 256 columns, 22.6 µm).
    factor : int or None
        Explicit integer column factor; overrides ``target_spacing_mm``.
    use_vendor_layers : bool
        Use the file's ILM/BM when present and plausible.
    flatten : FlattenConfig
        Flattened area geometry.
    """

    display_transform: str = "log"
    normalize_percentiles: tuple[float, float] | None = None
    target_spacing_mm: float | None = 0.0226
    factor: int | None = None
    use_vendor_layers: bool = True
    flatten: FlattenConfig = field(default_factory=FlattenConfig)

    def __post_init__(self) -> None:
        if self.display_transform not in DISPLAY_TRANSFORMS:
            raise ValueError(f"display_transform must be one of {DISPLAY_TRANSFORMS}, got {self.display_transform!r}")
        if self.factor is None and self.target_spacing_mm is None:
            raise ValueError("give target_spacing_mm or factor")
        if self.normalize_percentiles is not None:
            lo, hi = self.normalize_percentiles
            if not 0 <= lo < hi <= 100:
                raise ValueError(f"normalize_percentiles must satisfy 0 <= low < high <= 100, got {(lo, hi)}")

    def to_dict(self) -> dict:
        """JSON-ready form, stored with every volume."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> PreprocessConfig:
        """The config :meth:`to_dict` wrote (also after a JSON round trip); missing keys take the defaults.

        Raises
        ------
        ValueError
            An unknown key, or a value out of range.

        Examples
        --------
        >>> import json
        >>> c = PreprocessConfig(normalize_percentiles=(0.5, 99.5))
        >>> PreprocessConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
        True
        """
        from dataclasses import fields

        values = dict(data)
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown preprocessing setting(s): {', '.join(unknown)}")
        if values.get("normalize_percentiles") is not None:
            values["normalize_percentiles"] = tuple(float(v) for v in values["normalize_percentiles"])
        if isinstance(values.get("flatten"), dict):
            values["flatten"] = FlattenConfig.from_dict(values["flatten"])
        return cls(**values)


@dataclass(frozen=True)
class PreparedVolume:
    """One volume ready for patches and maps: its arrays, where they came from and how they were made.

    The one shape of a prepared volume: :func:`prepare_volume` makes it, the store keeps it
    (:func:`octpipe.store.write_prepared` / :func:`octpipe.store.read_prepared`, which own
    the attribute names on disk) and the export maps it.

    Attributes
    ----------
    image : (z, y, x') float32 in [-1, 1]
    layers : (2, z, x') float32, ILM and BM rows on the downsampled grid
    flat : (z, h, x') float32, the flattened retina area (-1 outside the source)
    flatmap : (2, z, x') float32, BM reference row and scale per A-scan
    mask : (z, y, x') uint8 or None, lesion labels on the downsampled grid
    factor : int, the column factor
    height, bm_row : int, flattened area geometry in rows
    display_range : (float, float), display values mapped to -1 and 1
    qc : dict, quality flags from segmentation and flattening
    spacing_mm : (float, float, float), the source-grid spacing used (z, y, x) in mm
    spacing_source : str, where it came from (``file``, ``user``, ``estimated``, ``default``)
    volume_id : str, the pseudonymous id (:func:`octpipe.privacy.volume_id`; a store's is salted)
    source_shape : (int, int, int), ``(n_bscans, n_axial, n_ascans)`` of the source
    laterality : {"OD", "OS"} or None
    bscan_order : str or None, the source's B-scan order (see :class:`~octpipe.OctVolume`)
    preprocess : dict, the resolved preprocessing (:meth:`PreprocessConfig.to_dict`, JSON form)
    valid : (z, y, x') uint8 or None, 1 where the source had data, when it marks invalid pixels
    notes : tuple of str, remarks on the preprocessing (recorded in export sidecars)
    info : dict, what else is known of the source (JSON-ready: ``format``, ``sha256``,
        ``series``, ``reader``, ``vendor``, ``label``...; a store's other volume attributes).
        Never a patient field.
    source_path : Path or None, the file it was read from, in memory only: never written to
        a store or an export (file names can carry patient names)
    """

    image: npt.NDArray[np.float32]
    layers: npt.NDArray[np.float32]
    flat: npt.NDArray[np.float32]
    flatmap: npt.NDArray[np.float32]
    mask: npt.NDArray[np.uint8] | None
    factor: int
    height: int
    bm_row: int
    display_range: tuple[float, float]
    qc: dict[str, object]
    spacing_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    spacing_source: str = "default"
    volume_id: str = ""
    source_shape: tuple[int, int, int] = (0, 0, 0)
    laterality: str | None = None
    bscan_order: str | None = None
    preprocess: dict[str, Any] = field(default_factory=dict)
    valid: npt.NDArray[np.uint8] | None = None
    notes: tuple[str, ...] = ()
    info: dict[str, Any] = field(default_factory=dict)
    source_path: Path | None = None

    @property
    def flatten_geometry(self) -> dict[str, int]:
        """``{"height": ..., "bm_row": ...}`` of the flattened area (as the store records it)."""
        return {"height": int(self.height), "bm_row": int(self.bm_row)}

    @property
    def stored_spacing_mm(self) -> tuple[float, float, float]:
        """Spacing (z, y, x) in mm of the stored grid (columns downsampled by ``factor``)."""
        dz, dy, dx = self.spacing_mm
        return (dz, dy, dx * self.factor)


def layer_params(vol: OctVolume):
    """Segmentation parameters for a volume's source intensity.

    The ILM's second pass looks for the steepest edge in linear reflectivity, which is
    where the boundary is when the display mapping is known (``.vol``, E2E: linear
    sources). An export already in the display domain (PNG, JPEG, TIFF, 8-bit DICOM) has a
    vendor's unknown mapping; inverting it with Heyex's log puts the edge 2-4 px into the
    nerve fibre layer (measured against the label maps of the real multi-vendor exports:
    median +3.9 px linear, +1.4 px display), so it is found in the display domain.
    """
    from octpipe.preprocess.layers import LayerParams

    return LayerParams() if vol.intensity == "linear" else LayerParams(ilm_domain="display")


def _find_layers(display_ds: np.ndarray, vol: OctVolume, factor: int, spacing_ds: tuple[float, float, float],
                 invalid_ds: np.ndarray | None, use_vendor: bool) -> tuple[np.ndarray, np.ndarray, dict]:
    from octpipe.preprocess.layers import choose_layers, segment_ilm_bm

    ours = segment_ilm_bm(display_ds, spacing_mm=spacing_ds, invalid=invalid_ds, params=layer_params(vol))
    vendor = None
    if "ILM" in vol.layers and "BM" in vol.layers:
        vendor = {"ILM": downsample_boundaries(vol.layers["ILM"], factor),
                  "BM": downsample_boundaries(vol.layers["BM"], factor)}
    chosen = choose_layers(ours, vendor, use_vendor=use_vendor)
    return chosen.ilm, chosen.bm, dict(chosen.qc)


def prepare_volume(vol: OctVolume, config: PreprocessConfig | None = None, *,
                   mask: npt.ArrayLike | None = None, volume_id: str | None = None) -> PreparedVolume:
    """Run every preprocessing stage on one volume.

    Parameters
    ----------
    vol : OctVolume
        Reader output.
    config : PreprocessConfig, optional
        Defaults to the paper's settings.
    mask : array_like of uint8, shape of ``vol.data``, optional
        Lesion labels in the source geometry (annotations), resampled with the volume.
    volume_id : str, optional
        The id to carry (a store's salted id); default the reader's, ``vol.volume_id``.

    Returns
    -------
    PreparedVolume
    """
    from octpipe.preprocess.scale import resolve_spacing, spacing_flags

    config = config or PreprocessConfig()
    display = to_display(vol.data, domain=vol.intensity,  # type: ignore[arg-type]
                         full_scale=display_full_scale(vol.meta, vol.data),
                         method=config.display_transform)  # type: ignore[arg-type]
    vol = resolve_spacing(vol, display)
    dz, dy, dx = vol.spacing_mm
    invalid = vol.invalid if vol.invalid is not None and vol.invalid.any() else None
    image, display_range = normalize_volume(display, invalid=invalid, percentiles=config.normalize_percentiles)
    del display  # full-size copies go as soon as they are used: the peak stays near twice the input
    factor = lateral_factor(dx, factor=config.factor, target_spacing_mm=config.target_spacing_mm)
    image_ds = downsample_columns(image, factor, invalid=invalid)
    del image
    invalid_ds = None
    if invalid is not None:
        invalid_ds = ~np.isfinite(image_ds)
        image_ds = np.where(invalid_ds, -1.0, image_ds).astype(np.float32)
    spacing_ds = (dz, dy, dx * factor)
    ilm, bm, qc = _find_layers((image_ds + 1.0) / 2.0, vol, factor, spacing_ds, invalid_ds,
                               config.use_vendor_layers)
    height, bm_row, margin = flatten_geometry(config.flatten, dy)
    base = axial_factor(config.flatten, dy)
    sigma_cols = config.flatten.bm_smooth_um / (dx * factor * 1e3)
    flatmap = flatten_map(ilm, bm, height=height, bm_row=bm_row, top_margin=margin, sigma_columns=sigma_cols,
                          rows_per_source_row=base)
    flat = flatten_image(image_ds, flatmap, height=height, bm_row=bm_row, fill=-1.0)
    mask_ds = None
    if mask is not None:
        m = np.asarray(mask)
        if m.shape != vol.data.shape:
            raise ValueError(f"mask shape {m.shape} != volume shape {vol.data.shape}")
        mask_ds = downsample_labels(m, factor)
    qc = dict(qc)
    qc["scaled_fraction"] = float((flatmap[1] < base * (1.0 - 1e-6)).mean())
    if vol.spacing_source == "estimated":
        qc["spacing_estimate"] = vol.meta.get("spacing_estimate")
        qc["flags"] = list(qc.get("flags", [])) + spacing_flags(vol)
    prov = vol.provenance
    info: dict[str, Any] = {"format": prov.format if prov else None, "reader": prov.reader if prov else "",
                            "sha256": prov.sha256 if prov else "", "series": prov.series if prov else 0,
                            "scan_pattern": vol.scan_pattern, "vendor": vol.vendor, "source_intensity": vol.intensity}
    return PreparedVolume(
        image=image_ds.astype(np.float32), layers=np.stack([ilm, bm]).astype(np.float32), flat=flat,
        flatmap=flatmap, mask=mask_ds, factor=factor, height=height, bm_row=bm_row,
        display_range=display_range, qc=qc, spacing_mm=tuple(float(v) for v in vol.spacing_mm),
        spacing_source=vol.spacing_source, volume_id=vol.volume_id if volume_id is None else volume_id,
        source_shape=tuple(int(n) for n in vol.shape), laterality=vol.laterality, bscan_order=vol.bscan_order,
        preprocess=json.loads(json.dumps(config.to_dict())),
        valid=None if invalid_ds is None else (~invalid_ds).astype(np.uint8), info=info,
    )


def segment_source(vol: OctVolume, *, use_vendor: bool = False, display_transform: str = "log"):
    """ILM/BM of a volume in its own pixel geometry (what ``octpipe layers`` writes).

    The volume goes to the display domain, gets an image-based spacing estimate when the
    file has none (:func:`octpipe.preprocess.scale.resolve_spacing`), and is segmented at
    full resolution; with ``use_vendor`` the device's layers replace ours when plausible.

    Returns
    -------
    result : LayerResult
    vol : OctVolume
        The volume with the spacing used (``spacing_source`` ``"estimated"`` when estimated).
    """
    from octpipe.preprocess.layers import choose_layers, segment_ilm_bm
    from octpipe.preprocess.scale import resolve_spacing, spacing_flags

    display = to_display(vol.data, domain=vol.intensity,  # type: ignore[arg-type]
                         full_scale=display_full_scale(vol.meta, vol.data),
                         method=display_transform)  # type: ignore[arg-type]
    vol = resolve_spacing(vol, display)
    result = segment_ilm_bm(display, spacing_mm=vol.spacing_mm, invalid=vol.invalid, params=layer_params(vol))
    vendor = {k: vol.layers[k] for k in ("ILM", "BM") if k in vol.layers}
    result = choose_layers(result, vendor if len(vendor) == 2 else None, use_vendor=use_vendor)
    result.qc["flags"] = list(result.qc.get("flags", [])) + spacing_flags(vol)
    return result, vol

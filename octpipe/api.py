"""The notebook API: one file to an anomaly map in four calls, with plain keyword arguments.

>>> import octpipe as op                                                  # doctest: +SKIP
>>> vol = op.read_volume("scan.vol")                                      # doctest: +SKIP
>>> model = op.load_model("models/fanogan-octdl")                         # doctest: +SKIP
>>> prepared = op.prepare(vol, model=model)  # the model's own preprocessing  # doctest: +SKIP
>>> result = op.anomaly_map(prepared, model, stride=16)                   # doctest: +SKIP
>>> result.residual.shape == vol.shape, result.summary["volume_score"]    # doctest: +SKIP

Each function is a thin, documented front to the module that does the work (the readers,
:mod:`octpipe.preprocess.prepare`, :mod:`octpipe.models.fanogan.checkpoint`,
:mod:`octpipe.export.anomaly`, :mod:`octpipe.store`); the configuration objects of those
modules stay at the command-line edge. ``docs/api.md`` has a runnable example.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from octpipe.errors import OctpipeError
from octpipe.volume import OctVolume

if TYPE_CHECKING:
    from octpipe.export.anomaly import VolumeAnomaly
    from octpipe.models.fanogan.model import FAnoGANModel
    from octpipe.preprocess.layers import LayerResult
    from octpipe.preprocess.prepare import PreparedVolume

__all__ = ["read_volume", "read_volumes", "segment_layers", "prepare", "load_model", "anomaly_map", "open_store",
           "Store"]


def read_volume(path: str | Path, *, series: int = 0, spacing_mm: str | None = None) -> OctVolume:
    """Read one volume of any supported file or B-scan folder.

    Parameters
    ----------
    path : str or Path
        A vendor file (.vol, .E2E, DICOM OPT, Topcon .fda/.fds, NIfTI) or a folder of B-scans.
    series : int
        Series of a multi-series file.
    spacing_mm : str, optional
        ``"Z,Y,X"`` in mm replacing the file's (empty fields keep it), as ``--spacing-mm``.
    """
    from octpipe.io import read_volume as _read
    from octpipe.volume import override_spacing, parse_spacing

    vol = _read(path, series=series)
    return override_spacing(vol, parse_spacing(spacing_mm)) if spacing_mm else vol


def read_volumes(path: str | Path) -> list[OctVolume]:
    """Every series of a file (an E2E export holds several), each an :class:`~octpipe.OctVolume`."""
    from octpipe.io import read_volumes as _read

    return list(_read(path))


def segment_layers(vol: OctVolume, *, use_vendor: bool = True) -> LayerResult:
    """ILM and BM rows per A-scan in the source geometry, with QC flags (as ``octpipe layers``).

    The spacing is estimated from the retina when the file has none; the device's layers are
    used when present and plausible unless ``use_vendor=False``.
    """
    from octpipe.preprocess.prepare import segment_source

    result, _ = segment_source(vol, use_vendor=use_vendor)
    return result


def prepare(vol: OctVolume, *, model: FAnoGANModel | None = None, display: str = "log",
            robust: tuple[float, float] | None = None, target_spacing_mm: float = 0.0226,
            factor: int | None = None, use_vendor_layers: bool = True) -> PreparedVolume:
    """The paper's preprocessing of one volume: display domain, [-1, 1], columns, ILM/BM, flattening.

    Parameters
    ----------
    vol : OctVolume
        From :func:`read_volume`.
    model : FAnoGANModel, optional
        Prepare exactly as this model's training data was (recorded in the bundle); the other
        keywords are then not used.
    display, robust, target_spacing_mm, factor, use_vendor_layers
        As ``octpipe ingest``'s ``--display``, ``--robust``, ``--target-spacing``, ``--factor``
        and ``--no-vendor-layers``.

    Returns
    -------
    PreparedVolume
        ``image``, ``layers``, ``flat`` (the flattened retina the model sees), ``flatmap``, the
        volume id, source shape and spacing, laterality, B-scan order and the preprocessing
        used; what :func:`anomaly_map` takes and :func:`octpipe.store.write_prepared` stores.
    """
    from octpipe.export.run import _prepared_input
    from octpipe.preprocess.prepare import PreprocessConfig

    if model is not None:
        config = model.preprocess_config()
    else:
        config = PreprocessConfig(display_transform=display, normalize_percentiles=robust, factor=factor,
                                  target_spacing_mm=target_spacing_mm, use_vendor_layers=use_vendor_layers)
    prov = vol.provenance
    path = Path(prov.path) if prov else Path("in-memory")
    return _prepared_input(vol, config, path=path, sha=prov.sha256 if prov else str(vol.volume_id),
                           series=prov.series if prov else 0)


def load_model(path: str | Path, *, device: str = "cpu") -> FAnoGANModel:
    """A trained f-AnoGAN run or bundled model (a folder with ``model.pt``), ready to score."""
    from octpipe.models.fanogan.checkpoint import load_run

    p = Path(path)
    if not p.is_dir():
        raise OctpipeError("no such model folder", p)
    return load_run(p, device=device)


def anomaly_map(prepared: PreparedVolume, model: FAnoGANModel, *, stride: int = 16, weighting: str = "gaussian",
                batch_size: int = 256, device: str = "auto", precision: str = "auto",
                threshold: float = 3.0) -> VolumeAnomaly:
    """Score every window of a prepared volume and merge the maps (what ``octpipe export`` writes).

    Returns
    -------
    VolumeAnomaly
        ``residual`` (calibrated, source geometry, 0 outside ILM..BM), ``score_percentile``,
        ``window_scores`` (A_R, A_D, A per window), ``summary`` (``volume_score``,
        ``volume_percentile``...).
    """
    from octpipe.export.anomaly import MapSettings, compute_anomaly

    settings = MapSettings(stride=stride, weighting=weighting, batch_size=batch_size, device=device,
                           precision=precision, threshold_z=threshold)
    return compute_anomaly(prepared, model, settings)


@dataclass(frozen=True)
class Store:
    """A read-only view of an octpipe store: its volumes, their attributes and patch splits."""

    path: Path

    @property
    def volume_ids(self) -> list[str]:
        """Ids of the complete volumes, sorted."""
        from octpipe.store import volume_ids

        return volume_ids(self.path)

    def attrs(self, volume_id: str) -> dict[str, Any]:
        """A volume's attributes (spacing, laterality, QC, preprocessing...)."""
        from octpipe.store import read_volume_attrs

        return read_volume_attrs(self.path, volume_id)

    def volume(self, volume_id: str) -> PreparedVolume:
        """A stored volume, prepared, as :func:`prepare` gives it (for :func:`anomaly_map`)."""
        from octpipe.store import read_prepared

        if volume_id not in self.volume_ids:
            raise OctpipeError(f"no complete volume {volume_id} in the store", self.path)
        return read_prepared(self.path, volume_id)

    def patches(self, split: str = "test") -> Any:
        """The Zarr group of a patch split (arrays ``x``, ``index``, ``label``, maybe ``mask``)."""
        from octpipe.store import open_patch_split

        return open_patch_split(self.path, split)

    def __iter__(self) -> Iterator[str]:
        return iter(self.volume_ids)

    def __len__(self) -> int:
        return len(self.volume_ids)


def open_store(path: str | Path) -> Store:
    """An existing store, read-only (``octpipe ingest`` writes stores)."""
    p = Path(path)
    if not (p / "zarr.json").is_file() or not (p / "volumes").is_dir():
        raise OctpipeError("not an octpipe store (run octpipe ingest first)", p)
    return Store(p)

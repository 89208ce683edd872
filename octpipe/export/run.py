"""``octpipe export``: anomaly maps of one file or of every volume of a store, written for clinicians.

Per volume, ``OUTDIR/<volume_id>/`` receives (all without patient identifiers):

- ``anomaly.nii.gz`` (calibrated residual), ``window-score.nii.gz`` (window A as a percentile of
  normal patches, when the model is calibrated) and ``source.nii.gz`` (the volume as the model saw
  it), all with the same affine in mm (:func:`octpipe.io.nifti.nifti_affine`), and
  ``anomaly.json`` (laterality, B-scan order, spacing, flattening, model id, octpipe version,
  volume score);
- ``overlays/bscan_NNN.png`` and ``anomaly.gif``;
- ``enface.png`` and ``sectors.csv``: maximum and mean anomaly over depth, ETDRS grid on the fovea;
- ``windows.csv``: every window's position and scores;
- ``dicom/``: a Parametric Map and a Segmentation referencing a de-identified copy of the source
  when the source is DICOM, otherwise Secondary Capture images of the overlays;
- ``report.html``: self-contained report;
- ``summary.json``, written last: its presence marks the volume as done (a rerun skips it).

A store export runs one Dask task per volume (or in this process with ``workers=0``), skips
volumes already done, and writes the screening index ``index.html`` and ``index.csv``.
"""

from __future__ import annotations

import csv
import fcntl
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from octpipe import __version__
from octpipe.errors import OctpipeError
from octpipe.export.anomaly import MapSettings, VolumeAnomaly, VolumeInput, compute_anomaly, volume_input_from_arrays
from octpipe.export.enface import enface_projections, etdrs_labels, find_fovea, physical_coordinates, sector_table
from octpipe.export.figures import write_enface_figure, write_gif, write_overlays
from octpipe.models.fanogan.checkpoint import FAnoGANModel, load_run

__all__ = ["ExportResult", "export_volume", "export_file", "export_store", "model_identity", "SUMMARY_NAME"]

#: File whose presence marks a volume's export as complete.
SUMMARY_NAME = "summary.json"


@dataclass(frozen=True)
class ExportResult:
    """What an export did.

    Attributes
    ----------
    out_dir : Path
        The output folder.
    done, skipped : list of str
        Volume ids exported now, and those already complete.
    failed : dict of str to str
        Volume id to the one-line reason.
    seconds : float
        Wall time.
    """

    out_dir: Path
    done: list[str]
    skipped: list[str]
    failed: dict[str, str]
    seconds: float


def model_identity(model: FAnoGANModel) -> dict[str, Any]:
    """Model id, path and key configuration for sidecars and reports."""
    run = model.run_dir
    card = None
    if run is not None:
        for name in ("MODEL_CARD.md", "README.md"):
            if (run / name).is_file():
                card = (run / name).read_text(encoding="utf-8")
                break
    m = model.config.model
    return {
        "id": run.name if run is not None else "in-memory",
        "path": str(run) if run is not None else None,
        "latent_dim": m.latent_dim, "dim": m.dim, "image_size": m.image_size, "kappa": model.kappa,
        "encoder_mode": model.config.encoder.mode,
        "calibration_n": None if model.calibration is None else model.calibration.get("n"),
        "card": card,
    }


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(obj, indent=1, default=_json_default), encoding="utf-8")
    os.replace(tmp, path)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _write_nifti(out: Path, result: VolumeAnomaly, spacing: tuple[float, float, float]) -> list[Path]:
    from octpipe.io.nifti import write_nifti

    paths = [write_nifti(out / "anomaly.nii.gz", result.residual, spacing_mm=spacing,
                         description="octpipe anomaly: residual / normal RMS residual"),
             write_nifti(out / "source.nii.gz", result.background, spacing_mm=spacing,
                         description="octpipe: volume as the model saw it, [0, 1]")]
    if result.score_percentile is not None:
        paths.append(write_nifti(out / "window-score.nii.gz", result.score_percentile, spacing_mm=spacing,
                                 description="octpipe: window score A, percentile of normal patches"))
    return paths


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def _source_dicom(vol: VolumeInput, source_root: Path | None) -> Path | None:
    """The source DICOM file, when the volume came from one and it can be found."""
    if not str(vol.attrs.get("format") or "").startswith("dicom"):
        return None
    src = vol.attrs.get("source_path")
    if src is None and source_root is not None and vol.attrs.get("source"):
        src = source_root / vol.attrs["source"]
    return Path(src) if src and Path(src).is_file() else None


def export_volume(vol: VolumeInput, model: FAnoGANModel, out_dir: str | Path, *,
                  settings: MapSettings | None = None, dicom: bool = True, report: bool = True,
                  source_root: str | Path | None = None) -> dict[str, Any]:
    """Compute and write every output of one volume (module docstring); returns its summary.

    The volume's folder is written under a temporary name and renamed when complete, so a crash
    never leaves a folder that looks finished.
    """
    from octpipe.export.report import write_volume_report

    settings = settings or MapSettings()
    t0 = time.perf_counter()
    final = Path(out_dir) / vol.volume_id
    staging = Path(out_dir) / f".staging-{vol.volume_id}-{uuid.uuid4().hex[:8]}"
    staging.mkdir(parents=True)
    try:
        result = compute_anomaly(vol, model, settings)
        t_model = time.perf_counter() - t0
        attrs = vol.attrs
        spacing = tuple(float(v) for v in attrs["source_spacing_mm"])
        laterality = attrs.get("laterality")
        order = attrs.get("bscan_order")
        centre = find_fovea(result.layers[0], result.layers[1], spacing)  # type: ignore[arg-type]
        mx, mean = enface_projections(result.residual, result.inside)
        labels = etdrs_labels(mx.shape, spacing, centre, laterality, order)  # type: ignore[arg-type]
        sectors = sector_table(mean, labels, spacing)  # type: ignore[arg-type]
        _, y_mm = physical_coordinates(mx.shape, spacing, centre, laterality, order)  # type: ignore[arg-type]
        meta = {"laterality": laterality, "y_mm": y_mm[:, 0]}

        frames = write_overlays(staging / "overlays", result.background, result.residual, result.layers, meta)
        write_gif(staging / "anomaly.gif", frames)
        title = f"volume {vol.volume_id}: mean anomaly over depth"
        write_enface_figure(staging / "enface.png", mean, spacing_mm=spacing, centre=centre,  # type: ignore[arg-type]
                            laterality=laterality, bscan_order=order, sectors=sectors, title=title)
        write_enface_figure(staging / "enface-max.png", mx, spacing_mm=spacing,  # type: ignore[arg-type]
                            centre=centre, laterality=laterality, bscan_order=order, sectors=sector_table(
                                mx, labels, spacing), title=f"volume {vol.volume_id}: maximum anomaly over depth")
        _write_csv(staging / "sectors.csv", ["sector", "mean", "max", "covered_mm2", "covered_fraction"],
                   [[r["sector"], r["mean"], r["max"], r["covered_mm2"], r["covered_fraction"]] for r in sectors])
        names = list(result.window_scores)
        _write_csv(staging / "windows.csv", ["bscan", "row", "col", "retina_fraction", *names],
                   [[*map(int, result.windows[i]), f"{result.window_retina[i]:.3f}",
                     *(f"{result.window_scores[n][i]:.6g}" for n in names)] for i in range(len(result.windows))])
        _write_nifti(staging, result, spacing)  # type: ignore[arg-type]

        identity = model_identity(model)
        summary = dict(result.summary)
        summary.update({
            "laterality": laterality, "bscan_order": order, "source_format": attrs.get("format"),
            "label": attrs.get("label"), "qc_flags": list(attrs.get("qc", {}).get("flags", [])),
            "fovea": centre.to_dict(), "sectors": sectors,
            "most_anomalous_bscans": _top_bscans(result, 4),
        })
        sidecar = {
            "volume_id": vol.volume_id, "octpipe_version": __version__,
            "model": {k: v for k, v in identity.items() if k != "card"},
            "maps": {"anomaly.nii.gz": "|x - G(E(x))| / sqrt(mean normal A_R) (1 = a typical healthy residual), "
                                       "0 outside ILM..BM",
                     "window-score.nii.gz": "merged window score A as a percentile of held-out normal patches",
                     "source.nii.gz": "the volume as the model saw it (display domain, [0, 1])"},
            "axes": "NIfTI i = lateral (A-scan), j = B-scan, k = depth (-axial); see octpipe.io.nifti",
            "laterality": laterality, "bscan_order": order, "spacing_mm": list(spacing),
            "source_shape": list(vol.source_shape), "column_factor": vol.factor,
            "flattening": {**attrs.get("flatten", {}), "preprocess": attrs.get("preprocess")},
            "windows": {"size": model.image_size, "stride": settings.stride, "weighting": settings.weighting},
            "precision": settings.precision, "summary": result.summary,
        }
        _write_json(staging / "anomaly.json", sidecar)
        if dicom:
            root = Path(source_root) if source_root is not None else None
            summary["dicom"] = _write_dicom(staging, vol, result, settings, spacing, root,  # type: ignore[arg-type]
                                            np.stack(frames))
        summary["seconds_model"] = round(t_model, 3)
        if report:
            write_volume_report(staging / "report.html", summary, identity, staging)
        summary["seconds"] = round(time.perf_counter() - t0, 3)
        _write_json(staging / SUMMARY_NAME, summary)
        if final.exists():
            shutil.rmtree(final)
        os.rename(staging, final)
        return summary
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _top_bscans(result: VolumeAnomaly, k: int) -> list[int]:
    """B-scans with the highest window score A (ties: lowest index first)."""
    a = result.window_scores["A"]
    b = result.windows[:, 0]
    n = int(b.max()) + 1 if len(b) else 0
    best = np.full(n, -np.inf)
    np.maximum.at(best, b, a)
    return [int(i) for i in np.argsort(-best, kind="stable")[:k]]


def _write_dicom(out: Path, vol: VolumeInput, result: VolumeAnomaly, settings: MapSettings,
                 spacing: tuple[float, float, float], source_root: Path | None, frames: np.ndarray) -> dict[str, Any]:
    from octpipe.export.dicom import write_dicom_exports

    got = write_dicom_exports(out / "dicom", anomaly_map=result.residual, threshold=settings.threshold_z,
                              spacing_mm=spacing, laterality=vol.attrs.get("laterality"), pseudonym=vol.volume_id,
                              source_dicom=_source_dicom(vol, source_root), overlays=frames)
    return {"files": [Path(p).relative_to(out).as_posix() for p in got.paths], "note": got.note}


# --------------------------------------------------------------------------------------------
# Inputs: a file or a store
# --------------------------------------------------------------------------------------------
def file_volume_input(path: str | Path, *, series: int = 0) -> VolumeInput:
    """Read and prepare one OCT file exactly as ``octpipe ingest`` does (paper preprocessing)."""
    from octpipe.io import read_volume
    from octpipe.io._common import file_sha256
    from octpipe.preprocess.prepare import PreprocessConfig, prepare_volume
    from octpipe.privacy import pseudonymous_id

    p = Path(path)
    vol = read_volume(p)
    config = PreprocessConfig()
    prepared = prepare_volume(vol, config)
    sha = file_sha256(p)
    attrs = {
        "format": vol.provenance.format if vol.provenance else None,
        "source_path": str(p),  # in memory only: never written (file names can carry names)
        "source_shape": list(vol.shape),
        "source_spacing_mm": list(vol.spacing_mm),
        "laterality": vol.laterality,
        "bscan_order": vol.bscan_order,
        "column_factor": prepared.factor,
        "flatten": {"height": prepared.height, "bm_row": prepared.bm_row},
        "preprocess": config.to_dict(),
        "qc": prepared.qc,
    }
    vid = pseudonymous_id(sha, series)
    return VolumeInput(volume_id=vid, image=prepared.image, layers=prepared.layers, flat=prepared.flat,
                       flatmap=prepared.flatmap, mask=prepared.mask, attrs=attrs)


def store_volume_input(store: str | Path, volume_id: str) -> VolumeInput:
    """One complete volume of a store as a :class:`VolumeInput`."""
    from octpipe.store import read_volume_group

    arrays, attrs = read_volume_group(store, volume_id)
    return volume_input_from_arrays(volume_id, arrays, attrs)


def _is_done(out_dir: Path, volume_id: str) -> bool:
    return (out_dir / volume_id / SUMMARY_NAME).is_file()


def export_file(path: str | Path, model_dir: str | Path, out_dir: str | Path, *,
                settings: MapSettings | None = None, overwrite: bool = False) -> ExportResult:
    """Export one OCT file (read, prepared as in training, mapped and written)."""
    t0 = time.perf_counter()
    out = Path(out_dir)
    model = load_run(model_dir)
    vol = file_volume_input(path)
    if _is_done(out, vol.volume_id) and not overwrite:
        return ExportResult(out, [], [vol.volume_id], {}, time.perf_counter() - t0)
    out.mkdir(parents=True, exist_ok=True)
    with _out_lock(out):
        export_volume(vol, model, out, settings=settings)
        write_index(out)
    return ExportResult(out, [vol.volume_id], [], {}, time.perf_counter() - t0)


def _export_task(store: str, volume_id: str, model_dir: str, out_dir: str, settings: dict[str, Any],
                 source_root: str | None) -> dict[str, Any]:
    """One volume of a store (a Dask task: loads the model in the worker)."""
    import torch

    torch.set_num_threads(1)
    model = load_run(model_dir)
    return export_volume(store_volume_input(store, volume_id), model, out_dir, settings=MapSettings(**settings),
                         source_root=source_root)


def export_store(store: str | Path, model_dir: str | Path, out_dir: str | Path, *,
                 volume_ids: Sequence[str] | None = None, settings: MapSettings | None = None,
                 workers: int | None = 0, scheduler: str | None = None, overwrite: bool = False,
                 source_root: str | Path | None = None,
                 progress: Callable[[str, str], None] | None = None) -> ExportResult:
    """Export every (or the chosen) complete volume of a store; resumable; writes the index.

    Parameters
    ----------
    store : str or Path
        An ingested store.
    model_dir : str or Path
        A trained run (``octpipe train``) or a bundled model folder.
    out_dir : str or Path
        Output folder.
    volume_ids : sequence of str, optional
        Only these volumes.
    settings : MapSettings, optional
        Windows, weighting, precision.
    workers : int or None, default 0
        0: in this process; N: a local Dask cluster of N single-threaded workers; None: all cores.
    scheduler : str, optional
        Address of an existing dask.distributed scheduler.
    overwrite : bool
        Redo volumes already exported.
    source_root : str or Path, optional
        Folder the store was ingested from; lets DICOM sources be found again (their path in
        the store is relative to it) so that the DICOM outputs can reference them.
    progress : callable, optional
        Called with ``(volume_id, status)`` after each volume (``done``, ``skipped``, ``failed``).

    Returns
    -------
    ExportResult
    """
    from octpipe.store import volume_ids as store_volume_ids

    t0 = time.perf_counter()
    settings = settings or MapSettings()
    out = Path(out_dir)
    known = store_volume_ids(store)
    if not known:
        raise OctpipeError("the store has no complete volumes to export", store)
    chosen = list(volume_ids) if volume_ids else known
    unknown = sorted(set(chosen) - set(known))
    if unknown:
        raise OctpipeError(f"no complete volume {', '.join(unknown)} in the store", store)
    load_run(model_dir)  # fail early on a missing or unreadable model
    out.mkdir(parents=True, exist_ok=True)
    with _out_lock(out):
        return _export_store_locked(store, model_dir, out, chosen, settings, workers, scheduler, overwrite,
                                    source_root, progress, t0)


@contextmanager
def _out_lock(out: Path) -> Iterator[None]:
    """One export at a time per output folder; clears what a killed export left in staging."""
    fd = os.open(out / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise OctpipeError("another octpipe export is writing this folder; wait for it to finish", out) from None
        for stale in out.glob(".staging-*"):
            shutil.rmtree(stale, ignore_errors=True)
        yield
    finally:
        os.close(fd)


def _export_store_locked(store, model_dir, out: Path, chosen: list[str], settings: MapSettings, workers, scheduler,
                         overwrite: bool, source_root, progress, t0: float) -> ExportResult:
    todo = [v for v in chosen if overwrite or not _is_done(out, v)]
    skipped = [v for v in chosen if v not in todo]
    for v in skipped:
        if progress:
            progress(v, "skipped")
    done: list[str] = []
    failed: dict[str, str] = {}
    root = None if source_root is None else str(source_root)
    args = (str(store), str(model_dir), str(out), asdict(settings), root)

    def finish(vid: str, exc: BaseException | None) -> None:
        if exc is None:
            done.append(vid)
        else:
            failed[vid] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if progress:
            progress(vid, "failed" if exc else "done")

    if todo and workers == 0 and scheduler is None:
        model = load_run(model_dir)
        for vid in todo:
            try:
                export_volume(store_volume_input(store, vid), model, out, settings=settings, source_root=root)
                finish(vid, None)
            except (OctpipeError, ValueError, OSError) as exc:
                finish(vid, exc)
    elif todo:
        _export_on_dask(todo, args, workers, scheduler, finish)
    write_index(out)
    return ExportResult(out, done, skipped, failed, time.perf_counter() - t0)


def _export_on_dask(todo: list[str], args: tuple, workers: int | None, scheduler: str | None,
                    finish: Callable[[str, BaseException | None], None]) -> None:
    from dask.distributed import Client, as_completed

    from octpipe.pipeline import local_cluster

    cluster = None
    if scheduler is None:
        cluster = local_cluster(workers or os.cpu_count() or 1)
    client = Client(scheduler or cluster)
    try:
        store, model_dir, out, settings, root = args
        futures = {client.submit(_export_task, store, vid, model_dir, out, settings, root, key=f"export-{vid}",
                                 pure=False): vid for vid in todo}
        for fut in as_completed(futures):
            vid = futures[fut]
            try:
                fut.result()
                finish(vid, None)
            except Exception as exc:  # noqa: BLE001 - a failed volume is recorded, the batch goes on
                finish(vid, exc)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def write_index(out_dir: str | Path) -> tuple[Path, Path]:
    """The screening index of an export folder: ``index.csv`` and ``index.html``, ranked by volume score."""
    from octpipe.export.report import write_index_html

    out = Path(out_dir)
    rows = []
    for summary_path in sorted(out.glob(f"*/{SUMMARY_NAME}")):
        s = json.loads(summary_path.read_text(encoding="utf-8"))
        rows.append(s)
    rows.sort(key=lambda s: -float(s["volume_score"]))
    header = ["rank", "volume_id", "volume_score", "volume_percentile", "anomalous_window_fraction",
              "anomalous_voxel_fraction", "laterality", "label", "qc_flags", "report"]
    csv_rows = [[i + 1, s["volume_id"], f"{s['volume_score']:.6g}", _fmt(s.get("volume_percentile")),
                 _fmt(s.get("anomalous_window_fraction")), _fmt(s.get("anomalous_voxel_fraction")),
                 s.get("laterality") or "", "" if s.get("label") is None else s["label"],
                 ";".join(s.get("qc_flags", [])), f"{s['volume_id']}/report.html"] for i, s in enumerate(rows)]
    csv_path = out / "index.csv"
    _write_csv(csv_path, header, csv_rows)
    html_path = write_index_html(out / "index.html", rows)
    return csv_path, html_path


def _fmt(v: Any) -> str:
    return "" if v is None else f"{float(v):.4g}"

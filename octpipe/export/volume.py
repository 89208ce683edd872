"""One volume's export: its maps scored and every output written into one folder.

:func:`export_volume` computes a prepared volume's anomaly maps (:func:`~octpipe.export.anomaly.compute_anomaly`)
and writes, under a staging name renamed into place when complete: the NIfTI maps and their JSON
sidecar, the B-scan overlays and GIF, the en-face maps with the ETDRS sectors, ``windows.csv``, the
DICOM files and ``report.html``, then ``summary.json`` (:data:`SUMMARY_NAME`) last. The runners that
feed it files, folders and stores are in :mod:`octpipe.export.run`.
"""

from __future__ import annotations

import csv
import json
import os
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from octpipe import __version__
from octpipe.edge import staged_dir
from octpipe.export.anomaly import MapSettings, VolumeAnomaly, compute_anomaly
from octpipe.export.enface import enface_projections, etdrs_labels, find_fovea, physical_coordinates, sector_table
from octpipe.export.figures import write_enface_figure, write_gif, write_overlays
from octpipe.io.nifti import write_nifti
from octpipe.models.fanogan.model import FAnoGANModel
from octpipe.preprocess.prepare import PreparedVolume

__all__ = ["export_volume", "model_identity", "geometry_spacing", "SUMMARY_NAME"]

#: File whose presence marks a volume's export as complete.
SUMMARY_NAME = "summary.json"


def _model_digest(run: Path | None) -> str | None:
    """sha256 of the run's ``model.pt`` (which model made a map, without naming where it lay)."""
    if run is None or not (run / "model.pt").is_file():
        return None
    from octpipe.io._common import file_sha256

    return file_sha256(run / "model.pt")


def model_identity(model: FAnoGANModel) -> dict[str, Any]:
    """Model id, digest and key configuration for sidecars and reports (no file-system path)."""
    run = model.run_dir
    card = None
    if run is not None:
        for name in ("MODEL_CARD.md", "README.md"):
            if (run / name).is_file():
                card = (run / name).read_text(encoding="utf-8")
                break
    m = model.config.model
    return {
        "id": run.name if run is not None else "in-memory",  # the folder's name: a path can name its user
        "sha256": _model_digest(run),
        "latent_dim": m.latent_dim, "dim": m.dim, "image_size": m.image_size, "kappa": model.kappa,
        "encoder_mode": model.config.encoder.mode,
        "calibration_n": None if model.calibration is None else model.calibration.get("n"),
        "preprocessing": model.preprocess_source,
        "card": card,
    }


def geometry_spacing(spacing_mm: Sequence[float]) -> tuple[tuple[float, float, float], str | None]:
    """The spacing for the NIfTI/DICOM geometry: the B-scan spacing made nominal when it is 0.

    A single B-scan has no spacing between B-scans (0 in the file), but an affine and a DICOM
    slice thickness must be > 0: the lateral spacing is used instead, and the note says so.

    Examples
    --------
    >>> geometry_spacing((0.0, 0.0039, 0.0118))[0]
    (0.0118, 0.0039, 0.0118)
    >>> geometry_spacing((0.12, 0.0039, 0.0118))
    ((0.12, 0.0039, 0.0118), None)
    """
    dz, dy, dx = (float(v) for v in spacing_mm)
    if np.isfinite(dz) and dz > 0:
        return (dz, dy, dx), None
    note = (f"no B-scan spacing in the source (0 mm, as for a single B-scan): the NIfTI and DICOM geometry use a "
            f"nominal slice thickness of {dx:g} mm (the lateral spacing)")
    return (dx, dy, dx), note


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
    # runs in a writer thread: write_nifti is imported at module level, because importing it
    # imports pydicom, which the DICOM writer imports in the calling thread at the same time, and
    # concurrent first imports of a package can leave it partially initialised
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


#: ``{source root: {sha256: DICOM file}}``, built once per root and process.
_DICOM_BY_CONTENT: dict[Path, dict[str, Path]] = {}


def _dicom_files_by_content(root: Path) -> dict[str, Path]:
    """Every DICOM file under ``root`` by the sha256 of its bytes (the store's record of a source)."""
    from octpipe.errors import OctpipeError
    from octpipe.io._common import file_sha256
    from octpipe.io.detect import detect_format

    root = root.resolve()
    if root not in _DICOM_BY_CONTENT:
        found: dict[str, Path] = {}
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            try:
                if detect_format(path).startswith("dicom"):
                    found.setdefault(file_sha256(path), path)
            except (OctpipeError, OSError):
                continue
        _DICOM_BY_CONTENT[root] = found
    return _DICOM_BY_CONTENT[root]


def _source_dicom(vol: PreparedVolume, source_root: Path | None) -> Path | None:
    """The source DICOM file, when the volume came from one and it can be found.

    Under ``source_root`` the file is found by its content (the sha256 the store records), so
    the folder given to ingest, its parent, or any folder holding the files works, and so does
    a store whose paths are hashed.
    """
    if not str(vol.info.get("format") or "").startswith("dicom"):
        return None
    src = vol.source_path
    if src is None and source_root is not None:
        src = _dicom_files_by_content(Path(source_root)).get(str(vol.info.get("sha256", "")))
    return Path(src) if src and Path(src).is_file() else None


def export_volume(vol: PreparedVolume, model: FAnoGANModel, out_dir: str | Path, *,
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
    # the NIfTI maps (gzip) and the GIF are written by background threads while the pictures, tables
    # and DICOM are made here (zlib and the GIF encoder release the GIL); leaving the block waits for them
    with staged_dir(final, under=Path(out_dir), prefix=".staging-") as staging, \
            ThreadPoolExecutor(max_workers=2, thread_name_prefix="octpipe-export") as writers:
        result = compute_anomaly(vol, model, settings)
        t_model = time.perf_counter() - t0
        source_spacing = tuple(float(v) for v in vol.spacing_mm)
        spacing, geometry_note = geometry_spacing(source_spacing)
        laterality = vol.laterality
        order = vol.bscan_order
        centre = find_fovea(result.layers[0], result.layers[1], spacing)
        mx, mean = enface_projections(result.residual, result.inside)
        _, y_mm = physical_coordinates(mx.shape, spacing, centre, laterality, order)
        meta = {"laterality": laterality, "y_mm": None if geometry_note else y_mm[:, 0]}

        background = [writers.submit(_write_nifti, staging, result, spacing)]
        frames = write_overlays(staging / "overlays", result.background, result.residual, result.layers, meta)
        background.append(writers.submit(write_gif, staging / "anomaly.gif", frames))
        enface_note = None
        sectors: list[dict[str, Any]] = []
        if mx.shape[0] < 2 or geometry_note:
            enface_note = ("no en-face map or ETDRS sectors: " + ("a single B-scan has no extent between "
                           "B-scans" if mx.shape[0] < 2 else "the source has no B-scan spacing"))
        else:
            labels = etdrs_labels(mx.shape, spacing, centre, laterality, order)
            sectors = sector_table(mean, labels, spacing)
            title = f"volume {vol.volume_id}: mean anomaly over depth"
            write_enface_figure(staging / "enface.png", mean, spacing_mm=spacing, centre=centre,
                                laterality=laterality, bscan_order=order, sectors=sectors, title=title)
            write_enface_figure(staging / "enface-max.png", mx, spacing_mm=spacing, centre=centre,
                                laterality=laterality, bscan_order=order, sectors=sector_table(mx, labels, spacing),
                                title=f"volume {vol.volume_id}: maximum anomaly over depth")
            _write_csv(staging / "sectors.csv", ["sector", "mean", "max", "covered_mm2", "covered_fraction"],
                       [[r["sector"], r["mean"], r["max"], r["covered_mm2"], r["covered_fraction"]] for r in sectors])
        names = list(result.window_scores)
        _write_csv(staging / "windows.csv", ["bscan", "row", "col", "retina_fraction", *names],
                   [[*map(int, result.windows[i]), f"{result.window_retina[i]:.3f}",
                     *(f"{result.window_scores[n][i]:.6g}" for n in names)] for i in range(len(result.windows))])

        identity = model_identity(model)
        summary = dict(result.summary)
        summary.update({
            "status": "ok", "laterality": laterality, "bscan_order": order, "source_format": vol.info.get("format"),
            "label": vol.info.get("label"), "qc_flags": list(vol.qc.get("flags", [])),  # type: ignore[call-overload]
            "fovea": centre.to_dict(), "sectors": sectors, "enface_note": enface_note,
            "geometry_note": geometry_note, "preprocessing_notes": list(vol.notes),
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
            "laterality": laterality, "bscan_order": order, "spacing_mm": list(source_spacing),
            "spacing_source": vol.spacing_source,
            "geometry_spacing_mm": list(spacing), "geometry_note": geometry_note, "enface_note": enface_note,
            "source_shape": list(vol.source_shape), "column_factor": vol.factor,
            "flattening": {**vol.flatten_geometry, "preprocess": vol.preprocess or None},
            "preprocessing": {"applied": vol.preprocess or None, "model": model.preprocess_config().to_dict(),
                              "model_source": model.preprocess_source,
                              "model_flatten": (model.preprocess or {}).get("flatten"),
                              "notes": list(vol.notes)},
            "windows": {"size": model.image_size, "stride": settings.stride, "weighting": settings.weighting},
            "precision": settings.precision, "summary": result.summary,
        }
        _write_json(staging / "anomaly.json", sidecar)
        if dicom:
            root = Path(source_root) if source_root is not None else None
            summary["dicom"] = _write_dicom(staging, vol, result, settings, spacing, root, np.stack(frames))
        for job in background:
            job.result()  # a background writer's error is raised here, before the folder is kept
        summary["seconds_model"] = round(t_model, 3)
        if report:
            write_volume_report(staging / "report.html", summary, identity, staging)
        summary["seconds"] = round(time.perf_counter() - t0, 3)
        _write_json(staging / SUMMARY_NAME, summary)
    return summary


def _top_bscans(result: VolumeAnomaly, k: int) -> list[int]:
    """B-scans with the highest window score A (ties: lowest index first)."""
    a = result.window_scores["A"]
    b = result.windows[:, 0]
    n = int(b.max()) + 1 if len(b) else 0
    best = np.full(n, -np.inf)
    np.maximum.at(best, b, a)
    return [int(i) for i in np.argsort(-best, kind="stable")[:k]]


def _write_dicom(out: Path, vol: PreparedVolume, result: VolumeAnomaly, settings: MapSettings,
                 spacing: tuple[float, float, float], source_root: Path | None, frames: np.ndarray) -> dict[str, Any]:
    from octpipe.export.dicom import write_dicom_exports

    got = write_dicom_exports(out / "dicom", anomaly_map=result.residual, threshold=settings.threshold_z,
                              spacing_mm=spacing, laterality=vol.laterality, pseudonym=vol.volume_id,
                              source_dicom=_source_dicom(vol, source_root), overlays=frames)
    return {"files": [Path(p).relative_to(out).as_posix() for p in got.paths], "note": got.note}


# --------------------------------------------------------------------------------------------
# Inputs: a file or a store
# --------------------------------------------------------------------------------------------

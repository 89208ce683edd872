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
volumes already done, and writes the screening index ``index.html`` and ``index.csv``. A volume
that fails is listed there with status ``failed`` and its one-line reason (kept in
``failed.json`` until a rerun exports it) and the rest goes on.

Inputs (:func:`export_path`): an OCT file (every series of it), a folder of B-scan images (one
volume when :func:`octpipe.inputs.discover_inputs` / ``classify_image_folder`` says it is one,
else one export per image, listed in the index), or a store (:func:`export_store`). A single
input that cannot be read or prepared raises an :class:`~octpipe.errors.OctpipeError` naming the
file and the reason before anything is written.

The one-volume export (:func:`~octpipe.export.volume.export_volume`, re-exported here) is in
:mod:`octpipe.export.volume`; this module prepares its inputs and runs it over files, folders and
stores.

Preprocessing contract: a file or folder is prepared with the preprocessing recorded in the model
bundle (:meth:`FAnoGANModel.preprocess_config`, the store the model was trained on); a store's
volumes must have been prepared with it too (:func:`check_store_preprocessing`), unless the
caller allows the mismatch, which is then recorded in every sidecar.

A single B-scan (or a file without B-scan spacing) has no extent between B-scans: the NIfTI and
DICOM geometry use a nominal slice thickness equal to the lateral spacing (``geometry_spacing_mm``
and ``geometry_note`` in the sidecar), and the en-face map and ETDRS sectors are not written.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from octpipe.edge import folder_lock, run_tasks
from octpipe.errors import OctpipeError
from octpipe.export.anomaly import MapSettings
from octpipe.export.volume import (  # the one-volume export, re-exported
    SUMMARY_NAME,
    _dicom_files_by_content,
    _write_csv,
    _write_json,
    export_volume,
    geometry_spacing,
    model_identity,
)
from octpipe.models.fanogan.checkpoint import load_run, preprocessing_differences
from octpipe.models.fanogan.model import FAnoGANModel
from octpipe.preprocess.prepare import PreparedVolume
from octpipe.privacy import volume_id as _volume_id

if TYPE_CHECKING:
    from octpipe.preprocess.prepare import PreprocessConfig

__all__ = ["ExportResult", "export_volume", "export_file", "export_path", "export_store", "model_identity",
           "file_volume_input", "file_volume_inputs", "check_store_preprocessing", "geometry_spacing",
           "SUMMARY_NAME", "FAILED_NAME"]

#: Volumes of an export folder that failed, with the reason (listed in the index until exported).
FAILED_NAME = "failed.json"

Spacing = tuple[float | None, float | None, float | None]


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
    notes : list of str
        One-line remarks for the user (inputs ignored, preprocessing mismatch allowed, ...).
    names : dict of str to str
        Volume id to the input's file name, for the console only (file names can carry patient
        names: never written to the export).
    """

    out_dir: Path
    done: list[str]
    skipped: list[str]
    failed: dict[str, str]
    seconds: float
    notes: list[str] = field(default_factory=list)
    names: dict[str, str] = field(default_factory=dict)




def _no_bm_reason(reason: str) -> str | None:
    """The user's reason when flattening found no BM (the segmentation found no retina)."""
    import re

    m = re.search(r"B-scan (\d+) has no BM position", reason)
    return f"no retina found (segmentation found no BM in B-scan {m.group(1)})" if m else None


def _prepare_error(exc: Exception, path: Path) -> OctpipeError:
    """A preprocessing failure as a one-line :class:`OctpipeError` naming the file."""
    if isinstance(exc, OctpipeError):
        return exc if exc.path is not None else OctpipeError(exc.reason, path)
    text = " ".join(str(exc).split()) or type(exc).__name__
    return OctpipeError(_no_bm_reason(text) or f"preprocessing failed: {text}", path)


def _prepared_input(vol: Any, config: PreprocessConfig, *, path: Path, sha: str, series: int,
                    notes: Sequence[str] = ()) -> PreparedVolume:
    """One series prepared for export: its id from the source's hash, the path kept in memory only."""
    from octpipe.preprocess.prepare import prepare_volume

    try:
        prepared = prepare_volume(vol, config, volume_id=_volume_id(sha, series))
    except (OctpipeError, ValueError, ArithmeticError, IndexError) as exc:
        raise _prepare_error(exc, path) from exc
    # the spacing preprocessing used (estimated from the retina when the file has none), else the file's
    spacing = prepared.spacing_mm
    if len(spacing) != 3 or not all(np.isfinite(spacing)) or min(spacing[1:]) <= 0:
        prepared = replace(prepared, spacing_mm=tuple(float(v) for v in vol.spacing_mm),
                           spacing_source=vol.spacing_source)
    return replace(prepared, notes=(*prepared.notes, *notes), source_path=path)


def _read_source(path: Path, *, format: str | None = None, spacing: Spacing | None = None) -> tuple[list, str]:
    """Every volume of a file or B-scan folder (the user's spacing applied) and the source's hash."""
    from octpipe.io import read_volumes
    from octpipe.io._common import file_sha256
    from octpipe.volume import override_spacing

    if not path.exists():
        raise OctpipeError("no such file or folder", path)
    volumes = read_volumes(path, format=format)
    if path.is_dir():
        prov = volumes[0].provenance
        sha = prov.sha256 if prov is not None and prov.sha256 else _folder_digest(path)
    else:
        try:
            sha = file_sha256(path)
        except OSError as exc:
            raise OctpipeError(f"cannot read: {exc.strerror or exc}", path) from None
    return [override_spacing(v, spacing) for v in volumes], sha


def _folder_digest(folder: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    for p in sorted(folder.iterdir()):
        if p.is_file():
            digest.update(p.name.encode() + b"\0" + str(p.stat().st_size).encode() + b"\0")
    return digest.hexdigest()


def file_volume_inputs(path: str | Path, *, config: PreprocessConfig | None = None, spacing: Spacing | None = None,
                       format: str | None = None, skip: Callable[[str], bool] | None = None,
                       notes: Sequence[str] = ()) -> tuple[list[PreparedVolume], list[str]]:
    """Read every series of an OCT file (or B-scan folder) and prepare it as the model's training data was.

    Parameters
    ----------
    path : str or Path
        An OCT file, or a folder of B-scan images read as one volume.
    config : PreprocessConfig, optional
        The preprocessing (the model's: :meth:`FAnoGANModel.preprocess_config`); default
        the paper's.
    spacing : tuple of 3 (float or None), optional
        The user's spacing Z,Y,X in mm (``--spacing-mm``); None fields keep the file's.
    format : str, optional
        Skip format detection.
    skip : callable, optional
        Called with each volume id; True leaves that series out (already exported).
    notes : sequence of str
        Remarks recorded in every sidecar.

    Returns
    -------
    inputs : list of PreparedVolume
        The prepared series not skipped.
    skipped : list of str
        Volume ids left out by ``skip``.

    Raises
    ------
    OctpipeError
        One line naming the file: unreadable, or preprocessing failed (e.g. ``no retina found``).
    """
    from octpipe.preprocess.prepare import PreprocessConfig

    p = Path(path)
    config = config or PreprocessConfig()
    volumes, sha = _read_source(p, format=format, spacing=spacing)
    out: list[PreparedVolume] = []
    skipped: list[str] = []
    for series, vol in enumerate(volumes):
        if skip is not None and skip(_volume_id(sha, series)):
            skipped.append(_volume_id(sha, series))
            continue
        out.append(_prepared_input(vol, config, path=p, sha=sha, series=series, notes=notes))
    return out, skipped


def file_volume_input(path: str | Path, *, series: int = 0, config: PreprocessConfig | None = None,
                      spacing: Spacing | None = None) -> PreparedVolume:
    """Read and prepare one series of an OCT file exactly as ``octpipe ingest`` does with ``config``.

    Parameters
    ----------
    path : str or Path
        An OCT file or a B-scan folder.
    series : int
        Which series of a multi-series file.
    config : PreprocessConfig, optional
        Default: the paper's preprocessing.
    spacing : tuple of 3 (float or None), optional
        The user's spacing (``--spacing-mm``).

    Raises
    ------
    OctpipeError
        Unreadable file, no such series, or preprocessing failed.
    """
    from octpipe.preprocess.prepare import PreprocessConfig

    p = Path(path)
    volumes, sha = _read_source(p, spacing=spacing)
    if not 0 <= series < len(volumes):
        raise OctpipeError(f"no series {series}: the file holds {len(volumes)}", p)
    return _prepared_input(volumes[series], config or PreprocessConfig(), path=p, sha=sha, series=series)


def _is_done(out_dir: Path, volume_id: str) -> bool:
    return (out_dir / volume_id / SUMMARY_NAME).is_file()


def _prepare_out(out: Path) -> bool:
    """Create the output folder (True when it did not exist); a file in its place is an error."""
    if out.exists() and not out.is_dir():
        raise OctpipeError("is a file, not an output folder", out)
    existed = out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OctpipeError(f"cannot create the output folder: {exc.strerror or exc}", out) from None
    return not existed


def _remove_if_empty(out: Path) -> None:
    """Remove an output folder this run created when it holds nothing but the lock."""
    try:
        if out.is_dir() and all(p.name == ".lock" for p in out.iterdir()):
            shutil.rmtree(out, ignore_errors=True)
    except OSError:
        pass


def _model_notes(model: FAnoGANModel) -> list[str]:
    from octpipe.models.fanogan.model import DEFAULT_PREPROCESS_SOURCE

    if model.preprocess_source == DEFAULT_PREPROCESS_SOURCE:
        return ["the model bundle records no preprocessing: the default PreprocessConfig was applied"]
    return []


def _flatten_notes(vol: PreparedVolume, model: FAnoGANModel) -> list[str]:
    """A remark when the flattened area's rows differ from the training data's (another axial spacing)."""
    want = (model.preprocess or {}).get("flatten")
    have = vol.flatten_geometry
    if not want or (want.get("height"), want.get("bm_row")) == (have.get("height"), have.get("bm_row")):
        return []
    return [f"flattened area {have.get('height')} rows (BM at {have.get('bm_row')}) vs the training data's "
            f"{want.get('height')} (BM at {want.get('bm_row')}): the axial spacing differs from the training data"]


def _with_notes(vol: PreparedVolume, notes: list[str]) -> PreparedVolume:
    return replace(vol, notes=(*vol.notes, *notes)) if notes else vol


def _export_one(vol: PreparedVolume, model: FAnoGANModel, out: Path, settings: MapSettings, path: Path,
                source_root: str | Path | None = None) -> dict[str, Any]:
    """:func:`export_volume`, its failures as one-line errors naming the source."""
    try:
        return export_volume(_with_notes(vol, _flatten_notes(vol, model)), model, out, settings=settings,
                             source_root=source_root)
    except OctpipeError as exc:
        raise exc if exc.path is not None else OctpipeError(exc.reason, path) from exc
    except (ValueError, OSError, RuntimeError, ArithmeticError, IndexError) as exc:
        text = " ".join(str(exc).split()) or type(exc).__name__
        raise OctpipeError(f"export failed: {type(exc).__name__}: {text}", path) from exc


def export_file(path: str | Path, model_dir: str | Path, out_dir: str | Path, *,
                settings: MapSettings | None = None, overwrite: bool = False, spacing: Spacing | None = None,
                format: str | None = None, model: FAnoGANModel | None = None) -> ExportResult:
    """Export one OCT file, every series of it (read, prepared with the model's preprocessing, mapped, written).

    Parameters
    ----------
    path : str or Path
        An OCT file, or a folder of B-scan images read as one volume.
    model_dir : str or Path
        A trained run or bundled model folder.
    out_dir : str or Path
        Output folder (one sub-folder per series, and the index).
    settings : MapSettings, optional
        Windows, weighting, precision.
    overwrite : bool
        Redo series already exported.
    spacing : tuple of 3 (float or None), optional
        The user's spacing Z,Y,X in mm (``--spacing-mm``).
    format : str, optional
        Skip format detection.
    model : FAnoGANModel, optional
        The loaded model (else loaded from ``model_dir``).

    Returns
    -------
    ExportResult

    Raises
    ------
    OctpipeError
        One line naming the file and the reason; nothing is left that looks exported.
    """
    t0 = time.perf_counter()
    settings = settings or MapSettings()
    out = Path(out_dir)
    p = Path(path)
    model = model or load_run(model_dir)
    vols, skipped = file_volume_inputs(p, config=model.preprocess_config(), spacing=spacing, format=format,
                                       skip=None if overwrite else (lambda vid: _is_done(out, vid)),
                                       notes=_model_notes(model))
    if not vols:
        return ExportResult(out, [], skipped, {}, time.perf_counter() - t0)
    created = _prepare_out(out)
    done: list[str] = []
    try:
        with _out_lock(out):
            for vol in vols:
                _export_one(vol, model, out, settings, p)
                done.append(vol.volume_id)
            _update_failed(out, {}, done)
            write_index(out)
    except BaseException:
        if created:
            _remove_if_empty(out)
        raise
    return ExportResult(out, done, skipped, {}, time.perf_counter() - t0, names=dict.fromkeys(done, p.name))


def _folder_inputs(folder: Path, images: str) -> tuple[list[Any], list[dict[str, object]]]:
    """The OCT inputs directly in ``folder``, as ``octpipe info`` / ``ingest`` take them.

    One call to :func:`octpipe.inputs.discover_inputs` (which asks
    ``classify_image_folder`` whether the images are one volume or independent B-scans).
    """
    from octpipe.inputs import discover_inputs

    return discover_inputs([folder], images=images, recursive=False)


def export_path(source: str | Path, model_dir: str | Path, out_dir: str | Path, *,
                settings: MapSettings | None = None, overwrite: bool = False, spacing: Spacing | None = None,
                images: str = "auto", progress: Callable[[str, str], None] | None = None) -> ExportResult:
    """Export a file, or a folder of B-scan images (one volume, or one export per image).

    Parameters
    ----------
    source : str or Path
        An OCT file or a folder (not a store: see :func:`export_store`).
    model_dir, out_dir, settings, overwrite, spacing
        As :func:`export_file`.
    images : {"auto", "volume", "bscans"}
        How a folder's images are taken (as ``octpipe info --images``).
    progress : callable, optional
        Called with ``(name, status)`` after each input of a folder of independent B-scans.

    Returns
    -------
    ExportResult
        For a folder of independent B-scans, ``failed`` lists the images that failed (also in the
        index, status ``failed``); the others are exported.

    Raises
    ------
    OctpipeError
        A file or single-volume folder that cannot be exported, or a folder without B-scans.
    """
    src = Path(source)
    if not src.exists():
        raise OctpipeError("no such file or folder", src)
    if not src.is_dir():
        return export_file(src, model_dir, out_dir, settings=settings, overwrite=overwrite, spacing=spacing)
    inputs, rows = _folder_inputs(src, images)
    failed_rows = [r for r in rows if r.get("status") == "failed"]
    if not inputs:
        if failed_rows:
            raise OctpipeError(str(failed_rows[0].get("error")), src)
        try:
            nested = any(p.is_dir() for p in src.iterdir())
        except OSError as exc:
            raise OctpipeError(f"cannot read the folder: {exc.strerror or exc}", src) from None
        sub = " (it has sub-folders: export each, or ingest the tree into a store)" if nested else ""
        raise OctpipeError(f"no OCT file or B-scan image in the folder{sub}", src)
    if len(inputs) == 1 and not failed_rows:
        item = inputs[0]
        return export_file(item.path, model_dir, out_dir, settings=settings, overwrite=overwrite, spacing=spacing,
                           format=item.format)
    return _export_inputs(src, inputs, rows, model_dir, Path(out_dir), settings or MapSettings(), overwrite,
                          spacing, progress)


def _input_id(path: Path) -> str:
    """The volume id a failed input is listed under (series 0 of its content hash)."""
    from octpipe.io._common import file_sha256

    try:
        sha = file_sha256(path) if path.is_file() else _folder_digest(path)
    except OSError:
        sha = _folder_digest(path.parent) + path.name
    return _volume_id(sha, 0)


def _export_inputs(folder: Path, inputs: list[Any], rows: list[dict[str, object]], model_dir: str | Path,
                   out: Path, settings: MapSettings, overwrite: bool, spacing: Spacing | None,
                   progress: Callable[[str, str], None] | None) -> ExportResult:
    """Every input of a folder of independent B-scans: failures recorded, the rest goes on."""
    t0 = time.perf_counter()
    model = load_run(model_dir)
    config = model.preprocess_config()
    notes = _model_notes(model)
    done: list[str] = []
    skipped: list[str] = []
    failed: dict[str, str] = {}
    names: dict[str, str] = {}
    ignored = [r for r in rows if r.get("status") == "skipped"]
    report = [f"ignored {len(ignored)} file(s) that are not B-scans (e.g. {ignored[0].get('error')})"
              ] if ignored else []
    for row in rows:
        if row.get("status") == "failed":
            vid = _input_id(folder / Path(str(row.get("path", ""))).name)
            failed[vid] = str(row.get("error"))
            names[vid] = Path(str(row.get("path", ""))).name
    _prepare_out(out)
    with _out_lock(out):
        for item in inputs:
            p = Path(item.path)
            try:
                vols, skip = file_volume_inputs(p, config=config, spacing=spacing, format=item.format, notes=notes,
                                                skip=None if overwrite else (lambda vid: _is_done(out, vid)))
                skipped.extend(skip)
                names.update(dict.fromkeys(skip, p.name))
                for vol in vols:
                    names[vol.volume_id] = p.name
                    _export_one(vol, model, out, settings, p)
                    done.append(vol.volume_id)
                    failed.pop(vol.volume_id, None)
                status = "done"
            except OctpipeError as exc:
                vid = _input_id(p)
                names[vid] = p.name
                failed[vid] = exc.reason
                status = "failed"
            if progress:
                progress(p.name, status)
        _update_failed(out, failed, done, source=folder)
        write_index(out)
    return ExportResult(out, done, skipped, failed, time.perf_counter() - t0, notes=notes + report, names=names)


def check_store_preprocessing(store: str | Path, volume_ids: Sequence[str], model: FAnoGANModel, *,
                              allow_mismatch: bool = False) -> dict[str, list[str]]:
    """Refuse a store whose volumes were prepared otherwise than the model's training data.

    Parameters
    ----------
    store : str or Path
        The store.
    volume_ids : sequence of str
        The volumes to export.
    model : FAnoGANModel
        The model (its :attr:`~FAnoGANModel.preprocess` record; defaults when it has none).
    allow_mismatch : bool
        Go on anyway: the differences are returned (and recorded in the sidecars).

    Returns
    -------
    dict of str to list of str
        Volume id to its differences (``"name STORE vs MODEL"``), only for volumes that differ.

    Raises
    ------
    OctpipeError
        ``store preprocessing differs from the model's: ...`` when a volume differs and
        ``allow_mismatch`` is false.
    """
    from octpipe.store import read_volume_attrs

    want = model.preprocess_config().to_dict()
    out: dict[str, list[str]] = {}
    for vid in volume_ids:
        attrs = read_volume_attrs(store, vid)
        have = attrs.get("preprocess")
        diff = (["preprocess: the volume records no preprocessing settings"] if have is None
                else preprocessing_differences(have, want))
        if diff:
            out[vid] = diff
    if out and not allow_mismatch:
        first = next(iter(out.values()))
        n = f" ({len(out)} of {len(volume_ids)} volumes)" if len(volume_ids) > 1 else ""
        assumed = " (the model records none; defaults assumed)" if _model_notes(model) else ""
        raise OctpipeError(f"store preprocessing differs from the model's{assumed}{n}: {'; '.join(first)}; "
                           f"re-ingest with the model's settings or pass --allow-preprocessing-mismatch", store)
    return out


def _store_volume(store: str | Path, volume_id: str, model: FAnoGANModel, notes: Sequence[str]) -> PreparedVolume:
    from octpipe.store import read_prepared

    vol = read_prepared(store, volume_id)
    return _with_notes(vol, [*notes, *_flatten_notes(vol, model)])


def _export_task(volume_id: str, store: str, model_dir: str, out_dir: str, settings: dict[str, Any],
                 source_root: str | None, notes: dict[str, list[str]]) -> dict[str, Any]:
    """One volume of a store (a Dask task: loads the model in the worker); ``notes`` per volume id."""
    import torch

    torch.set_num_threads(1)
    model = load_run(model_dir)
    return export_volume(_store_volume(store, volume_id, model, notes.get(volume_id, [])), model, out_dir,
                         settings=MapSettings(**settings), source_root=source_root)


def export_store(store: str | Path, model_dir: str | Path, out_dir: str | Path, *,
                 volume_ids: Sequence[str] | None = None, settings: MapSettings | None = None,
                 workers: int | None = 0, scheduler: str | None = None, overwrite: bool = False,
                 source_root: str | Path | None = None,
                 progress: Callable[[str, str], None] | None = None,
                 allow_preprocessing_mismatch: bool = False) -> ExportResult:
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
    allow_preprocessing_mismatch : bool
        Export volumes prepared otherwise than the model's training data (the differences are
        recorded in their sidecars) instead of refusing (:func:`check_store_preprocessing`).

    Returns
    -------
    ExportResult
        A volume that fails is in ``failed`` (and in the index, status ``failed``); the rest goes on.

    Raises
    ------
    OctpipeError
        No such volumes, an unreadable model, or (without ``allow_preprocessing_mismatch``) the
        store's preprocessing differs from the model's.
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
    model = load_run(model_dir)  # fail early on a missing or unreadable model
    mismatch = check_store_preprocessing(store, chosen, model, allow_mismatch=allow_preprocessing_mismatch)
    notes = {vid: [f"preprocessing differs from the model's (allowed): {'; '.join(d)}"] for vid, d in mismatch.items()}
    _prepare_out(out)
    with _out_lock(out):
        result = _export_store_locked(store, model_dir, out, chosen, settings, workers, scheduler, overwrite,
                                      source_root, progress, t0, model, notes, bool(volume_ids))
    if mismatch:
        result.notes.append(f"{len(mismatch)} volume(s) were preprocessed differently from the model's training "
                            f"data (allowed): {'; '.join(next(iter(mismatch.values())))}")
    result.notes.extend(_model_notes(model))
    result.notes.extend(_dicom_source_notes(store, chosen, source_root))
    return result


def _dicom_source_notes(store: str | Path, chosen: list[str], source_root: str | Path | None) -> list[str]:
    """Say when DICOM-sourced volumes get Secondary Capture because their source file was not found."""
    from octpipe.store import read_volume_attrs

    attrs = {v: read_volume_attrs(store, v) for v in chosen}
    dicom = [v for v, a in attrs.items() if str(a.get("format") or "").startswith("dicom") and not a.get("source_path")]
    if not dicom:
        return []
    if source_root is None:
        return [f"{len(dicom)} volume(s) came from DICOM: pass --source-root (the folder given to ingest) for a "
                "Parametric Map and Segmentation that reference the source; Secondary Capture written instead"]
    index = _dicom_files_by_content(Path(source_root))
    missing = [v for v in dicom if str(attrs[v].get("sha256", "")) not in index]
    if not missing:
        return []
    return [f"{len(missing)} DICOM source(s) not found under --source-root (looked up by content); Secondary "
            "Capture written for them instead"]


def _out_lock(out: Path) -> AbstractContextManager[Path]:
    """One export at a time per output folder; clears what a killed export left in staging."""
    return folder_lock(out, command="export", stale=".staging-*",
                       busy="another octpipe export is writing this folder; wait for it to finish")


def _export_store_locked(store, model_dir, out: Path, chosen: list[str], settings: MapSettings, workers, scheduler,
                         overwrite: bool, source_root, progress, t0: float, model: FAnoGANModel,
                         notes: dict[str, list[str]], partial: bool) -> ExportResult:
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
            failed[vid] = _reason(exc)
        if progress:
            progress(vid, "failed" if exc else "done")

    if todo and workers == 0 and scheduler is None:
        for vid in todo:
            try:
                export_volume(_store_volume(store, vid, model, notes.get(vid, [])), model, out, settings=settings,
                              source_root=root)
                finish(vid, None)
            except Exception as exc:  # noqa: BLE001 - a failed volume is recorded, the batch goes on
                finish(vid, exc)
    elif todo:
        _export_on_dask(todo, args, workers, scheduler, finish, notes)
    _update_failed(out, failed, done, source=store, considered=chosen if partial else None)
    write_index(out)
    return ExportResult(out, done, skipped, failed, time.perf_counter() - t0)


def _reason(exc: BaseException) -> str:
    """One line for the index: an OctpipeError's message, else the exception's type and message."""
    if isinstance(exc, OctpipeError):  # the reason without the file name (file names can carry patient names)
        return " ".join(exc.reason.split()) or type(exc).__name__
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _source_key(source: str | Path) -> str:
    """A pseudonymous key of an export's source (a folder or store), so a rerun can replace its failures."""
    from octpipe.privacy import pseudonymous_id

    return pseudonymous_id("export-source", str(Path(source).resolve()))


def _load_failed(out: Path) -> dict[str, dict[str, str]]:
    path = out / FAILED_NAME
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {str(k): (dict(v) if isinstance(v, dict) else {"reason": str(v)}) for k, v in data.items()}


def _update_failed(out: Path, failed: dict[str, str], done: Sequence[str], *, source: str | Path | None = None,
                   considered: Sequence[str] | None = None) -> None:
    """Record this run's failures in ``failed.json``.

    Volumes exported since are dropped; so are the earlier failures of ``source`` (all of
    them, or only those in ``considered``): a rerun over a folder or store replaces its list.
    """
    key = None if source is None else _source_key(source)
    within = None if considered is None else set(considered)
    known = {vid: entry for vid, entry in _load_failed(out).items()
             if not (key is not None and entry.get("source") == key and (within is None or vid in within))}
    known.update({vid: {"reason": reason, **({"source": key} if key else {})} for vid, reason in failed.items()})
    known = {k: v for k, v in sorted(known.items()) if k not in done and not _is_done(out, k)}
    path = out / FAILED_NAME
    if known:
        _write_json(path, known)
    else:
        path.unlink(missing_ok=True)


def _export_on_dask(todo: list[str], args: tuple, workers: int | None, scheduler: str | None,
                    finish: Callable[[str, BaseException | None], None], notes: dict[str, list[str]]) -> None:
    store, model_dir, out, settings, root = args
    task = partial(_export_task, store=store, model_dir=model_dir, out_dir=out, settings=settings,
                   source_root=root, notes=notes)
    for vid, result in run_tasks(task, todo, workers=workers, scheduler=scheduler):
        finish(vid, result if isinstance(result, Exception) else None)


def write_index(out_dir: str | Path) -> tuple[Path, Path]:
    """The screening index of an export folder: ``index.csv`` and ``index.html``, ranked by volume score."""
    from octpipe.export.report import write_index_html

    out = Path(out_dir)
    rows = []
    for summary_path in sorted(out.glob(f"*/{SUMMARY_NAME}")):
        s = json.loads(summary_path.read_text(encoding="utf-8"))
        rows.append(s)
    rows.sort(key=lambda s: -float(s["volume_score"]))
    failed = _read_failed(out)
    header = ["rank", "volume_id", "volume_score", "volume_percentile", "percentile_among",
              "anomalous_window_fraction", "anomalous_voxel_fraction", "laterality", "label", "qc_flags", "report",
              "status", "reason"]
    csv_rows = [[i + 1, s["volume_id"], f"{s['volume_score']:.6g}", _fmt(s.get("volume_percentile")),
                 s.get("volume_percentile_reference", "normal patches" if s.get("calibrated") else ""),
                 _fmt(s.get("anomalous_window_fraction")), _fmt(s.get("anomalous_voxel_fraction")),
                 s.get("laterality") or "", "" if s.get("label") is None else s["label"],
                 ";".join(s.get("qc_flags", [])), f"{s['volume_id']}/report.html", "ok", ""]
                for i, s in enumerate(rows)]
    csv_rows += [["", vid, "", "", "", "", "", "", "", "", "", "failed", reason] for vid, reason in failed.items()]
    csv_path = out / "index.csv"
    _write_csv(csv_path, header, csv_rows)
    html_path = write_index_html(out / "index.html", rows, failed=failed)
    return csv_path, html_path


def _read_failed(out: Path) -> dict[str, str]:
    """Volume id to reason, from ``failed.json``, less the volumes exported since."""
    return {vid: str(entry.get("reason", "")) for vid, entry in _load_failed(out).items() if not _is_done(out, vid)}


def _fmt(v: Any) -> str:
    return "" if v is None else f"{float(v):.4g}"

"""Batch ingestion: discover inputs, read and normalise each on Dask, write the store.

One Dask task per input file on a ``dask.distributed`` cluster (a LocalCluster of
worker processes by default, or any scheduler address). Each task reads its file,
brings it to the display domain, normalises it to [-1, 1] and writes one volume group
per series atomically (see :mod:`octpipe.store`). A bad file becomes a ``failed``
manifest row and the batch goes on; a rerun skips volumes already complete (by the
source's sha256) unless ``overwrite``.
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from octpipe import __version__
from octpipe.edge import run_tasks
from octpipe.errors import OctpipeError
from octpipe.inputs import IMAGE_MODES, InputFile, annotation_sidecar, discover_inputs
from octpipe.io import read_volumes
from octpipe.io._common import file_sha256
from octpipe.manifest import MANIFEST_FIELDS
from octpipe.manifest import manifest_row as _row
from octpipe.provenance import git_hash
from octpipe.volume import override_spacing

if TYPE_CHECKING:
    import numpy as np

    from octpipe.preprocess.prepare import PreprocessConfig

#: A ``--spacing-mm`` value as :func:`octpipe.volume.parse_spacing` returns it (None = keep the file's).
Spacing = tuple[float | None, float | None, float | None]

__all__ = ["IngestResult", "ingest", "ingest_one"]


@dataclass
class IngestResult:
    """What an ingest run did."""

    rows: list[dict[str, object]]
    manifest: Path
    store: Path
    log: Path
    seconds: float
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when no input failed."""
        return self.counts.get("failed", 0) == 0


def _load_mask(path: Path | None, shape: tuple[int, ...]) -> np.ndarray | None:
    import numpy as np

    if path is None:
        return None
    try:
        with np.load(path) as data:
            mask = data["lesion_mask"]
    except (OSError, KeyError, ValueError) as exc:
        raise OctpipeError(f"annotation {path.name} unreadable: {exc}", path) from exc
    if mask.shape != shape:
        raise OctpipeError(f"annotation {path.name} has shape {mask.shape}, volume has {shape}", path)
    return mask


def hashed_path(rel: str, salt: str) -> str:
    """A path replaced by a salted hash that keeps only a short file extension.

    The same path in the same store always gives the same name, so reruns and manifests
    still line up; the name cannot be read back without the original path.

    Examples
    --------
    >>> hashed_path("Doe_John/1937-05-19.vol", "salt") == hashed_path("Doe_John/1937-05-19.vol", "salt")
    True
    >>> hashed_path("Doe_John/1937-05-19.vol", "salt").endswith(".vol")
    True
    """
    from octpipe.privacy import pseudonymous_id

    suffix = Path(rel).suffix.lower()
    keep = suffix if 1 < len(suffix) <= 6 and suffix[1:].isalnum() and not suffix[1:].isdigit() else ""
    return f"file-{pseudonymous_id(salt, rel)}{keep}"


def ingest_one(item: InputFile, store: str, salt: str, complete: dict[tuple[str, int], str], *,
               overwrite: bool = False, config: PreprocessConfig | None = None,
               label: int | None = None, spacing: Spacing | None = None) -> list[dict[str, object]]:
    """Ingest one input into the store; return its manifest rows (one per series).

    Runs every preprocessing stage (:func:`octpipe.preprocess.prepare.prepare_volume`).
    Never raises for a bad input: an :class:`~octpipe.errors.OctpipeError` becomes a
    ``failed`` row with the one-line reason.

    Parameters
    ----------
    item : InputFile
        The input (from :func:`discover_inputs`).
    store : str
        The store path.
    salt : str
        The store's pseudonym salt.
    complete : dict
        ``{(sha256, series): volume_id}`` of volumes already complete.
    overwrite : bool
        Redo complete volumes.
    config : PreprocessConfig, optional
        Preprocessing settings.
    label : {0, 1}, optional
        Label of an input without annotations.
    spacing : tuple of 3 (float or None), optional
        The user's spacing (z, y, x) in mm (:func:`octpipe.volume.parse_spacing`); None
        fields keep the file's. Replaces the file's before preprocessing, and the store
        and manifest record ``spacing_source="user"``.
    """
    from octpipe.preprocess.prepare import PreprocessConfig, prepare_volume
    from octpipe.privacy import volume_id
    from octpipe.store import write_prepared

    config = config or PreprocessConfig()
    t0 = time.perf_counter()
    base = {"path": item.rel, "format": item.format, "images": item.images}
    sha = ""
    try:
        sha = file_sha256(item.path) if os.path.isfile(item.path) else ""
        if sha and not overwrite and (sha, 0) in complete:
            ids = [(s, v) for (h, s), v in sorted(complete.items()) if h == sha]
            return [_row(**base, sha256=sha, series=s, volume_id=v, status="skipped", error="already complete",
                         seconds=round(time.perf_counter() - t0, 3)) for s, v in ids]
        volumes = read_volumes(item.path, format=item.format)
    except OctpipeError as exc:
        return [_row(**base, sha256=sha, status="failed", error=exc.reason,
                     seconds=round(time.perf_counter() - t0, 3))]
    sidecar = annotation_sidecar(item.path)
    rows = []
    for series, vol in enumerate(volumes):
        t1 = time.perf_counter()
        file_spacing, file_spacing_source = list(vol.spacing_mm), vol.spacing_source
        vol = override_spacing(vol, spacing)
        prov = vol.provenance
        digest = prov.sha256 if prov else sha
        vid = volume_id(digest, series, salt=salt)
        common = dict(base, sha256=digest, series=series, volume_id=vid, shape="x".join(map(str, vol.shape)),
                      spacing_mm=";".join(f"{s:.6g}" for s in vol.spacing_mm), spacing_source=vol.spacing_source,
                      laterality=vol.laterality or "")
        if (digest, series) in complete and not overwrite:
            rows.append(_row(**common, status="skipped", error="already complete",
                             seconds=round(time.perf_counter() - t1, 3)))
            continue
        try:
            mask = _load_mask(sidecar, vol.shape) if len(volumes) == 1 else None
            prepared = prepare_volume(vol, config, mask=mask, volume_id=vid)
        except (OctpipeError, ValueError) as exc:
            reason = exc.reason if isinstance(exc, OctpipeError) else str(exc)
            rows.append(_row(**common, status="failed", error=f"preprocessing: {reason}",
                             seconds=round(time.perf_counter() - t1, 3)))
            continue
        volume_label = (int(prepared.mask.any()) if prepared.mask is not None
                        else (label if label is not None else -1))
        # the spacing used: the file's, the user's, or estimated from the retina when neither
        common.update(spacing_mm=";".join(f"{s:.6g}" for s in prepared.spacing_mm),
                      spacing_source=prepared.spacing_source)
        prepared = replace(prepared, info={
            **prepared.info, "source": item.rel, "sha256": digest, "series": series, "format": item.format,
            "file_spacing_mm": file_spacing, "file_spacing_source": file_spacing_source,
            "images": item.images, "images_reason": item.images_reason, "label": volume_label})
        written = write_prepared(store, prepared, overwrite=overwrite)
        rows.append(_row(**common, status="ok" if written else "skipped",
                         error="" if written else "duplicate: same content as another input",
                         seconds=round(time.perf_counter() - t1 + (t1 - t0) / len(volumes), 3)))
    return rows


def _stored_row(volume_id: str, attrs: Mapping[str, object]) -> dict[str, object]:
    """The manifest row of a complete volume, rebuilt from its store attributes."""
    shape = attrs.get("source_shape") or []
    spacing = attrs.get("source_spacing_mm") or []
    return _row(volume_id=volume_id, path=attrs.get("source", ""), sha256=attrs.get("sha256", ""),
                format=attrs.get("format", ""), images=attrs.get("images", ""), series=attrs.get("series", 0),
                shape="x".join(map(str, shape)), spacing_mm=";".join(f"{float(v):.6g}" for v in spacing),
                spacing_source=attrs.get("spacing_source", ""), laterality=attrs.get("laterality") or "",
                status="ok")


def _describe_complete(stored: Mapping[str, Mapping[str, object]], rows: list[dict[str, object]]
                       ) -> list[dict[str, object]]:
    """Rows skipped as already complete, with the volume's shape, spacing and laterality from the store."""
    out = []
    for r in rows:
        vid = str(r.get("volume_id", ""))
        if r["status"] == "skipped" and r["error"] == "already complete" and vid in stored:
            r = dict(_stored_row(vid, stored[vid]), path=r["path"], status="skipped", error="already complete",
                     seconds=r["seconds"])
        out.append(r)
    return out


def _whole_store_manifest(store: Path, stored: Mapping[str, Mapping[str, object]], rows: list[dict[str, object]]
                          ) -> list[dict[str, object]]:
    """The run's rows plus one row per complete volume it did not touch, so the manifest covers the store.

    A volume written by an earlier run keeps that run's row (or, when the run was killed before
    writing its manifest, a row rebuilt from the store); earlier failures of inputs not given
    again are kept too.
    """
    from octpipe.manifest import load_manifest

    try:
        earlier = load_manifest(store / "manifest.csv") if (store / "manifest.csv").is_file() else []
    except (OSError, ValueError, OctpipeError):  # an unreadable earlier manifest: rebuild from the store
        earlier = []
    earlier_ok = {r["volume_id"]: r for r in earlier if r.get("status") == "ok" and r.get("volume_id")}
    seen = {str(r["volume_id"]) for r in rows if r.get("volume_id")}
    paths = {str(r["path"]) for r in rows}
    whole = list(rows)
    whole += [earlier_ok.get(vid) or _stored_row(vid, a) for vid, a in stored.items() if vid not in seen]
    whole += [r for r in earlier if r.get("status") != "ok" and r.get("path") not in paths
              and r.get("volume_id", "") not in stored]
    whole.sort(key=lambda r: (str(r["path"]), str(r["series"])))
    return whole


#: First line of the manifest beside the store: the one file that holds the source paths.
PATHS_NOTE = ("# octpipe ingest manifest: the only file that maps volume ids to source paths (file and folder "
              "names can carry patient names; the store and its exports record salted hashes). Keep it private.")


def _readable_paths(manifest: Path, salt: str) -> dict[str, str]:
    """``{hashed name: path}`` from an earlier manifest beside the store, so earlier volumes keep their paths."""
    from octpipe.manifest import load_manifest

    try:
        rows = load_manifest(manifest) if manifest.is_file() else []
    except (OSError, ValueError, OctpipeError):
        return {}
    return {hashed_path(r["path"], salt): r["path"] for r in rows if r.get("path")}


def _with_paths(rows: Iterable[dict[str, object]], readable: Mapping[str, str]) -> list[dict[str, object]]:
    """Rows with hashed names put back to the paths the user gave (for the manifest beside the store)."""
    out = [dict(r, path=readable.get(str(r["path"]), r["path"])) for r in rows]
    return sorted(out, key=lambda r: (str(r["path"]), str(r["series"])))


def _write_csv(path: Path, rows: Iterable[dict[str, object]], *, comment: str = "") -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as fh:
        if comment:
            fh.write(comment + "\n")
        writer = csv.DictWriter(fh, fieldnames=MANIFEST_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def ingest(
    sources: Sequence[str | Path],
    store: str | Path,
    *,
    workers: int | None = None,
    scheduler: str | None = None,
    manifest: str | Path | None = None,
    overwrite: bool = False,
    memory_limit: str = "auto",
    config: PreprocessConfig | None = None,
    label: int | None = None,
    progress: bool = False,
    echo: Callable[[str], object] | None = None,
    keep_paths: bool = False,
    images: str = "auto",
    spacing: Spacing | None = None,
) -> IngestResult:
    """Ingest every OCT file under ``sources`` into the Zarr ``store``.

    Parameters
    ----------
    sources : sequence of paths
        Files and folders (searched recursively).
    store : path
        The store (created when missing).
    workers : int, optional
        Worker processes of the LocalCluster; default all cores. ``0`` runs every task
        in this process without Dask (for debugging and small tests).
    scheduler : str, optional
        Address of an existing ``dask.distributed`` scheduler (``tcp://host:8786``);
        ``workers`` is then ignored.
    manifest : path, optional
        Where to write the CSV manifest too; default ``<store>-manifest.csv`` beside the
        store. The store always keeps its own ``manifest.csv``.
    overwrite : bool
        Redo volumes that are already complete.
    memory_limit : str
        Memory limit per LocalCluster worker (dask syntax, e.g. ``"2GB"``).
    config : PreprocessConfig, optional
        Preprocessing settings (the paper's by default).
    label : {0, 1}, optional
        Volume label for inputs without annotations: 0 healthy (e.g. a folder of normal
        scans for training), 1 diseased. Annotated inputs take theirs from the mask.
    progress : bool
        Show a progress bar.
    echo : callable, optional
        Receives one line per failed input as it happens.
    keep_paths : bool, default False
        Record the inputs' relative paths in the store (its ``source`` attributes and
        manifest copy) and the logs. By default these get :func:`hashed_path` names, since
        file and folder names often carry patient names; the readable mapping from volume id
        to source path is then written only to the manifest beside the store (``manifest``),
        which says so in its first line. Volumes stay traceable through their ``sha256``.
    images : {"auto", "volume", "bscans"}
        How the B-scan images of a folder are taken (see :func:`discover_inputs`): one
        volume when their names are numbered in sequence (``auto``, default), always one
        volume per folder, or always one volume per image. The manifest's ``images``
        column says which was taken for each row.
    spacing : tuple of 3 (float or None), optional
        Spacing (z, y, x) in mm for every input of this run, None fields keeping the
        file's (:func:`octpipe.volume.parse_spacing`); recorded as
        ``spacing_source="user"``.

    Returns
    -------
    IngestResult

    Raises
    ------
    OctpipeError
        Another process is writing the store (see :func:`octpipe.store.store_lock`), or
        ``store`` is a folder that is not a store.
    ValueError
        ``images`` is not one of :data:`IMAGE_MODES`.
    """
    from octpipe.store import store_lock

    if images not in IMAGE_MODES:  # before the store is created or locked
        raise ValueError(f"images must be one of {', '.join(IMAGE_MODES)}, got {images!r}")
    with store_lock(store, command="ingest"):
        return _ingest_locked(sources, store, workers=workers, scheduler=scheduler, manifest=manifest,
                              overwrite=overwrite, memory_limit=memory_limit, config=config, label=label,
                              progress=progress, echo=echo, keep_paths=keep_paths, images=images, spacing=spacing)


def _ingest_locked(
    sources: Sequence[str | Path],
    store: str | Path,
    *,
    workers: int | None = None,
    scheduler: str | None = None,
    manifest: str | Path | None = None,
    overwrite: bool = False,
    memory_limit: str = "auto",
    config: PreprocessConfig | None = None,
    label: int | None = None,
    progress: bool = False,
    echo: Callable[[str], object] | None = None,
    keep_paths: bool = False,
    images: str = "auto",
    spacing: Spacing | None = None,
) -> IngestResult:
    """:func:`ingest` while holding the store lock."""
    from octpipe.store import complete_volumes, open_store

    t0 = time.perf_counter()
    store = Path(store)
    root = open_store(store)
    salt = str(root.attrs["pseudonym_salt"])
    manifest_path = Path(manifest) if manifest else store.with_name(store.name.removesuffix(".zarr") + "-manifest.csv")
    inputs, rows = discover_inputs(sources, exclude=[store], images=images, cite_names=keep_paths)
    readable: dict[str, str] = {}  # hashed name -> the path given, for the manifest beside the store only
    if not keep_paths:  # file and folder names can carry patient names: record salted hashes instead
        readable = _readable_paths(manifest_path, salt)
        readable.update({hashed_path(item.rel, salt): item.rel for item in inputs})
        readable.update({hashed_path(str(r["path"]), salt): str(r["path"]) for r in rows})
        inputs = [replace(item, rel=hashed_path(item.rel, salt)) for item in inputs]
        for r in rows:
            r["path"] = hashed_path(str(r["path"]), salt)
    if echo:  # sources that are missing or unreadable fail before any task runs: say so too
        for r in rows:
            if r["status"] == "failed":
                echo(f"failed: {readable.get(str(r['path']), r['path'])}: {r['error']}")
    complete = complete_volumes(store)
    from octpipe.preprocess.prepare import PreprocessConfig

    config = config or PreprocessConfig()
    kwargs = {"overwrite": overwrite, "config": config, "label": label, "spacing": spacing}

    bar = None
    if progress:
        from rich.progress import Progress

        bar = Progress(transient=False)
        task = bar.add_task("ingest", total=len(inputs))
        bar.start()

    def collect(new_rows: list[dict[str, object]]) -> None:
        rows.extend(new_rows)
        if echo:
            for r in new_rows:
                if r["status"] == "failed":
                    echo(f"failed: {readable.get(str(r['path']), r['path'])}: {r['error']}")
        if bar is not None:
            bar.advance(task)

    task = partial(ingest_one, store=str(store), salt=salt, complete=complete, **kwargs)
    try:
        for item, result in run_tasks(task, inputs, workers=workers, scheduler=scheduler, memory_limit=memory_limit):
            if isinstance(result, Exception):  # a worker died or a reader bug: record it, go on
                result = [_row(path=item.rel, format=item.format, images=item.images, status="failed",
                               error=f"task failed: {type(result).__name__}: {result}".splitlines()[0])]
            collect(result)
    finally:
        if bar is not None:
            bar.stop()

    from octpipe.store import complete_volume_attrs

    stored = complete_volume_attrs(store)  # every complete volume's attributes, read once
    rows = _describe_complete(stored, rows)
    rows.sort(key=lambda r: (str(r["path"]), str(r["series"])))
    counts = {s: sum(r["status"] == s for r in rows) for s in ("ok", "skipped", "failed")}
    whole = _whole_store_manifest(store, stored, rows)
    _write_csv(store / "manifest.csv", whole)
    _write_csv(manifest_path, _with_paths(whole, readable), comment=PATHS_NOTE)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    logs = store / "logs"
    logs.mkdir(exist_ok=True)
    log = logs / f"ingest-{stamp}.log"
    seconds = round(time.perf_counter() - t0, 2)
    with open(log, "w") as fh:
        for r in rows:
            fh.write(f"{r['status']}\t{r['path']}\t{r['volume_id']}\t{r['error']}\n")
        fh.write(f"# {counts} in {seconds} s\n")
    (logs / f"ingest-{stamp}.json").write_text(json.dumps({
        "command": "ingest", "octpipe_version": __version__, "git": git_hash(),
        "config": {"sources": [str(s) if keep_paths else hashed_path(str(s), salt) for s in sources],
                   "keep_paths": keep_paths, "store": str(store), "workers": workers,
                   "scheduler": scheduler, "overwrite": overwrite, "memory_limit": memory_limit,
                   "label": label, "images": images, "spacing_mm": None if spacing is None else list(spacing),
                   "preprocess": config.to_dict()},
        "counts": counts, "seconds": seconds,
    }, indent=2))
    return IngestResult(rows=_with_paths(rows, readable), manifest=manifest_path, store=store, log=log,
                        seconds=seconds, counts=counts)

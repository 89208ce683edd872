"""Scoring a store's patch split: every patch in order, one CSV row each (``octpipe score``).

The per-patch scores are :mod:`octpipe.models.fanogan.score`'s; this module streams a split
of the store through them and writes the CSV and its provenance sidecar.
"""

from __future__ import annotations

import csv
import json
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from octpipe.errors import OctpipeError
from octpipe.models.fanogan.checkpoint import FAnoGANModel, load_run, provenance, write_text_atomic
from octpipe.models.fanogan.score import (
    CSV_COLUMNS,
    _rebatch,
    _require_encoder,
    _score_batch,
    _setup,
    _to_device,
    resolve_batch_size,
)
from octpipe.store import check_patch_size, open_patch_split

__all__ = ["ScoreResult", "score_store"]


@dataclass(frozen=True)
class ScoreResult:
    """What :func:`score_store` did.

    Attributes
    ----------
    path : Path
        The CSV file.
    n_patches : int
        Rows written.
    seconds : float
        Wall time.
    device, precision : str
        Where and how it ran.
    """

    path: Path
    n_patches: int
    seconds: float
    device: str
    precision: str


def score_store(
    store: str | Path,
    model: str | Path | FAnoGANModel,
    split: str,
    out_csv: str | Path,
    *,
    batch_size: int | None = None,
    device: str = "auto",
    precision: str = "auto",
    overwrite: bool = False,
    progress: bool = False,
) -> ScoreResult:
    """Score every patch of ``STORE/patches/<split>`` in order and write one CSV row per patch.

    The patches are streamed one Zarr chunk at a time (the next chunk is read in a background
    thread while the current one is scored). Columns: ``volume_id, bscan, row, col, label, A_R,
    A_D, A, z_distance``; a sidecar ``<out_csv>.json`` records the model, split, device,
    precision, octpipe version and git hash.

    Parameters
    ----------
    store : str or Path
        A store with patches.
    model : str, Path or FAnoGANModel
        A run directory or a loaded model.
    split : str
        Patch split to score (usually ``'test'``).
    out_csv : str or Path
        Output CSV; written atomically.
    batch_size : int or None
        Patches per forward pass; None = :func:`~octpipe.models.fanogan.score.resolve_batch_size`.
    device : str, default 'auto'
        ``auto``, ``cpu`` or ``cuda``.
    precision : str, default 'auto'
        See :func:`octpipe.models.fanogan.score.score_patches`.
    overwrite : bool, default False
        Replace an existing ``out_csv``.
    progress : bool, default False
        Show a progress bar.

    Returns
    -------
    ScoreResult

    Raises
    ------
    OctpipeError
        If the split is missing, the patch size does not match the model, the model has no
        encoder, or ``out_csv`` exists and ``overwrite`` is False.
    """
    t0 = time.perf_counter()
    store = Path(store)
    out_csv = Path(out_csv)
    if out_csv.is_dir():
        raise OctpipeError("is a folder; -o takes the output CSV file", out_csv)
    if out_csv.exists() and not overwrite:
        raise OctpipeError("output exists; pass --overwrite to replace it", out_csv)
    group = open_patch_split(store, split)  # a missing split is named before the model is loaded
    fanogan = model if isinstance(model, FAnoGANModel) else load_run(model)
    _require_encoder(fanogan)
    check_patch_size(group, fanogan.image_size, store)
    xs, index, labels = group["x"], group["index"], group["label"]
    n = int(xs.shape[0])
    volumes = list(group.attrs.get("volumes", []))
    run, dev, prec, fmt = _setup(fanogan, device, precision, "auto")
    batch_size = resolve_batch_size(batch_size, dev, prec)
    step = max(int(xs.chunks[0]), batch_size)

    def read(start: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        stop = min(start + step, n)
        return np.asarray(xs[start:stop], dtype=np.float32), index[start:stop], labels[start:stop]

    out_csv.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_csv.with_name(f".{out_csv.name}.{uuid.uuid4().hex[:8]}.tmp")
    bar = None
    if progress:
        from rich.progress import Progress

        bar = Progress(transient=True)
        task = bar.add_task(f"score {split}", total=n)
        bar.start()
    try:
        with open(tmp, "w", newline="", encoding="utf-8") as fh, ThreadPoolExecutor(1) as pool:
            writer = csv.writer(fh)
            writer.writerow(CSV_COLUMNS)
            starts = list(range(0, n, step))
            pending = pool.submit(read, starts[0]) if starts else None
            for i in range(len(starts)):
                x, idx, lab = pending.result()  # type: ignore[union-attr]
                pending = pool.submit(read, starts[i + 1]) if i + 1 < len(starts) else None
                parts = []
                with torch.inference_mode():
                    for batch in _rebatch(x, batch_size, fanogan.config.model.channels):
                        parts.append(_score_batch(run, _to_device(batch, dev, fmt), prec, dev)[0].cpu())
                table = torch.cat(parts, dim=1).numpy()
                for j in range(len(x)):
                    v = int(idx[j, 0])
                    vid = volumes[v] if 0 <= v < len(volumes) else str(v)
                    writer.writerow([vid, int(idx[j, 1]), int(idx[j, 2]), int(idx[j, 3]), int(lab[j]),
                                     *(f"{table[k, j]:.9g}" for k in range(4))])
                if bar:
                    bar.advance(task, len(x))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, out_csv)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        if bar:
            bar.stop()
    seconds = round(time.perf_counter() - t0, 3)
    meta = {**provenance(), "store": str(store), "split": split, "model": str(fanogan.run_dir),
            "n_patches": n, "batch_size": batch_size, "device": str(dev), "precision": prec,
            "kappa": fanogan.kappa, "seconds": seconds, "columns": list(CSV_COLUMNS)}
    write_text_atomic(out_csv.with_name(out_csv.name + ".json"), json.dumps(meta, indent=2) + "\n")
    return ScoreResult(path=out_csv, n_patches=n, seconds=seconds, device=str(dev), precision=prec)

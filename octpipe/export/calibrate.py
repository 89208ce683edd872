"""Volume-level calibration: the export's volume score measured on normal volumes.

A model's patch calibration (held-out normal patches) says how unusual one window is. The
volume score of an export is a 99th percentile over the volume's windows, so a healthy volume
lands near the 99th percentile of normal *patches* by construction and that percentile hardly
separates volumes. Here the volume score itself is computed, exactly as ``octpipe export``
computes it (same preprocessing, windows, stride and weighting), on normal volumes the user
gives (held out from training, ideally from the device the model will see), and its sorted
values are stored in the model (``calibration["volumes"]`` in ``model.pt`` and
``calibration.json``). Exports then give each volume's percentile among those normal volumes.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from octpipe.errors import OctpipeError

__all__ = ["volume_calibration", "calibrate_volumes", "volume_percentile", "summary_percentile", "MIN_VOLUMES"]

#: Fewest normal volumes a volume calibration is made from (fewer give percentiles in coarse steps).
MIN_VOLUMES = 5


def volume_calibration(scores: Sequence[float], *, stride: int, weighting: str, source: str) -> dict[str, Any]:
    """The ``calibration["volumes"]`` record: sorted normal volume scores and how they were made.

    >>> volume_calibration([3.0, 1.0, 2.0, 4.0, 5.0], stride=16, weighting="gaussian", source="5 scans")["sorted"]
    [1.0, 2.0, 3.0, 4.0, 5.0]
    """
    values = np.sort(np.asarray(scores, dtype=np.float64))
    if values.size < MIN_VOLUMES or not np.isfinite(values).all():
        raise ValueError(f"need at least {MIN_VOLUMES} finite normal volume scores, got {values.size}")
    return {"score": "volume_score", "sorted": values.tolist(), "n": int(values.size), "stride": int(stride),
            "weighting": weighting, "source": source,
            "definition": "99th percentile of window A over windows at least half inside ILM..BM"}


def volume_percentile(value: float, record: dict[str, Any]) -> float:
    """Percentage of the normal volumes whose score is <= ``value``.

    >>> rec = volume_calibration([1.0, 2.0, 3.0, 4.0, 5.0], stride=16, weighting="gaussian", source="")
    >>> volume_percentile(3.5, rec), volume_percentile(0.5, rec), volume_percentile(9.0, rec)
    (60.0, 0.0, 100.0)
    """
    ref = np.asarray(record["sorted"], dtype=np.float64)
    return float(100.0 * np.searchsorted(ref, value, side="right") / ref.size)


def _inputs(sources: Sequence[str | Path], config: Any) -> tuple[list[Any], list[str]]:
    """Prepared volumes of every OCT input under ``sources`` (files, folders; one per B-scan image)."""
    from octpipe.export.run import file_volume_inputs
    from octpipe.inputs import discover_inputs

    items, rows = discover_inputs(list(sources), images="auto", cite_names=False)
    failed = [f"{r['path']}: {r['error']}" for r in rows if r["status"] == "failed"]
    prepared = []
    for item in items:
        try:
            prepared += file_volume_inputs(item.path, config=config, format=item.format)[0]
        except OctpipeError as exc:
            failed.append(f"{Path(item.path).name}: {exc.reason}")
    return prepared, failed


def _update_model(run: Path, record: dict[str, Any]) -> None:
    """Add the record to the run's ``model.pt`` (its other contents unchanged) and ``calibration.json``."""
    import torch

    from octpipe.models.fanogan.checkpoint import save_atomic, write_text_atomic

    bundle = torch.load(run / "model.pt", map_location="cpu", weights_only=False)
    if not bundle.get("calibration"):
        raise OctpipeError("the model has no patch calibration; calibrate volumes of a trained run", run)
    bundle["calibration"] = {**bundle["calibration"], "volumes": record}
    save_atomic(bundle, run / "model.pt")
    if (run / "calibration.json").is_file():
        write_text_atomic(run / "calibration.json", json.dumps(bundle["calibration"]) + "\n")


def calibrate_volumes(model_dir: str | Path, sources: Sequence[str | Path], *, stride: int = 16,
                      weighting: str = "gaussian", batch_size: int | None = None, device: str = "auto",
                      precision: str = "auto", progress: Callable[[str], None] | None = None
                      ) -> tuple[dict[str, Any], list[str]]:
    """Score normal volumes as the export does and store their volume scores in the model.

    Parameters
    ----------
    model_dir : path
        A run or bundled model folder with ``model.pt`` (rewritten with the record).
    sources : sequence of paths
        Normal volumes never used in training: OCT files, or folders of them (a folder of
        independent B-scans gives one volume per image).
    stride, weighting, batch_size, device, precision
        As ``octpipe export`` (use the stride the exports will use).

    Returns
    -------
    record : dict
        ``calibration["volumes"]``.
    failed : list of str
        Inputs that could not be read or prepared (left out).
    """
    from octpipe.export.anomaly import MapSettings, compute_anomaly
    from octpipe.models.fanogan.checkpoint import load_run

    run = Path(model_dir)
    if not (run / "model.pt").is_file():
        raise OctpipeError("no model.pt (a trained run or bundled model folder is needed)", run)
    model = load_run(run)
    if model.calibration is None:
        raise OctpipeError("the model has no patch calibration; calibrate volumes of a trained run", run)
    prepared, failed = _inputs(sources, model.preprocess_config())
    settings = MapSettings(stride=stride, weighting=weighting, batch_size=batch_size, device=device,
                           precision=precision)
    scores: list[float] = []
    for vol in prepared:
        scores.append(float(compute_anomaly(vol, model, settings).summary["volume_score"]))
        if progress:
            progress(vol.volume_id)
    if len(scores) < MIN_VOLUMES:
        raise OctpipeError(f"{len(scores)} normal volumes scored ({len(failed)} failed); at least {MIN_VOLUMES} "
                           "are needed", Path(sources[0]) if sources else run)
    record = volume_calibration(scores, stride=stride, weighting=weighting,
                                source=f"{len(scores)} normal volumes given to octpipe calibrate")
    _update_model(run, record)
    return record, failed


def summary_percentile(volume_score: float, calibration: dict[str, Any],
                       patch_percentile: Callable[[float], float]) -> dict[str, Any]:
    """The summary's ``volume_percentile`` and what it is relative to.

    Among the model's normal volumes when it has a volume calibration, else among its
    normal patches (where a healthy volume sits near 99 by construction).
    """
    record = calibration.get("volumes")
    if record:
        return {"volume_percentile": volume_percentile(volume_score, record),
                "volume_percentile_reference": f"{record['n']} normal volumes",
                "volume_calibration_stride": record.get("stride")}
    return {"volume_percentile": float(patch_percentile(volume_score)),
            "volume_percentile_reference": "normal patches"}


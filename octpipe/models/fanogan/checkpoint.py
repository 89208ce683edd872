"""Run directories, atomic checkpoints and loading a trained f-AnoGAN model.

The model itself, :class:`~octpipe.models.fanogan.model.FAnoGANModel`, is defined in
:mod:`octpipe.models.fanogan.model` (and importable from here too).

A training run writes one directory::

    RUN/
      config.yaml          the resolved configuration (header: octpipe version, git hash)
      run.json             version, git hash, store, resolved device/precision, per-stage status
      log.csv              one row per logged step (both stages)
      checkpoints/
        gan-last.pt        latest GAN state: G, D, both Adam states, counters, data position, RNG
        gan-<critic>.pt    periodic snapshots (``gan.snapshot_every``)
        encoder-last.pt    latest encoder state: E (+ the frozen G and D), RMSProp state, ...
        encoder-<step>.pt
      samples/             G(z) grids during GAN training, latent interpolation at its end
      calibration.json     scores of held-out normal patches (sorted values and percentiles)
      model.pt             inference bundle: G, D, E weights, config, calibration, version, hash and
                           the preprocessing of the store it was trained on (``preprocess``)
      tensorboard/         only with ``runtime.tensorboard: true``

Every ``.pt`` file is written atomically (temporary file in the same folder, ``fsync``,
``os.replace``), so a crash leaves either the previous file or the new one, never half a file.
Checkpoints hold only tensors and plain Python values and are read with
``torch.load(weights_only=True)``.

The preprocessing record (``bundle["preprocess"]``, :func:`store_preprocessing`) is what makes
``octpipe export FILE`` feed the model the same input it was trained on::

    {"config": PreprocessConfig.to_dict() (JSON form), "flatten": {"height": 128, "bm_row": 112},
     "source": "store", "n_volumes": 21}

``flatten`` holds the flattened-area rows of the training volumes (None when they differ, e.g.
mixed axial spacings; then ``flatten_variants`` lists them). A bundle without the record (written
before it existed) loads with a logged warning and the default :class:`PreprocessConfig`.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from octpipe.errors import ConfigError, OctpipeError
from octpipe.models.fanogan.config import FAnoGANConfig
from octpipe.models.fanogan.model import DEFAULT_PREPROCESS_SOURCE, FAnoGANModel, _complete, _json_form, build_networks
from octpipe.provenance import provenance

__all__ = [
    "CHECKPOINT_FORMAT",
    "RunPaths",
    "FAnoGANModel",
    "build_networks",
    "provenance",
    "save_atomic",
    "save_model",
    "write_text_atomic",
    "load_checkpoint",
    "capture_rng_state",
    "restore_rng_state",
    "check_resume_config",
    "load_run",
    "store_preprocessing",
    "preprocessing_differences",
    "DEFAULT_PREPROCESS_SOURCE",
]

logger = logging.getLogger(__name__)


#: Value of the ``format`` key of every checkpoint and bundle written here.
CHECKPOINT_FORMAT = "octpipe-fanogan/1"


@dataclass(frozen=True)
class RunPaths:
    """The files of a run directory (see the module docstring).

    Parameters
    ----------
    root : Path
        The run directory.

    Examples
    --------
    >>> RunPaths(Path("run")).checkpoint("gan").as_posix()
    'run/checkpoints/gan-last.pt'
    """

    root: Path

    @property
    def config(self) -> Path:
        """``config.yaml``."""
        return self.root / "config.yaml"

    @property
    def run_json(self) -> Path:
        """``run.json``."""
        return self.root / "run.json"

    @property
    def log(self) -> Path:
        """``log.csv``."""
        return self.root / "log.csv"

    @property
    def checkpoints(self) -> Path:
        """``checkpoints/``."""
        return self.root / "checkpoints"

    @property
    def samples(self) -> Path:
        """``samples/``."""
        return self.root / "samples"

    @property
    def calibration(self) -> Path:
        """``calibration.json``."""
        return self.root / "calibration.json"

    @property
    def bundle(self) -> Path:
        """``model.pt``."""
        return self.root / "model.pt"

    @property
    def tensorboard(self) -> Path:
        """``tensorboard/``."""
        return self.root / "tensorboard"

    def checkpoint(self, stage: str, step: int | None = None) -> Path:
        """``checkpoints/<stage>-last.pt``, or the snapshot ``<stage>-<step>.pt``."""
        return self.checkpoints / (f"{stage}-last.pt" if step is None else f"{stage}-{step:08d}.pt")

    def own(self) -> tuple[Path, ...]:
        """Every file and folder a run writes (the only things ``--overwrite`` may remove)."""
        return (self.config, self.run_json, self.log, self.checkpoints, self.samples, self.calibration,
                self.bundle, self.tensorboard)

    def remove_own(self) -> None:
        """Delete the run's own files and folders; anything else in the folder is left alone."""
        for path in self.own():
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def save_atomic(obj: dict[str, Any], path: str | Path) -> Path:
    """``torch.save`` ``obj`` to ``path`` atomically.

    The data go to a temporary file in the same folder, which is flushed, ``fsync``-ed and then
    renamed over ``path`` with ``os.replace``; the folder is ``fsync``-ed too.

    Parameters
    ----------
    obj : dict
        Tensors and plain Python values only (so that ``weights_only`` loading works).
    path : str or Path
        Destination; its folder is created.

    Returns
    -------
    Path
        ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically, like :func:`save_atomic`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | Path, *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint or bundle written by octpipe (``weights_only=True``).

    Parameters
    ----------
    path : str or Path
        A ``.pt`` file.
    map_location : str or torch.device, default 'cpu'
        Where to put the tensors.

    Returns
    -------
    dict

    Raises
    ------
    OctpipeError
        If the file is missing, unreadable or not an octpipe f-AnoGAN checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise OctpipeError("checkpoint not found", path)
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a bad file
        raise OctpipeError(f"cannot read checkpoint: {type(exc).__name__}: {str(exc).splitlines()[0]}",
                           path) from None
    if not isinstance(obj, dict) or obj.get("format") != CHECKPOINT_FORMAT:
        raise OctpipeError(f"not an octpipe f-AnoGAN checkpoint (expected format {CHECKPOINT_FORMAT})", path)
    return obj


def capture_rng_state() -> dict[str, Any]:
    """The global RNG states (torch CPU and CUDA, NumPy legacy, Python ``random``) as plain values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()  # type: ignore[misc]
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": random.getstate(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
    }
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restore the RNG states captured by :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if state.get("cuda") and torch.cuda.is_available():
        cuda = [s.cpu() for s in state["cuda"]][: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all(cuda)


#: Keys that may change between a checkpoint and a resumed run (length, output cadence, runtime).
_RESUMABLE_CHANGES = {
    "gan": {"iterations", "log_every", "checkpoint_every", "snapshot_every", "sample_every", "max_wasserstein"},
    "encoder": {"iterations", "log_every", "val_every", "val_batches", "checkpoint_every", "snapshot_every",
                "max_loss"},
    "runtime": {"device", "precision", "channels_last", "compile", "deterministic", "threads", "tensorboard"},
}


def check_resume_config(saved: dict[str, Any], config: FAnoGANConfig, stages: tuple[str, ...]) -> None:
    """Refuse to resume with settings that would change the training trajectory.

    Parameters
    ----------
    saved : dict
        ``config`` entry of the checkpoint.
    config : FAnoGANConfig
        The configuration of the resumed run.
    stages : tuple of str
        Sections that matter (for example ``("model", "data", "gan", "runtime")``).

    Raises
    ------
    ConfigError
        Naming the first key that differs.
    """
    new = config.to_dict()
    for section in stages:
        for key, value in new[section].items():
            if key in _RESUMABLE_CHANGES.get(section, set()):
                continue
            old = saved.get(section, {}).get(key)
            if old != value:
                raise ConfigError(f"cannot resume: {section}.{key} is {value!r} but the checkpoint was trained "
                                  f"with {old!r}")


def save_model(model: FAnoGANModel, path: str | Path) -> Path:
    """Write a model as a ``model.pt`` bundle that :func:`load_run` reads (atomically).

    For models built outside ``octpipe train`` (benchmarks, tests, conversions); training
    writes its own bundle with the run's counters and runtime.
    """
    bundle = {"format": CHECKPOINT_FORMAT, "stage": "bundle", **provenance(), "config": model.config.to_dict(),
              "generator": model.generator.state_dict(), "discriminator": model.discriminator.state_dict(),
              "encoder": None if model.encoder is None else model.encoder.state_dict(),
              "calibration": model.calibration, "counters": {}}
    if model.preprocess is not None:
        bundle["preprocess"] = _check_preprocess_record(model.preprocess, Path(path))
    return save_atomic(bundle, path)


def _check_preprocess_record(record: Any, where: Path) -> dict[str, Any]:
    """A preprocessing record in JSON form; its ``config`` must build a PreprocessConfig."""
    from octpipe.preprocess.prepare import PreprocessConfig

    if not isinstance(record, dict):
        raise OctpipeError(f"preprocess record must be a dict, got {type(record).__name__}", where)
    record = _json_form(record)
    if record.get("config") is not None:
        try:
            PreprocessConfig.from_dict(_complete(record["config"]))
        except (TypeError, ValueError) as exc:
            raise OctpipeError(f"invalid preprocess record: {exc}", where) from None
    return record


def _fmt_setting(value: Any) -> str:
    if value is None or isinstance(value, bool):
        return str(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_fmt_setting(v) for v in value) + "]"
    return f"{value:g}" if isinstance(value, float) else str(value)


def preprocessing_differences(ours: dict[str, Any] | None, theirs: dict[str, Any] | None) -> list[str]:
    """The settings in which two ``PreprocessConfig.to_dict()`` forms differ, as ``"name OURS vs THEIRS"``.

    Nested settings are named with a dot (``flatten.area_height_um``); None stands for the
    defaults. A setting missing from a record written before it existed takes the value that
    describes octpipe's behaviour then (``flatten.axial_spacing_um`` None: the volume's own
    axial sampling), not today's default.

    Examples
    --------
    >>> from octpipe.preprocess.prepare import PreprocessConfig
    >>> robust = PreprocessConfig(normalize_percentiles=(0.5, 99.5)).to_dict()
    >>> preprocessing_differences(robust, PreprocessConfig().to_dict())
    ['normalize_percentiles [0.5, 99.5] vs None']
    """
    from octpipe.preprocess.prepare import PreprocessConfig

    default = PreprocessConfig().to_dict()
    a = _complete(default if ours is None else ours)
    b = _complete(default if theirs is None else theirs)
    out: list[str] = []

    def walk(x: Any, y: Any, prefix: str) -> None:
        if isinstance(x, dict) and isinstance(y, dict):
            for key in list(x) + [k for k in y if k not in x]:
                walk(x.get(key), y.get(key), f"{prefix}{key}.")
        elif x != y:
            out.append(f"{prefix[:-1]} {_fmt_setting(x)} vs {_fmt_setting(y)}")

    walk(a, b, "")
    return out


def _patch_split_volumes(store: Path, splits: tuple[str | None, ...]) -> list[str] | None:
    """Volume ids of the given patch splits (their ``volumes`` attribute), or None when no split records them."""
    vids: list[str] = []
    found = False
    for split in splits:
        if not split:
            continue
        meta = store / "patches" / split / "zarr.json"
        try:
            attrs = json.loads(meta.read_text(encoding="utf-8")).get("attributes", {})
        except (OSError, ValueError):
            continue
        if isinstance(attrs.get("volumes"), list):
            found = True
            vids.extend(v for v in attrs["volumes"] if v not in vids)
    return vids if found else None


def store_preprocessing(store: str | Path, splits: tuple[str | None, ...] = ("train",)) -> dict[str, Any]:
    """The preprocessing record of the volumes a model trained on ``store`` sees (module docstring).

    Parameters
    ----------
    store : str or Path
        An ingested store with patch splits.
    splits : tuple of str or None
        The patch splits used (training and, when separate, validation/calibration); their
        volumes are read. When no split lists its volumes, every complete volume is read.

    Returns
    -------
    dict
        ``config`` (``PreprocessConfig.to_dict()`` in JSON form, or None when the volumes
        record none), ``flatten`` (``{"height", "bm_row"}`` or None when they differ, then
        ``flatten_variants``), ``source`` (``"store"``) and ``n_volumes``.

    Raises
    ------
    ConfigError
        The volumes were preprocessed differently (a model must see one preprocessing),
        naming the differing settings.
    """
    from octpipe.store import read_volume_attrs, volume_ids

    store = Path(store)
    vids = _patch_split_volumes(store, splits)
    if vids is None:
        vids = volume_ids(store)
    configs: dict[str, list[str]] = {}
    rows: dict[tuple[int, int], int] = {}
    for vid in vids:
        attrs = read_volume_attrs(store, vid)
        pre = _complete(attrs.get("preprocess"))
        configs.setdefault(json.dumps(pre, sort_keys=True), []).append(vid)
        flat = attrs.get("flatten") or {}
        if "height" in flat and "bm_row" in flat:
            key = (int(flat["height"]), int(flat["bm_row"]))
            rows[key] = rows.get(key, 0) + 1
    if len(configs) > 1:
        groups = sorted(configs.items(), key=lambda kv: -len(kv[1]))
        (first, n_first), (second, n_second) = ((json.loads(k), len(v)) for k, v in groups[:2])
        if first is None or second is None:
            what = f"{n_first if first is None else n_second} record no preprocessing"
        else:
            what = "; ".join(preprocessing_differences(second, first))
        raise ConfigError(f"the store's volumes were preprocessed differently ({len(groups)} settings among "
                          f"{len(vids)} volumes: {what}); a model must be trained on one preprocessing, so "
                          f"re-ingest them with the same settings", store)
    config = json.loads(next(iter(configs))) if configs else None
    record: dict[str, Any] = {"config": config, "flatten": None, "source": "store", "n_volumes": len(vids)}
    if len(rows) == 1:
        (height, bm_row), = rows
        record["flatten"] = {"height": height, "bm_row": bm_row}
    elif rows:
        record["flatten_variants"] = [{"height": h, "bm_row": b, "n_volumes": n} for (h, b), n in sorted(rows.items())]
    if config is None:
        record["note"] = "the store's volumes record no preprocessing"
    return record


def load_run(run_dir: str | Path, *, device: str | torch.device = "cpu") -> FAnoGANModel:
    """Load the trained networks of a run for scoring or export.

    Uses ``model.pt`` when the encoder stage has finished, else the latest encoder checkpoint,
    else the latest GAN checkpoint (``encoder`` is then None).

    Parameters
    ----------
    run_dir : str or Path
        A run directory written by :func:`octpipe.models.fanogan.train.train_gan` /
        ``train_encoder`` (``octpipe train``), a bundled model folder, or a ``.pt`` bundle.
    device : str or torch.device, default 'cpu'
        Where to put the networks.

    Returns
    -------
    FAnoGANModel
        Networks in eval mode, with ``requires_grad`` off.

    Raises
    ------
    OctpipeError
        If the directory holds no readable checkpoint.
    """
    given = Path(run_dir)
    if not given.exists():
        raise OctpipeError("no such model folder", given)
    if given.is_file() and given.suffix != ".pt":
        raise OctpipeError("not a model folder (give a run directory of octpipe train, a bundled model folder "
                           "or its model.pt)", given)
    paths = RunPaths(given.parent if given.is_file() else given)
    for candidate in ((given,) if given.is_file() else (paths.bundle, paths.checkpoint("encoder"),
                                                       paths.checkpoint("gan"))):
        if candidate.is_file():
            ckpt = load_checkpoint(candidate)
            break
    else:
        raise OctpipeError("no trained model in the run (no model.pt or checkpoints/*-last.pt); "
                           "run octpipe train first", paths.root)
    config = FAnoGANConfig.from_dict(ckpt["config"])
    g, d, e = build_networks(config)
    g.load_state_dict(ckpt["generator"])
    d.load_state_dict(ckpt["discriminator"])
    if ckpt.get("encoder") is not None:
        e.load_state_dict(ckpt["encoder"])
    else:
        e = None
    calibration = ckpt.get("calibration")
    if calibration is None and paths.calibration.is_file():
        calibration = json.loads(paths.calibration.read_text(encoding="utf-8"))
    preprocess = ckpt.get("preprocess")
    if preprocess is not None:
        preprocess = _check_preprocess_record(preprocess, candidate)
    if preprocess is None or preprocess.get("config") is None:
        logger.warning("%s: %s records no preprocessing of its training data; assuming the default "
                       "PreprocessConfig", paths.root.name, candidate.name)
    model = FAnoGANModel(generator=g, discriminator=d, encoder=e, config=config, calibration=calibration,
                         run_dir=paths.root, preprocess=preprocess)
    for net in (g, d, e):
        if net is not None:
            net.requires_grad_(False)
    return model.to(device).eval()

"""Run directories, atomic checkpoints and loading a trained f-AnoGAN model.

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
      model.pt             inference bundle: G, D, E weights, config, calibration, version, hash
      tensorboard/         only with ``runtime.tensorboard: true``

Every ``.pt`` file is written atomically (temporary file in the same folder, ``fsync``,
``os.replace``), so a crash leaves either the previous file or the new one, never half a file.
Checkpoints hold only tensors and plain Python values and are read with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import random
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from octpipe import __version__
from octpipe.errors import ConfigError, OctpipeError
from octpipe.models.fanogan.config import FAnoGANConfig
from octpipe.models.fanogan.networks import Discriminator, Encoder, Generator

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
]

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


def build_networks(config: FAnoGANConfig) -> tuple[Generator, Discriminator, Encoder]:
    """Build freshly initialised G, D and E for ``config.model`` (initialisation uses the global RNG).

    Parameters
    ----------
    config : FAnoGANConfig
        The configuration.

    Returns
    -------
    tuple of (Generator, Discriminator, Encoder)
    """
    m = config.model
    g = Generator(latent_dim=m.latent_dim, dim=m.dim, channels=m.channels, image_size=m.image_size)
    d = Discriminator(dim=m.dim, channels=m.channels, image_size=m.image_size)
    e = Encoder(latent_dim=m.latent_dim, dim=m.dim, channels=m.channels, image_size=m.image_size,
                output=m.encoder_output)  # type: ignore[arg-type]
    return g, d, e


def provenance() -> dict[str, str]:
    """``{"octpipe_version", "git_hash", "created"}`` for stamping outputs."""
    from octpipe.pipeline import git_hash

    return {"octpipe_version": __version__, "git_hash": git_hash(),
            "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")}


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


@dataclass
class FAnoGANModel:
    """A trained f-AnoGAN: networks in eval mode, configuration and calibration.

    Parameters
    ----------
    generator, discriminator : Generator, Discriminator
        The GAN.
    encoder : Encoder or None
        The encoder; None when only the GAN stage has been trained.
    config : FAnoGANConfig
        The training configuration.
    calibration : dict or None
        Contents of ``calibration.json`` (held-out normal scores), when present.
    run_dir : Path or None
        Where it was loaded from.
    """

    generator: Generator
    discriminator: Discriminator
    encoder: Encoder | None
    config: FAnoGANConfig
    calibration: dict[str, Any] | None = None
    run_dir: Path | None = None

    @property
    def kappa(self) -> float:
        """κ of A = A_R + κ·A_D (``encoder.kappa``)."""
        return self.config.encoder.kappa

    @property
    def image_size(self) -> int:
        """Patch side in pixels."""
        return self.config.model.image_size

    def to(self, device: str | torch.device) -> FAnoGANModel:
        """Move the networks to ``device`` (in place) and return ``self``."""
        for net in (self.generator, self.discriminator, self.encoder):
            if net is not None:
                net.to(device)
        return self

    def eval(self) -> FAnoGANModel:
        """Put every network in eval mode and return ``self``."""
        for net in (self.generator, self.discriminator, self.encoder):
            if net is not None:
                net.eval()
        return self


def save_model(model: FAnoGANModel, path: str | Path) -> Path:
    """Write a model as a ``model.pt`` bundle that :func:`load_run` reads (atomically).

    For models built outside ``octpipe train`` (benchmarks, tests, conversions); training
    writes its own bundle with the run's counters and runtime.
    """
    bundle = {"format": CHECKPOINT_FORMAT, "stage": "bundle", **provenance(), "config": model.config.to_dict(),
              "generator": model.generator.state_dict(), "discriminator": model.discriminator.state_dict(),
              "encoder": None if model.encoder is None else model.encoder.state_dict(),
              "calibration": model.calibration, "counters": {}}
    return save_atomic(bundle, path)


def load_run(run_dir: str | Path, *, device: str | torch.device = "cpu") -> FAnoGANModel:
    """Load the trained networks of a run for scoring or export.

    Uses ``model.pt`` when the encoder stage has finished, else the latest encoder checkpoint,
    else the latest GAN checkpoint (``encoder`` is then None).

    Parameters
    ----------
    run_dir : str or Path
        A run directory written by :func:`octpipe.models.fanogan.train.train_gan` /
        ``train_encoder`` (``octpipe train``).
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
    paths = RunPaths(Path(run_dir))
    for candidate in (paths.bundle, paths.checkpoint("encoder"), paths.checkpoint("gan")):
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
    model = FAnoGANModel(generator=g, discriminator=d, encoder=e, config=config, calibration=calibration,
                         run_dir=paths.root)
    for net in (g, d, e):
        if net is not None:
            net.requires_grad_(False)
    return model.to(device).eval()

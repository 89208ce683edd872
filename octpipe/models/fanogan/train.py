"""f-AnoGAN training: WGAN-GP (stage ``gan``), then the encoder (stage ``encoder``).

Follows FANOGAN-SPEC.md §1.3-1.4 (see :mod:`octpipe.models.fanogan.config` for every setting):

- **GAN**: Adam 1e-4, betas (0, 0.9) for G and D; gradient penalty λ = 10; 5 critic steps per
  generator step, each on a new real batch and new noise; z ~ N(0, I); random horizontal flips.
  The loop is the official one: each outer iteration is one G step (skipped the very first time)
  followed by ``critic_iters`` D steps. The length counts critic steps (official f-AnoGAN) or outer
  iterations (igul222), and both counters are logged. G runs in training mode (batch statistics)
  in both steps, but its BatchNorm moving averages are updated only in the generator step.
- **Encoder**: izi_f (default, κ = 1), izi or ziz; TF1 RMSProp; G in eval mode, G and D frozen;
  tanh or linear output; validation loss on held-out normal patches; then the held-out normal
  patches are scored and summarised in ``RUN/calibration.json`` and ``RUN/model.pt``.

Reproducibility and resuming
    Every random draw is a function of the seed and the step: the data order of an epoch is a
    seeded permutation (chunk windows, then patches within a window), flips come with it, and the
    noise of each step comes from a generator re-seeded with (seed, stage, rank, step). A
    checkpoint stores weights, optimiser states, counters, the data position, the global RNG
    states and the elapsed time, so a resumed run reproduces the losses of an uninterrupted run
    with the same seed (bit for bit on CPU with the same thread count).

Safety
    Losses stay on the device between log points; at each log point (and before every
    checkpoint) they are checked, and a non-finite loss, a Wasserstein estimate beyond
    ``gan.max_wasserstein`` or an encoder loss beyond ``encoder.max_loss`` stops the run with
    :class:`TrainingDiverged`. The bad state is never saved: the last checkpoint stays the last
    good one.

Several processes
    Under ``torchrun`` (``WORLD_SIZE`` > 1) the process group is initialised (gloo on CPU, NCCL on
    CUDA), G and D (or E) are wrapped in ``DistributedDataParallel``, every process takes its own
    slice of each global batch and uses its own noise, and only rank 0 writes files. ``batch_size``
    is per process.
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from octpipe.errors import ConfigError, OctpipeError
from octpipe.models.data import BatchStream, PatchSource
from octpipe.models.data import derive_seed as _seed
from octpipe.models.fanogan.checkpoint import (
    CHECKPOINT_FORMAT,
    RunPaths,
    capture_rng_state,
    check_resume_config,
    load_checkpoint,
    restore_rng_state,
    save_atomic,
    store_preprocessing,
    write_text_atomic,
)
from octpipe.models.fanogan.config import FAnoGANConfig, save_config
from octpipe.models.fanogan.losses import (
    izi_loss,
    izif_loss,
    wgan_generator_loss,
    wgan_gp_critic_loss,
    ziz_loss,
)
from octpipe.models.fanogan.model import FAnoGANModel, build_networks
from octpipe.models.fanogan.networks import bn_stat_updates
from octpipe.models.fanogan.optim import RMSpropTF
from octpipe.models.fanogan.runtime import (
    Runtime,
    all_mean,
    barrier,
    ddp,
    maybe_compile,
    place,
    to_device,
    training_runtime,
)
from octpipe.models.fanogan.samples import latent_prior, write_interpolation, write_samples
from octpipe.models.fanogan.score import (
    calibrate,
    score_patches,
)
from octpipe.provenance import provenance

__all__ = ["LOG_COLUMNS", "STAGES", "TrainingDiverged", "train", "train_gan", "train_encoder"]

#: Columns of ``RUN/log.csv`` (GAN rows leave ``step``, ``loss`` and ``val_loss`` empty; encoder
#: rows leave the GAN columns empty).
LOG_COLUMNS = ("stage", "critic_step", "generator_step", "step", "d_loss", "g_loss", "wasserstein", "gp",
               "loss", "val_loss", "seconds")
#: Training stages, in order.
STAGES = ("gan", "encoder")

# Stream ids that keep the seeded random streams of different purposes apart.
_S_GAN_DATA, _S_ENC_DATA, _S_CRITIC, _S_GEN, _S_ENC, _S_SAMPLES, _S_VAL, _S_SPLIT, _S_INIT = range(1, 10)


class TrainingDiverged(OctpipeError):
    """Training produced a non-finite or out-of-bounds loss; the last good checkpoint is kept."""


# --------------------------------------------------------------------------------------------
# Training data: the held-out normal patches
# --------------------------------------------------------------------------------------------
def _holdout(source: PatchSource, config: FAnoGANConfig, store: Path) -> tuple[np.ndarray, PatchSource | None,
                                                                                  np.ndarray, str]:
    """Training indices, and the held-out normal source and indices (``data`` section)."""
    data = config.data
    normal = np.flatnonzero(source.labels != 1)  # label 0, or -1 when unknown-health volumes were included
    if data.val_split is not None:
        val_source = PatchSource(store, data.val_split)
        val_idx = np.flatnonzero(val_source.labels == 0)
        return normal, val_source, val_idx, f"label-0 patches of split {data.val_split!r}"
    if data.val_fraction == 0 or len(normal) == 0:
        return normal, None, np.zeros(0, np.int64), "none"
    rng = np.random.default_rng(_seed(config.runtime.seed, _S_SPLIT))
    if data.val_unit == "volume":
        vols = np.unique(source.volume_numbers[normal])
        if len(vols) < 2:
            raise ConfigError(f"data.val_unit 'volume' needs at least 2 volumes in split {data.split!r}, found "
                              f"{len(vols)}; use val_unit: patch or a val_split")
        n_val = min(len(vols) - 1, max(1, round(data.val_fraction * len(vols))))
        held = np.sort(rng.choice(vols, n_val, replace=False))
        is_val = np.isin(source.volume_numbers[normal], held)
        what = f"{n_val} of {len(vols)} volumes of split {data.split!r}"
    else:
        n_val = min(len(normal) - 1, max(1, round(data.val_fraction * len(normal))))
        is_val = np.zeros(len(normal), bool)
        is_val[rng.choice(len(normal), n_val, replace=False)] = True
        what = f"{n_val} of {len(normal)} patches of split {data.split!r}"
    return normal[~is_val], source, normal[is_val], what


# --------------------------------------------------------------------------------------------
# Logging, samples, progress
# --------------------------------------------------------------------------------------------
def _fmt(v: float | None) -> str:
    return "" if v is None else f"{v:.7g}"


class _Log:
    """``RUN/log.csv`` (rank 0 only), optional TensorBoard, and the progress bar."""

    def __init__(self, paths: RunPaths, stage: str, *, keep: Callable[[dict[str, str]], bool], enabled: bool,
                 tensorboard: bool, progress: bool, total: int, done: int) -> None:
        self.enabled = enabled
        self.stage = stage
        self._fh = None
        self._writer = None
        self._tb = None
        self._bar = None
        if not enabled:
            return
        rows: list[dict[str, str]] = []
        if paths.log.is_file():
            with open(paths.log, newline="", encoding="utf-8") as fh:
                rows = [r for r in csv.DictReader(fh) if keep(r)]
        # Rewrite without the rows this run replaces (a resumed run drops rows after its checkpoint).
        lines = [",".join(LOG_COLUMNS)] + [",".join(r.get(c, "") or "" for c in LOG_COLUMNS) for r in rows]
        write_text_atomic(paths.log, "\n".join(lines) + "\n")
        self._fh = open(paths.log, "a", newline="", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self._writer = csv.writer(self._fh)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(paths.tensorboard))
        if progress:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeRemainingColumn(), TextColumn("{task.fields[losses]}"))
            self._task = self._bar.add_task(stage, total=total, completed=done, losses="")
            self._bar.start()

    def write(self, row: dict[str, float | int | str | None], tb_step: int) -> None:
        if not self.enabled:
            return
        self._writer.writerow([_fmt(v) if isinstance(v, float) or v is None else v  # type: ignore[union-attr]
                               for v in (row.get(c) for c in LOG_COLUMNS)])
        if self._tb is not None:
            for key in ("d_loss", "g_loss", "wasserstein", "gp", "loss", "val_loss"):
                v = row.get(key)
                if isinstance(v, float) and math.isfinite(v):
                    self._tb.add_scalar(f"{self.stage}/{key}", v, tb_step)

    def progress(self, done: int, text: str | None = None) -> None:
        if self._bar is not None:
            if text is None:
                self._bar.update(self._task, completed=done)
            else:
                self._bar.update(self._task, completed=done, losses=text)

    def flush(self) -> None:
        if self._fh is not None:
            self._fh.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._fh is not None:
            self._fh.close()
            self._fh = None


# --------------------------------------------------------------------------------------------
# Run directory bookkeeping
# --------------------------------------------------------------------------------------------
def _update_run_json(paths: RunPaths, store: Path, stage: str, info: dict[str, Any]) -> None:
    data: dict[str, Any] = {}
    if paths.run_json.is_file():
        try:
            data = json.loads(paths.run_json.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            data = {}
    data.update({**provenance(), "store": str(store)})
    data.setdefault("stages", {}).setdefault(stage, {}).update(info)
    write_text_atomic(paths.run_json, json.dumps(data, indent=2) + "\n")


def _write_config(paths: RunPaths, config: FAnoGANConfig) -> None:
    p = provenance()
    save_config(config, paths.config, header=f"resolved f-AnoGAN config written by octpipe {p['octpipe_version']} "
                                             f"(git {p['git_hash']}) on {p['created']}")


def _params_finite(*modules: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for m in modules for p in m.parameters())


def _checkpoint_base(stage: str, config: FAnoGANConfig, rt: Runtime) -> dict[str, Any]:
    return {"format": CHECKPOINT_FORMAT, "stage": stage, **provenance(), "config": config.to_dict(),
            "runtime": rt.describe()}


def _stage_inputs(store: str | Path, run_dir: str | Path, config: FAnoGANConfig | None
                  ) -> tuple[Path, RunPaths, FAnoGANConfig, PatchSource]:
    config = config or FAnoGANConfig()
    store = Path(store)
    source = PatchSource(store, config.data.split)
    size = config.model.image_size
    if source.patch_size != (size, size):
        raise ConfigError(f"patches of split {config.data.split!r} are {source.patch_size[0]}×{source.patch_size[1]} "
                          f"pixels but model.image_size is {size}")
    if config.model.channels != 1:
        raise ConfigError(f"patch stores hold single-channel patches; model.channels must be 1, got "
                          f"{config.model.channels}")
    store_preprocessing(store, (config.data.split, config.data.val_split))  # refuses mixed preprocessing
    if config.runtime.tensorboard:
        try:
            import torch.utils.tensorboard  # noqa: F401
        except ImportError:
            raise ConfigError("runtime.tensorboard is true but the tensorboard package is not installed "
                              "(pip install tensorboard)") from None
    return store, RunPaths(Path(run_dir)), config, source


class _Stage:
    """What both training stages share: log rows, divergence checks, checkpoints and ``run.json``.

    A stage sets ``name`` (``"gan"``, ``"encoder"``; its checkpoints and log rows), ``label``
    (in messages) and ``counter`` (the log column of its step count, :attr:`done`), and gives:
    ``_log_row(info, values)`` for one pending log point (the row, its TensorBoard step and,
    when the values diverged, the message), ``_progress_text()``, ``_trained()`` (the networks
    it trains), ``_state(t0)`` (its checkpoint), ``_total()``, ``_plan(total)`` (the
    ``run.json`` entry of a starting stage), ``_loop(log, t0, total)``, ``_finished(status,
    seconds)`` (the entry of an ending one) and ``_result(steps_run, seconds)``. A pending log
    point is ``(info, losses, time)``, the losses a tensor still on the device.
    """

    name: str
    label: str
    counter: str

    def __init__(self, store: Path, paths: RunPaths, config: FAnoGANConfig, rt: Runtime, *, progress: bool) -> None:
        self.store, self.paths, self.config, self.rt = store, paths, config, rt
        self.seed = config.runtime.seed
        self.progress_enabled = progress
        self.pending: list[tuple[Any, torch.Tensor, float]] = []
        self.last: dict[str, float | None] = {}
        self.last_good: Path | None = None
        self.resumed_from: int | None = None
        self.elapsed = 0.0

    @property
    def done(self) -> int:
        """Steps trained so far (the ``counter`` column)."""
        return int(getattr(self, self.counter))

    def _flush(self, log: _Log, t0: float) -> None:
        if not self.pending:
            return
        values = all_mean(torch.stack([p[1] for p in self.pending]), self.rt.dist).cpu().tolist()
        diverged = None
        for (info, _, t), v in zip(self.pending, values, strict=True):
            row, tb_step, diverged = self._log_row(info, v)
            log.write({**row, "seconds": round(self.elapsed + t - t0, 3)}, tb_step)
            if diverged is not None:
                break
        self.pending.clear()
        log.flush()
        if diverged is not None:
            keep = (f"last good checkpoint {self.last_good} is kept" if self.last_good
                    else "no checkpoint was written")
            raise TrainingDiverged(f"{diverged}; {keep}")
        log.progress(self.done, self._progress_text())

    def _save(self, log: _Log, t0: float, snapshot: bool) -> None:
        self._flush(log, t0)
        if not _params_finite(*self._trained()):
            raise TrainingDiverged(f"{self.label} training diverged at {self.counter.replace('_', ' ')} {self.done}: "
                                   f"non-finite weights; last good checkpoint {self.last_good or '(none)'} is kept")
        if self.rt.dist.main:
            state = self._state(t0)
            save_atomic(state, self.paths.checkpoint(self.name))
            if snapshot:
                save_atomic(state, self.paths.checkpoint(self.name, self.done))
        self.last_good = self.paths.checkpoint(self.name)

    def _kept_row(self, row: dict[str, str]) -> bool:
        """Rows of an earlier ``log.csv`` that stay: other stages', and this one's up to the resumed step."""
        return row.get("stage") != self.name or (self.resumed_from is not None and row.get(self.counter, "") != ""
                                                 and int(row[self.counter]) <= self.resumed_from)

    def run(self) -> dict[str, Any]:
        """Train the stage to its end; returns :meth:`_result`."""
        d = self.rt.dist
        total = self._total()
        if d.main:
            _update_run_json(self.paths, self.store, self.name,
                             {"status": "running", **self.rt.describe(), **self._plan(total)})
        start_step = self.done
        log = _Log(self.paths, self.name, keep=self._kept_row, enabled=d.main,
                   tensorboard=self.config.runtime.tensorboard, progress=self.progress_enabled and d.main,
                   total=total, done=self.done)
        t0 = time.perf_counter()
        status = "interrupted"
        try:
            self._loop(log, t0, total)
            status = "complete"
        except TrainingDiverged:
            status = "diverged"
            raise
        except Exception:
            status = "failed"
            raise
        finally:
            log.close()
            seconds = round(self.elapsed + time.perf_counter() - t0, 3)
            if d.main:
                _update_run_json(self.paths, self.store, self.name, self._finished(status, seconds))
        barrier(d)
        return self._result(self.done - start_step, seconds)


# --------------------------------------------------------------------------------------------
# GAN stage
# --------------------------------------------------------------------------------------------
def train_gan(
    store: str | Path,
    run_dir: str | Path,
    config: FAnoGANConfig | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Train the WGAN-GP generator and critic on the normal patches of a store.

    Parameters
    ----------
    store : str or Path
        A store with ``patches/<config.data.split>`` (patches labelled 1, a lesion, are never used).
    run_dir : str or Path
        The run directory (created). See :mod:`octpipe.models.fanogan.checkpoint` for its layout.
    config : FAnoGANConfig, optional
        Settings; the official ones by default.
    resume : bool, default False
        Continue from ``checkpoints/gan-last.pt`` (starts afresh when there is none). Only the
        length, output cadence and runtime settings may differ from the checkpoint's config.
    overwrite : bool, default False
        Delete the run directory's previous contents and start again.
    progress : bool, default False
        Show a progress bar with the losses and the Wasserstein estimate (rank 0).

    Returns
    -------
    dict
        ``stage``, ``critic_step``, ``generator_step``, ``resumed_from`` (critic step or None),
        ``checkpoint``, ``last`` (the last logged losses), ``seconds``, ``runtime``, ``held_out``.

    Raises
    ------
    OctpipeError
        If the run already has a GAN checkpoint and neither ``resume`` nor ``overwrite`` is set,
        or the store lacks the patches.
    ConfigError
        If the settings do not fit the data, or differ from the checkpoint's when resuming.
    TrainingDiverged
        If a loss becomes non-finite or leaves its bound (the last good checkpoint is kept).
    """
    store, paths, config, source = _stage_inputs(store, run_dir, config)
    with training_runtime(config) as rt:
        return _GANTrainer(store, paths, config, source, rt, resume=resume, overwrite=overwrite,
                           progress=progress).run()


def _existing_checkpoint(paths: RunPaths, stage: str, config: FAnoGANConfig, *, resume: bool, overwrite: bool,
                         what: str, restart: str) -> dict | None:
    """The stage's last checkpoint when resuming (its config checked), None for a fresh start."""
    path = paths.checkpoint(stage)
    if not path.is_file() or overwrite:
        return None
    if not resume:
        raise OctpipeError(f"the run already has {what}; pass --resume to continue it or --overwrite to {restart}",
                           paths.root)
    ckpt = load_checkpoint(path)
    check_resume_config(ckpt["config"], config, ("model", "data", stage, "runtime"))
    return ckpt


class _GANTrainer(_Stage):
    name, label, counter = "gan", "GAN", "critic_step"

    def __init__(self, store: Path, paths: RunPaths, config: FAnoGANConfig, source: PatchSource, rt: Runtime, *,
                 resume: bool, overwrite: bool, progress: bool) -> None:
        super().__init__(store, paths, config, rt, progress=progress)
        self.cfg = config.gan
        d = rt.dist
        ckpt = _existing_checkpoint(paths, "gan", config, resume=resume, overwrite=overwrite,
                                    what="a GAN checkpoint", restart="start again")
        barrier(d)  # every rank has read the checkpoint before rank 0 may delete it
        if d.main:
            if overwrite and paths.root.exists():
                paths.remove_own()  # only the run's files: a user's other files in the folder stay
            paths.root.mkdir(parents=True, exist_ok=True)
            _write_config(paths, config)
        barrier(d)

        train_idx, _, val_idx, self.held_out = _holdout(source, config, store)
        self.n_train, self.n_val = len(train_idx), len(val_idx)
        self.stream = BatchStream(source, train_idx, batch_size=self.cfg.batch_size, d=d, seed=self.seed,
                                   stream=_S_GAN_DATA, hflip=self.cfg.hflip, window=config.data.shuffle_chunks)

        torch.manual_seed(_seed(self.seed, _S_INIT))
        g, dnet, _ = build_networks(config)
        self.critic_step = 0
        self.generator_step = 0
        if ckpt is not None:
            g.load_state_dict(ckpt["generator"])
            dnet.load_state_dict(ckpt["discriminator"])
            self.critic_step = int(ckpt["counters"]["critic_step"])
            self.generator_step = int(ckpt["counters"]["generator_step"])
            self.elapsed = float(ckpt["counters"].get("seconds", 0.0))
            self.stream.load_state(ckpt["data"])
        self.resumed_from = self.critic_step if ckpt is not None else None
        self.g = place(g, rt).train()
        self.d = place(dnet, rt).train()
        betas = self.cfg.betas
        self.opt_g = torch.optim.Adam(self.g.parameters(), lr=self.cfg.lr, betas=betas)
        self.opt_d = torch.optim.Adam(self.d.parameters(), lr=self.cfg.lr, betas=betas)
        if ckpt is not None:
            self.opt_g.load_state_dict(ckpt["optimizers"]["generator"])
            self.opt_d.load_state_dict(ckpt["optimizers"]["discriminator"])
            restore_rng_state(ckpt["rng"])
        self.last_good = paths.checkpoint("gan") if ckpt is not None else None
        # Training views: DDP for gradient sync, torch.compile for G only (D needs double backward).
        self.g_train = maybe_compile(ddp(self.g, rt), rt)
        self.g_sample = maybe_compile(self.g, rt)
        self.d_train = ddp(self.d, rt)
        self.noise = torch.Generator()

    # ---- steps -------------------------------------------------------------------------------
    def _z(self, stream: int, step: int) -> torch.Tensor:
        self.noise.manual_seed(_seed(self.seed, stream, self.rt.dist.rank, step))
        z = latent_prior(self.cfg.batch_size, self.config.model.latent_dim, self.cfg.prior, self.noise)
        return z.to(self.rt.device, non_blocking=True)

    def _critic_step(self) -> torch.Tensor:
        real = to_device(self.stream.next(), self.rt)
        z = self._z(_S_CRITIC, self.critic_step)  # also seeds the α draws of the penalty
        with torch.no_grad(), bn_stat_updates(self.g, enabled=False), self.rt.amp():
            fake = self.g_sample(z)
        fake = fake.float().contiguous(memory_format=self.rt.memory_format)
        with self.rt.amp():
            loss, stats = wgan_gp_critic_loss(self.d_train, real, fake, gp_weight=self.cfg.gp_weight,
                                              generator=self.noise)
        self.opt_d.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_d.step()
        return torch.stack([loss.detach().float(), stats["wasserstein"].float(),
                            stats["gradient_penalty"].float()])

    def _generator_step(self) -> torch.Tensor:
        z = self._z(_S_GEN, self.generator_step)
        self.d.requires_grad_(False)
        try:
            with self.rt.amp():
                loss = wgan_generator_loss(self.d, self.g_train(z))
            self.opt_g.zero_grad(set_to_none=True)
            loss.backward()
            self.opt_g.step()
        finally:
            self.d.requires_grad_(True)
        return loss.detach().float()

    # ---- bookkeeping -------------------------------------------------------------------------
    def _units(self, critic_step: int) -> int:
        return critic_step // self.cfg.critic_iters if self.cfg.count == "generator" else critic_step

    def _crossed(self, before: int, after: int, every: int) -> bool:
        return every > 0 and self._units(after) // every > self._units(before) // every

    def _log_row(self, info: tuple[int, int, bool], values: list[float]
                 ) -> tuple[dict[str, Any], int, str | None]:
        c, gs, has_g = info
        d_loss, w, gp, g_loss = values
        row = {"stage": "gan", "critic_step": c, "generator_step": gs, "d_loss": d_loss,
               "g_loss": g_loss if has_g else None, "wasserstein": w, "gp": gp}
        self.last = {"d_loss": d_loss, "g_loss": row["g_loss"], "wasserstein": w, "gp": gp}
        finite = all(math.isfinite(v) for v in (d_loss, w, gp) + ((g_loss,) if has_g else ()))
        if finite and abs(w) <= self.cfg.max_wasserstein:
            return row, c, None
        what = "a non-finite loss" if not finite else \
            f"|Wasserstein estimate| > gan.max_wasserstein ({self.cfg.max_wasserstein:g})"
        return row, c, (f"GAN training diverged at critic step {c} (generator step {gs}): {what} "
                        f"(d_loss={d_loss:.4g}, g_loss={_fmt(row['g_loss']) or '-'}, wasserstein={w:.4g}, "
                        f"gp={gp:.4g})")

    def _progress_text(self) -> str:
        return (f"D {self.last['d_loss']:.3f} G {_fmt(self.last['g_loss']) or '-'} "
                f"W {self.last['wasserstein']:.3f} GP {self.last['gp']:.3f}")

    def _trained(self) -> tuple[nn.Module, ...]:
        return self.g, self.d

    def _state(self, t0: float) -> dict[str, Any]:
        return {
            **_checkpoint_base("gan", self.config, self.rt),
            "generator": self.g.state_dict(), "discriminator": self.d.state_dict(), "encoder": None,
            "optimizers": {"generator": self.opt_g.state_dict(), "discriminator": self.opt_d.state_dict()},
            "counters": {"critic_step": self.critic_step, "generator_step": self.generator_step,
                         "seconds": round(self.elapsed + time.perf_counter() - t0, 3)},
            "data": self.stream.state(), "rng": capture_rng_state(), "held_out": self.held_out,
        }

    # ---- loop ----------------------------------------------------------------------------------
    def _total(self) -> int:
        return self.cfg.critic_steps_for(len(self.stream.indices) // self.stream.per_step)

    def _plan(self, total: int) -> dict[str, Any]:
        return {"held_out": self.held_out, "n_train": self.n_train, "n_held_out": self.n_val,
                "total_critic_steps": total, "count": self.cfg.count}

    def _loop(self, log: _Log, t0: float, total: int) -> None:
        cfg, d, k = self.cfg, self.rt.dist, self.cfg.critic_iters
        acc: torch.Tensor | None = None
        n_acc = 0
        g_loss: torch.Tensor | None = None
        boundary = self.critic_step
        while self.critic_step < total:
            if self.critic_step > 0 and self.critic_step % k == 0:
                g_loss = self._generator_step()
                self.generator_step += 1
            stats = self._critic_step()
            self.critic_step += 1
            acc = stats if acc is None else acc + stats
            n_acc += 1
            if self.critic_step % k and self.critic_step != total:
                continue
            row = torch.cat([acc / n_acc, (g_loss if g_loss is not None else acc.new_full((), math.nan))[None]])
            self.pending.append(((self.critic_step, self.generator_step, g_loss is not None), row,
                                 time.perf_counter()))
            acc, n_acc, g_loss = None, 0, None
            before, boundary = boundary, self.critic_step
            final = self.critic_step == total
            log.progress(self.critic_step)
            if final or self._crossed(before, boundary, cfg.checkpoint_every):
                self._save(log, t0, snapshot=self._crossed(before, boundary, cfg.snapshot_every) or final)
            elif self._crossed(before, boundary, cfg.log_every):
                self._flush(log, t0)
            if d.main and (self._crossed(before, boundary, cfg.sample_every) or final and cfg.sample_every):
                write_samples(self.g, self.paths.samples / f"gan-{self.critic_step:08d}.png",
                              _seed(self.seed, _S_SAMPLES), cfg.prior)
        if d.main:
            write_interpolation(self.g, self.paths.samples / "interpolation.png", _seed(self.seed, _S_SAMPLES, 1),
                                cfg.prior)

    def _finished(self, status: str, seconds: float) -> dict[str, Any]:
        return {"status": status, "critic_step": self.critic_step, "generator_step": self.generator_step,
                "seconds": seconds}

    def _result(self, steps_run: int, seconds: float) -> dict[str, Any]:
        return {"stage": "gan", "critic_step": self.critic_step, "generator_step": self.generator_step,
                "resumed_from": self.resumed_from, "steps_run": steps_run,
                "checkpoint": self.paths.checkpoint("gan"), "last": self.last, "seconds": seconds,
                "runtime": self.rt.describe(), "held_out": self.held_out}


# --------------------------------------------------------------------------------------------
# Encoder stage
# --------------------------------------------------------------------------------------------
def train_encoder(
    store: str | Path,
    run_dir: str | Path,
    config: FAnoGANConfig | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Train the encoder against the run's frozen GAN, then calibrate the anomaly scores.

    Parameters
    ----------
    store : str or Path
        The store the GAN was trained on.
    run_dir : str or Path
        A run directory with ``checkpoints/gan-last.pt``.
    config : FAnoGANConfig, optional
        Settings. ``model``, ``data`` and ``runtime.seed`` must equal the GAN's (so the held-out
        patches are the same ones).
    resume : bool, default False
        Continue from ``checkpoints/encoder-last.pt`` (starts afresh when there is none).
    overwrite : bool, default False
        Discard a previous encoder stage (checkpoints, log rows, calibration, model.pt).
    progress : bool, default False
        Show a progress bar (rank 0).

    Returns
    -------
    dict
        ``stage``, ``step``, ``resumed_from``, ``checkpoint``, ``last``, ``val_loss``,
        ``calibration`` (path or None), ``bundle``, ``seconds``, ``runtime``, ``held_out``.

    Raises
    ------
    OctpipeError
        If the run has no GAN checkpoint, or already has an encoder checkpoint and neither
        ``resume`` nor ``overwrite`` is set.
    ConfigError
        If the settings disagree with the GAN's or the checkpoint's.
    TrainingDiverged
        If the loss becomes non-finite or exceeds ``encoder.max_loss``.
    """
    store, paths, config, source = _stage_inputs(store, run_dir, config)
    with training_runtime(config) as rt:
        return _EncoderTrainer(store, paths, config, source, rt, resume=resume, overwrite=overwrite,
                               progress=progress).run()


class _EncoderTrainer(_Stage):
    name, label, counter = "encoder", "encoder", "step"

    def __init__(self, store: Path, paths: RunPaths, config: FAnoGANConfig, source: PatchSource, rt: Runtime, *,
                 resume: bool, overwrite: bool, progress: bool) -> None:
        super().__init__(store, paths, config, rt, progress=progress)
        self.cfg = config.encoder
        d = rt.dist
        ckpt = _existing_checkpoint(paths, "encoder", config, resume=resume, overwrite=overwrite,
                                    what="an encoder checkpoint", restart="train it again")
        if ckpt is not None:
            source_ckpt = ckpt
            gan_path = paths.checkpoint("gan")
            if gan_path.is_file():
                now = {k: int(v) for k, v in load_checkpoint(gan_path)["counters"].items()
                       if k in ("critic_step", "generator_step")}
                if now != ckpt.get("gan_steps", now):
                    raise ConfigError(f"cannot resume the encoder: the GAN was trained further since it started "
                                      f"(critic step {ckpt['gan_steps'].get('critic_step')} then, "
                                      f"{now['critic_step']} now); train the encoder again with --stage encoder "
                                      f"--overwrite")
        else:
            gan_path = paths.checkpoint("gan")
            if not gan_path.is_file():
                raise OctpipeError("the run has no GAN checkpoint (checkpoints/gan-last.pt); train the GAN stage "
                                   "first", paths.root)
            source_ckpt = load_checkpoint(gan_path)
            saved, new = source_ckpt["config"], config.to_dict()
            for section in ("model", "data"):
                for key, value in saved[section].items():
                    # the encoder's output constraint is the encoder's own choice
                    if key != "encoder_output" and new[section].get(key) != value:
                        raise ConfigError(f"{section}.{key} is {new[section].get(key)!r} but the GAN was trained "
                                          f"with {value!r}")
            if saved["runtime"]["seed"] != config.runtime.seed:
                raise ConfigError(f"runtime.seed is {config.runtime.seed} but the GAN was trained with seed "
                                  f"{saved['runtime']['seed']} (the held-out patches depend on it)")
        self.gan_steps = {k: int(v) for k, v in source_ckpt.get("counters", {}).items()
                          if k in ("critic_step", "generator_step")} if ckpt is None else ckpt.get("gan_steps", {})
        barrier(d)
        if d.main:
            paths.root.mkdir(parents=True, exist_ok=True)
            if overwrite or ckpt is None:
                for p in [*paths.checkpoints.glob("encoder-*.pt"), paths.calibration, paths.bundle]:
                    p.unlink(missing_ok=True)
            _write_config(paths, config)
        barrier(d)

        train_idx, val_source, val_idx, self.held_out = _holdout(source, config, store)
        self.val_source, self.val_idx = val_source, val_idx
        self.n_train = len(train_idx)
        self.stream = BatchStream(source, train_idx, batch_size=self.cfg.batch_size, d=d, seed=self.seed,
                                   stream=_S_ENC_DATA, hflip=self.cfg.hflip, window=config.data.shuffle_chunks)
        torch.manual_seed(_seed(self.seed, _S_INIT, 2))
        g, dnet, e = build_networks(config)
        g.load_state_dict(source_ckpt["generator"])
        dnet.load_state_dict(source_ckpt["discriminator"])
        self.step = 0
        if ckpt is not None:
            e.load_state_dict(ckpt["encoder"])
            self.step = int(ckpt["counters"]["step"])
            self.elapsed = float(ckpt["counters"].get("seconds", 0.0))
            self.stream.load_state(ckpt["data"])
        self.resumed_from = self.step if ckpt is not None else None
        self.g = place(g, rt).eval().requires_grad_(False)
        self.d = place(dnet, rt).eval().requires_grad_(False)
        self.e = place(e, rt).train()
        self.opt = RMSpropTF(self.e.parameters(), lr=self.cfg.lr, alpha=self.cfg.alpha, eps=self.cfg.eps)
        if ckpt is not None:
            self.opt.load_state_dict(ckpt["optimizers"]["encoder"])
            restore_rng_state(ckpt["rng"])
        self.last_good = paths.checkpoint("encoder") if ckpt is not None else None
        self.e_train = maybe_compile(ddp(self.e, rt), rt)
        self.g_fwd = maybe_compile(self.g, rt)
        self.d_feat = maybe_compile(self.d.features, rt)
        self.noise = torch.Generator()
        self.last_val: float | None = None
        self.calibration_path: Path | None = None

    def _loss(self, x: torch.Tensor | None, z: torch.Tensor | None, encoder: Callable[[torch.Tensor], torch.Tensor]
              ) -> torch.Tensor:
        mode = self.cfg.mode
        with self.rt.amp():
            if mode == "ziz":
                with torch.no_grad():
                    x_gen = self.g_fwd(z).float().contiguous(memory_format=self.rt.memory_format)
                return ziz_loss(z, encoder(x_gen).float())
            x_rec = self.g_fwd(encoder(x)).float()
            if mode == "izi":
                return izi_loss(x, x_rec)
            with torch.no_grad():
                feat_x = self.d_feat(x).float()
            return izif_loss(x, x_rec, feat_x, self.d_feat(x_rec).float(), kappa=self.cfg.kappa)

    def _batch(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if self.cfg.mode == "ziz":
            self.noise.manual_seed(_seed(self.seed, _S_ENC, self.rt.dist.rank, self.step))
            z = latent_prior(self.cfg.batch_size, self.config.model.latent_dim, self.config.gan.prior, self.noise)
            return None, z.to(self.rt.device)
        return to_device(self.stream.next(), self.rt), None

    def _train_step(self) -> torch.Tensor:
        x, z = self._batch()
        loss = self._loss(x, z, self.e_train)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss.detach().float()

    @torch.no_grad()
    def _validate(self) -> float | None:
        """Mean loss over at most ``val_batches`` held-out batches (E in eval mode); rank 0 only."""
        if not self.rt.dist.main:
            return None
        bs, nb = self.cfg.batch_size, self.cfg.val_batches
        self.e.eval()
        try:
            losses = []
            if self.cfg.mode == "ziz":
                gen = torch.Generator().manual_seed(_seed(self.seed, _S_VAL))
                for _ in range(nb):
                    z = latent_prior(bs, self.config.model.latent_dim, self.config.gan.prior, gen).to(self.rt.device)
                    losses.append(float(self._loss(None, z, self.e)))
            else:
                if self.val_source is None or len(self.val_idx) == 0:
                    return None
                for i in range(0, min(len(self.val_idx), bs * nb), bs):
                    x = self.val_source.read(self.val_idx[i:i + bs])[:, None]
                    losses.append(float(self._loss(to_device(x, self.rt), None, self.e)))
            return float(np.mean(losses))
        finally:
            self.e.train()

    def _log_row(self, info: tuple[int, float | None], values: float) -> tuple[dict[str, Any], int, str | None]:
        step, val = info
        loss = values
        self.last = {"loss": loss, "val_loss": val}
        row = {"stage": "encoder", "step": step, "loss": loss, "val_loss": val}
        if math.isfinite(loss) and loss <= self.cfg.max_loss:
            return row, step, None
        what = "a non-finite loss" if not math.isfinite(loss) else f"loss > encoder.max_loss ({self.cfg.max_loss:g})"
        return row, step, f"encoder training diverged at step {step}: {what} (loss={loss:.4g})"

    def _progress_text(self) -> str:
        val = f" val {self.last_val:.4f}" if self.last_val is not None else ""
        return f"{self.cfg.mode} {self.last['loss']:.4f}{val}"

    def _trained(self) -> tuple[nn.Module, ...]:
        return (self.e,)

    def _state(self, t0: float) -> dict[str, Any]:
        return {
            **_checkpoint_base("encoder", self.config, self.rt),
            "generator": self.g.state_dict(), "discriminator": self.d.state_dict(), "encoder": self.e.state_dict(),
            "optimizers": {"encoder": self.opt.state_dict()},
            "counters": {"step": self.step, "seconds": round(self.elapsed + time.perf_counter() - t0, 3)},
            "gan_steps": self.gan_steps, "data": self.stream.state(), "rng": capture_rng_state(),
            "held_out": self.held_out,
        }

    def _calibrate(self) -> tuple[Path | None, dict[str, Any] | None]:
        if self.val_source is None or len(self.val_idx) == 0:
            return None, None
        model = FAnoGANModel(self.g, self.d, self.e, self.config)
        src, idx, bs = self.val_source, self.val_idx, max(self.cfg.batch_size, 256)
        blocks = (src.read(idx[i:i + bs])[:, None] for i in range(0, len(idx), bs))
        scores = score_patches(model, blocks, batch_size=bs, device=self.rt.device, precision=self.rt.precision,
                               channels_last=self.rt.channels_last)
        self.e.train()  # score_patches put the networks in eval mode
        self.g.eval()
        cal = calibrate(scores, source=self.held_out)
        cal.update({**provenance(), "kappa": self.cfg.kappa, "encoder_step": self.step})
        write_text_atomic(self.paths.calibration, json.dumps(cal) + "\n")
        return self.paths.calibration, cal

    def _total(self) -> int:
        return self.cfg.iterations

    def _plan(self, total: int) -> dict[str, Any]:
        return {"mode": self.cfg.mode, "held_out": self.held_out, "n_train": self.n_train,
                "n_held_out": int(len(self.val_idx)), "iterations": total, "gan_steps": self.gan_steps}

    def _loop(self, log: _Log, t0: float, total: int) -> None:
        cfg, d = self.cfg, self.rt.dist
        while self.step < total:
            before = self.step
            loss = self._train_step()
            self.step += 1
            final = self.step == total
            val = None
            if final or (cfg.val_every and self.step // cfg.val_every > before // cfg.val_every):
                val = self.last_val = self._validate()
            self.pending.append(((self.step, val), loss, time.perf_counter()))
            log.progress(self.step)
            if final or self.step // cfg.checkpoint_every > before // cfg.checkpoint_every:
                snap = final or (cfg.snapshot_every > 0 and self.step // cfg.snapshot_every >
                                 before // cfg.snapshot_every)
                self._save(log, t0, snapshot=snap)
            elif self.step // cfg.log_every > before // cfg.log_every:
                self._flush(log, t0)
        if d.main:
            self.calibration_path, cal = self._calibrate()
            bundle = {**_checkpoint_base("bundle", self.config, self.rt), "generator": self.g.state_dict(),
                      "discriminator": self.d.state_dict(), "encoder": self.e.state_dict(),
                      "calibration": cal, "counters": {"step": self.step, **self.gan_steps},
                      "preprocess": store_preprocessing(self.store, (self.config.data.split,
                                                                     self.config.data.val_split))}
            save_atomic(bundle, self.paths.bundle)

    def _finished(self, status: str, seconds: float) -> dict[str, Any]:
        return {"status": status, "step": self.step, "seconds": seconds, "val_loss": self.last_val}

    def _result(self, steps_run: int, seconds: float) -> dict[str, Any]:
        return {"stage": "encoder", "step": self.step, "resumed_from": self.resumed_from,
                "steps_run": steps_run, "checkpoint": self.paths.checkpoint("encoder"),
                "last": self.last, "val_loss": self.last_val, "calibration": self.calibration_path,
                "bundle": self.paths.bundle, "seconds": seconds, "runtime": self.rt.describe(),
                "held_out": self.held_out}


# --------------------------------------------------------------------------------------------
# Both stages
# --------------------------------------------------------------------------------------------
def train(
    store: str | Path,
    run_dir: str | Path,
    config: FAnoGANConfig | None = None,
    *,
    stage: str = "all",
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = False,
) -> dict[str, dict[str, Any]]:
    """Run the GAN stage, the encoder stage, or both (``stage='all'``).

    Parameters
    ----------
    store, run_dir, config, resume, overwrite, progress
        As for :func:`train_gan` and :func:`train_encoder`. With ``stage='all'`` and
        ``overwrite=True`` the whole run directory is started again.
    stage : {'gan', 'encoder', 'all'}, default 'all'
        What to train.

    Returns
    -------
    dict
        ``{stage_name: result}`` for each stage run.

    Raises
    ------
    ConfigError
        If ``stage`` is unknown (and as the stages raise).
    """
    if stage not in (*STAGES, "all"):
        raise ConfigError(f"stage must be gan, encoder or all, got {stage!r}")
    out: dict[str, dict[str, Any]] = {}
    if stage in ("gan", "all"):
        out["gan"] = train_gan(store, run_dir, config, resume=resume, overwrite=overwrite, progress=progress)
    if stage in ("encoder", "all"):
        out["encoder"] = train_encoder(store, run_dir, config, resume=resume,
                                       overwrite=overwrite and stage == "encoder", progress=progress)
    return out


"""Shared pieces of the baseline methods: configuration, training data, batching, scoring.

Every baseline follows one shape: ``Method.train(data, config) -> Method`` and
``method.score(patches) -> {score name: (N,) float32}``. ``data`` is either a store with a
``patches/train`` split (``octpipe patches STORE --split train``) or an array of patches
``(N, H, W)`` / ``(N, 1, H, W)`` with values in [-1, 1]. :class:`PatchScorer` is that
scoring contract, batched once for every method; :func:`reconstruction_scores` computes
``A_R``, ``A_D`` and ``A`` as f-AnoGAN does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

__all__ = [
    "BaselineConfig",
    "PatchData",
    "load_patches",
    "as_images",
    "batched",
    "apply_batched",
    "training_batches",
    "image_residual",
    "reconstruction_scores",
    "PatchScorer",
    "ReconstructionScorer",
]

#: Patches as an array or a store path.
PatchData = str | Path | npt.NDArray[np.floating] | torch.Tensor


@dataclass(frozen=True)
class BaselineConfig:
    """Settings shared by the trained baselines (AE, AdvAE, ALI).

    Parameters
    ----------
    image_size : int, default 64
        Patch side (a multiple of 16), as in f-AnoGAN.
    dim : int, default 64
        Base channel count of the ResNet backbones (f-AnoGAN ``model.dim``).
    latent_dim : int, default 128
        Size of the latent code.
    iterations : int, default 50000
        Optimiser steps of the encoder/decoder (AE, AdvAE) or generator steps (ALI).
    batch_size : int, default 64
        Patches per step.
    lr : float, default 1e-4
        Adam learning rate.
    betas : (float, float), default (0.5, 0.999)
        Adam betas. ALI's paper used (0.5, 1e-3); set them here for it.
    adv_weight : float, default 0.01
        AdvAE: weight of the adversarial term added to the reconstruction MSE.
    gp_weight : float, default 10.0
        AdvAE: WGAN-GP gradient-penalty weight of its critic.
    critic_iters : int, default 1
        AdvAE: critic steps per encoder/decoder step.
    kappa : float, default 1.0
        κ of the score ``A = A_R + κ·A_D`` (AdvAE and ALI).
    hflip : bool, default True
        Random horizontal flips of training patches.
    max_train_patches : int, default 0
        Read at most this many training patches from a store (0 = all).
    seed : int, default 0
        Seeds weights, batch order and noise.
    threads : int, default 0
        ``torch.set_num_threads`` during training and scoring (0 = leave as is).
    device : str, default 'cpu'
        ``cpu`` or ``cuda``.

    Raises
    ------
    ValueError
        If a value is out of range.

    Examples
    --------
    >>> BaselineConfig.tiny().image_size
    32
    """

    image_size: int = 64
    dim: int = 64
    latent_dim: int = 128
    iterations: int = 50000
    batch_size: int = 64
    lr: float = 1e-4
    betas: tuple[float, float] = (0.5, 0.999)
    adv_weight: float = 0.01
    gp_weight: float = 10.0
    critic_iters: int = 1
    kappa: float = 1.0
    hflip: bool = True
    max_train_patches: int = 0
    seed: int = 0
    threads: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        for name in ("image_size", "dim", "latent_dim", "iterations", "batch_size", "critic_iters"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.image_size % 16:
            raise ValueError(f"image_size must be a multiple of 16, got {self.image_size}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        for name in ("adv_weight", "gp_weight", "kappa"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_train_patches < 0 or self.seed < 0 or self.threads < 0:
            raise ValueError("max_train_patches, seed and threads must be >= 0")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")

    @classmethod
    def tiny(cls, **overrides: Any) -> BaselineConfig:
        """Test-sized settings: 32×32 patches, 8 base channels, 16-d latent, 20 steps of 16."""
        base = dict(image_size=32, dim=8, latent_dim=16, iterations=20, batch_size=16, threads=1)
        return cls(**{**base, **overrides})

    def replace(self, **changes: Any) -> BaselineConfig:
        """Return a copy with ``changes`` applied (validated)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-safe values."""
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d


def load_patches(data: PatchData, *, split: str = "train", max_patches: int = 0, seed: int = 0
                 ) -> npt.NDArray[np.float32]:
    """Patches as a float32 ``(N, H, W)`` array, from an array or ``STORE/patches/<split>``.

    Parameters
    ----------
    data : path, array or tensor
        A store or the patches themselves (``(N, H, W)`` or ``(N, 1, H, W)``).
    split : str, default 'train'
        Split read from a store.
    max_patches : int, default 0
        Keep at most this many (a seeded random subset, in store order); 0 = all.
    seed : int, default 0
        Seed of the subset.

    Returns
    -------
    ndarray
        float32, ``(N, H, W)``.

    Raises
    ------
    OctpipeError
        If the store has no such split.
    ValueError
        If the array has the wrong shape.

    Examples
    --------
    >>> load_patches(np.zeros((5, 1, 32, 32)), max_patches=3).shape
    (3, 32, 32)
    """
    if isinstance(data, str | Path):
        from octpipe.store import open_patch_split

        xs = open_patch_split(data, split)["x"]
        n = int(xs.shape[0])
        if max_patches and n > max_patches:
            keep = np.sort(np.random.default_rng(seed).choice(n, max_patches, replace=False))
            return np.asarray(xs.get_orthogonal_selection((keep, slice(None), slice(None))), dtype=np.float32)
        return np.asarray(xs[...], dtype=np.float32)
    arr = data.detach().cpu().numpy() if isinstance(data, torch.Tensor) else np.asarray(data)
    if arr.ndim == 4 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 3:
        raise ValueError(f"patches must have shape (N, H, W) or (N, 1, H, W), got {arr.shape}")
    arr = arr.astype(np.float32, copy=False)
    if max_patches and len(arr) > max_patches:
        keep = np.sort(np.random.default_rng(seed).choice(len(arr), max_patches, replace=False))
        arr = arr[keep]
    return arr


def as_images(x: npt.ArrayLike | torch.Tensor) -> torch.Tensor:
    """``(N, 1, H, W)`` float32 tensor from ``(N, H, W)`` or ``(N, 1, H, W)`` input (never mutates)."""
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    t = t.float()
    if t.ndim == 3:
        t = t[:, None]
    if t.ndim != 4 or t.shape[1] != 1:
        raise ValueError(f"patches must have shape (N, H, W) or (N, 1, H, W), got {tuple(t.shape)}")
    return t


def batched(n: int, batch_size: int) -> Iterator[slice]:
    """Slices covering ``range(n)`` in order, the last one partial."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


def apply_batched(fn: Callable[[torch.Tensor], dict[str, torch.Tensor]], x: npt.ArrayLike | torch.Tensor, *,
                  batch_size: int = 256, device: str = "cpu") -> dict[str, npt.NDArray[np.float32]]:
    """Run ``fn`` on batches of patches under ``inference_mode`` and concatenate its outputs.

    Parameters
    ----------
    fn : callable
        Batch ``(B, 1, H, W)`` on ``device`` → dict of ``(B, ...)`` tensors.
    x : array or tensor
        Patches.
    batch_size : int, default 256
        Patches per call.
    device : str, default 'cpu'
        Where ``fn`` runs.

    Returns
    -------
    dict of str to ndarray
        float32 arrays, concatenated along the first axis.
    """
    images = as_images(x)
    parts: dict[str, list[np.ndarray]] = {}
    with torch.inference_mode():
        for sl in batched(images.shape[0], batch_size):
            out = fn(images[sl].to(device))
            for k, v in out.items():
                parts.setdefault(k, []).append(v.float().cpu().numpy())
    if not parts:
        probe = {}
        with torch.inference_mode():
            probe = fn(images[:1].to(device)) if images.shape[0] else {}
        return {k: np.zeros((0, *v.shape[1:]), np.float32) for k, v in probe.items()}
    return {k: np.ascontiguousarray(np.concatenate(v), dtype=np.float32) for k, v in parts.items()}


def training_batches(x: npt.NDArray[np.float32], batch_size: int, *, seed: int, hflip: bool,
                     device: str = "cpu") -> Iterator[torch.Tensor]:
    """Endless shuffled batches ``(B, 1, H, W)`` (epoch-wise permutations, random flips).

    Parameters
    ----------
    x : ndarray
        Training patches ``(N, H, W)``.
    batch_size : int
        Batch size (clipped to N).
    seed : int
        Seeds the order and the flips.
    hflip : bool
        Flip each patch left-right with probability 0.5.
    device : str
        Where the batches go.

    Yields
    ------
    torch.Tensor
    """
    if len(x) == 0:
        raise ValueError("no training patches")
    rng = np.random.default_rng(seed)
    b = min(batch_size, len(x))
    while True:
        order = rng.permutation(len(x))
        for start in range(0, len(order) - b + 1, b):
            batch = x[order[start:start + b]]
            if hflip:
                flip = rng.random(b) < 0.5
                batch = np.where(flip[:, None, None], batch[:, :, ::-1], batch)
            yield torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))[:, None].to(device)


def image_residual(x: torch.Tensor, x_rec: torch.Tensor) -> torch.Tensor:
    """Per-patch mean squared image residual ``A_R`` (float32, shape ``(N,)``)."""
    return ((x.float() - x_rec.float()) ** 2).flatten(1).mean(1)


def reconstruction_scores(x: torch.Tensor, x_rec: torch.Tensor,
                          features: Callable[[torch.Tensor], torch.Tensor], *, kappa: float) -> dict[str, torch.Tensor]:
    """``A_R``, ``A_D`` and ``A = A_R + κ·A_D`` of a batch and its reconstruction.

    As f-AnoGAN scores (:func:`octpipe.models.fanogan.losses.anomaly_scores`), with the
    discriminator ``features`` of ``x`` and ``x_rec`` computed in one pass.

    Parameters
    ----------
    x, x_rec : torch.Tensor
        Patches and their reconstructions, ``(B, 1, H, W)``.
    features : callable
        The discriminator's feature layer, ``(2B, 1, H, W)`` → ``(2B, F)``.
    kappa : float
        κ, the weight of ``A_D``.

    Returns
    -------
    dict of str to torch.Tensor
        ``A_R``, ``A_D``, ``A``: each ``(B,)``.
    """
    from octpipe.models.fanogan.losses import anomaly_scores

    feats = features(torch.cat([x, x_rec]))
    n = x.shape[0]
    s = anomaly_scores(x, x_rec, feats[:n], feats[n:], kappa=kappa)
    return {"A_R": s.residual, "A_D": s.feature, "A": s.total}


class PatchScorer:
    """The scoring contract of the baselines: ``score(patches) -> {name: (N,) float32}``.

    A method names its scores in ``score_names`` and scores one batch in ``_scores``: a
    ``(B, 1, H, W)`` float32 tensor on :attr:`device` → ``{name: (B,) tensor}``.
    :meth:`score` runs it over the patches in batches, under ``torch.inference_mode`` and
    with :attr:`threads` torch threads; a method that batches otherwise overrides
    ``_score_all``.
    """

    score_names: tuple[str, ...] = ()
    #: ``torch.set_num_threads`` while scoring (0 = leave as is).
    threads: int = 0
    #: Where ``_scores`` runs.
    device: str = "cpu"
    _scores: Callable[[torch.Tensor], dict[str, torch.Tensor]]

    def _score_all(self, patches: npt.ArrayLike, batch_size: int) -> dict[str, npt.NDArray[np.float32]]:
        return apply_batched(self._scores, patches, batch_size=batch_size, device=self.device)

    def score(self, patches: npt.ArrayLike, *, batch_size: int = 256) -> dict[str, npt.NDArray[np.float32]]:
        """Per-patch anomaly scores (higher = more anomalous), one array per name of ``score_names``.

        Parameters
        ----------
        patches : array
            ``(N, H, W)`` or ``(N, 1, H, W)`` in [-1, 1].
        batch_size : int, default 256
            Patches per forward pass.

        Returns
        -------
        dict
            Score name to ``(N,)`` float32 (the class docstring says what each is).
        """
        with threads_context(self.threads):
            return self._score_all(patches, batch_size)


class ReconstructionScorer(PatchScorer):
    """A trained baseline that reconstructs its input, set up by a :class:`BaselineConfig`.

    A method gives ``reconstruct``: a batch ``(B, 1, H, W)`` → its reconstruction (eval
    mode). It scores with the config's threads and device, and :meth:`residual` is the
    pixel residual of the reconstruction.
    """

    config: BaselineConfig
    reconstruct: Callable[[torch.Tensor], torch.Tensor]

    @property
    def threads(self) -> int:  # type: ignore[override]
        """``config.threads``."""
        return self.config.threads

    @property
    def device(self) -> str:  # type: ignore[override]
        """``config.device``."""
        return self.config.device

    def residual(self, patches: npt.ArrayLike, *, batch_size: int = 256) -> npt.NDArray[np.float32]:
        """Pixel residual ``|x − reconstruct(x)|``, shape ``(N, H, W)``."""
        with threads_context(self.threads):
            out = apply_batched(lambda xb: {"r": (xb - self.reconstruct(xb)).abs()[:, 0]}, patches,
                                batch_size=batch_size, device=self.device)
        return out["r"]


class threads_context:  # noqa: N801 - used like a function
    """Set ``torch.set_num_threads(n)`` inside a ``with`` block (``n = 0`` leaves it alone)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.old = torch.get_num_threads()

    def __enter__(self) -> None:
        if self.n:
            torch.set_num_threads(self.n)

    def __exit__(self, *exc: object) -> None:
        if self.n:
            torch.set_num_threads(self.old)

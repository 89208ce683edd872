"""The WGAN discriminator score ``A_D`` (paper Eq. 6–7).

A WGAN critic does not output a probability of being real, so the paper scores a query image
by its distance to the mean critic output over training images:
``A_D(x) = m̂ − D(x)`` with ``m̂ = E_{x_t ~ P_r} D(x_t)`` over 32,000 randomly chosen training
patches. Higher means less like the training data. The critic is the trained f-AnoGAN WGAN's.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from octpipe.models.baselines.common import PatchData, PatchScorer, apply_batched, load_patches, threads_context
from octpipe.models.fanogan.checkpoint import load_run
from octpipe.models.fanogan.model import FAnoGANModel
from octpipe.models.fanogan.networks import Discriminator

__all__ = ["DiscriminatorScore", "PAPER_N_TRAIN"]

#: Training patches averaged for m̂ in the paper.
PAPER_N_TRAIN = 32000


class DiscriminatorScore(PatchScorer):
    """``A_D = m̂ − D(x)`` from a trained WGAN critic.

    Parameters
    ----------
    critic : Discriminator
        The trained critic (eval mode).
    mean_train : float
        m̂, the mean critic output over training patches.
    n_train : int
        How many training patches m̂ averages.
    threads : int
        ``torch.set_num_threads`` while scoring (0 = leave as is).

    Examples
    --------
    >>> d = Discriminator(dim=8, image_size=32).eval()
    >>> ad = DiscriminatorScore.train(np.zeros((4, 32, 32), np.float32), d)
    >>> float(ad.score(np.zeros((2, 32, 32), np.float32))["A_D"][0])
    0.0
    """

    name = "A_D"
    score_names = ("A_D",)

    def __init__(self, critic: Discriminator, mean_train: float, n_train: int, *, threads: int = 0) -> None:
        self.critic = critic.eval()
        self.mean_train = float(mean_train)
        self.n_train = int(n_train)
        self.threads = threads
        self.train_seconds = 0.0

    @classmethod
    def train(cls, data: PatchData, critic: Discriminator | FAnoGANModel | str, *, n_train: int = PAPER_N_TRAIN,
              seed: int = 0, batch_size: int = 256, threads: int = 0) -> DiscriminatorScore:
        """Compute m̂ over at most ``n_train`` randomly chosen training patches.

        Parameters
        ----------
        data : store path or array
            Training (normal) patches.
        critic : Discriminator, FAnoGANModel or run directory
            The trained WGAN critic.
        n_train : int, default 32000
            Patches averaged (all when fewer).
        seed : int, default 0
            Seed of the random choice.
        batch_size : int, default 256
            Patches per forward pass.
        threads : int, default 0
            ``torch.set_num_threads`` (0 = leave as is).

        Returns
        -------
        DiscriminatorScore
        """
        t0 = time.perf_counter()
        d = _critic(critic)
        x = load_patches(data, max_patches=n_train, seed=seed)
        if len(x) == 0:
            raise ValueError("need at least one training patch for the mean critic output")
        with threads_context(threads):
            out = apply_batched(lambda xb: {"d": d(xb)}, x, batch_size=batch_size,
                                device=str(next(d.parameters()).device))
        model = cls(d, float(np.mean(out["d"], dtype=np.float64)), len(x), threads=threads)
        model.train_seconds = time.perf_counter() - t0
        return model

    @property
    def device(self) -> str:  # type: ignore[override]
        """The critic's device."""
        return str(next(self.critic.parameters()).device)

    def _scores(self, xb: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"A_D": self.mean_train - self.critic(xb)}


def _critic(critic: Discriminator | FAnoGANModel | str) -> Discriminator:
    if isinstance(critic, Discriminator):
        return critic.eval()
    if isinstance(critic, FAnoGANModel):
        return critic.discriminator.eval()
    return load_run(critic).discriminator.eval()



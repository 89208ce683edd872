"""Convolutional autoencoder baseline (paper §3, "AE").

f-AnoGAN's ResNet encoder and generator trained jointly on the reconstruction MSE, scored with
the image residual only. The encoder is :class:`~octpipe.models.fanogan.networks.Encoder` with
a linear output (an AE has no prior to constrain the code to) and the decoder is the WGAN
:class:`~octpipe.models.fanogan.networks.Generator`, so the AE has exactly f-AnoGAN's
image→z→image architecture. The paper: "Since a standard AE architecture does not comprise a
discriminator, anomaly scoring was based on the image residual only."
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from octpipe.models.baselines.common import (
    BaselineConfig,
    PatchData,
    ReconstructionScorer,
    image_residual,
    load_patches,
    threads_context,
    training_batches,
)
from octpipe.models.fanogan.networks import Encoder, Generator

__all__ = ["Autoencoder"]


class Autoencoder(ReconstructionScorer):
    """A trained convolutional autoencoder (scores: ``A_R``, the mean squared image residual).

    Parameters
    ----------
    encoder : Encoder
        Image → code (linear output).
    decoder : Generator
        Code → image.
    config : BaselineConfig
        Its settings.
    history : list of float
        Training loss per step.

    Examples
    --------
    >>> ae = Autoencoder.train(np.zeros((8, 32, 32), np.float32), BaselineConfig.tiny(iterations=2))
    >>> sorted(ae.score(np.zeros((3, 32, 32), np.float32)))
    ['A_R']
    """

    name = "AE"
    score_names = ("A_R",)

    def __init__(self, encoder: Encoder, decoder: Generator, config: BaselineConfig,
                 history: list[float] | None = None) -> None:
        self.encoder = encoder.eval()
        self.decoder = decoder.eval()
        self.config = config
        self.history = history or []
        self.train_seconds = 0.0

    @staticmethod
    def build(config: BaselineConfig) -> tuple[Encoder, Generator]:
        """Fresh encoder and decoder for ``config`` (seeded)."""
        torch.manual_seed(config.seed)
        enc = Encoder(latent_dim=config.latent_dim, dim=config.dim, image_size=config.image_size, output="linear")
        dec = Generator(latent_dim=config.latent_dim, dim=config.dim, image_size=config.image_size)
        return enc, dec

    @classmethod
    def train(cls, data: PatchData, config: BaselineConfig, *, progress: Any = None) -> Autoencoder:
        """Train on normal patches with Adam on ``MSE(x, D(E(x)))``.

        Parameters
        ----------
        data : store path or array
            Normal training patches (see :func:`~octpipe.models.baselines.common.load_patches`).
        config : BaselineConfig
            Sizes, steps, optimiser.
        progress : callable, optional
            Called as ``progress(step, loss)`` after each step.

        Returns
        -------
        Autoencoder
        """
        x = load_patches(data, max_patches=config.max_train_patches, seed=config.seed)
        _check_size(x, config)
        t0 = time.perf_counter()
        with threads_context(config.threads):
            enc, dec = cls.build(config)
            enc.to(config.device).train()
            dec.to(config.device).train()
            opt = torch.optim.Adam([*enc.parameters(), *dec.parameters()], lr=config.lr, betas=config.betas)
            batches = training_batches(x, config.batch_size, seed=config.seed, hflip=config.hflip,
                                       device=config.device)
            history = []
            for step in range(config.iterations):
                xb = next(batches)
                loss = torch.mean((xb - dec(enc(xb))) ** 2)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                history.append(float(loss.detach()))
                if progress is not None:
                    progress(step + 1, history[-1])
        model = cls(enc, dec, config, history)
        model.train_seconds = time.perf_counter() - t0
        return model

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """``D(E(x))`` of a batch (eval mode)."""
        return self.decoder(self.encoder(x))

    def _scores(self, xb: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"A_R": image_residual(xb, self.reconstruct(xb))}

    def modules(self) -> dict[str, nn.Module]:
        """The networks by name."""
        return {"encoder": self.encoder, "decoder": self.decoder}


def _check_size(x: npt.NDArray[np.float32], config: BaselineConfig) -> None:
    if x.shape[1:] != (config.image_size, config.image_size):
        raise ValueError(f"patches are {x.shape[1:]} pixels but config.image_size is {config.image_size}")

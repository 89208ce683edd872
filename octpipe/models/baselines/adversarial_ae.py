"""Adversarial convolutional autoencoder baseline (paper §3, "AdvAE").

An autoencoder (f-AnoGAN's ResNet encoder with a linear output, and the ResNet generator as
decoder) trained jointly on "a loss function that combines an image residual term and an
adversarial term" (paper §1.2, after Pathak et al. 2016): a critic with f-AnoGAN's
discriminator architecture (LayerNorm) learns to tell training patches from reconstructions
with the WGAN-GP loss, and the autoencoder minimises ``MSE(x, x̂) − adv_weight·mean D(x̂)``.

Scores follow f-AnoGAN, "for AdvAE and ALI we added the discriminator feature residual
analogously to f-AnoGAN": ``A_R`` (image residual), ``A_D`` (mean squared residual of the
critic's features) and ``A = A_R + κ·A_D``.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from octpipe.models.baselines.autoencoder import Autoencoder, _check_size
from octpipe.models.baselines.common import (
    BaselineConfig,
    PatchData,
    load_patches,
    reconstruction_scores,
    threads_context,
    training_batches,
)
from octpipe.models.fanogan.losses import wgan_gp_critic_loss
from octpipe.models.fanogan.networks import Discriminator, Encoder, Generator

__all__ = ["AdversarialAutoencoder"]


class AdversarialAutoencoder(Autoencoder):
    """A trained adversarial autoencoder (scores: ``A_R``, ``A_D``, ``A``).

    Parameters
    ----------
    encoder, decoder : Encoder, Generator
        The autoencoder.
    critic : Discriminator
        The adversary; its features give ``A_D``.
    config : BaselineConfig
        Its settings.
    history : list of float
        Autoencoder loss per step.

    Examples
    --------
    >>> import numpy as np
    >>> m = AdversarialAutoencoder.train(np.zeros((8, 32, 32), np.float32), BaselineConfig.tiny(iterations=2))
    >>> sorted(m.score(np.zeros((3, 32, 32), np.float32)))
    ['A', 'A_D', 'A_R']
    """

    name = "AdvAE"
    score_names = ("A_R", "A_D", "A")

    def __init__(self, encoder: Encoder, decoder: Generator, critic: Discriminator, config: BaselineConfig,
                 history: list[float] | None = None) -> None:
        super().__init__(encoder, decoder, config, history)
        self.critic = critic.eval()

    @classmethod
    def train(cls, data: PatchData, config: BaselineConfig, *, progress: Any = None) -> AdversarialAutoencoder:
        """Train the autoencoder and its critic on normal patches.

        Each step runs ``config.critic_iters`` WGAN-GP critic updates (real patches against
        detached reconstructions; Adam lr, betas (0, 0.9) as in f-AnoGAN's WGAN), then one
        autoencoder update on ``MSE − adv_weight·mean D(x̂)`` (Adam ``config.lr``/``betas``).

        Parameters
        ----------
        data : store path or array
            Normal training patches.
        config : BaselineConfig
            Settings.
        progress : callable, optional
            ``progress(step, loss)`` after each step.

        Returns
        -------
        AdversarialAutoencoder
        """
        x = load_patches(data, max_patches=config.max_train_patches, seed=config.seed)
        _check_size(x, config)
        t0 = time.perf_counter()
        with threads_context(config.threads):
            enc, dec = Autoencoder.build(config)
            critic = Discriminator(dim=config.dim, image_size=config.image_size)
            for net in (enc, dec, critic):
                net.to(config.device).train()
            opt_ae = torch.optim.Adam([*enc.parameters(), *dec.parameters()], lr=config.lr, betas=config.betas)
            opt_d = torch.optim.Adam(critic.parameters(), lr=config.lr, betas=(0.0, 0.9))
            batches = training_batches(x, config.batch_size, seed=config.seed, hflip=config.hflip,
                                       device=config.device)
            gen = torch.Generator(device=config.device).manual_seed(config.seed + 1)
            history = []
            for step in range(config.iterations):
                for _ in range(config.critic_iters):
                    xb = next(batches)
                    with torch.no_grad():
                        fake = dec(enc(xb))
                    d_loss, _ = wgan_gp_critic_loss(critic, xb, fake, gp_weight=config.gp_weight, generator=gen)
                    opt_d.zero_grad(set_to_none=True)
                    d_loss.backward()
                    opt_d.step()
                xb = next(batches)
                x_rec = dec(enc(xb))
                for p in critic.parameters():
                    p.requires_grad_(False)
                loss = torch.mean((xb - x_rec) ** 2) - config.adv_weight * critic(x_rec).mean()
                for p in critic.parameters():
                    p.requires_grad_(True)
                opt_ae.zero_grad(set_to_none=True)
                loss.backward()
                opt_ae.step()
                history.append(float(loss.detach()))
                if progress is not None:
                    progress(step + 1, history[-1])
        model = cls(enc, dec, critic, config, history)
        model.train_seconds = time.perf_counter() - t0
        return model

    def _scores(self, xb: torch.Tensor) -> dict[str, torch.Tensor]:
        return reconstruction_scores(xb, self.reconstruct(xb), self.critic.features, kappa=self.config.kappa)

    def modules(self) -> dict[str, torch.nn.Module]:
        """The networks by name."""
        return {"encoder": self.encoder, "decoder": self.decoder, "critic": self.critic}

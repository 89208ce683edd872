"""ALI / BiGAN baseline in its originally proposed style (Dumoulin et al. 2016; Donahue et al. 2016).

The generator G (z → x) and the encoder E (x → z) are learned jointly with the GAN through a
discriminator on *pairs* ``D(x, z)``: real pairs ``(x, E(x))`` against generated pairs
``(G(z), z)``, ``z ~ N(0, I)``, with the standard (cross-entropy) GAN loss; G and E minimise
the non-saturating loss with swapped labels. As in ALI, the encoder is stochastic during
training (it outputs a mean and a log standard deviation, reparametrised), the discriminator
uses dropout 0.2 in its z and joint branches and leaky ReLUs, and Adam uses β1 = 0.5 (ALI used
lr 1e-4, betas (0.5, 1e-3); pass them in the config to reproduce that).

Backbones follow f-AnoGAN: G is the ResNet :class:`Generator`, E the ResNet :class:`Encoder`
and the x branch of D is the f-AnoGAN critic trunk (LayerNorm). Scoring uses the encoder's
mean, ``x̂ = G(E(x))``, and, as the paper does for ALI, ``A_R``, the x-branch feature residual
``A_D`` and ``A = A_R + κ·A_D``.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from octpipe.models.baselines.autoencoder import _check_size
from octpipe.models.baselines.common import (
    BaselineConfig,
    PatchData,
    ReconstructionScorer,
    load_patches,
    reconstruction_scores,
    threads_context,
    training_batches,
)
from octpipe.models.fanogan.networks import Discriminator, Encoder, Generator

__all__ = ["JointDiscriminator", "ALI"]


class JointDiscriminator(nn.Module):
    """ALI's discriminator ``D(x, z)`` → one logit per pair.

    x branch: the f-AnoGAN critic trunk (:meth:`Discriminator.features`); z branch: two linear
    layers (512 units, leaky ReLU 0.2, dropout); joint: two linear layers (1024 units) → logit.

    Parameters
    ----------
    latent_dim, dim, image_size : int
        Sizes, as for the f-AnoGAN networks.
    hidden : int, default 512
        Width of the z branch (the joint branch is twice as wide).
    dropout : float, default 0.2
        Dropout of the z and joint branches (ALI's value).

    Examples
    --------
    >>> d = JointDiscriminator(16, 8, 32).eval()
    >>> d(torch.zeros(2, 1, 32, 32), torch.zeros(2, 16)).shape
    torch.Size([2])
    """

    def __init__(self, latent_dim: int, dim: int, image_size: int, *, hidden: int = 512,
                 dropout: float = 0.2) -> None:
        super().__init__()
        self.x_branch = Discriminator(dim=dim, image_size=image_size)
        self.x_branch.output_linear = None  # only the trunk is used
        self.z_branch = nn.Sequential(
            nn.Linear(latent_dim, hidden), nn.LeakyReLU(0.2), nn.Dropout(dropout),
            nn.Linear(hidden, hidden), nn.LeakyReLU(0.2), nn.Dropout(dropout),
        )
        feature_dim = self.x_branch.feature_dim
        self.joint = nn.Sequential(
            nn.Linear(feature_dim + hidden, 2 * hidden), nn.LeakyReLU(0.2), nn.Dropout(dropout),
            nn.Linear(2 * hidden, 1),
        )

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Features of the x branch, shape ``(N, feature_dim)``."""
        return self.x_branch.features(x)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Logit that ``(x, z)`` is a real pair ``(x, E(x))``, shape ``(N,)``."""
        h = torch.cat([self.features(x), self.z_branch(z)], dim=1)
        return self.joint(h).squeeze(1)


class ALI(ReconstructionScorer):
    """A trained ALI/BiGAN (scores: ``A_R``, ``A_D``, ``A``).

    Parameters
    ----------
    encoder : Encoder
        Outputs ``2·latent_dim`` values: the mean and log standard deviation of q(z|x).
    generator : Generator
        z → x.
    discriminator : JointDiscriminator
        D(x, z).
    config : BaselineConfig
        Its settings.
    history : list of dict
        ``d_loss`` and ``g_loss`` per step.

    Examples
    --------
    >>> import numpy as np
    >>> m = ALI.train(np.zeros((8, 32, 32), np.float32), BaselineConfig.tiny(iterations=2))
    >>> m.score(np.zeros((3, 32, 32), np.float32))["A"].shape
    (3,)
    """

    name = "ALI"
    score_names = ("A_R", "A_D", "A")

    def __init__(self, encoder: Encoder, generator: Generator, discriminator: JointDiscriminator,
                 config: BaselineConfig, history: list[dict[str, float]] | None = None) -> None:
        self.encoder = encoder.eval()
        self.generator = generator.eval()
        self.discriminator = discriminator.eval()
        self.config = config
        self.history = history or []
        self.train_seconds = 0.0

    def encode(self, x: torch.Tensor, *, sample: bool = False, noise: torch.Generator | None = None
               ) -> torch.Tensor:
        """q(z|x): its mean, or a reparametrised sample when ``sample`` is True."""
        h = self.encoder(x)
        mu, log_sigma = h.chunk(2, dim=1)
        if not sample:
            return mu
        eps = torch.randn(mu.shape, generator=noise, device=mu.device)
        return mu + torch.exp(log_sigma.clamp(-10, 5)) * eps

    @classmethod
    def train(cls, data: PatchData, config: BaselineConfig, *, progress: Any = None) -> ALI:
        """Train G, E and D jointly on normal patches.

        Parameters
        ----------
        data : store path or array
            Normal training patches.
        config : BaselineConfig
            Settings (``iterations`` = joint steps: one D and one G/E update each).
        progress : callable, optional
            ``progress(step, g_loss)`` after each step.

        Returns
        -------
        ALI
        """
        x = load_patches(data, max_patches=config.max_train_patches, seed=config.seed)
        _check_size(x, config)
        t0 = time.perf_counter()
        with threads_context(config.threads):
            torch.manual_seed(config.seed)
            enc = Encoder(latent_dim=2 * config.latent_dim, dim=config.dim, image_size=config.image_size,
                          output="linear")
            gen_net = Generator(latent_dim=config.latent_dim, dim=config.dim, image_size=config.image_size)
            disc = JointDiscriminator(config.latent_dim, config.dim, config.image_size)
            model = cls(enc, gen_net, disc, config)
            for net in (enc, gen_net, disc):
                net.to(config.device).train()
            opt_d = torch.optim.Adam(disc.parameters(), lr=config.lr, betas=config.betas)
            opt_g = torch.optim.Adam([*enc.parameters(), *gen_net.parameters()], lr=config.lr, betas=config.betas)
            batches = training_batches(x, config.batch_size, seed=config.seed, hflip=config.hflip,
                                       device=config.device)
            noise = torch.Generator(device=config.device).manual_seed(config.seed + 1)
            history = []
            for step in range(config.iterations):
                xb = next(batches)
                n = xb.shape[0]
                z_prior = torch.randn(n, config.latent_dim, generator=noise, device=config.device)
                z_enc = model.encode(xb, sample=True, noise=noise)
                x_gen = gen_net(z_prior)
                real_logit = disc(xb, z_enc)
                fake_logit = disc(x_gen, z_prior)
                ones, zeros = torch.ones_like(real_logit), torch.zeros_like(real_logit)
                d_loss = (F.binary_cross_entropy_with_logits(real_logit, ones)
                          + F.binary_cross_entropy_with_logits(fake_logit, zeros))
                g_loss = (F.binary_cross_entropy_with_logits(real_logit, zeros)
                          + F.binary_cross_entropy_with_logits(fake_logit, ones))
                opt_d.zero_grad(set_to_none=True)
                d_grads = torch.autograd.grad(d_loss, list(disc.parameters()), retain_graph=True)
                opt_g.zero_grad(set_to_none=True)
                gen_params = [*enc.parameters(), *gen_net.parameters()]
                g_grads = torch.autograd.grad(g_loss, gen_params)
                for p, g in zip(disc.parameters(), d_grads, strict=True):
                    p.grad = g
                for p, g in zip(gen_params, g_grads, strict=True):
                    p.grad = g
                opt_d.step()
                opt_g.step()
                history.append({"d_loss": float(d_loss.detach()), "g_loss": float(g_loss.detach())})
                if progress is not None:
                    progress(step + 1, history[-1]["g_loss"])
        model.history = history
        for net in (enc, gen_net, disc):
            net.eval()
        model.train_seconds = time.perf_counter() - t0
        return model

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """``G(E(x))`` with the encoder mean (eval mode)."""
        return self.generator(self.encode(x))

    def _scores(self, xb: torch.Tensor) -> dict[str, torch.Tensor]:
        return reconstruction_scores(xb, self.reconstruct(xb), self.discriminator.features, kappa=self.config.kappa)

"""Iterative AnoGAN mapping on a trained WGAN (paper §3, "iterative", after Schlegl et al. 2017a).

For each query patch x a latent vector z is found by gradient descent on the AnoGAN loss

``L(z) = (1 − λ)·Σ|x − G(z)| + λ·Σ|f(x) − f(G(z))|``,  λ = 0.1,

where f is the critic's feature layer (the one f-AnoGAN's A_D uses). z starts uniform in
[-1, 1] and takes 300 Adam steps; after each step *stochastic clipping* (Lipton and Tripathi
2018, paper footnote 2) replaces every component outside [-1, 1] by a fresh uniform draw in
[-1, 1]. The anomaly score is the AnoGAN score, the loss at the final z (``A_anogan``); the
f-AnoGAN scores of the final reconstruction (``A_R``, ``A_D``, ``A = A_R + κ·A_D``) are
returned as well.

The patches of a batch are mapped together; every patch has its own z and the loss is a sum
over patches, so (with G and D in eval mode) each z follows exactly its own descent.
"""

from __future__ import annotations

import time

import numpy as np
import numpy.typing as npt
import torch

from octpipe.models.baselines.common import as_images, batched, reconstruction_scores, threads_context
from octpipe.models.fanogan.checkpoint import load_run
from octpipe.models.fanogan.model import FAnoGANModel
from octpipe.models.fanogan.networks import Discriminator, Generator

__all__ = ["IterativeAnoGAN", "stochastic_clip", "anogan_loss"]


def stochastic_clip(z: torch.Tensor, generator: torch.Generator | None = None, *, bound: float = 1.0
                    ) -> torch.Tensor:
    """Replace each component outside ``[-bound, bound]`` by a uniform draw in that range.

    Parameters
    ----------
    z : torch.Tensor
        Latent vectors (not modified).
    generator : torch.Generator, optional
        Source of the redraws.
    bound : float, default 1.0
        Half-width of the range.

    Returns
    -------
    torch.Tensor
        A new tensor, every value in ``[-bound, bound]``; values inside are unchanged.

    Examples
    --------
    >>> z = torch.tensor([[0.5, -3.0, 2.0]])
    >>> out = stochastic_clip(z, torch.Generator().manual_seed(0))
    >>> float(out[0, 0]), bool(out.abs().max() <= 1)
    (0.5, True)
    """
    fresh = (torch.rand(z.shape, generator=generator, device=z.device) * 2 - 1) * bound
    return torch.where(z.abs() > bound, fresh.to(z.dtype), z)


def anogan_loss(x: torch.Tensor, x_rec: torch.Tensor, f_x: torch.Tensor, f_rec: torch.Tensor, *,
                lam: float = 0.1) -> torch.Tensor:
    """Per-patch AnoGAN loss ``(1 − λ)·Σ|x − x̂| + λ·Σ|f(x) − f(x̂)|``, shape ``(N,)``.

    Examples
    --------
    >>> x = torch.zeros(1, 1, 2, 2)
    >>> float(anogan_loss(x, x + 1, torch.zeros(1, 3), torch.ones(1, 3), lam=0.1)[0])
    3.9
    """
    r = (x - x_rec).abs().flatten(1).sum(1)
    d = (f_x - f_rec).abs().flatten(1).sum(1)
    return (1.0 - lam) * r + lam * d


class IterativeAnoGAN:
    """AnoGAN's iterative z-mapping on a trained generator and critic.

    Parameters
    ----------
    generator, critic : Generator, Discriminator
        The trained WGAN (kept in eval mode, frozen).
    steps : int, default 300
        Updates of z per patch (the paper's 300).
    lam : float, default 0.1
        λ of the AnoGAN loss.
    lr : float, default 0.01
        Adam learning rate on z (the AnoGAN paper does not give it; at 0.01 a component can
        cross the whole [-1, 1] range within the 300 steps).
    kappa : float, default 1.0
        κ of the f-AnoGAN score ``A`` reported alongside.
    seed : int, default 0
        Seeds the initial z and the clipping redraws.
    threads : int, default 0
        ``torch.set_num_threads`` while mapping.

    Examples
    --------
    >>> g = Generator(latent_dim=16, dim=8, image_size=32).eval()
    >>> d = Discriminator(dim=8, image_size=32).eval()
    >>> it = IterativeAnoGAN(g, d, steps=2)
    >>> it.score(np.zeros((3, 32, 32), np.float32))["A_anogan"].shape
    (3,)
    """

    name = "iterative"
    score_names = ("A_anogan", "A_R", "A_D", "A")

    def __init__(self, generator: Generator, critic: Discriminator, *, steps: int = 300, lam: float = 0.1,
                 lr: float = 0.01, kappa: float = 1.0, seed: int = 0, threads: int = 0) -> None:
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"lam must be in [0, 1], got {lam}")
        self.generator = generator.eval()
        self.critic = critic.eval()
        self.steps = steps
        self.lam = lam
        self.lr = lr
        self.kappa = kappa
        self.seed = seed
        self.threads = threads
        self.last_seconds = 0.0
        self.last_losses: npt.NDArray[np.float32] | None = None

    @classmethod
    def from_model(cls, model: FAnoGANModel | str, **kwargs: float | int) -> IterativeAnoGAN:
        """From a trained f-AnoGAN (or its run directory); only G and D are used."""
        m = model if isinstance(model, FAnoGANModel) else load_run(model)
        kwargs.setdefault("kappa", m.kappa)
        return cls(m.generator, m.discriminator, **kwargs)  # type: ignore[arg-type]

    def map(self, x: torch.Tensor, *, generator: torch.Generator | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
        """Map one batch of images to latent vectors.

        Parameters
        ----------
        x : torch.Tensor
            ``(N, 1, H, W)``.
        generator : torch.Generator, optional
            Random source of the initial z and the redraws.

        Returns
        -------
        z : torch.Tensor
            ``(N, latent_dim)``, in [-1, 1].
        losses : torch.Tensor
            ``(steps + 1, N)``: the AnoGAN loss of each patch before each step and at the end.
        """
        g, d = self.generator, self.critic
        params = [*g.parameters(), *d.parameters()]
        saved = [p.requires_grad for p in params]
        for p in params:
            p.requires_grad_(False)
        try:
            with torch.no_grad():
                f_x = d.features(x)
            z = (torch.rand(x.shape[0], g.latent_dim, generator=generator, device=x.device) * 2 - 1)
            z.requires_grad_(True)
            opt = torch.optim.Adam([z], lr=self.lr)
            history = []
            for _ in range(self.steps):
                x_rec = g(z)
                loss = anogan_loss(x, x_rec, f_x, d.features(x_rec), lam=self.lam)
                history.append(loss.detach())
                opt.zero_grad(set_to_none=True)
                loss.sum().backward()
                opt.step()
                with torch.no_grad():
                    z.copy_(stochastic_clip(z, generator))
            with torch.no_grad():
                x_rec = g(z)
                history.append(anogan_loss(x, x_rec, f_x, d.features(x_rec), lam=self.lam))
        finally:
            for p, s in zip(params, saved, strict=True):
                p.requires_grad_(s)
        return z.detach(), torch.stack(history)

    def score(self, patches: npt.ArrayLike, *, batch_size: int = 64) -> dict[str, npt.NDArray[np.float32]]:
        """Map every patch and score it.

        Parameters
        ----------
        patches : array
            ``(N, H, W)`` or ``(N, 1, H, W)`` in [-1, 1].
        batch_size : int, default 64
            Patches mapped together.

        Returns
        -------
        dict
            ``A_anogan`` (the AnoGAN loss at the final z), ``A_R``, ``A_D`` and ``A``; each
            ``(N,)`` float32. ``self.last_losses`` keeps the ``(steps + 1, N)`` loss curves and
            ``self.last_seconds`` the wall time.
        """
        t0 = time.perf_counter()
        images = as_images(patches)
        device = next(self.generator.parameters()).device
        rand = torch.Generator(device=device).manual_seed(self.seed)
        out: dict[str, list[np.ndarray]] = {k: [] for k in self.score_names}
        curves = []
        with threads_context(self.threads):
            for sl in batched(images.shape[0], batch_size):
                xb = images[sl].to(device)
                z, losses = self.map(xb, generator=rand)
                with torch.no_grad():
                    scores = reconstruction_scores(xb, self.generator(z), self.critic.features, kappa=self.kappa)
                for k, v in (("A_anogan", losses[-1]), *scores.items()):
                    out[k].append(v.float().cpu().numpy())
                curves.append(losses.float().cpu().numpy())
        self.last_seconds = time.perf_counter() - t0
        self.last_losses = np.concatenate(curves, axis=1) if curves else np.zeros((self.steps + 1, 0), np.float32)
        return {k: (np.concatenate(v) if v else np.zeros(0)).astype(np.float32) for k, v in out.items()}

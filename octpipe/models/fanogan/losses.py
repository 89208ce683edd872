"""f-AnoGAN losses and anomaly scores (FANOGAN-SPEC.md §1.3-1.5, paper Eqs. 1-3).

- WGAN-GP critic and generator losses, as in ``wgangp_64x64.py``.
- Encoder losses: ``izi_f`` (the official, released one), plus ``izi`` and ``ziz`` written
  from the paper (they are not in the official repository).
- Per-image anomaly scores A_R, A_D and A = A_R + κ·A_D, as in ``anomaly_detection.py``: plain
  means, with no normalisation by training statistics.

Every function takes tensors (or a critic callable) and returns tensors; none changes its inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

__all__ = [
    "AnomalyScores",
    "wgan_gp_critic_loss",
    "wgan_generator_loss",
    "izi_loss",
    "izif_loss",
    "ziz_loss",
    "anomaly_scores",
    "latent_distances",
]

Critic = Callable[[torch.Tensor], torch.Tensor]


def _check_same_shape(a: torch.Tensor, b: torch.Tensor, names: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{names} must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")


def _check_batched(a: torch.Tensor, name: str) -> None:
    if a.ndim < 2 or a.shape[0] < 1:
        raise ValueError(f"{name} must have shape (N, ...) with N >= 1 and at least 2 dims, got {tuple(a.shape)}")


def _scores(critic: Critic, x: torch.Tensor) -> torch.Tensor:
    """Critic scores as a 1-D ``(N,)`` tensor (accepts critics returning ``(N,)`` or ``(N, 1)``)."""
    out = critic(x)
    if out.numel() != x.shape[0]:
        raise ValueError(f"critic must return one score per sample ({x.shape[0]}), got shape {tuple(out.shape)}")
    return out.reshape(x.shape[0])


def wgan_gp_critic_loss(
    critic: Critic,
    real: torch.Tensor,
    fake: torch.Tensor,
    *,
    gp_weight: float = 10.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """WGAN-GP critic loss: ``mean D(fake) − mean D(real) + λ·mean((‖∇D(x̂)‖₂ − 1)²)``.

    ``x̂ = real + α(fake − real)`` with ``α ~ U(0, 1)`` drawn once per sample. The gradient norm
    is taken over all of a sample's flattened elements (C·H·W), with no epsilon, and the penalty
    is built with ``create_graph=True`` so it back-propagates into the critic's parameters.

    Parameters
    ----------
    critic : callable
        Maps a batch ``(N, ...)`` to scores of shape ``(N,)`` or ``(N, 1)``. It is evaluated three
        times (real, fake, x̂), so per-sample normalisation (GroupNorm) is assumed.
    real, fake : torch.Tensor
        Batches of the same shape ``(N, C, H, W)`` (any memory format). ``fake`` is detached: the
        loss never back-propagates into the generator.
    gp_weight : float, default 10.0
        λ, the gradient-penalty weight.
    generator : torch.Generator, optional
        Source of α, for reproducible penalties. It may live on another device than ``real``.

    Returns
    -------
    loss : torch.Tensor
        Scalar loss to minimise with respect to the critic's parameters.
    stats : dict of str to torch.Tensor
        Detached scalars: ``'wasserstein'`` (mean D(real) − mean D(fake), the critic's estimate of
        the Wasserstein distance), ``'gradient_penalty'`` (the unweighted mean penalty),
        ``'critic_real'`` and ``'critic_fake'`` (mean scores). Call ``.item()`` only when logging
        to avoid device synchronisation on every step.

    Raises
    ------
    ValueError
        If ``real`` and ``fake`` differ in shape, ``gp_weight`` is negative or the critic returns
        the wrong number of scores.

    Examples
    --------
    >>> w = torch.zeros(1, 1, 2, 2); w[0, 0, 0, 0] = 1.0
    >>> critic = lambda x: (x * w).flatten(1).sum(1)   # a linear critic with unit-norm gradient
    >>> real, fake = torch.ones(3, 1, 2, 2), torch.zeros(3, 1, 2, 2)
    >>> loss, stats = wgan_gp_critic_loss(critic, real, fake)
    >>> float(loss), float(stats["gradient_penalty"])
    (-1.0, 0.0)
    """
    _check_batched(real, "real")
    _check_same_shape(real, fake, "real and fake")
    if gp_weight < 0:
        raise ValueError(f"gp_weight must be >= 0, got {gp_weight}")
    fake = fake.detach()
    n = real.shape[0]

    critic_real = _scores(critic, real).mean()
    critic_fake = _scores(critic, fake).mean()

    alpha_shape = (n,) + (1,) * (real.ndim - 1)
    alpha_device = generator.device if generator is not None else real.device
    alpha = torch.rand(alpha_shape, generator=generator, device=alpha_device, dtype=real.dtype).to(real.device)
    # x̂ is an input of the penalty, not a function of anything trainable.
    x_hat = (real.detach() + alpha * (fake - real.detach())).requires_grad_(True)
    scores_hat = _scores(critic, x_hat)
    (grad,) = torch.autograd.grad(scores_hat.sum(), x_hat, create_graph=True)
    slopes = torch.linalg.vector_norm(grad.reshape(n, -1), ord=2, dim=1)
    gradient_penalty = ((slopes - 1.0) ** 2).mean()

    loss = critic_fake - critic_real + gp_weight * gradient_penalty
    stats = {
        "wasserstein": (critic_real - critic_fake).detach(),
        "gradient_penalty": gradient_penalty.detach(),
        "critic_real": critic_real.detach(),
        "critic_fake": critic_fake.detach(),
    }
    return loss, stats


def wgan_generator_loss(critic: Critic, fake: torch.Tensor) -> torch.Tensor:
    """WGAN generator loss ``−mean D(fake)``.

    Parameters
    ----------
    critic : callable
        Maps ``(N, ...)`` to scores of shape ``(N,)`` or ``(N, 1)``.
    fake : torch.Tensor
        Generated batch, still attached to the generator's graph.

    Returns
    -------
    torch.Tensor
        Scalar loss.

    Raises
    ------
    ValueError
        If the critic returns the wrong number of scores.

    Examples
    --------
    >>> float(wgan_generator_loss(lambda x: x.flatten(1).sum(1), torch.ones(2, 1, 2, 2)))
    -4.0
    """
    _check_batched(fake, "fake")
    return -_scores(critic, fake).mean()


def izi_loss(x: torch.Tensor, x_rec: torch.Tensor) -> torch.Tensor:
    """Izi encoder loss (paper Eq. 2): MSE between images and reconstructions ``G(E(x))``.

    Parameters
    ----------
    x, x_rec : torch.Tensor
        Images and reconstructions of the same shape.

    Returns
    -------
    torch.Tensor
        Scalar mean of the squared residual over all elements of the batch.

    Raises
    ------
    ValueError
        If the shapes differ.

    Examples
    --------
    >>> float(izi_loss(torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2)))
    1.0
    """
    _check_same_shape(x, x_rec, "x and x_rec")
    return torch.mean((x - x_rec) ** 2)


def izif_loss(
    x: torch.Tensor,
    x_rec: torch.Tensor,
    feat_x: torch.Tensor,
    feat_rec: torch.Tensor,
    *,
    kappa: float = 1.0,
) -> torch.Tensor:
    """izi_f encoder loss (paper Eq. 3, official ``MSE`` loss): ``MSE(x, x_rec) + κ·MSE(f(x), f(x_rec))``.

    Both MSEs are means over all elements of the batch, as in ``z_encoding_izif.py``.

    Parameters
    ----------
    x, x_rec : torch.Tensor
        Images and reconstructions ``G(E(x))``, same shape.
    feat_x, feat_rec : torch.Tensor
        Discriminator features ``f(x)`` and ``f(G(E(x)))``, same shape ``(N, feature_dim)``.
    kappa : float, default 1.0
        κ, the weight of the feature term.

    Returns
    -------
    torch.Tensor
        Scalar loss.

    Raises
    ------
    ValueError
        If paired shapes differ or ``kappa`` is negative.

    Examples
    --------
    >>> x = torch.zeros(2, 1, 2, 2)
    >>> float(izif_loss(x, x + 1, torch.zeros(2, 3), torch.full((2, 3), 2.0), kappa=0.5))
    3.0
    """
    _check_same_shape(feat_x, feat_rec, "feat_x and feat_rec")
    if kappa < 0:
        raise ValueError(f"kappa must be >= 0, got {kappa}")
    return izi_loss(x, x_rec) + kappa * torch.mean((feat_x - feat_rec) ** 2)


def ziz_loss(z: torch.Tensor, z_rec: torch.Tensor) -> torch.Tensor:
    """Ziz encoder loss (paper Eq. 1): ``(1/d)·‖z − E(G(z))‖²``, averaged over the batch.

    Parameters
    ----------
    z, z_rec : torch.Tensor
        Sampled latent vectors and their reconstructions ``E(G(z))``, shape ``(N, d)``.

    Returns
    -------
    torch.Tensor
        Scalar mean of the squared difference over all elements.

    Raises
    ------
    ValueError
        If the shapes differ.

    Examples
    --------
    >>> float(ziz_loss(torch.zeros(2, 4), torch.full((2, 4), 0.5)))
    0.25
    """
    _check_same_shape(z, z_rec, "z and z_rec")
    return torch.mean((z - z_rec) ** 2)


class AnomalyScores(NamedTuple):
    """Per-image f-AnoGAN anomaly scores, each of shape ``(N,)``.

    Attributes
    ----------
    residual : torch.Tensor
        A_R: mean over pixels of ``(x − G(E(x)))²``.
    feature : torch.Tensor
        A_D: mean over features of ``(f(x) − f(G(E(x))))²``.
    total : torch.Tensor
        A = A_R + κ·A_D (the official ``img_distance``).
    """

    residual: torch.Tensor
    feature: torch.Tensor
    total: torch.Tensor


def _per_sample_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return ((a - b) ** 2).reshape(a.shape[0], -1).mean(dim=1)


def anomaly_scores(
    x: torch.Tensor,
    x_rec: torch.Tensor,
    feat_x: torch.Tensor,
    feat_rec: torch.Tensor,
    *,
    kappa: float = 1.0,
) -> AnomalyScores:
    """Per-image anomaly scores A_R, A_D and A = A_R + κ·A_D (FANOGAN-SPEC.md §1.5).

    Plain means, as in the official ``anomaly_detection.py``: no standardisation, clipping or
    division by training statistics.

    Parameters
    ----------
    x, x_rec : torch.Tensor
        Images and reconstructions ``G(E(x))``, same shape ``(N, C, H, W)``.
    feat_x, feat_rec : torch.Tensor
        Discriminator features of ``x`` and ``x_rec``, same shape ``(N, feature_dim)``.
    kappa : float, default 1.0
        κ, the weight of the feature term.

    Returns
    -------
    AnomalyScores
        ``(residual, feature, total)``, each of shape ``(N,)``.

    Raises
    ------
    ValueError
        If paired shapes differ, batch sizes disagree or ``kappa`` is negative.

    Examples
    --------
    >>> x = torch.zeros(2, 1, 2, 2)
    >>> s = anomaly_scores(x, x + 1, torch.zeros(2, 3), torch.full((2, 3), 2.0), kappa=0.5)
    >>> s.total.tolist()
    [3.0, 3.0]
    """
    _check_batched(x, "x")
    _check_batched(feat_x, "feat_x")
    _check_same_shape(x, x_rec, "x and x_rec")
    _check_same_shape(feat_x, feat_rec, "feat_x and feat_rec")
    if x.shape[0] != feat_x.shape[0]:
        raise ValueError(f"x and feat_x must have the same batch size, got {x.shape[0]} and {feat_x.shape[0]}")
    if kappa < 0:
        raise ValueError(f"kappa must be >= 0, got {kappa}")
    residual = _per_sample_mse(x, x_rec)
    feature = _per_sample_mse(feat_x, feat_rec)
    return AnomalyScores(residual=residual, feature=feature, total=residual + kappa * feature)


def latent_distances(z: torch.Tensor, z_rec: torch.Tensor) -> torch.Tensor:
    """Per-image latent distance ``mean((E(x) − E(G(E(x))))²)`` (the official ``z_distance``).

    Parameters
    ----------
    z, z_rec : torch.Tensor
        ``E(x)`` and ``E(G(E(x)))``, shape ``(N, d)``.

    Returns
    -------
    torch.Tensor
        Shape ``(N,)``.

    Raises
    ------
    ValueError
        If the shapes differ.

    Examples
    --------
    >>> latent_distances(torch.zeros(2, 4), torch.ones(2, 4)).tolist()
    [1.0, 1.0]
    """
    _check_batched(z, "z")
    _check_same_shape(z, z_rec, "z and z_rec")
    return _per_sample_mse(z, z_rec)

"""PNG sample grids of a generator: G(z) for fixed z, and latent interpolations (paper Fig. 5).

Written by the GAN stage of :mod:`octpipe.models.fanogan.train` into ``RUN/samples/``; the
latent prior is shared with training's noise.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch

from octpipe.models.fanogan.networks import Generator

__all__ = ["latent_prior", "save_grid", "write_samples", "write_interpolation"]


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    x = images.detach().float().cpu().clamp(-1, 1)
    return ((x + 1) * 127.5).round().to(torch.uint8).numpy()


def save_grid(images: torch.Tensor, path: Path, ncol: int) -> None:
    """Tile ``(N, C, H, W)`` images in [-1, 1] into a PNG (first channel), 2-pixel grey gaps."""
    from PIL import Image

    x = _to_uint8(images)[:, 0]
    n, h, w = x.shape
    nrow = -(-n // ncol)
    gap = 2
    canvas = np.full((nrow * (h + gap) + gap, ncol * (w + gap) + gap), 128, np.uint8)
    for i in range(n):
        r, c = divmod(i, ncol)
        canvas[gap + r * (h + gap):gap + r * (h + gap) + h, gap + c * (w + gap):gap + c * (w + gap) + w] = x[i]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(canvas).save(tmp, format="PNG")
    os.replace(tmp, path)


def latent_prior(n: int, dim: int, prior: str, gen: torch.Generator) -> torch.Tensor:
    """``n`` latent vectors from the prior (``normal``: N(0, I); ``uniform``: U(-1, 1)), drawn with ``gen``."""
    if prior == "uniform":
        return torch.rand(n, dim, generator=gen) * 2 - 1
    return torch.randn(n, dim, generator=gen)


@torch.no_grad()
def write_samples(g: Generator, path: Path, seed: int, prior: str, n: int = 64) -> None:
    """A grid of G(z) for z drawn with ``seed`` (eval mode; no training RNG or BN statistics are touched)."""
    was_training = g.training
    gen = torch.Generator().manual_seed(seed)
    z = latent_prior(n, g.latent_dim, prior, gen).to(next(g.parameters()).device)
    g.eval()
    try:
        save_grid(g(z), path, ncol=int(math.ceil(math.sqrt(n))))
    finally:
        g.train(was_training)


@torch.no_grad()
def write_interpolation(g: Generator, path: Path, seed: int, prior: str, rows: int = 8, steps: int = 10) -> None:
    """Paper Fig. 5: each row is G(z_a + t·(z_b − z_a)) for t from 0 to 1 (z_a, z_b drawn with ``seed``)."""
    was_training = g.training
    gen = torch.Generator().manual_seed(seed)
    za = latent_prior(rows, g.latent_dim, prior, gen)
    zb = latent_prior(rows, g.latent_dim, prior, gen)
    t = torch.linspace(0, 1, steps)[None, :, None]
    z = (za[:, None] + t * (zb - za)[:, None]).reshape(rows * steps, -1).to(next(g.parameters()).device)
    g.eval()
    try:
        save_grid(g(z), path, ncol=steps)
    finally:
        g.train(was_training)

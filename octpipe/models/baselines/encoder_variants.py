"""The encoder training variants of paper §2.2 / Table 2 on one trained WGAN: ziz, izi, izi_f.

All three train only an encoder E against the *same* frozen generator (and critic), with
f-AnoGAN's own encoder stage (:func:`octpipe.models.fanogan.train.train_encoder`, the
``encoder.mode`` setting): ziz on the latent residual of prior samples, izi on the image
residual, izi_f (f-AnoGAN) on the image plus critic-feature residual. Each is scored, as in
the paper's Table 2 and the text below it, without the discriminator term (``A_R``) and with
it (``A = A_R + κ·A_D``).

:meth:`EncoderVariant.train` copies the GAN stage of a run (``config.yaml``, ``run.json``,
``checkpoints/gan-last.pt``) into a new run directory and trains the encoder there, so the
GAN run is never modified.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from octpipe.errors import OctpipeError
from octpipe.models.baselines.common import PatchScorer, threads_context
from octpipe.models.fanogan.checkpoint import RunPaths, load_run
from octpipe.models.fanogan.config import FAnoGANConfig, load_config
from octpipe.models.fanogan.model import FAnoGANModel
from octpipe.models.fanogan.score import pixel_residual, score_patches

__all__ = ["EncoderVariant", "ENCODER_MODES"]

#: Encoder training modes, as ``encoder.mode``.
ENCODER_MODES = ("ziz", "izi", "izi_f")


class EncoderVariant(PatchScorer):
    """An encoder trained with one of the paper's three objectives on a fixed WGAN.

    Scores as f-AnoGAN does (:func:`octpipe.models.fanogan.score.score_patches`): ``A_R`` (no
    discriminator term), ``A_D``, ``A = A_R + κ·A_D`` and ``z_distance``.

    Parameters
    ----------
    model : FAnoGANModel
        G, D and the trained encoder.
    mode : {'ziz', 'izi', 'izi_f'}
        How the encoder was trained.

    Examples
    --------
    >>> EncoderVariant.score_names
    ('A_R', 'A_D', 'A', 'z_distance')
    """

    score_names = ("A_R", "A_D", "A", "z_distance")

    def __init__(self, model: FAnoGANModel, mode: str, *, threads: int = 0) -> None:
        if mode not in ENCODER_MODES:
            raise ValueError(f"mode must be one of {ENCODER_MODES}, got {mode!r}")
        if model.encoder is None:
            raise OctpipeError("the model has no trained encoder")
        self.model = model.eval()
        self.mode = mode
        self.name = mode
        self.threads = threads
        self.train_seconds = 0.0

    @classmethod
    def train(cls, store: str | Path, gan_run: str | Path, out_dir: str | Path, *, mode: str,
              config: FAnoGANConfig | None = None, overrides: dict[str, Any] | None = None,
              overwrite: bool = False, progress: bool = False) -> EncoderVariant:
        """Train an encoder of kind ``mode`` against the GAN of ``gan_run``.

        Parameters
        ----------
        store : path
            The store the GAN was trained on (``patches/train``).
        gan_run : path
            A run directory with ``checkpoints/gan-last.pt`` (``octpipe train --stage gan``).
        out_dir : path
            New run directory for this encoder (the GAN files are copied in).
        mode : {'ziz', 'izi', 'izi_f'}
            Encoder objective.
        config : FAnoGANConfig, optional
            Settings; default the GAN run's ``config.yaml``. ``encoder.mode`` is set to ``mode``.
        overrides : dict, optional
            Further ``{"section.key": value}`` overrides (e.g. ``encoder.iterations``).
        overwrite : bool, default False
            Replace an existing ``out_dir``.
        progress : bool, default False
            Show a progress bar.

        Returns
        -------
        EncoderVariant

        Raises
        ------
        OctpipeError
            If ``gan_run`` has no GAN checkpoint or ``out_dir`` exists without ``overwrite``.
        """
        from octpipe.models.fanogan.train import train_encoder

        if mode not in ENCODER_MODES:
            raise ValueError(f"mode must be one of {ENCODER_MODES}, got {mode!r}")
        src, dst = RunPaths(Path(gan_run)), RunPaths(Path(out_dir))
        if not src.checkpoint("gan").is_file():
            raise OctpipeError("no checkpoints/gan-last.pt; train the GAN first", src.root)
        if dst.root.exists():
            if not overwrite:
                raise OctpipeError("output exists; pass overwrite=True to replace it", dst.root)
            shutil.rmtree(dst.root)
        dst.checkpoints.mkdir(parents=True)
        shutil.copy2(src.checkpoint("gan"), dst.checkpoint("gan"))
        for f in (src.config, src.run_json):
            if f.is_file():
                shutil.copy2(f, dst.root / f.name)
        cfg = config or load_config(src.config)
        cfg = cfg.with_overrides({"encoder.mode": mode, **(overrides or {})})
        t0 = time.perf_counter()
        train_encoder(store, dst.root, cfg, progress=progress)
        variant = cls(load_run(dst.root), mode, threads=cfg.runtime.threads)
        variant.train_seconds = time.perf_counter() - t0
        return variant

    @classmethod
    def load(cls, run_dir: str | Path, *, threads: int = 0) -> EncoderVariant:
        """Load a trained run; the mode is read from its configuration."""
        model = load_run(run_dir)
        return cls(model, model.config.encoder.mode, threads=threads)

    def _score_all(self, patches: npt.ArrayLike, batch_size: int) -> dict[str, npt.NDArray[np.float32]]:
        return score_patches(self.model, _images(patches), batch_size=batch_size, precision="fp32")

    def residual(self, patches: npt.ArrayLike, *, batch_size: int = 256) -> npt.NDArray[np.float32]:
        """Pixel residual ``|x − G(E(x))|``, shape ``(N, H, W)``."""
        with threads_context(self.threads):
            return pixel_residual(self.model, _images(patches), batch_size=batch_size, precision="fp32")[:, 0]


def _images(patches: npt.ArrayLike) -> npt.NDArray[np.float32]:
    arr = np.asarray(patches, dtype=np.float32)
    return arr[:, None] if arr.ndim == 3 else arr

"""Baselines of the f-AnoGAN paper (§3, Tables 1, 2 and B1) and two trivial ones.

Each method trains with ``Method.train(data, ...)`` and scores with
``method.score(patches) -> {score name: (N,) float32}`` (higher = more anomalous):

- :class:`Autoencoder` (AE): f-AnoGAN's ResNet encoder/generator as an autoencoder; ``A_R``.
- :class:`AdversarialAutoencoder` (AdvAE): the AE plus a WGAN-GP critic; ``A_R``, ``A_D``, ``A``.
- :class:`ALI` (ALI/BiGAN): joint discriminator on (x, z); ``A_R``, ``A_D``, ``A``.
- :class:`DiscriminatorScore`: ``A_D = m̂ − D(x)`` of the trained WGAN critic (Eq. 6–7).
- :class:`IterativeAnoGAN`: 300 steps on z with stochastic clipping, the AnoGAN loss; ``A_anogan``.
- :class:`EncoderVariant`: ziz / izi / izi_f encoders on one WGAN; ``A_R`` and ``A``.
- :class:`MeanIntensity`, :class:`DarkFraction`: trivial difficulty checks.
"""

from octpipe.models.baselines.adversarial_ae import AdversarialAutoencoder
from octpipe.models.baselines.ali import ALI, JointDiscriminator
from octpipe.models.baselines.autoencoder import Autoencoder
from octpipe.models.baselines.common import BaselineConfig, load_patches
from octpipe.models.baselines.discriminator_score import DiscriminatorScore
from octpipe.models.baselines.encoder_variants import ENCODER_MODES, EncoderVariant
from octpipe.models.baselines.iterative import IterativeAnoGAN, anogan_loss, stochastic_clip
from octpipe.models.baselines.trivial import DarkFraction, MeanIntensity, tissue_span_mask

__all__ = [
    "BaselineConfig",
    "load_patches",
    "Autoencoder",
    "AdversarialAutoencoder",
    "ALI",
    "JointDiscriminator",
    "DiscriminatorScore",
    "IterativeAnoGAN",
    "anogan_loss",
    "stochastic_clip",
    "EncoderVariant",
    "ENCODER_MODES",
    "MeanIntensity",
    "DarkFraction",
    "tissue_span_mask",
]

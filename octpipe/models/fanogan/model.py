"""A trained f-AnoGAN model: its three networks, configuration, calibration and preprocessing.

:class:`FAnoGANModel` is what :func:`octpipe.models.fanogan.checkpoint.load_run` returns and what
scoring and export take; :func:`build_networks` makes fresh networks for a configuration. The
preprocessing record it carries is described in :mod:`octpipe.models.fanogan.checkpoint`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from octpipe.models.fanogan.config import FAnoGANConfig
from octpipe.models.fanogan.networks import Discriminator, Encoder, Generator

if TYPE_CHECKING:
    from octpipe.preprocess.prepare import PreprocessConfig

__all__ = ["FAnoGANModel", "build_networks", "DEFAULT_PREPROCESS_SOURCE"]


#: ``FAnoGANModel.preprocess_source`` of a model whose bundle records no preprocessing.
DEFAULT_PREPROCESS_SOURCE = "default (the model bundle records no preprocessing)"


def build_networks(config: FAnoGANConfig) -> tuple[Generator, Discriminator, Encoder]:
    """Build freshly initialised G, D and E for ``config.model`` (initialisation uses the global RNG).

    Parameters
    ----------
    config : FAnoGANConfig
        The configuration.

    Returns
    -------
    tuple of (Generator, Discriminator, Encoder)
    """
    m = config.model
    g = Generator(latent_dim=m.latent_dim, dim=m.dim, channels=m.channels, image_size=m.image_size)
    d = Discriminator(dim=m.dim, channels=m.channels, image_size=m.image_size)
    e = Encoder(latent_dim=m.latent_dim, dim=m.dim, channels=m.channels, image_size=m.image_size,
                output=m.encoder_output)  # type: ignore[arg-type]
    return g, d, e


@dataclass
class FAnoGANModel:
    """A trained f-AnoGAN: networks in eval mode, configuration and calibration.

    Parameters
    ----------
    generator, discriminator : Generator, Discriminator
        The GAN.
    encoder : Encoder or None
        The encoder; None when only the GAN stage has been trained.
    config : FAnoGANConfig
        The training configuration.
    calibration : dict or None
        Contents of ``calibration.json`` (held-out normal scores), when present.
    run_dir : Path or None
        Where it was loaded from.
    preprocess : dict or None
        The preprocessing record of the data it was trained on (module docstring); None when
        unknown (then :meth:`preprocess_config` gives the defaults).
    """

    generator: Generator
    discriminator: Discriminator
    encoder: Encoder | None
    config: FAnoGANConfig
    calibration: dict[str, Any] | None = None
    run_dir: Path | None = None
    preprocess: dict[str, Any] | None = None

    def preprocess_config(self) -> PreprocessConfig:
        """The :class:`~octpipe.preprocess.prepare.PreprocessConfig` of the training data (defaults if unknown)."""
        from octpipe.preprocess.prepare import PreprocessConfig

        record = self.preprocess or {}
        if record.get("config") is None:
            return PreprocessConfig()
        return PreprocessConfig.from_dict(_complete(record["config"]))

    @property
    def preprocess_source(self) -> str:
        """Where :meth:`preprocess_config` comes from: ``"store"``, another recorded source, or the default."""
        record = self.preprocess or {}
        if record.get("config") is None:
            return DEFAULT_PREPROCESS_SOURCE
        return str(record.get("source", "recorded"))

    @property
    def kappa(self) -> float:
        """κ of A = A_R + κ·A_D (``encoder.kappa``)."""
        return self.config.encoder.kappa

    @property
    def image_size(self) -> int:
        """Patch side in pixels."""
        return self.config.model.image_size

    def to(self, device: str | torch.device) -> FAnoGANModel:
        """Move the networks to ``device`` (in place) and return ``self``."""
        for net in (self.generator, self.discriminator, self.encoder):
            if net is not None:
                net.to(device)
        return self

    def eval(self) -> FAnoGANModel:
        """Put every network in eval mode and return ``self``."""
        for net in (self.generator, self.discriminator, self.encoder):
            if net is not None:
                net.eval()
        return self


def _json_form(value: Any) -> Any:
    """Tuples as lists, as after a JSON round trip (what the store's attributes hold)."""
    return json.loads(json.dumps(value))


#: Settings added to :class:`PreprocessConfig` after records were first written, with the value that
#: describes what octpipe did before they existed (a record without them was made that way).
_LEGACY_SETTINGS = {("flatten", "axial_spacing_um"): None}  # before: each volume's own axial sampling


def _complete(config: dict[str, Any] | None) -> dict[str, Any] | None:
    """A recorded ``PreprocessConfig.to_dict()`` in JSON form, legacy settings filled in (see above)."""
    if config is None:
        return None
    out = _json_form(config)
    for (section, key), value in _LEGACY_SETTINGS.items():
        if isinstance(out.get(section), dict) and key not in out[section]:
            out[section][key] = value
    return out

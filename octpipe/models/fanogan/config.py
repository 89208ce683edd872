"""f-AnoGAN training configuration: frozen, self-validating dataclasses and a strict YAML loader.

A configuration has five sections, each a frozen dataclass that checks its values in
``__post_init__`` and raises :class:`~octpipe.errors.ConfigError` naming the key, the value
received and the valid range:

``model``
    Network sizes (FANOGAN-SPEC.md §1.2).
``data``
    Which patch split to train on and how the held-out normal patches (validation and score
    calibration) are chosen.
``gan``
    WGAN-GP training (§1.3): Adam 1e-4, betas (0, 0.9), λ = 10, 5 critic steps per generator
    step, batch 64, z ~ N(0, I).
``encoder``
    Encoder training (§1.4): izi_f with κ = 1, TF1 RMSProp (lr 5e-5, decay 0.9, eps 1e-10 inside
    the square root, accumulator starting at 1).
``runtime``
    Device, precision, memory format, ``torch.compile``, seed.

The defaults are the official code's settings (``pipelines/fanogan.yaml`` spells them out).
YAML files hold plain values only: unknown keys are errors and nothing is evaluated.

Examples
--------
>>> cfg = FAnoGANConfig()
>>> cfg.gan.critic_iters, cfg.encoder.mode, cfg.model.latent_dim
(5, 'izi_f', 128)
>>> FAnoGANConfig.from_dict({"gan": {"iterations": 10}}).gan.iterations
10
>>> try:
...     FAnoGANConfig.from_dict({"gan": {"iters": 10}})
... except ConfigError as exc:
...     print(str(exc)[:22])
unknown key gan.iters;
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

from octpipe.errors import ConfigError

__all__ = [
    "ModelConfig",
    "DataConfig",
    "GANConfig",
    "EncoderConfig",
    "RuntimeConfig",
    "FAnoGANConfig",
    "load_config",
    "save_config",
]


# --------------------------------------------------------------------------------------------
# Value checks (shared by the sections)
# --------------------------------------------------------------------------------------------
def _int(section: str, name: str, value: Any, *, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{section}.{name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{section}.{name} must be >= {minimum}, got {value}")
    return value


def _float(section: str, name: str, value: Any, *, low: float | None = None, high: float | None = None,
           low_open: bool = False, high_open: bool = False) -> float:
    if isinstance(value, str):
        # PyYAML (YAML 1.1) reads "1e-4" as a string; a plain numeric literal is still just a number.
        try:
            value = float(value)
        except ValueError:
            raise ConfigError(f"{section}.{name} must be a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{section}.{name} must be a finite number, got {value!r}")
    value = float(value)
    lo = "(" if low_open else "["
    hi = ")" if high_open else "]"
    rng = f"{lo}{'-inf' if low is None else low}, {'inf' if high is None else high}{hi}"
    if low is not None and (value < low or (low_open and value == low)):
        raise ConfigError(f"{section}.{name} must be in {rng}, got {value}")
    if high is not None and (value > high or (high_open and value == high)):
        raise ConfigError(f"{section}.{name} must be in {rng}, got {value}")
    return value


def _choice(section: str, name: str, value: Any, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(f"{section}.{name} must be one of {', '.join(map(str, choices))}, got {value!r}")
    return value


def _bool(section: str, name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{section}.{name} must be true or false, got {value!r}")
    return value


class _Section:
    """Mixin: ``from_dict`` with unknown-key errors and ``to_dict``."""

    section: ClassVar[str] = ""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> Any:
        """Build the section from a mapping; unknown keys raise :class:`ConfigError`."""
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(f"section {cls.section} must be a mapping of keys to values, got {type(data).__name__}")
        names = [f.name for f in fields(cls)]  # type: ignore[arg-type]
        for key in data:
            if key not in names:
                raise ConfigError(f"unknown key {cls.section}.{key}; valid keys: {', '.join(sorted(names))}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python (YAML/JSON-safe) values of the section."""
        out = {}
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


def _set(obj: object, name: str, value: Any) -> None:
    object.__setattr__(obj, name, value)


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelConfig(_Section):
    """Network sizes (FANOGAN-SPEC.md §1.2).

    Parameters
    ----------
    latent_dim : int, default 128
        Size of z.
    dim : int, default 64
        Base channel count of G, D and E.
    channels : int, default 1
        Image channels (grey OCT: 1).
    image_size : int, default 64
        Patch side in pixels; a multiple of 16. Must equal the store's patch size.
    encoder_output : {'tanh', 'linear'}, default 'tanh'
        The encoder's output constraint (official ``tanh_fc``, or unconstrained).
    """

    section: ClassVar[str] = "model"
    latent_dim: int = 128
    dim: int = 64
    channels: int = 1
    image_size: int = 64
    encoder_output: str = "tanh"

    def __post_init__(self) -> None:
        s = self.section
        _int(s, "latent_dim", self.latent_dim, minimum=1)
        _int(s, "dim", self.dim, minimum=1)
        _int(s, "channels", self.channels, minimum=1)
        _int(s, "image_size", self.image_size, minimum=16)
        if self.image_size % 16:
            raise ConfigError(f"model.image_size must be a multiple of 16, got {self.image_size}")
        _choice(s, "encoder_output", self.encoder_output, ("tanh", "linear"))


@dataclass(frozen=True)
class DataConfig(_Section):
    """Training data and held-out normal patches.

    Parameters
    ----------
    split : str, default 'train'
        Patch split (``STORE/patches/<split>``) to train on. Patches labelled 1 (a lesion pixel)
        are never used; label 0 (normal) and -1 (unknown health, present only when the split was
        written with ``--include-unknown``) are.
    val_split : str or None, default None
        A separate split whose label-0 patches are the held-out normal set. When None, a part of
        ``split``'s training patches is held out instead (see ``val_fraction`` and ``val_unit``).
    val_fraction : float, default 0.1
        Fraction of ``split`` held out when ``val_split`` is None; in [0, 0.5]. 0 disables
        validation and calibration.
    val_unit : {'volume', 'patch'}, default 'volume'
        Hold out whole volumes (no patch of a held-out volume is ever trained on; at least one
        volume, never all) or random patches.
    shuffle_chunks : int, default 8
        Zarr chunks mixed in one shuffle window. Each epoch visits the chunks in a seeded random
        order, ``shuffle_chunks`` at a time, and shuffles the patches inside each window, so every
        chunk is decompressed about once per epoch.
    """

    section: ClassVar[str] = "data"
    split: str = "train"
    val_split: str | None = None
    val_fraction: float = 0.1
    val_unit: str = "volume"
    shuffle_chunks: int = 8

    def __post_init__(self) -> None:
        s = self.section
        if not isinstance(self.split, str) or not self.split:
            raise ConfigError(f"data.split must be a split name, got {self.split!r}")
        if self.val_split is not None and (not isinstance(self.val_split, str) or not self.val_split):
            raise ConfigError(f"data.val_split must be a split name or null, got {self.val_split!r}")
        _set(self, "val_fraction", _float(s, "val_fraction", self.val_fraction, low=0.0, high=0.5))
        _choice(s, "val_unit", self.val_unit, ("volume", "patch"))
        _int(s, "shuffle_chunks", self.shuffle_chunks, minimum=1)


@dataclass(frozen=True)
class GANConfig(_Section):
    """WGAN-GP training (FANOGAN-SPEC.md §1.3).

    Parameters
    ----------
    batch_size : int, default 64
        Batch per process. Under ``torchrun`` the effective batch is ``batch_size × world size``.
    lr : float, default 1e-4
        Adam learning rate of G and D.
    betas : (float, float), default (0.0, 0.9)
        Adam betas of G and D.
    gp_weight : float, default 10.0
        Gradient-penalty weight λ.
    critic_iters : int, default 5
        Critic (D) steps per generator step.
    iterations : int, default 100000
        Training length in the units given by ``count``.
    count : {'critic', 'generator', 'epoch'}, default 'critic'
        ``'critic'``: ``iterations`` counts critic steps (real batches consumed), as the official
        f-AnoGAN code does; 100000 ≈ 20000 generator steps. ``'generator'``: it counts outer
        iterations of igul222 ``gan_64x64.py`` (one G step, skipped the first time, then
        ``critic_iters`` D steps), i.e. ``iterations × critic_iters`` critic steps. ``'epoch'``:
        the official stopping rule (``TRAIN_EPOCHS``): ``iterations`` epochs of critic steps over
        the training patches (each epoch ``n_train // batch_size`` critic steps, the last partial
        batch dropped); ``log_every``, ``checkpoint_every``, ``snapshot_every`` and
        ``sample_every`` then count critic steps. Both counters are logged either way.
    prior : {'normal', 'uniform'}, default 'normal'
        z ~ N(0, I) or U(-1, 1).
    hflip : bool, default True
        Random horizontal flip with p = 0.5.
    log_every : int, default 50
        Write a CSV row per outer iteration and check for divergence every ``log_every`` units of
        ``count`` (the losses stay on the device in between).
    checkpoint_every : int, default 1000
        Update ``checkpoints/gan-last.pt`` every this many units of ``count``.
    snapshot_every : int, default 20000
        Also keep ``checkpoints/gan-<critic_step>.pt`` every this many units; 0 = never.
    sample_every : int, default 1000
        Write a sample grid PNG of G(z) every this many units; 0 = never.
    max_wasserstein : float, default 1e4
        Stop as diverged when |Wasserstein estimate| exceeds this.
    """

    section: ClassVar[str] = "gan"
    batch_size: int = 64
    lr: float = 1e-4
    betas: tuple[float, float] = (0.0, 0.9)
    gp_weight: float = 10.0
    critic_iters: int = 5
    iterations: int = 100000
    count: str = "critic"
    prior: str = "normal"
    hflip: bool = True
    log_every: int = 50
    checkpoint_every: int = 1000
    snapshot_every: int = 20000
    sample_every: int = 1000
    max_wasserstein: float = 1e4

    def __post_init__(self) -> None:
        s = self.section
        _int(s, "batch_size", self.batch_size, minimum=1)
        _set(self, "lr", _float(s, "lr", self.lr, low=0.0, low_open=True))
        if not isinstance(self.betas, list | tuple) or len(self.betas) != 2:
            raise ConfigError(f"gan.betas must be two numbers in [0, 1), got {self.betas!r}")
        _set(self, "betas", tuple(_float(s, "betas", b, low=0.0, high=1.0, high_open=True) for b in self.betas))
        _set(self, "gp_weight", _float(s, "gp_weight", self.gp_weight, low=0.0))
        _int(s, "critic_iters", self.critic_iters, minimum=1)
        _int(s, "iterations", self.iterations, minimum=1)
        _choice(s, "count", self.count, ("critic", "generator", "epoch"))
        _choice(s, "prior", self.prior, ("normal", "uniform"))
        _bool(s, "hflip", self.hflip)
        _int(s, "log_every", self.log_every, minimum=1)
        _int(s, "checkpoint_every", self.checkpoint_every, minimum=1)
        _int(s, "snapshot_every", self.snapshot_every, minimum=0)
        _int(s, "sample_every", self.sample_every, minimum=0)
        _set(self, "max_wasserstein", _float(s, "max_wasserstein", self.max_wasserstein, low=0.0, low_open=True))

    @property
    def total_critic_steps(self) -> int:
        """Critic steps of a complete run (``count: epoch`` needs the data: :meth:`critic_steps_for`)."""
        if self.count == "epoch":
            raise ConfigError("gan.count 'epoch': the number of critic steps depends on the training split; "
                              "use critic_steps_for(steps_per_epoch)")
        return self.iterations if self.count == "critic" else self.iterations * self.critic_iters

    def critic_steps_for(self, steps_per_epoch: int) -> int:
        """Critic steps of a complete run when an epoch is ``steps_per_epoch`` critic steps."""
        return self.iterations * steps_per_epoch if self.count == "epoch" else self.total_critic_steps


@dataclass(frozen=True)
class EncoderConfig(_Section):
    """Encoder training (FANOGAN-SPEC.md §1.4).

    Parameters
    ----------
    mode : {'izi_f', 'izi', 'ziz'}, default 'izi_f'
        Training loss: izi_f (official), izi (image residual only) or ziz (latent residual of
        prior samples, data-free).
    kappa : float, default 1.0
        κ, the weight of the feature term in izi_f and in the anomaly score A = A_R + κ·A_D.
    batch_size : int, default 64
        Batch per process.
    lr : float, default 5e-5
        RMSProp (TF1) learning rate.
    alpha : float, default 0.9
        RMSProp decay.
    eps : float, default 1e-10
        RMSProp epsilon, inside the square root.
    iterations : int, default 50000
        Encoder steps.
    hflip : bool, default True
        Random horizontal flip with p = 0.5.
    log_every : int, default 50
        CSV row and divergence check every this many steps.
    val_every : int, default 500
        Validation loss every this many steps (0 = never); also logged at the end.
    val_batches : int, default 10
        At most this many held-out batches per validation.
    checkpoint_every : int, default 1000
        Update ``checkpoints/encoder-last.pt`` every this many steps.
    snapshot_every : int, default 10000
        Also keep ``checkpoints/encoder-<step>.pt``; 0 = never.
    max_loss : float, default 1e6
        Stop as diverged when the loss exceeds this.
    """

    section: ClassVar[str] = "encoder"
    mode: str = "izi_f"
    kappa: float = 1.0
    batch_size: int = 64
    lr: float = 5e-5
    alpha: float = 0.9
    eps: float = 1e-10
    iterations: int = 50000
    hflip: bool = True
    log_every: int = 50
    val_every: int = 500
    val_batches: int = 10
    checkpoint_every: int = 1000
    snapshot_every: int = 10000
    max_loss: float = 1e6

    def __post_init__(self) -> None:
        s = self.section
        _choice(s, "mode", self.mode, ("izi_f", "izi", "ziz"))
        _set(self, "kappa", _float(s, "kappa", self.kappa, low=0.0))
        _int(s, "batch_size", self.batch_size, minimum=1)
        _set(self, "lr", _float(s, "lr", self.lr, low=0.0, low_open=True))
        _set(self, "alpha", _float(s, "alpha", self.alpha, low=0.0, high=1.0, high_open=True))
        _set(self, "eps", _float(s, "eps", self.eps, low=0.0))
        _int(s, "iterations", self.iterations, minimum=1)
        _bool(s, "hflip", self.hflip)
        _int(s, "log_every", self.log_every, minimum=1)
        _int(s, "val_every", self.val_every, minimum=0)
        _int(s, "val_batches", self.val_batches, minimum=1)
        _int(s, "checkpoint_every", self.checkpoint_every, minimum=1)
        _int(s, "snapshot_every", self.snapshot_every, minimum=0)
        _set(self, "max_loss", _float(s, "max_loss", self.max_loss, low=0.0, low_open=True))


@dataclass(frozen=True)
class RuntimeConfig(_Section):
    """Where and how fast to run.

    Parameters
    ----------
    device : {'auto', 'cpu', 'cuda'}, default 'auto'
        ``auto`` = CUDA when available (under ``torchrun``, ``cuda:LOCAL_RANK``), else CPU.
    precision : {'auto', 'fp32', 'tf32', 'bf16'}, default 'auto'
        ``fp32``: plain float32. ``tf32``: float32 with TF32 matmuls/convolutions (CUDA; same as
        fp32 on CPU). ``bf16``: bfloat16 autocast for the forward passes (the gradient penalty's
        gradient norm, the losses, weights and optimiser states stay float32). ``auto``: ``tf32``
        on CUDA, ``fp32`` on CPU. On the development CPU (AVX-512 BF16) bf16 autocast made a GAN
        iteration 1.5x (NCHW) and 1.7x (channels_last) faster than fp32 in the same layout (see
        ``benchmarks/results/fanogan_train.json``), but it changes the numerics of the adversarial
        game, so it is opt-in.
    channels_last : bool or 'auto', default 'auto'
        Use ``torch.channels_last`` for weights and batches. ``auto`` = on: it was faster on CPU
        too (1.25x per fp32 GAN iteration, same numerics up to summation order) and is the fast
        layout for cuDNN.
    compile : bool, default False
        ``torch.compile`` the generator (and, in the encoder stage, E, G and D's features). The
        critic needs double backward for the gradient penalty, which compiled graphs do not
        support, so it always runs eagerly; as the critic dominates a GAN iteration, compiling
        brought no measurable gain on CPU and costs about 40 s of compilation per run.
    seed : int, default 0
        Seeds weights, data order, flips and noise. Two runs with the same seed, device and
        thread count give the same losses; so does a resumed run.
    deterministic : bool, default False
        ``torch.use_deterministic_algorithms(True)`` (and cuDNN deterministic) for the run.
    threads : int, default 0
        ``torch.set_num_threads`` for the run; 0 leaves PyTorch's default.
    tensorboard : bool, default False
        Also write TensorBoard scalars to ``RUN/tensorboard`` (needs the ``tensorboard`` package).
    """

    section: ClassVar[str] = "runtime"
    device: str = "auto"
    precision: str = "auto"
    channels_last: bool | str = "auto"
    compile: bool = False
    seed: int = 0
    deterministic: bool = False
    threads: int = 0
    tensorboard: bool = False

    def __post_init__(self) -> None:
        s = self.section
        _choice(s, "device", self.device, ("auto", "cpu", "cuda"))
        _choice(s, "precision", self.precision, ("auto", "fp32", "tf32", "bf16"))
        if self.channels_last != "auto" and not isinstance(self.channels_last, bool):
            raise ConfigError(f"runtime.channels_last must be true, false or auto, got {self.channels_last!r}")
        _bool(s, "compile", self.compile)
        _int(s, "seed", self.seed, minimum=0)
        _bool(s, "deterministic", self.deterministic)
        _int(s, "threads", self.threads, minimum=0)
        _bool(s, "tensorboard", self.tensorboard)


_SECTIONS: dict[str, type[_Section]] = {
    "model": ModelConfig,
    "data": DataConfig,
    "gan": GANConfig,
    "encoder": EncoderConfig,
    "runtime": RuntimeConfig,
}


@dataclass(frozen=True)
class FAnoGANConfig:
    """The complete f-AnoGAN training configuration (see the module docstring).

    Parameters
    ----------
    model, data, gan, encoder, runtime
        The sections; each defaults to the official settings.

    Raises
    ------
    ConfigError
        If a section has the wrong type, or the model and data settings disagree.

    Examples
    --------
    >>> cfg = FAnoGANConfig()
    >>> cfg.with_overrides({"gan.iterations": 5}).gan.iterations
    5
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    gan: GANConfig = field(default_factory=GANConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def __post_init__(self) -> None:
        for name, cls in _SECTIONS.items():
            if not isinstance(getattr(self, name), cls):
                raise ConfigError(f"{name} must be a {cls.__name__}, got {type(getattr(self, name)).__name__}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> FAnoGANConfig:
        """Build a configuration from nested mappings (missing keys take their defaults).

        Parameters
        ----------
        data : mapping or None
            ``{section: {key: value}}``.

        Returns
        -------
        FAnoGANConfig

        Raises
        ------
        ConfigError
            On an unknown section or key, or an invalid value.
        """
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(f"a config must be a mapping of sections, got {type(data).__name__}")
        for key in data:
            if key not in _SECTIONS:
                raise ConfigError(f"unknown section {key!r}; valid sections: {', '.join(_SECTIONS)}")
        return cls(**{name: sec.from_dict(data.get(name)) for name, sec in _SECTIONS.items()})

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Nested plain-Python values (YAML/JSON-safe); ``from_dict(to_dict())`` round-trips."""
        return {name: getattr(self, name).to_dict() for name in _SECTIONS}

    def with_overrides(self, overrides: Mapping[str, Any]) -> FAnoGANConfig:
        """Return a copy with ``{"section.key": value}`` overrides applied and validated.

        Parameters
        ----------
        overrides : mapping
            Dotted keys to new values.

        Returns
        -------
        FAnoGANConfig

        Raises
        ------
        ConfigError
            On an unknown key or an invalid value.
        """
        data = self.to_dict()
        for dotted, value in overrides.items():
            section, _, key = dotted.partition(".")
            if section not in data or key not in data[section]:
                raise ConfigError(f"unknown key {dotted}")
            data[section][key] = value
        return FAnoGANConfig.from_dict(data)

    def replace_section(self, **sections: Any) -> FAnoGANConfig:
        """Return a copy with whole sections replaced (``dataclasses.replace``)."""
        return dataclasses.replace(self, **sections)


def load_config(path: str | Path) -> FAnoGANConfig:
    """Read a configuration from a YAML file.

    Parameters
    ----------
    path : str or Path
        A YAML file with the sections ``model``, ``data``, ``gan``, ``encoder`` and ``runtime``
        (each optional). Only plain values are allowed (PyYAML ``safe_load``); nothing is evaluated.

    Returns
    -------
    FAnoGANConfig

    Raises
    ------
    ConfigError
        If the file is missing, is not valid YAML, or has an unknown key or invalid value.
    """
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config: {exc.strerror or exc}", path) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"not valid YAML: {str(exc).splitlines()[0]}", path) from None
    try:
        return FAnoGANConfig.from_dict(data)
    except ConfigError as exc:
        raise ConfigError(exc.reason, path) from None


def save_config(config: FAnoGANConfig, path: str | Path, *, header: str = "") -> None:
    """Write ``config`` as YAML (all keys, resolved), optionally after ``# header`` comment lines.

    Parameters
    ----------
    config : FAnoGANConfig
        The configuration.
    path : str or Path
        Output file; it is replaced.
    header : str
        Text written as YAML comments at the top.
    """
    import yaml

    comments = "".join(f"# {line}\n" for line in header.splitlines())
    Path(path).write_text(comments + yaml.safe_dump(config.to_dict(), sort_keys=False), encoding="utf-8")

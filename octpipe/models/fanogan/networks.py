"""f-AnoGAN networks: generator, critic (discriminator) and encoder.

A PyTorch port of the official f-AnoGAN code (tSchlegl/f-AnoGAN, ``wgangp_64x64.py`` and
``z_encoding_izif.py``), which adapts the igul222 WGAN-GP ``gan_64x64.py`` ResNet. Every
choice below follows FANOGAN-SPEC.md §1.1-1.2:

- Tensors are NCHW; 3x3 convolutions use padding 1 ("SAME"), stride 1. Resampling is done by
  2x2 mean pooling and nearest-neighbour 2x upsampling, never by strided convolutions.
- Pre-activation residual blocks, ``shortcut + main`` with no residual scaling.
- The critic normalises with ``nn.GroupNorm(1, C, eps=1e-5)`` (the tflib LayerNorm: per-sample
  statistics over (C, H, W), per-channel affine); the generator and encoder use
  ``nn.BatchNorm2d(C, eps=1e-3, momentum=0.01)`` (``tf.layers.batch_normalization`` defaults).
- tflib initialisation: weights uniform in ``±sqrt(3)·std``, He ``std = sqrt(4/(fan_in+fan_out))``
  or Glorot ``std = sqrt(2/(fan_in+fan_out))`` with ``fan = C·k²``; linear layers Glorot; biases 0;
  norm scale 1 and offset 0.

With the defaults (64x64 grey images, ``dim=64``, ``latent_dim=128``) the trainable parameter counts
are G 8,539,329, D 7,490,689 and E 8,531,200, as in the official code.

Other image sizes are supported when they are multiples of 16. There are always four resampling
blocks, so the coarsest feature map is ``image_size // 16`` pixels square (4 for 64, 2 for 32); the
generator's input linear layer, the critic's output layer and the encoder's output layer are sized
for ``8·dim·(image_size // 16)²`` features.

All networks work with ``torch.channels_last`` inputs (flattening uses ``reshape``/``flatten``,
never ``view``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "MeanPoolConv",
    "ConvMeanPool",
    "UpsampleConv",
    "ResidualBlock",
    "Generator",
    "Discriminator",
    "Encoder",
    "bn_stat_updates",
]

NormKind = Literal["group", "batch"]

#: Number of resampling residual blocks in G, D and E (fixed by the architecture).
N_RESAMPLE_BLOCKS = 4

#: tf.layers.batch_normalization defaults (momentum 0.99 in TF = 0.01 in PyTorch).
BN_EPS = 1e-3
BN_MOMENTUM = 0.01
#: tflib LayerNorm epsilon.
LN_EPS = 1e-5


# --------------------------------------------------------------------------------------------
# tflib initialisation
# --------------------------------------------------------------------------------------------
def _uniform_std_(weight: torch.Tensor, std: float) -> None:
    bound = math.sqrt(3.0) * std
    with torch.no_grad():
        weight.uniform_(-bound, bound)


def _init_conv_(conv: nn.Conv2d, *, he_init: bool) -> None:
    """Initialise ``conv`` like tflib ``Conv2D`` (stride 1): uniform ±sqrt(3)·std, zero bias."""
    k = conv.kernel_size[0] * conv.kernel_size[1]
    fan_in = conv.in_channels * k
    fan_out = conv.out_channels * k
    std = math.sqrt((4.0 if he_init else 2.0) / (fan_in + fan_out))
    _uniform_std_(conv.weight, std)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


def _init_linear_(linear: nn.Linear) -> None:
    """Initialise ``linear`` like tflib ``Linear`` (Glorot uniform), zero bias."""
    std = math.sqrt(2.0 / (linear.in_features + linear.out_features))
    _uniform_std_(linear.weight, std)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)


def _conv(in_channels: int, out_channels: int, kernel_size: int, *, he_init: bool, bias: bool) -> nn.Conv2d:
    if kernel_size % 2 != 1:
        raise ValueError(f"kernel_size must be odd for 'SAME' padding, got {kernel_size}")
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=1, padding=kernel_size // 2, bias=bias)
    _init_conv_(conv, he_init=he_init)
    return conv


def _norm(kind: NormKind, channels: int) -> nn.Module:
    if kind == "group":
        return nn.GroupNorm(1, channels, eps=LN_EPS)
    if kind == "batch":
        return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)
    raise ValueError(f"norm must be 'group' or 'batch', got {kind!r}")


def _check_positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _final_size(image_size: int) -> int:
    """Spatial size of the coarsest feature map: ``image_size / 16``."""
    factor = 2**N_RESAMPLE_BLOCKS
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < factor or image_size % factor:
        raise ValueError(f"image_size must be a positive multiple of {factor}, got {image_size!r}")
    return image_size // factor


def _check_image(x: torch.Tensor, channels: int, image_size: int, who: str) -> None:
    if x.ndim != 4 or x.shape[1] != channels or x.shape[2] != image_size or x.shape[3] != image_size:
        raise ValueError(
            f"{who} expects images of shape (N, {channels}, {image_size}, {image_size}), got {tuple(x.shape)}"
        )


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------
class MeanPoolConv(nn.Module):
    """2x2 mean pooling, then a 'SAME' convolution (tflib ``MeanPoolConv``).

    Parameters
    ----------
    in_channels, out_channels : int
        Channels before and after the convolution.
    kernel_size : int
        Odd kernel size; padding is ``kernel_size // 2``.
    he_init : bool, default True
        He (``True``) or Glorot (``False``) uniform initialisation.
    bias : bool, default True
        Whether the convolution has a (zero-initialised) bias.

    Examples
    --------
    >>> MeanPoolConv(2, 3, 1)(torch.zeros(1, 2, 8, 8)).shape
    torch.Size([1, 3, 4, 4])
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, *, he_init: bool = True, bias: bool = True
    ) -> None:
        super().__init__()
        self.conv = _conv(in_channels, out_channels, kernel_size, he_init=he_init, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pool by 2, then convolve."""
        return self.conv(F.avg_pool2d(x, 2))


class ConvMeanPool(nn.Module):
    """A 'SAME' convolution, then 2x2 mean pooling (tflib ``ConvMeanPool``).

    Parameters
    ----------
    in_channels, out_channels : int
        Channels before and after the convolution.
    kernel_size : int
        Odd kernel size; padding is ``kernel_size // 2``.
    he_init : bool, default True
        He (``True``) or Glorot (``False``) uniform initialisation.
    bias : bool, default True
        Whether the convolution has a (zero-initialised) bias.

    Examples
    --------
    >>> ConvMeanPool(2, 3, 3)(torch.zeros(1, 2, 8, 8)).shape
    torch.Size([1, 3, 4, 4])
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, *, he_init: bool = True, bias: bool = True
    ) -> None:
        super().__init__()
        self.conv = _conv(in_channels, out_channels, kernel_size, he_init=he_init, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Convolve, then pool by 2."""
        return F.avg_pool2d(self.conv(x), 2)


class UpsampleConv(nn.Module):
    """Nearest-neighbour 2x upsampling, then a 'SAME' convolution (tflib ``UpsampleConv``).

    tflib upsamples with ``concat([x, x, x, x], C)`` and ``depth_to_space(2)``, which is exactly
    nearest-neighbour 2x upsampling. (``x.repeat(1, 4, 1, 1)`` followed by ``pixel_shuffle(2)``,
    used by some ports, is *not*: it mixes channels inside each 2x2 block.)

    Parameters
    ----------
    in_channels, out_channels : int
        Channels before and after the convolution.
    kernel_size : int
        Odd kernel size; padding is ``kernel_size // 2``.
    he_init : bool, default True
        He (``True``) or Glorot (``False``) uniform initialisation.
    bias : bool, default True
        Whether the convolution has a (zero-initialised) bias.

    Examples
    --------
    >>> UpsampleConv(2, 3, 3)(torch.zeros(1, 2, 4, 4)).shape
    torch.Size([1, 3, 8, 8])
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, *, he_init: bool = True, bias: bool = True
    ) -> None:
        super().__init__()
        self.conv = _conv(in_channels, out_channels, kernel_size, he_init=he_init, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Upsample by 2 (nearest neighbour), then convolve."""
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class ResidualBlock(nn.Module):
    """Pre-activation residual block that halves ('down') or doubles ('up') the spatial size.

    ``down``: shortcut = MeanPoolConv 1x1 (in→out, Glorot, bias); main = norm1(in) → ReLU →
    Conv3x3 (in→in, no bias, He) → norm2(in) → ReLU → ConvMeanPool 3x3 (in→out, bias, He).

    ``up``: shortcut = UpsampleConv 1x1 (in→out, Glorot, bias); main = norm1(in) → ReLU →
    UpsampleConv 3x3 (in→out, no bias, He) → norm2(out) → ReLU → Conv3x3 (out→out, bias, He).

    The output is ``shortcut + main`` (no scaling, no activation after the add).

    Parameters
    ----------
    in_channels, out_channels : int
        Channels of the block's input and output.
    resample : {'down', 'up'}
        Direction of the 2x resampling.
    norm : {'group', 'batch'}, default 'batch'
        ``'group'`` = ``GroupNorm(1, C, eps=1e-5)`` (critic), ``'batch'`` =
        ``BatchNorm2d(C, eps=1e-3, momentum=0.01)`` (generator, encoder).
    kernel_size : int, default 3
        Kernel size of the two main-path convolutions.

    Raises
    ------
    ValueError
        If ``resample`` or ``norm`` is not one of the accepted values.

    Examples
    --------
    >>> block = ResidualBlock(4, 8, "down", norm="group")
    >>> block(torch.zeros(2, 4, 8, 8)).shape
    torch.Size([2, 8, 4, 4])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        resample: Literal["down", "up"],
        *,
        norm: NormKind = "batch",
        kernel_size: int = 3,
    ) -> None:
        super().__init__()
        _check_positive("in_channels", in_channels)
        _check_positive("out_channels", out_channels)
        self.resample = resample
        if resample == "down":
            self.shortcut = MeanPoolConv(in_channels, out_channels, 1, he_init=False, bias=True)
            self.norm1 = _norm(norm, in_channels)
            self.conv1 = _conv(in_channels, in_channels, kernel_size, he_init=True, bias=False)
            self.norm2 = _norm(norm, in_channels)
            self.conv2 = ConvMeanPool(in_channels, out_channels, kernel_size, he_init=True, bias=True)
        elif resample == "up":
            self.shortcut = UpsampleConv(in_channels, out_channels, 1, he_init=False, bias=True)
            self.norm1 = _norm(norm, in_channels)
            self.conv1 = UpsampleConv(in_channels, out_channels, kernel_size, he_init=True, bias=False)
            self.norm2 = _norm(norm, out_channels)
            self.conv2 = _conv(out_channels, out_channels, kernel_size, he_init=True, bias=True)
        else:
            raise ValueError(f"resample must be 'down' or 'up', got {resample!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``shortcut(x) + main(x)``."""
        out = self.conv1(F.relu(self.norm1(x)))
        out = self.conv2(F.relu(self.norm2(out)))
        return self.shortcut(x) + out


# --------------------------------------------------------------------------------------------
# Networks
# --------------------------------------------------------------------------------------------
class Generator(nn.Module):
    """f-AnoGAN ResNet generator G: latent vector → image in [-1, 1].

    Linear(latent → 8·dim·s²) → reshape (8·dim, s, s) → 4 'up' residual blocks
    (8dim→8dim→4dim→2dim→dim) → BatchNorm → ReLU → Conv3x3 (dim→channels, He, bias) → tanh,
    with ``s = image_size // 16`` (4 for the default 64x64 images). There is no norm or activation
    directly after the input linear layer.

    Parameters
    ----------
    latent_dim : int, default 128
        Size of the latent vector z.
    dim : int, default 64
        Base channel count (the last residual block's output).
    channels : int, default 1
        Channels of the generated image.
    image_size : int, default 64
        Side of the square output image; a multiple of 16.

    Raises
    ------
    ValueError
        If a size is not a positive integer or ``image_size`` is not a multiple of 16.

    Notes
    -----
    In training mode BatchNorm uses batch statistics and updates its running statistics on every
    forward pass. The official code updates them only in the generator step; wrap the
    critic-step generator forward in ``bn_stat_updates(generator, enabled=False)`` to reproduce that.

    Examples
    --------
    >>> g = Generator(latent_dim=16, dim=8, image_size=32).eval()
    >>> g(torch.zeros(2, 16)).shape
    torch.Size([2, 1, 32, 32])
    """

    def __init__(self, latent_dim: int = 128, dim: int = 64, channels: int = 1, image_size: int = 64) -> None:
        super().__init__()
        for name, value in (("latent_dim", latent_dim), ("dim", dim), ("channels", channels)):
            _check_positive(name, value)
        self.latent_dim = latent_dim
        self.dim = dim
        self.channels = channels
        self.image_size = image_size
        self.start_size = _final_size(image_size)

        self.input_linear = nn.Linear(latent_dim, 8 * dim * self.start_size**2)
        _init_linear_(self.input_linear)
        widths = [8 * dim, 8 * dim, 4 * dim, 2 * dim, dim]
        self.blocks = nn.Sequential(
            *(ResidualBlock(widths[i], widths[i + 1], "up", norm="batch") for i in range(N_RESAMPLE_BLOCKS))
        )
        self.output_norm = _norm("batch", dim)
        self.output_conv = _conv(dim, channels, 3, he_init=True, bias=True)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Generate images.

        Parameters
        ----------
        z : torch.Tensor
            Latent vectors, shape ``(N, latent_dim)``.

        Returns
        -------
        torch.Tensor
            Images, shape ``(N, channels, image_size, image_size)``, values in (-1, 1).

        Raises
        ------
        ValueError
            If ``z`` does not have shape ``(N, latent_dim)``.
        """
        if z.ndim != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"Generator expects z of shape (N, {self.latent_dim}), got {tuple(z.shape)}")
        s = self.start_size
        out = self.input_linear(z).reshape(z.shape[0], 8 * self.dim, s, s)
        out = self.blocks(out)
        out = F.relu(self.output_norm(out))
        return torch.tanh(self.output_conv(out))


class _DownTrunk(nn.Module):
    """Input conv (Glorot, bias) + 4 'down' residual blocks (dim→2dim→4dim→8dim→8dim)."""

    def __init__(self, dim: int, channels: int, norm: NormKind) -> None:
        super().__init__()
        self.input_conv = _conv(channels, dim, 3, he_init=False, bias=True)
        widths = [dim, 2 * dim, 4 * dim, 8 * dim, 8 * dim]
        self.blocks = nn.Sequential(
            *(ResidualBlock(widths[i], widths[i + 1], "down", norm=norm) for i in range(N_RESAMPLE_BLOCKS))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the flattened output of the last residual block, shape ``(N, 8·dim·s²)``."""
        return torch.flatten(self.blocks(self.input_conv(x)), 1)


class Discriminator(nn.Module):
    """f-AnoGAN ResNet critic D: image → unbounded score, plus the 8192-d feature f(x).

    Conv3x3 (channels→dim, Glorot, bias) → 4 'down' residual blocks (dim→2dim→4dim→8dim→8dim) with
    ``GroupNorm(1, C, eps=1e-5)`` → flatten → Linear(8·dim·s² → 1), ``s = image_size // 16``.
    There is no output activation (WGAN critic).

    Parameters
    ----------
    dim : int, default 64
        Base channel count (the input convolution's output).
    channels : int, default 1
        Channels of the input image.
    image_size : int, default 64
        Side of the square input image; a multiple of 16.

    Attributes
    ----------
    feature_dim : int
        Length of :meth:`features`: ``8·dim·(image_size // 16)²`` (8192 by default).

    Raises
    ------
    ValueError
        If a size is not a positive integer or ``image_size`` is not a multiple of 16.

    Notes
    -----
    The feature f(x) used by the izi_f loss and the anomaly score is the flattened output of the
    last residual block, taken straight after the residual add (no norm, no ReLU); it is the input
    of the final linear layer, so ``D(x) == D.output_linear(D.features(x)).squeeze(1)``.
    GroupNorm uses per-sample statistics, so train/eval mode does not change the output.

    Examples
    --------
    >>> d = Discriminator(dim=8, image_size=32)
    >>> scores, feats = d.forward_with_features(torch.zeros(2, 1, 32, 32))
    >>> scores.shape, feats.shape
    (torch.Size([2]), torch.Size([2, 256]))
    """

    def __init__(self, dim: int = 64, channels: int = 1, image_size: int = 64) -> None:
        super().__init__()
        for name, value in (("dim", dim), ("channels", channels)):
            _check_positive(name, value)
        self.dim = dim
        self.channels = channels
        self.image_size = image_size
        self.final_size = _final_size(image_size)
        self.feature_dim = 8 * dim * self.final_size**2

        self.trunk = _DownTrunk(dim, channels, "group")
        self.output_linear = nn.Linear(self.feature_dim, 1)
        _init_linear_(self.output_linear)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Return the discriminator feature f(x).

        Parameters
        ----------
        x : torch.Tensor
            Images, shape ``(N, channels, image_size, image_size)``, any memory format.

        Returns
        -------
        torch.Tensor
            Shape ``(N, feature_dim)``: the last residual block's output flattened in (C, H, W) order.

        Raises
        ------
        ValueError
            If ``x`` has the wrong shape.
        """
        _check_image(x, self.channels, self.image_size, "Discriminator")
        return self.trunk(x)

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the scores and the features from one pass.

        Parameters
        ----------
        x : torch.Tensor
            Images, shape ``(N, channels, image_size, image_size)``.

        Returns
        -------
        scores : torch.Tensor
            Shape ``(N,)``.
        features : torch.Tensor
            Shape ``(N, feature_dim)``, as :meth:`features`.

        Raises
        ------
        ValueError
            If ``x`` has the wrong shape.
        """
        feats = self.features(x)
        return self.output_linear(feats).squeeze(1), feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the critic scores.

        Parameters
        ----------
        x : torch.Tensor
            Images, shape ``(N, channels, image_size, image_size)``.

        Returns
        -------
        torch.Tensor
            Unbounded scores, shape ``(N,)`` (the official code reshapes to ``[-1]`` too).

        Raises
        ------
        ValueError
            If ``x`` has the wrong shape.
        """
        return self.forward_with_features(x)[0]


class Encoder(nn.Module):
    """f-AnoGAN encoder E: image → latent vector.

    The critic's architecture, with BatchNorm instead of GroupNorm (the official layer names say
    "Encoder", so tflib picks batch normalisation): optional input dropout → Conv3x3 (channels→dim,
    Glorot, bias) → 4 'down' residual blocks with ``BatchNorm2d(C, eps=1e-3, momentum=0.01)`` →
    flatten → Linear(8·dim·s² → latent_dim) → tanh (``output='tanh'``, the official default
    ``tanh_fc``) or nothing (``output='linear'``, the paper's unconstrained Appendix A.2 variant).

    Parameters
    ----------
    latent_dim : int, default 128
        Size of the latent vector z.
    dim : int, default 64
        Base channel count.
    channels : int, default 1
        Channels of the input image.
    image_size : int, default 64
        Side of the square input image; a multiple of 16.
    output : {'tanh', 'linear'}, default 'tanh'
        Output constraint.
    input_dropout : float, default 0.0
        Probability of zeroing each input pixel (the official ``denoise`` option is
        ``keep_prob = 1 - input_dropout``). 0 disables it and ``self.input_dropout`` is ``None``.

    Raises
    ------
    ValueError
        If a size is invalid, ``output`` is unknown or ``input_dropout`` is outside [0, 1).

    Notes
    -----
    Input dropout is ``nn.Dropout``: like ``tf.nn.dropout`` it rescales kept pixels by
    ``1 / (1 - input_dropout)``, but unlike the official code it is active only in training mode.

    Examples
    --------
    >>> e = Encoder(latent_dim=16, dim=8, image_size=32).eval()
    >>> e(torch.zeros(2, 1, 32, 32)).shape
    torch.Size([2, 16])
    """

    def __init__(
        self,
        latent_dim: int = 128,
        dim: int = 64,
        channels: int = 1,
        image_size: int = 64,
        output: Literal["tanh", "linear"] = "tanh",
        input_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        for name, value in (("latent_dim", latent_dim), ("dim", dim), ("channels", channels)):
            _check_positive(name, value)
        if output not in ("tanh", "linear"):
            raise ValueError(f"output must be 'tanh' or 'linear', got {output!r}")
        if not 0.0 <= float(input_dropout) < 1.0:
            raise ValueError(f"input_dropout must be in [0, 1), got {input_dropout!r}")
        self.latent_dim = latent_dim
        self.dim = dim
        self.channels = channels
        self.image_size = image_size
        self.output_mode = output
        self.final_size = _final_size(image_size)
        self.feature_dim = 8 * dim * self.final_size**2

        self.input_dropout = nn.Dropout(p=float(input_dropout)) if input_dropout > 0 else None
        self.trunk = _DownTrunk(dim, channels, "batch")
        self.output_linear = nn.Linear(self.feature_dim, latent_dim)
        _init_linear_(self.output_linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Encode images.

        Parameters
        ----------
        x : torch.Tensor
            Images, shape ``(N, channels, image_size, image_size)``, values in [-1, 1].

        Returns
        -------
        torch.Tensor
            Latent vectors, shape ``(N, latent_dim)``; in (-1, 1) when ``output='tanh'``.

        Raises
        ------
        ValueError
            If ``x`` has the wrong shape.
        """
        _check_image(x, self.channels, self.image_size, "Encoder")
        if self.input_dropout is not None:
            x = self.input_dropout(x)
        z = self.output_linear(self.trunk(x))
        return torch.tanh(z) if self.output_mode == "tanh" else z


# --------------------------------------------------------------------------------------------
# BatchNorm running-statistics control
# --------------------------------------------------------------------------------------------
@contextmanager
def bn_stat_updates(module: nn.Module, *, enabled: bool) -> Iterator[nn.Module]:
    """Turn BatchNorm running-statistics updates on or off inside a ``with`` block.

    The official WGAN-GP code runs G in training mode (batch statistics) for both the critic and
    the generator updates but updates BN moving averages only with the generator train op. In
    PyTorch every training-mode forward updates them; wrap the critic-step ``G(z)`` in
    ``bn_stat_updates(G, enabled=False)`` to reproduce the official behaviour.

    While disabled, every BatchNorm layer that tracks running statistics gets
    ``track_running_stats = False``. In training mode it then normalises with batch statistics
    exactly as before (identical output) but leaves ``running_mean``, ``running_var`` *and*
    ``num_batches_tracked`` untouched. (Setting ``momentum = 0`` instead would still increment
    ``num_batches_tracked`` and would turn the running statistics into NaN if a batch variance
    were non-finite.) Eval-mode behaviour is unchanged: the running statistics are still used.
    The original flags are restored on exit, also on error.
    Under ``torch.compile`` the flag is a guarded module attribute, so switching it may cost one
    recompilation per state.

    Parameters
    ----------
    module : nn.Module
        Network whose BatchNorm layers (``nn.modules.batchnorm._BatchNorm`` subclasses) are affected.
    enabled : bool
        ``True`` sets tracking on (normal PyTorch behaviour), ``False`` switches updates off.

    Yields
    ------
    nn.Module
        ``module`` itself.

    Examples
    --------
    >>> g = Generator(latent_dim=16, dim=8, image_size=32).train()
    >>> before = g.output_norm.running_mean.clone()
    >>> with bn_stat_updates(g, enabled=False):
    ...     _ = g(torch.randn(4, 16))
    >>> bool(torch.equal(before, g.output_norm.running_mean))
    True
    """
    touched: list[tuple[nn.modules.batchnorm._BatchNorm, bool]] = []
    for m in module.modules():
        # Layers built without running statistics have no buffers and are left alone.
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            touched.append((m, m.track_running_stats))
            m.track_running_stats = bool(enabled)
    try:
        yield module
    finally:
        for m, flag in touched:
            m.track_running_stats = flag

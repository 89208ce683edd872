"""f-AnoGAN networks: architecture, parameter counts, init and BN control (FANOGAN-SPEC.md §1.1-1.3)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from octpipe.models.fanogan.networks import (
    ConvMeanPool,
    Discriminator,
    Encoder,
    Generator,
    MeanPoolConv,
    ResidualBlock,
    UpsampleConv,
    bn_stat_updates,
)

TINY = {"dim": 8, "image_size": 32}
LATENT = 16


def n_trainable(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


@pytest.fixture(scope="module")
def default_nets():
    torch.manual_seed(0)
    return Generator(), Discriminator(), Encoder()


@pytest.fixture
def tiny_nets():
    torch.manual_seed(0)
    g = Generator(latent_dim=LATENT, **TINY)
    d = Discriminator(**TINY)
    e = Encoder(latent_dim=LATENT, **TINY)
    return g, d, e


# ---------------------------------------------------------------- parameter counts and shapes
def test_default_parameter_counts_match_official(default_nets):
    g, d, e = default_nets
    assert n_trainable(g) == 8_539_329
    assert n_trainable(d) == 7_490_689
    assert n_trainable(e) == 8_531_200


def test_default_feature_dim_is_8192(default_nets):
    _, d, e = default_nets
    assert d.feature_dim == 8192
    assert d.output_linear.in_features == 8192
    assert e.output_linear.in_features == 8192


def test_tiny_shapes_eval_mode(tiny_nets):
    g, d, e = (m.eval() for m in tiny_nets)
    with torch.no_grad():
        x = g(torch.randn(3, LATENT))
        assert x.shape == (3, 1, 32, 32)
        assert x.abs().max() <= 1  # tanh (float32 tanh may round to exactly 1)
        assert d(x).shape == (3,)
        # image 32 -> final map 32/16 = 2x2, features 8*dim*2*2
        assert d.features(x).shape == (3, 8 * 8 * 2 * 2)
        z = e(x)
        assert z.shape == (3, LATENT)
        assert z.abs().max() <= 1


def test_channels_parameter():
    g = Generator(latent_dim=LATENT, channels=3, **TINY).eval()
    d = Discriminator(channels=3, **TINY)
    e = Encoder(latent_dim=LATENT, channels=3, **TINY).eval()
    with torch.no_grad():
        x = g(torch.randn(2, LATENT))
        assert x.shape == (2, 3, 32, 32)
        assert d(x).shape == (2,)
        assert e(x).shape == (2, LATENT)


def test_spatial_progression_of_default_blocks(default_nets):
    g, d, _ = default_nets
    assert [b.conv2.out_channels for b in g.blocks] == [512, 256, 128, 64]
    assert [b.conv2.conv.out_channels for b in d.trunk.blocks] == [128, 256, 512, 512]
    assert d.trunk.input_conv.out_channels == 64
    assert g.input_linear.out_features == 4 * 4 * 512


@pytest.mark.parametrize("size", [0, 8, 40, 65])
def test_image_size_must_be_multiple_of_16(size):
    for cls in (Generator, Discriminator, Encoder):
        with pytest.raises(ValueError, match="multiple of 16"):
            cls(image_size=size, dim=8)


def test_invalid_arguments():
    with pytest.raises(ValueError, match="output"):
        Encoder(output="sigmoid", **TINY)
    with pytest.raises(ValueError, match="input_dropout"):
        Encoder(input_dropout=1.0, **TINY)
    with pytest.raises(ValueError, match="resample"):
        ResidualBlock(4, 4, "same")
    with pytest.raises(ValueError, match="norm"):
        ResidualBlock(4, 4, "down", norm="layer")
    with pytest.raises(ValueError, match="dim"):
        Discriminator(dim=0)


def test_wrong_input_shape_raises(tiny_nets):
    g, d, e = tiny_nets
    with pytest.raises(ValueError, match=r"\(N, 16\)"):
        g(torch.zeros(2, 15))
    with pytest.raises(ValueError, match="32, 32"):
        d(torch.zeros(2, 1, 64, 64))
    with pytest.raises(ValueError, match="32, 32"):
        e(torch.zeros(2, 3, 32, 32))


def test_encoder_linear_output_and_dropout_attribute():
    torch.manual_seed(0)
    e = Encoder(latent_dim=LATENT, output="linear", **TINY)
    assert e.input_dropout is None
    with torch.no_grad():
        e.output_linear.bias.fill_(5.0)
        assert e.eval()(torch.zeros(2, 1, 32, 32)).min() > 1  # no tanh
    e2 = Encoder(latent_dim=LATENT, input_dropout=0.2, **TINY)
    assert isinstance(e2.input_dropout, nn.Dropout) and e2.input_dropout.p == pytest.approx(0.2)


# ---------------------------------------------------------------- resampling
def _identity_upsample_conv(channels: int) -> UpsampleConv:
    up = UpsampleConv(channels, channels, 1)
    with torch.no_grad():
        up.conv.weight.copy_(torch.eye(channels).reshape(channels, channels, 1, 1))
    return up


def test_upsample_is_nearest_neighbour_not_repeat_pixel_shuffle():
    x = torch.arange(2 * 3 * 3, dtype=torch.float32).reshape(1, 2, 3, 3)
    with torch.no_grad():
        y = _identity_upsample_conv(2)(x)
    nearest = F.interpolate(x, scale_factor=2, mode="nearest")
    tf_port = F.pixel_shuffle(x.repeat_interleave(4, dim=1), 2)  # concat-then-depth_to_space
    buggy = F.pixel_shuffle(x.repeat(1, 4, 1, 1), 2)
    torch.testing.assert_close(y, nearest)
    torch.testing.assert_close(y, tf_port)
    assert not torch.equal(y, buggy)
    # every 2x2 block is one source pixel of one channel
    assert torch.equal(y[0, 1, 2:4, 4:6], torch.full((2, 2), x[0, 1, 1, 2].item()))


def test_mean_pool_matches_strided_slices():
    x = torch.randn(2, 3, 6, 6)
    mp = MeanPoolConv(3, 3, 1)
    cmp = ConvMeanPool(3, 3, 1)
    for m in (mp, cmp):
        with torch.no_grad():
            m.conv.weight.copy_(torch.eye(3).reshape(3, 3, 1, 1))
    slices = (x[:, :, ::2, ::2] + x[:, :, 1::2, ::2] + x[:, :, ::2, 1::2] + x[:, :, 1::2, 1::2]) / 4
    with torch.no_grad():
        torch.testing.assert_close(mp(x), slices)
        torch.testing.assert_close(cmp(x), slices)


# ---------------------------------------------------------------- normalisation
def test_discriminator_uses_groupnorm_one_group(default_nets):
    _, d, _ = default_nets
    norms = [m for m in d.modules() if isinstance(m, nn.GroupNorm)]
    assert len(norms) == 8
    for m in norms:
        assert m.num_groups == 1 and m.eps == 1e-5
        assert m.weight.shape == (m.num_channels,)
        assert torch.equal(m.weight, torch.ones_like(m.weight)) and torch.equal(m.bias, torch.zeros_like(m.bias))
    assert not any(isinstance(m, (nn.LayerNorm, nn.modules.batchnorm._BatchNorm)) for m in d.modules())


@pytest.mark.parametrize("which", [0, 2])
def test_generator_and_encoder_use_tf_batchnorm(default_nets, which):
    net = default_nets[which]
    norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(norms) == (9 if which == 0 else 8)
    for m in norms:
        assert isinstance(m, nn.BatchNorm2d)
        assert m.eps == 1e-3 and m.momentum == 0.01
        assert torch.equal(m.weight, torch.ones_like(m.weight)) and torch.equal(m.bias, torch.zeros_like(m.bias))
    assert not any(isinstance(m, (nn.GroupNorm, nn.LayerNorm)) for m in net.modules())


# ---------------------------------------------------------------- initialisation
def _he_bound(conv: nn.Conv2d) -> float:
    k = conv.kernel_size[0] * conv.kernel_size[1]
    return math.sqrt(3) * math.sqrt(4 / (conv.in_channels * k + conv.out_channels * k))


def _glorot_bound(conv: nn.Conv2d) -> float:
    return _he_bound(conv) / math.sqrt(2)


def test_he_init_statistics_on_large_layer(default_nets):
    _, d, _ = default_nets
    conv = d.trunk.blocks[3].conv1  # 512 -> 512, 3x3, He, no bias
    bound = _he_bound(conv)
    w = conv.weight.detach()
    assert w.abs().max() <= bound
    assert w.abs().max() > 0.99 * bound
    assert abs(w.std().item() - bound / math.sqrt(3)) < 0.05 * bound / math.sqrt(3)
    assert abs(w.mean().item()) < 0.01 * bound


def test_glorot_init_for_shortcuts_input_convs_and_linears(default_nets):
    g, d, e = default_nets
    for net in (d, e):
        conv = net.trunk.input_conv
        assert conv.weight.abs().max() <= _glorot_bound(conv)
        assert conv.weight.abs().max() > 0.9 * _glorot_bound(conv)
    for block in [*g.blocks, *d.trunk.blocks]:
        sc = block.shortcut.conv
        assert sc.kernel_size == (1, 1)
        assert sc.weight.abs().max() <= _glorot_bound(sc)
        assert sc.weight.abs().max() > 0.9 * _glorot_bound(sc)
    big = g.input_linear
    std = math.sqrt(2 / (big.in_features + big.out_features))
    assert big.weight.abs().max() <= math.sqrt(3) * std
    assert abs(big.weight.std().item() - std) < 0.05 * std


def test_bias_placement_and_zero_biases(default_nets):
    g, d, e = default_nets
    for net in (g, d, e):
        blocks = net.blocks if net is g else net.trunk.blocks
        for block in blocks:
            conv1 = block.conv1 if isinstance(block.conv1, nn.Conv2d) else block.conv1.conv
            conv2 = block.conv2 if isinstance(block.conv2, nn.Conv2d) else block.conv2.conv
            assert conv1.bias is None  # no bias before a norm
            assert conv2.bias is not None and block.shortcut.conv.bias is not None
            assert conv1.weight.abs().max() <= _he_bound(conv1)
            assert conv2.weight.abs().max() <= _he_bound(conv2)
        for m in net.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
                assert torch.count_nonzero(m.bias) == 0
    assert g.output_conv.bias is not None and g.output_conv.weight.abs().max() <= _he_bound(g.output_conv)


# ---------------------------------------------------------------- features
def test_features_are_input_of_final_linear(tiny_nets):
    _, d, _ = tiny_nets
    x = torch.rand(4, 1, 32, 32) * 2 - 1
    with torch.no_grad():
        scores = d(x)
        feats = d.features(x)
        scores2, feats2 = d.forward_with_features(x)
        torch.testing.assert_close(d.output_linear(feats).squeeze(1), scores)
        torch.testing.assert_close(scores2, scores)
        torch.testing.assert_close(feats2, feats)
        # straight after the residual add: the flattened output of the last block (no norm/ReLU)
        last = d.trunk.blocks(d.trunk.input_conv(x))
        torch.testing.assert_close(feats, last.flatten(1))
        assert (feats < 0).any()


# ---------------------------------------------------------------- memory format
#: Allowed difference between two float32 evaluations of a tiny network that run different kernels
#: (memory format, batch size, CPU), in float32 eps times the output's magnitude. The generator's
#: output is off its float64 value by up to 40 eps·max|y| with oneDNN and 280 without (its pre-tanh
#: activations are 15x larger than its output); measured between two kernels: up to 56 (layouts,
#: AVX-512/AVX2/default ATen) and 282 (batch 2 vs 200, no oneDNN). 4096 eps = 4.9e-4·max|y|, while a
#: scrambled layout or a wrong flatten order is off by ~max|y|.
KERNEL_ULPS = 4096


def assert_close_f32(actual: torch.Tensor, expected: torch.Tensor) -> None:
    atol = KERNEL_ULPS * torch.finfo(torch.float32).eps * float(expected.abs().max())
    torch.testing.assert_close(actual, expected, rtol=0, atol=atol)


def test_channels_last_matches_contiguous(tiny_nets):
    g, d, e = (m.eval() for m in tiny_nets)
    torch.manual_seed(1)
    x = torch.rand(4, 1, 32, 32) * 2 - 1
    z = torch.randn(4, LATENT)
    with torch.no_grad():
        ref = {"G": g(z), "D": d(x), "f": d.features(x), "E": e(x)}  # NCHW weights and activations
        for m in (g, d, e):
            m.to(memory_format=torch.channels_last)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        hidden = d.trunk.input_conv(x_cl)  # the channels_last kernels really run (8 channels)
        assert hidden.is_contiguous(memory_format=torch.channels_last) and not hidden.is_contiguous()
        out = {"G": g(z), "D": d(x_cl), "f": d.features(x_cl), "E": e(x_cl)}
    for name, value in out.items():
        assert_close_f32(value, ref[name])


# ---------------------------------------------------------------- BN running statistics
def test_bn_stat_updates_disabled_keeps_running_stats(tiny_nets):
    g = tiny_nets[0].train()
    bns = [m for m in g.modules() if isinstance(m, nn.BatchNorm2d)]
    before = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in bns]
    z = torch.randn(4, LATENT)
    with torch.no_grad():
        with bn_stat_updates(g, enabled=False) as same:
            assert same is g
            out_frozen = g(z)
        for m, (mean, var, nbt) in zip(bns, before, strict=True):
            assert torch.equal(m.running_mean, mean)
            assert torch.equal(m.running_var, var)
            assert torch.equal(m.num_batches_tracked, nbt)
            assert m.track_running_stats  # restored
        with bn_stat_updates(g, enabled=True):
            out_updating = g(z)
        # batch statistics are used either way
        torch.testing.assert_close(out_frozen, out_updating)
        for m, (mean, _, nbt) in zip(bns, before, strict=True):
            assert not torch.equal(m.running_mean, mean)
            assert m.num_batches_tracked == nbt + 1
        plain_before = bns[0].running_mean.clone()
        g(z)  # outside the context: normal PyTorch behaviour
        assert not torch.equal(bns[0].running_mean, plain_before)


def test_bn_stat_updates_restores_on_error_and_keeps_eval_behaviour(tiny_nets):
    g = tiny_nets[0]
    z = torch.randn(3, LATENT)
    with torch.no_grad():
        ref = g.eval()(z)
        with bn_stat_updates(g, enabled=False):
            torch.testing.assert_close(g(z), ref)  # eval still uses running statistics
        with pytest.raises(RuntimeError, match="boom"):
            with bn_stat_updates(g, enabled=False):
                raise RuntimeError("boom")
    assert all(m.track_running_stats for m in g.modules() if isinstance(m, nn.BatchNorm2d))

"""Inference copies of the f-AnoGAN networks (BatchNorm folding, strided resampling) and the fast scoring path.

Run under both ISAs: ``.venv/bin/python -m pytest -q tests/models/test_fanogan_inference.py`` and with
``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2`` set.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from octpipe.models.fanogan.checkpoint import FAnoGANModel, build_networks
from octpipe.models.fanogan.config import FAnoGANConfig
from octpipe.models.fanogan.inference import (
    ConvThenUpsample,
    InferenceResidualBlock,
    StridedMeanPoolConv,
    TransposedUpsampleConv,
    fold_batchnorm,
    fold_conv_batchnorm,
    fuse_resampling,
    prepare_model,
    prepare_network,
)
from octpipe.models.fanogan.networks import (
    ConvMeanPool,
    Discriminator,
    Encoder,
    Generator,
    ResidualBlock,
    UpsampleConv,
)
from octpipe.models.fanogan.score import (
    SCORE_NAMES,
    _setup,
    pixel_residual,
    score_and_reconstruct,
    score_patches,
)

ROOT = Path(__file__).resolve().parents[2]
CL = torch.channels_last
#: Network outputs of a rewritten copy against the original: the same function, other summation orders
#: and kernels. Seen: ~1e-5 absolute on G(z) in (-1, 1) and on D features of magnitude ~5 (AVX-512 and
#: AVX2); a wrong tap, a missing bias or an unfolded BatchNorm is off by more than 1e-2.
NET_TOL = {"rtol": 1e-4, "atol": 1e-4}
#: Scores (means of squares) of the fast path against the naive one: seen < 3e-6 relative.
SCORE_RTOL = 1e-4


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_model(seed: int = 0) -> FAnoGANModel:
    """32x32 patches, dim 8, latent 16, with non-trivial BatchNorm moving averages and affine parameters."""
    cfg = FAnoGANConfig.from_dict({"model": {"image_size": 32, "dim": 8, "latent_dim": 16},
                                   "encoder": {"kappa": 0.5}})
    torch.manual_seed(seed)
    g, d, e = build_networks(cfg)
    with torch.no_grad():
        for m in (*g.modules(), *e.modules(), *d.modules()):
            if isinstance(m, nn.BatchNorm2d | nn.GroupNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
        g.train()(torch.randn(32, 16))
        e.train()(torch.rand(32, 1, 32, 32) * 2 - 1)
    return FAnoGANModel(g, d, e, cfg).eval()


def state(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in net.state_dict().items()}


def n_params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters() if p.requires_grad)


# --- exact rewrites -----------------------------------------------------------------------------
def test_fold_conv_batchnorm_equals_conv_then_eval_batchnorm():
    torch.manual_seed(0)
    for bias in (True, False):
        conv = nn.Conv2d(3, 5, 3, padding=1, bias=bias)
        bn = nn.BatchNorm2d(5, eps=1e-3)
        with torch.no_grad():
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.1, 2)
            bn.weight.uniform_(-2, 2)
            bn.bias.uniform_(-1, 1)
        bn.eval()
        x = torch.randn(4, 3, 8, 8)
        fused = fold_conv_batchnorm(conv, bn)
        assert fused.bias is not None
        torch.testing.assert_close(fused(x), bn(conv(x)), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="channels"):
        fold_conv_batchnorm(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(5))
    with pytest.raises(ValueError, match="running statistics"):
        fold_conv_batchnorm(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False))


@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL])
def test_strided_layers_equal_the_resampling_layers(fmt):
    torch.manual_seed(0)
    x = torch.randn(3, 6, 8, 8).contiguous(memory_format=fmt)
    for bias in (True, False):
        pool = ConvMeanPool(6, 4, 3, bias=bias)
        up = UpsampleConv(6, 4, 3, bias=bias)
        with torch.no_grad():  # non-zero biases, so a dropped bias shows
            for m in (pool, up):
                if m.conv.bias is not None:
                    m.conv.bias.uniform_(-1, 1)
        torch.testing.assert_close(StridedMeanPoolConv(pool)(x), pool(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(TransposedUpsampleConv(up)(x), up(x), rtol=1e-5, atol=1e-5)
    short = UpsampleConv(6, 4, 1)
    torch.testing.assert_close(ConvThenUpsample(short)(x), short(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="3x3"):
        StridedMeanPoolConv(ConvMeanPool(6, 4, 1))
    with pytest.raises(ValueError, match="3x3"):
        TransposedUpsampleConv(UpsampleConv(6, 4, 1))
    with pytest.raises(ValueError, match="1x1"):
        ConvThenUpsample(UpsampleConv(6, 4, 3))


def test_folded_networks_give_the_outputs_of_the_eval_networks():
    model = tiny_model()
    g, e, d = model.generator, model.encoder, model.discriminator
    x = torch.rand(6, 1, 32, 32) * 2 - 1
    z = torch.rand(6, 16) * 2 - 1
    fg, fe, fd = fold_batchnorm(g), fold_batchnorm(e), fold_batchnorm(d)
    n_bn = [sum(isinstance(m, nn.BatchNorm2d) for m in net.modules()) for net in (g, fg, e, fe)]
    assert n_bn == [9, 5, 8, 4]  # norm2 of every block folded; norm1 and G's output norm stay
    with torch.no_grad():
        torch.testing.assert_close(fg(z), g(z), **NET_TOL)
        torch.testing.assert_close(fe(x), e(x), **NET_TOL)
        torch.testing.assert_close(fd.features(x), d.features(x), rtol=0, atol=0)  # GroupNorm: nothing folds


def test_prepared_networks_give_the_outputs_of_the_eval_networks():
    model = tiny_model()
    g, e, d = model.generator, model.encoder, model.discriminator
    x = torch.rand(6, 1, 32, 32) * 2 - 1
    z = torch.rand(6, 16) * 2 - 1
    with torch.no_grad():
        for fmt in (CL, torch.contiguous_format):
            pg, pe, pd = (prepare_network(n, memory_format=fmt) for n in (g, e, d))
            xf = x.contiguous(memory_format=fmt)
            torch.testing.assert_close(pg(z), g(z), **NET_TOL)
            torch.testing.assert_close(pe(xf), e(x), **NET_TOL)
            torch.testing.assert_close(pd.features(xf), d.features(x), **NET_TOL)
        torch.testing.assert_close(fuse_resampling(d)(x), d(x), **NET_TOL)
    kinds = {type(m) for m in pg.modules()}
    assert TransposedUpsampleConv in kinds and ConvThenUpsample in kinds and UpsampleConv not in kinds
    kinds = {type(m) for m in pd.modules()}
    assert StridedMeanPoolConv in kinds and ConvMeanPool not in kinds
    assert InferenceResidualBlock in kinds and ResidualBlock not in kinds
    assert not any(p.requires_grad for p in pg.parameters())


def test_inplace_blocks_give_the_outputs_of_the_blocks_and_leave_their_input():
    torch.manual_seed(0)
    for block in (ResidualBlock(4, 8, "down", norm="group"), ResidualBlock(4, 8, "up")):
        block.eval()
        x = torch.randn(3, 4, 8, 8)
        saved = x.clone()
        with torch.no_grad():
            torch.testing.assert_close(InferenceResidualBlock(block)(x), block(x), rtol=0, atol=0)
        assert torch.equal(x, saved)  # the ReLUs and the sum never overwrite the block's input


def test_fused_critic_pass_gives_the_features_of_two_passes():
    model = tiny_model()
    d = model.discriminator.to(memory_format=CL)
    x = (torch.rand(5, 1, 32, 32) * 2 - 1).contiguous(memory_format=CL)
    y = (torch.rand(5, 1, 32, 32) * 2 - 1).contiguous(memory_format=CL)
    with torch.no_grad():
        f_x, f_y = d.features(torch.cat([x, y])).split(5)
        torch.testing.assert_close(f_x, d.features(x), **NET_TOL)  # GroupNorm is per sample
        torch.testing.assert_close(f_y, d.features(y), **NET_TOL)


# --- the originals stay as they are ---------------------------------------------------------------
def test_paper_networks_keep_their_parameter_counts():
    torch.manual_seed(0)
    g, d, e = Generator(), Discriminator(), Encoder()
    counts = [n_params(n) for n in (g, d, e)]
    assert counts == [8_539_329, 7_490_689, 8_531_200]
    prepared = [prepare_network(n.eval()) for n in (g, d, e)]
    assert [n_params(n) for n in (g, d, e)] == counts
    assert [sum(p.numel() for p in n.parameters()) for n in prepared] != counts  # 4x4 kernels, fewer norms


def test_prepare_and_the_fast_path_leave_the_model_untouched():
    model = tiny_model()
    model.encoder.train()  # e.g. calibration during encoder training
    before = {name: state(getattr(model, name)) for name in ("generator", "discriminator", "encoder")}
    counts = [n_params(n) for n in (model.generator, model.discriminator, model.encoder)]
    x = torch.rand(7, 1, 32, 32) * 2 - 1
    rng = torch.get_rng_state()
    prepared = prepare_model(model)
    assert prepared.config is model.config and prepared.encoder is not model.encoder
    score_patches(model, x, batch_size=4, precision="fp32")
    score_and_reconstruct(model, x, batch_size=4, precision="fp32")
    pixel_residual(model, x, batch_size=4, precision="fp32")
    assert torch.equal(rng, torch.get_rng_state())  # no random initialisation of the new layers
    assert model.encoder.training and not model.generator.training
    assert [n_params(n) for n in (model.generator, model.discriminator, model.encoder)] == counts
    for name, saved in before.items():
        now = getattr(model, name).state_dict()
        assert saved.keys() == now.keys()
        assert all(torch.equal(saved[k], now[k]) for k in saved), name
        assert all(p.is_contiguous() for p in getattr(model, name).parameters())  # memory format kept


# --- scores ------------------------------------------------------------------------------------------
def test_fast_scores_match_the_naive_path():
    model = tiny_model()
    x = torch.rand(10, 1, 32, 32) * 2 - 1
    naive = score_patches(model, x, batch_size=4, precision="fp32", channels_last=False, fast=False)
    fast = score_patches(model, x, batch_size=4, precision="fp32")
    run = _setup(model, "cpu", "auto", "auto")[0]  # the default path scores with the inference copies
    assert run is not model and StridedMeanPoolConv in {type(m) for m in run.discriminator.modules()}
    for name in SCORE_NAMES:
        np.testing.assert_allclose(fast[name], naive[name], rtol=SCORE_RTOL, atol=0, err_msg=name)
    s, rec = score_and_reconstruct(model, x, batch_size=4, precision="fp32", latent=False)
    s_naive, rec_naive = score_and_reconstruct(model, x, batch_size=4, precision="fp32", latent=False, fast=False)
    np.testing.assert_allclose(rec, rec_naive, rtol=0, atol=1e-4)
    np.testing.assert_allclose(s["A"], s_naive["A"], rtol=SCORE_RTOL, atol=0)
    assert np.isnan(s["z_distance"]).all()
    r = pixel_residual(model, x, batch_size=4, precision="fp32")
    r_naive = pixel_residual(model, x, batch_size=4, precision="fp32", fast=False)
    np.testing.assert_allclose(r, r_naive, rtol=0, atol=1e-4)


def test_fast_bf16_scores_stay_close_to_fp32():
    model = tiny_model()
    x = torch.rand(8, 1, 32, 32) * 2 - 1
    fp32 = score_patches(model, x, batch_size=8, precision="fp32", fast=False)
    bf16 = score_patches(model, x, batch_size=8, precision="bf16")
    # bf16 autocast moves A by ~1e-2 relative (benchmarks/results/fanogan.json); a broken path by far more
    np.testing.assert_allclose(bf16["A"], fp32["A"], rtol=0.1, atol=0)


# --- the prepared GPU check, in its CPU smoke mode ---------------------------------------------------
def test_gpu_check_runs_quickly_on_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--quick",
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["device"]["type"] == "cpu" and report["quick"] is True
    assert report["inference"]["variants"]["octpipe-fast"]["patches_per_s"] > 0
    assert report["training"]["generator_iterations_per_s"] > 0
    assert report["export"]["seconds_per_volume"] > 0
    assert not report["errors"]

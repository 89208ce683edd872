"""f-AnoGAN losses, anomaly scores and the TF-1 RMSProp optimiser (FANOGAN-SPEC.md §1.3-1.5)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from octpipe.models.fanogan.losses import (
    anomaly_scores,
    izi_loss,
    izif_loss,
    latent_distances,
    wgan_generator_loss,
    wgan_gp_critic_loss,
    ziz_loss,
)
from octpipe.models.fanogan.networks import Discriminator
from octpipe.models.fanogan.optim import RMSpropTF

SHAPE = (5, 1, 4, 4)


class LinearCritic(torch.nn.Module):
    """D(x) = <w, flatten(x)> + b: its input gradient is w everywhere."""

    def __init__(self, w: torch.Tensor, b: float = 0.0) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(w.clone())
        self.b = torch.nn.Parameter(torch.tensor(b))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.w + self.b


def _batches(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)


# ---------------------------------------------------------------- WGAN-GP
def test_gradient_penalty_zero_for_unit_norm_gradient():
    w = torch.randn(16, generator=torch.Generator().manual_seed(1))
    critic = LinearCritic(w / w.norm())
    real, fake = _batches()
    _, stats = wgan_gp_critic_loss(critic, real, fake)
    assert stats["gradient_penalty"].item() == pytest.approx(0.0, abs=1e-10)


def test_gradient_penalty_positive_otherwise():
    w = torch.randn(16, generator=torch.Generator().manual_seed(1))
    real, fake = _batches()
    _, stats = wgan_gp_critic_loss(LinearCritic(3 * w / w.norm()), real, fake)
    assert stats["gradient_penalty"].item() == pytest.approx(4.0, rel=1e-5)  # (3 - 1)^2
    _, stats = wgan_gp_critic_loss(LinearCritic(0.5 * w / w.norm()), real, fake)
    assert stats["gradient_penalty"].item() == pytest.approx(0.25, rel=1e-5)


def test_critic_loss_matches_hand_computation_and_gradient():
    w = torch.arange(16, dtype=torch.float32) / 20 - 0.3
    critic = LinearCritic(w, b=0.7)
    real, fake = _batches(3)
    loss, stats = wgan_gp_critic_loss(critic, real, fake, gp_weight=10.0)
    d_real = (real.flatten(1) @ w + 0.7).mean()
    d_fake = (fake.flatten(1) @ w + 0.7).mean()
    gp = (w.norm() - 1) ** 2
    torch.testing.assert_close(loss, d_fake - d_real + 10 * gp)
    torch.testing.assert_close(stats["wasserstein"], d_real - d_fake)
    torch.testing.assert_close(stats["critic_real"], d_real)
    torch.testing.assert_close(stats["critic_fake"], d_fake)
    torch.testing.assert_close(stats["gradient_penalty"], gp)
    assert all(not v.requires_grad for v in stats.values())
    # create_graph=True: the penalty back-propagates into the critic's weights
    loss.backward()
    expected = fake.flatten(1).mean(0) - real.flatten(1).mean(0) + 10 * 2 * (w.norm() - 1) * w / w.norm()
    torch.testing.assert_close(critic.w.grad, expected)
    assert critic.b.grad.item() == pytest.approx(0.0, abs=1e-6)


def test_interpolation_uses_one_alpha_per_sample_from_generator():
    """Critic D(x) = 0.5·||x||², so ∇D(x̂) = x̂ and the penalty depends on α."""
    real, fake = _batches(4)

    def critic(x):
        return 0.5 * (x**2).flatten(1).sum(1)

    _, stats = wgan_gp_critic_loss(critic, real, fake, generator=torch.Generator().manual_seed(7))
    alpha = torch.rand((SHAPE[0], 1, 1, 1), generator=torch.Generator().manual_seed(7))
    x_hat = real + alpha * (fake - real)
    expected = ((x_hat.flatten(1).norm(dim=1) - 1) ** 2).mean()
    torch.testing.assert_close(stats["gradient_penalty"], expected)
    _, again = wgan_gp_critic_loss(critic, real, fake, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(again["gradient_penalty"], expected)


def test_critic_loss_does_not_reach_generator_and_accepts_n_by_1_scores():
    gen_param = torch.nn.Parameter(torch.ones(()))
    real, fake = _batches()
    fake = fake * gen_param
    critic = LinearCritic(torch.ones(16) / 4)
    loss, _ = wgan_gp_critic_loss(lambda x: critic(x)[:, None], real, fake)
    loss.backward()
    assert gen_param.grad is None
    assert critic.w.grad is not None


def test_critic_loss_with_real_discriminator_backprops():
    torch.manual_seed(0)
    d = Discriminator(dim=4, image_size=16)
    real = torch.rand(3, 1, 16, 16) * 2 - 1
    fake = torch.rand(3, 1, 16, 16) * 2 - 1
    loss, stats = wgan_gp_critic_loss(d, real, fake, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss)
    assert stats["gradient_penalty"] > 0
    assert all(p.grad is not None for p in d.parameters())


def test_critic_loss_input_errors():
    critic = LinearCritic(torch.ones(16))
    real, fake = _batches()
    with pytest.raises(ValueError, match="same shape"):
        wgan_gp_critic_loss(critic, real, fake[:3])
    with pytest.raises(ValueError, match="gp_weight"):
        wgan_gp_critic_loss(critic, real, fake, gp_weight=-1)
    with pytest.raises(ValueError, match="one score per sample"):
        wgan_gp_critic_loss(lambda x: x.flatten(1), real, fake)


def test_generator_loss():
    critic = LinearCritic(torch.ones(16) / 4, b=1.0)
    _, fake = _batches()
    torch.testing.assert_close(wgan_generator_loss(critic, fake), -(fake.flatten(1).sum(1) / 4 + 1).mean())


# ---------------------------------------------------------------- encoder losses and scores
def test_izi_izif_ziz_losses():
    x, x_rec = _batches(5)
    fx, frec = torch.randn(5, 8), torch.randn(5, 8)
    img = ((x - x_rec) ** 2).sum() / x.numel()
    feat = ((fx - frec) ** 2).sum() / fx.numel()
    torch.testing.assert_close(izi_loss(x, x_rec), img)
    torch.testing.assert_close(izif_loss(x, x_rec, fx, frec), img + feat)
    torch.testing.assert_close(izif_loss(x, x_rec, fx, frec, kappa=0.25), img + 0.25 * feat)
    z, z_rec = torch.randn(5, 16), torch.randn(5, 16)
    torch.testing.assert_close(ziz_loss(z, z_rec), (((z - z_rec) ** 2).sum(1) / 16).mean())
    with pytest.raises(ValueError, match="same shape"):
        izif_loss(x, x_rec, fx, frec[:, :4])
    with pytest.raises(ValueError, match="kappa"):
        izif_loss(x, x_rec, fx, frec, kappa=-1)


def test_anomaly_scores_per_sample():
    x = torch.zeros(2, 1, 2, 2)
    x_rec = torch.tensor([[[[1.0, 1.0], [1.0, 1.0]]], [[[2.0, 0.0], [0.0, 0.0]]]])
    fx = torch.zeros(2, 4)
    frec = torch.tensor([[2.0, 0, 0, 0], [1.0, 1.0, 1.0, 1.0]])
    s = anomaly_scores(x, x_rec, fx, frec, kappa=2.0)
    torch.testing.assert_close(s.residual, torch.tensor([1.0, 1.0]))
    torch.testing.assert_close(s.feature, torch.tensor([1.0, 1.0]))
    torch.testing.assert_close(s.total, torch.tensor([3.0, 3.0]))
    residual, feature, total = anomaly_scores(x, x_rec, fx, frec)
    torch.testing.assert_close(total, residual + feature)
    # per sample means, consistent with the batch losses
    torch.testing.assert_close(s.residual.mean(), izi_loss(x, x_rec))
    with pytest.raises(ValueError, match="batch size"):
        anomaly_scores(x, x_rec, fx[:1], frec[:1])
    torch.testing.assert_close(latent_distances(torch.zeros(2, 4), frec), torch.tensor([1.0, 1.0]))


# ---------------------------------------------------------------- RMSpropTF
def _three_step_reference(p0, grads, lr, alpha, eps):
    p, ms = p0.clone().double(), torch.ones_like(p0).double()
    for g in grads:
        g = g.double()
        ms = alpha * ms + (1 - alpha) * g * g
        p = p - lr * g / torch.sqrt(ms + eps)
    return p


def test_rmsprop_tf_matches_hand_update_for_three_steps():
    p0 = torch.tensor([1.0, -2.0, 0.5, 0.0], dtype=torch.float64)
    grads = [
        torch.tensor([0.5, -1.0, 2.0, 0.0]),
        torch.tensor([0.1, 0.3, -0.2, 1e-3]),
        torch.tensor([1.0, 1.0, 1.0, 1.0]),
    ]
    p = torch.nn.Parameter(p0.clone())
    opt = RMSpropTF([p], lr=0.01)
    assert opt.defaults == {"lr": 0.01, "alpha": 0.9, "eps": 1e-10, "momentum": 0.0}
    for g in grads:
        p.grad = g.double()
        opt.step()
    torch.testing.assert_close(p.detach(), _three_step_reference(p0, grads, 0.01, 0.9, 1e-10))
    # first step by hand: ms = 0.9 + 0.1·0.25 = 0.925
    q = torch.nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    opt = RMSpropTF([q], lr=0.01)
    q.grad = torch.tensor([0.5], dtype=torch.float64)
    opt.step()
    assert q.item() == pytest.approx(1.0 - 0.01 * 0.5 / math.sqrt(0.925 + 1e-10), rel=1e-12)


def test_rmsprop_tf_defaults_and_difference_from_torch_rmsprop():
    p_tf = torch.nn.Parameter(torch.ones(3))
    p_pt = torch.nn.Parameter(torch.ones(3))
    tf_opt = RMSpropTF([p_tf])
    pt_opt = torch.optim.RMSprop([p_pt], lr=5e-5)
    assert tf_opt.defaults["lr"] == 5e-5
    g = torch.tensor([0.1, -0.2, 0.3])
    p_tf.grad, p_pt.grad = g.clone(), g.clone()
    tf_opt.step()
    pt_opt.step()
    step_tf = (1 - p_tf.detach()).abs()
    step_pt = (1 - p_pt.detach()).abs()
    assert not torch.allclose(step_tf, step_pt)
    assert (step_pt > 5 * step_tf).all()  # zero-initialised accumulator takes ~10x larger first steps


def test_rmsprop_tf_state_dict_round_trip():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = RMSpropTF(model.parameters(), lr=1e-2, momentum=0.5)
    x = torch.randn(4, 3)
    for _ in range(2):
        opt.zero_grad()
        model(x).pow(2).sum().backward()
        opt.step()
    state = copy.deepcopy(opt.state_dict())  # as if saved to disk: live state_dicts share tensors
    clone = torch.nn.Linear(3, 2)
    clone.load_state_dict(model.state_dict())
    opt2 = RMSpropTF(clone.parameters(), lr=1e-2, momentum=0.5)
    opt2.load_state_dict(state)
    for o, m in ((opt, model), (opt2, clone)):
        o.zero_grad()
        m(x).pow(2).sum().backward()
        o.step()
    for a, b in zip(model.parameters(), clone.parameters(), strict=True):
        torch.testing.assert_close(a, b)
    s = opt2.state[next(iter(clone.parameters()))]
    assert set(s) == {"step", "square_avg", "momentum_buffer"} and s["step"].item() == 3


def test_rmsprop_tf_momentum_matches_tf_formula():
    p = torch.nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    opt = RMSpropTF([p], lr=0.1, momentum=0.9)
    mom, ms, ref = 0.0, 1.0, 1.0
    for g in (0.5, -0.25):
        p.grad = torch.tensor([g], dtype=torch.float64)
        opt.step()
        ms = 0.9 * ms + 0.1 * g * g
        mom = 0.9 * mom + 0.1 * g / math.sqrt(ms + 1e-10)
        ref -= mom
    assert p.item() == pytest.approx(ref, rel=1e-12)


@pytest.mark.parametrize("kwargs", [{"lr": -1.0}, {"alpha": 1.0}, {"eps": -1e-3}, {"momentum": -0.1}])
def test_rmsprop_tf_rejects_bad_hyperparameters(kwargs):
    with pytest.raises(ValueError):
        RMSpropTF([torch.nn.Parameter(torch.ones(1))], **kwargs)

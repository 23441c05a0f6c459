"""MeanFlow (losses/meanflow.py, SiT(meanflow=True), samplers.sample_meanflow) against closed forms.

The reference "model" is the exact average velocity of Gaussian data x ~ N(m, s^2) per dimension
(docs/CONVENTIONS.md §11), worked out here independently of the library:

    z_t = (1 - t) x + t eps  ~  N(mu_t, sigma_t^2),  mu_t = (1 - t) m,
    sigma_t^2 = (1 - t)^2 s^2 + t^2.
    The marginal velocity is affine in z: v(z, t) = mu_t' + (sigma_t' / sigma_t) (z - mu_t), with
    mu_t' = -m and sigma_t' = (t - (1 - t) s^2) / sigma_t. It is the velocity of the map
    z_t = mu_t + sigma_t w (w fixed), so the ODE flow map from t to r is
    z_r = mu_r + sigma_r (z_t - mu_t) / sigma_t, and the average velocity over [r, t] is
    u(z, r, t) = (z - z_r) / (t - r) for r < t, u(z, t, t) = v(z, t).
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn

from losses import DispersiveLoss
from losses.meanflow import (MeanFlowLoss, average_velocity_jvp, guided_velocity,
                             meanflow_batch, meanflow_loss, meanflow_losses,
                             meanflow_prediction_one_jvp, meanflow_target,
                             sample_meanflow_times)
from losses.terms import training_losses
from models.sit import SiT, SiT_models
from samplers import sample_meanflow, sample_noise, sample_ode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
F64 = torch.float64
TINY = dict(input_size=4, patch_size=2, in_channels=2, hidden_size=32, depth=2, num_heads=2,
            num_classes=3)


# ----------------------------------------------------------------------------------------------
# The exact average velocity of Gaussian data.

class GaussianMeanFlow(nn.Module):
    """model(z, t, y, r=r) -> exact u(z, r, t) for data N(m, s^2) per dimension (labels ignored)."""

    def __init__(self, m, s, num_classes: int = 3):
        super().__init__()
        self.register_buffer("m", torch.as_tensor(m, dtype=F64))
        self.register_buffer("s", torch.as_tensor(s, dtype=F64))
        self.num_classes = num_classes
        self.calls = 0

    def stats(self, t: torch.Tensor, z: torch.Tensor):
        t = t.reshape(-1, *[1] * (z.ndim - 1))
        mu = (1 - t) * self.m
        sig = torch.sqrt((1 - t) ** 2 * self.s ** 2 + t ** 2)
        return mu, sig, -self.m + 0 * t, (t - (1 - t) * self.s ** 2) / sig

    def velocity(self, z, t):
        mu, sig, dmu, dsig = self.stats(t, z)
        return dmu + dsig / sig * (z - mu)

    def flow(self, z, t, r):
        mu_t, sig_t, _, _ = self.stats(t, z)
        mu_r, sig_r, _, _ = self.stats(r, z)
        return mu_r + sig_r * (z - mu_t) / sig_t

    def average(self, z, r, t):
        gap = (t - r).reshape(-1, *[1] * (z.ndim - 1))
        safe = torch.where(gap > 0, gap, torch.ones_like(gap))   # r = t rows take v below
        return torch.where(gap > 0, (z - self.flow(z, t, r)) / safe, self.velocity(z, t))

    def forward(self, z, t, y, r=None):
        self.calls += 1
        return self.average(z, t if r is None else r, t)


CASES = {
    "scalar": (1.5, 0.5),
    "per_dim": (torch.tensor([[[1.0, -2.0], [0.5, 0.0]], [[3.0, -1.0], [0.2, 2.0]]]),
                torch.tensor([[[0.3, 1.0], [2.0, 0.7]], [[0.1, 1.5], [0.9, 0.4]]])),
}
SHAPE = (2, 2, 2)


def rk4(model: GaussianMeanFlow, z, t: float, r: float, n: int = 2000):
    h = (r - t) / n
    s = t
    for _ in range(n):
        ts = lambda a: torch.full((z.shape[0],), a, dtype=F64)  # noqa: E731
        k1 = model.velocity(z, ts(s))
        k2 = model.velocity(z + h / 2 * k1, ts(s + h / 2))
        k3 = model.velocity(z + h / 2 * k2, ts(s + h / 2))
        k4 = model.velocity(z + h * k3, ts(s + h))
        z, s = z + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4), s + h
    return z


def times(n: int, seed: int, equal_fraction: float = 0.5):
    t, r = sample_meanflow_times(n, torch.Generator().manual_seed(seed),
                                 equal_fraction=equal_fraction, dtype=F64)
    return t, r


@pytest.mark.parametrize("case", CASES)
def test_closed_form_average_velocity_matches_rk4_integral(case):
    model = GaussianMeanFlow(*CASES[case])
    z = 2 * torch.randn((5, *SHAPE), generator=torch.Generator().manual_seed(0), dtype=F64)
    for t, r in ((1.0, 0.0), (0.9, 0.3), (0.5, 0.45), (0.2, 0.0)):
        z_r = rk4(model, z, t, r)
        tt, rr = torch.full((5,), t, dtype=F64), torch.full((5,), r, dtype=F64)
        torch.testing.assert_close(model.flow(z, tt, rr), z_r, rtol=0, atol=1e-10)
        torch.testing.assert_close(model.average(z, rr, tt), (z - z_r) / (t - r),
                                   rtol=0, atol=1e-9)
    tt = torch.full((5,), 0.6, dtype=F64)
    assert torch.equal(model.average(z, tt, tt), model.velocity(z, tt))
    # 1 NFE with the exact u from pure noise gives m + s eps (sigma_0 = s, sigma_1 = 1)
    one, zero = torch.ones(5, dtype=F64), torch.zeros(5, dtype=F64)
    torch.testing.assert_close(z - model.average(z, zero, one), model.m + model.s * z)


# ----------------------------------------------------------------------------------------------
# Target, JVP and loss.

@pytest.mark.parametrize("case", CASES)
def test_target_equals_exact_average_velocity(case):
    model = GaussianMeanFlow(*CASES[case])
    t, r = times(64, 1)
    assert (r == t).any() and (r < t).any()
    z = torch.randn((64, *SHAPE), generator=torch.Generator().manual_seed(2), dtype=F64)
    u_exact = model.average(z, r, t)
    out = meanflow_target(lambda z_, r_, t_: model(z_, t_, None, r=r_), z, r, t,
                          model.velocity(z, t))
    torch.testing.assert_close(out["u"], u_exact, rtol=0, atol=1e-12)
    torch.testing.assert_close(out["u_tgt"], u_exact, rtol=0, atol=1e-5)
    assert not out["u_tgt"].requires_grad
    # the exact u is the minimum of the loss
    for p in (0.0, 1.0):
        at_min = meanflow_loss(u_exact, out["u_tgt"], p=p)
        assert at_min["loss"] < 1e-12
        for scale in (1e-3, 0.1):
            bumped = u_exact + scale * torch.randn(u_exact.shape, dtype=F64,
                                                   generator=torch.Generator().manual_seed(3))
            assert meanflow_loss(bumped, out["u_tgt"], p=p)["loss"] > at_min["loss"] + 1e-7


def test_target_with_conditional_velocity_is_unbiased():
    """Training uses v = eps - x; averaged over x | z_t (a Gaussian posterior) the target is u."""
    m, s = CASES["per_dim"]
    model = GaussianMeanFlow(m, s)
    n, t0, r0 = 200_000, 0.7, 0.2
    z = torch.randn((1, *SHAPE), generator=torch.Generator().manual_seed(4), dtype=F64)
    sig2 = (1 - t0) ** 2 * s.double() ** 2 + t0 ** 2
    post_mean = m + (1 - t0) * s ** 2 / sig2 * (z - (1 - t0) * m)
    post_std = s * t0 / sig2.sqrt()
    x = post_mean + post_std * torch.randn((n, *SHAPE), generator=torch.Generator().manual_seed(5),
                                           dtype=F64)
    eps = (z - (1 - t0) * x) / t0
    t, r = torch.full((n,), t0, dtype=F64), torch.full((n,), r0, dtype=F64)
    zz = z.expand(n, *SHAPE)
    tgt = meanflow_target(lambda z_, r_, t_: model(z_, t_, None, r=r_), zz, r, t, eps - x)["u_tgt"]
    se = tgt.std(0) / math.sqrt(n)
    assert ((tgt.mean(0) - model.average(z, r[:1], t[:1])[0]).abs() < 5 * se).all()


def _fd_check(u_fn, z, r, t, v, h=1e-5):
    _, dudt = average_velocity_jvp(u_fn, z, r, t, v)
    with torch.no_grad():
        fd = (u_fn(z + h * v, r, t + h) - u_fn(z - h * v, r, t - h)) / (2 * h)
    torch.testing.assert_close(dudt, fd, rtol=0, atol=1e-6)
    return dudt


def test_jvp_equals_central_differences_float64_closed_form():
    model = GaussianMeanFlow(*CASES["per_dim"])
    t, r = times(32, 6, equal_fraction=0.0)
    t, r = t.clamp(0.05, 0.95), r.clamp(0.0, 0.9)   # keep t +- h inside (0, 1)
    r = torch.minimum(r, t - 0.01)
    z = torch.randn((32, *SHAPE), generator=torch.Generator().manual_seed(7), dtype=F64)
    v = torch.randn_like(z)
    dudt = _fd_check(lambda z_, r_, t_: model(z_, t_, None, r=r_), z, r, t, v)
    assert dudt.abs().max() > 0.1


def randomised_sit(meanflow: bool = True, seed: int = 0, **kw) -> SiT:
    """A tiny SiT whose zero-initialised layers are perturbed, so every path carries signal."""
    torch.manual_seed(seed)
    model = SiT(**{**TINY, **kw}, meanflow=meanflow)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def test_jvp_equals_central_differences_float64_sit():
    model = randomised_sit().double()
    t, r = times(4, 8, equal_fraction=0.0)
    z = torch.randn((4, 2, 4, 4), generator=torch.Generator().manual_seed(9), dtype=F64)
    v = torch.randn_like(z)
    y = torch.tensor([0, 1, 2, 3])
    dudt = _fd_check(lambda z_, r_, t_: model(z_, t_, y, r=r_), z, r, t, v)
    assert dudt.abs().max() > 1e-2


def test_jvp_runs_in_fp32_under_autocast_and_carries_no_grad():
    model = randomised_sit()
    t, r = times(4, 10)
    z = torch.randn(4, 2, 4, 4, generator=torch.Generator().manual_seed(11))
    v = torch.randn_like(z)
    y = torch.tensor([0, 1, 2, 3])
    fn = lambda z_, r_, t_: model(z_, t_, y, r=r_)  # noqa: E731
    plain = average_velocity_jvp(fn, z, r, t, v)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = average_velocity_jvp(fn, z, r, t, v)
    for a, b in zip(plain, auto):
        assert b.dtype == torch.float32 and not b.requires_grad
        assert torch.equal(a, b)


def test_adaptive_weight_and_sum_over_dims():
    g = torch.Generator().manual_seed(12)
    pred, tgt = torch.randn(5, 2, 3, 3, generator=g), torch.randn(5, 2, 3, 3, generator=g)
    pred.requires_grad_()
    L = (pred.detach() - tgt).square().sum(dim=(1, 2, 3))
    out = meanflow_loss(pred, tgt, p=1.0, c=1e-3)
    torch.testing.assert_close(out["loss"], (L / (L + 1e-3)).mean())
    torch.testing.assert_close(out["mf"], L.mean())
    out["loss"].backward()   # gradient of L_i / const: 2 (pred - tgt) / (L_i + c) / B
    want = 2 * (pred.detach() - tgt) / (L + 1e-3).view(-1, 1, 1, 1) / 5
    torch.testing.assert_close(pred.grad, want)
    torch.testing.assert_close(meanflow_loss(pred, tgt, p=0.0)["loss"], L.mean())
    torch.testing.assert_close(meanflow_loss(pred, tgt, p=0.5, c=0.1)["loss"],
                               (L / (L + 0.1).sqrt()).mean())


def test_defaults_and_bad_settings():
    mf = MeanFlowLoss()
    assert (mf.p, mf.c, mf.time_mu, mf.time_sigma, mf.equal_fraction) == (1.0, 1e-3, -0.4, 1.0,
                                                                          0.75)
    assert (mf.cfg_w, mf.cfg_kappa, mf.cfg_t_lo, mf.cfg_t_hi) == (1.0, 0.0, 0.0, 1.0)
    assert not mf.guidance_on and MeanFlowLoss(cfg_kappa=0.5).guidance_on
    g = torch.Generator().manual_seed(0)
    pred, tgt = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    torch.testing.assert_close(mf(pred, tgt)["loss"], meanflow_loss(pred, tgt, 1.0, 1e-3)["loss"])
    for bad in (dict(p=-1), dict(c=0), dict(equal_fraction=1.5), dict(cfg_kappa=1.0),
                dict(cfg_t_lo=0.8, cfg_t_hi=0.2), dict(time_sigma=-1)):
        with pytest.raises(ValueError):
            MeanFlowLoss(**bad)
    with pytest.raises(ValueError, match="differ"):
        meanflow_loss(pred, tgt[:2])


# ----------------------------------------------------------------------------------------------
# (t, r) sampling and the batch.

def _normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1 + torch.erf(x / math.sqrt(2)))


def _ks(samples: torch.Tensor, cdf) -> float:
    x = samples.double().sort().values
    n = x.numel()
    f = cdf(x)
    hi = torch.arange(1, n + 1, dtype=F64) / n
    return float(torch.maximum(hi - f, f - (hi - 1 / n)).abs().max())


def test_time_sampler_marginals_fraction_and_fixed_stream():
    n, mu, sigma = 200_000, -0.4, 1.0
    F = lambda x: _normal_cdf((torch.log(x / (1 - x)) - mu) / sigma)  # noqa: E731
    bound = 1.95 / math.sqrt(n)   # Kolmogorov-Smirnov, 0.1% level
    t0, r0 = sample_meanflow_times(n, torch.Generator().manual_seed(0), equal_fraction=0.0)
    assert (r0 < t0).all() and (r0 > 0).all() and (t0 < 1).all()
    assert _ks(t0, lambda x: F(x) ** 2) < bound
    assert _ks(r0, lambda x: 1 - (1 - F(x)) ** 2) < bound

    t, r = sample_meanflow_times(n, torch.Generator().manual_seed(0))   # default 0.75
    assert torch.equal(t, t0)                    # same normals whatever the fraction
    assert (r <= t).all()
    equal = r == t
    assert torch.equal(r[~equal], r0[~equal])
    frac = equal.double().mean().item()
    assert abs(frac - 0.75) < 4 * math.sqrt(0.75 * 0.25 / n)
    assert _ks(r, lambda x: 0.75 * F(x) ** 2 + 0.25 * (1 - (1 - F(x)) ** 2)) < bound
    t1, r1 = sample_meanflow_times(n, torch.Generator().manual_seed(0), equal_fraction=1.0)
    assert torch.equal(t1, t0) and torch.equal(r1, t1)


def test_meanflow_batch_order_and_linear_path_only():
    x, y = torch.randn(8, 2, 4, 4), torch.arange(8) % 3
    a = meanflow_batch(x, y, num_classes=3, cfg_prob=0.0,
                       generator=torch.Generator().manual_seed(1))
    b = meanflow_batch(x, y, num_classes=3, cfg_prob=0.5, mf=MeanFlowLoss(equal_fraction=0.0),
                       generator=torch.Generator().manual_seed(1))
    assert torch.equal(a["t"], b["t"]) and torch.equal(a["eps"], b["eps"])
    assert (b["r"] < b["t"]).all() and torch.equal(a["y"], y)
    g = torch.Generator().manual_seed(1)          # the documented order: dropout, times, eps
    torch.rand(8, generator=g)
    t, r = sample_meanflow_times(8, g)
    eps = torch.randn(x.shape, generator=g)
    assert torch.equal(a["t"], t) and torch.equal(a["r"], r) and torch.equal(a["eps"], eps)
    tt = t.view(-1, 1, 1, 1)
    torch.testing.assert_close(a["x_t"], (1 - tt) * x + tt * eps)
    torch.testing.assert_close(a["v"], eps - x)
    with pytest.raises(ValueError, match="linear path only"):
        meanflow_batch(x, y, num_classes=3, path_type="cosine")


# ----------------------------------------------------------------------------------------------
# Training-time guidance.

class ToyU:
    """u_fn(z, r, t, y) = (y + 1) z + t r, recording every call."""

    def __init__(self):
        self.calls = []

    def __call__(self, z, r, t, y):
        self.calls.append(z.shape[0])
        view = (-1, *[1] * (z.ndim - 1))
        return (y.to(z.dtype) + 1).view(view) * z + (t * r).view(view)


def test_guidance_off_costs_nothing():
    u = ToyU()
    z, v = torch.randn(4, 2, 2, 2), torch.randn(4, 2, 2, 2)
    out = guided_velocity(u, z, torch.rand(4), v, torch.tensor([0, 1, 2, 3]), 3)
    assert out is v and u.calls == []


@pytest.mark.parametrize("w,kappa,calls", [(1.5, 0.0, [4]), (0.6, 0.3, [8])])
def test_guided_velocity_by_hand(w, kappa, calls):
    null = 3
    y = torch.tensor([0, null, 2, 1])           # sample 1: label dropped
    t = torch.tensor([0.3, 0.5, 0.9, 0.6])      # sample 2: outside [0.2, 0.7]
    z = torch.randn(4, 2, 2, 2, generator=torch.Generator().manual_seed(0))
    v = torch.randn(4, 2, 2, 2, generator=torch.Generator().manual_seed(1))
    u = ToyU()
    out = guided_velocity(u, z, t, v, y, null, w=w, kappa=kappa, t_lo=0.2, t_hi=0.7)
    assert u.calls == calls
    want = v.clone()
    for i in (0, 3):   # u(z, t, t | null) = 4 z + t^2, u(z, t, t | y) = (y + 1) z + t^2
        u_null = 4 * z[i] + t[i] ** 2
        u_cond = (y[i] + 1) * z[i] + t[i] ** 2
        want[i] = w * v[i] + (1 - w - kappa) * u_null + kappa * u_cond
    torch.testing.assert_close(out, want)
    assert torch.equal(out[1], v[1]) and torch.equal(out[2], v[2])


# ----------------------------------------------------------------------------------------------
# The SiT side: zero-initialised interval embedder, gradients, losses.

def test_plain_sit_checkpoint_gives_u_equal_v_for_any_r():
    plain = randomised_sit(meanflow=False)
    mf = SiT_models["SiT-S/2"](**{k: v for k, v in TINY.items() if k != "patch_size"},
                               meanflow=True)
    missing, unexpected = mf.load_state_dict(plain.state_dict(), strict=False)
    assert sorted(missing) == ["h_embedder.mlp.0.bias", "h_embedder.mlp.0.weight",
                               "h_embedder.mlp.2.bias", "h_embedder.mlp.2.weight"]
    assert not unexpected
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 2, 4, 4, generator=g), torch.tensor([0, 1, 2, 3, 0, 1])
    t = torch.rand(6, generator=g)
    r = t * torch.rand(6, generator=g)
    with torch.no_grad():
        v = plain(x, t, y)
        assert v.abs().max() > 1e-3
        assert torch.equal(mf(x, t, y, r=r), v)
        assert torch.equal(mf(x, t, y), v)
        out, aux = mf(x, t, y, r=r, return_features=[1, 2])
        assert torch.equal(out, v) and sorted(aux["features"]) == [1, 2]
    with pytest.raises(ValueError, match="meanflow"):
        plain(x, t, y, r=r)
    d = TINY["hidden_size"]
    assert mf.forward_macs() - plain.forward_macs() == 256 * d + d * d


def test_one_backward_trains_the_interval_embedder_and_uses_r():
    model = randomised_sit(meanflow=False)
    mf_model = SiT(**TINY, meanflow=True)
    mf_model.load_state_dict(model.state_dict(), strict=False)
    g = torch.Generator().manual_seed(3)
    batch = meanflow_batch(torch.randn(8, 2, 4, 4, generator=g), torch.arange(8) % 3,
                           num_classes=3, cfg_prob=0.25, mf=MeanFlowLoss(equal_fraction=0.25),
                           generator=g)
    assert (batch["r"] < batch["t"]).any()
    terms = meanflow_losses(mf_model, mf_model, batch, depth=2, mf=MeanFlowLoss(),
                            disp=DispersiveLoss(), null_label=3)
    assert set(terms) == {"loss", "mf", "disp"}
    assert not terms["mf"].requires_grad
    terms["loss"].backward()
    # the zero output layer gets a gradient at step 0 (its input, the first layer, does later)
    assert mf_model.h_embedder.mlp[2].weight.grad.abs().sum() > 0
    assert mf_model.h_embedder.mlp[2].bias.grad.abs().sum() > 0
    assert all(p.grad is not None for p in mf_model.parameters() if p.requires_grad)


class Counting(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, *a, **kw):
        self.calls += 1
        return self.inner(*a, **kw)


def test_meanflow_losses_is_the_composition_of_its_parts():
    for w, kappa, raw_calls in ((1.0, 0.0, 1), (1.3, 0.4, 2)):
        sit = randomised_sit(seed=1)
        model, raw = Counting(sit), Counting(sit)
        mf = MeanFlowLoss(cfg_w=w, cfg_kappa=kappa, cfg_t_hi=0.8)
        g = torch.Generator().manual_seed(4)
        batch = meanflow_batch(torch.randn(6, 2, 4, 4, generator=g), torch.arange(6) % 3,
                               num_classes=3, cfg_prob=0.3, mf=mf, generator=g)
        terms = meanflow_losses(model, raw, batch, depth=2, mf=mf, null_label=3)
        assert set(terms) == {"loss", "mf"}
        assert model.calls == 1 and raw.calls == raw_calls   # JVP: one call; guidance: one more
        x_t, t, r, y = batch["x_t"], batch["t"], batch["r"], batch["y"]
        v = guided_velocity(lambda z, r_, t_, y_: sit(z, t_, y_, r=r_), x_t, t, batch["v"], y, 3,
                            w, kappa, 0.0, 0.8)
        tgt = meanflow_target(lambda z, r_, t_: sit(z, t_, y, r=r_), x_t, r, t, v)["u_tgt"]
        want = meanflow_loss(sit(x_t, t, y, r=r), tgt)
        torch.testing.assert_close(terms["loss"], want["loss"])
        torch.testing.assert_close(terms["mf"], want["mf"])


def test_one_jvp_reference_formulation_gives_the_same_loss_and_gradient():
    """The reference formulation (one JVP with autograd on: primal = prediction, tangent =
    target) and train.py's (JVP without gradient, then a forward) are the same objective: equal
    loss and parameter gradient in float64, so bench/bench_meanflow_memory.py compares only
    their cost."""
    sit = randomised_sit(seed=2).double()
    mf = MeanFlowLoss()
    g = torch.Generator().manual_seed(5)
    batch = meanflow_batch(torch.randn(6, 2, 4, 4, generator=g, dtype=F64), torch.arange(6) % 3,
                           num_classes=3, mf=mf, generator=g)
    params = [p for p in sit.parameters() if p.requires_grad]
    ours = meanflow_losses(sit, sit, batch, depth=2, mf=mf, null_label=3)["loss"]
    g_ours = torch.autograd.grad(ours, params)
    y = batch["y"]
    pred, target = meanflow_prediction_one_jvp(lambda z, r, t: sit(z, t, y, r=r), batch["x_t"],
                                               batch["r"], batch["t"], batch["v"])
    assert pred.requires_grad and not target.requires_grad
    ref = mf(pred, target)["loss"]
    g_ref = torch.autograd.grad(ref, params)
    torch.testing.assert_close(ref, ours, rtol=1e-12, atol=1e-12)
    for a, b in zip(g_ref, g_ours):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)  # attention kernels differ
    assert max(a.abs().max() for a in g_ours) > 1e-3  # a real gradient, not zeros


def test_r_equal_t_and_p_zero_is_the_si_loss_summed_over_dims():
    """With r = t the target is v itself; p = 0 is then D x the SI loss (mean over dims), and the
    dispersive term is the one training_losses computes, from the same forward."""
    sit = randomised_sit(seed=2)
    mf = MeanFlowLoss(p=0.0, equal_fraction=1.0)
    g = torch.Generator().manual_seed(5)
    batch = meanflow_batch(torch.randn(6, 2, 4, 4, generator=g), torch.arange(6) % 3,
                           num_classes=3, cfg_prob=0.2, mf=mf, generator=g)
    assert torch.equal(batch["r"], batch["t"])
    disp = DispersiveLoss(lambda_disp=0.5, blocks="all")
    terms = meanflow_losses(sit, sit, batch, depth=2, mf=mf, disp=disp, null_label=3)
    si_batch = {"x_t": batch["x_t"], "t": batch["t"], "y": batch["y"], "target": batch["v"],
                "x0": batch["x0"], "eps": batch["eps"]}
    si = training_losses(sit, si_batch, depth=2, disp=disp)
    torch.testing.assert_close(terms["mf"], si["si"] * 32)   # 2 x 4 x 4 values per sample
    torch.testing.assert_close(terms["disp"], si["disp"])
    torch.testing.assert_close(terms["loss"], si["si"] * 32 + 0.5 * si["disp"])


DDP_SCRIPT = textwrap.dedent("""
    import sys
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    sys.path.insert(0, sys.argv[1])
    from tests.test_meanflow import randomised_sit, ddp_batch
    from losses.meanflow import MeanFlowLoss, meanflow_losses

    world = int(sys.argv[3])
    dist.init_process_group("gloo", init_method="file://" + sys.argv[2] + "/rdv",
                            rank=int(sys.argv[4]), world_size=world)
    rank = dist.get_rank()
    sit = randomised_sit(seed=7)
    batch = {k: v.chunk(world)[rank] for k, v in ddp_batch().items()}
    model = DDP(sit) if world > 1 else sit
    mf = MeanFlowLoss(cfg_w=1.2, cfg_kappa=0.2)
    meanflow_losses(model, sit, batch, depth=2, mf=mf, null_label=3)["loss"].backward()
    if rank == 0:
        torch.save({k: p.grad for k, p in sit.named_parameters() if p.grad is not None},
                   sys.argv[2] + f"/grads-{world}.pt")
    dist.destroy_process_group()
""")


def ddp_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(9)
    return meanflow_batch(torch.randn(8, 2, 4, 4, generator=g), torch.arange(8) % 3,
                          num_classes=3, cfg_prob=0.25, mf=MeanFlowLoss(equal_fraction=0.25),
                          generator=g)


def test_ddp_two_processes_give_the_one_process_gradient(tmp_path):
    """The gradient flows through the DDP-wrapped forward, so 2 ranks with half the batch each
    average to the full-batch gradient of 1 process (the JVP on the raw model adds none)."""
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for world in (1, 2):
        rdv = tmp_path / f"w{world}"
        rdv.mkdir()
        procs = [subprocess.Popen([sys.executable, str(script), ROOT, str(rdv), str(world),
                                   str(rank)], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for rank in range(world)]
        for rank, p in enumerate(procs):
            out = p.communicate(timeout=120)[0]
            assert p.returncode == 0, f"world {world} rank {rank} failed:\n{out}"
    one = torch.load(tmp_path / "w1" / "grads-1.pt", weights_only=True)
    two = torch.load(tmp_path / "w2" / "grads-2.pt", weights_only=True)
    assert one.keys() == two.keys() and "h_embedder.mlp.2.weight" in one
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-6, msg=k)


# ----------------------------------------------------------------------------------------------
# Sampling.

class ToyMeanFlowModel(nn.Module):
    """u(x, r, t | y) = 0.7 cos(t) x + r sin(x) + 0.1 y (float64), recording (t, r) per call."""
    num_classes = 3

    def __init__(self):
        super().__init__()
        self.register_buffer("w", torch.tensor(0.7, dtype=F64))
        self.seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def forward(self, x, t, y, r=None):
        self.seen.append((t.clone(), r.clone(), y.clone()))
        view = (-1, 1, 1, 1)
        return (self.w * torch.cos(t).view(view) * x + r.view(view) * torch.sin(x)
                + 0.1 * y.to(x.dtype).view(view))


def test_sample_meanflow_one_step_and_k_steps_by_hand():
    model = ToyMeanFlowModel()
    shape, idx, y = (3, 2, 4, 4), [5, 9, 2], torch.tensor([0, 2, 1])
    eps = sample_noise(11, idx, shape[1:], dtype=F64)
    ones, zeros = torch.ones(3, dtype=F64), torch.zeros(3, dtype=F64)
    out = sample_meanflow(model, shape, y=y, seed=11, indices=idx)
    assert out.dtype == torch.float32
    assert torch.equal(out, (eps - model(eps, ones, y, r=zeros)).float())
    null = sample_meanflow(model, shape, seed=11, indices=idx)
    assert torch.equal(model.seen[-1][2], torch.full((3,), 3))   # y=None: the null label
    assert not torch.equal(null, out)
    for k in (2, 5):
        model.seen.clear()
        out = sample_meanflow(model, shape, num_steps=k, y=y, seed=11, indices=idx)
        ts = torch.linspace(1, 0, k + 1, dtype=F64).tolist()
        x = eps
        for i in range(k):
            u = model(x, torch.full((3,), ts[i], dtype=F64), y,
                      r=torch.full((3,), ts[i + 1], dtype=F64))
            x = x - (ts[i] - ts[i + 1]) * u
        assert torch.equal(out, x.float())
        assert [float(t[0]) for t, _, _ in model.seen[:k]] == ts[:-1]
        assert [float(r[0]) for _, r, _ in model.seen[:k]] == ts[1:]


def test_sample_meanflow_starts_from_sample_ode_noise():
    class Zero(nn.Module):
        num_classes = 3

        def __init__(self):
            super().__init__()
            self.anchor = nn.Parameter(torch.zeros(()))

        def forward(self, x, t, y, r=None):
            return torch.zeros_like(x)

    idx = [3, 100, 7]
    a = sample_meanflow(Zero(), (3, 2, 4, 4), seed=5, indices=idx)
    b = sample_ode(Zero(), (3, 2, 4, 4), num_steps=1, seed=5, indices=idx)
    assert torch.equal(a, b) and torch.equal(a, sample_noise(5, idx, (2, 4, 4)))


@pytest.mark.parametrize("case", CASES)
def test_one_step_with_exact_u_samples_the_data_distribution(case):
    model = GaussianMeanFlow(*CASES[case])
    n = 20_000
    noise = torch.randn((n, *SHAPE), generator=torch.Generator().manual_seed(13), dtype=F64)
    x = sample_meanflow(model, (n, *SHAPE), noise=noise).double()
    m = torch.as_tensor(CASES[case][0], dtype=F64).expand(SHAPE)
    s = torch.as_tensor(CASES[case][1], dtype=F64).expand(SHAPE)
    assert ((x.mean(0) - m).abs() < 4 * s / math.sqrt(n)).all()
    assert ((x.var(0) / s ** 2 - 1).abs() < 4 * math.sqrt(2 / n)).all()
    # the exact u composes: 4 steps land on the same points as 1 (the flow map, not an Euler step)
    x4 = sample_meanflow(model, (n, *SHAPE), noise=noise, num_steps=4).double()
    torch.testing.assert_close(x4, x, rtol=0, atol=1e-5)

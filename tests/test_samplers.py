"""Samplers (samplers.py) against closed-form answers on Gaussian data.

The reference "model" is the exact marginal velocity of class-conditional Gaussian data, so the
true flow map, the true score and the exact law of the discretised SDE are known in closed form
and computed here independently of the sampler code.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn

import samplers
from samplers import (StepNoise, decode_latents, images_to_uint8, latents_to_uint8, sample,
                      sample_noise, sample_ode, sample_sde, score_from_velocity, velocity_with_cfg)

SIGMA = 0.5


# ----------------------------------------------------------------------------------------------
# The exact-velocity model.
#
# Data x ~ N(mu_y, sigma^2 I) for label y (the null label has its own mean), path
# x_t = a(t) x + s(t) eps (linear: a = 1 - t, s = t). Then x_t ~ N(m(t), S(t)^2 I) with
#   m(t) = a(t) mu,   S(t)^2 = a(t)^2 sigma^2 + s(t)^2
#   (linear: m = (1-t) mu, S^2 = (1-t)^2 sigma^2 + t^2).
# The marginal velocity is the conditional mean of the target: v(x_t, t) = E[a' x + s' eps | x_t].
# (x, eps, x_t) are jointly Gaussian, so
#   E[x | x_t]   = mu + (a sigma^2 / S^2) (x_t - m),   E[eps | x_t] = (s / S^2) (x_t - m),
#   v = a' mu + ((a a' sigma^2 + s s') / S^2) (x_t - m) = m'(t) + (S'(t) / S(t)) (x_t - m(t)),
# since S S' = a a' sigma^2 + s s'. This is also the velocity of the map x_t = m(t) + S(t) z
# (z fixed), so the exact ODE flow from t=1 to t=0 is x_0 = m(0) + (S(0) / S(1)) (x_1 - m(1)),
# which for the linear path is x_0 = mu + sigma x_1. The true score is -(x_t - m) / S^2.

def coeffs(t: torch.Tensor | float, path: str):
    t = torch.as_tensor(t, dtype=torch.float64)
    if path == "linear":
        return 1 - t, t, -torch.ones_like(t), torch.ones_like(t)
    h = math.pi / 2
    return torch.cos(h * t), torch.sin(h * t), -h * torch.sin(h * t), h * torch.cos(h * t)


def marginal(mu: torch.Tensor, t, sigma: float, path: str = "linear"):
    """m(t), S(t), m'(t), S'(t) of x_t for data N(mu, sigma^2 I)."""
    a, s, da, ds = coeffs(t, path)
    S = torch.sqrt(a ** 2 * sigma ** 2 + s ** 2)
    return a * mu, S, da * mu, (a * da * sigma ** 2 + s * ds) / S


class GaussianFlow(nn.Module):
    """model(x, t, y) -> exact marginal velocity; counts calls and optionally records inputs."""

    def __init__(self, mus: torch.Tensor, sigma: float = SIGMA, path: str = "linear",
                 dtype: torch.dtype = torch.float64, record: bool = False):
        super().__init__()
        self.register_buffer("mus", mus.double())       # (num_classes + 1, C, H, W)
        self.anchor = nn.Parameter(torch.zeros((), dtype=dtype))  # sets the compute dtype
        self.num_classes = mus.shape[0] - 1
        self.sigma, self.path, self.record = sigma, path, record
        self.calls: list[dict] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        info = {"n": x.shape[0], "x_dtype": x.dtype, "t_dtype": t.dtype}
        if self.record:
            info.update(x=x.clone(), t=t.clone(), y=y.clone())
        self.calls.append(info)
        tt = t.double().view(-1, *[1] * (x.ndim - 1))
        m, S, dm, dS = marginal(self.mus[y], tt, self.sigma, self.path)
        return (dm + dS / S * (x.double() - m)).to(x.dtype)


def make_mus(num_classes: int, shape=(1, 2, 2), seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 2 * torch.randn((num_classes + 1, *shape), generator=g, dtype=torch.float64)


def labels(n: int, num_classes: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, num_classes, (n,), generator=torch.Generator().manual_seed(seed))


def reference_noise(seed: int, index: int, stream: int, shape,
                    draws: int = 1) -> list[torch.Tensor]:
    """The documented scheme, recomputed: generator seeded by SeedSequence([seed, i, stream])."""
    state = np.random.SeedSequence([seed, index, stream]).generate_state(1, np.uint64)
    g = torch.Generator()
    g.manual_seed(int(state[0]))
    return [torch.randn(shape, generator=g, dtype=torch.float32) for _ in range(draws)]


# ----------------------------------------------------------------------------------------------
# The test model itself and the score.

@pytest.mark.parametrize("path", ["linear", "cosine"])
def test_gaussian_model_and_score_from_velocity(path):
    mus = make_mus(3, (2, 3, 3))
    model = GaussianFlow(mus, path=path)
    g = torch.Generator().manual_seed(5)
    y = torch.tensor([0, 1, 2, 3])
    for t in (0.04, 0.3, 0.5, 0.9, 1.0):
        x = 3 * torch.randn((4, 2, 3, 3), generator=g, dtype=torch.float64)
        v = model(x, torch.full((4,), t, dtype=torch.float64), y)
        # velocity = a' E[x|x_t] + s' E[eps|x_t] with the Gaussian conditional means
        a, s, da, ds = (float(c) for c in coeffs(t, path))
        m, S = a * mus[y], math.sqrt(a * a * SIGMA ** 2 + s * s)
        ex = mus[y] + a * SIGMA ** 2 / S ** 2 * (x - m)
        ee = s / S ** 2 * (x - m)
        torch.testing.assert_close(v, da * ex + ds * ee, rtol=1e-12, atol=1e-12)
        # score from velocity = the true score of N(m, S^2 I)
        torch.testing.assert_close(score_from_velocity(v, x, t, path), -(x - m) / S ** 2,
                                   rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="undefined"):
        score_from_velocity(v, x, 0.0, path)


def test_linear_score_formula():
    g = torch.Generator().manual_seed(0)
    v, x = torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(3, 4, generator=g,
                                                                           dtype=torch.float64)
    torch.testing.assert_close(score_from_velocity(v, x, 0.3), -(x + 0.7 * v) / 0.3)


# ----------------------------------------------------------------------------------------------
# ODE: convergence to the exact flow map, with the right order.

def test_ode_converges_with_euler_order_1_and_heun_order_2():
    mus, b = make_mus(3, (1, 4, 4)), 1024
    model = GaussianFlow(mus)
    y = labels(b, 3)
    x1 = sample_noise(0, range(b), (1, 4, 4), dtype=torch.float64)
    exact = mus[y] + SIGMA * x1                         # m(0) + S(0)/S(1) (x1 - m(1))
    errors = {}
    for heun in (False, True):
        errors[heun] = []
        for n in (8, 16, 32, 64):
            out = sample_ode(model, (b, 1, 4, 4), num_steps=n, heun=heun, y=y, seed=0)
            assert out.dtype == torch.float32 and out.shape == (b, 1, 4, 4)
            errors[heun].append((out.double() - exact).abs().max().item())
    euler, heun = errors[False], errors[True]
    euler_ratio = [euler[i] / euler[i + 1] for i in range(3)]
    heun_ratio = [heun[i] / heun[i + 1] for i in range(3)]
    # measured: Euler 0.372 0.193 0.0988 0.0499 (ratios 1.92 1.96 1.98);
    #           Heun  0.0649 0.0147 0.00348 0.00084 (ratios 4.41 4.24 4.13)
    assert all(1.8 < r < 2.2 for r in euler_ratio), (euler, euler_ratio)
    assert all(3.6 < r < 4.8 for r in heun_ratio), (heun, heun_ratio)
    assert all(h < e for h, e in zip(heun, euler))
    # the samples' statistics approach the data's: per class mean mu_y, std sigma
    out = sample_ode(model, (b, 1, 4, 4), num_steps=64, heun=True, y=y, seed=1)
    z = out.double() - mus[y]
    se = SIGMA / math.sqrt(z.numel())
    assert abs(z.mean().item()) < 4 * se
    assert abs(z.std().item() / SIGMA - 1) < 4 / math.sqrt(2 * z.numel()) + 1e-3


def test_ode_one_euler_step_is_x1_minus_v():
    model = GaussianFlow(make_mus(2))
    y = torch.tensor([0, 1, 1])
    out = sample_ode(model, (3, 1, 2, 2), num_steps=1, y=y, seed=3)
    x1 = sample_noise(3, range(3), (1, 2, 2), dtype=torch.float64)
    v = model(x1, torch.ones(3, dtype=torch.float64), y)
    torch.testing.assert_close(out, (x1 - v).float(), rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# SDE: the exact law of the discretised chain, and convergence to the data law.

def sde_exact_std(n: int, sigma: float, last: float = 0.04, final: str = "drift") -> float:
    """Std of x_0 - mu under the sampler's Euler-Maruyama chain, propagated in closed form.

    The drift is affine: v - w/2 score = m' + (S'/S + w/(2 S^2)) (x - m), and Euler keeps the mean
    exact (drift at the mean is m' = -mu, constant), so the deviation e = x - m obeys
    e <- (1 + dt lam) e + sqrt(w |dt|) xi, Var <- (1 + dt lam)^2 Var + w |dt|, w = 2t.
    """
    ts = torch.linspace(1, last, n, dtype=torch.float64).tolist()

    def lam(t: float, score: bool = True) -> float:
        s2 = (1 - t) ** 2 * sigma ** 2 + t ** 2
        ds_over_s = (-(1 - t) * sigma ** 2 + t) / s2
        return ds_over_s + (t / s2 if score else 0.0)

    var = 1.0
    for k in range(n - 1):
        t, dt = ts[k], ts[k + 1] - ts[k]
        var = (1 + dt * lam(t)) ** 2 * var + 2 * t * abs(dt)
    var *= (1 - ts[-1] * lam(ts[-1], final == "drift")) ** 2
    return math.sqrt(var)


def test_sde_matches_exact_discrete_law_and_converges():
    sigma, b = 1.0, 500   # 32000 values per tensor: below torch's parallel grain (no OpenMP)
    mus = make_mus(3, (1, 8, 8))
    model = GaussianFlow(mus, sigma=sigma)
    y = labels(b, 3)
    rel = {}
    for n, final in ((20, "drift"), (250, "drift"), (250, "velocity")):
        out = sample_sde(model, (b, 1, 8, 8), num_steps=n, y=y, seed=0, final_step=final)
        assert out.dtype == torch.float32 and torch.isfinite(out).all()
        z = out.double() - mus[y]
        std, n_el = z.std().item(), z.numel()
        exact_std = sde_exact_std(n, sigma, final=final)
        # the mean is exact for every N: only sampling error
        assert abs(z.mean().item()) < 4 * exact_std / math.sqrt(n_el), (n, final, z.mean())
        # the sampler reproduces the chain's law (std of the std estimate: std / sqrt(2 n))
        assert abs(std / exact_std - 1) < 4 / math.sqrt(2 * n_el), (n, final, std, exact_std)
        rel[n, final] = std / sigma - 1
    # measured (sigma 1): std rel. error N=20 -3.0%, N=250 -0.5% (drift), -0.3% (velocity)
    assert abs(rel[250, "drift"]) < 0.02 and abs(rel[250, "velocity"]) < 0.02
    assert abs(rel[250, "drift"]) < abs(rel[20, "drift"]) - 0.01
    # in closed form: first order in 1/N towards the limit of the scheme
    lim = sde_exact_std(20000, sigma)
    e = [sde_exact_std(n, sigma) - lim for n in (20, 40, 80)]
    assert 1.7 < e[0] / e[1] < 2.3 and 1.7 < e[1] / e[2] < 2.3, e


def test_sde_steps_follow_the_documented_update():
    """Rebuild every transition from the recorded inputs: signs, noise scale, noise stream."""
    mus = make_mus(2)
    model = GaussianFlow(mus, record=True)
    y, idx, n, last, seed = torch.tensor([0, 1, 2]), [5, 9, 2], 6, 0.04, 11
    for final in ("drift", "velocity"):
        model.calls.clear()
        out = sample_sde(model, (3, 1, 2, 2), num_steps=n, y=y, seed=seed, indices=idx,
                         final_step=final, last_step=last)
        ts = torch.linspace(1, last, n, dtype=torch.float64)
        assert len(model.calls) == n
        for k, call in enumerate(model.calls):
            assert torch.equal(call["t"], ts[k].expand(3))
        xi = [reference_noise(seed, i, samplers.SDE_STREAM, (1, 2, 2), n - 1) for i in idx]
        x1 = torch.stack([reference_noise(seed, i, samplers.INIT_STREAM, (1, 2, 2))[0]
                          for i in idx]).double()
        torch.testing.assert_close(model.calls[0]["x"], x1, rtol=0, atol=0)

        def drift(x, t):
            m, S, dm, dS = marginal(mus[y], t, SIGMA)
            v = dm + dS / S * (x - m)
            return v, v + t * (x - m) / S ** 2      # v - (w/2) score, w = 2t, score = -(x-m)/S^2

        for k in range(n - 1):
            t, dt = ts[k].item(), (ts[k + 1] - ts[k]).item()
            x = model.calls[k]["x"]
            noise = torch.stack([xi[j][k] for j in range(3)]).double()
            expected = x + drift(x, t)[1] * dt + math.sqrt(2 * t * -dt) * noise
            torch.testing.assert_close(model.calls[k + 1]["x"], expected, rtol=1e-12, atol=1e-12)
        x = model.calls[-1]["x"]
        v, d = drift(x, last)
        expected = x - last * (d if final == "drift" else v)
        torch.testing.assert_close(out, expected.float(), rtol=1e-6, atol=1e-6)
        if final == "velocity":   # linear path: x - t v is exactly E[x_0 | x_t]
            m, S, _, _ = marginal(mus[y], last, SIGMA)
            tweedie = mus[y] + (1 - last) * SIGMA ** 2 / S ** 2 * (x - m)
            torch.testing.assert_close(out, tweedie.float(), rtol=1e-6, atol=1e-6)


def test_sde_cosine_path_runs_and_converges():
    sigma, b = 1.0, 512
    mus = make_mus(2, (1, 4, 4))
    model = GaussianFlow(mus, sigma=sigma, path="cosine")
    y = labels(b, 2)
    out = sample_sde(model, (b, 1, 4, 4), num_steps=100, y=y, path_type="cosine")
    z = out.double() - mus[y]
    assert torch.isfinite(z).all()
    assert abs(z.mean().item()) < 0.03 and abs(z.std().item() / sigma - 1) < 0.04


# ----------------------------------------------------------------------------------------------
# Classifier-free guidance.

def test_cfg_scale_one_is_bitwise_unguided_and_never_doubles():
    model = GaussianFlow(make_mus(3))
    y = labels(6, 3)
    for fn, kw in ((sample_ode, {"heun": True}), (sample_sde, {})):
        base = fn(model, (6, 1, 2, 2), num_steps=8, y=y, **kw)
        model.calls.clear()
        same = fn(model, (6, 1, 2, 2), num_steps=8, y=y, cfg_scale=1.0, guidance_low=0.2,
                  guidance_high=0.6, **kw)
        assert torch.equal(base, same)
        assert {c["n"] for c in model.calls} == {6}
        guided = fn(model, (6, 1, 2, 2), num_steps=8, y=y, cfg_scale=2.0, **kw)
        assert not torch.equal(base, guided)


def test_cfg_guides_every_channel():
    mus = make_mus(3, (4, 2, 2), seed=7)        # 4 latent channels, all different
    model = GaussianFlow(mus)
    g = torch.Generator().manual_seed(0)
    x = torch.randn((5, 4, 2, 2), generator=g, dtype=torch.float64)
    y, w, t = torch.tensor([0, 1, 2, 0, 1]), 3.5, 0.6
    tt = torch.full((5,), t, dtype=torch.float64)
    c, u = model(x, tt, y), model(x, tt, torch.full_like(y, 3))
    out = velocity_with_cfg(model, x, t, y, w)
    torch.testing.assert_close(out, u + w * (c - u), rtol=1e-12, atol=1e-12)
    assert ((out - c).abs().amax(dim=(0, 2, 3)) > 1e-3).all()   # guidance reached all 4 channels
    # through the sampler: one Euler step from t=1 is x1 - guided velocity
    out = sample_ode(model, (5, 4, 2, 2), num_steps=1, y=y, cfg_scale=w, seed=2)
    x1 = sample_noise(2, range(5), (4, 2, 2), dtype=torch.float64)
    one = torch.ones(5, dtype=torch.float64)
    c, u = model(x1, one, y), model(x1, one, torch.full_like(y, 3))
    torch.testing.assert_close(out, (x1 - (u + w * (c - u))).float(), rtol=0, atol=0)


def _doubled_times(model: GaussianFlow, b: int) -> tuple[list[float], list[float]]:
    doubled = [c["t"][0].item() for c in model.calls if c["n"] == 2 * b]
    single = [c["t"][0].item() for c in model.calls if c["n"] == b]
    assert len(doubled) + len(single) == len(model.calls)
    return doubled, single


@pytest.mark.parametrize("heun", [False, True])
def test_guidance_interval_is_inclusive_on_grid_points(heun):
    b, n = 3, 10
    model = GaussianFlow(make_mus(3), record=True)
    y = labels(b, 3)
    grid = torch.linspace(1, 0, n + 1, dtype=torch.float64).tolist()
    low, high = grid[7], grid[2]                  # 0.30000000000000004 and 0.8, on the grid
    sample_ode(model, (b, 1, 2, 2), num_steps=n, heun=heun, y=y, cfg_scale=2.0,
               guidance_low=low, guidance_high=high)
    doubled, single = _doubled_times(model, b)
    assert set(doubled) == set(grid[2:8])
    assert all(t < low or t > high for t in single)
    # the user's 0.3 means the grid's 0.30000000000000004 (linspace rounding) too
    model.calls.clear()
    sample_ode(model, (b, 1, 2, 2), num_steps=n, heun=heun, y=y, cfg_scale=2.0,
               guidance_low=0.3, guidance_high=0.8)
    assert set(_doubled_times(model, b)[0]) == set(grid[2:8])


def test_guidance_interval_sde():
    b, n = 2, 12
    model = GaussianFlow(make_mus(3), record=True)
    grid = torch.linspace(1, 0.04, n, dtype=torch.float64).tolist()
    sample_sde(model, (b, 1, 2, 2), num_steps=n, y=labels(b, 3), cfg_scale=1.8,
               guidance_low=grid[8], guidance_high=grid[3])
    doubled, single = _doubled_times(model, b)
    assert doubled == grid[3:9] and single == grid[:3] + grid[9:]
    model.calls.clear()   # REPA's recipe interval [0, 0.7]: the final step (t=0.04) is guided
    sample_sde(model, (b, 1, 2, 2), num_steps=n, y=labels(b, 3), cfg_scale=1.8,
               guidance_high=0.7)
    doubled, single = _doubled_times(model, b)
    assert doubled == [t for t in grid if t <= 0.7] and single == [t for t in grid if t > 0.7]


def test_null_label_is_num_classes_or_override():
    b = 4
    model = GaussianFlow(make_mus(10), record=True)      # labels 0..9, null 10
    y = torch.tensor([0, 3, 9, 5])
    sample_ode(model, (b, 1, 2, 2), num_steps=3, y=y, cfg_scale=4.0)
    for call in model.calls:
        assert call["n"] == 2 * b
        assert torch.equal(call["y"], torch.tensor([0, 3, 9, 5, 10, 10, 10, 10]))
    model.calls.clear()
    sample_sde(model, (b, 1, 2, 2), num_steps=3, y=y, cfg_scale=4.0, null_label=7)
    assert all(torch.equal(c["y"][b:], torch.full((b,), 7)) for c in model.calls)
    # y=None: unconditional, every call gets the null label, no doubled batch, CFG ignored
    model.calls.clear()
    sample_ode(model, (b, 1, 2, 2), num_steps=3)
    assert all(c["n"] == b and torch.equal(c["y"], torch.full((b,), 10)) for c in model.calls)
    with pytest.warns(UserWarning, match="ignored"):
        sample_ode(model, (b, 1, 2, 2), num_steps=3, cfg_scale=3.0)
    # a model without num_classes needs an explicit null label
    bare = GaussianFlow(make_mus(2))
    del bare.num_classes
    with pytest.raises(ValueError, match="null_label"):
        sample_ode(bare, (2, 1, 2, 2), num_steps=2, y=torch.tensor([0, 1]), cfg_scale=2.0)
    sample_ode(bare, (2, 1, 2, 2), num_steps=2, y=torch.tensor([0, 1]), cfg_scale=2.0,
               null_label=2)
    sample_ode(bare, (2, 1, 2, 2), num_steps=2, y=torch.tensor([0, 1]))  # unguided: not needed


# ----------------------------------------------------------------------------------------------
# Seeds: per (seed, global index), independent of batch composition.

def test_noise_scheme():
    out = sample_noise(4, [0, 7, 123456], (2, 3, 3))
    for j, i in enumerate([0, 7, 123456]):
        assert torch.equal(out[j], reference_noise(4, i, samplers.INIT_STREAM, (2, 3, 3))[0])
    assert torch.equal(sample_noise(4, [7], (2, 3, 3)), out[1:2])
    assert torch.equal(sample_noise(4, [7], (2, 3, 3), dtype=torch.float64), out[1:2].double())
    assert not torch.equal(sample_noise(5, [7], (2, 3, 3)), out[1:2])
    steps = StepNoise(4, [7, 0], (2, 3, 3), "cpu")
    ref = reference_noise(4, 7, samplers.SDE_STREAM, (2, 3, 3), 3)
    for k in range(3):
        assert torch.equal(steps()[0], ref[k])
    with pytest.raises(ValueError):
        sample_noise(-1, [0], (1,))


@pytest.mark.parametrize("mode", ["ode", "sde"])
def test_samples_independent_of_batch_size(mode):
    model = GaussianFlow(make_mus(3))
    y = labels(16, 3)
    kw = {"num_steps": 6, "heun": True, "cfg_scale": 1.5, "guidance_high": 0.7}
    fn = sample_ode if mode == "ode" else sample_sde
    full = fn(model, (16, 1, 2, 2), y=y, seed=3, **kw)
    first8 = fn(model, (8, 1, 2, 2), y=y[:8], seed=3, **kw)
    assert torch.equal(first8, full[:8])
    ones = torch.cat([fn(model, (1, 1, 2, 2), y=y[i:i + 1], seed=3, indices=[i], **kw)
                      for i in range(8)])
    assert torch.equal(ones, first8)
    offset = fn(model, (8, 1, 2, 2), y=y[8:], seed=3, indices=torch.arange(8, 16), **kw)
    assert torch.equal(offset, full[8:])
    other = fn(model, (8, 1, 2, 2), y=y[:8], seed=4, **kw)
    assert not torch.isclose(other, first8).any()


def test_explicit_noise_replaces_seeded_noise():
    model = GaussianFlow(make_mus(2))
    y = labels(4, 2)
    x1 = sample_noise(9, range(4), (1, 2, 2))
    assert torch.equal(sample_ode(model, (4, 1, 2, 2), y=y, noise=x1, num_steps=4),
                       sample_ode(model, (4, 1, 2, 2), y=y, seed=9, num_steps=4))


# ----------------------------------------------------------------------------------------------
# Precision, evaluation counts.

def test_bf16_model_gets_compute_dtype_but_exact_grid():
    model = GaussianFlow(make_mus(3), dtype=torch.bfloat16, record=True)
    y = labels(4, 3)
    out = sample_ode(model, (4, 1, 2, 2), num_steps=7, y=y)
    assert out.dtype == torch.float32
    grid = torch.linspace(1, 0, 8, dtype=torch.float64)
    assert all(c["x_dtype"] == torch.bfloat16 and c["t_dtype"] == torch.bfloat16
               for c in model.calls)
    for k, c in enumerate(model.calls):
        assert torch.equal(c["t"], grid[k].to(torch.bfloat16).expand(4))
    # the float64 state moves by dt = exact grid differences: the same run with a float64 model
    # differs only by the bf16 rounding of the model inputs/outputs
    ref = sample_ode(GaussianFlow(make_mus(3)), (4, 1, 2, 2), num_steps=7, y=y)
    assert (out - ref).abs().max() < 0.1
    model.calls.clear()
    out = sample_sde(model, (4, 1, 2, 2), num_steps=7, y=y, dtype=torch.float32)
    assert out.dtype == torch.float32 and all(c["t_dtype"] == torch.float32 for c in model.calls)


@pytest.mark.parametrize("n", [1, 2, 5])
def test_evaluation_counts(n, monkeypatch):
    model = GaussianFlow(make_mus(3))
    y = labels(2, 3)
    sample_ode(model, (2, 1, 2, 2), num_steps=n, y=y, cfg_scale=2.0)
    assert len(model.calls) == n                             # doubled batch, still one call
    model.calls.clear()
    sample_ode(model, (2, 1, 2, 2), num_steps=n, heun=True, y=y, cfg_scale=2.0)
    assert len(model.calls) == 2 * n - 1
    draws = []
    real_call = StepNoise.__call__
    monkeypatch.setattr(StepNoise, "__call__", lambda self: draws.append(1) or real_call(self))
    model.calls.clear()
    sample_sde(model, (2, 1, 2, 2), num_steps=n, y=y, cfg_scale=2.0)
    assert len(model.calls) == n and len(draws) == n - 1


# ----------------------------------------------------------------------------------------------
# A real SiT, decoding, API details.

def tiny_sit(num_classes: int = 10):
    from models.sit import SiT
    torch.manual_seed(0)
    model = SiT(input_size=4, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2,
                num_classes=num_classes)
    for p in model.parameters():          # leave the zero init so the output is not trivial
        if p.requires_grad:
            p.data.add_(0.05 * torch.randn_like(p))
    return model.eval()


def test_tiny_sit_end_to_end():
    model = tiny_sit()
    y = torch.tensor([1, 2, 3, 10])          # one unconditional row
    x1 = sample_noise(0, range(4), (4, 4, 4))
    for out in (sample_ode(model, (4, 4, 4, 4), num_steps=4, heun=True, y=y, cfg_scale=2.0,
                           guidance_high=0.7),
                sample_sde(model, (4, 4, 4, 4), num_steps=5, y=y, cfg_scale=1.8,
                           guidance_high=0.7),
                sample(model, (4, 4, 4, 4), mode="sde", num_steps=3, y=y)):
        assert out.shape == (4, 4, 4, 4) and out.dtype == torch.float32
        assert torch.isfinite(out).all() and not torch.equal(out, x1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sample_ode(model, (2, 4, 4, 4), num_steps=3, y=y[:2], cfg_scale=2.0)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    out = sample_ode(tiny_sit().to(torch.bfloat16), (2, 4, 4, 4), num_steps=3, y=y[:2],
                     progress=True)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


class FakeVAE(nn.Module):
    """decode(z).sample: a fixed map of the latent to 3 x (2H) x (2W) pixels."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(0.7))

    def decode(self, z):
        img = torch.tanh(self.w * z[:, :3]).repeat_interleave(2, -1).repeat_interleave(2, -2)
        return SimpleNamespace(sample=1.5 * img)


def test_decode_with_vae():
    model, vae = GaussianFlow(make_mus(3, (4, 2, 2))), FakeVAE()
    y = labels(3, 3)
    scale, bias = torch.tensor([0.2, 0.3, 0.4, 0.5]), torch.tensor([0.1, -0.1, 0.0, 0.2])
    lat = sample_ode(model, (3, 4, 2, 2), num_steps=4, y=y)
    assert isinstance(lat, torch.Tensor) and lat.dtype == torch.float32  # samplers return latents
    raw = (lat - bias.view(1, 4, 1, 1)) / scale.view(1, 4, 1, 1)
    want = vae.decode(raw).sample.clamp(-1, 1)
    torch.testing.assert_close(decode_latents(vae, lat, scale, bias), want)
    # the one place latents become images: decoded, ADM's uint8 conversion, NHWC
    px = latents_to_uint8(lat, vae, scale, bias)
    assert px.shape == (3, 4, 4, 3) and px.dtype == torch.uint8
    assert torch.equal(px, (127.5 * want + 128).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1))
    # without a VAE the latents are pixels in [-1, 1]; one channel is repeated to RGB
    one = torch.tensor([[-2.0, -1.0], [0.0, 0.6]]).view(1, 1, 2, 2)
    assert latents_to_uint8(one).tolist() == [[[[0] * 3, [0] * 3], [[128] * 3, [204] * 3]]]
    torch.testing.assert_close(decode_latents(vae, lat, 0.5, 0.25),
                               vae.decode((lat - 0.25) / 0.5).sample.clamp(-1, 1))
    px = images_to_uint8(torch.tensor([-1.0, -0.999, 0.0, 0.5, 1.0, 2.0]).view(1, 3, 1, 2))
    assert px.dtype == torch.uint8 and px.shape == (1, 1, 2, 3)
    assert px.permute(0, 3, 1, 2).flatten().tolist() == [0, 0, 128, 191, 255, 255]


@pytest.mark.parametrize("kwargs, match", [
    ({"num_steps": 0}, "num_steps"),
    ({"path_type": "vp"}, "path_type"),
    ({"y": torch.tensor([0, 1, 2])}, "labels"),
    ({"indices": [0]}, "indices"),
    ({"noise": torch.zeros(2, 1, 3, 3)}, "noise"),
    ({"seed": -1}, "seed"),
])
def test_bad_arguments(kwargs, match):
    model = GaussianFlow(make_mus(2))
    for fn in (sample_ode, sample_sde):
        with pytest.raises(ValueError, match=match):
            fn(model, (2, 1, 2, 2), **kwargs)


@pytest.mark.parametrize("kwargs", [{"last_step": 0.0}, {"last_step": 1.0},
                                    {"final_step": "noise"}])
def test_bad_sde_arguments(kwargs):
    with pytest.raises(ValueError):
        sample_sde(GaussianFlow(make_mus(2)), (2, 1, 2, 2), **kwargs)
    with pytest.raises(ValueError, match="mode"):
        sample(GaussianFlow(make_mus(2)), (2, 1, 2, 2), mode="dpm")

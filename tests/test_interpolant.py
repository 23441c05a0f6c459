"""Interpolant paths, training-time samplers and the SI loss against hand computations."""
from __future__ import annotations

import math

import pytest
import torch

from losses.interpolant import (PATH_TYPES, TIME_SAMPLERS, expand_t_like, interpolate,
                                path_coefficients, sample_time, si_loss)

TS = [0.0, 0.25, 0.5, 1.0]
R2 = math.sqrt(2) / 2
C8, S8 = math.cos(math.pi / 8), math.sin(math.pi / 8)
HP = math.pi / 2
# (a, s, da, ds) written out by hand at t = 0, 0.25, 0.5, 1.
EXPECTED = {
    "linear": [(1, 0, -1, 1), (0.75, 0.25, -1, 1), (0.5, 0.5, -1, 1), (0, 1, -1, 1)],
    "cosine": [(1, 0, 0, HP), (C8, S8, -HP * S8, HP * C8), (R2, R2, -HP * R2, HP * R2),
               (0, 1, -HP, 0)],
}


@pytest.mark.parametrize("path", PATH_TYPES)
def test_path_values_by_hand(path):
    t = torch.tensor(TS, dtype=torch.float64)
    got = torch.stack(path_coefficients(t, path), dim=1)
    want = torch.tensor(EXPECTED[path], dtype=torch.float64)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


@pytest.mark.parametrize("path", PATH_TYPES)
def test_derivatives_match_finite_differences(path):
    t = torch.linspace(0.01, 0.99, 37, dtype=torch.float64)
    h = 1e-6
    a, s, da, ds = path_coefficients(t, path)
    ap, sp, _, _ = path_coefficients(t + h, path)
    am, sm, _, _ = path_coefficients(t - h, path)
    torch.testing.assert_close(da, (ap - am) / (2 * h), atol=1e-8, rtol=0)
    torch.testing.assert_close(ds, (sp - sm) / (2 * h), atol=1e-8, rtol=0)


def test_cosine_is_variance_preserving():
    t = torch.rand(100, dtype=torch.float64)
    a, s, _, _ = path_coefficients(t, "cosine")
    torch.testing.assert_close(a ** 2 + s ** 2, torch.ones_like(t))


@pytest.mark.parametrize("path", PATH_TYPES)
def test_interpolate_endpoints_and_formula(path):
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(4, 3, 2, 2, generator=g), torch.randn(4, 3, 2, 2, generator=g)
    xt, _ = interpolate(x, eps, torch.zeros(4), path)
    torch.testing.assert_close(xt, x)
    xt, _ = interpolate(x, eps, torch.ones(4), path)
    torch.testing.assert_close(xt, eps, atol=1e-6, rtol=0)  # fp32 cos(pi/2) = -4e-8
    # per-sample t broadcasts over C, H, W
    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    xt, v = interpolate(x, eps, t, path)
    for i, (a, s, da, ds) in enumerate(EXPECTED[path]):
        torch.testing.assert_close(xt[i], a * x[i] + s * eps[i])
        torch.testing.assert_close(v[i], da * x[i] + ds * eps[i])
    if path == "linear":
        torch.testing.assert_close(v, eps - x)


def test_interpolate_dtype_follows_input_and_scalar_t():
    x = torch.randn(2, 3, dtype=torch.bfloat16)
    xt, v = interpolate(x, torch.randn_like(x), torch.tensor([0.3, 0.6]))
    assert xt.dtype == v.dtype == torch.bfloat16
    x = torch.randn(2, 3, dtype=torch.float64)
    xt, _ = interpolate(x, torch.zeros_like(x), 0.5)
    torch.testing.assert_close(xt, 0.5 * x)
    assert expand_t_like(torch.rand(5), torch.zeros(5, 3, 4, 4)).shape == (5, 1, 1, 1)
    with pytest.raises(ValueError, match="entries"):
        expand_t_like(torch.rand(3), torch.zeros(5, 2))


def test_invalid_path_type():
    with pytest.raises(ValueError, match="linear, cosine"):
        path_coefficients(torch.zeros(1), "vp")


# ---------------------------------------------------------------------------------------------
# time samplers

def test_uniform_in_unit_interval_and_reproducible():
    t = sample_time(10000, "uniform", generator=torch.Generator().manual_seed(1))
    assert t.shape == (10000,) and t.dtype == torch.float32
    assert t.min() >= 0 and t.max() < 1
    torch.testing.assert_close(t, torch.rand(10000, generator=torch.Generator().manual_seed(1)))


@pytest.mark.parametrize("p_mean,p_std", [(0.0, 1.0), (-0.4, 1.6)])
def test_lognormal_linear_is_sigma_over_one_plus_sigma(p_mean, p_std):
    t = sample_time(1000, "lognormal", path_type="linear", P_mean=p_mean, P_std=p_std,
                    generator=torch.Generator().manual_seed(7))
    normals = torch.randn(1000, generator=torch.Generator().manual_seed(7))
    sigma = torch.exp(normals * p_std + p_mean)
    torch.testing.assert_close(t, sigma / (1 + sigma))


def test_lognormal_cosine_is_atan():
    t = sample_time(1000, "lognormal", path_type="cosine", P_mean=0.3, P_std=0.8,
                    generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    sigma = torch.exp(torch.randn(1000, generator=torch.Generator().manual_seed(3),
                                  dtype=torch.float64) * 0.8 + 0.3)
    torch.testing.assert_close(t, 2 / math.pi * torch.atan(sigma))
    assert t.dtype == torch.float64


def test_lognormal_linear_median_is_half():
    t = sample_time(200_000, "lognormal", generator=torch.Generator().manual_seed(0))
    # median of sigma = exp(N(0, 1)) is 1, so the median of t is 1 / 2; the sample median of
    # 200k draws has std ~ 0.25 / sqrt(200k) / density ~ 1e-3.
    assert abs(t.median().item() - 0.5) < 5e-3
    assert 0 < t.min() and t.max() < 1


def test_logit_normal_is_sigmoid_of_normals():
    for path in PATH_TYPES:
        t = sample_time(500, "logit_normal", path_type=path, P_mean=0.5, P_std=2.0,
                        generator=torch.Generator().manual_seed(11))
        u = torch.randn(500, generator=torch.Generator().manual_seed(11)) * 2.0 + 0.5
        torch.testing.assert_close(t, 1 / (1 + torch.exp(-u)))


def test_shift_by_hand():
    # shift 3 at t = 0.5: 3 * 0.5 / (1 + 2 * 0.5) = 0.75
    g = torch.Generator().manual_seed(5)
    t0 = sample_time(1000, "uniform", generator=torch.Generator().manual_seed(5))
    t3 = sample_time(1000, "uniform", shift=3.0, generator=g)
    torch.testing.assert_close(t3, 3 * t0 / (1 + 2 * t0))
    from losses.interpolant import _apply_shift
    assert _apply_shift(torch.tensor(0.5), 3.0).item() == pytest.approx(0.75)
    assert _apply_shift(torch.tensor(0.5), 1.0).item() == 0.5
    with pytest.raises(ValueError, match="shift"):
        sample_time(4, "uniform", shift=0.0)


def test_invalid_sampler_lists_choices():
    with pytest.raises(ValueError) as err:
        sample_time(4, "beta")
    for name in TIME_SAMPLERS:
        assert name in str(err.value)


def test_sample_time_dtype():
    g = torch.Generator().manual_seed(0)
    t = sample_time(8, "lognormal", dtype=torch.bfloat16, generator=g)
    assert t.dtype == torch.bfloat16 and t.shape == (8,)


# ---------------------------------------------------------------------------------------------
# SI loss

def test_si_loss_by_hand():
    # B = 2 samples of 2 values, linear path, t = (0.5, 1):
    #   v = eps - x = [[1, -1], [0, 2]]; pred = [[1, 1], [1, 1]]
    #   sample 0: ((1-1)^2 + (1+1)^2) / 2 = 2;  sample 1: ((1-0)^2 + (1-2)^2) / 2 = 1
    x = torch.tensor([[1.0, 2.0], [1.0, -1.0]])
    eps = torch.tensor([[2.0, 1.0], [1.0, 1.0]])
    pred = torch.ones(2, 2)
    out = si_loss(pred, x, eps, torch.tensor([0.5, 1.0]))
    torch.testing.assert_close(out["per_sample"], torch.tensor([2.0, 1.0]))
    torch.testing.assert_close(out["loss"], torch.tensor(1.5))
    # weighted per sample: (3 * 2 + 0.5 * 1) / 2 = 3.25
    out = si_loss(pred, x, eps, torch.tensor([0.5, 1.0]), weight=torch.tensor([3.0, 0.5]))
    torch.testing.assert_close(out["per_sample"], torch.tensor([6.0, 0.5]))
    torch.testing.assert_close(out["loss"], torch.tensor(3.25))


@pytest.mark.parametrize("path", PATH_TYPES)
def test_si_loss_matches_formula_on_images(path):
    g = torch.Generator().manual_seed(2)
    x, eps, pred = (torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64) for _ in range(3))
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    out = si_loss(pred, x, eps, t, path)
    assert out["per_sample"].shape == (3,)
    for i in range(3):
        a, s, da, ds = path_coefficients(t[i], path)
        want = ((pred[i] - (da * x[i] + ds * eps[i])) ** 2).mean()
        torch.testing.assert_close(out["per_sample"][i], want)
    torch.testing.assert_close(out["loss"], out["per_sample"].mean())


def test_si_loss_bf16_prediction_reduces_in_fp32_and_checks_shapes():
    x, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    pred = torch.randn(2, 3, 4, 4).bfloat16().requires_grad_()
    out = si_loss(pred, x, eps, torch.rand(2))
    assert out["loss"].dtype == torch.float32
    out["loss"].backward()
    assert pred.grad is not None and pred.grad.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="one per sample"):
        si_loss(pred.detach(), x, eps, torch.rand(2), weight=torch.ones(3))
    with pytest.raises(ValueError, match="differ"):
        si_loss(torch.zeros(2, 3), x, eps, torch.rand(2))

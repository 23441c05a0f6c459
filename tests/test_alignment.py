"""REPA / VA-REPA / iREPA alignment maths against independent loop and formula implementations."""
from __future__ import annotations

import math

import pytest
import torch

from losses import align_tokens, alignment_loss, spatial_normalize, va_weights

TS = [0.0, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]


def loop_alignment(projected, targets, weights=None, gamma=None):
    """Per-sample, per-token Python reference (float64, no vectorisation)."""
    n = projected[0].shape[0]
    per_sample = []
    for i in range(n):
        enc_terms = []
        for p, z in zip(projected, targets):
            z = z.double()
            if gamma is not None:
                zi = z[i]
                t_count = zi.shape[0]
                mean = [sum(zi[tok, c].item() for tok in range(t_count)) / t_count
                        for c in range(zi.shape[1])]
                std = [math.sqrt(sum((zi[tok, c].item() - mean[c]) ** 2 for tok in range(t_count))
                                 / (t_count - 1)) for c in range(zi.shape[1])]
                zi = torch.tensor([[(zi[tok, c].item() - gamma * mean[c]) / (std[c] + 1e-6)
                                    for c in range(zi.shape[1])] for tok in range(t_count)],
                                  dtype=torch.float64)
            else:
                zi = z[i]
            total = 0.0
            for tok in range(p.shape[1]):
                a, b = p[i, tok].double(), zi[tok]
                total += float(a @ b) / (float(a.norm()) * float(b.norm()))
            enc_terms.append(-total / p.shape[1])
        per_sample.append(sum(enc_terms) / len(enc_terms))
    w = [1.0] * n if weights is None else [float(x) for x in weights]
    loss = sum(wi * li for wi, li in zip(w, per_sample)) / sum(w)
    return per_sample, loss


def random_pair(seed=0, n=4, t=9):
    g = torch.Generator().manual_seed(seed)
    proj = [torch.randn(n, t, 6, generator=g), torch.randn(n, t, 10, generator=g)]
    targ = [torch.randn(n, t, 6, generator=g), torch.randn(n, t, 10, generator=g)]
    return proj, targ


def test_loss_equals_loop_two_encoders_different_dims():
    proj, targ = random_pair()
    out = alignment_loss(proj, targ)
    per_sample, loss = loop_alignment(proj, targ)
    assert out["per_sample"].shape == (4,)
    torch.testing.assert_close(out["per_sample"].double(),
                               torch.tensor(per_sample, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    assert abs(out["loss"].item() - loss) < 1e-6
    # weighted by VA-REPA sigmoid weights
    t = torch.tensor([0.1, 0.5, 0.7, 0.95])
    out = alignment_loss(proj, targ, t=t, schedule="sigmoid")
    w = [1 / (1 + math.exp(-20 * (0.7 - ti))) for ti in t.tolist()]
    _, loss = loop_alignment(proj, targ, weights=w)
    assert abs(out["loss"].item() - loss) < 1e-6
    torch.testing.assert_close(out["weights"].double(), torch.tensor(w, dtype=torch.float64))


def test_loss_with_spatial_norm_equals_loop():
    proj, targ = random_pair(seed=1, n=3, t=4)
    out = alignment_loss(proj, targ, spatial_norm_gamma=0.6)
    per_sample, loss = loop_alignment(proj, targ, gamma=0.6)
    torch.testing.assert_close(out["per_sample"].double(),
                               torch.tensor(per_sample, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    assert abs(out["loss"].item() - loss) < 1e-6


def test_minus_one_for_positive_multiple_plus_one_for_negative():
    _, targ = random_pair(seed=2)
    scales = torch.rand(4, 9, 1) * 5 + 0.1                 # a positive multiple per token
    out = alignment_loss([z * scales for z in targ], targ)
    torch.testing.assert_close(out["per_sample"], torch.full((4,), -1.0))
    assert out["loss"].item() == pytest.approx(-1.0, abs=1e-6)
    out = alignment_loss([-3.0 * z for z in targ], targ)
    assert out["loss"].item() == pytest.approx(1.0, abs=1e-6)


def sched_reference(name, t, tau=0.7, k=20.0):
    """The VA-REPA formulas, written independently of losses.alignment (linear path)."""
    if name == "none":
        return 1.0
    if name == "hard":
        return 1.0 if t < tau else 0.0
    if name == "hard_high":
        return 1.0 if t >= tau else 0.0
    if name == "sigmoid":
        return 1.0 / (1.0 + math.exp(-k * (tau - t)))
    if name == "cosine":
        return 0.5 * (1 + math.cos(math.pi * t / tau)) if t < tau else 0.0
    if name == "snr":
        snr = lambda u: math.inf if u == 0 else ((1 - u) / u) ** 2   # noqa: E731
        if t == 0:
            return 1.0
        return snr(t) / (snr(t) + snr(tau))
    raise AssertionError(name)


@pytest.mark.parametrize("name", ["none", "hard", "hard_high", "sigmoid", "cosine", "snr"])
def test_va_schedules_match_formulas(name):
    t = torch.tensor(TS)
    w = va_weights(t, name, tau=0.7, k=20.0)
    ref = torch.tensor([sched_reference(name, x) for x in TS], dtype=w.dtype)
    assert torch.isfinite(w).all()
    torch.testing.assert_close(w, ref, rtol=1e-6, atol=1e-7)


def test_va_schedule_landmarks():
    t = torch.tensor(TS)
    assert va_weights(torch.tensor(0.7), "sigmoid").item() == 0.5
    hard, high = va_weights(t, "hard"), va_weights(t, "hard_high")
    assert hard[TS.index(0.7)] == 0 and high[TS.index(0.7)] == 1       # boundary belongs to high
    assert hard[TS.index(0.6)] == 1 and high[TS.index(0.6)] == 0
    torch.testing.assert_close(hard + high, torch.ones(len(TS)))
    snr = va_weights(t, "snr")
    assert snr[0] == 1 and snr[-1] == 0 and snr[TS.index(0.7)].item() == pytest.approx(0.5)
    assert va_weights(torch.tensor(0.0), "cosine").item() == 1.0


def test_snr_cosine_path_formula():
    t = torch.tensor(TS, dtype=torch.float64)
    w = va_weights(t, "snr", tau=0.7, path_type="cosine")
    def snr(u):
        return math.inf if u == 0 else (math.cos(math.pi * u / 2) / math.sin(math.pi * u / 2)) ** 2
    ref = [1.0 if u == 0 else snr(u) / (snr(u) + snr(0.7)) for u in TS]
    torch.testing.assert_close(w, torch.tensor(ref, dtype=torch.float64), atol=1e-12, rtol=1e-9)


def test_weighted_mean_invariant_to_scaling_weights():
    proj, targ = random_pair(seed=3)
    w = torch.tensor([0.2, 0.0, 1.0, 0.7])
    a = alignment_loss(proj, targ, weights=w)["loss"]
    b = alignment_loss(proj, targ, weights=w * 37.5)["loss"]
    c = alignment_loss(proj, targ, weights=w * 1e-3)["loss"]
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)


@pytest.mark.parametrize("how", ["weights", "hard_schedule"])
def test_zero_weights_give_zero_with_finite_gradients(how):
    proj, targ = random_pair(seed=4)
    proj = [p.requires_grad_() for p in proj]
    if how == "weights":
        out = alignment_loss(proj, targ, weights=torch.zeros(4))
    else:   # every t above tau: the hard schedule zeroes the whole batch
        out = alignment_loss(proj, targ, t=torch.full((4,), 0.9), schedule="hard")
    assert out["loss"].item() == 0.0 and out["loss"].requires_grad
    out["loss"].backward()
    for p in proj:
        assert p.grad is not None and torch.isfinite(p.grad).all() and (p.grad == 0).all()


def test_spatial_normalize_by_hand():
    f = torch.tensor([[[1.0, 10.0], [2.0, 10.0], [6.0, 13.0]]])        # (1, 3 tokens, 2 channels)
    # channel 0: mean 3, unbiased std sqrt(((1-3)^2 + (2-3)^2 + (6-3)^2) / 2) = sqrt(7)
    # channel 1: mean 11, unbiased std sqrt((1 + 1 + 4) / 2) = sqrt(3)
    g = 0.6
    expect = torch.tensor([[[(1 - g * 3) / (7 ** 0.5 + 1e-6), (10 - g * 11) / (3 ** 0.5 + 1e-6)],
                            [(2 - g * 3) / (7 ** 0.5 + 1e-6), (10 - g * 11) / (3 ** 0.5 + 1e-6)],
                            [(6 - g * 3) / (7 ** 0.5 + 1e-6), (13 - g * 11) / (3 ** 0.5 + 1e-6)]]])
    torch.testing.assert_close(spatial_normalize(f, g), expect)
    # per sample: a second sample does not change the first one's result
    two = torch.cat([f, torch.randn(1, 3, 2) * 100])
    torch.testing.assert_close(spatial_normalize(two, g)[:1], expect)


def test_gradients_flow_into_projection_not_targets():
    proj, targ = random_pair(seed=5)
    proj = [p.requires_grad_() for p in proj]
    targ = [z.requires_grad_() for z in targ]
    out = alignment_loss(proj, targ, spatial_norm_gamma=0.6)
    out["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in proj)
    assert all(z.grad is None for z in targ)


def test_bf16_inputs_and_dtype_device_follow():
    proj, targ = random_pair(seed=6)
    out32 = alignment_loss(proj, targ)
    out16 = alignment_loss([p.bfloat16() for p in proj], [z.bfloat16() for z in targ])
    assert out16["loss"].dtype == torch.float32 and torch.isfinite(out16["loss"])
    assert abs(out16["loss"].item() - out32["loss"].item()) < 2e-2
    out64 = alignment_loss([p.double() for p in proj], [z.double() for z in targ])
    assert out64["loss"].dtype == torch.float64


def test_target_grid_resized_inside_loss():
    g = torch.Generator().manual_seed(7)
    proj = torch.randn(2, 16, 5, generator=g)          # SiT 4x4
    targ = torch.randn(2, 64, 5, generator=g)          # encoder 8x8
    out = alignment_loss([proj], [targ])
    ref = alignment_loss([proj], [align_tokens(targ, 4)])
    torch.testing.assert_close(out["loss"], ref["loss"])


def test_align_tokens_area_is_2x2_average_pooling_and_identity():
    x = torch.randn(2, 256, 7)
    y = align_tokens(x, 8)
    grid = x.reshape(2, 16, 16, 7)                                # row-major token grid
    pooled = grid.reshape(2, 8, 2, 8, 2, 7).mean(dim=(2, 4)).reshape(2, 64, 7)
    torch.testing.assert_close(y, pooled)
    assert align_tokens(x, 16) is x


def test_align_tokens_bilinear_upsampling_matches_numpy_reference():
    import numpy as np
    x = torch.randn(1, 9, 2, dtype=torch.float64)                  # 3x3 grid -> 5x5
    y = align_tokens(x, 5).numpy().reshape(5, 5, 2)
    src = x.numpy().reshape(3, 3, 2)
    ref = np.zeros((5, 5, 2))
    scale = 3 / 5
    for i in range(5):
        for j in range(5):
            fy = max((i + 0.5) * scale - 0.5, 0.0)
            fx = max((j + 0.5) * scale - 0.5, 0.0)
            y0, x0 = int(math.floor(fy)), int(math.floor(fx))
            y1, x1 = min(y0 + 1, 2), min(x0 + 1, 2)
            wy, wx = fy - y0, fx - x0
            ref[i, j] = ((1 - wy) * (1 - wx) * src[y0, x0] + (1 - wy) * wx * src[y0, x1]
                         + wy * (1 - wx) * src[y1, x0] + wy * wx * src[y1, x1])
    np.testing.assert_allclose(y, ref, atol=1e-12)


def test_bad_inputs_are_reported():
    proj, targ = random_pair()
    with pytest.raises(ValueError, match="schedule"):
        va_weights(torch.tensor([0.5]), "linear")
    with pytest.raises(ValueError, match="needs the per-sample times"):
        alignment_loss(proj, targ, schedule="hard")
    with pytest.raises(ValueError, match="projector outputs"):
        alignment_loss(proj[:1], targ)
    with pytest.raises(ValueError, match="same N and z"):
        alignment_loss(proj[::-1], targ)

"""Stochastic-interpolant paths, training-time samplers and the SI (velocity-matching) loss.

Conventions (docs/CONVENTIONS.md §1): t in [0, 1], t=0 is data, t=1 is noise (REPA's axis), and
``x_t = a(t) x + s(t) eps`` with the model predicting ``v = a'(t) x + s'(t) eps``.

- ``linear``: a = 1 - t, s = t, so v = eps - x.
- ``cosine``: a = cos(pi t / 2), s = sin(pi t / 2) (variance preserving: a^2 + s^2 = 1).

Everything here is a pure function of tensors: device and dtype follow the inputs.
"""
from __future__ import annotations

import math

import torch

PATH_TYPES = ("linear", "cosine")
TIME_SAMPLERS = ("uniform", "lognormal", "logit_normal")

__all__ = ["PATH_TYPES", "TIME_SAMPLERS", "path_coefficients", "expand_t_like", "interpolate",
           "sample_time", "si_loss", "drop_labels", "si_batch"]


def _check_path(path_type: str) -> None:
    if path_type not in PATH_TYPES:
        raise ValueError(f"unknown path type {path_type!r}; choices: {', '.join(PATH_TYPES)}")


def path_coefficients(t: torch.Tensor, path_type: str = "linear"
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(a, s, da, ds)`` at ``t`` (elementwise, same shape/dtype/device as ``t``).

    ``a``/``s`` weight data/noise in x_t; ``da``/``ds`` are their time derivatives, which weight
    data/noise in the target velocity.
    """
    _check_path(path_type)
    if path_type == "linear":
        a, s = 1 - t, t
        return a, s, torch.full_like(t, -1.0), torch.ones_like(t)
    half_pi = math.pi / 2
    c, sn = torch.cos(half_pi * t), torch.sin(half_pi * t)
    return c, sn, -half_pi * sn, half_pi * c


def expand_t_like(t: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """Shape t (scalar, (N,) or already broadcastable) as (N, 1, ..., 1) to scale a batch ``x``."""
    t = torch.as_tensor(t, device=x.device)
    if t.ndim == 0:
        return t.reshape((1,) * x.ndim)
    if t.ndim == 1:
        if t.shape[0] not in (1, x.shape[0]):
            raise ValueError(f"t has {t.shape[0]} entries but the batch has {x.shape[0]} samples")
        return t.reshape(-1, *([1] * (x.ndim - 1)))
    return t  # the caller already shaped it


def _coefficients_like(t: torch.Tensor | float, x: torch.Tensor, path_type: str):
    # The trigonometry runs in at least fp32 (a bf16 t would round cos/sin badly); the results
    # are cast to x's dtype so x_t and v come out in the dtype the caller handed in.
    t = expand_t_like(t, x)
    if not t.is_floating_point() or t.dtype in (torch.float16, torch.bfloat16):
        t = t.float()
    return [c.to(x.dtype) for c in path_coefficients(t, path_type)]


def interpolate(x: torch.Tensor, eps: torch.Tensor, t: torch.Tensor | float,
                path_type: str = "linear") -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_t, v_target)``: ``x_t = a x + s eps`` and ``v = a' x + s' eps`` (t per sample)."""
    if x.shape != eps.shape:
        raise ValueError(f"x {tuple(x.shape)} and eps {tuple(eps.shape)} differ in shape")
    a, s, da, ds = _coefficients_like(t, x, path_type)
    return a * x + s * eps, da * x + ds * eps


def _apply_shift(t: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3 resolution shift t' = shift t / (1 + (shift - 1) t): shift > 1 moves mass to noise."""
    if shift == 1.0:
        return t
    return shift * t / (1 + (shift - 1) * t)


def sample_time(n: int, sampler: str = "uniform", *, path_type: str = "linear",
                P_mean: float = 0.0, P_std: float = 1.0, shift: float = 1.0,
                generator: torch.Generator | None = None, device: torch.device | str | None = None,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Draw n training times in [0, 1].

    - ``uniform``: U[0, 1) (``torch.rand``).
    - ``lognormal`` (REPA/EDM): sigma = exp(N(P_mean, P_std)); t = sigma / (1 + sigma) for the
      linear path (the t whose noise-to-signal ratio s/a is sigma), (2/pi) atan(sigma) for cosine.
      For the linear path this is the same distribution as ``logit_normal``.
    - ``logit_normal`` (SD3): t = sigmoid(N(P_mean, P_std)) whatever the path.
    Then the optional resolution ``shift`` (1 = identity). The normals are one
    ``torch.randn(n, generator=generator)`` call (fp32, or fp64 when ``dtype`` is fp64), so a
    seeded generator reproduces them; the result is cast to ``dtype``.
    """
    if sampler not in TIME_SAMPLERS:
        raise ValueError(f"unknown time sampler {sampler!r}; choices: {', '.join(TIME_SAMPLERS)}")
    _check_path(path_type)
    if shift <= 0:
        raise ValueError(f"time shift must be > 0, got {shift}")
    if P_std < 0:
        raise ValueError(f"P_std must be >= 0, got {P_std}")
    if generator is not None and device is None:
        device = generator.device  # a CUDA generator cannot fill a CPU tensor
    # Draw in fp32 (fp64 on request): a bf16 normal would be too coarse before the mapping.
    work = torch.float64 if dtype == torch.float64 else torch.float32
    if sampler == "uniform":
        t = torch.rand(n, generator=generator, device=device, dtype=work)
    else:
        u = torch.randn(n, generator=generator, device=device, dtype=work) * P_std + P_mean
        if sampler == "lognormal" and path_type == "cosine":
            t = torch.atan(torch.exp(u)) * (2 / math.pi)   # exp -> inf gives t = 1, not NaN
        else:
            # sigma / (1 + sigma) with sigma = exp(u) is sigmoid(u), which cannot overflow.
            t = torch.sigmoid(u)
    return _apply_shift(t, shift).to(dtype)


def si_loss(pred: torch.Tensor, x: torch.Tensor, eps: torch.Tensor, t: torch.Tensor | float,
            path_type: str = "linear", weight: torch.Tensor | None = None,
            target: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Velocity-matching loss. Returns ``{'loss': scalar, 'per_sample': (B,)}``.

    per_sample = weight_b * mean over non-batch dims of (pred - v)^2, loss = its batch mean, with
    v = a'(t) x + s'(t) eps, or ``target`` when given (e.g. the StableVM target).
    ``weight`` is an optional per-sample (B,) weighting, independent of how t was sampled.
    Reductions run in at least fp32 (a bf16 prediction from autocast is upcast).
    """
    if pred.shape != x.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and data {tuple(x.shape)} differ")
    dtype = torch.promote_types(torch.promote_types(pred.dtype, x.dtype), torch.float32)
    if target is None:
        x, eps = x.to(dtype), eps.to(dtype)
        _, v = interpolate(x, eps, t, path_type)
    elif target.shape != pred.shape:
        raise ValueError(f"target {tuple(target.shape)} and prediction {tuple(pred.shape)} differ")
    else:
        v = target.to(dtype)
    per_sample = (pred.to(dtype) - v).square().flatten(1).mean(dim=1)
    if weight is not None:
        weight = torch.as_tensor(weight, device=per_sample.device)
        if weight.shape != per_sample.shape:
            raise ValueError(f"weight must have shape {tuple(per_sample.shape)} (one per sample), "
                             f"got {tuple(weight.shape)}")
        per_sample = per_sample * weight.to(dtype)
    return {"loss": per_sample.mean(), "per_sample": per_sample}


def drop_labels(y: torch.Tensor, num_classes: int, cfg_prob: float,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Replace each label by the null label ``num_classes`` with probability ``cfg_prob``.

    The uniform draw happens even when ``cfg_prob`` is 0, so the random stream (and therefore
    every later draw) does not depend on the setting.
    """
    if not 0.0 <= cfg_prob <= 1.0:
        raise ValueError(f"cfg_prob must be in [0, 1], got {cfg_prob}")
    gdev = generator.device if generator is not None else y.device
    drop = (torch.rand(y.shape[0], generator=generator, device=gdev) < cfg_prob).to(y.device)
    return torch.where(drop, torch.full_like(y, num_classes), y)


def si_batch(x: torch.Tensor, y: torch.Tensor, *, num_classes: int, cfg_prob: float = 0.0,
             path_type: str = "linear", time_sampler: str = "uniform", time_shift: float = 1.0,
             generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """A plain interpolant batch from clean latents ``x`` and labels ``y``.

    Random numbers are drawn from ``generator`` in a fixed order: label dropout, t, eps.
    Returns ``{x_t, t, y, target, x0, eps}`` with target = a'(t) x + s'(t) eps.
    """
    gdev = generator.device if generator is not None else x.device
    y = drop_labels(y, num_classes, cfg_prob, generator)
    t = sample_time(x.shape[0], time_sampler, path_type=path_type, shift=time_shift,
                    generator=generator, device=gdev).to(x.device)
    eps = torch.randn(x.shape, generator=generator, device=gdev, dtype=x.dtype).to(x.device)
    x_t, v = interpolate(x, eps, t, path_type)
    return {"x_t": x_t, "t": t, "y": y, "target": v, "x0": x, "eps": eps}

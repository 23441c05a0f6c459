"""Representation alignment: REPA, VA-REPA time weights and iREPA spatial normalisation.

docs/CONVENTIONS.md §5. All functions are pure: they take tensors and return tensors, device
follows the inputs, reductions run in at least fp32 (bf16 inputs are upcast), and nothing loops over samples.

- ``alignment_loss``: REPA's negative cosine similarity between projector outputs and encoder
  tokens, per sample (mean over tokens, then mean over encoders), and the self-normalised
  weighted batch mean ``sum_i w_i l_i / sum_i w_i`` with VA-REPA's time weights (0 when the
  weights sum to ~0).
- ``va_weights``: VA-REPA's w(t) (hard, hard_high, sigmoid, cosine, snr).
- ``spatial_normalize``: iREPA's per-sample, per-channel normalisation of the target tokens over
  the token axis, ``(f - gamma * mean_T f) / (std_T f + 1e-6)``.
- ``align_tokens``: resize a square token grid (B, g*g, D) to another grid size (area / bilinear).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from .interpolant import path_coefficients

VA_SCHEDULES = ("none", "hard", "hard_high", "sigmoid", "cosine", "snr")
ALIGN_MODES = ("auto", "area", "bilinear", "bicubic", "nearest")

__all__ = ["VA_SCHEDULES", "ALIGN_MODES", "spatial_normalize", "va_weights", "align_tokens",
           "alignment_loss"]


def _work_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """At least fp32; fp64 when an input is fp64."""
    dtype = torch.float32
    for x in tensors:
        if x.is_floating_point():
            dtype = torch.promote_types(dtype, x.dtype)
    return dtype


def spatial_normalize(f: torch.Tensor, gamma: float = 0.6, eps: float = 1e-6) -> torch.Tensor:
    """iREPA: ``(f - gamma * mean_T(f)) / (std_T(f) + eps)`` over the token axis of (B, T, D).

    Statistics are per sample and per channel; ``std`` is torch's default (unbiased, T - 1 in the
    denominator, as in iREPA's code; the biased one when T == 1). gamma = 1 is a full z-score,
    gamma = 0 only rescales. The result has f's dtype; the maths runs in at least fp32.
    """
    if f.ndim != 3:
        raise ValueError(f"spatial_normalize expects (B, T, D) tokens, got shape {tuple(f.shape)}")
    x = f.to(_work_dtype(f))
    mean = x.mean(dim=1, keepdim=True)
    std = x.std(dim=1, keepdim=True, correction=1 if x.shape[1] > 1 else 0)
    return ((x - gamma * mean) / (std + eps)).to(f.dtype)


def va_weights(t: torch.Tensor | float, schedule: str = "none", tau: float = 0.7, k: float = 20.0,
               path_type: str = "linear") -> torch.Tensor:
    """VA-REPA per-sample weights w(t) (t=0 data, t=1 noise), same shape and device as ``t``.

    - ``none``: 1
    - ``hard``: 1[t < tau];  ``hard_high``: 1[t >= tau]
    - ``sigmoid``: 1 / (1 + exp(-k (tau - t)))   (exactly 1/2 at t = tau)
    - ``cosine``: 0.5 (1 + cos(pi t / tau)) for t < tau, else 0
    - ``snr``: SNR(t) / (SNR(t) + SNR(tau)) with SNR = (a/s)^2 of the path. Evaluated as
      a(t)^2 / (a(t)^2 + SNR(tau) s(t)^2), which is 1 at t = 0 (infinite SNR) and 0 where a = 0
      (t = 1), never NaN. Needs 0 < tau < 1.
    Computed in at least fp32 (fp64 for fp64 ``t``).
    """
    if schedule not in VA_SCHEDULES:
        raise ValueError(f"unknown VA-REPA schedule {schedule!r}; "
                         f"choices: {', '.join(VA_SCHEDULES)}")
    t = torch.as_tensor(t)
    t = t.to(_work_dtype(t))
    if schedule == "none":
        return torch.ones_like(t)
    if schedule == "hard":
        return (t < tau).to(t.dtype)
    if schedule == "hard_high":
        return (t >= tau).to(t.dtype)
    if schedule == "sigmoid":
        return torch.sigmoid(k * (tau - t))
    if schedule == "cosine":
        if tau <= 0:
            raise ValueError(f"cosine schedule needs tau > 0, got {tau}")
        return torch.where(t < tau, 0.5 * (1 + torch.cos(math.pi * t / tau)), torch.zeros_like(t))
    # snr
    if not 0 < tau < 1:
        raise ValueError(f"snr schedule needs 0 < tau < 1 (SNR(tau) finite and > 0), got {tau}")
    a_tau, s_tau, _, _ = path_coefficients(torch.tensor(tau, dtype=torch.float64), path_type)
    snr_tau = float((a_tau / s_tau) ** 2)
    a, s, _, _ = path_coefficients(t, path_type)
    a2, s2 = a.square(), s.square()
    return a2 / (a2 + snr_tau * s2)


def align_tokens(target: torch.Tensor, grid: int, mode: str = "auto") -> torch.Tensor:
    """Resize a square token grid (B, g*g, D) to (B, grid*grid, D); identity when g == grid.

    ``auto``: ``area`` when shrinking (exact k x k average pooling when g is a multiple of grid,
    adaptive average pooling otherwise), ``bilinear`` (half-pixel centres, no antialias) when
    enlarging. Tokens are row-major over the grid (the ViT / SiT patch order). The result keeps
    the input's dtype (resampling runs in at least fp32).
    """
    if target.ndim != 3:
        raise ValueError(f"align_tokens expects (B, T, D) tokens, got shape {tuple(target.shape)}")
    if mode not in ALIGN_MODES:
        raise ValueError(f"unknown token resize mode {mode!r}; choices: {', '.join(ALIGN_MODES)}")
    b, t, d = target.shape
    g = math.isqrt(t)
    if g * g != t:
        raise ValueError(f"{t} target tokens do not form a square grid")
    if grid < 1:
        raise ValueError(f"grid must be >= 1, got {grid}")
    if g == grid:
        return target
    if mode == "auto":
        mode = "area" if grid < g else "bilinear"
    x = target.to(_work_dtype(target)).transpose(1, 2).reshape(b, d, g, g)
    kwargs = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    y = F.interpolate(x, size=(grid, grid), mode=mode, **kwargs)
    return y.flatten(2).transpose(1, 2).to(target.dtype)


def _as_list(x) -> list[torch.Tensor]:
    return [x] if isinstance(x, torch.Tensor) else list(x)


def alignment_loss(projected: Sequence[torch.Tensor] | torch.Tensor,
                   targets: Sequence[torch.Tensor] | torch.Tensor,
                   t: torch.Tensor | None = None, schedule: str = "none", tau: float = 0.7,
                   k: float = 20.0, spatial_norm_gamma: float | None = None,
                   path_type: str = "linear", weights: torch.Tensor | None = None
                   ) -> dict[str, torch.Tensor]:
    """REPA alignment term over one or several encoders.

    ``projected[e]``: (N, T, z_e) projector outputs (gradients flow into them);
    ``targets[e]``: (N, T_e, z_e) encoder tokens (detached here). A target whose token count
    differs from the projection's is resized on its square grid with :func:`align_tokens` first.
    With ``spatial_norm_gamma`` the targets are spatially normalised (iREPA) before the cosine.

    Returns a dict of tensors:
      - ``per_sample`` (N,): -mean over tokens of cos(proj token, target token), averaged over
        encoders (F.normalize with eps 1e-12 on both sides, as REPA);
      - ``per_encoder`` (E,): the plain batch mean of each encoder's term (for logging);
      - ``weights`` (N,): ``weights`` if given, else ``va_weights(t, schedule, tau, k)``;
      - ``loss`` (): sum_i w_i l_i / sum_i w_i, exactly 0 (still attached to the graph, finite
        gradients) when sum_i w_i <= 1e-8. With ``schedule='none'`` it is the batch mean.
    """
    projected, targets = _as_list(projected), _as_list(targets)
    if not projected or len(projected) != len(targets):
        raise ValueError(f"{len(projected)} projector outputs for {len(targets)} encoder targets")
    per_encoder = []
    for e, (p, z) in enumerate(zip(projected, targets)):
        if p.ndim != 3 or z.ndim != 3 or p.shape[0] != z.shape[0] or p.shape[2] != z.shape[2]:
            raise ValueError(f"encoder {e}: projection {tuple(p.shape)} and target "
                             f"{tuple(z.shape)} must be (N, T, z) with the same N and z")
        z = z.detach()
        if z.shape[1] != p.shape[1]:
            grid = math.isqrt(p.shape[1])
            if grid * grid != p.shape[1]:
                raise ValueError(f"encoder {e}: {p.shape[1]} projected tokens vs {z.shape[1]} "
                                 "target tokens, and the projection is not a square grid")
            z = align_tokens(z, grid)
        dtype = _work_dtype(p, z)
        z = z.to(dtype)
        if spatial_norm_gamma is not None:
            z = spatial_normalize(z, spatial_norm_gamma)
        cos = (F.normalize(p.to(dtype), dim=-1) * F.normalize(z, dim=-1)).sum(dim=-1)  # (N, T)
        per_encoder.append(-cos.mean(dim=1))
    stacked = torch.stack(torch.broadcast_tensors(*per_encoder))  # (E, N), common dtype
    per_sample = stacked.mean(dim=0)
    n = per_sample.shape[0]
    if weights is None:
        if schedule != "none" and t is None:
            raise ValueError(f"schedule {schedule!r} needs the per-sample times t")
        if t is None:
            w = torch.ones(n, dtype=per_sample.dtype, device=per_sample.device)
        else:
            w = va_weights(torch.as_tensor(t, device=per_sample.device), schedule, tau, k,
                           path_type).to(per_sample.dtype)
    else:
        w = torch.as_tensor(weights, device=per_sample.device).to(per_sample.dtype)
    w = w.reshape(-1).expand(n) if w.numel() == 1 else w
    if w.shape != (n,):
        raise ValueError(f"weights / t must give one value per sample ({n}), got {tuple(w.shape)}")
    num, den = (w * per_sample).sum(), w.sum()
    ok = den > 1e-8
    # Safe division: the unused branch must not produce inf/NaN gradients.
    loss = torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), num * 0)
    return {"loss": loss, "per_sample": per_sample, "weights": w,
            "per_encoder": stacked.mean(dim=1)}

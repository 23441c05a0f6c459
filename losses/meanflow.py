"""MeanFlow (Geng et al. 2025): one-step generation by regressing the average velocity.

Conventions (docs/CONVENTIONS.md §1, §11); the linear path only:

- z_t = (1 - t) x + t eps, t = 0 data, t = 1 noise, v = eps - x.
- The network predicts the average velocity over [r, t], r <= t:
  u(z_t, r, t) = 1 / (t - r) * integral_r^t v(z_s, s) ds, and u(z, t, t) = v(z, t).
- MeanFlow identity: u(z_t, r, t) = v(z_t, t) - (t - r) du/dt, where the total derivative along
  the path with r fixed, du/dt = v . grad_z u + du/dt (partial), is ONE Jacobian-vector product
  of the network at (z_t, r, t) with tangent (v, 0, 1).
- Target u_tgt = stopgrad(v - clip(t - r, 0, 1) du/dt). Per sample L = SUM over all non-batch
  dimensions of (u_theta - u_tgt)^2 (the paper's code sums; the SI loss of this repository takes
  the mean), weighted adaptively: loss_i = L_i / stopgrad((L_i + c)^p); the batch mean.

DDP: the JVP runs without gradient on the unwrapped model and only builds the target; the
prediction is an ordinary forward of the (possibly DDP-wrapped) model, so the gradient reaches
the parameters through DDP's reducer like any other loss, and the dispersive loss reads the
block features of that same forward (:func:`meanflow_losses`).
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Callable, Iterator, Sequence

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn as nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .dispersive import DispersiveLoss
from .interpolant import drop_labels, expand_t_like, interpolate
from .terms import AlignmentTerm, add_alignment, add_dispersive, forward_with_features

__all__ = ["MeanFlowLoss", "sample_meanflow_times", "guided_velocity", "average_velocity_jvp",
           "meanflow_target", "meanflow_prediction_one_jvp", "meanflow_loss", "meanflow_batch",
           "meanflow_losses"]

UFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _check_linear(path_type: str) -> None:
    if path_type != "linear":
        raise ValueError(f"MeanFlow is defined here for the linear path only (z_t = (1-t) x + "
                         f"t eps, v = eps - x), got path_type={path_type!r}")


def sample_meanflow_times(n: int, generator: torch.Generator | None = None, *, mu: float = -0.4,
                          sigma: float = 1.0, equal_fraction: float = 0.75,
                          device: torch.device | str | None = None,
                          dtype: torch.dtype = torch.float32
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(t, r)``, each (n,), with 0 < r <= t < 1.

    Two logit-normal times sigmoid(N(mu, sigma^2)) per sample (one ``randn(2, n)`` call: row 0
    and row 1), t = their max, r = their min. Then one ``rand(n)`` call: sample i gets r = t
    (plain flow matching) when its uniform is below ``equal_fraction`` (a Bernoulli per sample,
    unbiased for any batch size). Both calls happen whatever the settings, so the random stream
    does not depend on them. Drawn in fp32 (fp64 when ``dtype`` is fp64), returned in ``dtype``.
    """
    if not 0.0 <= equal_fraction <= 1.0:
        raise ValueError(f"equal_fraction must be in [0, 1], got {equal_fraction}")
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    if generator is not None and device is None:
        device = generator.device
    work = torch.float64 if dtype == torch.float64 else torch.float32
    pair = torch.sigmoid(torch.randn(2, n, generator=generator, device=device, dtype=work)
                         * sigma + mu)
    t, r = pair.max(dim=0).values, pair.min(dim=0).values
    equal = torch.rand(n, generator=generator, device=device, dtype=work) < equal_fraction
    return t.to(dtype), torch.where(equal, t, r).to(dtype)


def guided_velocity(u_fn: Callable[..., torch.Tensor], z_t: torch.Tensor, t: torch.Tensor,
                    v: torch.Tensor, y: torch.Tensor, null_label: int, w: float = 1.0,
                    kappa: float = 0.0, t_lo: float = 0.0, t_hi: float = 1.0) -> torch.Tensor:
    """Training-time guidance: the velocity the target is built from.

    For samples with a real label (y != null_label) and t_lo <= t <= t_hi:
    v_g = w v + (1 - w - kappa) u(z_t, t, t | null) + kappa u(z_t, t, t | y), with
    ``u_fn(z, r, t, y)`` evaluated without gradient (under the caller's autocast); every other
    sample keeps v. The effective guidance scale is w / (1 - kappa). w = 1, kappa = 0 is "off"
    and returns ``v`` itself without calling ``u_fn``. One call on the batch when kappa = 0,
    one on the doubled batch [null, y] otherwise (fixed shapes: no host sync, no recompiles).
    """
    if w == 1.0 and kappa == 0.0:
        return v
    null = torch.full_like(y, null_label)
    with torch.no_grad():
        if kappa == 0.0:
            u_null, u_cond = u_fn(z_t, t, t, null), None
        else:
            u_null, u_cond = u_fn(torch.cat([z_t, z_t]), torch.cat([t, t]), torch.cat([t, t]),
                                  torch.cat([null, y])).chunk(2)
    guided = w * v + (1.0 - w - kappa) * u_null.to(v.dtype)
    if u_cond is not None:
        guided = guided + kappa * u_cond.to(v.dtype)
    keep = (y != null_label) & (t >= t_lo) & (t <= t_hi)
    return torch.where(expand_t_like(keep, v), guided, v)


@contextlib.contextmanager
def _quiet_jvp_setup() -> Iterator[None]:
    # torch loads its forward-AD decompositions through the deprecated torch.jit.script on first
    # use; that FutureWarning is torch's own and says nothing about the caller's code.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated",
                                category=FutureWarning)
        yield


def average_velocity_jvp(u_fn: UFn, z_t: torch.Tensor, r: torch.Tensor, t: torch.Tensor,
                         v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(u, du/dt)`` at (z_t, r, t) from ONE forward-mode JVP of ``u_fn(z, r, t)`` with tangent
    (v, 0, 1), without gradient.

    Runs in fp32 (fp64 for fp64 inputs) with autocast off, and with SDPA forced to the math
    kernel: the flash and memory-efficient kernels have no forward-mode derivative.
    """
    work = torch.promote_types(z_t.dtype, torch.float32)
    # contiguous: a tangent cannot be attached to an expanded (overlapping) view
    z, r, t, v = (a.detach().to(work).contiguous() for a in (z_t, r, t, v))
    with torch.no_grad(), torch.autocast(device_type=z.device.type, enabled=False), \
            sdpa_kernel(SDPBackend.MATH), _quiet_jvp_setup(), fwAD.dual_level():
        out = u_fn(fwAD.make_dual(z, v), fwAD.make_dual(r, torch.zeros_like(r)),
                   fwAD.make_dual(t, torch.ones_like(t)))
        u, dudt = fwAD.unpack_dual(out)
        if dudt is None:   # u does not depend on (z, t) at all
            dudt = torch.zeros_like(u)
    return u.detach(), dudt.detach()


def meanflow_target(u_fn: UFn, z_t: torch.Tensor, r: torch.Tensor, t: torch.Tensor,
                    v: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{'u_tgt', 'u', 'dudt'}``, all detached: u_tgt = v - clip(t - r, 0, 1) du/dt, with u and
    du/dt from :func:`average_velocity_jvp` (fp32 or fp64)."""
    u, dudt = average_velocity_jvp(u_fn, z_t, r, t, v)
    h = expand_t_like((t - r).clamp(0.0, 1.0), dudt).to(dudt.dtype)
    return {"u_tgt": (v.to(dudt.dtype) - h * dudt).detach(), "u": u, "dudt": dudt}


def meanflow_prediction_one_jvp(u_fn: UFn, z_t: torch.Tensor, r: torch.Tensor, t: torch.Tensor,
                                v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(u_theta, u_tgt)`` from ONE JVP taken with autograd on: the MeanFlow reference
    formulation, where the primal output is the prediction that carries the gradient and the
    tangent, detached, builds the target. Its value equals :func:`meanflow_target` plus an
    ordinary forward; it keeps the tangent's activations alive through the backward and runs the
    prediction with the math attention kernel, which is why :func:`meanflow_losses` does not use
    it (measured in bench/bench_meanflow_memory.py, docs/BENCHMARKS.md)."""
    z, r, t, v = (a.contiguous() for a in (z_t, r, t, v))
    with sdpa_kernel(SDPBackend.MATH), _quiet_jvp_setup(), fwAD.dual_level():
        out = u_fn(fwAD.make_dual(z, v.detach()), fwAD.make_dual(r, torch.zeros_like(r)),
                   fwAD.make_dual(t, torch.ones_like(t)))
        u, dudt = fwAD.unpack_dual(out)
    h = expand_t_like((t - r).clamp(0.0, 1.0), dudt).to(dudt.dtype)
    return u, (v.to(dudt.dtype) - h * dudt).detach()


def meanflow_loss(pred: torch.Tensor, target: torch.Tensor, p: float = 1.0, c: float = 1e-3
                  ) -> dict[str, torch.Tensor]:
    """``{'loss', 'mf', 'per_sample'}`` for a prediction u_theta and a (detached) target.

    per_sample L_i = SUM over non-batch dims of (pred - target)^2 (the paper's code; not the
    mean), loss = mean_i L_i / stopgrad((L_i + c)^p); p = 0 is the plain summed squared error.
    ``mf`` is the detached batch mean of the raw L. Reductions in at least fp32.
    """
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    dtype = torch.promote_types(torch.promote_types(pred.dtype, target.dtype), torch.float32)
    per_sample = (pred.to(dtype) - target.to(dtype).detach()).square().flatten(1).sum(dim=1)
    weight = (per_sample.detach() + c).pow(p)
    return {"loss": (per_sample / weight).mean(), "mf": per_sample.detach().mean(),
            "per_sample": per_sample}


class MeanFlowLoss(nn.Module):
    """The MeanFlow constants in one place; ``forward(pred, target)`` is :func:`meanflow_loss`.

    Defaults (docs/CONVENTIONS.md §11): adaptive weight p = 1, c = 1e-3; times logit-normal
    (mu -0.4, sigma 1) with r = t for 75% of the samples; guidance off (w = 1, kappa = 0) on
    the interval [0, 1].
    """

    def __init__(self, p: float = 1.0, c: float = 1e-3, time_mu: float = -0.4,
                 time_sigma: float = 1.0, equal_fraction: float = 0.75, cfg_w: float = 1.0,
                 cfg_kappa: float = 0.0, cfg_t_lo: float = 0.0, cfg_t_hi: float = 1.0):
        super().__init__()
        if p < 0 or c <= 0:
            raise ValueError(f"adaptive weight needs p >= 0 and c > 0, got p={p}, c={c}")
        if not 0.0 <= equal_fraction <= 1.0 or time_sigma < 0:
            raise ValueError(f"need 0 <= equal_fraction <= 1 and time_sigma >= 0, got "
                             f"{equal_fraction}, {time_sigma}")
        if not 0.0 <= cfg_kappa < 1.0 or cfg_t_lo > cfg_t_hi:
            raise ValueError(f"need 0 <= cfg_kappa < 1 and cfg_t_lo <= cfg_t_hi, got "
                             f"kappa={cfg_kappa}, interval [{cfg_t_lo}, {cfg_t_hi}]")
        self.p, self.c = float(p), float(c)
        self.time_mu, self.time_sigma = float(time_mu), float(time_sigma)
        self.equal_fraction = float(equal_fraction)
        self.cfg_w, self.cfg_kappa = float(cfg_w), float(cfg_kappa)
        self.cfg_t_lo, self.cfg_t_hi = float(cfg_t_lo), float(cfg_t_hi)

    @property
    def guidance_on(self) -> bool:
        return self.cfg_w != 1.0 or self.cfg_kappa != 0.0

    def sample_times(self, n: int, generator: torch.Generator | None = None,
                     device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return sample_meanflow_times(n, generator, mu=self.time_mu, sigma=self.time_sigma,
                                     equal_fraction=self.equal_fraction, device=device)

    def guided(self, u_fn: Callable[..., torch.Tensor], z_t: torch.Tensor, t: torch.Tensor,
               v: torch.Tensor, y: torch.Tensor, null_label: int) -> torch.Tensor:
        return guided_velocity(u_fn, z_t, t, v, y, null_label, self.cfg_w, self.cfg_kappa,
                               self.cfg_t_lo, self.cfg_t_hi)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        return meanflow_loss(pred, target, self.p, self.c)

    def extra_repr(self) -> str:
        return (f"p={self.p}, c={self.c}, time=logit_normal({self.time_mu}, {self.time_sigma}), "
                f"equal_fraction={self.equal_fraction}, cfg_w={self.cfg_w}, "
                f"cfg_kappa={self.cfg_kappa}, cfg_interval=[{self.cfg_t_lo}, {self.cfg_t_hi}]")


def meanflow_batch(x: torch.Tensor, y: torch.Tensor, *, num_classes: int, cfg_prob: float = 0.0,
                   mf: MeanFlowLoss | None = None, path_type: str = "linear",
                   generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """A MeanFlow batch from clean latents ``x`` and labels ``y``.

    Random numbers come from ``generator`` in a fixed order: label dropout (one uniform per
    sample), the times (2n normals, then n uniforms; :func:`sample_meanflow_times` with ``mf``'s
    constants), eps. Returns ``{x_t, t, r, y, eps, x0, v}`` with x_t = (1-t) x + t eps,
    v = eps - x.
    """
    _check_linear(path_type)
    mf = mf if mf is not None else MeanFlowLoss()
    gdev = generator.device if generator is not None else x.device
    y = drop_labels(y, num_classes, cfg_prob, generator)
    t, r = mf.sample_times(x.shape[0], generator, gdev)
    t, r = t.to(x.device), r.to(x.device)
    eps = torch.randn(x.shape, generator=generator, device=gdev, dtype=x.dtype).to(x.device)
    x_t, v = interpolate(x, eps, t, path_type)
    return {"x_t": x_t, "t": t, "r": r, "y": y, "eps": eps, "x0": x, "v": v}


def meanflow_losses(model: nn.Module, raw_model: nn.Module, batch: dict[str, torch.Tensor], *,
                    depth: int, mf: MeanFlowLoss, disp: DispersiveLoss | None = None,
                    null_label: int, align: AlignmentTerm | None = None,
                    align_targets: Sequence[torch.Tensor] | None = None
                    ) -> dict[str, torch.Tensor]:
    """Named terms ``{'loss', 'mf', ['disp']}`` of one MeanFlow step on ``batch``
    (:func:`meanflow_batch`).

    ``raw_model`` (the unwrapped module: no DDP, no torch.compile) builds the stop-gradient
    target: the guided velocity when guidance is on, then one JVP. ``model`` (possibly
    DDP-wrapped) runs one ordinary forward u_theta = model(x_t, t, y, r=r) that carries the
    gradient and the dispersive loss's block features (and the REPA projections when ``align``
    is given, weighted by the MeanFlow time t like the SI term). loss = adaptive MeanFlow loss +
    disp.lambda_disp * disp + align.coeff * proj; ``mf`` is the raw summed squared error
    (detached), ``disp`` and ``proj`` unweighted. ``depth`` is the model's number of blocks.
    """
    x_t, t, r, y, v = (batch[k] for k in ("x_t", "t", "r", "y", "v"))
    if mf.guidance_on:
        v = mf.guided(lambda z, r_, t_, y_: raw_model(z, t_, y_, r=r_), x_t, t, v, y, null_label)
    target = meanflow_target(lambda z, r_, t_: raw_model(z, t_, y, r=r_), x_t, r, t, v)["u_tgt"]
    pred, aux = forward_with_features(model, x_t, t, y, depth=depth, disp=disp,
                                      return_proj=align is not None, r=r)
    m = mf(pred, target)
    terms = {"mf": m["mf"]}
    total = add_dispersive(terms, m["loss"], disp, aux, depth)
    terms["loss"] = add_alignment(terms, total, align, aux, align_targets, t)
    return terms

"""StableVM toy study on Gaussian mixtures: CFM vs STF vs StableVM, with exact fields and plots.

A small time-conditioned MLP learns the velocity (or score) field of the linear path
``x_t = (1 - t) x0 + t eps`` (docs/CONVENTIONS.md §1: t = 0 data, t = 1 noise) for a Gaussian
mixture with
random means, diagonal variances and weights. Because the data is a mixture of Gaussians, the
marginal p_t is one too and its velocity and score are known in closed form, so the error of the
learned field (the "Fisher divergence", here the per-dimension mean squared error against the
exact field) is measured exactly during training, with an EMA copy of the model.

Training targets (``--exp``):

- ``cfm``: the single-sample conditional target ``eps - x0`` (score: ``-eps / t``);
- ``cfm_equal_data``: ``cfm`` with a batch of ``--ref-size`` instead of ``--batch-size``, so it
  draws as many fresh data samples per step as the stable methods (the equal-data baseline);
- ``stf``: Stable Target Field: a fresh reference batch R every step, every x_t of the batch
  perturbs the one fixed source R[0] (with its own t and eps), target averaged over R;
- ``stable_vm``: a fresh reference set R every step, x_t drawn from the mixture path of R (a
  uniformly chosen reference perturbed), target averaged over all of R;
- ``stable_vm_efficient``: the same target streamed over chunks of R (no (B, K) weight matrix).

The stable targets come from :mod:`losses.stablevm` (``stable_target`` /
``stable_target_efficient``) through a thin adapter that shares one reference set across the batch.

Budget: ``--steps`` optimizer steps, or with ``--time-budget SECONDS`` as many steps as fit into
that many seconds of *training clock* (batch construction, forward, backward, Adam and EMA of each
step; evaluations are not counted), for an equal-wall-clock comparison. Every run records its
steps, its training-clock seconds and its evaluation seconds.

Variance curves: the per-t variance of the CFM target around (a) the exact field of mixtures of
several dimensions, (b) the exact field of the *empirical* distribution of N samples (a finite
data set, the regime of image training), for real latents too (``--imagenet-data-path``), and
(c) of the stable target around the exact field, for the default mixture.

Outputs under ``--out``: ``runs/<exp>-<field>-seed<k>.{json,npz}`` per run, the mixture's
parameters ``gmm_d<D>_k<K>_s<seed>.json``,
``summary_<field>.{json,md}``, ``fisher_<field>.png``, ``fisher_vs_t_<field>.png``
(with ``--time-budget B`` the run names carry ``-budget<B>s`` and the summary and plot names
``_budget<B>s``, so they never overwrite fixed-step results),
``variance_<field>.{png,npz,json}`` and, for 2-D mixtures with ``--enable_visualization``,
``field_<exp>-<field>-seed<k>.gif``. Every file is written atomically.
"""
from __future__ import annotations

import argparse
import copy
import io
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from losses.stablevm import stable_target, stable_target_efficient
from common import (UsageError, atomic_write_bytes, atomic_write_json, cli_error, ema_decay,
                    ema_update)

PROG = "gmm_exp.py"
EXPS = ("cfm", "cfm_equal_data", "stf", "stable_vm", "stable_vm_efficient")
FIELDS = ("velocity", "score")
HEADLINE_TS = (0.2, 0.3, 0.4, 0.5)      # the Fisher-divergence average reported in the table
EVAL_TS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
# Below this t the stable methods take the conditional target: the stable formula is 0/0 at
# t = 0 (losses.stablevm refuses it) and for t this small every other reference is exp(-1/t^2)
# less likely than the source, so the two targets agree anyway.
T_FLOOR = 1e-4
METHOD_STYLE = {"cfm": ("tab:blue", "-"), "cfm_equal_data": ("tab:purple", "-"),
                "stf": ("tab:orange", "-"),
                "stable_vm": ("tab:green", "-"), "stable_vm_efficient": ("tab:red", "--")}


# ----------------------------------------------------------------------------------------------
# The mixture and its exact fields.

@dataclass
class GMM:
    """Diagonal Gaussian mixture: ``weights`` (K,), ``means`` (K, D), ``stds`` (K, D), float64."""

    weights: torch.Tensor
    means: torch.Tensor
    stds: torch.Tensor

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @classmethod
    def random(cls, dim: int, components: int, seed: int) -> "GMM":
        """The study's mixture: means U(-1, 1), variances U(0.01, 0.1) per coordinate, weights
        U(0.1, 1) normalised (the reference StableVM toy's recipe), all from ``seed``."""
        if dim < 1 or components < 1:
            raise ValueError(f"a mixture needs dim >= 1 and components >= 1, got {dim}, "
                             f"{components}")
        g = torch.Generator().manual_seed(int(seed))
        means = torch.rand(components, dim, generator=g, dtype=torch.float64) * 2 - 1
        var = 0.01 + 0.09 * torch.rand(components, dim, generator=g, dtype=torch.float64)
        w = 0.1 + 0.9 * torch.rand(components, generator=g, dtype=torch.float64)
        return cls(w / w.sum(), means, var.sqrt())

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n fp32 samples (components drawn by weight, then a diagonal Gaussian)."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return (self.means[k] + self.stds[k] * z).float()

    def data_variance(self) -> float:
        """Per-dimension variance of the data, trace(Cov x0) / D (equal to the CFM variance of
        the velocity at t = 1, where x_t carries no information about x0)."""
        w = self.weights.unsqueeze(1)
        second = (w * (self.means.square() + self.stds.square())).sum(0)
        mean = (w * self.means).sum(0)
        return float((second - mean.square()).mean())

    def _parts(self, x: torch.Tensor, t: torch.Tensor):
        """Responsibilities and per-component pieces of p_t at x (B, D) and t (B,), float64."""
        x = x.double().unsqueeze(1)                        # (B, 1, D)
        t = t.double().reshape(-1, 1, 1)                   # (B, 1, 1)
        a = 1 - t
        var = a.square() * self.stds.square() + t.square()  # (B, K, D): Var x_t | component
        diff = x - a * self.means                          # x - E[x_t | component]
        logn = -0.5 * (diff.square() / var + torch.log(2 * math.pi * var)).sum(-1)
        logits = torch.log(self.weights) + logn            # (B, K)
        return torch.softmax(logits, dim=1), torch.logsumexp(logits, dim=1), diff, var, a, t

    def log_prob(self, x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        """log p_t(x), (B,) float64."""
        return self._parts(x, _as_t(t, x))[1]

    def score(self, x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        """Exact score grad_x log p_t(x) = sum_k gamma_k (-(x - a mu_k) / var_k), float64."""
        gamma, _, diff, var, _, _ = self._parts(x, _as_t(t, x))
        return (gamma.unsqueeze(-1) * (-diff / var)).sum(1)

    def velocity(self, x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        """Exact marginal velocity E[eps - x0 | x_t = x], float64.

        Per component (x0, eps) is Gaussian: E[eps | x] = t (x - a mu) / var and
        E[x0 | x] = mu + a sigma^2 (x - a mu) / var, so v_k = (t - a sigma^2)(x - a mu) / var - mu.
        """
        gamma, _, diff, var, a, t = self._parts(x, _as_t(t, x))
        vk = (t - a * self.stds.square()) * diff / var - self.means
        return (gamma.unsqueeze(-1) * vk).sum(1)

    def _affine(self, t: float, kind: str):
        """At one t every component's field is affine in x: f_k(x) = c_k * x - b_k (elementwise,
        (K, D) each), and the conditional variance of the CFM target given the component is
        ``within_k`` (K, D). Returns (a, var, c, b, within)."""
        a = 1.0 - t
        s2 = self.stds.square()
        var = a * a * s2 + t * t
        if kind == "velocity":
            # v_k = (t - a s2) / var (x - a mu) - mu;  Var(eps - x0 | x, k) = s2 / var
            c = (t - a * s2) / var
            return a, var, c, a * c * self.means + self.means, s2 / var
        # s_k = -(x - a mu)/var; Var(-eps/t | x, k) = Var(eps | x, k)/t^2 = (1 - t^2/var)/t^2
        return a, var, -1.0 / var, -a * self.means / var, (1.0 - t * t / var) / (t * t)

    def _gamma_scalar(self, x: torch.Tensor, t: float) -> torch.Tensor:
        """Responsibilities at one t, through matrix products (no (B, K, D) buffer)."""
        a = 1.0 - t
        var = a * a * self.stds.square() + t * t
        iv = 1.0 / var
        mu = self.means
        quad = (x.square() @ iv.T - 2 * a * (x @ (mu * iv).T)
                + (a * a * mu.square() * iv).sum(1))
        logits = torch.log(self.weights) - 0.5 * (quad + torch.log(2 * math.pi * var).sum(1))
        return torch.softmax(logits, dim=1)

    def field(self, x: torch.Tensor, t: torch.Tensor | float, kind: str,
              chunk: int = 256) -> torch.Tensor:
        """Exact ``velocity`` or ``score`` at x (B, D), float64. One shared t goes through matrix
        products; per-sample t through (chunk, K, D) buffers."""
        tt = _as_t(t, x)
        if tt.numel() and bool((tt == tt[0]).all()):
            t0 = float(tt[0])
            x = x.double()
            _, _, c, b, _ = self._affine(t0, kind)
            out = []
            for i in range(0, x.shape[0], 4096):
                xi = x[i:i + 4096]
                g = self._gamma_scalar(xi, t0)
                out.append(xi * (g @ c) - g @ b)
            return torch.cat(out) if out else x.new_zeros(x.shape)
        fn = self.velocity if kind == "velocity" else self.score
        return torch.cat([fn(x[i:i + chunk], tt[i:i + chunk]) for i in range(0, x.shape[0], chunk)])

    def cfm_variance(self, x: torch.Tensor, t: float, kind: str
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """The CFM variance at x_t = x (per dimension, (B,) each), split exactly
        into the within-component part sum_k gamma_k Var(target | x, k) and the
        between-component part sum_k gamma_k ||f_k(x) - f(x)||^2 (law of total variance)."""
        x = x.double()
        _, _, c, b, within = self._affine(float(t), kind)
        g = self._gamma_scalar(x, float(t))
        f = x * (g @ c) - g @ b
        # sum_k g_k ||c_k x - b_k||^2 expanded so that no (B, K, D) buffer is formed
        second = x.square() * (g @ c.square()) - 2 * x * (g @ (c * b)) + g @ b.square()
        between = (second - f.square()).sum(1).clamp_min(0) / self.dim
        return (g @ within).mean(1), between

    def to_json(self) -> dict[str, Any]:
        return {"weights": self.weights.tolist(), "means": self.means.tolist(),
                "stds": self.stds.tolist()}


def _as_t(t: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(t, dtype=torch.float64)
    return t.expand(x.shape[0]) if t.ndim == 0 else t.reshape(-1)


# ----------------------------------------------------------------------------------------------
# Training targets.

def velocity_to_scaled_score(x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``t * score`` from a velocity of the linear path: s = -(x + (1 - t) v) / t
    (docs/CONVENTIONS.md §6)."""
    tc = t.reshape(-1, 1)
    return -(x_t + (1 - tc) * v)


def stable_velocity(x_t: torch.Tensor, t: torch.Tensor, refs: torch.Tensor,
                    cfm_target: torch.Tensor, *, efficient: bool = False, split: float = 0.0,
                    chunk_size: int | None = None) -> torch.Tensor:
    """The stable velocity target of x_t (B, D) over one reference set ``refs`` (K, D) shared by
    the whole batch: ``(x_t - sum_j w_j x0_j) / t`` with ``w = softmax(-||x_t - (1-t) x0_j||^2 /
    (2 t^2))``.

    Adapter over :func:`losses.stablevm.stable_target` (or ``stable_target_efficient`` streamed in
    chunks of ``chunk_size``): the library takes a per-sample bank (B, K, D); the shared set is
    handed over as a stride-0 view, so nothing is copied. Samples with t below ``max(split,
    T_FLOOR)`` keep ``cfm_target``.
    """
    bank = refs.unsqueeze(0).expand(x_t.shape[0], *refs.shape)
    split = max(float(split), T_FLOOR)
    if efficient:
        return stable_target_efficient(x_t, t, bank, None, "linear", split, cfm_target,
                                       chunk_size=chunk_size)
    return stable_target(x_t, t, bank, None, "linear", split, cfm_target)


def train_batch_size(exp: str, batch_size: int, ref_size: int) -> int:
    """Number of x_t (loss terms) in one step: ``ref_size`` for ``cfm_equal_data``, else
    ``batch_size``."""
    return ref_size if exp == "cfm_equal_data" else batch_size


def data_per_step(exp: str, batch_size: int, ref_size: int) -> int:
    """Fresh data samples drawn from the mixture per step: the batch for the CFM methods, the
    reference set for the others (their x_t are perturbed members of it)."""
    return batch_size if exp == "cfm" else ref_size


def make_batch(exp: str, gmm: GMM, batch_size: int, ref_size: int, field: str,
               generator: torch.Generator, split: float = 0.0,
               chunk_size: int | None = None) -> dict[str, torch.Tensor]:
    """One training batch ``{x_t, t, target, x0}``; ``target`` is in network units (the velocity,
    or ``t * score`` for the score field, see :class:`TimeMLP`). Random numbers come from
    ``generator`` in a fixed order (references or data, sources, t, eps). ``cfm_equal_data`` is
    ``cfm`` with ``ref_size`` samples (:func:`train_batch_size`)."""
    if exp not in EXPS:
        raise ValueError(f"unknown method {exp!r}; expected one of {EXPS}")
    batch_size = train_batch_size(exp, batch_size, ref_size)
    if exp in ("cfm", "cfm_equal_data"):
        x0 = gmm.sample(batch_size, generator)
        refs = None
    else:
        refs = gmm.sample(ref_size, generator)
        if exp == "stf":
            src = torch.zeros(batch_size, dtype=torch.long)   # one fixed source: R[0]
        else:  # x_t from the mixture path of R: a uniformly chosen reference, perturbed
            src = torch.randint(0, ref_size, (batch_size,), generator=generator)
        x0 = refs[src]
    t = torch.rand(batch_size, generator=generator)
    eps = torch.randn(x0.shape, generator=generator)
    tc = t.unsqueeze(1)
    x_t = (1 - tc) * x0 + tc * eps
    v = eps - x0
    if refs is not None:
        v = stable_velocity(x_t, t, refs, v, efficient=exp == "stable_vm_efficient", split=split,
                            chunk_size=chunk_size)
    if field == "velocity":
        target = v
    elif refs is None:
        target = -eps                                     # t * (-eps / t), exactly
    else:
        target = velocity_to_scaled_score(x_t, t, v)
    return {"x_t": x_t, "t": t, "target": target, "x0": x0}


# ----------------------------------------------------------------------------------------------
# Model.

class TimeMLP(nn.Module):
    """MLP on [x, t, sin/cos(pi 2^k t)] with SiLU.

    The network output is the velocity for ``field="velocity"`` and ``t * score`` (minus the
    noise prediction) for ``field="score"``: the score's 1/t growth near the data end is put back
    in :meth:`field`, and the training loss on the output is the score loss weighted by t^2.
    """

    def __init__(self, dim: int, hidden: int = 128, depth: int = 3, n_freq: int = 8):
        super().__init__()
        self.register_buffer("freqs", math.pi * 2.0 ** torch.arange(n_freq, dtype=torch.float32))
        layers: list[nn.Module] = [nn.Linear(dim + 1 + 2 * n_freq, hidden), nn.SiLU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(hidden, hidden), nn.SiLU()]
        layers.append(nn.Linear(hidden, dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        tc = t.reshape(-1, 1).to(x.dtype)
        arg = tc * self.freqs
        return self.net(torch.cat([x, tc, torch.sin(arg), torch.cos(arg)], dim=1))

    def field(self, x: torch.Tensor, t: torch.Tensor, kind: str) -> torch.Tensor:
        out = self(x, t)
        return out if kind == "velocity" else out / t.reshape(-1, 1)


# ----------------------------------------------------------------------------------------------
# Evaluation: Fisher divergence against the exact field.

class FisherEval:
    """Fixed evaluation points x_t ~ p_t at each t (same for every method and seed) with their
    exact fields, computed once. Calling it returns the per-t mean of ||f_model - f*||^2 / D."""

    def __init__(self, gmm: GMM, kind: str, ts: Sequence[float], n: int, seed: int):
        g = torch.Generator().manual_seed(int(seed))
        self.kind, self.ts = kind, [float(t) for t in ts]
        self.x, self.t, self.exact = [], [], []
        for t in self.ts:
            x0 = gmm.sample(n, g)
            eps = torch.randn(x0.shape, generator=g)
            tt = torch.full((n,), t)
            x = (1 - t) * x0 + t * eps
            self.x.append(x)
            self.t.append(tt)
            self.exact.append(gmm.field(x, tt, kind).float())

    @torch.no_grad()
    def __call__(self, model: TimeMLP) -> np.ndarray:
        was = model.training
        model.eval()
        out = [float((model.field(x, t, self.kind) - f).square().mean())
               for x, t, f in zip(self.x, self.t, self.exact)]
        model.train(was)
        return np.array(out)


def headline(fd: np.ndarray, ts: Sequence[float]) -> float:
    """Mean of the per-t values at :data:`HEADLINE_TS` (all must be in ``ts``)."""
    idx = [_t_index(ts, t) for t in HEADLINE_TS]
    return float(np.mean(np.asarray(fd)[..., idx], axis=-1))


def _t_index(ts: Sequence[float], t: float) -> int:
    for i, v in enumerate(ts):
        if abs(v - t) < 1e-9:
            return i
    raise ValueError(f"t={t} is not among the evaluation times {list(ts)}")


# ----------------------------------------------------------------------------------------------
# Variance curves.
#
# The CFM variance: the variance of the CFM target given x_t, per dimension,
# E[||target - f*(x_t)||^2 | x_t] / D with f* the exact field. ``GMM.cfm_variance`` and
# ``empirical_cfm_variance`` give it at given points x_t (for the mixture, for a finite data set);
# the ``*_curve`` functions give the n values of one curve at one t, at points they draw.

def _quantiles(per_sample: torch.Tensor) -> dict[str, np.ndarray]:
    """per_sample (T, n) -> mean and the 10/25/50/75/90 % quantiles over samples, each (T,)."""
    q = torch.quantile(per_sample.double(), torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9],
                                                          dtype=torch.float64), dim=1)
    out = {"mean": per_sample.double().mean(1).numpy()}
    for name, row in zip(("q10", "q25", "q50", "q75", "q90"), q):
        out[name] = row.numpy()
    return out


def _perturb(x0: torch.Tensor, t: float, generator: torch.Generator
             ) -> tuple[torch.Tensor, torch.Tensor]:
    eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
    return (1 - t) * x0 + t * eps, eps


def cfm_variance_curve(gmm: GMM, t: float, n: int, kind: str, generator: torch.Generator
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """The CFM variance (total, and its between-component part) at n points x_t ~ p_t:
    ``(n,), (n,)``."""
    x, _ = _perturb(gmm.sample(n, generator).double(), t, generator)
    within, between = gmm.cfm_variance(x, t, kind)
    return within + between, between


def cfm_deviation_curve(gmm: GMM, t: float, n: int, kind: str,
                        generator: torch.Generator) -> torch.Tensor:
    """Monte Carlo: ||CFM target - exact field||^2 / D for n draws (x0, eps) at time t, (n,).
    Its mean estimates the mean CFM variance (:func:`cfm_variance_curve`)."""
    x0 = gmm.sample(n, generator).double()
    x, eps = _perturb(x0, t, generator)
    target = eps - x0 if kind == "velocity" else -eps / t
    return (target - gmm.field(x, t, kind)).square().mean(1)


def stable_deviation_curve(gmm: GMM, t: float, n: int, ref_size: int, kind: str,
                           generator: torch.Generator) -> torch.Tensor:
    """Monte Carlo: ||stable target over a fresh reference set of ``ref_size`` - exact
    field||^2 / D with x_t from the mixture path of that set (stable_vm's training
    distribution), (n,)."""
    refs = gmm.sample(ref_size, generator)
    x0 = refs[torch.randint(0, ref_size, (n,), generator=generator)]
    x, eps = _perturb(x0, t, generator)
    tt = torch.full((n,), float(t))
    v = stable_velocity(x, tt, refs, eps - x0)
    target = v if kind == "velocity" else velocity_to_scaled_score(x, tt, v) / t
    return (target.double() - gmm.field(x, t, kind)).square().mean(1)


def empirical_posterior(x: torch.Tensor, t: float, data: torch.Tensor) -> torch.Tensor:
    """Posterior weights w (B, N) of the data points given x_t = x, float64:
    softmax_j(-||x - (1 - t) x0_j||^2 / (2 t^2)) through two matrix products."""
    a = 1.0 - t
    x, data = x.double(), data.double()
    logits = (a * (x @ data.T) - 0.5 * a * a * data.square().sum(1)) / (t * t)
    return torch.softmax(logits, dim=1)


def empirical_field(x: torch.Tensor, t: float, data: torch.Tensor, kind: str) -> torch.Tensor:
    """Exact field of the empirical distribution of ``data`` (N, D), float64: velocity
    (x - sum_j w_j x0_j) / t, score -(x - (1 - t) sum_j w_j x0_j) / t^2."""
    mu = empirical_posterior(x, t, data) @ data.double()
    x = x.double()
    return (x - mu) / t if kind == "velocity" else -(x - (1 - t) * mu) / (t * t)


def empirical_cfm_variance(x: torch.Tensor, t: float, data: torch.Tensor, kind: str,
                           chunk: int = 512) -> torch.Tensor:
    """The CFM variance at x_t = x (B, D) when x0 is drawn from the empirical distribution of
    ``data`` (N, D), per dimension, float64 (B,).

    Given x_t the velocity target is (x_t - x0_j) / t with probability w_j, so its variance is
    Var_w(x0) / t^2 = (sum_j w_j ||x0_j||^2 - ||sum_j w_j x0_j||^2) / t^2; the score target
    -eps / t = -(x_t - (1 - t) x0_j) / t^2 has (1 - t)^2 / t^2 times that.
    """
    d64 = data.double()
    sq = d64.square().sum(1)
    out = []
    for i in range(0, x.shape[0], chunk):
        w = empirical_posterior(x[i:i + chunk], t, d64)
        out.append((w @ sq - (w @ d64).square().sum(1)).clamp_min(0) / (t * t))
    scale = 1.0 if kind == "velocity" else (1 - t) ** 2 / (t * t)
    return torch.cat(out) * scale / data.shape[1]


def empirical_cfm_variance_curve(data: torch.Tensor, t: float, n: int, kind: str,
                                 generator: torch.Generator) -> torch.Tensor:
    """:func:`empirical_cfm_variance` at n points x_t drawn from the path of ``data`` (a finite
    data set: the exact field is the empirical one), (n,)."""
    x0 = data[torch.randint(0, data.shape[0], (n,), generator=generator)].double()
    x, _ = _perturb(x0, t, generator)
    return empirical_cfm_variance(x, t, data, kind)


def knee(ts: np.ndarray, curve: np.ndarray, frac: float = 0.5) -> float:
    """First t at which ``curve`` reaches ``frac`` of its maximum over the grid (linear
    interpolation between grid points); nan for a curve that starts above that level."""
    level = frac * float(np.max(curve))
    if curve[0] >= level:
        return float("nan")
    i = int(np.argmax(curve >= level))
    lo, hi = curve[i - 1], curve[i]
    return float(ts[i - 1] + (level - lo) / (hi - lo) * (ts[i] - ts[i - 1]))


def load_real_latents(path: str | Path, max_n: int, seed: int) -> torch.Tensor:
    """Up to ``max_n`` latents (N, D) fp32 from a shard directory: a seeded subset, no mirrored
    copies, moments sampled once (the curve treats them as one fixed finite data set)."""
    from preprocessing.shards import ShardDataset, latents_from_raw

    path = Path(path)
    if not path.is_dir():
        raise UsageError(f"--imagenet-data-path {path}: no such directory (expected a shard "
                         "directory written by preprocessing/encode.py)")
    if not (path / "manifest.json").is_file():
        raise UsageError(f"--imagenet-data-path {path}: no manifest.json there; encode one "
                         "with `python preprocessing/encode.py --dest ...`")
    ds = ShardDataset(path)
    if len(ds) == 0:
        raise UsageError(f"--imagenet-data-path {path}: the shard directory holds no samples")
    g = torch.Generator().manual_seed(int(seed))
    pos = torch.randperm(len(ds), generator=g)[:max_n]
    rows = ds.gather(pos)
    z = latents_from_raw(rows["raw"], ds.key, ds.scale, ds.bias, generator=g)
    return z.reshape(z.shape[0], -1).float()


def variance_study(args: argparse.Namespace, progress: bool = True) -> dict[str, dict[str, Any]]:
    """Every variance curve of the study, ``{name: {t, mean, q10..q90, dim, knee}}``:

    - ``exact/d=D``: the CFM variance of the study's mixture recipe in D dimensions (around the
      mixture's exact field), ``between/d=D`` its between-component part;
    - ``empirical/d=D``: the CFM variance of a finite sample of that mixture (around the exact
      field of that sample);
    - ``real/D=..``: the same for the latents of ``--imagenet-data-path``;
    - ``stable/d=dim`` and ``cfm/d=dim``: Monte Carlo squared deviation of the stable target
      (reference set of ``--ref-size``) and of the CFM target around the exact field.

    Deterministic in ``args.variance_seed``.
    """
    from tqdm import tqdm

    kind = args.vector_field
    ts = np.linspace(0.01, 0.99, args.variance_ts)
    n = args.variance_samples
    jobs: list[tuple[list[str], int, Callable[..., Any]]] = []
    for d in args.variance_dims:
        gmm = GMM.random(d, args.components, args.gmm_seed)
        data = gmm.sample(args.variance_data_size, torch.Generator().manual_seed(args.gmm_seed))
        jobs.append(([f"exact/d={d}", f"between/d={d}"], d,
                     lambda t, g, gmm=gmm: cfm_variance_curve(gmm, t, n, kind, g)))
        jobs.append(([f"empirical/d={d}"], d, lambda t, g, data=data: (
            empirical_cfm_variance_curve(data, t, n, kind, g),)))
    gmm = GMM.random(args.dim, args.components, args.gmm_seed)
    jobs.append(([f"stable/d={args.dim}"], args.dim, lambda t, g: (stable_deviation_curve(
        gmm, t, n, args.ref_size, kind, g),)))
    jobs.append(([f"cfm/d={args.dim}"], args.dim,
                 lambda t, g: (cfm_deviation_curve(gmm, t, n, kind, g),)))
    if args.imagenet_data_path:
        real = load_real_latents(args.imagenet_data_path, args.real_max, args.variance_seed)
        jobs.append(([f"real/D={real.shape[1]}"], real.shape[1],
                     lambda t, g: (empirical_cfm_variance_curve(real, t, n, kind, g),)))
    curves: dict[str, dict[str, Any]] = {}
    bar = tqdm(total=len(jobs) * len(ts), desc="variance curves", disable=not progress)
    for names, d, fn in jobs:
        g = torch.Generator().manual_seed(args.variance_seed)
        per: list[list[torch.Tensor]] = [[] for _ in names]
        for t in ts:
            for acc, values in zip(per, fn(float(t), g)):
                acc.append(values)
            bar.update(1)
        for name, acc in zip(names, per):
            c = _quantiles(torch.stack(acc))
            c.update(t=ts, dim=d, knee=knee(ts, c["mean"]))
            curves[name] = c
    bar.close()
    return curves


# ----------------------------------------------------------------------------------------------
# One training run.

def study_key(args: argparse.Namespace) -> dict[str, Any]:
    """Every setting that must match for runs to be compared (all but the method and seed).
    With ``--time-budget`` the key also holds the budget, and ``steps`` is None (unused); without
    it the key has no ``time_budget`` entry at all, so saved fixed-step runs whose records have
    none keep matching."""
    key = {k: getattr(args, k) for k in (
        "dim", "components", "gmm_seed", "vector_field", "steps", "batch_size", "ref_size", "lr",
        "hidden", "depth", "ema_decay", "split", "eval_every", "eval_samples", "eval_seed")}
    budget = getattr(args, "time_budget", None)
    if budget is not None:
        key["steps"] = None
        key["time_budget"] = budget
    return key


def budget_tag(time_budget: float | None, sep: str = "-") -> str:
    """``""`` for a fixed step count, ``<sep>budget<B>s`` for a time budget of B seconds."""
    return "" if time_budget is None else f"{sep}budget{time_budget:g}s"


def run_name(exp: str, field: str, seed: int, time_budget: float | None = None) -> str:
    return f"{exp}-{field}{budget_tag(time_budget)}-seed{seed}"


class EvalLog:
    """What a run records at each evaluation: the step, the training clock, the Fisher
    divergence of the EMA and raw models, and the mean loss since the previous evaluation; it
    also adds the GIF frame and logs to wandb when those are on."""

    def __init__(self, evaluator: FisherEval, viz: FieldFrames | None, wandb_run: Any):
        self.evaluator, self.viz, self.wandb_run = evaluator, viz, wandb_run
        self.steps: list[int] = []
        self.clock: list[float] = []        # training clock (step_seconds) at each evaluation
        self.fd_ema: list[np.ndarray] = []
        self.fd_raw: list[np.ndarray] = []
        self.losses: list[float | None] = []

    def __call__(self, step: int, step_seconds: float, ema: TimeMLP, model: TimeMLP,
                 loss: float | None) -> None:
        ts = self.evaluator.ts
        self.steps.append(step)
        self.clock.append(step_seconds)
        self.fd_ema.append(self.evaluator(ema))
        self.fd_raw.append(self.evaluator(model))
        self.losses.append(loss)
        if self.viz is not None:
            self.viz.add(ema, step)
        if self.wandb_run is not None:
            log = {f"fisher/t={t:g}": v for t, v in zip(ts, self.fd_ema[-1])}
            log.update({"fisher/avg_0.2-0.5": headline(self.fd_ema[-1], ts),
                        "fisher_raw/avg_0.2-0.5": headline(self.fd_raw[-1], ts), "loss": loss})
            self.wandb_run.log(log, step=step)


def train_step(model: TimeMLP, ema: TimeMLP, opt: torch.optim.Optimizer,
               batch: dict[str, torch.Tensor], decay: float) -> float:
    """One Adam step on the squared error to the batch's target, then the EMA update; returns
    the loss (reading it waits for the step to finish, so it belongs to the timed part)."""
    loss = (model(batch["x_t"], batch["t"]) - batch["target"]).square().mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    ema_update(list(ema.parameters()), list(model.parameters()), decay)
    return float(loss.detach())


def train_run(args: argparse.Namespace, exp: str, seed: int, gmm: GMM, evaluator: FisherEval,
              progress: bool = True, wandb_run: Any = None,
              clock: Callable[[], float] = time.perf_counter) -> dict[str, Any]:
    """Train one model with target ``exp`` and return its record (:func:`run_record`).

    Stops after ``args.steps`` steps, or, when ``args.time_budget`` is set, after the first step
    at which the training clock (the summed time of the training steps on ``clock``,
    evaluations excluded) reaches the budget. Evaluations run every ``args.eval_every`` steps
    and after the last.
    """
    from tqdm import tqdm

    kind = args.vector_field
    budget = getattr(args, "time_budget", None)
    # Same initial weights for every method at a given seed; the data stream is separate.
    torch.manual_seed(seed)
    model = TimeMLP(args.dim, args.hidden, args.depth)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    g = torch.Generator().manual_seed(seed * 1000003 + 17)
    viz = FieldFrames(gmm, kind, args.viz_t) if args.enable_visualization else None
    log = EvalLog(evaluator, viz, wandb_run)

    log(0, 0.0, ema, model, None)           # no loss before step 1
    start = clock()
    bar = tqdm(total=None if budget is not None else args.steps, desc=run_name(
        exp, kind, seed, budget), disable=not progress, mininterval=1.0)
    step, step_seconds, loss_sum, loss_count = 0, 0.0, 0.0, 0
    while True:
        step += 1
        tic = clock()
        batch = make_batch(exp, gmm, args.batch_size, args.ref_size, kind, g, args.split,
                           args.chunk_size)
        decay = ema_decay(step, args.ema_decay, warmup=True)
        loss_sum += train_step(model, ema, opt, batch, decay)
        loss_count += 1
        step_seconds += clock() - tic
        bar.update(1)
        done = step_seconds >= budget if budget is not None else step >= args.steps
        if step % args.eval_every == 0 or done:
            log(step, step_seconds, ema, model, loss_sum / loss_count)
            loss_sum, loss_count = 0.0, 0
            bar.set_postfix(loss=f"{log.losses[-1]:.4f}",
                            fd=f"{headline(log.fd_ema[-1], evaluator.ts):.4f}")
        if done:
            break
    bar.close()
    record = run_record(args, exp, seed, log, step, step_seconds, clock() - start)
    if viz is not None:
        record["_frames"] = viz.arrays()
    return record


def run_record(args: argparse.Namespace, exp: str, seed: int, log: EvalLog, steps_done: int,
               step_seconds: float, loop_seconds: float) -> dict[str, Any]:
    """A run's record: config, Fisher-divergence history of the EMA and raw models, losses,
    data per step and timing. ``step_seconds`` is the training clock (evaluations excluded),
    ``loop_seconds`` the whole loop's (stored as ``train_seconds``)."""
    ts = log.evaluator.ts
    fd_ema, fd_raw = np.array(log.fd_ema), np.array(log.fd_raw)
    return {
        "exp": exp, "seed": seed, "vector_field": args.vector_field, "study": study_key(args),
        "eval_ts": ts, "headline_ts": list(HEADLINE_TS),
        "steps": log.steps, "fd_ema": fd_ema.tolist(), "fd_raw": fd_raw.tolist(),
        "loss": log.losses,
        "final": {"fd_ema_avg": headline(fd_ema[-1], ts), "fd_raw_avg": headline(fd_raw[-1], ts),
                  "fd_ema_per_t": dict(zip(map(str, ts), fd_ema[-1].tolist()))},
        # per step: x_t in the loss, and fresh mixture samples drawn
        "batch_size": train_batch_size(exp, args.batch_size, args.ref_size),
        "data_per_step": data_per_step(exp, args.batch_size, args.ref_size),
        "time_budget": getattr(args, "time_budget", None), "steps_done": steps_done,
        # training clock (evaluations excluded) at each evaluation and in total
        "clock": log.clock, "step_seconds": step_seconds,
        "ms_per_step": 1000.0 * step_seconds / steps_done,
        # the whole loop, evaluations included
        "train_seconds": loop_seconds, "eval_seconds": loop_seconds - step_seconds,
        "steps_per_second": steps_done / loop_seconds,
        "threads": torch.get_num_threads(),
    }


def save_run(out: Path, record: dict[str, Any]) -> None:
    """``runs/<name>.json`` (everything) and ``runs/<name>.npz`` (the arrays), atomically."""
    name = run_name(record["exp"], record["vector_field"], record["seed"],
                    record.get("time_budget"))
    runs = out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    frames = record.pop("_frames", None)
    atomic_write_json(runs / f"{name}.json", record)
    arrays = {"steps": np.array(record["steps"]), "eval_ts": np.array(record["eval_ts"]),
              "fd_ema": np.array(record["fd_ema"]), "fd_raw": np.array(record["fd_raw"]),
              "loss": np.array([np.nan if v is None else v for v in record["loss"]]),
              "clock": np.array(record["clock"])}
    _save_npz(runs / f"{name}.npz", arrays)
    if frames is not None:
        _save_npz(runs / f"{name}.frames.npz", frames)


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def load_runs(out: Path, key: dict[str, Any]) -> list[dict[str, Any]]:
    """Saved run records under ``out/runs`` whose study settings equal ``key``."""
    runs = []
    for p in sorted((out / "runs").glob("*.json")):
        rec = json.loads(p.read_text())
        if rec.get("study") == key:
            runs.append(rec)
    return runs


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Final EMA Fisher divergence per method: mean and sample std over seeds, headline average
    and per t; with the steps, training-clock seconds and fresh data per step of the runs.
    A record without ``steps_done`` counts its last evaluated step; when any record lacks
    ``step_seconds`` the training-clock fields are None."""
    out: dict[str, Any] = {}
    sd = (lambda a: float(np.std(a, ddof=1)) if len(a) > 1 else float("nan"))
    for exp in EXPS:
        rs = [r for r in runs if r["exp"] == exp]
        if not rs:
            continue
        ts = rs[0]["eval_ts"]
        final = np.array([r["fd_ema"][-1] for r in rs])       # (seeds, T)
        avg = np.array([headline(f, ts) for f in final])
        study = rs[0]["study"]
        steps = [int(r.get("steps_done", r["steps"][-1])) for r in rs]
        step_seconds = [r.get("step_seconds") for r in rs]
        timed = all(c is not None for c in step_seconds)
        out[exp] = {"seeds": [r["seed"] for r in rs], "avg_mean": float(avg.mean()),
                    "avg_std": sd(avg), "avg_per_seed": avg.tolist(),
                    "per_t_mean": dict(zip(map(str, ts), final.mean(0).tolist())),
                    "per_t_std": dict(zip(map(str, ts), [sd(final[:, i])
                                                         for i in range(len(ts))])),
                    "steps_per_second": float(np.mean([r["steps_per_second"] for r in rs])),
                    "batch_size": train_batch_size(exp, study["batch_size"], study["ref_size"]),
                    "data_per_step": data_per_step(exp, study["batch_size"], study["ref_size"]),
                    "steps_per_seed": steps, "steps_mean": float(np.mean(steps)),
                    "step_seconds_per_seed": step_seconds if timed else None,
                    "step_seconds_mean": float(np.mean(step_seconds)) if timed else None,
                    "ms_per_step_mean": (float(np.mean([1000 * c / n for c, n in
                                                        zip(step_seconds, steps)]))
                                         if timed else None)}
    return out


def summary_markdown(summary: dict[str, Any]) -> str:
    """The results table: headline average and the four headline t, mean ± std over seeds,
    then fresh data samples per step, steps, training-clock seconds (evaluations excluded) and
    steps per second of the whole loop (evaluations included)."""
    head = "| method | seeds | avg t in {0.2..0.5} | " + " | ".join(
        f"t={t}" for t in HEADLINE_TS) + " | data/step | steps | train s | steps/s |"
    lines = [head, "|" + "---|" * (len(HEADLINE_TS) + 7)]
    def cell(mean: float, std: float, n: int) -> str:
        return f"{mean:.4f} ± {std:.4f}" if n > 1 else f"{mean:.4f}"  # no spread from one seed

    for exp, s in summary.items():
        n = len(s["seeds"])
        cells = [cell(s["per_t_mean"][str(t)], s["per_t_std"][str(t)], n) for t in HEADLINE_TS]
        secs = "-" if s["step_seconds_mean"] is None else f"{s['step_seconds_mean']:.2f}"
        lines.append(f"| {exp} | {n} | {cell(s['avg_mean'], s['avg_std'], n)} | "
                     + " | ".join(cells) + f" | {s['data_per_step']} | {s['steps_mean']:.0f} | "
                     f"{secs} | {s['steps_per_second']:.0f} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# 2-D field frames.

class FieldFrames:
    """The EMA model's field on a grid at each of ``ts`` after every evaluation (2-D only)."""

    def __init__(self, gmm: GMM, kind: str, ts: Sequence[float], grid: int = 17):
        self.kind, self.ts = kind, [float(t) for t in ts]
        # one square window that holds the data end and the noise end of the path
        self.lim = max(float((gmm.means.abs() + 2.5 * gmm.stds).max()), 2.0 * max(self.ts))
        ax = torch.linspace(-self.lim, self.lim, grid, dtype=torch.float64)
        yy, xx = torch.meshgrid(ax, ax, indexing="ij")
        self.points = torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1).float()
        fine = torch.linspace(-self.lim, self.lim, 150, dtype=torch.float64)
        fy, fx = torch.meshgrid(fine, fine, indexing="ij")
        fp = torch.stack([fx.reshape(-1), fy.reshape(-1)], dim=1)
        self.exact = torch.stack([gmm.field(self.points, t, kind).float() for t in self.ts])
        self.density = torch.stack([gmm.log_prob(fp, t).exp().reshape(150, 150).float()
                                    for t in self.ts])
        self.steps: list[int] = []
        self.learned: list[torch.Tensor] = []

    @torch.no_grad()
    def add(self, model: TimeMLP, step: int) -> None:
        self.steps.append(step)
        self.learned.append(torch.stack([
            model.field(self.points, torch.full((self.points.shape[0],), t), self.kind)
            for t in self.ts]))

    def arrays(self) -> dict[str, np.ndarray]:
        """Everything :func:`render_gif` needs (saved so ``--only_plot`` can redraw)."""
        return {"points": self.points.numpy(), "exact": self.exact.numpy(),
                "learned": torch.stack(self.learned).numpy(), "steps": np.array(self.steps),
                "density": self.density.numpy(), "lim": np.array(self.lim),
                "ts": np.array(self.ts), "kind": np.array(self.kind)}


# ----------------------------------------------------------------------------------------------
# Plots (matplotlib is imported lazily: the maths and tests do not need it).

def _pyplot():
    try:
        import matplotlib
    except ImportError as e:  # pragma: no cover - requirements.txt pins it
        raise UsageError("plotting needs matplotlib: pip install -r requirements.txt") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _log_y(ax) -> None:
    """Log y axis with plain-number tick labels; call after plotting. matplotlib's default
    10^k labels go through mathtext (about a second per figure), and an axis spanning less
    than a decade would show no label at all, so minor ticks are labelled then."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    ax.set_yscale("log")
    lo, hi = ax.get_ylim()
    keep = (1, 2, 3, 4, 5, 6, 7, 8, 9) if hi / lo < 4 else (2, 3, 5)

    def minor(v: float, _pos: int) -> str:
        mantissa = round(v / 10 ** math.floor(math.log10(v) + 1e-9))
        return f"{v:.2g}" if mantissa in keep else ""

    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.2g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(minor) if hi / lo < 15 else NullFormatter())


def _save_fig(fig, path: Path, dpi: int = 90) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def plot_variance(curves: dict[str, dict[str, Any]], kind: str, path: Path) -> None:
    """Three panels, per-dimension variance on a log axis over t:

    (a) CFM target around the exact mixture field, by dimension (solid: total, band 10-90 %
    over x_t; dashed: the between-component part, dot: its knee); (b) around the exact field of
    a finite sample (and of real latents), dot: knee; (c) stable vs CFM target at the study's
    dimension (Monte Carlo squared deviation, band 10-90 % over draws), headline t shaded.
    """
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.3))
    cmap = plt.get_cmap("viridis")
    dims = sorted({int(c["dim"]) for n, c in curves.items() if n.startswith("exact/")})
    color_of = {d: cmap(i / max(1, len(dims) - 1) * 0.9) for i, d in enumerate(dims)}

    def line(ax, c, color, label, ls="-", band=True, mark_knee=False):
        ax.plot(c["t"], c["mean"], color=color, ls=ls, label=label)
        if band:
            ax.fill_between(c["t"], c["q10"], c["q90"], color=color, alpha=0.12)
        if mark_knee and not np.isnan(c["knee"]):
            ax.plot([c["knee"]], [np.interp(c["knee"], c["t"], c["mean"])], "o", color=color)

    for d in dims:
        line(axes[0], curves[f"exact/d={d}"], color_of[d], f"d={d} total")
        b = curves.get(f"between/d={d}")
        if b is not None:
            line(axes[0], b, color_of[d], f"d={d} between (knee {b['knee']:.2f})", ls="--",
                 band=False, mark_knee=True)
        e = curves.get(f"empirical/d={d}")
        if e is not None:
            line(axes[1], e, color_of[d], f"d={d} (knee {e['knee']:.2f})", mark_knee=True)
    for name, c in curves.items():
        if name.startswith("real/"):
            line(axes[1], c, "tab:red", f"real latents {name[5:]} (knee {c['knee']:.2f})",
                 mark_knee=True)
        elif name.startswith("stable/"):
            line(axes[2], c, "tab:green", f"stable target, {name[7:]}")
        elif name.startswith("cfm/"):
            line(axes[2], c, "tab:blue", f"CFM target, {name[4:]}")
    axes[2].axvspan(min(HEADLINE_TS), max(HEADLINE_TS), color="0.92", zorder=0)
    titles = ("(a) CFM target around the exact mixture field",
              "(b) around the exact field of a finite sample",
              "(c) stable vs CFM target around the exact field")
    for ax, title in zip(axes, titles):
        ax.set_yscale("log")
        lo = min(float(np.nanmin(np.where(l.get_ydata() > 0, l.get_ydata(), np.inf)))
                 for l in ax.get_lines()) if ax.get_lines() else 1e-4
        ax.set_ylim(bottom=max(lo * 0.5, 1e-4))  # exact zeros (certain posteriors) sit below
        _log_y(ax)
        ax.set_xlim(0, 1)
        ax.set_xlabel("t  (0 = data, 1 = noise)")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"{kind} variance per dimension")
    fig.tight_layout()
    _save_fig(fig, path)
    plt.close(fig)


def _by_method(runs: list[dict[str, Any]]):
    """(method, its runs, colour, line style) for each method that has runs, in EXPS order."""
    for exp in EXPS:
        rs = [r for r in runs if r["exp"] == exp]
        if rs:
            yield (exp, rs, *METHOD_STYLE[exp])


def plot_fisher(runs: list[dict[str, Any]], kind: str, path: Path) -> None:
    """Fisher divergence of the EMA model over training, methods side by side: the headline
    average and each headline t; line = mean over seeds, band = min..max over seeds.

    Over training steps for fixed-step runs; for time-budget runs (whose seeds stop at
    different steps) over the training clock, each seed's curve interpolated linearly onto a
    common grid of 60 times between its first evaluation and the budget."""
    plt = _pyplot()
    panels = ["avg"] + list(HEADLINE_TS)
    budget = runs[0].get("time_budget")
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6), sharex=True)
    for exp, rs, color, ls in _by_method(runs):
        ts = rs[0]["eval_ts"]
        for ax, p in zip(axes, panels):
            def series(r):
                fd = np.array(r["fd_ema"])                   # (evals, T)
                return (np.array([headline(row, ts) for row in fd]) if p == "avg"
                        else fd[:, _t_index(ts, p)])
            if budget is None:
                x = np.array(rs[0]["steps"])[1:]
                y = np.array([series(r) for r in rs])[:, 1:]
            else:
                lo = max(r["clock"][1] for r in rs)
                x = np.linspace(lo, budget, 60)
                y = np.array([np.interp(x, r["clock"], series(r)) for r in rs])
            ax.plot(x, y.mean(0), color=color, ls=ls, label=f"{exp} ({len(rs)})")
            ax.fill_between(x, y.min(0), y.max(0), color=color, alpha=0.15)
    for ax, p in zip(axes, panels):
        _log_y(ax)
        ax.set_xlabel("training step" if budget is None
                      else "training clock, s (evaluations excluded)")
        ax.set_title("avg over t in {0.2,0.3,0.4,0.5}" if p == "avg" else f"t = {p}",
                     fontsize=10)
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel(f"Fisher divergence ({kind}, EMA)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    _save_fig(fig, path)
    plt.close(fig)


def plot_fisher_vs_t(runs: list[dict[str, Any]], kind: str, path: Path) -> None:
    """Final Fisher divergence (EMA) over all evaluation t, one line per method (mean over
    seeds, band min..max), headline window shaded."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for exp, rs, color, ls in _by_method(runs):
        ts = np.array(rs[0]["eval_ts"])
        fd = np.array([r["fd_ema"][-1] for r in rs])
        ax.plot(ts, fd.mean(0), color=color, ls=ls, marker="o", ms=3, label=exp)
        ax.fill_between(ts, fd.min(0), fd.max(0), color=color, alpha=0.15)
    ax.axvspan(min(HEADLINE_TS), max(HEADLINE_TS), color="0.9", zorder=0)
    _log_y(ax)
    ax.set_xlabel("t")
    ax.set_ylabel(f"final Fisher divergence ({kind}, EMA)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save_fig(fig, path)
    plt.close(fig)


def render_gif(frames: dict[str, np.ndarray], title: str, path: Path) -> None:
    """One frame per evaluation: for each visualised t, the learned (EMA, blue) and exact (red)
    fields as arrows over the density p_t (grey), with the grid MSE in the title."""
    from PIL import Image

    plt = _pyplot()
    pts, lim, ts = frames["points"], float(frames["lim"]), frames["ts"]
    spacing = 2 * lim / (np.sqrt(pts.shape[0]) - 1)
    images = []
    for step, learned in zip(frames["steps"], frames["learned"]):
        fig, axes = plt.subplots(1, len(ts), figsize=(3.8 * len(ts), 4.1), squeeze=False)
        for j, (ax, t) in enumerate(zip(axes[0], ts)):
            exact, model = frames["exact"][j], learned[j]
            ax.imshow(frames["density"][j], extent=(-lim, lim, -lim, lim), origin="lower",
                      cmap="Greys", alpha=0.7)
            # longest exact arrow = 1.2 grid spacings, the learned field on the same scale
            scale = float(np.linalg.norm(exact, axis=1).max()) / (1.2 * spacing)
            for f, color, label in ((exact, "tab:red", "exact"),
                                    (model, "tab:blue", "learned (EMA)")):
                ax.quiver(pts[:, 0], pts[:, 1], f[:, 0], f[:, 1], color=color, alpha=0.75,
                          angles="xy", scale_units="xy", scale=scale, width=0.005, label=label)
            err = float(np.mean((model - exact) ** 2))
            ax.set_title(f"t = {float(t):g}   grid MSE {err:.3g}", fontsize=9)
            ax.set_xlim(-lim, lim)
            ax.set_ylim(-lim, lim)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[0][0].legend(fontsize=7, loc="lower left")
        fig.suptitle(f"{title}, step {int(step)}", fontsize=10)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=70)
        plt.close(fig)
        buf.seek(0)
        images.append(Image.open(buf).convert("P", palette=Image.ADAPTIVE, colors=64))
    out = io.BytesIO()
    images[0].save(out, format="GIF", save_all=True, append_images=images[1:], duration=500,
                   loop=0)
    atomic_write_bytes(path, out.getvalue())


# ----------------------------------------------------------------------------------------------
# CLI.

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("-e", "--exp", nargs="+", default=["stable_vm"],
                   choices=list(EXPS) + ["all"], help="target(s) to train, run one after another")
    p.add_argument("--vector_field", "--vector-field", choices=FIELDS, default="velocity")
    p.add_argument("--dim", type=int, default=10)
    p.add_argument("--components", type=int, default=100)
    p.add_argument("--gmm-seed", type=int, default=0, help="draws the mixture (shared by runs)")
    p.add_argument("--seed", type=int, nargs="+", default=[0], help="training seed(s)")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--time-budget", "--time_budget", type=float, default=None, metavar="SECONDS",
                   help="train each run for this many seconds of training clock (evaluations "
                   "excluded) instead of --steps, which is then ignored")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--ref-size", type=int, default=1024, help="reference set size (stable "
                   "methods)")
    p.add_argument("--chunk-size", type=int, default=128,
                   help="references per chunk for stable_vm_efficient")
    p.add_argument("--split", type=float, default=0.0,
                   help="stable target only for t >= split (0: everywhere)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--ema-decay", type=float, default=0.995)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-samples", type=int, default=2048)
    p.add_argument("--eval-seed", type=int, default=12345)
    p.add_argument("--out", default="runs/gmm")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch default)")
    p.add_argument("--use_wandb", "--use-wandb", action="store_true")
    p.add_argument("--wandb-project", default="sitkit-gmm")
    p.add_argument("--no_plot_variance", "--no-plot-variance", action="store_true")
    p.add_argument("--only_plot", "--only-plot", action="store_true",
                   help="train nothing: variance curves, comparison plots and GIFs from --out")
    p.add_argument("--enable_visualization", "--enable-visualization", action="store_true",
                   help="vector-field frames over training as a GIF (needs --dim 2)")
    p.add_argument("--viz-t", type=float, nargs="+", default=[0.2, 0.5],
                   help="times shown side by side in the GIF")
    p.add_argument("--imagenet-data-path", "--imagenet_data_path", default=None,
                   help="shard directory of real latents for the variance curves")
    p.add_argument("--real-max", type=int, default=2048, help="latents read from that directory")
    p.add_argument("--variance-dims", type=int, nargs="+", default=[2, 10, 100, 500])
    p.add_argument("--variance-ts", type=int, default=50)
    p.add_argument("--variance-samples", type=int, default=1024)
    p.add_argument("--variance-data-size", type=int, default=2048,
                   help="size of the finite sample for the empirical-field curves")
    p.add_argument("--variance-seed", type=int, default=7)
    p.add_argument("--no-progress", action="store_true")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and check a command line (argparse's ``error`` for what the user must fix)."""
    p = build_parser()
    args = p.parse_args(argv)
    if "all" in args.exp:
        args.exp = list(EXPS)
    positive = ("dim", "components", "steps", "batch_size", "ref_size", "chunk_size", "hidden",
                "depth", "eval_every", "eval_samples", "variance_ts", "variance_samples",
                "variance_data_size", "real_max")
    for name in positive:
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if any(d < 1 for d in args.variance_dims):
        p.error(f"--variance-dims must all be >= 1, got {args.variance_dims}")
    if args.variance_ts < 2:
        p.error("--variance-ts must be >= 2")
    if not 0.0 <= args.split <= 1.0:
        p.error(f"--split must be in [0, 1], got {args.split}")
    if args.time_budget is not None and not (0.0 < args.time_budget < math.inf):
        p.error(f"--time-budget must be a positive number of seconds, got {args.time_budget}")
    if not 0.0 < args.lr:
        p.error(f"--lr must be > 0, got {args.lr}")
    if not 0.0 <= args.ema_decay < 1.0:
        p.error(f"--ema-decay must be in [0, 1), got {args.ema_decay}")
    if not all(0.0 < t < 1.0 for t in args.viz_t):
        p.error(f"--viz-t values must be in (0, 1), got {args.viz_t}")
    if args.enable_visualization and args.dim != 2:
        p.error(f"--enable_visualization draws 2-D vector fields: use --dim 2 (got {args.dim})")
    if args.imagenet_data_path is not None:
        path = Path(args.imagenet_data_path)
        if not path.is_dir():
            p.error(f"--imagenet-data-path {path}: no such directory")
        if not (path / "manifest.json").is_file():
            p.error(f"--imagenet-data-path {path}: no manifest.json (not a shard directory "
                    "written by preprocessing/encode.py)")
    if args.threads < 0:
        p.error("--threads must be >= 0")
    return args


def _require_wandb():
    try:
        import wandb
    except ImportError:
        raise UsageError("--use_wandb needs the wandb package, which is not installed: "
                         "`pip install wandb`, or drop --use_wandb") from None
    return wandb


def _init_wandb(args: argparse.Namespace, exp: str, seed: int):
    """One wandb run per (method, seed), configured with the study settings."""
    return _require_wandb().init(project=args.wandb_project,
                                 name=run_name(exp, args.vector_field, seed,
                                               args.time_budget),
                                 config={**study_key(args), "exp": exp, "seed": seed},
                                 reinit=True)


def _write_variance(out: Path, kind: str, curves: dict[str, dict[str, Any]],
                    config: dict[str, Any]) -> None:
    arrays = {}
    for name, c in curves.items():
        for k in ("t", "mean", "q10", "q25", "q50", "q75", "q90"):
            arrays[f"{name}/{k}"] = np.asarray(c[k])
    _save_npz(out / f"variance_{kind}.npz", arrays)
    table = {name: {"dim": int(c["dim"]), "knee": c["knee"],
                    "mean": dict(zip([f"{t:.3f}" for t in c["t"]],
                                     np.asarray(c["mean"]).tolist()))}
             for name, c in curves.items()}
    atomic_write_json(out / f"variance_{kind}.json", {"config": config, "curves": table})


def _read_variance(out: Path, kind: str, config: dict[str, Any]
                   ) -> dict[str, dict[str, Any]] | None:
    """The cached curves of an earlier call with the same ``config``, else None."""
    js, npz = out / f"variance_{kind}.json", out / f"variance_{kind}.npz"
    if not (js.is_file() and npz.is_file()):
        return None
    meta = json.loads(js.read_text())
    if meta.get("config") != config:
        return None
    curves: dict[str, dict[str, Any]] = {}
    with np.load(npz) as z:
        for key in z.files:
            name, k = key.rsplit("/", 1)
            curves.setdefault(name, {})[k] = z[key]
    for name, c in curves.items():
        c["knee"] = meta["curves"][name]["knee"]
        c["dim"] = meta["curves"][name]["dim"]
    return curves


def variance_config(args: argparse.Namespace) -> dict[str, Any]:
    cfg = {k: getattr(args, k) for k in (
        "vector_field", "dim", "components", "gmm_seed", "ref_size", "variance_dims",
        "variance_ts", "variance_samples", "variance_data_size", "variance_seed", "real_max")}
    cfg["curves_version"] = 2  # bump when the curve definitions change: old caches are ignored
    cfg["imagenet_data_path"] = (str(Path(args.imagenet_data_path).resolve())
                                 if args.imagenet_data_path else None)
    return cfg


def variance_curves(args: argparse.Namespace, out: Path) -> None:
    """Compute the variance curves (or read them from an earlier call with the same settings),
    plot them and print a line per curve."""
    kind = args.vector_field
    vcfg = variance_config(args)
    curves = _read_variance(out, kind, vcfg)
    if curves is None:
        curves = variance_study(args, not args.no_progress)
        _write_variance(out, kind, curves, vcfg)
    plot_variance(curves, kind, out / f"variance_{kind}.png")
    for name, c in curves.items():
        m = np.asarray(c["mean"])
        print(f"variance {name}: t={c['t'][0]:.2f} {m[0]:.4g}, min {m.min():.4g} at "
              f"t={c['t'][int(np.argmin(m))]:.2f}, max {m.max():.4g} at "
              f"t={c['t'][int(np.argmax(m))]:.2f}, t={c['t'][-1]:.2f} {m[-1]:.4g}, "
              f"knee {c['knee']:.3f}")


def train_all(args: argparse.Namespace, out: Path) -> None:
    """Train every (method, seed) in turn; save each run, and its GIF, as soon as it is done."""
    kind = args.vector_field
    if args.use_wandb:
        _require_wandb()  # fail before training, not after it
    gmm = GMM.random(args.dim, args.components, args.gmm_seed)
    evaluator = FisherEval(gmm, kind, EVAL_TS, args.eval_samples, args.eval_seed)
    atomic_write_json(out / f"gmm_d{args.dim}_k{args.components}_s{args.gmm_seed}.json",
                      {"dim": args.dim, "components": args.components,
                       "gmm_seed": args.gmm_seed, **gmm.to_json()})
    for exp in args.exp:
        for seed in args.seed:
            run = _init_wandb(args, exp, seed) if args.use_wandb else None
            rec = train_run(args, exp, seed, gmm, evaluator, not args.no_progress, run)
            frames = rec.get("_frames")
            save_run(out, rec)
            name = run_name(exp, kind, seed, args.time_budget)
            if frames is not None:
                render_gif(frames, name, out / f"field_{name}.gif")
            if run is not None:
                run.finish()
            print(f"{name}: final Fisher divergence (EMA) avg "
                  f"{rec['final']['fd_ema_avg']:.5f} after {rec['steps_done']} steps, "
                  f"{rec['step_seconds']:.1f} s training clock ({rec['ms_per_step']:.2f} "
                  f"ms/step, evaluations excluded), {rec['eval_seconds']:.1f} s evaluating",
                  flush=True)


def redraw_gifs(out: Path, kind: str, time_budget: float | None) -> None:
    """The GIF of every saved run with field frames (``--only_plot --enable_visualization``)."""
    tag = budget_tag(time_budget)
    for p in sorted((out / "runs").glob(f"*-{kind}{tag}-seed*.frames.npz")):
        with np.load(p) as z:
            frames = {k: z[k] for k in z.files}
        name = p.name[:-len(".frames.npz")]
        render_gif(frames, name, out / f"field_{name}.gif")


def write_summary(args: argparse.Namespace, out: Path) -> int:
    """Summary table and comparison plots of the saved runs of these settings; when there are
    none, say why on stderr. Returns the exit status (1: ``--only_plot`` had nothing to do)."""
    kind, key = args.vector_field, study_key(args)
    runs = load_runs(out, key)
    if runs:
        summary = summarize(runs)
        tag = budget_tag(args.time_budget, sep="_")
        atomic_write_json(out / f"summary_{kind}{tag}.json", {"study": key, "methods": summary})
        md = summary_markdown(summary)
        atomic_write_bytes(out / f"summary_{kind}{tag}.md", md.encode())
        plot_fisher(runs, kind, out / f"fisher_{kind}{tag}.png")
        plot_fisher_vs_t(runs, kind, out / f"fisher_vs_t_{kind}{tag}.png")
        print(md)
        return 0
    others = list((out / "runs").glob(f"*-{kind}*-seed*.json"))
    if others:  # runs of another configuration: say so instead of plotting nothing silently
        rec = json.loads(others[0].read_text()).get("study", {})
        diff = {k: (rec.get(k), v) for k, v in key.items() if rec.get(k) != v}
        print(f"no saved runs match these settings; {others[0].name} differs in "
              f"(saved, given): {diff}", file=sys.stderr)
    if args.only_plot and args.no_plot_variance:
        print(f"nothing to plot under {out}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(json.dumps({"exp": args.exp, "seed": args.seed, **study_key(args)}), flush=True)
    try:
        if not args.no_plot_variance:
            variance_curves(args, out)
        if not args.only_plot:
            train_all(args, out)
        elif args.enable_visualization:
            redraw_gifs(out, args.vector_field, args.time_budget)
        return write_summary(args, out)
    except UsageError as e:
        return cli_error(PROG, e)


if __name__ == "__main__":
    sys.exit(main())

"""ODE / SDE samplers for velocity-predicting models, with classifier-free guidance.

Works with any model called as ``model(x, t, y) -> velocity`` (SiT's signature; a tuple output is
reduced to its first element, as REPA's models return one). Conventions (docs/CONVENTIONS.md §1,
§6):

- Time t in [0, 1], t=0 data, t=1 noise; x_t = a(t) x + s(t) eps, the model predicts
  v = a'(t) x + s'(t) eps (linear path: v = eps - x). Sampling integrates from t=1 to t=0, so every
  step has dt < 0.
- Labels 0..C-1, null (unconditional) label C = ``model.num_classes`` unless ``null_label`` says
  otherwise (REPA hard-codes 1000, which breaks CFG for every other dataset).
- Time grids and the state are float64; the model sees x and t cast to the compute dtype (the
  model's parameter dtype unless ``dtype`` is given; a caller's ``torch.autocast`` still applies).
- Noise: sample i's starting noise and SDE step noise come only from (seed, global index i[, step]),
  never from the batch it lands in, so results do not depend on batch size or process count.

Public API: :func:`sample_ode`, :func:`sample_sde`, :func:`sample_meanflow` (or :func:`sample`
with ``mode``), :func:`velocity_with_cfg`, :func:`average_velocity`, :func:`score_from_velocity`,
:func:`sample_noise`, :class:`StepNoise`, :func:`make_labels`, and :func:`latents_to_uint8`
(with :func:`decode_latents` and :func:`images_to_uint8`): samplers return latents, and that is
where they become images.
"""
from __future__ import annotations

import math
import warnings
from itertools import chain
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn

from common import mix_seed
from losses.interpolant import PATH_TYPES, path_coefficients

# Stream ids mixed into the per-sample seed. 0 and 1 are taken here; callers that need more
# per-sample randomness (e.g. generate.py's label draw) should use other ids.
INIT_STREAM = 0   # starting noise x_1
SDE_STREAM = 1    # Euler-Maruyama increments
LABEL_STREAMS = {"random": 2, "equal": 3}  # generation labels (make_labels)

FINAL_STEPS = ("drift", "velocity")

# torch.linspace is not correctly rounded (linspace(1, 0, 11)[7] == 0.30000000000000004); without
# a little slack a user's guidance_low=0.3 would silently drop the step they meant to include.
# Grid spacings are >= 1e-6 in any sane run, so the slack never admits a genuinely outside point.
_GUIDANCE_TOL = 1e-9

IndexLike = Sequence[int] | torch.Tensor | np.ndarray


# ----------------------------------------------------------------------------------------------
# Seeding.

def sample_seed(seed: int, index: int, stream: int, *extra: int) -> int:
    """64-bit seed of one sample's generator, mixed from (seed, index, stream, *extra)."""
    if not (0 <= seed < 2**32 and 0 <= index < 2**32):
        raise ValueError(f"seed and sample index must be in [0, 2**32), got seed={seed}, "
                         f"index={index}")
    return mix_seed(seed, index, stream, *extra, bits=64)


def _as_index_list(indices: IndexLike) -> list[int]:
    if isinstance(indices, torch.Tensor):
        return [int(i) for i in indices.reshape(-1).tolist()]
    return [int(i) for i in np.asarray(indices).reshape(-1).tolist()]


def _generators(seed: int, indices: IndexLike, stream: int,
                device: torch.device | str) -> list[torch.Generator]:
    gens = []
    for i in _as_index_list(indices):
        g = torch.Generator(device=device)
        g.manual_seed(sample_seed(seed, i, stream))
        gens.append(g)
    return gens


def sample_noise(seed: int, indices: IndexLike, shape: Sequence[int],
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
                 stream: int = INIT_STREAM) -> torch.Tensor:
    """Standard normal noise, (len(indices), *shape); ``shape`` is ONE sample's shape (C, H, W).

    Row j is ``torch.randn(shape)`` (float32) from a CPU generator seeded with
    ``sample_seed(seed, indices[j], stream)``, then moved/cast: drawing on the CPU makes the
    starting noise identical on every machine (CPU, any GPU) and for every dtype.
    """
    shape = tuple(int(s) for s in shape)
    gens = _generators(seed, indices, stream, "cpu")
    if not gens:
        return torch.empty((0, *shape), device=device, dtype=dtype)
    out = torch.stack([torch.randn(shape, generator=g, dtype=torch.float32) for g in gens])
    return out.to(device=device, dtype=dtype)


class StepNoise:
    """Per-sample Gaussian increments for the SDE, drawn on the sampling device.

    The k-th call returns, for row j, the k-th ``randn(shape)`` draw (float32) of a generator on
    ``device`` seeded with ``sample_seed(seed, indices[j], SDE_STREAM)``: the noise of sample i at
    step k depends only on (seed, i, k) (for a given per-sample shape and device type). Drawing
    on the device keeps the per-step cost to a few tiny kernel launches; CPU and CUDA streams
    differ, so SDE samples are reproducible per device type.
    """

    def __init__(self, seed: int, indices: IndexLike, shape: Sequence[int],
                 device: torch.device | str):
        self.shape = tuple(int(s) for s in shape)
        self.device = torch.device(device)
        self.generators = _generators(seed, indices, SDE_STREAM, self.device)

    def __call__(self) -> torch.Tensor:
        return torch.stack([torch.randn(self.shape, generator=g, device=self.device,
                                        dtype=torch.float32) for g in self.generators])


# ----------------------------------------------------------------------------------------------
# Paths and the score.

def path_coefficients_at(t: float, path_type: str = "linear") -> tuple[float, float, float, float]:
    """(a, s, a', s') at a scalar time as Python floats (float64), from the one path definition
    in :mod:`losses.interpolant`."""
    coeffs = path_coefficients(torch.tensor(float(t), dtype=torch.float64), path_type)
    return tuple(float(c) for c in coeffs)


def score_from_velocity(v: torch.Tensor, x: torch.Tensor, t: float,
                        path_type: str = "linear") -> torch.Tensor:
    """Score grad log p_t(x) from the (marginal) velocity v at (x, t).

    With x_t = a x + s eps and v = E[a' x + s' eps | x_t], eliminating E[x | x_t] gives
    E[eps | x_t] = (a v - a' x_t) / (a s' - a' s), and Tweedie: score = -E[eps | x_t] / s.
    Linear path (a s' - a' s = 1): score = -(x + (1 - t) v) / t. Undefined at t = 0 (s = 0).
    """
    a, s, da, ds = path_coefficients_at(t, path_type)
    if s <= 0:
        raise ValueError(f"the score is undefined at t={t} (s(t) = 0)")
    eps = (a * v - da * x) / (a * ds - da * s)
    return -eps / s


def sde_diffusion(t: float) -> float:
    """Diffusion coefficient w(t) = g(t)^2 = 2t of the reverse SDE (REPA's form)."""
    return 2.0 * t


# ----------------------------------------------------------------------------------------------
# Model evaluation with classifier-free guidance.

def _first_tensor(model: nn.Module) -> torch.Tensor | None:
    for p in chain(model.parameters(), model.buffers()):
        if p.is_floating_point():
            return p
    return None


def model_dtype(model: nn.Module) -> torch.dtype:
    """Compute dtype: the model's first floating parameter/buffer dtype (float32 if none)."""
    p = _first_tensor(model)
    return p.dtype if p is not None else torch.float32


def model_device(model: nn.Module) -> torch.device:
    p = _first_tensor(model)
    return p.device if p is not None else torch.device("cpu")


def resolve_null_label(model: nn.Module, null_label: int | None = None) -> int:
    """The unconditional label: ``null_label`` if given, else ``model.num_classes``."""
    if null_label is not None:
        return int(null_label)
    n = getattr(model, "num_classes", None)
    if n is None:
        raise ValueError(f"{type(model).__name__} has no `num_classes` attribute: pass null_label "
                         "(the label the model was trained with for 'no class')")
    return int(n)


def in_guidance_interval(t: float, low: float, high: float) -> bool:
    """CFG is applied at time t iff low <= t <= high (both inclusive, up to linspace rounding)."""
    return low - _GUIDANCE_TOL <= float(t) <= high + _GUIDANCE_TOL


def velocity_with_cfg(model: nn.Module, x: torch.Tensor, t: float | torch.Tensor,
                      y: torch.Tensor | None, cfg_scale: float = 1.0,
                      null_label: int | None = None, guidance_low: float = 0.0,
                      guidance_high: float = 1.0, dtype: torch.dtype | None = None
                      ) -> torch.Tensor:
    """Velocity at (x, t) for labels y, guided when cfg_scale != 1 and t is in the interval.

    Guided: one model call on [x, x] with labels [y, null]; returns u + w (c - u) on every channel
    (c conditional, u unconditional; SiT/DispLoss guide only 3 of 4 channels). Otherwise one call
    on x with y. ``y=None`` means unconditional (the null label), where guidance is a no-op and
    skipped. The model gets x and a (N,) time tensor in ``dtype``; the result has x's dtype.
    """
    t = float(t)
    dtype = dtype or model_dtype(model)
    # Unconditional sampling: cond == uncond, so guidance would only double the cost.
    guided = (y is not None and cfg_scale != 1.0
              and in_guidance_interval(t, guidance_low, guidance_high))
    if y is None:
        y = torch.full((x.shape[0],), resolve_null_label(model, null_label), dtype=torch.long,
                       device=x.device)
    if guided:
        x_in = torch.cat([x, x])
        y_in = torch.cat([y, torch.full_like(y, resolve_null_label(model, null_label))])
    else:
        x_in, y_in = x, y
    # t goes through float64 so the compute-dtype value is the rounding of the exact grid time.
    t_in = torch.full((x_in.shape[0],), t, dtype=torch.float64, device=x.device).to(dtype)
    out = model(x_in.to(dtype), t_in, y_in)
    if isinstance(out, (tuple, list)):
        out = out[0]
    out = out.to(x.dtype)
    if not guided:
        return out
    cond, uncond = out.chunk(2)
    return uncond + cfg_scale * (cond - uncond)


# ----------------------------------------------------------------------------------------------
# Decoding.

def _channel_vector(v: float | Sequence[float] | torch.Tensor, like: torch.Tensor
                    ) -> float | torch.Tensor:
    if isinstance(v, (int, float)):
        return float(v)
    v = torch.as_tensor(v, dtype=like.dtype, device=like.device)
    return v.view(1, -1, *([1] * (like.ndim - 2))) if v.ndim == 1 else v


@torch.no_grad()
def decode_latents(vae: Any, z: torch.Tensor,
                   scale: float | Sequence[float] | torch.Tensor = 0.18215,
                   bias: float | Sequence[float] | torch.Tensor = 0.0) -> torch.Tensor:
    """Pixels in [-1, 1] (float32) from model latents z = latent * scale + bias
    (docs/CONVENTIONS.md §2).

    ``vae`` is a diffusers AutoencoderKL-like object (``vae.decode(latent).sample``); ``scale`` and
    ``bias`` are floats or per-channel vectors (C,), the inverse of what encoding applied.
    """
    z = z.float()
    latent = (z - _channel_vector(bias, z)) / _channel_vector(scale, z)
    ref = _first_tensor(vae) if isinstance(vae, nn.Module) else None
    if ref is not None:
        latent = latent.to(device=ref.device, dtype=ref.dtype)
    out = vae.decode(latent)
    images = out.sample if hasattr(out, "sample") else out
    return images.float().clamp(-1, 1)


def latents_to_uint8(z: torch.Tensor, vae: Any = None,
                     latent_scale: float | Sequence[float] | torch.Tensor = 0.18215,
                     latent_bias: float | Sequence[float] | torch.Tensor = 0.0) -> torch.Tensor:
    """The one place sampled latents become images: uint8 (N, H, W, 3) on the CPU. With ``vae``
    the latents are decoded (:func:`decode_latents`); without one they are pixels in [-1, 1]
    (``--vae none`` runs). One-channel images are repeated to RGB (ADM's layout)."""
    images = decode_latents(vae, z, latent_scale, latent_bias) if vae is not None else \
        z.float().clamp(-1, 1)
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    return images_to_uint8(images)


def images_to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) in [-1, 1] -> uint8 (N, H, W, 3), pixel = clamp(127.5 x + 128, 0, 255) truncated
    (ADM's conversion, docs/CONVENTIONS.md §6)."""
    return (127.5 * images.float() + 128.0).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()


# ----------------------------------------------------------------------------------------------
# Samplers.

def _setup(model: nn.Module, shape: Sequence[int], y: torch.Tensor | None, seed: int,
           indices: IndexLike | None, noise: torch.Tensor | None, path_type: str,
           num_steps: int, cfg_scale: float):
    """Validate arguments; return (x float64 on the model's device, y, indices list, device)."""
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2:
        raise ValueError(f"shape must be (B, C, ...), got {shape}")
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if path_type not in PATH_TYPES:
        raise ValueError(f"unknown path_type {path_type!r}: one of {', '.join(PATH_TYPES)}")
    b = shape[0]
    has_tensors = _first_tensor(model) is not None
    device = model_device(model) if has_tensors or noise is None else noise.device
    idx = list(range(b)) if indices is None else _as_index_list(indices)
    if len(idx) != b:
        raise ValueError(f"{len(idx)} indices for a batch of {b}")
    if y is not None:
        y = torch.as_tensor(y, dtype=torch.long, device=device).reshape(-1)
        if y.shape[0] != b:
            raise ValueError(f"{y.shape[0]} labels for a batch of {b}")
    elif cfg_scale != 1.0:
        warnings.warn("cfg_scale is ignored for unconditional sampling (y=None)", stacklevel=3)
    if noise is not None:
        if tuple(noise.shape) != shape:
            raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {shape}")
        x = noise.to(device=device, dtype=torch.float64)
    else:
        x = sample_noise(seed, idx, shape[1:], device=device, dtype=torch.float64)
    return x, y, idx, device


def _steps(n: int, progress: bool, desc: str):
    if not progress:
        return range(n)
    from tqdm.auto import tqdm
    return tqdm(range(n), desc=desc, leave=False)


@torch.no_grad()
def sample_ode(model: nn.Module, shape: Sequence[int], *, num_steps: int = 50, heun: bool = False,
               cfg_scale: float = 1.0, guidance_low: float = 0.0, guidance_high: float = 1.0,
               y: torch.Tensor | None = None, seed: int = 0, indices: IndexLike | None = None,
               noise: torch.Tensor | None = None, path_type: str = "linear",
               dtype: torch.dtype | None = None, null_label: int | None = None,
               progress: bool = False) -> torch.Tensor:
    """Probability-flow ODE dx/dt = v(x, t) from t=1 (noise) to t=0 (data).

    Grid t_k = linspace(1, 0, num_steps + 1) (float64). Euler: x += v dt. Heun: predictor
    x' = x + v dt, corrector x += (v + v(x', t_next)) dt / 2, skipped on the last step (t_next = 0),
    so 2N-1 model evaluations. Guidance is decided per evaluation time (see velocity_with_cfg;
    REPA's Heun decides the corrector by the step's start time instead).

    shape: (B, C, H, W). y: (B,) labels, or None for unconditional (null label). indices: global
    sample indices for seeding (default 0..B-1); noise: explicit x_1 instead. ``path_type`` is
    accepted for a uniform signature (the ODE needs only v). Returns float32 latents (decode them
    with :func:`latents_to_uint8`). Put the model in eval mode first.
    """
    x, y, _, _ = _setup(model, shape, y, seed, indices, noise, path_type, num_steps, cfg_scale)
    dtype = dtype or model_dtype(model)

    def velocity(x_: torch.Tensor, t_: float) -> torch.Tensor:
        return velocity_with_cfg(model, x_, t_, y, cfg_scale, null_label, guidance_low,
                                 guidance_high, dtype)

    # Python floats (float64) keep the grid on the host: no device syncs inside the loop.
    ts = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64).tolist()
    for k in _steps(num_steps, progress, "heun" if heun else "euler"):
        t_cur, t_next = ts[k], ts[k + 1]
        dt = t_next - t_cur
        v = velocity(x, t_cur)
        if heun and k < num_steps - 1:
            v_next = velocity(x + dt * v, t_next)
            x = x + dt * (0.5 * v + 0.5 * v_next)
        else:
            x = x + dt * v
    return x.float()


@torch.no_grad()
def sample_sde(model: nn.Module, shape: Sequence[int], *, num_steps: int = 250,
               cfg_scale: float = 1.0, guidance_low: float = 0.0, guidance_high: float = 1.0,
               y: torch.Tensor | None = None, seed: int = 0, indices: IndexLike | None = None,
               noise: torch.Tensor | None = None, path_type: str = "linear",
               dtype: torch.dtype | None = None, null_label: int | None = None,
               last_step: float = 0.04, final_step: str = "drift", heun: bool = False,
               progress: bool = False) -> torch.Tensor:
    """Reverse-time SDE by Euler-Maruyama on t = linspace(1, last_step, N), then one mean step to 0.

    The reverse SDE sharing the marginals of the flow, integrated with dt < 0, is
        dx = [v - w(t)/2 * score] dt + sqrt(w(t)) dW,   w(t) = 2t,
    with the score from v (:func:`score_from_velocity`). Step k (k = 0..N-2):
        x += drift dt + sqrt(w |dt|) xi_k,   xi_k from :class:`StepNoise` (seed, index, k).
    Final step from last_step to 0 (no noise), ``final_step``:
        "drift" (default, REPA parity): x += (v - w/2 score) dt, the mean of one more EM step;
        "velocity": x += v dt, for the linear path exactly Tweedie's E[x_0 | x_t] = x - t v.
    N model evaluations in all (N-1 stochastic steps + 1 final). Arguments and return value as
    :func:`sample_ode` (``noise`` replaces only x_1; the step noise still comes from seed and
    indices); ``heun`` is accepted and ignored (REPA's signature).
    """
    if not 0.0 < last_step < 1.0:
        raise ValueError(f"last_step must be in (0, 1), got {last_step}")
    if final_step not in FINAL_STEPS:
        raise ValueError(f"unknown final_step {final_step!r}: one of {', '.join(FINAL_STEPS)}")
    x, y, idx, device = _setup(model, shape, y, seed, indices, noise, path_type, num_steps,
                               cfg_scale)
    dtype = dtype or model_dtype(model)
    step_noise = StepNoise(seed, idx, x.shape[1:], device)

    def velocity(x_: torch.Tensor, t_: float) -> torch.Tensor:
        return velocity_with_cfg(model, x_, t_, y, cfg_scale, null_label, guidance_low,
                                 guidance_high, dtype)

    def drift(x_: torch.Tensor, v_: torch.Tensor, t_: float) -> torch.Tensor:
        # CFG acts on v; the drift is affine in v with weights summing to 1, so this equals
        # REPA's guidance of the drift itself.
        return v_ - 0.5 * sde_diffusion(t_) * score_from_velocity(v_, x_, t_, path_type)

    ts = torch.linspace(1.0, last_step, num_steps, dtype=torch.float64).tolist()
    for k in _steps(num_steps - 1, progress, "sde"):
        t_cur, t_next = ts[k], ts[k + 1]
        dt = t_next - t_cur
        d = drift(x, velocity(x, t_cur), t_cur)
        xi = step_noise().to(torch.float64)
        x = x + d * dt + math.sqrt(sde_diffusion(t_cur) * abs(dt)) * xi
    t_cur = ts[-1]
    dt = 0.0 - t_cur
    v = velocity(x, t_cur)
    x = x + dt * (drift(x, v, t_cur) if final_step == "drift" else v)
    return x.float()


def average_velocity(model: nn.Module, x: torch.Tensor, r: float, t: float,
                     y: torch.Tensor | None, null_label: int | None = None,
                     dtype: torch.dtype | None = None) -> torch.Tensor:
    """A MeanFlow model's average velocity u(x, r, t | y) (one call, no guidance); ``y=None``
    means the null label. The model gets x and (N,) times in ``dtype``; the result has x's dtype."""
    dtype = dtype or model_dtype(model)
    if y is None:
        y = torch.full((x.shape[0],), resolve_null_label(model, null_label), dtype=torch.long,
                       device=x.device)

    def full(v: float) -> torch.Tensor:
        return torch.full((x.shape[0],), v, dtype=torch.float64, device=x.device).to(dtype)

    out = model(x.to(dtype), full(t), y, r=full(r))
    if isinstance(out, (tuple, list)):
        out = out[0]
    return out.to(x.dtype)


@torch.no_grad()
def sample_meanflow(model: nn.Module, shape: Sequence[int], *, num_steps: int = 1,
                    y: torch.Tensor | None = None, seed: int = 0,
                    indices: IndexLike | None = None, noise: torch.Tensor | None = None,
                    dtype: torch.dtype | None = None, null_label: int | None = None,
                    progress: bool = False) -> torch.Tensor:
    """MeanFlow sampling (docs/CONVENTIONS.md §11) with a model called as ``model(x, t, y, r=r)``
    that returns the average velocity over [r, t].

    Grid t_k = linspace(1, 0, num_steps + 1) (float64); each step z_r = z_t - (t - r) u(z_t, r, t),
    so one step (1 NFE) is x = eps - u(eps, 0, 1). No CFG: guidance is part of training. The
    starting noise, labels, seeding and return value are those of :func:`sample_ode`
    (the same seed and indices give the same eps). Put the model in eval mode first.
    """
    x, y, _, _ = _setup(model, shape, y, seed, indices, noise, "linear", num_steps, 1.0)
    dtype = dtype or model_dtype(model)
    ts = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64).tolist()
    for k in _steps(num_steps, progress, "meanflow"):
        t_cur, t_next = ts[k], ts[k + 1]
        x = x - (t_cur - t_next) * average_velocity(model, x, t_next, t_cur, y, null_label, dtype)
    return x.float()


SAMPLERS = {"ode": sample_ode, "sde": sample_sde, "meanflow": sample_meanflow}


def sample(model: nn.Module, shape: Sequence[int], mode: str = "ode", *,
           num_steps: int | None = None,
           y: torch.Tensor | None = None, seed: int = 0, indices: IndexLike | None = None,
           cfg_scale: float = 1.0, guidance_low: float = 0.0, guidance_high: float = 1.0,
           heun: bool = False, path_type: str = "linear", **kwargs: Any) -> torch.Tensor:
    """Latents from the sampler of ``mode``: :func:`sample_ode` ('ode'), :func:`sample_sde`
    ('sde') or :func:`sample_meanflow` ('meanflow'). The one selection used by generate.py and by
    training's sample grids and online evaluation. A MeanFlow model's guidance is part of its
    training, so 'meanflow' takes no sampling guidance, Heun step or path (they are not used).
    ``num_steps`` None: the sampler's own default."""
    if mode not in SAMPLERS:
        raise ValueError(f"unknown sampling mode {mode!r}: one of {', '.join(SAMPLERS)}")
    common = dict(y=y, seed=seed, indices=indices, **kwargs)
    if num_steps is not None:
        common["num_steps"] = num_steps
    if mode == "meanflow":
        return sample_meanflow(model, shape, **common)
    return SAMPLERS[mode](model, shape, cfg_scale=cfg_scale, guidance_low=guidance_low,
                          guidance_high=guidance_high, heun=heun, path_type=path_type, **common)


def make_labels(n: int, num_classes: int, mode: str, seed: int) -> np.ndarray:
    """All ``n`` class labels (int64) of a generation run, the same on every process.

    ``random``: ``rng.integers(0, C, n)``. ``equal``: every class gets n // C samples, the n mod C
    remaining ones go one each to the first classes of ``rng.permutation(C)``, and the
    class-sorted list is shuffled with the same generator; rng is seeded with
    ``sample_seed(seed, 0, stream)``, stream 2 (random) or 3 (equal)."""
    rng = np.random.default_rng(sample_seed(seed, 0, LABEL_STREAMS[mode]))
    if mode == "random":
        return rng.integers(0, num_classes, size=n, dtype=np.int64)
    q, r = divmod(n, num_classes)
    counts = np.full(num_classes, q, dtype=np.int64)
    counts[rng.permutation(num_classes)[:r]] += 1
    labels = np.repeat(np.arange(num_classes, dtype=np.int64), counts)
    return labels[rng.permutation(n)]

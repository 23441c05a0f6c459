"""SiT: a DiT-style transformer with adaLN-Zero that predicts the velocity field.

One file, one size registry (``SiT_models``). Conventions (docs/CONVENTIONS.md §1, §4):
- ``forward(x, t, y)``: x (N, C, H, W), t (N,) in [0, 1] with t=0 data and t=1 noise, y (N,) in
  0..num_classes where ``num_classes`` is the null (unconditional) label. Returns the velocity.
- Label dropout for CFG is done by the training loop (it replaces labels by the null label); the
  model itself is deterministic.
- Parameter names follow REPA/SiT/DiT so their checkpoints load (see :func:`load_checkpoint`).
- Blocks are numbered 1..depth: "block k" is the token output after k blocks (REPA's
  ``--encoder-depth`` convention). ``return_features`` asks for any set of them; ``return_proj``
  runs the projectors on block ``encoder_depth`` (only then: sampling never pays for them).
- ``SiT(meanflow=True)`` predicts the average velocity u(x, r, t) over [r, t] (docs/CONVENTIONS.md
  §11): a second time embedder reads h = t - r, and ``forward(..., r=r)``.
"""
from __future__ import annotations

import argparse
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------
# Embeddings.

def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of t in [0, 1]: [cos(t w_k), sin(t w_k)], w_k = max_period^(-k/half).

    Computed in fp32, or fp64 for an fp64 ``t`` (float64 derivative checks need it)."""
    half = dim // 2
    work = torch.float64 if t.dtype == torch.float64 else torch.float32
    freqs = torch.exp(-math.log(max_period) *
                      torch.arange(half, dtype=work, device=t.device) / half)
    args = t.to(work)[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def sincos_pos_embed_2d(dim: int, grid: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding, (grid*grid, dim), token index = row*grid + col.

    The first half encodes the column, the second the row; each half is [sin(p w), cos(p w)]
    with w_k = 10000^(-k/(dim/4)) (MAE/DiT layout, so released checkpoints' buffers agree).
    """
    if dim % 4:
        raise ValueError(f"hidden size {dim} must be a multiple of 4 for the 2-D embedding")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64),
                                torch.arange(grid, dtype=torch.float64), indexing="ij")

    def one_d(pos: torch.Tensor) -> torch.Tensor:
        out = pos.reshape(-1, 1) * omega[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    return torch.cat([one_d(cols), one_d(rows)], dim=1).float()


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> tokens (a strided conv named ``proj`` like timm's)."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size: int, frequency_size: int = 256):
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        emb = timestep_embedding(t, self.frequency_size)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class embedding with one extra row, index ``num_classes``, for the null label."""

    def __init__(self, num_classes: int, hidden_size: int):
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(y)


# ----------------------------------------------------------------------------------------------
# Transformer block.

class Attention(nn.Module):
    """Multi-head self-attention through ``F.scaled_dot_product_attention`` (flash/mem-efficient
    kernels on GPU), qkv with bias, optional per-head LayerNorm on q and k (qk-norm)."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by {num_heads} heads")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.q_norm = nn.LayerNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(n, t, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class SiTBlock(nn.Module):
    """adaLN-Zero block: LayerNorm (no affine) -> modulate -> attn/MLP -> gated residual."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qk_norm: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads, qk_norm)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift1, scale1))
        x = x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))
        return x


class FinalLayer(nn.Module):
    def __init__(self, dim: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


# ----------------------------------------------------------------------------------------------
# Projectors (REPA heads on block ``encoder_depth``).

class ConvProjector(nn.Module):
    """iREPA: a k x k convolution over the token grid (keeps spatial structure), D -> z_dim."""

    def __init__(self, dim: int, z_dim: int, kernel_size: int = 3):
        super().__init__()
        if kernel_size % 2 == 0:
            raise ValueError(f"conv projector kernel size must be odd, got {kernel_size}")
        self.proj = nn.Conv2d(dim, z_dim, kernel_size, padding=kernel_size // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        g = math.isqrt(t)
        y = self.proj(x.transpose(1, 2).reshape(n, d, g, g))
        return y.flatten(2).transpose(1, 2)


def build_projector(kind: str, dim: int, z_dim: int, projector_dim: int = 2048,
                    kernel_size: int = 3) -> nn.Module:
    """``mlp`` (REPA: D -> 2048 -> 2048 -> z, SiLU; names 0/2/4), ``linear`` or ``conv`` (iREPA)."""
    if kind == "mlp":
        return nn.Sequential(nn.Linear(dim, projector_dim), nn.SiLU(),
                             nn.Linear(projector_dim, projector_dim), nn.SiLU(),
                             nn.Linear(projector_dim, z_dim))
    if kind == "linear":
        return nn.Linear(dim, z_dim)
    if kind == "conv":
        return ConvProjector(dim, z_dim, kernel_size)
    raise ValueError(f"unknown projector type {kind!r}: mlp, linear or conv")


# ----------------------------------------------------------------------------------------------
# The model.

class SiT(nn.Module):
    """Scalable Interpolant Transformer predicting the velocity v = a'(t) x + s'(t) eps."""

    def __init__(self, input_size: int = 32, patch_size: int = 2, in_channels: int = 4,
                 hidden_size: int = 1152, depth: int = 28, num_heads: int = 16,
                 mlp_ratio: float = 4.0, num_classes: int = 1000, qk_norm: bool = False,
                 z_dims: Sequence[int] = (), projector_dim: int = 2048, encoder_depth: int = 8,
                 projector_type: str = "mlp", projector_kernel_size: int = 3,
                 flip_time: bool = False, meanflow: bool = False):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input size {input_size} is not divisible by patch size {patch_size}")
        if z_dims and not 1 <= encoder_depth <= depth:
            raise ValueError(f"encoder_depth {encoder_depth} outside 1..{depth} (blocks are "
                             "numbered from 1: the projectors read the output of that block)")
        self.input_size, self.patch_size = input_size, patch_size
        self.in_channels = self.out_channels = in_channels
        self.hidden_size, self.depth, self.num_heads = hidden_size, depth, num_heads
        self.num_classes = num_classes
        self.encoder_depth = encoder_depth
        self.z_dims = tuple(z_dims)
        # flip_time: the weights were trained with t=0 noise, t=1 data and v = x - eps (SiT's own
        # checkpoints); inputs and outputs are mapped so callers always see this repo's convention.
        self.flip_time = flip_time
        self.meanflow = meanflow
        self.grid = input_size // patch_size

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        # MeanFlow: the interval h = t - r gets its own embedder, added to the conditioning.
        self.h_embedder = TimestepEmbedder(hidden_size) if meanflow else None
        self.y_embedder = LabelEmbedder(num_classes, hidden_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid ** 2, hidden_size),
                                      requires_grad=False)
        self.blocks = nn.ModuleList(SiTBlock(hidden_size, num_heads, mlp_ratio, qk_norm)
                                    for _ in range(depth))
        self.projectors = nn.ModuleList(
            build_projector(projector_type, hidden_size, z, projector_dim, projector_kernel_size)
            for z in self.z_dims)
        self.final_layer = FinalLayer(hidden_size, patch_size, in_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT initialisation; adaLN modulations and the output layer are zero, so output is 0."""
        def basic(m: nn.Module) -> None:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.apply(basic)
        if self.pos_embed.device.type != "meta":
            self.pos_embed.data.copy_(sincos_pos_embed_2d(self.hidden_size, self.grid)[None])
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        if self.h_embedder is not None:
            # Zero output layer: h adds nothing at step 0, so a plain SiT checkpoint loaded with
            # strict=False gives u(x, r, t) = v(x, t) for every r; the first layer still trains.
            nn.init.normal_(self.h_embedder.mlp[0].weight, std=0.02)
            nn.init.zeros_(self.h_embedder.mlp[2].weight)
            nn.init.zeros_(self.h_embedder.mlp[2].bias)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for p in (self.final_layer.adaLN_modulation[-1].weight,
                  self.final_layer.adaLN_modulation[-1].bias,
                  self.final_layer.linear.weight, self.final_layer.linear.bias):
            nn.init.zeros_(p)

    def forward_macs(self) -> int:
        """Multiply-accumulates of one forward pass for one sample (matmuls and attention only).

        Counted like DiT's published "Gflops" (which are MACs): SiT-XL/2 at 256 px is 118.6 G.
        Hardware FLOPs are 2x this; a training step (forward + backward) is ~3x the forward.
        """
        d, t = self.hidden_size, self.grid ** 2
        p2c = self.patch_size ** 2 * self.in_channels
        mlp_hidden = self.blocks[0].mlp.fc1.out_features if len(self.blocks) else 0
        per_block = (t * (4 * d * d + 2 * d * mlp_hidden)   # qkv + proj, fc1 + fc2
                     + 2 * t * t * d                         # q k^T and attn @ v
                     + 6 * d * d)                            # adaLN modulation (per sample)
        time_mlp = self.t_embedder.frequency_size * d + d * d
        embed = t * p2c * d + time_mlp * (2 if self.h_embedder is not None else 1)
        final = 2 * d * d + t * d * p2c
        return self.depth * per_block + embed + final

    def _interval_embedding(self, t: torch.Tensor, r: torch.Tensor | None
                            ) -> torch.Tensor | None:
        """h_embedder(t - r) for a MeanFlow model (h = 0 when r is None); None otherwise."""
        if self.h_embedder is None:
            if r is not None:
                raise ValueError("r was given but this SiT was built without meanflow=True")
            return None
        if r is None:
            return self.h_embedder(torch.zeros_like(t))
        if r.ndim == 0:
            r = r.expand(t.shape[0])
        return self.h_embedder(t - r)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, p*p*C) -> (N, C, H, W); channel is the fastest index within a patch."""
        n, p, c, g = x.shape[0], self.patch_size, self.out_channels, self.grid
        x = x.reshape(n, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(n, c, g * p, g * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, *,
                return_features: Iterable[int] | None = None, return_proj: bool = False,
                r: torch.Tensor | None = None):
        """Velocity at (x, t | y). With ``return_features`` (1-indexed block numbers) or
        ``return_proj`` returns ``(out, {"features": {k: (N, T, D)}, "proj": [(N, T, z)]})``.

        A ``meanflow`` model returns the average velocity u(x, r, t) over [r, t] (r <= t);
        ``r=None`` means r = t, the instantaneous velocity. Its h embedder reads h = t - r in
        this repository's time axis, before any ``flip_time`` mapping of t.
        """
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        h_emb = self._interval_embedding(t, r)
        if self.flip_time:
            t = 1 - t
        want = set(return_features or ())
        bad = [k for k in want if not 1 <= k <= self.depth]
        if bad:
            raise ValueError(f"feature blocks {bad} outside 1..{self.depth}")
        if return_proj and not len(self.projectors):
            raise ValueError("return_proj=True but the model has no projectors (z_dims empty)")
        h = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y)
        if h_emb is not None:
            c = c + h_emb
        feats, proj = {}, []
        for k, block in enumerate(self.blocks, start=1):
            h = block(h, c)
            if k in want:
                feats[k] = h
            if return_proj and k == self.encoder_depth:
                proj = [p(h) for p in self.projectors]
        out = self.unpatchify(self.final_layer(h, c))
        if self.flip_time:
            out = -out
        if not want and not return_proj:
            return out
        return out, {"features": feats, "proj": proj}


# ----------------------------------------------------------------------------------------------
# Size registry.

_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
_PATCHES = (1, 2, 4, 8)


@dataclass(frozen=True)
class _Spec:
    depth: int
    hidden_size: int
    num_heads: int
    patch_size: int


_SPECS = {f"SiT-{s}/{p}": _Spec(d, h, n, p) for s, (d, h, n) in _SIZES.items() for p in _PATCHES}


def get_model_config(name: str) -> dict:
    """Constructor kwargs (depth, hidden_size, num_heads, patch_size) of a registered size."""
    if name not in _SPECS:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(_SPECS)}")
    s = _SPECS[name]
    return {"depth": s.depth, "hidden_size": s.hidden_size, "num_heads": s.num_heads,
            "patch_size": s.patch_size}


def _factory(name: str):
    def make(**kwargs) -> SiT:
        # size keys may be overridden (e.g. depth=4 for a tiny test model)
        return SiT(**{**get_model_config(name), **kwargs})
    make.__name__ = name.replace("-", "_").replace("/", "_")
    make.__doc__ = f"{name}: depth/hidden/heads/patch = {tuple(get_model_config(name).values())}"
    return make


SiT_models = {name: _factory(name) for name in _SPECS}


# ----------------------------------------------------------------------------------------------
# Checkpoints from other repositories.

def read_checkpoint(path: str | Path, key: str | None = None) -> dict[str, torch.Tensor]:
    """Load a state dict from .safetensors or a torch file without running pickled code.

    ``.pt`` files are read with ``weights_only=True``; argparse.Namespace (REPA stores its args in
    the checkpoint) is the one extra class allowed. For dicts holding several state dicts, ``key``
    picks one (default: 'ema', then 'model', then the dict itself).
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(path)
    with torch.serialization.safe_globals([argparse.Namespace]):
        obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict, got {type(obj).__name__}")
    for k in ([key] if key else ["ema", "model", "state_dict"]):
        if k in obj and isinstance(obj[k], dict):
            return obj[k]
    if key:
        raise KeyError(f"{path} has no '{key}' entry; entries: {sorted(obj)}")
    return obj


_CONV_PROJECTOR_KEY = re.compile(r"^(projectors\.\d+)\.conv\.(weight|bias)$")


def projector_kwargs(sd: dict[str, torch.Tensor]) -> dict:
    """The SiT projector arguments (``z_dims``, ``projector_type``, ``projector_kernel_size``)
    that rebuild the projectors stored in a (converted) state dict; {} when it has none."""
    heads: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        m = re.match(r"^projectors\.(\d+)\.(?:(.+)\.)?weight$", k)
        if m:
            heads.setdefault(int(m.group(1)), {})[m.group(2) or ""] = v
    if not heads:
        return {}
    z_dims, kinds, kernel = [], set(), 3
    for i in sorted(heads):
        layers = heads[i]
        if "proj" in layers and layers["proj"].ndim == 4:  # iREPA conv
            kinds.add("conv")
            kernel = int(layers["proj"].shape[-1])
            z_dims.append(int(layers["proj"].shape[0]))
        elif list(layers) == [""]:  # linear
            kinds.add("linear")
            z_dims.append(int(layers[""].shape[0]))
        elif all(name.isdigit() for name in layers):  # REPA MLP: 0, 2, 4
            kinds.add("mlp")
            z_dims.append(int(layers[max(layers, key=int)].shape[0]))
        else:
            raise ValueError(f"unrecognised projector {i} layers: {sorted(layers)}")
    if len(kinds) > 1:
        raise ValueError(f"projectors of mixed types {sorted(kinds)}")
    return {"z_dims": z_dims, "projector_type": kinds.pop(), "projector_kernel_size": kernel}


def convert_sit_state_dict(sd: dict[str, torch.Tensor], in_channels: int, patch_size: int
                           ) -> dict[str, torch.Tensor]:
    """Map a SiT/DiT-style state dict onto this model's layout.

    - ``module.`` / ``_orig_mod.`` prefixes (DDP, torch.compile) are stripped.
    - StableVelocity's iREPA checkpoints name the conv projector's layer ``conv``
      (``projectors.k.conv.*``); ours is ``proj`` (``projectors.k.proj.*``): renamed.
    - A learn_sigma head (p*p*2C outputs: the velocity channels, then the sigma channels, per
      patch position) is cut to its first C channels per position.
    The opposite time axis of SiT's own checkpoints is handled by ``SiT(flip_time=True)``.
    """
    out = {}
    for k, v in sd.items():
        for prefix in ("module.", "_orig_mod."):
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[_CONV_PROJECTOR_KEY.sub(r"\1.proj.\2", k)] = v
    pp = patch_size * patch_size
    w, b = out.get("final_layer.linear.weight"), out.get("final_layer.linear.bias")
    if w is not None and w.shape[0] == pp * 2 * in_channels:
        rows = torch.arange(pp * 2 * in_channels).view(pp, 2 * in_channels)[:, :in_channels]
        out["final_layer.linear.weight"] = w[rows.reshape(-1)]
        out["final_layer.linear.bias"] = b[rows.reshape(-1)]
    return out


def load_checkpoint(model: SiT, path: str | Path | dict[str, torch.Tensor],
                    key: str | None = None, strict: bool = True):
    """Load REPA (strict, projectors included), SiT or our own weights into ``model``.

    ``path`` is a file (see :func:`read_checkpoint`) or a state dict already read from one. For
    SiT's own checkpoints build the model with ``flip_time=True``. A mismatch names the
    missing/unexpected/mis-shaped tensors instead of a generic error. Returns torch's
    ``(missing_keys, unexpected_keys)`` (both empty when ``strict``).
    """
    raw = path if isinstance(path, dict) else read_checkpoint(path, key)
    if isinstance(path, dict):
        path = "the given state dict"
    sd = convert_sit_state_dict(raw, model.in_channels, model.patch_size)
    own = model.state_dict()
    shapes = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
              for k, v in sd.items() if k in own and own[k].shape != v.shape]
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    if shapes or (strict and (missing or unexpected)):
        lines = [f"{path} does not match the model ({type(model).__name__} depth {model.depth}, "
                 f"hidden {model.hidden_size}, patch {model.patch_size}, "
                 f"{model.in_channels} channels, {model.num_classes} classes):"]
        lines += [f"  shape {s}" for s in shapes[:10]]
        lines += [f"  missing {k}" for k in missing[:10]]
        lines += [f"  unexpected {k}" for k in unexpected[:10]]
        raise ValueError("\n".join(lines))
    return model.load_state_dict(sd, strict=strict)

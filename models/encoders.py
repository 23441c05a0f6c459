"""REPA target encoders (frozen vision transformers from timm) behind REPA's ``--enc-type`` names.

``--enc-type`` is one name or several, comma-separated (``dinov2-vit-b,mae-vit-l``):

- ``dinov2-vit-{s,b,l,g}``: ``vit_{small,base,large,giant}_patch14_dinov2.lvd142m``
  (patch 14, dim 384 / 768 / 1024 / 1536);
- ``dinov2-vit-{s,b,l,g}-reg``: ``vit_{...}_patch14_reg4_dinov2.lvd142m`` (4 registers);
- ``mae-vit-{b,l,h}``: ``vit_base_patch16_224.mae``, ``vit_large_patch16_224.mae``,
  ``vit_huge_patch14_224.mae`` (dim 768 / 1024 / 1280);
- ``clip-vit-{b,l}``: ``vit_base_patch16_clip_224.openai``, ``vit_large_patch14_clip_224.openai``
  (dim 768 / 1024; the image tower, without its projection).

Names are case-insensitive (REPA spells ``clip-vit-L``).

Preprocessing is REPA's (``preprocess_raw_image``): uint8 -> /255 -> mean/std normalisation
(ImageNet's; OpenAI CLIP's for CLIP, applied after the resize as REPA does) -> bicubic resize
(half-pixel centres, no antialias) to ``patch * grid`` pixels with ``grid = resolution / 16``
tokens per side. That is 224 * resolution / 256 for the patch-14 models (DINOv2 sees 224 px at
256 and 448 px at 512: 16x16 and 32x32 tokens) and the image itself for patch-16 MAE (no resize,
as REPA). The model is built for that input size and its absolute position embedding is resampled
to the grid when the weights are loaded (timm's bicubic, antialiased resampling, as REPA does).
The output is the patch tokens after the final norm: (B, grid*grid, dim), with the class and
register tokens dropped.

Weights: nothing is downloaded. For enc type E with timm model NAME the loader looks, in order, at

1. ``weights_dir`` (when given):  ``NAME.safetensors``, ``NAME.pth``, ``NAME.pt``, ``NAME.bin``,
   ``NAME/model.safetensors``, ``NAME/pytorch_model.bin`` (what
   ``hf download timm/NAME --local-dir WEIGHTS_DIR/NAME`` writes), and the original
   release files: ``dinov2_vit{s,b,l,g}14[_reg4]_pretrain.pth`` (torch.hub's DINOv2, what REPA
   uses) and ``mae_pretrain_vit_{base,large,huge}.pth`` (MAE's, REPA's ``ckpts/``);
2. the local HF cache (``HF_HUB_CACHE`` / ``HF_HOME``): ``timm/NAME``'s ``model.safetensors``;
3. the torch.hub checkpoint folder (``$TORCH_HOME/hub/checkpoints``) for the original DINOv2 file.

``.safetensors`` files are read with safetensors, others with ``torch.load(weights_only=True)``;
timm's checkpoint filter converts original DINOv2 / MAE layouts and resamples the position
embedding. A missing file raises :class:`models.vae.WeightsNotFound` naming the timm model, the hub
repo, the ``hf download`` command and every path looked at.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from losses.alignment import align_tokens
from models.vae import WeightsNotFound

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

__all__ = ["ENCODERS", "EncoderSpec", "Encoder", "parse_enc_types", "encoder_grid",
           "find_weights", "load_encoders", "clear_encoder_cache", "align_tokens",
           "check_token_grid", "WeightsNotFound"]


@dataclass(frozen=True)
class EncoderSpec:
    enc_type: str
    timm_name: str
    family: str                      # dinov2 | mae | clip
    patch_size: int
    embed_dim: int
    original_files: tuple[str, ...] = ()

    @property
    def hub_repo(self) -> str:
        return f"timm/{self.timm_name}"

    @property
    def mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        return (CLIP_MEAN, CLIP_STD) if self.family == "clip" else (IMAGENET_MEAN, IMAGENET_STD)

    @property
    def resize_before_normalize(self) -> bool:
        return self.family == "clip"   # REPA's order; the two orders agree up to rounding


def _registry() -> dict[str, EncoderSpec]:
    reg = {}
    vit = {"s": ("small", 384), "b": ("base", 768), "l": ("large", 1024), "g": ("giant", 1536)}
    for c, (size, dim) in vit.items():
        reg[f"dinov2-vit-{c}"] = EncoderSpec(
            f"dinov2-vit-{c}", f"vit_{size}_patch14_dinov2.lvd142m", "dinov2", 14, dim,
            (f"dinov2_vit{c}14_pretrain.pth",))
        reg[f"dinov2-vit-{c}-reg"] = EncoderSpec(
            f"dinov2-vit-{c}-reg", f"vit_{size}_patch14_reg4_dinov2.lvd142m", "dinov2", 14, dim,
            (f"dinov2_vit{c}14_reg4_pretrain.pth",))
    for c, (name, patch, dim, orig) in {
            "b": ("vit_base_patch16_224.mae", 16, 768, "base"),
            "l": ("vit_large_patch16_224.mae", 16, 1024, "large"),
            "h": ("vit_huge_patch14_224.mae", 14, 1280, "huge")}.items():
        reg[f"mae-vit-{c}"] = EncoderSpec(f"mae-vit-{c}", name, "mae", patch, dim,
                                          (f"mae_pretrain_vit_{orig}.pth",))
    reg["clip-vit-b"] = EncoderSpec("clip-vit-b", "vit_base_patch16_clip_224.openai", "clip", 16,
                                    768)
    reg["clip-vit-l"] = EncoderSpec("clip-vit-l", "vit_large_patch14_clip_224.openai", "clip", 14,
                                    1024)
    return reg


ENCODERS: dict[str, EncoderSpec] = _registry()


def parse_enc_types(s: str | Iterable[str] | None) -> list[str]:
    """``"dinov2-vit-b, mae-vit-L"`` -> ``['dinov2-vit-b', 'mae-vit-l']``; '' / 'none' -> [].

    Case-insensitive; unknown or repeated names raise ValueError listing the choices.
    """
    if s is None:
        return []
    parts = s.split(",") if isinstance(s, str) else list(s)
    names = [p.strip().lower() for p in parts if p.strip()]
    if names == ["none"]:
        return []
    bad = [n for n in names if n not in ENCODERS]
    if bad:
        raise ValueError(f"unknown encoder type(s) {', '.join(map(repr, bad))}; choices: "
                         f"{', '.join(ENCODERS)} (comma-separated for several)")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"encoder type(s) given twice: {', '.join(dup)}")
    return names


def encoder_grid(resolution: int) -> int:
    """Tokens per side the encoders produce for images of ``resolution`` px: resolution / 16
    (16 at 256 px, 32 at 512 px; rounded, at least 1)."""
    if resolution < 1:
        raise ValueError(f"resolution must be positive, got {resolution}")
    return max(1, round(resolution / 16))


# ----------------------------------------------------------------------------------------------
# Finding weights.

def _hf_cache_dir() -> Path:
    """The HF hub cache as the environment says *now* (huggingface_hub reads it at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HUGGINGFACE_HUB_CACHE"):
        return Path(os.environ["HUGGINGFACE_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def _torch_hub_checkpoints() -> Path:
    home = os.environ.get("TORCH_HOME")
    if home:
        return Path(home).expanduser() / "hub" / "checkpoints"
    return Path(torch.hub.get_dir()) / "checkpoints"


def _candidates(spec: EncoderSpec, weights_dir: str | Path | None) -> list[tuple[str, Path]]:
    """(where, path) pairs in search order; HF cache entries are resolved snapshot paths or the
    repo folder that would hold them."""
    out: list[tuple[str, Path]] = []
    if weights_dir is not None:
        d = Path(weights_dir).expanduser()
        n = spec.timm_name
        for name in (f"{n}.safetensors", f"{n}.pth", f"{n}.pt", f"{n}.bin",
                     f"{n}/model.safetensors", f"{n}/pytorch_model.bin", *spec.original_files):
            out.append(("weights_dir", d / name))
    cache = _hf_cache_dir()
    for fname in ("model.safetensors", "pytorch_model.bin"):
        found = None
        try:
            from huggingface_hub import try_to_load_from_cache
            found = try_to_load_from_cache(spec.hub_repo, fname, cache_dir=cache)
        except Exception:   # an unreadable cache is the same as an empty one
            found = None
        if isinstance(found, str):
            out.append(("hf_cache", Path(found)))
        else:
            out.append(("hf_cache", cache / f"models--{spec.hub_repo.replace('/', '--')}"
                        / "snapshots" / "<revision>" / fname))
    if spec.family == "dinov2":
        for name in spec.original_files:
            out.append(("torch_hub", _torch_hub_checkpoints() / name))
    return out


def find_weights(enc_type: str, weights_dir: str | Path | None = None) -> Path:
    """The local weights file for ``enc_type`` (see the module docstring for the search order),
    or :class:`WeightsNotFound` with what to download and where to put it."""
    names = parse_enc_types(enc_type)
    if len(names) != 1:
        raise ValueError(f"find_weights takes one encoder type, got {enc_type!r}")
    spec = ENCODERS[names[0]]
    cands = _candidates(spec, weights_dir)
    for _, p in cands:
        if p.is_file():
            return p
    looked = "\n".join(f"  {p}" for _, p in cands)
    target = Path(weights_dir).expanduser() if weights_dir is not None else Path("WEIGHTS_DIR")
    raise WeightsNotFound(
        f"weights for encoder '{spec.enc_type}' (timm model {spec.timm_name}, hub repo "
        f"{spec.hub_repo}) are not on this machine. Looked for:\n{looked}\n"
        f"On a machine with network run:\n"
        f"  hf download {spec.hub_repo}\n"
        f"then copy the HF cache folder models--{spec.hub_repo.replace('/', '--')} into "
        f"{_hf_cache_dir()}, or put its model.safetensors at "
        f"{target / (spec.timm_name + '.safetensors')} and pass that folder as the encoder "
        f"weights directory. Nothing is downloaded at run time.")


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(obj).__name__}")
    for key in ("model", "state_dict"):
        if key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    return obj


# ----------------------------------------------------------------------------------------------
# The encoder module.

class Encoder(nn.Module):
    """A frozen timm ViT with REPA's preprocessing: uint8 (B, 3, H, W) -> (B, grid*grid, dim).

    Always in eval mode (``train()`` is a no-op) with ``requires_grad=False``; ``forward`` runs
    under ``torch.no_grad``. Preprocessing runs in fp32, the network in the weights' dtype.
    """

    def __init__(self, spec: EncoderSpec, model: nn.Module, resolution: int,
                 weights_path: Path | None = None):
        super().__init__()
        self.spec, self.enc_type, self.timm_name = spec, spec.enc_type, spec.timm_name
        self.model = model
        self.resolution = resolution
        self.grid = encoder_grid(resolution)
        self.patch_size = spec.patch_size
        self.input_size = self.grid * spec.patch_size
        self.num_tokens = self.grid * self.grid
        self.embed_dim = int(model.embed_dim)
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 1))
        self.weights_path = weights_path
        mean, std = spec.mean_std
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> "Encoder":
        return super().train(False)   # a target encoder never leaves eval mode

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (or float in 0..255) (B, 3, H, W) -> normalised fp32 (B, 3, S, S), S = input_size.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError("encoder input must be (B, 3, H, W) images, got "
                             f"{tuple(images.shape)}")
        x = images.to(device=self.mean.device, dtype=torch.float32) / 255.0
        size = (self.input_size, self.input_size)

        def resize(x):
            if tuple(x.shape[-2:]) == size:
                return x
            return F.interpolate(x, size=size, mode="bicubic", align_corners=False)

        if self.spec.resize_before_normalize:
            return (resize(x) - self.mean) / self.std
        return resize((x - self.mean) / self.std)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.preprocess(images).to(self.dtype)
        tokens = self.model.forward_features(x)
        return tokens[:, self.num_prefix_tokens:]

    def extra_repr(self) -> str:
        return (f"enc_type={self.enc_type}, timm={self.timm_name}, input={self.input_size}px, "
                f"grid={self.grid}x{self.grid}, dim={self.embed_dim}")


def _build(spec: EncoderSpec, resolution: int, path: Path,
           model_kwargs: dict | None) -> nn.Module:
    """Create the timm model for the target grid and load ``path`` into it (strict)."""
    import timm
    from timm.models.vision_transformer import checkpoint_filter_fn

    grid = encoder_grid(resolution)
    kwargs = dict(pretrained=False, num_classes=0, img_size=grid * spec.patch_size)
    kwargs.update(model_kwargs or {})
    # Build on the meta device (no random init of up to 1B parameters), then load by assignment.
    with torch.device("meta"):
        model = timm.create_model(spec.timm_name, **kwargs)
    sd = checkpoint_filter_fn(_read_state_dict(path), model)
    if not isinstance(getattr(model, "head", None), nn.Linear):
        sd = {k: v for k, v in sd.items() if not k.startswith("head.")}   # CLIP's projection
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        lines = [f"{path} does not fit timm model {spec.timm_name} ({spec.enc_type}"
                 f"{', ' + str(model_kwargs) if model_kwargs else ''}):"]
        lines += [f"  missing {k}" for k in missing[:10]]
        lines += [f"  unexpected {k}" for k in unexpected[:10]]
        lines += [f"  shape {s}" for s in shapes[:10]]
        raise ValueError("\n".join(lines))
    model.load_state_dict(sd, strict=True, assign=True)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
            if t.is_meta]
    if left:   # a buffer the file does not hold: fall back to a normal build
        model = timm.create_model(spec.timm_name, **kwargs)
        model.load_state_dict(sd, strict=True)
    return model


_CACHE: dict[tuple, Encoder] = {}


def clear_encoder_cache() -> None:
    """Forget the encoders loaded in this process (the next load reads the files again)."""
    _CACHE.clear()


def load_encoders(enc_types: str | Sequence[str], resolution: int,
                  device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                  weights_dir: str | Path | None = None, state=None,
                  model_kwargs: dict | None = None) -> list[Encoder]:
    """Load the encoders of ``enc_types`` (a comma-separated string or a list) for images of
    ``resolution`` px: frozen, eval mode, on ``device`` in ``dtype`` (e.g. torch.bfloat16).

    Each is loaded once per process (a second call with the same arguments and unchanged file
    returns the same module). ``state`` (an ``accelerate.PartialState``) makes the main process
    load first. ``model_kwargs`` are extra ``timm.create_model`` arguments (tests use
    ``{'depth': 2}``); the weights file must match them.
    """
    names = parse_enc_types(enc_types)
    ctx = state.main_process_first() if state is not None else contextlib.nullcontext()
    out = []
    with ctx:
        for name in names:
            spec = ENCODERS[name]
            path = find_weights(name, weights_dir)
            st = path.stat()
            key = (name, resolution, str(torch.device(device)), dtype, str(path.resolve()),
                   st.st_mtime_ns, st.st_size, tuple(sorted((model_kwargs or {}).items())))
            enc = _CACHE.get(key)
            if enc is None:
                model = _build(spec, resolution, path, model_kwargs)
                enc = Encoder(spec, model, resolution, path).to(device=device)
                enc.model.to(dtype=dtype)
                _CACHE[key] = enc
            out.append(enc)
    return out


def check_token_grid(encoder: Encoder, sit_grid: int) -> str:
    """Say how the encoder's tokens will meet SiT's ``sit_grid`` x ``sit_grid`` tokens (logged at
    start-up); the resize itself is :func:`align_tokens` (also applied by ``alignment_loss``)."""
    g = encoder.grid
    head = (f"{encoder.enc_type}: {encoder.input_size} px input -> {g}x{g} = {g * g} tokens of "
            f"dim {encoder.embed_dim}; SiT has {sit_grid}x{sit_grid} = {sit_grid ** 2} tokens")
    if sit_grid < 1:
        raise ValueError(f"SiT grid must be >= 1, got {sit_grid}")
    if g == sit_grid:
        return head + ": tokens align one to one"
    if sit_grid < g:
        how = (f"{g // sit_grid}x{g // sit_grid} average pooling" if g % sit_grid == 0
               else "adaptive area averaging")
        return head + f": targets are resized {g}x{g} -> {sit_grid}x{sit_grid} by {how}"
    return (head + f": targets are upsampled {g}x{g} -> {sit_grid}x{sit_grid} bilinearly "
            "(SiT has more tokens than the encoder; several SiT tokens share one target)")

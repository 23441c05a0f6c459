"""SD-VAE loading (local path or local HF cache only) and posterior moments."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch


class WeightsNotFound(FileNotFoundError):
    """Pretrained weights are not on this machine; the message says what to fetch and where."""


def _diffusers_autoencoder():
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise ImportError("the VAE needs the `diffusers` package: pip install diffusers "
                          "(or encode in pixel space with --vae none)") from None
    return AutoencoderKL


# Short names accepted by --vae (REPA / SiT / DispLoss use "ema" and "mse").
VAE_ALIASES = {"ema": "stabilityai/sd-vae-ft-ema", "mse": "stabilityai/sd-vae-ft-mse"}


def load_vae(spec: str, device: torch.device | str = "cpu") -> tuple[torch.nn.Module, dict]:
    """Load a diffusers AutoencoderKL from a local directory or the local HF cache.

    ``spec`` is a directory (with config.json + safetensors weights, or a ``vae/`` subfolder) or a
    hub id such as ``stabilityai/sd-vae-ft-ema`` that must already be in the HF cache: nothing is
    downloaded. Returns (vae in eval mode, frozen, fp32; a dict identifying the weights).
    """
    AutoencoderKL = _diffusers_autoencoder()
    path = Path(spec).expanduser()
    if path.is_dir():
        sub = "vae" if (path / "vae" / "config.json").is_file() and \
            not (path / "config.json").is_file() else None
        try:
            vae = AutoencoderKL.from_pretrained(path, subfolder=sub, use_safetensors=True)
        except (OSError, EnvironmentError, ValueError) as e:
            raise WeightsNotFound(f"could not load a VAE from {path}: {e}\nThe directory needs "
                                  "config.json and diffusion_pytorch_model.safetensors "
                                  "(as written by AutoencoderKL.save_pretrained).") from None
        wdir = path / sub if sub else path
        h = hashlib.sha256()
        for f in sorted(wdir.glob("*")):
            if f.is_file():
                h.update(f.name.encode())
                with open(f, "rb") as fh:
                    while block := fh.read(1 << 22):
                        h.update(block)
        ident = {"vae": str(path.resolve()), "revision": "sha256:" + h.hexdigest()}
    else:
        try:
            vae = AutoencoderKL.from_pretrained(spec, local_files_only=True, use_safetensors=True)
        except (OSError, EnvironmentError, ValueError):
            cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME") or \
                "~/.cache/huggingface"
            raise WeightsNotFound(
                f"VAE '{spec}' is neither a local directory nor in the local HF cache ({cache}).\n"
                f"On a machine with network run:  hf download {spec}\n"
                f"(or copy a directory with config.json + diffusion_pytorch_model.safetensors "
                f"and pass it as --vae DIR). Nothing is downloaded at run time.") from None
        ident = {"vae": spec, "revision": _cache_revision(spec)}
    vae = vae.to(device=device, dtype=torch.float32).eval().requires_grad_(False)
    ident["scaling_factor"] = float(getattr(vae.config, "scaling_factor", 0.18215))
    ident["latent_channels"] = int(vae.config.latent_channels)
    ident["downsample"] = 2 ** (len(vae.config.block_out_channels) - 1)
    return vae, ident


def _cache_revision(repo_id: str) -> str | None:
    """Commit hash of the cached snapshot (the folder name under snapshots/)."""
    try:
        from huggingface_hub import try_to_load_from_cache
        p = try_to_load_from_cache(repo_id, "config.json")
    except Exception:
        return None
    if isinstance(p, str) and "snapshots" in Path(p).parts:
        parts = Path(p).parts
        return parts[parts.index("snapshots") + 1]
    return None


@torch.no_grad()
def encode_moments(vae: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of images ``x`` in [-1, 1], (B, 3, H, W) -> 2 x (B, C, H/f, W/f)."""
    dist = vae.encode(x).latent_dist
    return dist.mean, dist.std

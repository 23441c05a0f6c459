"""Loading a trained run for sampling: the model and the settings to decode its samples, from a
run directory (``ema.safetensors`` + ``config.json``), a Hub model folder (``model.safetensors`` +
``config.json``, written by training/hub.py) or a Hub id found in the local HF cache, a weights
file next to a config.json, or a REPA/SiT-style checkpoint with the model described by overrides.
Used by generate.py, tools/ and bench/; generate.py's docstring states the checkpoint contract.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import torch.nn as nn

from common import UsageError, safetensors_checksum_problem

SIZE_KEYS = ("depth", "hidden_size", "num_heads", "patch_size")
HUB_WEIGHTS = "model.safetensors"  # a Hub model folder's weights (PyTorchModelHubMixin's name)
# "ORG/NAME" (both parts as the Hub allows): a --ckpt of this form that is not a local path is
# looked up in the local HF cache
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+$")


def cached_hub_model(repo_id: str) -> Path:
    """The folder of Hub model ``repo_id`` in the local HF cache (never the network)."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError
    try:
        folder = Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, ValueError):  # absent or incomplete; ValueError: a bad id
        folder = None
    if folder is None or not all((folder / f).is_file() for f in ("config.json", HUB_WEIGHTS)):
        raise UsageError(f"{repo_id} is not a local path, and the local Hugging Face cache "
                         f"({constants.HF_HUB_CACHE}) holds no Hub model {repo_id}; download it "
                         f"with: hf download {repo_id}")
    return folder


def resolve_checkpoint(ckpt: str) -> tuple[Path, dict | None]:
    """(weights file, config.json contents or None) of a run directory, a Hub model folder, a
    Hub id in the local HF cache or a weights file."""
    path = Path(ckpt).expanduser()
    if not path.exists() and HUB_ID.match(ckpt):
        path = cached_hub_model(ckpt)
    if path.is_dir():
        weights, cfg_path = path / "ema.safetensors", path / "config.json"
        if not weights.is_file() and (path / HUB_WEIGHTS).is_file() and cfg_path.is_file():
            weights = path / HUB_WEIGHTS  # a Hub model folder (training/hub.py)
        elif not weights.is_file():
            raise UsageError(f"run directory {path} has no ema.safetensors (nor is it a Hub "
                             f"model folder: config.json + {HUB_WEIGHTS})")
    elif path.is_file():
        weights, cfg_path = path, path.parent / "config.json"
    else:
        raise UsageError(f"checkpoint {path} does not exist")
    config = None
    if cfg_path.is_file():
        try:
            config = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise UsageError(f"{cfg_path} is not valid JSON: {e}") from None
    return weights, config


def model_size(name: str, model_kwargs: dict) -> tuple[dict, dict]:
    """(size, other SiT kwargs): the registered size of model ``name`` with the size overrides
    of ``model_kwargs`` (depth, hidden_size, ...) applied, and the rest of ``model_kwargs``."""
    from models.sit import get_model_config
    kwargs = dict(model_kwargs)
    size = get_model_config(name)
    size.update({k: kwargs.pop(k) for k in SIZE_KEYS if k in kwargs})
    return size, kwargs


def resolve_run(ckpt: str, *, model: str | None = None, vae: str | None = None,
                resolution: int | None = None, num_classes: int | None = None,
                qk_norm: bool | None = None, encoder_depth: int | None = None,
                projector_embed_dims: str | None = None, use_irepa: bool = False,
                path_type: str | None = None) -> dict:
    """Everything needed to build the model and decode, from config.json and the overrides
    (generate.py's flags of the same names; None: from config.json, else REPA's defaults)."""
    from models.sit import SiT_models
    from models.vae import VAE_ALIASES

    weights, config = resolve_checkpoint(ckpt)
    cfg = dict(config or {})
    model_name = model or cfg.get("model") or "SiT-XL/2"
    if model_name not in SiT_models:
        raise UsageError(f"unknown model {model_name!r}; known: {', '.join(SiT_models)}")
    kwargs = dict(cfg.get("model_kwargs") or {})
    if model and cfg.get("model") and model != cfg["model"]:
        for k in SIZE_KEYS:
            kwargs.pop(k, None)
    size, kwargs = model_size(model_name, kwargs)

    if vae is not None:
        vae = None if vae.lower() in ("none", "null", "pixel") else VAE_ALIASES.get(vae, vae)
    elif config is not None:
        vae = cfg.get("vae")
    else:
        vae = VAE_ALIASES["ema"]
    if config is not None and "input_size" in cfg:
        input_size = int(cfg["input_size"])
    else:
        res = resolution or 256
        input_size = res // 8 if vae else res
    in_channels = int(cfg.get("in_channels", 4 if vae else 3))
    num_classes = num_classes or int(cfg.get("num_classes", 1000))
    if qk_norm is not None:
        kwargs["qk_norm"] = qk_norm
    if encoder_depth is not None:
        kwargs["encoder_depth"] = encoder_depth
    if projector_embed_dims:
        kwargs["z_dims"] = [int(z) for z in projector_embed_dims.split(",") if z]
    if use_irepa:
        kwargs["projector_type"] = "conv"
    return {"weights": weights, "config": config, "model": model_name, "size": size,
            "model_kwargs": kwargs, "input_size": input_size, "in_channels": in_channels,
            "num_classes": num_classes, "vae": vae,
            "latent_scale": cfg.get("latent_scale", 0.18215),
            "latent_bias": cfg.get("latent_bias", 0.0),
            "path_type": path_type or cfg.get("path_type", "linear")}


def build_model(run: dict, device: torch.device | str = "cpu") -> nn.Module:
    """The SiT of a resolved run with its weights, in eval mode without gradients."""
    from models.sit import (SiT, convert_sit_state_dict, load_checkpoint, projector_kwargs,
                            read_checkpoint)

    kwargs = dict(run["model_kwargs"])
    weights = Path(run["weights"])
    problem = weights.suffix == ".safetensors" and safetensors_checksum_problem(weights)
    if problem:  # train.py's exports carry a sha256 of their tensor data
        raise UsageError(f"{problem}; sample from a checkpoint's ema.safetensors instead, or "
                         f"resume the run to write a fresh export")
    try:
        stored = read_checkpoint(run["weights"])  # read once: the file can be gigabytes
    except Exception as e:  # unreadable / corrupt file
        raise UsageError(f"cannot read checkpoint {run['weights']}: {e}") from None
    if any(k.startswith("h_embedder.") for k in stored):
        kwargs.setdefault("meanflow", True)  # a MeanFlow model (its interval embedder is stored)
    if not any(".projectors." in "." + k for k in stored):
        kwargs.pop("z_dims", None)  # no projectors stored (e.g. our ema.safetensors)
    elif "z_dims" not in kwargs and run["config"] is None:
        # REPA / iREPA checkpoints carry projectors: build them so the strict load can match.
        stored = convert_sit_state_dict(stored, run["in_channels"], run["size"]["patch_size"])
        try:
            for k, v in projector_kwargs(stored).items():
                kwargs.setdefault(k, v)
        except ValueError as e:
            raise UsageError(f"{run['weights']}: {e}") from None
    try:
        model = SiT(input_size=run["input_size"], in_channels=run["in_channels"],
                    num_classes=run["num_classes"], **run["size"], **kwargs)
    except (TypeError, ValueError) as e:
        raise UsageError(f"cannot build {run['model']} with {kwargs}: {e}") from None
    try:
        load_checkpoint(model, stored)
    except (ValueError, KeyError) as e:
        raise UsageError(f"checkpoint {run['weights']} does not match model {run['model']}: {e}"
                         ) from None
    return model.to(device).eval().requires_grad_(False)


def load_run(ckpt: str, device: torch.device | str = "cpu", **overrides) -> tuple[nn.Module, dict]:
    """(model, run) of a trained run: the EMA SiT in eval mode on ``device`` and the resolved
    settings (:func:`resolve_run`; ``overrides`` as its keywords)."""
    run = resolve_run(ckpt, **overrides)
    return build_model(run, device), run

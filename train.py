#!/usr/bin/env python
"""Train SiT on encoded shards: ``accelerate launch train.py ...`` (or plain ``python train.py``).

One function, :func:`train`, reads top to bottom: set-up, data, model, losses, optimizer, resume,
then the loop (batch -> losses -> backward -> step -> EMA -> log -> sample -> checkpoint).
Flags come from :class:`configs.TrainingConfig` (REPA/StableVM/DispLoss names accepted).

Run directory ``OUTPUT_DIR/EXP_NAME``::

    config.json            model/data contract read by generate.py + the resolved training config
    ema.safetensors        EMA weights of the latest checkpoint (no projectors), for sampling
    log.jsonl              one JSON line per logging step
    samples/step-N.png     sample grids from the EMA model (eval mode, fixed noise and labels)
    logs/                  tensorboard / wandb tracker files
    checkpoints/step-N/    accelerate state (model, optimizer, RNG) + ema.safetensors,
                           rank-R.json (step, data position, grad scaler), bank-R.safetensors

Exact resume: every random number of step n (posterior sample, label dropout, t, noise, StableVM
draws) comes from a generator seeded with (seed, rank, n, micro-batch), and the data position,
EMA, bank and scaler are in the checkpoint, so a resumed run repeats the uninterrupted run's
losses bit for bit on CPU. Checkpoints are written to a temporary directory and renamed.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import re
import shutil
import signal
import sys
import time
from pathlib import Path

import torch

from configs import TrainingConfig, parse_config

CKPT_RE = re.compile(r"^step-(\d{7,})$")
# Fields that fix the model, the data stream or the random streams: a resumed run must match.
RESUME_KEYS = ("model", "depth", "hidden_size", "num_heads", "qk_norm", "num_classes",
               "path_type", "loss_type", "bank_capacity_per_class", "enc_type", "use_proj_loss",
               "projector_type", "projector_dim", "projector_kernel_size", "encoder_depth",
               "use_irepa", "batch_size", "gradient_accumulation_steps", "seed", "hflip",
               "latent_norm", "mixed_precision")


class UsageError(Exception):
    """A problem the user can fix: printed without traceback, exit status 2."""


# ----------------------------------------------------------------------------------------------
# Small helpers (pure, or file-level); the loop itself is in train().

def lr_at(step: int, cfg: TrainingConfig, total: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup, then constant/cosine."""
    if cfg.lr_warmup_steps > 0 and step < cfg.lr_warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.lr_warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.learning_rate
    span = max(1, total - cfg.lr_warmup_steps)
    progress = min(1.0, (step - cfg.lr_warmup_steps) / span)
    return cfg.lr_min + 0.5 * (cfg.learning_rate - cfg.lr_min) * (1 + math.cos(math.pi * progress))


def ema_decay_at(step: int, cfg: TrainingConfig) -> float:
    """EMA decay after ``step`` optimizer steps (1-based)."""
    if cfg.ema_warmup:
        return min(cfg.ema_decay, (1 + step) / (10 + step))
    return cfg.ema_decay


@torch.no_grad()
def ema_update(ema_params: list[torch.Tensor], params: list[torch.Tensor], decay: float) -> None:
    """ema = decay * ema + (1 - decay) * param, one fused kernel per dtype/device group."""
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)


def endless(loader):
    """Batches of epoch after epoch; the loader itself remembers where it is (for resume)."""
    while True:
        yield from loader


def default_exp_name(cfg: TrainingConfig) -> str:
    parts = [cfg.model.replace("/", "-"), cfg.loss_type]
    if cfg.disp:
        parts.append("disp")
    if cfg.use_proj_loss:
        parts.append("irepa" if cfg.use_irepa else "repa")
    return "-".join(parts)


def list_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """Finished checkpoints (renamed from their temporary name), oldest first."""
    if not ckpt_dir.is_dir():
        return []
    out = []
    for p in ckpt_dir.iterdir():
        m = CKPT_RE.match(p.name)
        if m and p.is_dir() and (p / "rank-0.json").is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def find_resume(spec: str | None, resume_step: int, ckpt_dir: Path) -> Path | None:
    """The checkpoint named by --resume (latest | step number | path) or REPA's --resume-step."""
    if not spec and resume_step:
        spec = str(resume_step)
    if not spec:
        return None
    found = list_checkpoints(ckpt_dir)
    if spec == "latest":
        return found[-1][1] if found else None  # nothing yet: start fresh
    if spec.isdigit():
        for step, p in found:
            if step == int(spec):
                return p
        raise UsageError(f"no checkpoint of step {spec} in {ckpt_dir} (have: "
                         f"{[s for s, _ in found] or 'none'})")
    p = Path(spec)
    if not (p / "rank-0.json").is_file():
        raise UsageError(f"{p} is not a finished checkpoint directory (no rank-0.json)")
    return p


def atomic_write_text(path: Path, text: str) -> None:
    from preprocessing.shards import atomic_write_bytes
    atomic_write_bytes(path, text.encode())


def save_safetensors_atomic(tensors: dict[str, torch.Tensor], path: Path,
                            metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save
    from preprocessing.shards import atomic_write_bytes
    cpu = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write_bytes(path, save(cpu, metadata=metadata))


def sampling_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The EMA weights generate.py needs (projectors are training-only)."""
    return {k: v for k, v in model.state_dict().items() if not k.startswith("projectors.")}


def write_grid(images: torch.Tensor, path: Path, min_cell: int = 48, pad: int = 2) -> None:
    """uint8 (N, H, W, 3) -> one PNG grid, cells upscaled (nearest) to at least ``min_cell`` px
    and separated by ``pad`` grey pixels; written atomically."""
    import io

    from PIL import Image

    from preprocessing.shards import atomic_write_bytes
    n, h, w, _ = images.shape
    up = max(1, min_cell // max(h, w))
    cells = images.permute(0, 3, 1, 2).repeat_interleave(up, 2).repeat_interleave(up, 3)
    ch, cw = h * up, w * up
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = torch.full((3, rows * (ch + pad) + pad, cols * (cw + pad) + pad), 128, dtype=torch.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        y, x = pad + r * (ch + pad), pad + c * (cw + pad)
        grid[:, y:y + ch, x:x + cw] = cells[i]
    buf = io.BytesIO()
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _tracker(report_to: str) -> str | None:
    """Resolve --report-to to an accelerate tracker name, with a clear message when missing."""
    import importlib.util
    if report_to == "none":
        return None
    has_tb = any(importlib.util.find_spec(m) for m in ("tensorboard", "tensorboardX"))
    if report_to == "auto":
        return "tensorboard" if has_tb else None
    if report_to == "tensorboard" and not has_tb:
        raise UsageError("--report-to tensorboard needs the tensorboard package: "
                         "pip install tensorboard (or use --report-to none)")
    if report_to == "wandb" and importlib.util.find_spec("wandb") is None:
        raise UsageError("--report-to wandb needs the wandb package: pip install wandb "
                         "(or use --report-to tensorboard / none)")
    return report_to


def resolve(cfg: TrainingConfig, given: set[str], manifest: dict | None) -> TrainingConfig:
    """Fill the fields that depend on each other or on the data, and check them."""
    from models.sit import SiT_models
    if cfg.model not in SiT_models:
        raise UsageError(f"unknown model {cfg.model!r}; known: {', '.join(SiT_models)}")
    if cfg.enc_type and cfg.proj_coeff > 0 and "use_proj_loss" not in given:
        cfg.use_proj_loss = True  # REPA: giving --enc-type turns the alignment term on
    if cfg.use_proj_loss and not cfg.enc_type:
        cfg.enc_type = "dinov2-vit-b"
    if cfg.use_irepa and "projector_type" not in given:
        cfg.projector_type = "conv"
    if manifest is not None:
        if cfg.resolution is not None and cfg.resolution != manifest["resolution"]:
            raise UsageError(f"--resolution {cfg.resolution} but the shards in {cfg.data_dir} were "
                             f"encoded at {manifest['resolution']} px; re-encode or drop the flag")
        cfg.resolution = manifest["resolution"]
        if cfg.num_classes is not None and cfg.num_classes != manifest["num_classes"]:
            raise UsageError(f"--num-classes {cfg.num_classes} but the shards have "
                             f"{manifest['num_classes']} classes")
        cfg.num_classes = manifest["num_classes"]
        if cfg.vae is None and manifest.get("vae"):
            cfg.vae = manifest["vae"]["vae"]
    if cfg.wandb:
        cfg.report_to = "wandb"
    from models.vae import VAE_ALIASES
    cfg.vae = VAE_ALIASES.get(cfg.vae, cfg.vae)
    if cfg.ckpt and not Path(cfg.ckpt).exists():
        raise UsageError(f"--ckpt {cfg.ckpt} does not exist")
    if cfg.ckpt and not cfg.resume and Path(cfg.ckpt).is_dir():
        cfg.resume = cfg.ckpt  # SiT/DispLoss: --ckpt names what to continue from
    if cfg.use_proj_loss:
        from models.sit import get_model_config
        depth = cfg.depth or get_model_config(cfg.model)["depth"]
        if not 1 <= cfg.encoder_depth <= depth:
            raise UsageError(f"--encoder-depth {cfg.encoder_depth} is outside 1..{depth} (the "
                             f"projectors read the output of that block of a depth-{depth} model)")
    if cfg.exp_name is None:
        cfg.exp_name = default_exp_name(cfg)
    for name in ("batch_size", "gradient_accumulation_steps", "max_train_steps", "log_every",
                 "checkpointing_steps", "bank_capacity_per_class", "num_sample_images"):
        if getattr(cfg, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if not 0.0 <= cfg.cfg_prob <= 1.0:
        raise UsageError(f"--cfg-prob must be in [0, 1], got {cfg.cfg_prob}")
    return cfg


def _fail_early(cfg: TrainingConfig) -> dict:
    """Read the manifest (or say what is wrong with --data-dir)."""
    from preprocessing.shards import ShardFormatError, read_manifest
    if not cfg.data_dir:
        raise UsageError("--data-dir is required (a shard directory written by "
                         "preprocessing/encode.py)")
    try:
        return read_manifest(cfg.data_dir)
    except (FileNotFoundError, ShardFormatError, ValueError) as e:
        raise UsageError(f"cannot read shards in {cfg.data_dir}: {e}") from None


# ----------------------------------------------------------------------------------------------
# The training run.

def train(cfg: TrainingConfig, given: set[str] | None = None) -> dict:
    """Run the training described by ``cfg``; returns a summary (final step, last losses)."""
    given = set(given or ())
    manifest = _fail_early(cfg)
    cfg = resolve(cfg, given, manifest)

    # -- processes, devices, numerics -----------------------------------------------------------
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    import runtime
    run_dir = Path(cfg.output_dir) / cfg.exp_name
    tracker = _tracker(cfg.report_to)
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(), log_with=tracker,
        project_config=ProjectConfiguration(project_dir=str(run_dir),
                                            logging_dir=str(run_dir / cfg.logging_dir)))
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    is_main = accelerator.is_main_process
    accum = cfg.gradient_accumulation_steps
    if cfg.batch_size % (world * accum):
        raise UsageError(f"--batch-size {cfg.batch_size} is not divisible by {world} processes x "
                         f"{accum} accumulation steps")
    micro_batch = cfg.batch_size // (world * accum)
    switches = runtime.configure(device, cfg.allow_tf32, cfg.mixed_precision, cfg.compile)

    def say(msg: str) -> None:
        if is_main:
            print(msg, flush=True)

    # -- data -----------------------------------------------------------------------------------
    from preprocessing.shards import ShardDataset, ShardLoader, mix_seed
    try:
        dataset = ShardDataset(cfg.data_dir, cfg.latent_norm, with_images=cfg.use_proj_loss)
    except ValueError as e:  # e.g. REPA without stored images
        raise UsageError(f"{e}") from None
    loader = ShardLoader(dataset, micro_batch, rank=rank, world_size=world, seed=cfg.seed,
                         hflip=cfg.hflip, output="raw", num_threads=max(1, cfg.num_workers))
    steps_per_epoch = len(loader) // accum
    if cfg.epochs is not None:
        cfg.max_train_steps = cfg.epochs * steps_per_epoch
    latent_shape = dataset.latent_shape
    if steps_per_epoch < 1:
        raise UsageError(f"{len(dataset)} samples cannot fill one optimizer step of "
                         f"{cfg.batch_size} samples")

    # -- model (identical init on every rank), EMA ----------------------------------------------
    from models.sit import SiT_models
    encoders = []
    if cfg.use_proj_loss:
        from models.encoders import check_token_grid, load_encoders
        from models.vae import WeightsNotFound
        enc_dtype = torch.bfloat16 if cfg.mixed_precision == "bf16" else torch.float32
        try:
            encoders = load_encoders(cfg.enc_type, cfg.resolution, device, enc_dtype,
                                     cfg.encoder_weights_dir, state=accelerator.state)
        except (WeightsNotFound, FileNotFoundError, KeyError, ValueError) as e:
            raise UsageError(str(e)) from None
    size = {k: v for k, v in (("depth", cfg.depth), ("hidden_size", cfg.hidden_size),
                              ("num_heads", cfg.num_heads)) if v is not None}
    model_kwargs = dict(size, qk_norm=cfg.qk_norm)
    proj_kwargs = {}
    if encoders:
        proj_kwargs = dict(z_dims=[e.embed_dim for e in encoders], encoder_depth=cfg.encoder_depth,
                           projector_dim=cfg.projector_dim, projector_type=cfg.projector_type,
                           projector_kernel_size=cfg.projector_kernel_size)
    torch.manual_seed(cfg.seed)
    try:
        model = SiT_models[cfg.model](input_size=latent_shape[1], in_channels=latent_shape[0],
                                      num_classes=cfg.num_classes, **model_kwargs, **proj_kwargs)
    except ValueError as e:
        raise UsageError(f"{cfg.model} does not fit the shards in {cfg.data_dir} "
                         f"({latent_shape[0]} channels, {latent_shape[1]}x{latent_shape[2]}): {e}"
                         ) from None
    if cfg.ckpt and Path(cfg.ckpt).is_file():
        from models.sit import load_checkpoint
        try:  # projectors may differ (e.g. REPA weights into a run without REPA)
            load_checkpoint(model, cfg.ckpt, strict=False)
        except (ValueError, KeyError, OSError) as e:
            raise UsageError(f"--ckpt {cfg.ckpt}: {e}") from None
        say(f"initialised the model (and EMA) from {cfg.ckpt}")
    depth = model.depth
    for enc in encoders:
        say(check_token_grid(enc, model.grid))
    from training import dispersive_from_config, step_generator
    try:
        disp = dispersive_from_config(cfg, depth)
        if disp is not None:
            disp.feature_blocks(depth)
    except ValueError as e:
        raise UsageError(f"--disp: {e}") from None
    align = None
    if encoders:
        from losses.objective import AlignmentTerm
        align = AlignmentTerm(cfg.proj_coeff, cfg.proj_weight_schedule, cfg.proj_tau, cfg.proj_k,
                              cfg.irepa_gamma if cfg.use_irepa else None)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    model.train()
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    macs = model.forward_macs()
    if cfg.compile:
        model.compile()  # in place: state-dict names stay free of "_orig_mod."

    # -- optimizer ------------------------------------------------------------------------------
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate,
                                  betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon,
                                  fused=switches["fused_adamw"] or None)
    model, optimizer = accelerator.prepare(model, optimizer)
    raw_model = accelerator.unwrap_model(model)
    ema.to(device)
    ema_params = [p for p, q in zip(ema.parameters(), raw_model.parameters()) if q.requires_grad]
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.mixed_precision == "fp16")

    # -- StableVM bank --------------------------------------------------------------------------
    bank = None
    if cfg.loss_type == "stablevm":
        from losses import MemoryBank
        bank = MemoryBank(cfg.num_classes, latent_shape, cfg.bank_capacity_per_class,
                          device=device, store_indices=True)

    # -- run directory, resume ------------------------------------------------------------------
    ckpt_dir = run_dir / "checkpoints"
    resume_from = find_resume(cfg.resume, cfg.resume_step, ckpt_dir)
    saved_cfg_path = run_dir / "config.json"
    if resume_from is None and list_checkpoints(ckpt_dir):
        raise UsageError(f"{run_dir} already has checkpoints; pass --resume latest to continue "
                         "it or choose another --exp-name / --output-dir")
    if resume_from is not None:
        n = len(list(resume_from.glob("rank-*.json")))
        if n != world:  # each process resumes its own data position and bank
            raise UsageError(f"{resume_from} was written by {n} process(es); resume it with the "
                             f"same number (now {world})")
    if resume_from is not None and saved_cfg_path.is_file():
        old = json.loads(saved_cfg_path.read_text()).get("train", {})
        diff = [f"{k}: {old.get(k)!r} -> {getattr(cfg, k)!r}" for k in RESUME_KEYS
                if k in old and old[k] != getattr(cfg, k)]
        if diff:
            raise UsageError(f"cannot resume {run_dir} with a different configuration:\n  "
                             + "\n  ".join(diff))
    run_config = {
        "model": cfg.model, "input_size": latent_shape[1], "in_channels": latent_shape[0],
        "num_classes": cfg.num_classes, "model_kwargs": model_kwargs, "vae": cfg.vae,
        "latent_scale": dataset.scale.flatten().tolist(),
        "latent_bias": dataset.bias.flatten().tolist(), "path_type": cfg.path_type,
        "train": cfg.to_dict(), "runtime": switches, "world_size": world,
        "micro_batch_size": micro_batch, "parameters": n_params, "data": {
            "dir": str(cfg.data_dir), "count": len(dataset), "key": dataset.key,
            "config_sha256": manifest.get("config_sha256")},
    }
    say(json.dumps(run_config, indent=2))
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(saved_cfg_path, json.dumps(run_config, indent=2) + "\n")
    accelerator.wait_for_everyone()

    step = 0
    if resume_from is not None:
        mine = json.loads((resume_from / f"rank-{rank}.json").read_text())
        try:
            loader.load_state_dict(mine["loader"])
        except ValueError as e:  # another batch size, seed or dataset
            raise UsageError(f"{resume_from}: {e}") from None
        accelerator.load_state(str(resume_from))
        from safetensors.torch import load_file
        ema.load_state_dict(load_file(resume_from / "ema.safetensors"))  # copies onto device
        step = int(mine["step"])
        if mine.get("scaler"):
            scaler.load_state_dict(mine["scaler"])
        if bank is not None:
            bank.load_state_dict(load_file(resume_from / f"bank-{rank}.safetensors"))
        say(f"resumed from {resume_from} at step {step}")
    log_path = run_dir / "log.jsonl"
    if is_main and log_path.is_file():
        # Keep the log true to the resumed history: drop lines written after the checkpoint.
        kept = [ln for ln in log_path.read_text().splitlines()
                if ln.strip() and json.loads(ln).get("step", 0) <= step]
        atomic_write_text(log_path, "".join(ln + "\n" for ln in kept))

    def checkpoint(step: int) -> None:
        """Write checkpoints/step-N atomically (temp dir, then rename) and keep the last K."""
        final = ckpt_dir / f"step-{step:07d}"
        tmp = ckpt_dir / f".tmp-step-{step:07d}"
        if is_main:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            for stale in ckpt_dir.glob(".tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        if os.environ.get("TRAIN_TEST_KILL_IN_CHECKPOINT") == str(step):
            os.kill(os.getpid(), signal.SIGKILL)  # test hook: die with a half-written checkpoint
        state = {"step": step, "loader": loader.state_dict(),
                 "scaler": scaler.state_dict() if scaler.is_enabled() else None}
        atomic_write_text(tmp / f"rank-{rank}.json", json.dumps(state))
        if bank is not None:
            save_safetensors_atomic(bank.state_dict(), tmp / f"bank-{rank}.safetensors")
        if is_main:
            save_safetensors_atomic(ema.state_dict(), tmp / "ema.safetensors")
        accelerator.wait_for_everyone()
        if is_main:
            os.replace(tmp, final)
            save_safetensors_atomic(sampling_state_dict(ema), run_dir / "ema.safetensors",
                                    metadata={"step": str(step)})
            limit = cfg.checkpoints_total_limit
            old = list_checkpoints(ckpt_dir)
            for _, p in (old[:-limit] if limit > 0 else []):
                doomed = p.with_name(".tmp-delete-" + p.name)
                os.replace(p, doomed)  # a half-deleted checkpoint never looks finished
                shutil.rmtree(doomed, ignore_errors=True)
        accelerator.wait_for_everyone()

    # -- sample grid from the EMA model ---------------------------------------------------------
    vae_for_grid = None
    grid_warned = False

    def sample_grid(step: int) -> None:
        nonlocal vae_for_grid, grid_warned
        out_path = run_dir / "samples" / f"step-{step:07d}.png"
        if not is_main or out_path.is_file():  # e.g. a rerun of a finished run
            return
        from samplers import images_to_uint8, sample_ode
        if cfg.vae and vae_for_grid is None:
            from models.vae import WeightsNotFound, load_vae
            try:
                vae_for_grid, _ = load_vae(cfg.vae, device)
            except (WeightsNotFound, ImportError) as e:
                if not grid_warned:
                    say(f"sample grids skipped: {e}")
                    grid_warned = True
                return
        n = cfg.num_sample_images
        labels = torch.arange(n, device=device) % cfg.num_classes
        out = sample_ode(ema, (n, *latent_shape), num_steps=cfg.sample_num_steps,
                         cfg_scale=cfg.sample_cfg_scale, y=labels, seed=cfg.seed,
                         path_type=cfg.path_type, vae=vae_for_grid,
                         latent_scale=dataset.scale.flatten(), latent_bias=dataset.bias.flatten())
        images = out["images"] if isinstance(out, dict) else out.clamp(-1, 1)
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        (run_dir / "samples").mkdir(exist_ok=True)
        write_grid(images_to_uint8(images), out_path)

    # -- trackers -------------------------------------------------------------------------------
    if tracker is not None:
        flat = {k: (v if isinstance(v, (int, float, str, bool)) else str(v))
                for k, v in cfg.to_dict().items()}
        init_kwargs = {}
        if tracker == "wandb":
            import wandb
            if os.environ.get("WANDB_KEY"):
                wandb.login(key=os.environ["WANDB_KEY"])
            init_kwargs = {"wandb": {"entity": os.environ.get("WANDB_ENTITY"),
                                     "name": cfg.exp_name}}
        accelerator.init_trackers(os.environ.get("WANDB_PROJECT", cfg.exp_name)
                                  if tracker == "wandb" else cfg.exp_name,
                                  config=flat, init_kwargs=init_kwargs)
    # -- the loop -------------------------------------------------------------------------------
    from losses import build_stablevm_batch
    from losses.objective import si_batch, training_losses
    from tqdm.auto import tqdm

    data = endless(loader)
    peak = (cfg.peak_tflops * 1e12 if cfg.peak_tflops else
            runtime.peak_flops(device, cfg.mixed_precision, cfg.allow_tf32))
    window: dict[str, torch.Tensor] = {}
    window_steps, skipped = 0, torch.zeros((), device=device)
    last_logged: dict = {}
    t_window = time.perf_counter()
    bar = tqdm(total=cfg.max_train_steps, initial=step, desc="train", unit="step",
               disable=not is_main, dynamic_ncols=True)
    say(f"{cfg.model} ({n_params / 1e6:.2f}M trainable parameters), {world} process(es) x "
        f"{micro_batch} x {accum} accumulation = batch {cfg.batch_size}; "
        f"{steps_per_epoch} steps per epoch; {len(dataset)} samples")

    if bank is not None and step == 0:
        # Prefill from a separate stream so the training data order does not depend on it.
        prefill_loader = ShardLoader(dataset, micro_batch, rank=rank, world_size=world,
                                     seed=mix_seed(cfg.seed, 0xBA4C), hflip=cfg.hflip, output="raw")
        g = step_generator(cfg.seed, rank, -1, 0xF111, device)  # its own stream
        mode = "full" if cfg.prefill_bank_fully else "one_per_class"
        try:
            info = bank.prefill(
                endless(prefill_loader), mode,
                latents_fn=lambda b: loader.to_latents(b["x"].to(device), g),
                max_batches=100 * (len(prefill_loader) + 1))
        except RuntimeError as e:
            raise UsageError(str(e)) from None
        say(f"StableVM bank prefilled ({mode}): {info['samples']} samples; {bank}")

    while step < cfg.max_train_steps:
        lr = lr_at(step, cfg, cfg.max_train_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        for micro in range(accum):
            batch = next(data)
            g = step_generator(cfg.seed, rank, step, micro, device)
            x = loader.to_latents(batch["x"].to(device, non_blocking=True), g)
            y = batch["y"].to(device, non_blocking=True)
            images = batch.get("image")
            if bank is None:
                b = si_batch(x, y, num_classes=cfg.num_classes, cfg_prob=cfg.cfg_prob,
                             path_type=cfg.path_type, time_sampler=cfg.weighting,
                             time_shift=cfg.time_shift, generator=g)
            else:
                code = batch["position"] * 2 + batch["flip"].long()  # re-read pixels later
                bank.push(x, y, code)
                b = build_stablevm_batch(
                    bank, cfg.num_classes, x.shape[0], cfg.cfg_prob, cfg.path_type, g,
                    time_sampler=lambda n, gen: _times(n, gen, cfg),
                    split=cfg.stablevm_split, efficient=cfg.stablevm_efficient, device=device)
                if encoders:
                    images = _bank_images(dataset, b["indices"])
            targets = None
            if encoders:
                with torch.no_grad():
                    imgs = images.to(device, non_blocking=True)
                    targets = [enc(imgs) for enc in encoders]
            sync = contextlib.nullcontext() if micro == accum - 1 else accelerator.no_sync(model)
            with sync:
                with runtime.autocast(device, cfg.mixed_precision):
                    terms = training_losses(model, b, depth=depth, path_type=cfg.path_type,
                                            disp=disp, align=align, align_targets=targets)
                scaler.scale(terms["loss"] / accum).backward()
            for k, v in terms.items():
                window[k] = window.get(k, 0) + v.detach().float() / accum
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(
            trainable, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
        scaler.step(optimizer)  # skipped by the scaler when the fp16 gradients are not finite
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        ema_update(ema_params, trainable, ema_decay_at(step + 1, cfg))
        skipped += (~torch.isfinite(grad_norm)).float()
        window["grad_norm"] = window.get("grad_norm", 0) + grad_norm.detach().float()
        step += 1
        window_steps += 1
        bar.update(1)

        # -- logging (the only host sync of a step) --------------------------------------------
        if step % cfg.log_every == 0 or step == cfg.max_train_steps:
            names = sorted(window)
            vals = torch.stack([window[k] for k in names]) / window_steps
            vals = accelerator.reduce(vals, reduction="mean")
            elapsed = time.perf_counter() - t_window
            img_s = window_steps * cfg.batch_size / elapsed
            rec = {"step": step, **{k: float(v) for k, v in zip(names, vals.tolist())},
                   "lr": lr, "img_per_s": img_s, "epoch": loader.epoch,
                   "skipped_steps": int(accelerator.reduce(skipped, "sum").item()),
                   "memory_mb": memory_mb(device)}
            if scaler.is_enabled():
                rec["loss_scale"] = scaler.get_scale()
            if peak:
                rec["mfu"] = 6 * macs * img_s / world / peak  # fwd+bwd = 3x fwd; 2 FLOP/MAC
            nonfinite = [k for k in ("loss", "si") if not math.isfinite(rec.get(k, 0.0))]
            if nonfinite and not scaler.is_enabled() and is_main:
                raise RuntimeError(f"non-finite loss at step {step}: {rec}; the last checkpoint "
                                   f"is in {ckpt_dir}")
            if is_main:
                with open(log_path, "a") as fh:
                    fh.write(json.dumps(rec) + "\n")
                bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{lr:.2e}",
                                img_s=f"{img_s:.0f}")
            accelerator.log({k: v for k, v in rec.items() if k != "step"}, step=step)
            last_logged = rec
            window, window_steps = {}, 0
            t_window = time.perf_counter()

        if cfg.sampling_steps > 0 and step % cfg.sampling_steps == 0:
            sample_grid(step)
        if step % cfg.checkpointing_steps == 0 or step == cfg.max_train_steps:
            checkpoint(step)
            t_window = time.perf_counter()

    bar.close()
    if cfg.sampling_steps == 0 or step % cfg.sampling_steps:
        sample_grid(step)
    if not (ckpt_dir / f"step-{step:07d}").is_dir():
        checkpoint(step)  # e.g. resumed at the final step with a new limit
    accelerator.wait_for_everyone()
    accelerator.end_training()
    say(f"done: step {step}, run directory {run_dir}")
    return {"step": step, "run_dir": str(run_dir), "last": last_logged}


def _times(n: int, generator: torch.Generator, cfg: TrainingConfig) -> torch.Tensor:
    from losses import sample_time
    return sample_time(n, cfg.weighting, path_type=cfg.path_type, shift=cfg.time_shift,
                       generator=generator)


def _bank_images(dataset, codes: torch.Tensor) -> torch.Tensor:
    """uint8 images of the bank entries ``codes`` (= position * 2 + flip), in the given order."""
    import numpy as np
    codes = codes.cpu().numpy()
    if (codes < 0).any():
        raise RuntimeError("a StableVM bank entry has no dataset index (cannot read its pixels)")
    pos, flip = codes // 2, (codes % 2).astype(bool)
    got = dataset.gather(pos, torch.from_numpy(flip), with_images=True)
    # gather returns rows sorted by (position, flip); put them back in the requested order
    order = np.argsort(codes, kind="stable")
    inverse = np.empty_like(order)
    inverse[order] = np.arange(order.size)
    return got["image"][torch.from_numpy(inverse)]


def main(argv: list[str] | None = None) -> int:
    cfg, given = parse_config(argv)
    try:
        if cfg.dry_run:
            manifest = None
            if cfg.data_dir and (Path(cfg.data_dir) / "manifest.json").is_file():
                manifest = _fail_early(cfg)
            cfg = resolve(cfg, given, manifest)
            print(cfg.to_json())
            return 0
        train(cfg, given)
    except UsageError as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

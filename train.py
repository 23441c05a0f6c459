#!/usr/bin/env python
"""Train SiT on encoded shards: ``accelerate launch train.py ...`` (or plain ``python train.py``).

The file reads top to bottom in the order of a run: resolve the configuration, build the run
(:func:`build_run`: accelerator, data, model, EMA, optimizer, objective), start or resume it
(:class:`Checkpointer`), then :func:`train`'s loop, one screen long, around :func:`train_step`.
Flags come from :class:`configs.TrainingConfig` (REPA/StableVM/DispLoss names accepted).

Run directory ``OUTPUT_DIR/EXP_NAME``::

    config.json            model/data contract read by generate.py + the resolved training config
    ema.safetensors        EMA weights of the latest checkpoint (no projectors), for sampling
    log.txt                what the run printed (all starts and resumes, appended)
    log.jsonl              one JSON line per logging step
    samples/step-N.png     sample grids from the EMA model (eval mode, fixed noise and labels)
    logs/                  tensorboard / wandb tracker files
    checkpoints/step-N/    accelerate state (model, optimizer, RNG) + ema.safetensors,
                           rank-R.json (step, data position, grad scaler, open log window),
                           bank-R.safetensors

Exact resume: every random number of step n (posterior sample, label dropout, t, noise, StableVM
draws) comes from a generator seeded with (seed, rank, n, micro-batch), and the data position,
EMA, bank and scaler are in the checkpoint, so a resumed run repeats the uninterrupted run's
losses bit for bit on CPU (docs/CONVENTIONS.md §8). Checkpoints are written to a temporary
directory and renamed.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import pickle
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn as nn

import runtime
from common import (UsageError, atomic_write_bytes, atomic_write_text, ema_decay, ema_update,
                    mix_seed, save_safetensors_atomic, sha256_file)
from configs import TrainingConfig, parse_config
from losses import (DispersiveLoss, MemoryBank, MeanFlowLoss, build_stablevm_batch,
                    meanflow_batch, meanflow_losses, sample_time)
from losses.objective import AlignmentTerm, training_losses
from preprocessing.shards import (ShardDataset, ShardFormatError, ShardLoader, hash_problems,
                                  read_manifest)
from training import dispersive_from_config, noisy_batch, step_generator

CKPT_RE = re.compile(r"^step-(\d{7,})$")
LAUNCHER_PRECISION_ENV = "ACCELERATE_MIXED_PRECISION"  # set by `accelerate launch` / its config


# ----------------------------------------------------------------------------------------------
# Configuration: fill what depends on the data or on other fields, and check it.

def lr_at(step: int, cfg: TrainingConfig, total: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup, then constant/cosine."""
    if cfg.lr_warmup_steps > 0 and step < cfg.lr_warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.lr_warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.learning_rate
    span = max(1, total - cfg.lr_warmup_steps)
    progress = min(1.0, (step - cfg.lr_warmup_steps) / span)
    return cfg.lr_min + 0.5 * (cfg.learning_rate - cfg.lr_min) * (1 + math.cos(math.pi * progress))


def default_exp_name(cfg: TrainingConfig) -> str:
    parts = [cfg.model.replace("/", "-"), cfg.loss_type]
    if cfg.disp:
        parts.append("disp")
    if cfg.use_proj_loss:
        parts.append("irepa" if cfg.use_irepa else "repa")
    return "-".join(parts)


def launcher_precision() -> str | None:
    """The mixed precision ``accelerate launch`` (flag or ``accelerate config``) asks for; None
    when it asks for none. The launcher always sets the variable, "no" by default, so "no" cannot
    be told apart from "not given" and defers to ``--mixed-precision``."""
    value = os.environ.get(LAUNCHER_PRECISION_ENV, "no").strip().lower()
    return None if value in ("", "no") else value


def resolve_precision(cfg: TrainingConfig, given: set[str]) -> None:
    """One source of truth for mixed precision: the launcher's value and ``--mixed-precision``
    agree, or the run stops. The launcher's value wins over a preset's or the default."""
    launcher = launcher_precision()
    if launcher is None:
        return
    if launcher not in runtime.PRECISIONS:
        raise UsageError(f"accelerate launch asks for mixed precision {launcher!r}; train.py "
                         f"supports {', '.join(runtime.PRECISIONS)}")
    if "mixed_precision" in given and cfg.mixed_precision != launcher:
        raise UsageError(f"accelerate launch asks for mixed precision {launcher!r} but "
                         f"--mixed-precision is {cfg.mixed_precision!r}; give one of them (or "
                         f"the same value to both)")
    cfg.mixed_precision = launcher


def resolve(cfg: TrainingConfig, given: set[str], manifest: dict | None) -> TrainingConfig:
    """Fill the fields that depend on each other or on the data, and check them."""
    from models.sit import SiT_models, get_model_config
    from models.vae import VAE_ALIASES
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
    resolve_precision(cfg, given)
    cfg.vae = VAE_ALIASES.get(cfg.vae, cfg.vae)
    if cfg.ckpt and not Path(cfg.ckpt).exists():
        raise UsageError(f"--ckpt {cfg.ckpt} does not exist")
    if cfg.ckpt and not cfg.resume and Path(cfg.ckpt).is_dir():
        cfg.resume = cfg.ckpt  # SiT/DispLoss: --ckpt names what to continue from
    if cfg.loss_type == "meanflow":
        check_meanflow(cfg, given)
    if cfg.contrastive != "none":
        check_contrastive(cfg)
    if cfg.use_proj_loss:
        depth = cfg.depth or get_model_config(cfg.model)["depth"]
        if not 1 <= cfg.encoder_depth <= depth:
            raise UsageError(f"--encoder-depth {cfg.encoder_depth} is outside 1..{depth} (the "
                             f"projectors read the output of that block of a depth-{depth} model)")
    if cfg.exp_name is None:
        cfg.exp_name = default_exp_name(cfg)
    check_ranges(cfg)
    return cfg


_COUNTS = ("batch_size", "gradient_accumulation_steps", "max_train_steps", "log_every",
           "checkpointing_steps", "bank_capacity_per_class", "num_sample_images",
           "sample_num_steps", "max_consecutive_skips")
# (field, test, what it must be): comparisons are False for NaN, so NaN is refused too
_RANGES = tuple((name, lambda v: v >= 1, ">= 1") for name in _COUNTS) + (
    ("cfg_prob", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("learning_rate", lambda v: v > 0, "> 0"), ("lr_min", lambda v: v >= 0, ">= 0"),
    ("lr_warmup_steps", lambda v: v >= 0, ">= 0"),
    ("adam_beta1", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("adam_beta2", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("adam_epsilon", lambda v: v > 0, "> 0"), ("adam_weight_decay", lambda v: v >= 0, ">= 0"),
    ("max_grad_norm", lambda v: v >= 0, ">= 0 (0 disables clipping)"),
    ("ema_decay", lambda v: 0 <= v <= 1, "in [0, 1]"), ("time_shift", lambda v: v > 0, "> 0"),
    ("disp_lambda", lambda v: v >= 0, ">= 0"), ("disp_tau", lambda v: v > 0, "> 0"),
    ("proj_coeff", lambda v: v >= 0, ">= 0"),
    ("stablevm_split", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("sample_cfg_scale", lambda v: v >= 0, ">= 0 (1 = no guidance)"),
    ("checkpoints_total_limit", lambda v: v >= 0, ">= 0 (0 keeps all)"),
)


def check_ranges(cfg: TrainingConfig) -> None:
    """One clear line for a numeric flag outside its meaningful range (before torch sees it)."""
    for name, ok, what in _RANGES:
        value = getattr(cfg, name)
        if not ok(value):
            raise UsageError(f"--{name.replace('_', '-')} must be {what}, got {value}")


def check_meanflow(cfg: TrainingConfig, given: set[str]) -> None:
    """What MeanFlow cannot be combined with here, said before anything starts."""
    bank = sorted(k for k in ("bank_capacity_per_class", "prefill_bank_fully", "stablevm_split",
                              "stablevm_efficient") if k in given)
    if bank:
        raise UsageError(
            f"--loss-type meanflow does not use the StableVM memory bank ({', '.join(bank)}): "
            "MeanFlow's target is built from each sample's own velocity v = eps - x (the "
            "tangent of its JVP along that sample's path), which StableVM replaces by an "
            "average over the bank; use --loss-type stablevm for the bank")
    if cfg.path_type != "linear":
        raise UsageError("--loss-type meanflow is defined on the linear path (z_t = (1-t) x + "
                         "t eps): drop --path-type cosine")
    for name in ("time_sigma", "adaptive_c"):
        if not getattr(cfg, name) > 0:
            raise UsageError(f"--{name.replace('_', '-')} must be > 0, got {getattr(cfg, name)}")
    if not 0 <= cfg.ratio_r_not_equal_t <= 1 or not cfg.adaptive_p >= 0:
        raise UsageError("need 0 <= --ratio-r-not-equal-t <= 1 and --adaptive-p >= 0")
    if not 0 <= cfg.cfg_kappa < 1 or not 0 <= cfg.cfg_min_t <= cfg.cfg_max_t <= 1:
        raise UsageError(f"need 0 <= --cfg-kappa < 1 and 0 <= --cfg-min-t <= --cfg-max-t <= 1, got "
                         f"kappa {cfg.cfg_kappa}, [{cfg.cfg_min_t}, {cfg.cfg_max_t}]")


def check_contrastive(cfg: TrainingConfig) -> None:
    """What the contrastive baseline cannot be combined with, said before anything starts."""
    if cfg.disp:
        raise UsageError(f"--contrastive {cfg.contrastive} replaces --disp (its negative term is "
                         "the dispersive form); give one of them")
    if cfg.loss_type != "si":
        raise UsageError(f"--contrastive needs --loss-type si (got {cfg.loss_type}): its two "
                         "views are two noisings of the loader's images")
    if not 0 <= cfg.contrastive_delta <= 1:
        raise UsageError(f"--contrastive-delta must be in [0, 1], got {cfg.contrastive_delta}")
    if cfg.contrastive_noise == "independent" and cfg.contrastive_delta:
        raise UsageError("--contrastive-delta only applies to --contrastive-noise restricted")
    if cfg.disp_gather:
        raise UsageError("--disp-gather is not supported with --contrastive (local negatives)")


def read_data_manifest(cfg: TrainingConfig) -> dict:
    """The shards' manifest (or a clear message about what is wrong with --data-dir)."""
    if not cfg.data_dir:
        raise UsageError("--data-dir is required (a shard directory written by "
                         "preprocessing/encode.py)")
    try:
        return read_manifest(cfg.data_dir)
    except (FileNotFoundError, ShardFormatError, ValueError) as e:
        raise UsageError(f"cannot read shards in {cfg.data_dir}: {e}") from None


# ----------------------------------------------------------------------------------------------
# Console and trackers.

class Console:
    """Prints on the main process and keeps a copy in RUN_DIR/log.txt (as DiT/REPA's logger).

    Lines said before the run directory may be written (checks still running) are buffered and
    written by :meth:`attach`.
    """

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.path: Path | None = None
        self.pending: list[str] = []

    def __call__(self, msg: str) -> None:
        if not self.enabled:
            return
        print(msg, flush=True)
        if self.path is None:
            self.pending.append(msg)
        else:
            with open(self.path, "a") as f:
                f.write(msg + "\n")

    def attach(self, path: Path) -> None:
        if not self.enabled:
            return
        self.path = path
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        with open(path, "a") as f:
            f.write(f"---- {stamp} train.py {' '.join(sys.argv[1:])}\n")
            f.writelines(m + "\n" for m in self.pending)
        self.pending = []


def tracker_name(report_to: str) -> str | None:
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


def start_trackers(run: "Run") -> None:
    """Open the tracker (files under RUN_DIR/logs, wandb's too) with the flat config."""
    cfg, accelerator = run.cfg, run.accelerator
    tracker = tracker_name(cfg.report_to)
    if tracker is None:
        return
    flat = {k: (v if isinstance(v, (int, float, str, bool)) else str(v))
            for k, v in cfg.to_dict().items()}
    init_kwargs = {}
    if tracker == "wandb":
        import wandb
        if os.environ.get("WANDB_KEY"):
            wandb.login(key=os.environ["WANDB_KEY"])
        log_dir = run.run_dir / cfg.logging_dir
        if run.is_main:
            log_dir.mkdir(parents=True, exist_ok=True)
        # dir: wandb writes its files (offline runs included) in the run dir, not the cwd
        init_kwargs = {"wandb": {"entity": os.environ.get("WANDB_ENTITY"), "name": cfg.exp_name,
                                 "dir": str(log_dir)}}
    project = os.environ.get("WANDB_PROJECT", cfg.exp_name) if tracker == "wandb" else cfg.exp_name
    accelerator.init_trackers(project, config=flat, init_kwargs=init_kwargs)


def log_image(accelerator, tag: str, image: np.ndarray, step: int) -> None:
    """Send one uint8 (H, W, 3) image to every open tracker (tensorboard, wandb)."""
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({tag: image[None]}, step, dataformats="NHWC")
        elif tracker.name == "wandb":
            tracker.log_images({tag: [image]}, step)


def write_grid(images: torch.Tensor, path: Path, min_cell: int = 48, pad: int = 2) -> np.ndarray:
    """uint8 (N, H, W, 3) -> one PNG grid, cells upscaled (nearest) to at least ``min_cell`` px
    and separated by ``pad`` grey pixels; written atomically. Returns the grid (H, W, 3)."""
    import io

    from PIL import Image
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
    array = grid.permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
    return array


def memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# ----------------------------------------------------------------------------------------------
# The objective: turn a batch from the loader into the loss terms (SI, StableVM or MeanFlow, with
# the dispersive and REPA terms).

class Objective:
    """Makes the training batch of the configured objective and returns its named loss terms.

    SI: noise the loader's latents (:func:`training.noisy_batch`: one view, or two for the
    contrastive baseline). StableVM: push them into
    the memory bank and draw the batch from it (:func:`losses.build_stablevm_batch`). MeanFlow:
    draw (t, r) and noise (:func:`losses.meanflow_batch`); the target is a JVP through the plain
    module. With REPA the frozen encoders' features of the batch's images are the alignment
    targets.
    """

    def __init__(self, cfg: TrainingConfig, loader: ShardLoader, depth: int, device: torch.device,
                 encoders: list, bank: MemoryBank | None, raw_model: nn.Module):
        self.cfg, self.loader, self.depth, self.device = cfg, loader, depth, device
        self.encoders, self.bank = encoders, bank
        # MeanFlow's stop-gradient target: one JVP through the plain module's forward (no DDP,
        # no compiled graph: forward-mode AD needs the eager code)
        self.raw_forward = raw_model.forward
        self.mf = None
        if cfg.loss_type == "meanflow":
            self.mf = MeanFlowLoss(
                p=cfg.adaptive_p, c=cfg.adaptive_c, time_mu=cfg.time_mu, time_sigma=cfg.time_sigma,
                equal_fraction=1.0 - cfg.ratio_r_not_equal_t, cfg_w=cfg.cfg_omega,
                cfg_kappa=cfg.cfg_kappa, cfg_t_lo=cfg.cfg_min_t, cfg_t_hi=cfg.cfg_max_t)
        try:
            self.disp: DispersiveLoss | None = dispersive_from_config(cfg, depth)
            if self.disp is not None:
                self.disp.feature_blocks(depth)
        except ValueError as e:
            flag = "--contrastive" if cfg.contrastive != "none" else "--disp"
            raise UsageError(f"{flag}: {e}") from None
        self.align = None
        if encoders:
            self.align = AlignmentTerm(cfg.proj_coeff, cfg.proj_weight_schedule, cfg.proj_tau,
                                       cfg.proj_k, cfg.irepa_gamma if cfg.use_irepa else None)

    def _times(self, n: int, generator: torch.Generator) -> torch.Tensor:
        cfg = self.cfg
        return sample_time(n, cfg.weighting, path_type=cfg.path_type, shift=cfg.time_shift,
                           generator=generator)

    def batch(self, raw: dict, g: torch.Generator) -> tuple[dict, list | None]:
        """The noisy batch (x_t, t, y, target, ...) and the encoders' targets (or None)."""
        cfg, device = self.cfg, self.device
        x = self.loader.to_latents(raw["x"].to(device, non_blocking=True), g)
        y = raw["y"].to(device, non_blocking=True)
        images = raw.get("image")
        if self.mf is not None:
            b = meanflow_batch(x, y, num_classes=cfg.num_classes, cfg_prob=cfg.cfg_prob,
                               mf=self.mf, path_type=cfg.path_type, generator=g)
        elif self.bank is None:
            b = noisy_batch(cfg, x, y, cfg.num_classes, g)
            if images is not None and cfg.contrastive != "none":
                images = torch.cat([images, images])  # both views align to the same image
        else:
            code = raw["position"] * 2 + raw["flip"].long()  # to re-read the pixels later
            self.bank.push(x, y, code)
            b = build_stablevm_batch(self.bank, cfg.num_classes, x.shape[0], cfg.cfg_prob,
                                     cfg.path_type, g, time_sampler=self._times,
                                     split=cfg.stablevm_split, efficient=cfg.stablevm_efficient,
                                     device=device)
            if self.encoders:
                images = bank_images(self.loader.ds, b["indices"])
        if not self.encoders:
            return b, None
        with torch.no_grad():
            imgs = images.to(device, non_blocking=True)
            return b, [enc(imgs) for enc in self.encoders]

    def losses(self, model: nn.Module, b: dict, targets: list | None) -> dict[str, torch.Tensor]:
        with runtime.autocast(self.device, self.cfg.mixed_precision):
            if self.mf is not None:
                return meanflow_losses(model, self.raw_forward, b, depth=self.depth, mf=self.mf,
                                       disp=self.disp, null_label=self.cfg.num_classes,
                                       align=self.align, align_targets=targets)
            return training_losses(model, b, depth=self.depth, path_type=self.cfg.path_type,
                                   disp=self.disp, align=self.align, align_targets=targets)

    def prefill_bank(self, run: "Run") -> None:
        """Fill the StableVM bank before step 0 from its own data stream, so the training data
        order does not depend on it."""
        cfg = self.cfg
        prefill_loader = ShardLoader(run.dataset, run.micro_batch, rank=run.rank,
                                     world_size=run.world, seed=mix_seed(cfg.seed, 0xBA4C),
                                     hflip=cfg.hflip, output="raw")
        g = step_generator(cfg.seed, run.rank, -1, 0xF111, self.device)
        mode = "full" if cfg.prefill_bank_fully else "one_per_class"
        try:
            info = self.bank.prefill(
                endless(prefill_loader), mode,
                latents_fn=lambda b: self.loader.to_latents(b["x"].to(self.device), g),
                max_batches=100 * (len(prefill_loader) + 1))
        except RuntimeError as e:
            raise UsageError(str(e)) from None
        run.say(f"StableVM bank prefilled ({mode}): {info['samples']} samples; {self.bank}")


def bank_images(dataset: ShardDataset, codes: torch.Tensor) -> torch.Tensor:
    """uint8 images of the bank entries ``codes`` (= position * 2 + flip), in the given order."""
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


def endless(loader) -> Iterator[dict]:
    """Batches of epoch after epoch; the loader itself remembers where it is (for resume)."""
    while True:
        yield from loader


# ----------------------------------------------------------------------------------------------
# Building the run: accelerator, data, model + EMA, optimizer, objective.

@dataclass
class Run:
    """Everything the loop needs, built once by :func:`build_run`."""
    cfg: TrainingConfig
    accelerator: object
    say: Console
    run_dir: Path
    switches: dict
    micro_batch: int
    dataset: ShardDataset
    loader: ShardLoader
    model: nn.Module            # as prepared by accelerate (DDP-wrapped / compiled)
    ema: nn.Module
    ema_params: list
    trainable: list
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    objective: Objective
    model_kwargs: dict
    n_params: int
    macs: int
    manifest_sha: str | None    # identifies the shards' encoding settings (config.json)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process


def make_accelerator(cfg: TrainingConfig, run_dir: Path):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    # mixed_precision="no" for accelerate itself: runtime.autocast applies cfg.mixed_precision
    # (resolved with the launcher's value) and our GradScaler scales fp16, on CPU as on GPU.
    return Accelerator(
        cpu=not torch.cuda.is_available(), mixed_precision="no",
        log_with=tracker_name(cfg.report_to),
        project_config=ProjectConfiguration(project_dir=str(run_dir),
                                            logging_dir=str(run_dir / cfg.logging_dir)))


def make_data(cfg: TrainingConfig, micro_batch: int, rank: int, world: int
              ) -> tuple[ShardDataset, ShardLoader]:
    try:
        dataset = ShardDataset(cfg.data_dir, cfg.latent_norm, with_images=cfg.use_proj_loss)
    except (ValueError, ShardFormatError, OSError) as e:  # REPA without images, damaged shards
        raise UsageError(f"{e}") from None
    loader = ShardLoader(dataset, micro_batch, rank=rank, world_size=world, seed=cfg.seed,
                         hflip=cfg.hflip, output="raw", num_threads=max(1, cfg.num_workers))
    steps_per_epoch = len(loader) // cfg.gradient_accumulation_steps
    if steps_per_epoch < 1:
        raise UsageError(f"{len(dataset)} samples cannot fill one optimizer step of "
                         f"{cfg.batch_size} samples")
    if cfg.epochs is not None:
        cfg.max_train_steps = cfg.epochs * steps_per_epoch
    return dataset, loader


def verify_shards(cfg: TrainingConfig, dataset: ShardDataset, accelerator, say: "Console"
                  ) -> None:
    """Check every shard's sha256 against the manifest before training reads it: each process
    hashes every world-th shard, and all of them learn every problem (one line per shard)."""
    from accelerate.utils import gather_object
    if not cfg.verify_shards:
        return
    t0 = time.perf_counter()
    n, rank, world = len(dataset.manifest["shards"]), accelerator.process_index, \
        accelerator.num_processes
    mine = hash_problems(dataset.root, dataset.manifest, range(rank, n, world))
    problems = sorted(gather_object(mine)) if world > 1 else mine
    if problems:
        raise UsageError("the shards do not match their manifest (re-encode them: rerun the "
                         "encode command, which redoes damaged shards):\n  "
                         + "\n  ".join(problems))
    say(f"verified {n} shard(s) against the manifest in {time.perf_counter() - t0:.1f}s")


def make_model(cfg: TrainingConfig, dataset: ShardDataset, accelerator, say: Console
               ) -> tuple[nn.Module, list, dict]:
    """SiT (identical init on every rank), the frozen REPA encoders, and the model kwargs that
    generate.py needs to rebuild it."""
    from models.sit import SiT_models, load_checkpoint
    encoders = []
    if cfg.use_proj_loss:
        from models.encoders import check_token_grid, load_encoders
        from models.vae import WeightsNotFound
        enc_dtype = torch.bfloat16 if cfg.mixed_precision == "bf16" else torch.float32
        try:
            encoders = load_encoders(cfg.enc_type, cfg.resolution, accelerator.device, enc_dtype,
                                     cfg.encoder_weights_dir, state=accelerator.state)
        except (WeightsNotFound, FileNotFoundError, KeyError, ValueError) as e:
            raise UsageError(str(e)) from None
    size = {k: v for k, v in (("depth", cfg.depth), ("hidden_size", cfg.hidden_size),
                              ("num_heads", cfg.num_heads)) if v is not None}
    model_kwargs = dict(size, qk_norm=cfg.qk_norm)
    if cfg.loss_type == "meanflow":
        model_kwargs["meanflow"] = True  # the interval embedder; config.json tells generate.py
    proj_kwargs = {}
    if encoders:
        proj_kwargs = dict(z_dims=[e.embed_dim for e in encoders], encoder_depth=cfg.encoder_depth,
                           projector_dim=cfg.projector_dim, projector_type=cfg.projector_type,
                           projector_kernel_size=cfg.projector_kernel_size)
    c, h, w = dataset.latent_shape
    torch.manual_seed(cfg.seed)
    try:
        model = SiT_models[cfg.model](input_size=h, in_channels=c, num_classes=cfg.num_classes,
                                      **model_kwargs, **proj_kwargs)
    except ValueError as e:
        raise UsageError(f"{cfg.model} does not fit the shards in {cfg.data_dir} ({c} channels, "
                         f"{h}x{w}): {e}") from None
    if cfg.ckpt and Path(cfg.ckpt).is_file():
        try:  # projectors may differ (e.g. REPA weights into a run without REPA)
            missing = load_checkpoint(model, cfg.ckpt, strict=False).missing_keys
        except (ValueError, KeyError, OSError) as e:
            raise UsageError(f"--ckpt {cfg.ckpt}: {e}") from None
        # e.g. a SiT checkpoint into a MeanFlow run: h_embedder starts at zero (u = v at step 0)
        fresh = sorted({k.split(".")[0] for k in missing})
        say(f"initialised the model (and EMA) from {cfg.ckpt}"
            + (f"; not in it, left at their initialisation: {', '.join(fresh)}" if fresh else ""))
    for enc in encoders:
        say(check_token_grid(enc, model.grid))
    return model, encoders, model_kwargs


def build_run(cfg: TrainingConfig, given: set[str]) -> Run:
    """Resolve ``cfg`` against the data and build every object of the run (nothing is written)."""
    manifest = read_data_manifest(cfg)
    cfg = resolve(cfg, given, manifest)
    run_dir = Path(cfg.output_dir) / cfg.exp_name
    accelerator = make_accelerator(cfg, run_dir)
    world, accum = accelerator.num_processes, cfg.gradient_accumulation_steps
    if cfg.batch_size % (world * accum):
        raise UsageError(f"--batch-size {cfg.batch_size} is not divisible by {world} processes x "
                         f"{accum} accumulation steps")
    micro_batch = cfg.batch_size // (world * accum)
    device = accelerator.device
    switches = runtime.configure(device, cfg.allow_tf32, cfg.mixed_precision, cfg.compile)
    say = Console(accelerator.is_main_process)
    dataset, loader = make_data(cfg, micro_batch, accelerator.process_index, world)
    verify_shards(cfg, dataset, accelerator, say)

    model, encoders, model_kwargs = make_model(cfg, dataset, accelerator, say)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    model.train()
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    macs, depth = model.forward_macs(), model.depth
    if cfg.compile:
        model.compile()  # in place: state-dict names stay free of "_orig_mod."

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

    bank = None
    if cfg.loss_type == "stablevm":
        bank = MemoryBank(cfg.num_classes, dataset.latent_shape, cfg.bank_capacity_per_class,
                          device=device, store_indices=True)
    objective = Objective(cfg, loader, depth, device, encoders, bank, raw_model)
    return Run(cfg=cfg, accelerator=accelerator, say=say, run_dir=run_dir, switches=switches,
               micro_batch=micro_batch, dataset=dataset, loader=loader, model=model, ema=ema,
               ema_params=ema_params, trainable=trainable, optimizer=optimizer, scaler=scaler,
               objective=objective, model_kwargs=model_kwargs, n_params=n_params, macs=macs,
               manifest_sha=manifest.get("config_sha256"))


def run_config(run: Run) -> dict:
    """config.json: the model/data contract generate.py reads, plus the resolved training config."""
    cfg, ds = run.cfg, run.dataset
    c, h, _ = ds.latent_shape
    return {
        "model": cfg.model, "input_size": h, "in_channels": c, "num_classes": cfg.num_classes,
        "model_kwargs": run.model_kwargs, "vae": cfg.vae,
        "latent_scale": ds.scale.flatten().tolist(), "latent_bias": ds.bias.flatten().tolist(),
        "path_type": cfg.path_type, "train": cfg.to_dict(), "runtime": run.switches,
        "world_size": run.world, "micro_batch_size": run.micro_batch, "parameters": run.n_params,
        "data": {"dir": str(cfg.data_dir), "count": len(ds), "key": ds.key,
                 "config_sha256": run.manifest_sha},
    }


def summary(run: Run) -> str:
    """The few lines a run prints at start (config.json has the rest)."""
    cfg, ds = run.cfg, run.dataset
    terms = [cfg.loss_type] + (["disp"] if cfg.disp else []) + (
        [f"contrastive {cfg.contrastive} ({cfg.contrastive_noise} noise)"]
        if cfg.contrastive != "none" else []) + (
        ["irepa" if cfg.use_irepa else "repa"] if cfg.use_proj_loss else [])
    source = " (from accelerate launch)" if launcher_precision() else ""
    arch = ", ".join(f"{k} {v}" for k, v in run.model_kwargs.items() if k != "qk_norm")
    accum = cfg.gradient_accumulation_steps
    return "\n".join([
        f"model    {cfg.model}{f' ({arch})' if arch else ''}: {run.n_params / 1e6:.2f}M "
        f"trainable parameters; objective {' + '.join(terms)}",
        f"data     {cfg.data_dir}: {len(ds)} samples of {'x'.join(map(str, ds.latent_shape))}, "
        f"{cfg.num_classes} classes",
        f"batch    {cfg.batch_size} = {run.world} process(es) x {run.micro_batch} x {accum} "
        f"accumulation; {len(run.loader) // accum} steps per epoch; {cfg.max_train_steps} steps "
        f"at lr {cfg.learning_rate:g}",
        f"numerics {run.device}, precision {cfg.mixed_precision}{source}, "
        f"TF32 {'on' if run.switches['tf32'] else 'off'}, compile {'on' if cfg.compile else 'off'}",
        f"run dir  {run.run_dir} (config.json has the full configuration)",
    ])


# ----------------------------------------------------------------------------------------------
# Checkpoints: find, verify, check, load, save, prune.

CHECKSUMS = "checksums.json"  # written last: a checkpoint without it is not complete

# What a resume may change. FIXED_KEYS fix the model, the data stream or the random streams (the
# checkpoint's state depends on them): never. FREE_KEYS are bookkeeping, not the run's maths:
# freely (config.json still records the change). Everything else changes the objective, data or
# optimizer: refused unless --allow-config-change.
FIXED_KEYS = frozenset({
    "model", "depth", "hidden_size", "num_heads", "qk_norm", "num_classes", "path_type",
    "loss_type", "bank_capacity_per_class", "enc_type", "use_proj_loss", "projector_type",
    "projector_dim", "projector_kernel_size", "encoder_depth", "use_irepa", "batch_size",
    "gradient_accumulation_steps", "seed", "hflip", "latent_norm", "mixed_precision",
    "resolution"})
FREE_KEYS = frozenset({
    "output_dir", "exp_name", "resume", "resume_step", "ckpt", "dry_run", "max_train_steps",
    "epochs", "checkpointing_steps", "checkpoints_total_limit", "log_every", "report_to",
    "logging_dir", "wandb", "sampling_steps", "sample_num_steps", "sample_cfg_scale",
    "num_sample_images", "eval_every", "eval_samples", "eval_num_steps", "eval_cfg_scale",
    "eval_reference", "inception", "vae", "peak_tflops", "num_workers", "compile",
    "verify_shards", "encoder_weights_dir", "allow_config_change", "max_consecutive_skips",
    "fused_attn", "legacy", "allow_tf32"})


def list_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (renamed from their temporary name, checksums written), oldest
    first."""
    if not ckpt_dir.is_dir():
        return []
    out = []
    for p in ckpt_dir.iterdir():
        m = CKPT_RE.match(p.name)
        if m and p.is_dir() and (p / CHECKSUMS).is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def resume_candidates(spec: str | None, resume_step: int, ckpt_dir: Path) -> list[Path]:
    """Checkpoints to try for --resume (latest | step number | path) or REPA's --resume-step:
    for ``latest`` every complete one, newest first (a damaged one falls back to the previous);
    a named one alone."""
    if not spec and resume_step:
        spec = str(resume_step)
    if not spec:
        return []
    found = list_checkpoints(ckpt_dir)
    if spec == "latest":
        return [p for _, p in reversed(found)]  # nothing yet: start fresh
    if spec.isdigit():
        for step, p in found:
            if step == int(spec):
                return [p]
        raise UsageError(f"no complete checkpoint of step {spec} in {ckpt_dir} (have: "
                         f"{[s for s, _ in found] or 'none'})")
    p = Path(spec)
    if not (p / CHECKSUMS).is_file():
        raise UsageError(f"{p} is not a complete checkpoint directory (no {CHECKSUMS})")
    return [p]


def checkpoint_problem(path: Path, world: int) -> str | None:
    """Why the checkpoint at ``path`` cannot be resumed by ``world`` processes (None: intact)."""
    try:
        record = json.loads((path / CHECKSUMS).read_text())
        files = record["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{CHECKSUMS} is unreadable ({e})"
    if record.get("world_size") != world:  # each process resumes its own data position and bank
        raise UsageError(f"{path} was written by {record.get('world_size')} process(es); resume "
                         f"it with the same number (now {world})")
    for name, digest in sorted(files.items()):
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if sha256_file(f) != digest:
            return f"{name} does not match its checksum"
    return None


def settings_changes(old: dict, new: dict) -> dict[str, tuple]:
    """{field: (old, new)} of the training settings that differ."""
    return {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
            if k != "history" and old.get(k) != new.get(k)}


def sampling_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The EMA weights generate.py needs (projectors are training-only)."""
    return {k: v for k, v in model.state_dict().items() if not k.startswith("projectors.")}


class Checkpointer:
    """checkpoints/step-N: written to a temporary directory with a checksum of every file, then
    renamed; the last K kept. :meth:`start` begins or resumes a run all-or-nothing: every check
    (settings, data, checkpoint integrity, loading into memory) runs before the run directory is
    written to."""

    def __init__(self, run: Run):
        self.run = run
        self.dir = run.run_dir / "checkpoints"
        self.log_window: dict | None = None  # the metrics window of the checkpoint resumed from

    def start(self) -> int:
        """Check, then load the checkpoint to resume (if any), then write config.json and the
        log; returns the step to continue from."""
        run, cfg = self.run, self.run.cfg
        candidates = resume_candidates(cfg.resume, cfg.resume_step, self.dir)
        if not candidates and list_checkpoints(self.dir):
            raise UsageError(f"{run.run_dir} already has checkpoints; pass --resume latest to "
                             "continue it or choose another --exp-name / --output-dir")
        saved = run.run_dir / "config.json"
        old = json.loads(saved.read_text()) if candidates and saved.is_file() else None
        changes = self._check_settings(old) if old is not None else {}
        step, skipped = 0, []
        for path in candidates:
            problem = checkpoint_problem(path, run.world)
            if problem is None:
                step = self.load(path)
                break
            if len(candidates) == 1 and cfg.resume != "latest":
                raise UsageError(f"{path} is damaged: {problem}")
            skipped.append((path, problem))
        else:
            if candidates:
                raise UsageError("no intact checkpoint to resume: " + "; ".join(
                    f"{p.name}: {why}" for p, why in skipped))
        # -- every check passed: from here on the run directory is written --------------------
        if run.is_main:
            run.run_dir.mkdir(parents=True, exist_ok=True)
            self._write_config(saved, old, changes, step)
            run.say.attach(run.run_dir / "log.txt")
            for path, why in skipped:  # kept for inspection, out of the way of the new step-N
                aside = path.with_name(f".damaged-{path.name}")
                shutil.rmtree(aside, ignore_errors=True)
                os.replace(path, aside)
            # a kill between a checkpoint's rename and its EMA export leaves the previous
            # export behind; a run resumed at its final step would otherwise never replace it
            if step and self._exported_step() != step:
                self._export_ema(step)
        run.say(summary(run))
        for path, why in skipped:
            run.say(f"skipped checkpoint {path.name}: {why} (moved to .damaged-{path.name})")
        if step:
            run.say(f"resumed from {self.dir / f'step-{step:07d}'} at step {step}")
        run.accelerator.wait_for_everyone()
        self._truncate_log(step)
        return step

    def _check_settings(self, old_config: dict) -> dict[str, tuple]:
        """The settings that changed since config.json; refuses what a resume cannot honour."""
        run, cfg = self.run, self.run.cfg
        changes = settings_changes(old_config.get("train", {}), cfg.to_dict())
        data_old, ds = old_config.get("data", {}), run.dataset
        same_data = (data_old.get("config_sha256") == run.manifest_sha
                     and data_old.get("count") == len(ds))
        if same_data:
            changes.pop("data_dir", None)  # the same shards, moved: nothing changes
        fixed = {k: v for k, v in changes.items() if k in FIXED_KEYS}
        if not same_data and old_config.get("input_size") != ds.latent_shape[1]:
            fixed["data (latent size)"] = (old_config.get("input_size"), ds.latent_shape[1])
        if fixed:
            raise UsageError(f"cannot resume {run.run_dir}: these settings fix the model, the "
                             "data stream or the random streams and cannot change:\n  "
                             + "\n  ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in fixed.items()))
        guarded = {k: v for k, v in changes.items() if k not in FREE_KEYS}
        if not same_data:
            guarded.setdefault("data_dir", (data_old.get("dir"), str(cfg.data_dir)))
        if guarded and not cfg.allow_config_change:
            raise UsageError(f"cannot resume {run.run_dir} with changed settings (they would "
                             "change the objective, the data or the optimizer):\n  "
                             + "\n  ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in guarded.items())
                             + "\npass --allow-config-change to continue with them anyway "
                               "(config.json then records from which step they hold)")
        return changes

    def _write_config(self, path: Path, old: dict | None, changes: dict, step: int) -> None:
        """config.json: the current settings plus the history of what held from which step."""
        config = run_config(self.run)
        history = list((old or {}).get("history") or [])
        if old is None:
            history = [{"from_step": 0, "train": config["train"]}]
        elif changes:
            history.append({"from_step": step, "changed": {k: {"old": a, "new": b}
                                                           for k, (a, b) in changes.items()}})
        config["history"] = history
        atomic_write_text(path, json.dumps(config, indent=2) + "\n")

    def load(self, path: Path) -> int:
        """Load a verified checkpoint into memory (model, optimizer, RNG, EMA, scaler, bank, data
        position); a checkpoint that does not fit this run is a clear error."""
        from safetensors.torch import load_file
        run = self.run
        mine = json.loads((path / f"rank-{run.rank}.json").read_text())
        try:
            run.loader.load_state_dict(mine["loader"])
            run.accelerator.load_state(str(path))
            run.ema.load_state_dict(load_file(path / "ema.safetensors"))  # copies onto the device
            if mine.get("scaler"):
                run.scaler.load_state_dict(mine["scaler"])
            self.log_window = mine.get("log_window")
            bank = run.objective.bank
            if bank is not None:
                bank.load_state_dict(load_file(path / f"bank-{run.rank}.safetensors"))
        except (ValueError, RuntimeError, KeyError, pickle.UnpicklingError) as e:
            # another batch, shape or dataset; or a pickle that weights_only refuses to run
            raise UsageError(f"{path} does not fit this run: {str(e).splitlines()[0]}") from None
        return int(mine["step"])

    def _truncate_log(self, step: int) -> None:
        """Keep log.jsonl true to the resumed history: drop lines written after the checkpoint."""
        for log_path in (self.run.run_dir / "log.jsonl", self.run.run_dir / "eval.jsonl"):
            if self.run.is_main and log_path.is_file():
                kept = [ln for ln in log_path.read_text().splitlines()
                        if ln.strip() and json.loads(ln).get("step", 0) <= step]
                atomic_write_text(log_path, "".join(ln + "\n" for ln in kept))

    def has(self, step: int) -> bool:
        return (self.dir / f"step-{step:07d}" / CHECKSUMS).is_file()

    def save(self, step: int, log_window: dict | None = None) -> None:
        """Write checkpoints/step-N (temp dir, checksums last, rename), export the EMA, keep the
        last K. The caller has checked that the state is finite. ``log_window``: the metrics'
        open window (:meth:`MetricsLog.state_dict`), restored on resume."""
        run = self.run
        final, tmp = self.dir / f"step-{step:07d}", self.dir / f".tmp-step-{step:07d}"
        if run.is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
            for stale in self.dir.glob(".tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
        run.accelerator.wait_for_everyone()
        run.accelerator.save_state(str(tmp))
        state = {"step": step, "loader": run.loader.state_dict(),
                 "scaler": run.scaler.state_dict() if run.scaler.is_enabled() else None,
                 "log_window": log_window}
        atomic_write_text(tmp / f"rank-{run.rank}.json", json.dumps(state))
        if run.objective.bank is not None:
            save_safetensors_atomic(run.objective.bank.state_dict(),
                                    tmp / f"bank-{run.rank}.safetensors")
        if run.is_main:
            save_safetensors_atomic(run.ema.state_dict(), tmp / "ema.safetensors")
        run.accelerator.wait_for_everyone()
        if run.is_main:
            self._write_checksums(tmp, step)
            if final.exists():  # an incomplete leftover (no checksums) of an interrupted run
                shutil.rmtree(final)
            os.replace(tmp, final)
            self._export_ema(step)
            self._prune()
        run.accelerator.wait_for_everyone()

    def _export_ema(self, step: int) -> None:
        save_safetensors_atomic(sampling_state_dict(self.run.ema),
                                self.run.run_dir / "ema.safetensors",
                                metadata={"step": str(step)}, checksum=True)

    def _exported_step(self) -> int | None:
        """The step of run_dir/ema.safetensors (None: missing or unreadable)."""
        from safetensors import safe_open
        try:
            with safe_open(str(self.run.run_dir / "ema.safetensors"), "pt") as f:
                return int((f.metadata() or {})["step"])
        except (OSError, ValueError, KeyError, RuntimeError):
            return None

    def _write_checksums(self, tmp: Path, step: int) -> None:
        files = {str(f.relative_to(tmp)): sha256_file(f) for f in sorted(tmp.rglob("*"))
                 if f.is_file()}
        record = {"step": step, "world_size": self.run.world, "files": files}
        atomic_write_text(tmp / CHECKSUMS, json.dumps(record, indent=1) + "\n")

    def _prune(self) -> None:
        limit = self.run.cfg.checkpoints_total_limit
        old = list_checkpoints(self.dir)
        for _, p in (old[:-limit] if limit > 0 else []):
            doomed = p.with_name(".tmp-delete-" + p.name)
            os.replace(p, doomed)  # a half-deleted checkpoint never looks finished
            shutil.rmtree(doomed, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# Hooks of the loop: metrics at log points, sample grids.

def forwards_per_image(cfg: TrainingConfig) -> float:
    """Forward-pass equivalents of one training image, for MFU (2 FLOP per MAC on top): forward +
    backward = 3; MeanFlow adds its JVP (primal + tangent = 2) and, with guidance, 2 more forwards
    (the unconditional and conditional u at r = t). The contrastive baseline runs two views of
    every image (6)."""
    if cfg.loss_type != "meanflow":
        return 6.0 if cfg.contrastive != "none" else 3.0
    guided = cfg.cfg_omega != 1.0 or cfg.cfg_kappa != 0.0
    return 3.0 + 2.0 + (2.0 if guided else 0.0)


class MetricsLog:
    """Sums the loss terms on the device between log points; :meth:`write` is the only host sync
    of the loop. Writes log.jsonl, the trackers and the progress bar."""

    def __init__(self, run: Run, bar):
        self.run, self.bar = run, bar
        cfg = run.cfg
        self.peak = (cfg.peak_tflops * 1e12 if cfg.peak_tflops else
                     runtime.peak_flops(run.device, cfg.mixed_precision, cfg.allow_tf32))
        self.skipped = torch.zeros((), device=run.device)
        self.last: dict = {}
        self.restart()

    def restart(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.steps = 0
        self.t0 = time.perf_counter()

    def add(self, terms: dict[str, torch.Tensor], nonfinite: torch.Tensor) -> None:
        """``nonfinite``: the step's flag from :meth:`DivergenceGuard.update` (fp16 skips it)."""
        for k, v in terms.items():
            self.sums[k] = self.sums.get(k, 0) + v
        self.skipped += nonfinite
        self.steps += 1

    def state_dict(self) -> dict:
        """The open window (this process's sums since the last log point) and the skip count,
        so that a run resumed from a checkpoint between log points logs the same numbers."""
        return {"steps": self.steps, "skipped": int(self.skipped.item()),
                "sums": {k: [float(v), str(v.dtype).removeprefix("torch.")]
                         for k, v in self.sums.items()}}

    def load_state_dict(self, state: dict | None) -> None:
        if not state:  # a checkpoint written before the window was saved
            return
        dev = self.run.device
        self.steps = int(state["steps"])
        self.skipped.fill_(int(state["skipped"]))
        self.sums = {k: torch.tensor(v, dtype=getattr(torch, dtype), device=dev)
                     for k, (v, dtype) in state["sums"].items()}

    def write(self, step: int, lr: float) -> dict:
        run, cfg = self.run, self.run.cfg
        names = sorted(self.sums)
        vals = torch.stack([self.sums[k] for k in names]) / self.steps
        vals = run.accelerator.reduce(vals, reduction="mean")
        img_s = self.steps * cfg.batch_size / (time.perf_counter() - self.t0)
        rec = {"step": step, **{k: float(v) for k, v in zip(names, vals.tolist())},
               "lr": lr, "img_per_s": img_s, "epoch": run.loader.epoch,
               "skipped_steps": int(run.accelerator.reduce(self.skipped, "sum").item()),
               "memory_mb": memory_mb(run.device)}
        if run.scaler.is_enabled():
            rec["loss_scale"] = run.scaler.get_scale()
        if self.peak:
            rec["mfu"] = 2 * forwards_per_image(cfg) * run.macs * img_s / run.world / self.peak
        rec = json_safe(rec)
        if run.is_main:
            with open(run.run_dir / "log.jsonl", "a") as fh:
                fh.write(json.dumps(rec, allow_nan=False) + "\n")
            shown = rec.get("mf", rec["loss"])  # MeanFlow's adaptive loss sits near 1: show L
            self.bar.set_postfix(loss=f"{shown}", lr=f"{lr:.2e}", img_s=f"{img_s:.0f}")
        run.accelerator.log({k: v for k, v in rec.items() if k != "step" and v is not None},
                            step=step)
        self.last = rec
        self.restart()
        return rec


class Diverged(Exception):
    """The run produced non-finite values; it stopped before saving any of them."""


class DivergenceGuard:
    """Non-finite losses, gradients or weights, found without a host sync per step: device
    counters are updated every step and read, by every process at once, only at log, sample and
    checkpoint points (which sync anyway), and always before a checkpoint or EMA export.

    Without a gradient scaler a non-finite step has already corrupted the weights: the run stops.
    With fp16's scaler a skipped step is normal (the scale halves), but ``--max-consecutive-skips``
    skips in a row mean the run has diverged.
    """

    def __init__(self, run: Run, step: int):
        dev = run.device
        self.run = run
        self.step = torch.full((), step, dtype=torch.long, device=dev)  # device copy of the step
        self.first_bad = torch.full((), -1, dtype=torch.long, device=dev)
        self.streak = torch.zeros((), dtype=torch.long, device=dev)  # fp16 skips in a row, now
        self.longest = torch.zeros((), dtype=torch.long, device=dev)

    def update(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        """After each optimizer step: a few scalar kernels, no sync. Returns the step's
        non-finite flag (0-d, 0 or 1)."""
        self.step += 1
        bad = ~(torch.isfinite(terms["loss"]) & torch.isfinite(terms["grad_norm"]))
        if self.run.scaler.is_enabled():
            self.streak = (self.streak + 1) * bad
            self.longest = torch.maximum(self.longest, self.streak)
        else:
            self.first_bad = torch.where((self.first_bad < 0) & bad, self.step, self.first_bad)
        return bad.float()

    def check(self, step: int, weights: bool = False) -> None:
        """Raise :class:`Diverged` on every process if any process saw a non-finite step (or,
        with ``weights``, holds non-finite weights or EMA)."""
        run = self.run
        bad_weights = torch.zeros((), dtype=torch.long, device=run.device)
        if weights:
            params = list(run.trainable) + list(run.ema_params)
            bad_weights = (~torch.stack([torch.isfinite(p).all() for p in params]).all()).long()
        mine = torch.stack([self.first_bad, self.longest, bad_weights])
        first_bad, longest, bad_weights = run.accelerator.gather(mine[None]).reshape(-1, 3).T
        limit = run.cfg.max_consecutive_skips
        what = []
        if (first_bad >= 0).any():
            what.append(f"a non-finite loss or gradient at step "
                        f"{int(first_bad[first_bad >= 0].min())}")
        if (longest >= limit).any():
            what.append(f"{int(longest.max())} consecutive fp16 steps skipped for non-finite "
                        f"gradients (limit --max-consecutive-skips {limit})")
        if bad_weights.any():
            what.append("non-finite weights")
        if what:
            raise Diverged(self._message(step, what) if run.is_main else "")

    def _message(self, step: int, what: list[str]) -> str:
        done = list_checkpoints(self.run.run_dir / "checkpoints")
        last = (f"the last good checkpoint is {done[-1][1]} (step {done[-1][0]})" if done
                else "no checkpoint had been written yet")
        return (f"training diverged: {'; '.join(what)}. Stopped at step {step}; nothing "
                f"non-finite was saved, {last}. Lower --learning-rate or use --max-grad-norm, "
                f"then continue with --resume latest.")


def json_safe(record: dict) -> dict:
    """Non-finite floats as null: log.jsonl stays strict JSON."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in record.items()}


class SampleGrid:
    """samples/step-N.png from the EMA model (eval mode, fixed noise and labels), also sent to
    the trackers. The VAE (for latent runs) is loaded on first use."""

    def __init__(self, run: Run):
        self.run = run
        self.vae = None
        self.warned = False

    def __call__(self, step: int) -> None:
        run, cfg = self.run, self.run.cfg
        out_path = run.run_dir / "samples" / f"step-{step:07d}.png"
        if not run.is_main or out_path.is_file():  # e.g. a rerun of a finished run
            return
        if cfg.vae and self.vae is None and not self._load_vae():
            return
        labels = torch.arange(cfg.num_sample_images, device=run.device) % cfg.num_classes
        meanflow = cfg.loss_type == "meanflow"  # what the model is for: 1 step, no sampling CFG
        images = self.sample(labels, 1 if meanflow else cfg.sample_num_steps, cfg.sample_cfg_scale)
        (run.run_dir / "samples").mkdir(exist_ok=True)
        grid = write_grid(images, out_path)
        log_image(run.accelerator, "samples", grid, step)

    def sample(self, labels: torch.Tensor, num_steps: int, cfg_scale: float) -> torch.Tensor:
        """uint8 (N, H, W, 3) from the EMA model: sample i starts from the noise of (seed, i);
        MeanFlow runs take ``num_steps`` MeanFlow steps (no CFG), others the Euler ODE."""
        from samplers import images_to_uint8, sample_meanflow, sample_ode
        run, cfg, ds = self.run, self.run.cfg, self.run.dataset
        shape, decode = (labels.shape[0], *ds.latent_shape), dict(
            vae=self.vae, latent_scale=ds.scale.flatten(), latent_bias=ds.bias.flatten())
        if cfg.loss_type == "meanflow":
            out = sample_meanflow(run.ema, shape, num_steps=num_steps, y=labels, seed=cfg.seed,
                                  **decode)
        else:
            out = sample_ode(run.ema, shape, num_steps=num_steps, cfg_scale=cfg_scale, y=labels,
                             seed=cfg.seed, path_type=cfg.path_type, **decode)
        images = out["images"] if isinstance(out, dict) else out.clamp(-1, 1)
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        return images_to_uint8(images)

    def _load_vae(self) -> bool:
        from models.vae import WeightsNotFound, load_vae
        try:
            self.vae, _ = load_vae(self.run.cfg.vae, self.run.device)
            return True
        except (WeightsNotFound, ImportError) as e:
            if not self.warned:
                self.run.say(f"sample grids skipped: {e}")
                self.warned = True
            return False


class OnlineEval:
    """Every ``--eval-every`` steps: sample the EMA model (eval mode, fixed noise, labels equal per
    class) and log a distribution metric to eval.jsonl and the trackers, on the main process.
    Digits shards get the digits metric (docs/CONVENTIONS.md §12); other data the ADM suite's
    numbers against ``--eval-reference`` with the ``--inception`` weights. It draws no random
    number of the training streams, so exact resume is unchanged."""

    def __init__(self, run: Run, grid: SampleGrid):
        self.run, self.grid, self.cfg = run, grid, run.cfg
        self.kind, self.inception = None, None
        if not self.cfg.eval_every:
            return
        if run.dataset.manifest.get("source", {}).get("type") == "digits":
            self.kind = "digits"
        elif self.cfg.eval_reference:
            self.kind = "adm"
            if not Path(self.cfg.eval_reference).is_file():
                raise UsageError(f"--eval-reference {self.cfg.eval_reference} does not exist")
        else:
            raise UsageError("--eval-every needs digits shards (the digits metric) or "
                             "--eval-reference REF.npz with --inception WEIGHTS (FID and friends)")
        if self.kind == "adm" and run.is_main:
            from models.inception import load_inception
            from models.vae import WeightsNotFound
            try:
                self.inception = load_inception(self.cfg.inception, run.device)
            except WeightsNotFound as e:
                raise UsageError(str(e)) from None

    def __call__(self, step: int) -> None:
        run, cfg = self.run, self.cfg
        if self.kind is None or step % cfg.eval_every or not run.is_main:
            return
        if cfg.vae and self.grid.vae is None and not self.grid._load_vae():
            return
        from generate import make_labels
        labels = torch.from_numpy(make_labels(cfg.eval_samples, cfg.num_classes, "equal",
                                              cfg.seed)).to(run.device)
        steps = cfg.eval_num_steps or (1 if cfg.loss_type == "meanflow" else 50)
        images = self.grid.sample(labels, steps, cfg.eval_cfg_scale).numpy()
        metrics = self._metrics(images, labels.cpu().numpy())
        rec = json_safe({"step": step, **{k: float(v) for k, v in metrics.items()
                                          if isinstance(v, (int, float))}})
        with open(run.run_dir / "eval.jsonl", "a") as fh:
            fh.write(json.dumps(rec, allow_nan=False) + "\n")
        run.accelerator.log({f"eval/{k}": v for k, v in rec.items()
                             if k != "step" and v is not None}, step=step)
        head = ("fd_ratio", "precision", "recall") if self.kind == "digits" else \
            ("fid", "sfid", "inception_score")
        run.say(f"eval step {step} ({cfg.eval_samples} samples, {steps} steps, cfg "
                f"{cfg.eval_cfg_scale:g}): " + ", ".join(f"{k} {rec.get(k)}" for k in head))

    def _metrics(self, images: np.ndarray, labels: np.ndarray) -> dict:
        if self.kind == "digits":
            from evaluate import digits_metrics
            return digits_metrics(images, labels)
        from evaluate import NpzImages, compute_metrics
        return compute_metrics(images, NpzImages(self.cfg.eval_reference), self.inception,
                               progress=False)


# ----------------------------------------------------------------------------------------------
# The training run.

def train_step(run: Run, data: Iterator[dict], step: int) -> dict[str, torch.Tensor]:
    """One optimizer step (all micro-batches) and the EMA update; returns the loss terms and the
    gradient norm as device tensors (no host sync)."""
    cfg, accum = run.cfg, run.cfg.gradient_accumulation_steps
    terms_sum: dict[str, torch.Tensor] = {}
    for micro in range(accum):
        g = step_generator(cfg.seed, run.rank, step, micro, run.device)
        b, targets = run.objective.batch(next(data), g)
        last = micro == accum - 1
        with contextlib.nullcontext() if last else run.accelerator.no_sync(run.model):
            terms = run.objective.losses(run.model, b, targets)
            run.scaler.scale(terms["loss"] / accum).backward()
        for k, v in terms.items():
            terms_sum[k] = terms_sum.get(k, 0) + v.detach().float() / accum
    run.scaler.unscale_(run.optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(
        run.trainable, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
    run.scaler.step(run.optimizer)  # skipped by the scaler when the fp16 gradients are not finite
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    ema_update(run.ema_params, run.trainable, ema_decay(step + 1, cfg.ema_decay, cfg.ema_warmup))
    terms_sum["grad_norm"] = grad_norm.detach().float()
    return terms_sum


def train(cfg: TrainingConfig, given: set[str] | None = None) -> dict:
    """Run the training described by ``cfg``; returns a summary (final step, last losses)."""
    from tqdm.auto import tqdm
    run = build_run(cfg, set(given or ()))
    cfg = run.cfg
    checkpoints = Checkpointer(run)
    step = checkpoints.start()
    start_trackers(run)
    grid = SampleGrid(run)
    evaluation = OnlineEval(run, grid)
    if run.objective.bank is not None and step == 0:
        run.objective.prefill_bank(run)
    bar = tqdm(total=cfg.max_train_steps, initial=step, desc="train", unit="step",
               disable=not run.is_main, dynamic_ncols=True)
    metrics, guard = MetricsLog(run, bar), DivergenceGuard(run, step)
    metrics.load_state_dict(checkpoints.log_window)
    data = endless(run.loader)

    while step < cfg.max_train_steps:
        lr = lr_at(step, cfg, cfg.max_train_steps)
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        terms = train_step(run, data, step)
        metrics.add(terms, guard.update(terms))
        step += 1
        bar.update(1)
        last = step == cfg.max_train_steps
        log_now = step % cfg.log_every == 0 or last
        grid_now = cfg.sampling_steps > 0 and step % cfg.sampling_steps == 0
        eval_now = cfg.eval_every > 0 and step % cfg.eval_every == 0
        save_now = step % cfg.checkpointing_steps == 0 or last
        if log_now:
            metrics.write(step, lr)  # the line is written (nulls for NaN) before a stop
        if log_now or grid_now or eval_now or save_now:  # points that sync anyway
            guard.check(step, weights=save_now)
        if grid_now:
            grid(step)
        if eval_now:
            evaluation(step)
            run.accelerator.wait_for_everyone()
        if save_now:
            checkpoints.save(step, metrics.state_dict())
        if save_now or eval_now:
            metrics.t0 = time.perf_counter()  # checkpoints and evaluations are not training

    bar.close()
    guard.check(step, weights=True)
    if cfg.sampling_steps == 0 or step % cfg.sampling_steps:
        grid(step)
    if not checkpoints.has(step):
        checkpoints.save(step, metrics.state_dict())  # e.g. resumed at the final step
    run.accelerator.wait_for_everyone()
    run.accelerator.end_training()
    run.say(f"done: step {step}, run directory {run.run_dir}")
    return {"step": step, "run_dir": str(run.run_dir), "last": metrics.last}


def main(argv: list[str] | None = None) -> int:
    cfg, given = parse_config(argv)
    try:
        if cfg.dry_run:
            manifest = None
            if cfg.data_dir and (Path(cfg.data_dir) / "manifest.json").is_file():
                manifest = read_data_manifest(cfg)
            print(resolve(cfg, given, manifest).to_json())
            return 0
        train(cfg, given)
    except UsageError as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    except Diverged as e:
        if str(e):  # the main process says it once; every process stops
            print(f"train.py: error: {e}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())

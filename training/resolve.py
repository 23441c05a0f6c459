"""The configuration of a run, completed and checked before anything is built: fields that depend
on each other or on the shards' manifest are filled, and every flag outside its meaning is one
clear :class:`common.UsageError`.
"""
from __future__ import annotations

import os
from pathlib import Path

import runtime
from common import UsageError
from configs import TrainingConfig
from preprocessing.shards import ShardFormatError, read_manifest

LAUNCHER_PRECISION_ENV = "ACCELERATE_MIXED_PRECISION"  # set by `accelerate launch` / its config


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
    if cfg.push_to_hub:  # as diffusers' examples: the run directory's name by default
        cfg.hub_model_id = check_hub_model_id(cfg.hub_model_id or cfg.exp_name)
    check_ranges(cfg)
    return cfg


def check_hub_model_id(repo_id: str) -> str:
    """``repo_id`` if the Hub accepts it (ORG/NAME, or NAME under your account), said before
    training rather than when the run pushes at its end."""
    from huggingface_hub.utils import validate_repo_id
    try:
        validate_repo_id(repo_id)
    except ValueError as e:
        raise UsageError(f"--hub-model-id {repo_id!r} is not a Hub model id: {e}") from None
    return repo_id


_COUNTS = ("batch_size", "gradient_accumulation_steps", "max_train_steps", "log_every",
           "preemption_check_every",
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

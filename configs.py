"""Training configuration: one dataclass, named presets, and the command line built from both.

:class:`TrainingConfig` is the single source of truth for train.py's flags: every field is a flag
(``batch_size`` -> ``--batch-size``) with the default written here, plus the aliases the REPA,
StableVM, SiT and DispLoss scripts use, so their users' commands run unchanged. Presets are plain
dicts of field overrides; on the command line ``--preset NAME`` applies one and explicit flags win.
Defaults are REPA's recipe (SiT-XL/2, batch 256, AdamW 1e-4 constant, EMA 0.9999, cfg-prob 0.1).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field, fields
from typing import Any


def _f(default: Any, help: str, *, aliases: tuple[str, ...] = (), choices=None,
       group: str = "") -> Any:
    return field(default=default, metadata={"help": help, "aliases": aliases, "choices": choices,
                                            "group": group})


@dataclass
class TrainingConfig:
    # -- data ------------------------------------------------------------------------------------
    data_dir: str | None = _f(None, "shard directory written by preprocessing/encode.py",
                              aliases=("--data-path",), group="data")
    resolution: int | None = _f(None, "image resolution; checked against the shards' manifest "
                                "(default: the manifest's)", aliases=("--image-size",),
                                group="data")
    latent_norm: str = _f("manifest", "latent scaling: the manifest's scale/bias (SD-VAE 0.18215, "
                          "REPA parity) or per-channel mean/std", choices=("manifest", "channel"),
                          group="data")
    hflip: bool = _f(True, "use the stored mirrored copies (if the shards have them)",
                     group="data")
    num_workers: int = _f(1, "reader threads (the shard reader needs no worker processes)",
                          group="data")
    verify_shards: bool = _f(True, "check every shard's sha256 against the manifest before "
                             "training (the processes share the work)", group="data")
    # -- model -----------------------------------------------------------------------------------
    model: str = _f("SiT-XL/2", "SiT size from models.sit.SiT_models", group="model")
    depth: int | None = _f(None, "override the size's depth", group="model")
    hidden_size: int | None = _f(None, "override the size's width", group="model")
    num_heads: int | None = _f(None, "override the size's number of heads", group="model")
    num_classes: int | None = _f(None, "number of classes (default: the shards'); null label = "
                                 "num_classes", group="model")
    qk_norm: bool = _f(False, "LayerNorm on queries and keys", group="model")
    fused_attn: bool = _f(True, "accepted for REPA compatibility; attention always uses SDPA",
                          group="model")
    # -- interpolant loss ------------------------------------------------------------------------
    path_type: str = _f("linear", "interpolant path", choices=("linear", "cosine"), group="loss")
    prediction: str = _f("v", "model output (velocity only, as REPA)", choices=("v",),
                         group="loss")
    weighting: str = _f("uniform", "time sampler (REPA's --weighting)",
                        choices=("uniform", "lognormal", "logit_normal"), group="loss")
    time_shift: float = _f(1.0, "resolution shift of the sampled times (1 = none)", group="loss")
    cfg_prob: float = _f(0.1, "probability of replacing the label by the null label (0 disables)",
                         group="loss")
    legacy: bool = _f(False, "accepted for REPA compatibility; labels are always dropped in the "
                      "training loop with --cfg-prob", group="loss")
    loss_type: str = _f("si", "si: plain interpolant target; stablevm: StableVM memory-bank "
                        "target; meanflow: MeanFlow average velocity (one-step sampling)",
                        choices=("si", "stablevm", "meanflow"), group="loss")
    bank_capacity_per_class: int = _f(256, "StableVM: latents kept per class (FIFO)",
                                      group="stablevm")
    prefill_bank_fully: bool = _f(False, "StableVM: fill every class before step 0 (default: at "
                                  "least one entry per class)", group="stablevm")
    stablevm_split: float = _f(0.5, "StableVM: stable target for t >= split", group="stablevm")
    stablevm_efficient: bool = _f(True, "StableVM: stream the bank in chunks (no (B,K,D) gather)",
                                  group="stablevm")
    # -- MeanFlow (--loss-type meanflow; docs/CONVENTIONS.md §11) --------------------------------
    time_mu: float = _f(-0.4, "MeanFlow: mean of the logit-normal times", aliases=("--time_mu",),
                        group="meanflow")
    time_sigma: float = _f(1.0, "MeanFlow: std of the logit-normal times",
                           aliases=("--time_sigma",), group="meanflow")
    ratio_r_not_equal_t: float = _f(0.25, "MeanFlow: fraction of samples with r < t (the rest "
                                    "have r = t: plain flow matching)",
                                    aliases=("--ratio_r_not_equal_t",), group="meanflow")
    adaptive_p: float = _f(1.0, "MeanFlow: adaptive loss weight 1/(L + c)^p (0: plain MSE)",
                           aliases=("--adaptive_p",), group="meanflow")
    adaptive_c: float = _f(1e-3, "MeanFlow: c of the adaptive weight", group="meanflow")
    cfg_omega: float = _f(1.0, "MeanFlow training-time guidance w (1 with kappa 0: off)",
                          aliases=("--cfg_omega",), group="meanflow")
    cfg_kappa: float = _f(0.0, "MeanFlow guidance kappa (effective scale w / (1 - kappa))",
                          aliases=("--cfg_kappa",), group="meanflow")
    cfg_min_t: float = _f(0.0, "MeanFlow guidance applies for t in [cfg-min-t, cfg-max-t]",
                          aliases=("--cfg_min_t",), group="meanflow")
    cfg_max_t: float = _f(1.0, "MeanFlow guidance interval end", aliases=("--cfg_max_t",),
                          group="meanflow")
    # -- dispersive loss -------------------------------------------------------------------------
    disp: bool = _f(False, "add the dispersive loss", group="dispersive")
    disp_lambda: float = _f(0.25, "dispersive loss weight", aliases=("--lambda-disp",),
                            group="dispersive")
    disp_tau: float = _f(1.0, "dispersive temperature", group="dispersive")
    disp_variant: str = _f("infonce_l2", "dispersive loss form",
                           choices=("infonce_l2", "infonce_cosine", "hinge", "covariance"),
                           group="dispersive")
    disp_blocks: str = _f("last", "block(s) whose tokens are dispersed: last, all, or 1-indexed "
                          "numbers such as 7 or 4,8", group="dispersive")
    disp_gather: bool = _f(False, "use the other processes' rows as negatives too",
                           group="dispersive")
    contrastive: str = _f("none", "the paper's contrastive baseline instead of --disp: two "
                          "noisy views per image, this form, with the --disp-lambda/-tau/-blocks "
                          "settings", choices=("none", "infonce_l2", "infonce_cosine", "hinge",
                                               "covariance"), group="dispersive")
    contrastive_noise: str = _f("independent", "noise of the two views: independent (own t and "
                                "eps) or restricted (|t1 - t2| <= --contrastive-delta, own eps)",
                                choices=("independent", "restricted"), group="dispersive")
    contrastive_delta: float = _f(0.0, "restricted noise: largest |t1 - t2| (0: the same t)",
                                  group="dispersive")
    # -- representation alignment (REPA / VA-REPA / iREPA) --------------------------------------
    use_proj_loss: bool = _f(False, "add the REPA alignment loss (also on when --enc-type is "
                             "given with --proj-coeff > 0, as REPA)", group="repa")
    enc_type: str | None = _f(None, "target encoder(s), comma-separated, e.g. dinov2-vit-b",
                              group="repa")
    proj_coeff: float = _f(0.5, "alignment loss weight", group="repa")
    encoder_depth: int = _f(8, "SiT block (1-indexed) whose output is projected", group="repa")
    projector_dim: int = _f(2048, "hidden width of the MLP projector", group="repa")
    projector_type: str = _f("mlp", "projector (iREPA uses conv)", choices=("mlp", "linear",
                                                                           "conv"), group="repa")
    proj_weight_schedule: str = _f("none", "VA-REPA time weighting of the alignment term",
                                   choices=("none", "hard", "hard_high", "sigmoid", "cosine",
                                            "snr"), group="repa")
    proj_tau: float = _f(0.7, "VA-REPA tau", group="repa")
    proj_k: float = _f(20.0, "VA-REPA sigmoid sharpness k", group="repa")
    use_irepa: bool = _f(False, "iREPA: conv projector and spatially normalised targets",
                         group="repa")
    irepa_gamma: float = _f(0.6, "iREPA spatial normalisation gamma", group="repa")
    projector_kernel_size: int = _f(3, "iREPA conv projector kernel size", group="repa")
    encoder_weights_dir: str | None = _f(None, "directory holding encoder weights (default: the "
                                         "local HF / torch hub caches)", group="repa")
    # -- optimisation ----------------------------------------------------------------------------
    batch_size: int = _f(256, "global batch size (all processes and accumulation steps)",
                         aliases=("--global-batch-size",), group="optim")
    gradient_accumulation_steps: int = _f(1, "micro-batches per optimizer step", group="optim")
    learning_rate: float = _f(1e-4, "peak learning rate", aliases=("--lr",), group="optim")
    lr_schedule: str = _f("constant", "after warmup", choices=("constant", "cosine"),
                          group="optim")
    lr_warmup_steps: int = _f(0, "linear warmup steps", group="optim")
    lr_min: float = _f(0.0, "final learning rate of the cosine schedule", group="optim")
    adam_beta1: float = _f(0.9, "AdamW beta1", group="optim")
    adam_beta2: float = _f(0.999, "AdamW beta2", group="optim")
    adam_weight_decay: float = _f(0.0, "AdamW weight decay", group="optim")
    adam_epsilon: float = _f(1e-8, "AdamW epsilon", group="optim")
    max_grad_norm: float = _f(1.0, "gradient clipping (0 disables)", group="optim")
    ema_decay: float = _f(0.9999, "EMA decay", group="optim")
    ema_warmup: bool = _f(False, "EMA decay min(decay, (1+n)/(10+n)) at step n", group="optim")
    max_train_steps: int = _f(400_000, "optimizer steps", group="optim")
    epochs: int | None = _f(None, "train this many epochs instead of --max-train-steps",
                            group="optim")
    # -- runtime ---------------------------------------------------------------------------------
    mixed_precision: str = _f("no", "autocast dtype (fp16 adds a gradient scaler)",
                              choices=("no", "fp16", "bf16"), group="runtime")
    max_consecutive_skips: int = _f(25, "fp16: stop the run after this many consecutive steps "
                                    "skipped for non-finite gradients (each halves the loss "
                                    "scale)", group="runtime")
    preemption_check_every: int = _f(
        10, "several processes: every this many steps they agree whether SIGTERM/SIGUSR1 arrived "
        "(then all save a checkpoint and exit 75); one process checks every step",
        group="runtime")
    allow_tf32: bool = _f(True, "TF32 matmuls/convolutions on NVIDIA GPUs", group="runtime")
    compile: bool = _f(False, "torch.compile the model", group="runtime")
    seed: int = _f(0, "seed of model init, data order and noise", aliases=("--global-seed",),
                   group="runtime")
    # -- run directory, checkpoints, logging -----------------------------------------------------
    output_dir: str = _f("exps", "parent of the run directory", aliases=("--results-dir",),
                         group="run")
    exp_name: str | None = _f(None, "run directory name (default: derived from the model and "
                              "losses)", group="run")
    checkpointing_steps: int = _f(50_000, "save a checkpoint every N steps (and at the end)",
                                  aliases=("--ckpt-every",), group="run")
    checkpoints_total_limit: int = _f(3, "keep the last K checkpoints (0 keeps all)", group="run")
    allow_config_change: bool = _f(False, "on resume, accept changed settings of the objective, "
                                   "data or optimizer (config.json records from which step "
                                   "they hold)", group="run")
    resume: str | None = _f(None, "'latest', a step number or a checkpoint directory",
                            aliases=("--resume-from-checkpoint",), group="run")
    resume_step: int = _f(0, "REPA compatibility: resume from the checkpoint of this step",
                          group="run")
    report_to: str = _f("auto", "experiment tracker (auto: tensorboard when installed)",
                        choices=("auto", "tensorboard", "wandb", "none"), group="run")
    logging_dir: str = _f("logs", "tracker directory inside the run directory", group="run")
    log_every: int = _f(100, "log (and sync with the host) every N steps", group="run")
    sampling_steps: int = _f(10_000, "write a sample grid from the EMA model every N steps "
                             "(0: only at the end)", aliases=("--sample-every",), group="run")
    sample_num_steps: int = _f(50, "Euler steps of the sample grid", group="run")
    sample_cfg_scale: float = _f(4.0, "CFG scale of the sample grid", group="run")
    num_sample_images: int = _f(64, "images in the sample grid", group="run")
    # -- online evaluation (README, "Online evaluation") -----------------------------------------
    eval_every: int = _f(0, "every N steps sample the EMA model and log a distribution metric "
                         "(0: off): the digits metric on digits shards, IS/FID/sFID/precision/"
                         "recall with --eval-reference and --inception", group="eval")
    eval_samples: int = _f(200, "samples per evaluation (fixed noise and labels, equal per "
                           "class)", group="eval")
    eval_num_steps: int | None = _f(None, "sampler steps (default: 50 Euler steps; MeanFlow "
                                    "runs: 1)", group="eval")
    eval_cfg_scale: float = _f(1.0, "CFG scale of the evaluation samples (1: unguided)",
                               group="eval")
    eval_reference: str | None = _f(None, "ADM reference batch .npz (arr_0 and/or mu/sigma) for "
                                    "the Inception metrics", group="eval")
    inception: str | None = _f(None, "FID Inception weights (pt_inception-2015-12-05-*.pth) for "
                               "the Inception metrics", group="eval")
    vae: str | None = _f(None, "VAE to decode sample grids (default: the shards' manifest)",
                         group="run")
    peak_tflops: float | None = _f(None, "device peak for the MFU estimate (default: known GPUs)",
                                   group="run")
    wandb: bool = _f(False, "SiT/DispLoss compatibility: --report-to wandb, with WANDB_KEY, "
                     "WANDB_ENTITY and WANDB_PROJECT read from the environment", group="run")
    ckpt: str | None = _f(None, "SiT/DispLoss compatibility: a checkpoint directory to resume, or a "
                          "SiT/REPA weights file (.pt/.safetensors) to start from", group="run")
    dry_run: bool = _f(False, "print the resolved configuration and exit", group="run")
    # -- sharing on the Hugging Face Hub (README, "Sharing a model on the Hub") ------------------
    push_to_hub: bool = _f(False, "at the end, write RUN_DIR/hub (config.json, model.safetensors "
                           "of the EMA, a model card) and upload it with your Hugging Face login "
                           "(`hf auth login`; offline: the command to push later is printed)",
                           aliases=("--push_to_hub",), group="hub")
    hub_model_id: str | None = _f(None, "Hub repository ORG/NAME (or NAME, under your account) "
                                  "of --push-to-hub (default: the run directory's name)",
                                  aliases=("--hub_model_id",), group="hub")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


# ----------------------------------------------------------------------------------------------
# Presets: field overrides on top of the defaults (REPA's recipe).

DISPERSIVE_PRESETS: dict[str, dict] = {
    # PyTorch reference of Wang & He (2025): lambda 0.25, tau 1, last block.
    "default": {"lambda_disp": 0.25, "tau": 1.0, "variant": "infonce_l2", "blocks": "last"},
    # The paper's JAX setting: lambda 0.5, tau 0.5 on block depth // 4 (resolved per model).
    "jax_reproduction": {"lambda_disp": 0.5, "tau": 0.5, "variant": "infonce_l2",
                         "blocks": "quarter"},
}

# The CPU demo (docs/CONVENTIONS.md §3): a 1.3M-parameter SiT on 8x8 digit pixels, ~4 steps/s
# on 2 cores.
_DIGITS = {"model": "SiT-S/1", "depth": 4, "hidden_size": 128, "num_heads": 4,
           "batch_size": 64, "learning_rate": 1e-3, "max_train_steps": 800,
           "ema_decay": 0.999, "ema_warmup": True, "cfg_prob": 0.1,
           "checkpointing_steps": 400, "log_every": 50, "sampling_steps": 0,
           "sample_num_steps": 50, "sample_cfg_scale": 3.0, "num_sample_images": 100,
           "mixed_precision": "no", "report_to": "none"}

TRAINING_PRESETS: dict[str, dict] = {
    # REPA's ImageNet 256x256 recipe without the alignment term (SiT-XL/2, batch 256, lr 1e-4).
    "imagenet_256": {"model": "SiT-XL/2", "resolution": 256, "batch_size": 256,
                     "learning_rate": 1e-4, "mixed_precision": "bf16", "cfg_prob": 0.1},
    # REPA: DINOv2-B targets on block 8, coefficient 0.5.
    "repa": {"model": "SiT-XL/2", "resolution": 256, "batch_size": 256, "mixed_precision": "bf16",
             "use_proj_loss": True, "enc_type": "dinov2-vit-b", "proj_coeff": 0.5,
             "encoder_depth": 8},
    # iREPA: conv projector (3x3) and spatially normalised targets (gamma 0.6).
    "irepa": {"model": "SiT-XL/2", "resolution": 256, "batch_size": 256, "mixed_precision": "bf16",
              "use_proj_loss": True, "enc_type": "dinov2-vit-b", "proj_coeff": 0.5,
              "encoder_depth": 8, "use_irepa": True, "irepa_gamma": 0.6,
              "projector_type": "conv", "projector_kernel_size": 3},
    # StableVM on top of REPA: bank of 256 latents per class, stable target for t >= 0.5.
    "stablevm": {"model": "SiT-XL/2", "resolution": 256, "batch_size": 256,
                 "mixed_precision": "bf16", "loss_type": "stablevm",
                 "bank_capacity_per_class": 256, "stablevm_split": 0.5, "use_proj_loss": True,
                 "enc_type": "dinov2-vit-b", "proj_coeff": 0.5, "encoder_depth": 8},
    # DispLoss (dFlow) with the PyTorch defaults.
    "dispersive": {"model": "SiT-XL/2", "resolution": 256, "batch_size": 256,
                   "mixed_precision": "bf16", "disp": True, "disp_lambda": 0.25, "disp_tau": 1.0,
                   "disp_blocks": "last"},
    # MeanFlow-XL/2 (Geng et al. 2025): guidance w 0.2, kappa 0.92 (effective scale 2.5) on
    # t in [0, 0.75], 25% of samples with r < t; check against the paper before a paper run.
    "meanflow_xl": {"model": "SiT-XL/2", "resolution": 256, "batch_size": 256,
                    "learning_rate": 1e-4, "mixed_precision": "bf16", "loss_type": "meanflow",
                    "cfg_prob": 0.1, "time_mu": -0.4, "time_sigma": 1.0,
                    "ratio_r_not_equal_t": 0.25, "adaptive_p": 1.0, "cfg_omega": 0.2,
                    "cfg_kappa": 0.92, "cfg_min_t": 0.0, "cfg_max_t": 0.75},
    "digits": _DIGITS,
    # MeanFlow on the digits (README): the same model and data in the same CPU time (400 steps
    # at ~2x the SI step cost); lr 3e-3, r < t for 75% of samples and wider times. Unguided by
    # default: --cfg-omega 3 gives 100% accuracy but a 3.5x worse distribution (README).
    "digits-meanflow": {**_DIGITS, "learning_rate": 3e-3, "max_train_steps": 400,
                        "checkpointing_steps": 200, "loss_type": "meanflow",
                        "ratio_r_not_equal_t": 0.75, "time_mu": 0.0, "time_sigma": 1.6},
}


def _unknown(kind: str, name: str, known) -> KeyError:
    return KeyError(f"unknown {kind} preset {name!r}; known: {', '.join(sorted(known))}")


def get_training_config(name: str = "imagenet_256", **overrides) -> TrainingConfig:
    """A :class:`TrainingConfig` with preset ``name`` applied, then ``overrides``."""
    if name not in TRAINING_PRESETS:
        raise _unknown("training", name, TRAINING_PRESETS)
    values = {**TRAINING_PRESETS[name], **overrides}
    valid = {f.name for f in fields(TrainingConfig)}
    bad = sorted(set(values) - valid)
    if bad:
        raise TypeError(f"unknown training config field(s) {bad}")
    return TrainingConfig(**values)


def get_dispersive_loss_config(name: str = "default", depth: int | None = None) -> dict:
    """Keyword arguments of :class:`losses.DispersiveLoss` for preset ``name``.

    ``jax_reproduction`` reads block ``depth // 4`` (7 for SiT-XL/2); without ``depth`` its
    ``blocks`` stays ``'quarter'`` and :func:`resolve_dispersive_blocks` resolves it later.
    """
    if name not in DISPERSIVE_PRESETS:
        raise _unknown("dispersive loss", name, DISPERSIVE_PRESETS)
    cfg = dict(DISPERSIVE_PRESETS[name])
    if depth is not None:
        cfg["blocks"] = resolve_dispersive_blocks(cfg["blocks"], depth)
    return cfg


def resolve_dispersive_blocks(blocks: str | int | list, depth: int) -> str | int | list:
    """``'quarter'`` -> depth // 4 (at least 1); anything else unchanged."""
    return max(1, depth // 4) if blocks == "quarter" else blocks


# ----------------------------------------------------------------------------------------------
# Command line.

def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser(prog: str = "train.py") -> argparse.ArgumentParser:
    """argparse parser with one flag per :class:`TrainingConfig` field (defaults suppressed, so
    the caller can tell which flags were given) plus ``--preset``."""
    p = argparse.ArgumentParser(prog=prog, argument_default=argparse.SUPPRESS,
                                description="Train SiT with the interpolant loss and optional "
                                            "StableVM / dispersive / REPA terms.")
    p.add_argument("--preset", choices=sorted(TRAINING_PRESETS),
                   help="start from a preset; explicit flags override it")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in fields(TrainingConfig):
        meta = f.metadata
        g = groups.setdefault(meta["group"], p.add_argument_group(meta["group"]))
        names = [_flag(f.name), *meta["aliases"]]
        help = f"{meta['help']} (default: {f.default})"
        if isinstance(f.default, bool):
            g.add_argument(*names, dest=f.name, action=argparse.BooleanOptionalAction, help=help)
            continue
        g.add_argument(*names, dest=f.name, type=_type_of(f), choices=meta["choices"], help=help)
    return p


def _type_of(f: dataclasses.Field) -> Any:
    s = str(f.type)  # annotations are strings here (from __future__ import annotations)
    if s.startswith("int"):
        return int
    if s.startswith("float"):
        return float
    return str


def parse_config(argv: list[str] | None = None, prog: str = "train.py"
                 ) -> tuple[TrainingConfig, set[str]]:
    """Parse train.py's command line into a config (preset, then flags) and the set of fields
    given explicitly."""
    args = vars(build_parser(prog).parse_args(argv))
    preset = args.pop("preset", None)
    base = dict(TRAINING_PRESETS[preset]) if preset else {}
    base.update(args)
    return TrainingConfig(**base), set(args)

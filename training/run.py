"""Setting a run up: the accelerator, the data, the model with its EMA and optimizer, the objective
(:func:`build_run`, which writes nothing), then starting or resuming it all-or-nothing
(:func:`start`: every check before the run directory is written to), and the monitors.
"""
from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

import runtime
from common import UsageError, atomic_write_text, check_shared_directory
from configs import TrainingConfig
from losses import MemoryBank
from preprocessing.shards import ShardDataset, ShardFormatError, ShardLoader, hash_problems

from .checkpoint import Checkpointer, check_resume_settings
from .monitor import (Console, DivergenceGuard, MetricsLog, OnlineEval, Previewer, SampleGrid,
                      forwards_per_image, tracker_name, truncate_logs)
from .objective import Objective, objective_terms
from .resolve import launcher_precision, read_data_manifest, resolve


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
    """The accelerator: launch, devices and trackers (precision is ours: see below)."""
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
    """The shard dataset and this process's loader (``--epochs`` becomes a step count here)."""
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


def verify_shards(cfg: TrainingConfig, dataset: ShardDataset, accelerator, say: Console
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
    check_shared_directory(cfg.output_dir, accelerator, "--output-dir")
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
    terms = objective_terms(cfg.to_dict())
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


def write_run_config(run: Run, old: dict | None, changes: dict, step: int) -> None:
    """config.json: the current settings plus the history of what held from which step."""
    config = run_config(run)
    history = list((old or {}).get("history") or [])
    if old is None:
        history = [{"from_step": 0, "train": config["train"]}]
    elif changes:
        history.append({"from_step": step, "changed": {k: {"old": a, "new": b}
                                                       for k, (a, b) in changes.items()}})
    config["history"] = history
    atomic_write_text(run.run_dir / "config.json", json.dumps(config, indent=2) + "\n")


def make_checkpointer(run: Run) -> Checkpointer:
    """The checkpointer of ``run``: exactly the objects whose state a resume needs."""
    return Checkpointer(run.run_dir, run.accelerator, loader=run.loader, ema=run.ema,
                        scaler=run.scaler, bank=run.objective.bank,
                        keep=run.cfg.checkpoints_total_limit)


def start(run: Run, checkpoints: Checkpointer) -> tuple[int, dict | None]:
    """Begin or resume ``run``: check the settings and the checkpoint, load it, then write
    config.json and the log. Returns the step to continue from and the checkpoint's open metrics
    window. Nothing is written until every check has passed."""
    cfg = run.cfg
    saved = run.run_dir / "config.json"
    path, skipped = checkpoints.choose(cfg.resume, cfg.resume_step, strict=cfg.resume != "latest")
    old = json.loads(saved.read_text()) if (path or skipped) and saved.is_file() else None
    changes = {} if old is None else check_resume_settings(
        old, cfg, data_sha=run.manifest_sha, data_count=len(run.dataset),
        input_size=run.dataset.latent_shape[1], run_dir=run.run_dir)
    step, log_window = checkpoints.load(path) if path is not None else (0, None)
    # -- every check passed: from here on the run directory is written ------------------------
    if run.is_main:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        write_run_config(run, old, changes, step)
        run.say.attach(run.run_dir / "log.txt")
        checkpoints.set_aside(skipped)
        # a kill between a checkpoint's rename and its EMA export leaves the previous export
        # behind; a run resumed at its final step would otherwise never replace it
        if step and checkpoints.exported_step() != step:
            checkpoints.export_ema(step)
    run.say(summary(run))
    for p, why in skipped:
        run.say(f"skipped checkpoint {p.name}: {why} (moved to .damaged-{p.name})")
    if step:
        run.say(f"resumed from {checkpoints.dir / f'step-{step:07d}'} at step {step}")
    run.accelerator.wait_for_everyone()
    if run.is_main:
        truncate_logs(run.run_dir, step)
    return step, log_window


def make_metrics(run: Run, bar) -> MetricsLog:
    """log.jsonl, trackers and progress bar; MFU from the model's MACs and the device's peak."""
    cfg = run.cfg
    peak = (cfg.peak_tflops * 1e12 if cfg.peak_tflops else
            runtime.peak_flops(run.device, cfg.mixed_precision, cfg.allow_tf32))
    return MetricsLog(run.accelerator, run.run_dir / "log.jsonl", bar,
                      images_per_step=cfg.batch_size,
                      flops_per_image=2 * forwards_per_image(cfg) * run.macs, peak_flops=peak,
                      scaler=run.scaler, epoch=lambda: run.loader.epoch)


def make_guard(run: Run, step: int, checkpoints: Checkpointer) -> DivergenceGuard:
    """The divergence guard over the trained weights and the EMA."""
    weights = list(run.trainable) + list(run.ema_params)
    return DivergenceGuard(run.accelerator, step, weights=weights,
                           scaler_enabled=run.scaler.is_enabled(),
                           max_skips=run.cfg.max_consecutive_skips,
                           latest_checkpoint=checkpoints.latest)


def make_previews(run: Run) -> tuple[SampleGrid, OnlineEval]:
    """Sample grids and online evaluation, both sampling the EMA model through one
    :class:`Previewer` (MeanFlow runs: what the model is for, one step without sampling CFG)."""
    cfg, ds, meanflow = run.cfg, run.dataset, run.cfg.loss_type == "meanflow"
    preview = Previewer(run.ema, ds.latent_shape, mode="meanflow" if meanflow else "ode",
                        seed=cfg.seed, path_type=cfg.path_type, vae=cfg.vae,
                        latent_scale=ds.scale.flatten(), latent_bias=ds.bias.flatten(),
                        device=run.device, say=run.say)
    grid = SampleGrid(preview, run.accelerator, run.run_dir / "samples",
                      torch.arange(cfg.num_sample_images, device=run.device) % cfg.num_classes,
                      num_steps=1 if meanflow else cfg.sample_num_steps,
                      cfg_scale=cfg.sample_cfg_scale)
    metric, headline = online_metric(cfg, ds, run.device, run.is_main)
    from samplers import make_labels
    labels = torch.from_numpy(make_labels(cfg.eval_samples, cfg.num_classes, "equal", cfg.seed))
    evaluation = OnlineEval(preview, run.accelerator, run.run_dir / "eval.jsonl", run.say,
                            every=cfg.eval_every, labels=labels.to(run.device),
                            num_steps=cfg.eval_num_steps or (1 if meanflow else 50),
                            cfg_scale=cfg.eval_cfg_scale, metric=metric, headline=headline)
    return grid, evaluation


def online_metric(cfg: TrainingConfig, dataset: ShardDataset, device: torch.device,
                  is_main: bool) -> tuple[object, tuple[str, ...]]:
    """The metric of ``--eval-every`` and the numbers it prints: the digits metric on digits
    shards (docs/CONVENTIONS.md §12), else the ADM suite against ``--eval-reference`` with the
    ``--inception`` weights (loaded on the main process only, which evaluates)."""
    if not cfg.eval_every:
        return None, ()
    if dataset.manifest.get("source", {}).get("type") == "digits":
        import functools

        from evaluation.digits import comparison_for_data, digits_metrics
        try:  # shards of a digits subset: against the digits the model never saw
            comparison = comparison_for_data(dataset.manifest)
        except ValueError as e:
            raise UsageError(f"--eval-every: {e}") from None
        # the headline alone: a run's curve is read across steps and seeds, not per point
        metric = functools.partial(digits_metrics, splits=0, comparison=comparison)
        return metric, ("fd_ratio", "precision", "recall") + (("copies",) if comparison else ())
    if not cfg.eval_reference:
        raise UsageError("--eval-every needs digits shards (the digits metric) or "
                         "--eval-reference REF.npz with --inception WEIGHTS (FID and friends)")
    if not Path(cfg.eval_reference).is_file():
        raise UsageError(f"--eval-reference {cfg.eval_reference} does not exist")
    if not is_main:
        return None, ()
    from evaluation.adm import NpzImages, compute_metrics
    from models.inception import load_inception
    from models.vae import WeightsNotFound
    try:
        inception = load_inception(cfg.inception, device)
    except WeightsNotFound as e:
        raise UsageError(str(e)) from None
    reference = cfg.eval_reference
    return (lambda images, labels: compute_metrics(images, NpzImages(reference), inception,
                                                   progress=False),
            ("fid", "sfid", "inception_score"))

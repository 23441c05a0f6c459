"""The training loop: :func:`train` reads top to bottom in one screen around :func:`train_step`.

Exact resume: every random number of step n (posterior sample, label dropout, t, noise, StableVM
draws) comes from a generator seeded with (seed, rank, n, micro-batch), and the data position,
EMA, bank and scaler are in the checkpoint, so a resumed run repeats the uninterrupted run's
losses bit for bit on CPU (docs/CONVENTIONS.md §8).
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch

from common import Preempted, Preemption, ema_decay, ema_update
from configs import TrainingConfig

from .monitor import start_trackers
from .objective import endless, step_generator
from .run import Run, build_run, make_checkpointer, make_guard, make_metrics, make_previews, start


def lr_at(step: int, cfg: TrainingConfig, total: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup, then constant/cosine."""
    if cfg.lr_warmup_steps > 0 and step < cfg.lr_warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.lr_warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.learning_rate
    span = max(1, total - cfg.lr_warmup_steps)
    progress = min(1.0, (step - cfg.lr_warmup_steps) / span)
    return cfg.lr_min + 0.5 * (cfg.learning_rate - cfg.lr_min) * (1 + math.cos(math.pi * progress))


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


def stop_agreed(preemption: Preemption, step: int, accelerator, every: int) -> bool:
    """Whether every process stops after ``step``: one process as soon as a signal arrived;
    several agree every ``every`` steps (one small all-reduce), so all stop at the same step
    without a host sync per step."""
    if accelerator.num_processes == 1:
        return preemption.requested
    if step % every:
        return False
    flag = torch.tensor(float(preemption.requested), device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="sum").item() > 0)


def train(cfg: TrainingConfig, given: set[str] | None = None) -> dict:
    """Run the training described by ``cfg`` (``given``: the fields set on the command line);
    returns a summary (final step, run directory, last logged losses)."""
    from tqdm.auto import tqdm
    run = build_run(cfg, set(given or ()))
    cfg = run.cfg
    checkpoints = make_checkpointer(run)
    step, log_window = start(run, checkpoints)
    start_trackers(run.accelerator, cfg, run.run_dir)
    grid, evaluation = make_previews(run)
    if run.objective.bank is not None and step == 0:
        run.say(run.objective.prefill_bank(run.micro_batch, run.rank, run.world))
    bar = tqdm(total=cfg.max_train_steps, initial=step, desc="train", unit="step",
               disable=not run.is_main, dynamic_ncols=True)
    # the bar is closed before an error is printed, so the message starts its own line
    with bar, Preemption() as preemption:
        metrics, guard = make_metrics(run, bar), make_guard(run, step, checkpoints)
        metrics.load_state_dict(log_window)
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
            stop_now = stop_agreed(preemption, step, run.accelerator,
                                   cfg.preemption_check_every)
            save_now = step % cfg.checkpointing_steps == 0 or last or stop_now
            if log_now:
                metrics.write(step, lr)  # the line is written (nulls for NaN) before a stop
            if log_now or grid_now or eval_now or save_now:  # points that sync anyway
                guard.check(step, weights=save_now)
            with metrics.paused():  # previews, evaluations and checkpoints are not training time
                if grid_now:
                    grid(step)
                if eval_now:
                    evaluation(step)
                    run.accelerator.wait_for_everyone()
                if save_now:
                    checkpoints.save(step, metrics.state_dict())
            if stop_now:
                break

    if step < cfg.max_train_steps:  # stopped on SIGTERM / SIGUSR1, this step's checkpoint saved
        run.accelerator.end_training()
        where = checkpoints.dir / f"step-{step:07d}"
        raise Preempted(f"stopped by {preemption.signal or 'a signal to another process'} at "
                        f"step {step}; checkpoint {where} written. Rerun the same command with "
                        "--resume latest to continue" if run.is_main else "")

    guard.check(step, weights=True)
    if cfg.sampling_steps == 0 or step % cfg.sampling_steps:
        grid(step)
    if not checkpoints.has(step):
        checkpoints.save(step, metrics.state_dict())  # e.g. resumed at the final step
    run.accelerator.wait_for_everyone()
    run.accelerator.end_training()
    if cfg.push_to_hub and run.is_main:  # after the final checkpoint and its EMA export
        from .hub import publish_run
        for line in publish_run(run.run_dir, cfg.hub_model_id):
            run.say(line)
    run.say(f"done: step {step}, run directory {run.run_dir}")
    return {"step": step, "run_dir": str(run.run_dir), "last": metrics.last}

"""The library face: training from your own loop (notebooks, other codebases) with train.py's loss
terms and random streams.

    from configs import get_training_config
    from training import train_with_dispersive_loss
    cfg = get_training_config("digits", disp=True)
    mean_loss = train_with_dispersive_loss(model, loader, optimizer, "cpu", cfg)

Random numbers follow train.py: step n of a run seeded ``seed`` draws everything (posterior
sample, label dropout, t, noise) from :func:`step_generator` ``(seed, rank 0, n, micro-batch 0)``,
so the first step here and train.py's first step on the same batch give the same loss.
"""
from __future__ import annotations

from dataclasses import asdict, is_dataclass
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn

from configs import TrainingConfig
from losses import training_losses

from .objective import dispersive_from_config, noisy_batch, step_generator


def _as_config(train_config: TrainingConfig | dict | Any) -> TrainingConfig:
    if isinstance(train_config, TrainingConfig):
        return train_config
    if is_dataclass(train_config):
        train_config = asdict(train_config)
    if isinstance(train_config, dict):
        known = TrainingConfig.__dataclass_fields__
        bad = sorted(set(train_config) - set(known))
        if bad:
            raise TypeError(f"unknown training config field(s) {bad}")
        return TrainingConfig(**train_config)
    raise TypeError(f"train_config must be a TrainingConfig or a dict, got "
                    f"{type(train_config).__name__}")


def _unpack(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(batch, dict):
        return batch["x"], batch["y"]
    x, y = batch[0], batch[1]
    return x, y


def train_with_dispersive_loss(model: nn.Module, dataloader: Iterable,
                               optimizer: torch.optim.Optimizer,
                               device: torch.device | str, train_config: TrainingConfig | dict,
                               *, start_step: int = 0,
                               to_latents: Callable[[torch.Tensor, torch.Generator], torch.Tensor]
                               | None = None, num_classes: int | None = None) -> float:
    """One pass over ``dataloader`` with SI + dispersive loss (as configured); returns the mean
    total loss.

    Deliberately leaves out what your loop owns: autocast, gradient accumulation, the fp16 grad
    scaler, EMA, the LR schedule and checkpoints (train.py's :func:`training.loop.train_step`
    has them); the batch, the loss terms and their random streams are train.py's.

    Batches are ``(x, y)`` tuples or dicts with ``x``/``y`` (a :class:`ShardLoader`'s). With
    ``to_latents`` (e.g. ``ShardLoader.to_latents`` for ``output="raw"``) x is sampled from the
    stored posterior with the step's generator, as train.py does. Gradient clipping
    (``max_grad_norm``), label dropout (``cfg_prob``), path and time sampler come from the
    config; the optimizer's learning rate is left alone.
    """
    cfg = _as_config(train_config)
    device = torch.device(device)
    base = model.module if hasattr(model, "module") else model
    depth = base.depth
    num_classes = num_classes if num_classes is not None else base.num_classes
    disp = dispersive_from_config(cfg, depth)
    model.train()
    total, n, step = torch.zeros((), device=device), 0, start_step
    for batch in dataloader:
        x, y = _unpack(batch)
        g = step_generator(cfg.seed, 0, step, 0, device)
        x = x.to(device)
        if to_latents is not None:
            x = to_latents(x, g)
        b = noisy_batch(cfg, x.float(), y.to(device), num_classes, g)
        terms = training_losses(model, b, depth=depth, path_type=cfg.path_type, disp=disp)
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                           cfg.max_grad_norm)
        optimizer.step()
        total += terms["loss"].detach()
        n += 1
        step += 1
    if n == 0:
        raise ValueError("the dataloader gave no batches")
    return float(total / n)

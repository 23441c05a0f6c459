"""What a run optimises, in one place: the training batch of the configured objective (SI, the
contrastive baseline's two views, the StableVM bank, MeanFlow's (t, r)), the regularisers
(dispersive, REPA alignment) and the per-step random generators that make resume exact.

The loss terms themselves are pure functions in :mod:`losses`; this module chooses and feeds them.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
import torch.nn as nn

import runtime
from common import UsageError, mix_seed
from configs import TrainingConfig, resolve_dispersive_blocks
from losses import (AlignmentTerm, DispersiveLoss, MemoryBank, MeanFlowLoss, build_stablevm_batch,
                    meanflow_batch, meanflow_losses, sample_time, si_batch, training_losses)
from losses.contrastive import ContrastiveLoss, contrastive_batch
from preprocessing.shards import ShardDataset, ShardLoader


def step_generator(seed: int, rank: int, step: int, micro: int,
                   device: torch.device | str = "cpu") -> torch.Generator:
    """The generator of micro-batch ``micro`` of optimizer step ``step`` on process ``rank``."""
    return torch.Generator(torch.device(device)).manual_seed(mix_seed(seed, rank, step, micro))


def objective_terms(train: dict) -> list[str]:
    """The terms a config optimises, as the run's summary and the model card name them
    (``train``: :meth:`configs.TrainingConfig.to_dict`, or config.json's ``train``)."""
    contrastive = train.get("contrastive", "none")
    return [train["loss_type"]] + (["disp"] if train.get("disp") else []) + (
        [f"contrastive {contrastive} ({train.get('contrastive_noise')} noise)"]
        if contrastive != "none" else []) + (
        ["irepa" if train.get("use_irepa") else "repa"] if train.get("use_proj_loss") else [])


def dispersive_from_config(cfg: TrainingConfig, depth: int) -> DispersiveLoss | None:
    """The :class:`DispersiveLoss` a config asks for: a :class:`ContrastiveLoss` with
    ``contrastive`` set (same lambda / tau / blocks), None without either."""
    if cfg.contrastive != "none":
        return ContrastiveLoss(cfg.disp_lambda, cfg.disp_tau, cfg.contrastive,
                               resolve_dispersive_blocks(cfg.disp_blocks, depth))
    if not cfg.disp:
        return None
    return DispersiveLoss(cfg.disp_lambda, cfg.disp_tau, cfg.disp_variant,
                          resolve_dispersive_blocks(cfg.disp_blocks, depth),
                          gather=cfg.disp_gather)


def noisy_batch(cfg: TrainingConfig, x: torch.Tensor, y: torch.Tensor, num_classes: int,
                generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The interpolant batch of clean ``x``: one noisy view per image, or two (2B rows) for the
    contrastive baseline (:func:`losses.contrastive.contrastive_batch`)."""
    common = dict(num_classes=num_classes, cfg_prob=cfg.cfg_prob, path_type=cfg.path_type,
                  time_sampler=cfg.weighting, time_shift=cfg.time_shift, generator=generator)
    if cfg.contrastive != "none":
        return contrastive_batch(x, y, noise=cfg.contrastive_noise, delta=cfg.contrastive_delta,
                                 **common)
    return si_batch(x, y, **common)


class Objective:
    """Makes the training batch of the configured objective and returns its named loss terms.

    SI: noise the loader's latents (:func:`noisy_batch`: one view, or two for the contrastive
    baseline). StableVM: push them into the memory bank and draw the batch from it
    (:func:`losses.build_stablevm_batch`). MeanFlow: draw (t, r) and noise
    (:func:`losses.meanflow_batch`); the target is a JVP through the plain module. With REPA the
    frozen encoders' features of the batch's images are the alignment targets.
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
        """The named terms of one forward pass of ``model`` (``loss`` is their weighted sum)."""
        with runtime.autocast(self.device, self.cfg.mixed_precision):
            if self.mf is not None:
                return meanflow_losses(model, self.raw_forward, b, depth=self.depth, mf=self.mf,
                                       disp=self.disp, null_label=self.cfg.num_classes,
                                       align=self.align, align_targets=targets)
            return training_losses(model, b, depth=self.depth, path_type=self.cfg.path_type,
                                   disp=self.disp, align=self.align, align_targets=targets)

    def prefill_bank(self, micro_batch: int, rank: int, world: int) -> str:
        """Fill the StableVM bank before step 0 from its own data stream (so the training data
        order does not depend on it); returns the line to print."""
        cfg = self.cfg
        prefill_loader = ShardLoader(self.loader.ds, micro_batch, rank=rank, world_size=world,
                                     seed=mix_seed(cfg.seed, 0xBA4C), hflip=cfg.hflip,
                                     output="raw")
        g = step_generator(cfg.seed, rank, -1, 0xF111, self.device)
        mode = "full" if cfg.prefill_bank_fully else "one_per_class"
        try:
            info = self.bank.prefill(
                endless(prefill_loader), mode,
                latents_fn=lambda b: self.loader.to_latents(b["x"].to(self.device), g),
                max_batches=100 * (len(prefill_loader) + 1))
        except RuntimeError as e:
            raise UsageError(str(e)) from None
        return f"StableVM bank prefilled ({mode}): {info['samples']} samples; {self.bank}"


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

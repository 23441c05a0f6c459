"""The training objective shared by train.py and the Python API: build a noisy batch, run the model
once, and return the named loss terms. The loop only weights and sums them (already done here in
``loss``); nothing in this module keeps state.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn

from .alignment import alignment_loss
from .dispersive import DispersiveLoss
from .interpolant import interpolate, sample_time, si_loss


@dataclass(frozen=True)
class AlignmentTerm:
    """How the REPA term is weighted: ``coeff * alignment_loss(..., schedule, tau, k, gamma)``."""
    coeff: float = 0.5
    schedule: str = "none"
    tau: float = 0.7
    k: float = 20.0
    spatial_norm_gamma: float | None = None  # iREPA's gamma; None: plain REPA targets


def drop_labels(y: torch.Tensor, num_classes: int, cfg_prob: float,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Replace each label by the null label ``num_classes`` with probability ``cfg_prob``.

    The uniform draw happens even when ``cfg_prob`` is 0, so the random stream (and therefore
    every later draw) does not depend on the setting.
    """
    if not 0.0 <= cfg_prob <= 1.0:
        raise ValueError(f"cfg_prob must be in [0, 1], got {cfg_prob}")
    gdev = generator.device if generator is not None else y.device
    drop = (torch.rand(y.shape[0], generator=generator, device=gdev) < cfg_prob).to(y.device)
    return torch.where(drop, torch.full_like(y, num_classes), y)


def si_batch(x: torch.Tensor, y: torch.Tensor, *, num_classes: int, cfg_prob: float = 0.0,
             path_type: str = "linear", time_sampler: str = "uniform", time_shift: float = 1.0,
             generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """A plain interpolant batch from clean latents ``x`` and labels ``y``.

    Random numbers are drawn from ``generator`` in a fixed order: label dropout, t, eps.
    Returns ``{x_t, t, y, target, x0, eps}`` with target = a'(t) x + s'(t) eps.
    """
    gdev = generator.device if generator is not None else x.device
    y = drop_labels(y, num_classes, cfg_prob, generator)
    t = sample_time(x.shape[0], time_sampler, path_type=path_type, shift=time_shift,
                    generator=generator, device=gdev).to(x.device)
    eps = torch.randn(x.shape, generator=generator, device=gdev, dtype=x.dtype).to(x.device)
    x_t, v = interpolate(x, eps, t, path_type)
    return {"x_t": x_t, "t": t, "y": y, "target": v, "x0": x, "eps": eps}


def forward_with_features(model: nn.Module, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                          *, depth: int, disp: DispersiveLoss | None = None,
                          return_proj: bool = False, **model_kwargs
                          ) -> tuple[torch.Tensor, dict | None]:
    """``(prediction, aux)`` from one forward of ``model`` that also returns the block features
    ``disp`` reads (and the projections when asked); ``aux`` is None when nothing extra was
    asked for. ``model_kwargs`` go to the model (e.g. MeanFlow's ``r``)."""
    blocks = disp.feature_blocks(depth) if disp is not None else None
    out = model(x_t, t, y, return_features=blocks, return_proj=return_proj, **model_kwargs)
    return out if isinstance(out, tuple) else (out, None)


def add_dispersive(terms: dict[str, torch.Tensor], total: torch.Tensor,
                   disp: DispersiveLoss | None, aux: dict | None, depth: int) -> torch.Tensor:
    """Record the unweighted dispersive term in ``terms['disp']`` (for a
    :class:`~losses.contrastive.ContrastiveLoss` its negative part, and the positive part in
    ``terms['contrast_pos']``) and return ``total`` plus the weighted regulariser (``total``
    unchanged when ``disp`` is None)."""
    if disp is None:
        return total
    d = disp(aux["features"], depth)
    terms["disp"] = d["disp"]
    if "pos" in d:  # a contrastive term: its positive part beside the negative one
        terms["contrast_pos"] = d["pos"]
    return total + d["loss"]


def add_alignment(terms: dict[str, torch.Tensor], total: torch.Tensor,
                  align: AlignmentTerm | None, aux: dict | None,
                  align_targets: Sequence[torch.Tensor] | None, t: torch.Tensor,
                  path_type: str = "linear") -> torch.Tensor:
    """Record the unweighted REPA term in ``terms['proj']`` and return ``total`` plus
    ``align.coeff`` times it (``total`` unchanged when ``align`` is None)."""
    if (align is None) != (align_targets is None):
        raise ValueError("the alignment term needs both `align` and `align_targets`")
    if align is None:
        return total
    a = alignment_loss(aux["proj"], list(align_targets), t, align.schedule, align.tau, align.k,
                       align.spatial_norm_gamma, path_type)
    terms["proj"] = a["loss"]
    return total + align.coeff * a["loss"]


def training_losses(model: nn.Module, batch: dict[str, torch.Tensor], *, depth: int,
                    path_type: str = "linear", disp: DispersiveLoss | None = None,
                    align: AlignmentTerm | None = None,
                    align_targets: Sequence[torch.Tensor] | None = None
                    ) -> dict[str, torch.Tensor]:
    """One forward pass of ``model`` on ``batch`` (from :func:`si_batch` or
    :func:`~losses.stablevm.build_stablevm_batch`) and the named terms.

    Returns ``{'loss': total, 'si': ..., ['disp': unweighted dispersive, 'proj': unweighted
    alignment]}`` as 0-d tensors; ``total = si + disp.lambda_disp * disp + align.coeff * proj``.
    ``depth`` is the model's number of blocks (the model may be wrapped by DDP/compile).
    """
    if (align is None) != (align_targets is None):
        raise ValueError("the alignment term needs both `align` and `align_targets`")
    pred, aux = forward_with_features(model, batch["x_t"], batch["t"], batch["y"], depth=depth,
                                      disp=disp, return_proj=align is not None)
    si = si_loss(pred, batch["x0"], batch["eps"], batch["t"], path_type, target=batch["target"])
    terms = {"si": si["loss"]}
    total = add_dispersive(terms, si["loss"], disp, aux, depth)
    terms["loss"] = add_alignment(terms, total, align, aux, align_targets, batch["t"], path_type)
    return terms

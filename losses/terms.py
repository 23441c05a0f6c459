"""Named loss terms of one forward pass: the denoising term plus the weighted regularisers
(dispersive / contrastive, REPA alignment). Pure functions; what a run optimises -- which batch,
which terms, with which generator -- is composed in :mod:`training.objective`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn

from .alignment import alignment_loss
from .dispersive import DispersiveLoss
from .interpolant import si_loss


@dataclass(frozen=True)
class AlignmentTerm:
    """How the REPA term is weighted: ``coeff * alignment_loss(..., schedule, tau, k, gamma)``."""
    coeff: float = 0.5
    schedule: str = "none"
    tau: float = 0.7
    k: float = 20.0
    spatial_norm_gamma: float | None = None  # iREPA's gamma; None: plain REPA targets


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
    """One forward pass of ``model`` on ``batch`` (from :func:`~losses.interpolant.si_batch` or
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

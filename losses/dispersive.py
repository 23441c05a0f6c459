"""Dispersive loss (Wang & He 2025, "Diffuse and Disperse"; docs/CONVENTIONS.md §5).

A contrastive-style regulariser without positive pairs: it pushes the intermediate token features
of different samples in a batch apart. For block features z of shape (B, T, D), each sample is
flattened to one row z_i of length M = T * D, and for pairs (i, j):

- ``infonce_l2`` (the paper's default): ``log mean_{i,j} exp(-||z_i - z_j||^2 / (M tau))`` over
  all B x B pairs, diagonal included. Identical rows (or B = 1) give 0, widely spread rows -log B.
- ``infonce_cosine``: ``log mean_{i,j} exp(-D_ij / tau)`` with ``D_ij = -cos(z_i, z_j)``; all pairs,
  diagonal included. Its value for B = 1 or identical rows is 1/tau (cos = 1), not 0; only the
  gradient matters.
- ``hinge``: ``mean_{i != j} max(0, margin - D_ij)^2`` with ``D_ij = ||z_i - z_j||^2 / M`` (squared
  distance per feature, so the margin does not depend on T and D, as in ``infonce_l2``). B = 1
  gives 0 (no pair); identical rows give margin^2.
- ``covariance``: rows l2-normalised, centred over the batch, ``Cov = Zc^T Zc / (B - 1)`` and the
  loss is ``sum_{m != n} Cov_mn^2``. M is ~300k for SiT-XL, so the M x M matrix is never formed:
  ``||Zc^T Zc||_F^2 = ||Zc Zc^T||_F^2`` (a B x B Gram) minus the diagonal ``sum_m Cov_mm^2``
  (O(B M)). B = 1 or identical rows give 0.

Extra negatives (``negatives``, e.g. the other ranks' rows from :func:`gather_negatives`): with
local rows L (B of them) and negatives N (B' rows), the pairs are i in L and j in L ∪ N
(a B x (B + B') matrix). InfoNCE variants average over all B (B + B') pairs, the B self-pairs
(i, i) included; hinge averages over the B (B + B' - 1) pairs with j != i. For ``covariance`` the
covariance is that of the union L ∪ N (mean and B + B' - 1 from the union). Gradients reach only
the tensors that carry them; :func:`gather_negatives` returns detached rows, so each rank's loss
moves only its own rows (the usual "local anchors, global negatives" scheme).

All maths runs in fp32 with autocast disabled (bf16/fp16 features are upcast), on the input's
device, and the result is an fp32 scalar. Squared distances come from norms and one matmul:
rows are first shifted by the (detached) mean of the local rows, which leaves distances
unchanged but keeps the norms small, so the ``|a|^2 + |b|^2 - 2ab`` cancellation stays accurate;
the result is clamped at 0 and self-distances are set to exactly 0. No square root is taken, so
identical rows have finite gradients (``pdist(z).pow(2)`` gives NaN there).
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from common import pairwise_sq_dists

VARIANTS = ("infonce_l2", "infonce_cosine", "hinge", "covariance")

__all__ = ["VARIANTS", "dispersive_loss", "gather_negatives", "DispersiveLoss"]


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"unknown dispersive loss variant {variant!r}; choices: "
                         f"{', '.join(VARIANTS)}")


def _sq_dists(zl: torch.Tensor, za: torch.Tensor) -> torch.Tensor:
    """(B, B + B') squared L2 distances between local rows ``zl`` and all rows ``za``."""
    # Distances are translation invariant: shifting by the local mean keeps them exact while
    # making the norms (and so the cancellation error) as small as possible. Detached because the
    # shift's gradient cancels analytically.
    shift = zl.mean(dim=0, keepdim=True).detach()
    d = pairwise_sq_dists(zl - shift, za - shift)
    # Self-pairs are exactly 0 (rounding could leave a tiny positive value).
    eye = torch.eye(zl.shape[0], za.shape[0], dtype=torch.bool, device=d.device)
    return d.masked_fill(eye, 0.0)


def _log_mean_exp(logits: torch.Tensor) -> torch.Tensor:
    # logsumexp - log(count): no overflow/underflow whatever the scale of the exponents.
    return torch.logsumexp(logits.flatten(), dim=0) - math.log(logits.numel())


def dispersive_loss(z: torch.Tensor, variant: str = "infonce_l2", tau: float = 1.0,
                    hinge_margin: float = 1.0, negatives: torch.Tensor | None = None
                    ) -> torch.Tensor:
    """Dispersive loss of a batch of features ``z`` (B, ...) -> fp32 scalar (see module doc).

    ``tau`` is the temperature of the InfoNCE variants, ``hinge_margin`` the hinge's margin,
    ``negatives`` optional extra rows (B', ...) with the same per-sample size M used as j only.
    """
    _check_variant(variant)
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    if z.ndim < 1 or z.shape[0] == 0:
        raise ValueError(f"dispersive loss needs a non-empty batch, got shape {tuple(z.shape)}")
    # Under autocast a matmul of fp32 inputs would still run in bf16; disable it here.
    with torch.autocast(device_type=z.device.type, enabled=False):
        zl = z.reshape(z.shape[0], -1).float()
        b, m = zl.shape
        if negatives is None or negatives.numel() == 0:
            za = zl
        else:
            neg = negatives.reshape(negatives.shape[0], -1)
            if neg.shape[1] != m:
                raise ValueError(f"negatives have {neg.shape[1]} values per row, features {m}")
            za = torch.cat([zl, neg.to(device=zl.device, dtype=torch.float32)])
        n = za.shape[0]

        if variant == "infonce_l2":
            return _log_mean_exp(-_sq_dists(zl, za) / (m * tau))

        if variant == "infonce_cosine":
            # F.normalize clamps the norm, so an all-zero row gives cos 0 and finite gradients.
            cos = F.normalize(zl, dim=1) @ F.normalize(za, dim=1).T
            return _log_mean_exp(cos / tau)

        if variant == "hinge":
            if n < 2:
                return zl.sum() * 0.0  # no pair; keep the graph so backward() still works
            dd = _sq_dists(zl, za) / m
            off = ~torch.eye(b, n, dtype=torch.bool, device=dd.device)
            return F.relu(hinge_margin - dd[off]).square().mean()

        # covariance
        if n < 2:
            return zl.sum() * 0.0
        zc = F.normalize(za, dim=1)
        zc = zc - zc.mean(dim=0, keepdim=True)
        gram = zc @ zc.T                                   # (n, n): ||Zc Zc^T||_F = ||Zc^T Zc||_F
        fro2 = gram.square().sum()
        diag2 = zc.square().sum(dim=0).square().sum()      # sum_m ((Zc^T Zc)_mm)^2 in O(n M)
        return (fro2 - diag2) / (n - 1) ** 2


def gather_negatives(z: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """The other processes' rows of ``z``, flattened to (B_other, M), without gradient.

    With torch.distributed initialised and world size > 1, ``z`` is all-gathered (every rank must
    pass the same shape, as a drop-last data loader gives) and the rows of the other ranks are
    returned concatenated in rank order, this rank's own rows excluded (they are the local rows
    of :func:`dispersive_loss`). Otherwise an empty (0, M) tensor. Device and dtype follow ``z``.
    """
    flat = z.detach().reshape(z.shape[0], -1)
    if not (dist.is_available() and dist.is_initialized()):
        return flat.new_zeros((0, flat.shape[1]))
    world = dist.get_world_size(group)
    if world < 2:
        return flat.new_zeros((0, flat.shape[1]))
    rank = dist.get_rank(group)
    flat = flat.contiguous()
    with torch.no_grad():
        bufs = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(bufs, flat, group=group)
    return torch.cat([buf for r, buf in enumerate(bufs) if r != rank])


BlockSpec = str | int | Iterable[int]


class DispersiveLoss(nn.Module):
    """Dispersive regulariser over one or several SiT blocks; returns named terms.

    ``forward(features)`` -> ``{'loss': lambda_disp * disp, 'disp': mean over the chosen blocks,
    'per_block': {k: value}}``; the training loop adds ``'loss'`` to the SI loss.

    ``blocks``: ``'last'`` (default), ``'all'``, a block number (1-indexed: the token output after
    that many blocks, as ``SiT(return_features=...)``), a list of them, or a string such as
    ``"7"`` / ``"4,8"``. Ask the model for ``loss.feature_blocks(model.depth)``.

    Defaults are the PyTorch reference (lambda 0.25, tau 1, last block, InfoNCE-L2, local batch).
    The paper's JAX setting is lambda 0.5, tau 0.5 on block depth // 4 (7 for SiT-XL).
    ``gather=True`` adds the other ranks' rows as negatives (:func:`gather_negatives`).
    """

    def __init__(self, lambda_disp: float = 0.25, tau: float = 1.0, variant: str = "infonce_l2",
                 blocks: BlockSpec = "last", gather: bool = False, hinge_margin: float = 1.0):
        super().__init__()
        _check_variant(variant)
        if tau <= 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        if lambda_disp < 0:
            raise ValueError(f"lambda_disp must be >= 0, got {lambda_disp}")
        self.lambda_disp, self.tau, self.variant = float(lambda_disp), float(tau), variant
        self.blocks = self._parse_blocks(blocks)
        self.gather, self.hinge_margin = bool(gather), float(hinge_margin)

    @staticmethod
    def _parse_blocks(blocks: BlockSpec) -> str | list[int]:
        if isinstance(blocks, str):
            if blocks in ("last", "all"):
                return blocks
            try:
                blocks = [int(p) for p in blocks.split(",") if p.strip()]
            except ValueError:
                raise ValueError(f"blocks must be 'last', 'all', a block number or a list of "
                                 f"them, got {blocks!r}") from None
        elif isinstance(blocks, int) and not isinstance(blocks, bool):
            blocks = [blocks]
        elif isinstance(blocks, Iterable):
            blocks = list(blocks)
        ints = isinstance(blocks, list) and all(
            isinstance(k, int) and not isinstance(k, bool) for k in blocks)
        if not ints or not blocks:
            raise ValueError(f"blocks must be 'last', 'all', a block number or a non-empty list "
                             f"of them, got {blocks!r}")
        return list(dict.fromkeys(blocks))  # drop repeats, keep order

    def feature_blocks(self, depth: int) -> list[int]:
        """The 1-indexed block numbers this loss reads in a model of ``depth`` blocks."""
        if self.blocks == "last":
            return [depth]
        if self.blocks == "all":
            return list(range(1, depth + 1))
        bad = [k for k in self.blocks if not 1 <= k <= depth]
        if bad:
            raise ValueError(f"dispersive loss blocks {bad} outside 1..{depth} (block k is the "
                             f"output after k blocks of a depth-{depth} model)")
        return list(self.blocks)

    def forward(self, features: dict[int, torch.Tensor], depth: int | None = None
                ) -> dict[str, torch.Tensor | dict[int, torch.Tensor]]:
        """Loss terms from ``features`` ({block number: (B, T, D)}, as SiT returns them).

        With ``depth`` the blocks are resolved by :meth:`feature_blocks`; without it 'last' is
        the highest block present and 'all' every block present.
        """
        per_block = {}
        for k in self._chosen(features, depth):
            z = features[k]
            neg = gather_negatives(z) if self.gather else None
            per_block[k] = dispersive_loss(z, self.variant, self.tau, self.hinge_margin, neg)
        disp = torch.stack(list(per_block.values())).mean()
        return {"loss": self.lambda_disp * disp, "disp": disp, "per_block": per_block}

    def _chosen(self, features: dict[int, torch.Tensor], depth: int | None) -> list[int]:
        """The block numbers to read, checked against the ``features`` present."""
        if not features:
            raise ValueError("no features given; call the model with "
                             "return_features=loss.feature_blocks(model.depth)")
        if depth is not None:
            chosen = self.feature_blocks(depth)
        elif self.blocks == "last":
            chosen = [max(features)]
        elif self.blocks == "all":
            chosen = sorted(features)
        else:
            chosen = list(self.blocks)
        missing = [k for k in chosen if k not in features]
        if missing:
            raise ValueError(f"features of blocks {missing} missing (got {sorted(features)}); "
                             "request them with return_features=loss.feature_blocks(model.depth)")
        return chosen

    def extra_repr(self) -> str:
        return (f"lambda_disp={self.lambda_disp}, tau={self.tau}, variant={self.variant!r}, "
                f"blocks={self.blocks!r}, gather={self.gather}")

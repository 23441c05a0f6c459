"""The contrastive baselines of the dispersive-loss paper (Wang & He 2025; docs/CONVENTIONS.md §13).

Each image of the batch is noised twice (two "views"); both views are denoised (the SI loss is
averaged over the 2B rows) and a contrastive term on the block features of the views pulls each
image's two views together (the positive term) while pushing all rows apart (the negative term,
exactly the dispersive form of :mod:`losses.dispersive` computed on the 2B rows of both views).
Dropping the positive term gives the dispersive loss of a doubled batch, so the two regularisers
differ only in the positive pairs.

For views z1, z2 (B rows each, flattened to M = T * D values per row), the positive term per form:

- ``infonce_l2``: ``mean_i ||z1_i - z2_i||^2 / (M tau)``; with the negative term this is
  ``-log(exp(-D_+ / tau) / mean_j exp(-D_ij / tau))``, InfoNCE with the L2 distance per feature.
- ``infonce_cosine``: ``mean_i -cos(z1_i, z2_i) / tau`` (D = -cos, as the dispersive form).
- ``hinge``: ``mean_i (||z1_i - z2_i||^2 / M)^2``: the squared distance of the positive pair, the
  classic contrastive (Hadsell et al.) partner of the hinge on negatives.
- ``covariance``: ``mean_i ||n(z1_i) - n(z2_i)||^2`` on l2-normalised rows (the rows the covariance
  term uses; = 2 - 2 cos), the invariance term of VICReg beside its covariance term.

Noise of the views (:func:`contrastive_batch`): ``independent`` draws t and eps per view;
``restricted`` draws eps per view and t2 within ``delta`` of t1 (``delta`` 0: the same t).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .dispersive import DispersiveLoss, _check_variant, dispersive_loss
from .interpolant import interpolate, sample_time
from .interpolant import drop_labels

NOISE_MODES = ("independent", "restricted")

__all__ = ["NOISE_MODES", "ContrastiveLoss", "contrastive_batch", "contrastive_loss",
           "positive_term", "restricted_times"]


def positive_term(z1: torch.Tensor, z2: torch.Tensor, variant: str = "infonce_l2",
                  tau: float = 1.0) -> torch.Tensor:
    """The positive (pull) term of ``variant`` for paired rows of ``z1`` and ``z2`` (B, ...),
    an fp32 scalar (see the module doc)."""
    _check_variant(variant)
    if z1.shape != z2.shape or z1.ndim < 1 or z1.shape[0] == 0:
        raise ValueError(f"the two views need the same non-empty shape, got {tuple(z1.shape)} "
                         f"and {tuple(z2.shape)}")
    with torch.autocast(device_type=z1.device.type, enabled=False):
        a = z1.reshape(z1.shape[0], -1).float()
        b = z2.reshape(z2.shape[0], -1).float()
        m = a.shape[1]
        if variant == "infonce_l2":
            return (a - b).square().sum(1).mean() / (m * tau)
        if variant == "infonce_cosine":
            return -F.cosine_similarity(a, b, dim=1, eps=1e-12).mean() / tau
        if variant == "hinge":
            return ((a - b).square().sum(1) / m).square().mean()
        return (F.normalize(a, dim=1) - F.normalize(b, dim=1)).square().sum(1).mean()


def contrastive_loss(z1: torch.Tensor, z2: torch.Tensor, variant: str = "infonce_l2",
                     tau: float = 1.0, hinge_margin: float = 1.0) -> dict[str, torch.Tensor]:
    """``{'loss': pos + neg, 'pos': ..., 'neg': ...}`` for the two views ``z1``, ``z2`` (B, ...).

    ``neg`` is :func:`~losses.dispersive.dispersive_loss` of the 2B rows ``cat(z1, z2)`` (so each
    row's partner view is among its negatives, as in InfoNCE's denominator).
    """
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    pos = positive_term(z1, z2, variant, tau)
    neg = dispersive_loss(torch.cat([z1, z2]), variant, tau, hinge_margin)
    return {"loss": pos + neg, "pos": pos, "neg": neg}


def restricted_times(t1: torch.Tensor, delta: float,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """t2 = t1 + U(-delta, delta), reflected back into [0, 1], so |t2 - t1| <= delta.

    Reflection (not clamping) keeps t2 uniform on [0, 1] when t1 is: the reflected kernel is
    symmetric, so it maps the uniform law to itself. ``delta`` 0 returns ``t1`` itself (no draw).
    """
    if not 0.0 <= delta <= 1.0:
        raise ValueError(f"delta must be in [0, 1], got {delta}")
    if delta == 0.0:
        return t1.clone()
    gdev = generator.device if generator is not None else t1.device
    u = torch.rand(t1.shape, generator=generator, device=gdev, dtype=t1.dtype).to(t1.device)
    t2 = t1 + delta * (2 * u - 1)
    t2 = torch.where(t2 < 0, -t2, t2)
    return torch.where(t2 > 1, 2 - t2, t2)


def contrastive_batch(x: torch.Tensor, y: torch.Tensor, *, num_classes: int,
                      noise: str = "independent", delta: float = 0.0, cfg_prob: float = 0.0,
                      path_type: str = "linear", time_sampler: str = "uniform",
                      time_shift: float = 1.0, generator: torch.Generator | None = None
                      ) -> dict[str, torch.Tensor]:
    """Two noisy views of every image: an SI batch of 2B rows, view 1 first, view 2 second.

    Both views of an image keep the same (possibly dropped) label. Draw order from
    ``generator``: label dropout, t1, [t2: independent draw, or the restricted offset], eps1, eps2.
    Returns ``{x_t, t, y, target, x0, eps}`` like :func:`losses.interpolant.si_batch`.
    """
    if noise not in NOISE_MODES:
        raise ValueError(f"unknown contrastive noise {noise!r}; choices: {', '.join(NOISE_MODES)}")
    gdev = generator.device if generator is not None else x.device
    y = drop_labels(y, num_classes, cfg_prob, generator)

    def times() -> torch.Tensor:
        return sample_time(x.shape[0], time_sampler, path_type=path_type, shift=time_shift,
                           generator=generator, device=gdev)

    t1 = times()
    t2 = times() if noise == "independent" else restricted_times(t1, delta, generator)
    t = torch.cat([t1, t2]).to(x.device)
    eps = torch.randn((2,) + tuple(x.shape), generator=generator, device=gdev,
                      dtype=x.dtype).to(x.device).flatten(0, 1)
    x0 = torch.cat([x, x])
    x_t, v = interpolate(x0, eps, t, path_type)
    return {"x_t": x_t, "t": t, "y": torch.cat([y, y]), "target": v, "x0": x0, "eps": eps}


class ContrastiveLoss(DispersiveLoss):
    """The contrastive regulariser on a two-view batch (rows ``[:B]`` view 1, ``[B:]`` view 2).

    Same blocks / lambda / tau / form as :class:`~losses.dispersive.DispersiveLoss`;
    ``forward(features)`` returns ``{'loss': lambda * contrast, 'disp': mean negative term,
    'pos': mean positive term, 'contrast': pos + disp, 'per_block': {k: contrast_k}}``, so a log
    shows the negative part on the same scale as a dispersive run.
    """

    def __init__(self, lambda_disp: float = 0.25, tau: float = 1.0, variant: str = "infonce_l2",
                 blocks="last", hinge_margin: float = 1.0):
        super().__init__(lambda_disp, tau, variant, blocks, gather=False,
                         hinge_margin=hinge_margin)

    def forward(self, features: dict[int, torch.Tensor], depth: int | None = None
                ) -> dict[str, torch.Tensor | dict[int, torch.Tensor]]:
        chosen = self._chosen(features, depth)
        per_block, pos, neg = {}, [], []
        for k in chosen:
            z = features[k]
            if z.shape[0] % 2:
                raise ValueError(f"a two-view batch has an even number of rows, got {z.shape[0]}")
            z1, z2 = z.chunk(2)
            c = contrastive_loss(z1, z2, self.variant, self.tau, self.hinge_margin)
            per_block[k] = c["loss"]
            pos.append(c["pos"])
            neg.append(c["neg"])
        pos_m, neg_m = torch.stack(pos).mean(), torch.stack(neg).mean()
        return {"loss": self.lambda_disp * (pos_m + neg_m), "disp": neg_m, "pos": pos_m,
                "contrast": pos_m + neg_m, "per_block": per_block}

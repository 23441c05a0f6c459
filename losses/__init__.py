"""Losses as pure functions returning named terms; the training loop only weights and sums them.

- :mod:`losses.interpolant`: paths (linear, cosine), training-time samplers, the SI loss.
- :mod:`losses.dispersive`: the dispersive regulariser (Wang & He 2025) and its module wrapper.
"""
from .dispersive import VARIANTS as DISPERSIVE_VARIANTS
from .dispersive import DispersiveLoss, dispersive_loss, gather_negatives
from .interpolant import (PATH_TYPES, TIME_SAMPLERS, expand_t_like, interpolate,
                          path_coefficients, sample_time, si_loss)

__all__ = ["DISPERSIVE_VARIANTS", "DispersiveLoss", "dispersive_loss", "gather_negatives",
           "PATH_TYPES", "TIME_SAMPLERS", "expand_t_like", "interpolate", "path_coefficients",
           "sample_time", "si_loss"]

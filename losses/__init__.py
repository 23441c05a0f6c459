"""Losses as pure functions returning named terms; the training loop only weights and sums them.

- :mod:`losses.interpolant`: paths (linear, cosine), training-time samplers, the SI batch and loss.
- :mod:`losses.terms`: one forward pass -> the named terms (SI + weighted regularisers).
- :mod:`losses.dispersive`: the dispersive regulariser (Wang & He 2025) and its module wrapper.
- :mod:`losses.contrastive`: that paper's contrastive baselines (two noisy views per image).
- :mod:`losses.stablevm`: the StableVM memory bank, the stable target and batch construction.
- :mod:`losses.alignment`: REPA alignment, VA-REPA time weights, iREPA spatial normalisation.
- :mod:`losses.meanflow`: MeanFlow (average-velocity) times, JVP target, guidance and loss.
"""
from .alignment import (ALIGN_MODES, VA_SCHEDULES, align_tokens, alignment_loss,
                        spatial_normalize, va_weights)
from .contrastive import ContrastiveLoss, contrastive_batch, contrastive_loss
from .dispersive import VARIANTS as DISPERSIVE_VARIANTS
from .dispersive import DispersiveLoss, dispersive_loss, gather_negatives
from .interpolant import (PATH_TYPES, TIME_SAMPLERS, drop_labels, expand_t_like, interpolate,
                          path_coefficients, sample_time, si_batch, si_loss)
from .meanflow import (MeanFlowLoss, average_velocity_jvp, guided_velocity, meanflow_batch,
                       meanflow_loss, meanflow_losses, meanflow_target, sample_meanflow_times)
from .stablevm import (MemoryBank, build_stablevm_batch, stable_target, stable_target_efficient,
                       strict_fp32)
from .terms import AlignmentTerm, training_losses

__all__ = ["ContrastiveLoss", "contrastive_batch", "contrastive_loss", "DISPERSIVE_VARIANTS", "DispersiveLoss", "dispersive_loss", "gather_negatives",
           "PATH_TYPES", "TIME_SAMPLERS", "expand_t_like", "interpolate", "path_coefficients",
           "sample_time", "si_loss", "drop_labels", "si_batch", "AlignmentTerm", "training_losses", "ALIGN_MODES", "VA_SCHEDULES", "align_tokens",
           "alignment_loss", "spatial_normalize", "va_weights",
           "MemoryBank", "build_stablevm_batch", "stable_target", "stable_target_efficient",
           "strict_fp32", "MeanFlowLoss", "average_velocity_jvp", "guided_velocity",
           "meanflow_batch", "meanflow_loss", "meanflow_losses", "meanflow_target",
           "sample_meanflow_times"]

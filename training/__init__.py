"""Training SiT: what train.py runs, as a package.

- :mod:`training.resolve`: complete and check a :class:`configs.TrainingConfig` against the data.
- :mod:`training.run`: set-up (accelerator, data, model + EMA, optimizer, objective), start or
  resume, and the wiring of the monitors.
- :mod:`training.objective`: what is optimised -- batches, loss terms, regularisers, per-step
  random generators.
- :mod:`training.loop`: :func:`train` and :func:`train_step`, the LR schedule.
- :mod:`training.checkpoint`: checkpoints (atomic, verified, pruned) and the EMA export.
- :mod:`training.monitor`: console, trackers, metrics log, divergence guard, sample grids,
  online evaluation.
- :mod:`training.load`: :func:`load_run` -- a trained run's model and settings, for sampling.
- :mod:`training.hub`: a run as a Hub model folder (:class:`~training.hub.HubSiT`, a model card)
  and its upload (``train.py --push-to-hub``, export.py).
- :mod:`training.api`: :func:`train_with_dispersive_loss`, for your own loop.
"""
from .api import train_with_dispersive_loss
from .load import load_run
from .loop import train, train_step

__all__ = ["train", "train_step", "train_with_dispersive_loss", "load_run"]

"""Measuring generated images; ``evaluate.py`` is its command line.

- :mod:`evaluation.images`: image sources (.npz batch, array, shard directory, image folder).
- :mod:`evaluation.adm`: the ADM suite (IS, FID, sFID, precision/recall) and reference batches.
- :mod:`evaluation.digits`: the distribution metric for models trained on the sklearn digits.

Nothing is imported here: each module imports what it uses (``evaluation.images`` alone does not
load the Inception).
"""

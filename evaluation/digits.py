"""A distribution metric for models trained on the sklearn digits (``evaluate.py digits``;
docs/CONVENTIONS.md §12).

Class accuracy alone rewards mode-seeking (guided sampling can reach 100% while far from the data);
this measures how close the generated set is to the real digits as a distribution, in the hidden
features of a small classifier fitted on a fixed half of the real digits (real A): Frechet
distance over its real floor (the other half, real B, at the same count), precision/recall (ADM's
k-NN manifolds, in float64), class accuracy, within-class diversity relative to real, and
nearest-neighbour copies of real A, with a bootstrap spread.

``digits_metrics(images, labels, seed, splits)`` returns every number as a dict,
``format_digits_metrics`` the table ``evaluate.py digits`` prints; ``digits_class_accuracy`` is the
class accuracy alone, by the same classifier (``evaluate.py digits-accuracy``).
"""
from __future__ import annotations

import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common import pairwise_sq_dists
from evaluation.adm import PR_K, frechet_distance, precision_recall
from evaluation.images import check_images

__all__ = ["DIGITS_SPLIT_SEED", "DIGITS_HIDDEN", "DIGITS_COPY_PERCENTILE", "DIGITS_MIN_SAMPLES",
           "DIGITS_FLOOR_DRAWS", "DIGITS_RESAMPLES", "DIGITS_INTERVAL", "DIGITS_STREAM_FLOOR",
           "DIGITS_STREAM_PR", "DIGITS_STREAM_BOOTSTRAP", "digits_pixels", "digits_real_images",
           "DigitsReference", "digits_reference", "digits_subsample", "Comparison",
           "all_digits_comparison", "heldout_comparison", "comparison_for_data", "digits_metrics",
           "digits_class_accuracy", "format_digits_metrics", "read_labelled_npz"]

DIGITS_SPLIT_SEED = 0        # the fixed stratified split: real A (classifier, reference) / real B
DIGITS_HIDDEN = 128          # width of the classifier's hidden layer = feature dimension
DIGITS_COPY_PERCENTILE = 1.0  # copy threshold: this percentile of real B's NN distances to real A
DIGITS_MIN_SAMPLES = 5
DIGITS_FLOOR_DRAWS = 10      # the floor is the mean over this many real-B subsamples
DIGITS_RESAMPLES = 100       # bootstrap resamples of the generated set for the headline interval
DIGITS_INTERVAL = 90.0       # its central percent
# Random streams of digits_subsample / the bootstrap (np.random.default_rng([seed, stream])).
DIGITS_STREAM_FLOOR, DIGITS_STREAM_PR, DIGITS_STREAM_BOOTSTRAP = 1, 2, 3


def digits_pixels(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, 3) digit images (H, W multiples of 8) -> (N, 64) in sklearn's 0..16 scale.

    Inverts encode.py's digits path: grey = mean over RGB, H x W area-averaged to 8 x 8, and
    uint8 u = round(v * 255 / 16) -> v = u * 16 / 255.
    """
    if images.ndim != 4 or images.shape[-1] != 3 or images.shape[1] % 8 or images.shape[2] % 8:
        raise ValueError(f"expected uint8 (N, H, W, 3) with H, W multiples of 8, got "
                         f"{images.shape}")
    n, h, w, _ = images.shape
    grey = images.astype(np.float64).mean(axis=-1)
    grey = grey.reshape(n, 8, h // 8, 8, w // 8).mean(axis=(2, 4))
    return (grey * 16.0 / 255.0).reshape(n, 64)


def digits_real_images() -> tuple[np.ndarray, np.ndarray]:
    """The 1797 sklearn digits as a perfect generator would write them to samples.npz: 8x8 values
    v in 0..16 -> uint8 round(v * 255 / 16) (encode.py's digits path), grey copied to RGB."""
    from sklearn.datasets import load_digits
    d = load_digits()
    u = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)
    return np.repeat(u[..., None], 3, axis=-1), d.target.astype(np.int64)


class DigitsReference:
    """The fixed parts of the digits metric: the real halves and the feature classifier.

    Real A (898 digits) and real B (899) are a stratified half/half split with a fixed seed.
    Pixels are sklearn's 64-d 0..16 vectors after the uint8 round trip of samples.npz, so a real
    digit and a perfect sample of it are identical. The classifier is an MLP (one ReLU hidden
    layer of 128 units, Adam, L2 1e-3, fixed seed) on standardised pixels, (x - mean_A) /
    (std_A + 1) (the +1, one grey level, keeps never-inked border pixels from being blown up),
    fitted on real A; the features are its hidden activations, computed here with numpy.
    """

    def __init__(self):
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.model_selection import train_test_split
        from sklearn.neural_network import MLPClassifier

        images, labels = digits_real_images()
        pixels = digits_pixels(images)
        ia, ib = train_test_split(np.arange(len(labels)), test_size=0.5,
                                  random_state=DIGITS_SPLIT_SEED, stratify=labels)
        ia, ib = np.sort(ia), np.sort(ib)
        self.images_a, self.images_b = images[ia], images[ib]
        self.pixels_a, self.pixels_b = pixels[ia], pixels[ib]
        self.labels_a, self.labels_b = labels[ia], labels[ib]
        self.mean = self.pixels_a.mean(0)
        self.scale = self.pixels_a.std(0) + 1.0
        clf = MLPClassifier((DIGITS_HIDDEN,), activation="relu", solver="adam", alpha=1e-3,
                            max_iter=1000, random_state=DIGITS_SPLIT_SEED)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf.fit((self.pixels_a - self.mean) / self.scale, self.labels_a)
        self.w1, self.b1 = clf.coefs_[0], clf.intercepts_[0]
        self.w2, self.b2 = clf.coefs_[1], clf.intercepts_[1]
        self.features_a = self.features(self.pixels_a)
        self.features_b = self.features(self.pixels_b)
        self.heldout_accuracy = float((self.predict(self.features_b) == self.labels_b).mean())
        for v in vars(self).values():
            if isinstance(v, np.ndarray):
                v.setflags(write=False)

    def features(self, pixels: np.ndarray) -> np.ndarray:
        """(N, 64) pixels in the 0..16 scale -> (N, 128) hidden-layer activations (float64)."""
        return np.maximum(((np.asarray(pixels, np.float64) - self.mean) / self.scale) @ self.w1
                          + self.b1, 0.0)

    def predict(self, features: np.ndarray) -> np.ndarray:
        """Class predicted from hidden activations (argmax of the output layer, as sklearn)."""
        return np.argmax(features @ self.w2 + self.b2, axis=1)


_DIGITS_REFERENCE: DigitsReference | None = None


def digits_reference() -> DigitsReference:
    """The (deterministic) :class:`DigitsReference`, built once per process (~0.5 s)."""
    global _DIGITS_REFERENCE
    if _DIGITS_REFERENCE is None:
        _DIGITS_REFERENCE = DigitsReference()
    return _DIGITS_REFERENCE


def digits_subsample(total: int, n: int, seed: int, stream: int, draw: int = 0) -> np.ndarray:
    """Sorted indices of ``n`` of ``total`` items drawn without replacement (all when
    ``n >= total``) by ``np.random.default_rng([seed, stream, draw])``; each use has its own
    stream (DIGITS_STREAM_FLOOR: real B for the floor, draws 0..DIGITS_FLOOR_DRAWS-1;
    DIGITS_STREAM_PR: real A for precision/recall, draw 0)."""
    if n >= total:
        return np.arange(total)
    rng = np.random.default_rng([seed, stream, draw])
    return np.sort(rng.choice(total, n, replace=False))


def _fd_features(f1: np.ndarray, f2: np.ndarray) -> float:
    """Frechet distance of Gaussians fitted to two feature sets (N-1 covariances, ADM's sqrtm)."""
    return frechet_distance(f1.mean(0), np.cov(f1, rowvar=False),
                            f2.mean(0), np.cov(f2, rowvar=False))


def _nn_distances(x: np.ndarray, ref: np.ndarray, rows: int = 512) -> np.ndarray:
    """Euclidean distance of every row of ``x`` to its nearest row of ``ref`` (float64, exact
    differences: a copy of a real digit is exactly 0 from it)."""
    xt, rt = torch.tensor(x, dtype=torch.float64), torch.tensor(ref, dtype=torch.float64)
    out = np.empty(len(x))
    for a in range(0, len(x), rows):
        d = pairwise_sq_dists(xt[a:a + rows], rt, exact=True)
        out[a:a + len(d)] = np.sqrt(d.min(1).values.numpy())
    return out


def _mean_pairwise(f: np.ndarray) -> float:
    from scipy.spatial.distance import pdist
    return float(pdist(f).mean())


def _as_images(images: Any) -> np.ndarray:
    images = images.cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    check_images(images.shape, images.dtype, "samples")
    return images


def _checked_labels(labels: Any, n: int) -> np.ndarray:
    labels = np.asarray(labels).reshape(-1)
    if labels.shape[0] != n:
        raise ValueError(f"{n} images but {labels.shape[0]} labels")
    if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or labels.max() > 9:
        raise ValueError("labels must be integers 0..9 (the digit classes)")
    return labels


def _class_accuracy(pred: np.ndarray, labels: np.ndarray) -> tuple[float, dict[int, float]]:
    """Overall and per requested class fraction of ``pred == labels``."""
    per_class = {int(c): float((pred[labels == c] == c).mean()) for c in np.unique(labels)}
    return float((pred == labels).mean()), per_class


@dataclass(frozen=True)
class Comparison:
    """The real digits that generated ones are measured against (features of the classifier,
    pixels on the 0..16 scale): the FD reference, the pool the floor is drawn from (also the
    diversity and class reference), the digits a sample may copy, and real digits outside those
    that set the copy threshold."""
    label: str
    ref_name: str
    features_ref: np.ndarray
    floor_name: str
    features_floor: np.ndarray
    labels_floor: np.ndarray
    copy_name: str
    pixels_copy: np.ndarray
    probe_name: str
    pixels_probe: np.ndarray


def all_digits_comparison(ref: DigitsReference) -> Comparison:
    """The default: a model trained on all digits, against real A, floor and copy threshold from
    real B (which the model also saw: see docs/CONVENTIONS.md §12)."""
    return Comparison("all digits: real A / real B", "real A", ref.features_a, "real B",
                      ref.features_b, ref.labels_b, "real A", ref.pixels_a, "real B",
                      ref.pixels_b)


def heldout_comparison(ref: DigitsReference, subset_size: int, subset_seed: int = 0,
                       hflip: bool = False, side: str = "train") -> Comparison:
    """A model trained on ``encode.py --subset train --subset-size N --subset-seed S``: FD
    against one stratified half of the digits it never saw (held-out 1), floor from the other
    half (held-out 2), copies against the training subset (with its mirror images when the data
    were encoded with ``--hflip``), threshold from all held-out digits. ``side='heldout'``: the
    model was trained on the other side of the split (``--subset heldout``)."""
    from sklearn.model_selection import train_test_split

    from preprocessing.sources import digits_subset_indices
    images, labels = digits_real_images()
    pixels = digits_pixels(images)
    train, held = digits_subset_indices(labels, subset_size, subset_seed)
    if side == "heldout":
        train, held = held, train
    h1, h2 = train_test_split(held, test_size=0.5, random_state=DIGITS_SPLIT_SEED,
                              stratify=labels[held])
    h1, h2 = np.sort(h1), np.sort(h2)
    copy = pixels[train]
    if hflip:  # the model saw each training digit mirrored too
        copy = np.concatenate([copy, copy.reshape(-1, 8, 8)[:, :, ::-1].reshape(-1, 64)])
    return Comparison(
        f"held-out: trained on {len(train)} digits (subset seed {subset_seed}"
        f"{', mirrored' if hflip else ''}), measured against the {len(held)} others",
        "held-out 1", ref.features(pixels[h1]), "held-out 2", ref.features(pixels[h2]),
        labels[h2], "training subset", copy, "held-out", pixels[held])


def comparison_for_data(manifest: dict) -> Comparison | None:
    """The comparison for a model trained on the shards described by ``manifest`` (the data
    folder's manifest.json): held-out when they are one side of a digits split (``encode.py
    --subset``), None (all digits) otherwise. ValueError for shards of part of a subset."""
    src = manifest.get("source") or {}
    if src.get("type") != "digits" or not src.get("subset"):
        return None
    config = manifest.get("config") or {}
    if config.get("max_images") is not None and config["max_images"] < src["num_files"]:
        raise ValueError("the shards hold only part of their digits subset (--max-images): "
                         "encode the whole subset for a held-out evaluation")
    return heldout_comparison(digits_reference(), src["subset_size"], src["subset_seed"],
                              bool(manifest.get("hflip")), side=src["subset"])


def _frechet_and_floors(feats: np.ndarray, cmp: Comparison, seed: int
                        ) -> tuple[float, list[float]]:
    """FD of ``feats`` against the reference, and the floor draws: the floor pool at the same
    count against the reference, DIGITS_FLOOR_DRAWS subsamples so that one lucky draw does not
    move the ratio."""
    n, n_b = len(feats), len(cmp.features_floor)
    fd = _fd_features(feats, cmp.features_ref)
    floors = [_fd_features(cmp.features_floor[digits_subsample(n_b, n, seed, DIGITS_STREAM_FLOOR,
                                                               j)], cmp.features_ref)
              for j in range(DIGITS_FLOOR_DRAWS if n < n_b else 1)]
    return fd, floors


def _within_class_diversity(feats: np.ndarray, groups: np.ndarray, cmp: Comparison
                            ) -> dict[int, float]:
    """Per class: mean pairwise feature distance of the generated digits / that of the real
    floor pool's digits of the class."""
    per_class = {}
    for c in range(10):
        fc = feats[groups == c]
        if len(fc) >= 2:
            real_c = cmp.features_floor[cmp.labels_floor == c]
            per_class[c] = _mean_pairwise(fc) / _mean_pairwise(real_c)
    return per_class


def _copies(pixels: np.ndarray, cmp: Comparison) -> dict[str, float]:
    """Pixel-space nearest neighbours among the digits a sample may copy: a sample closer than
    the DIGITS_COPY_PERCENTILE-th percentile of the same distance for real digits outside them
    counts as a copy."""
    nn_real = _nn_distances(cmp.pixels_probe, cmp.pixels_copy)
    threshold = float(np.percentile(nn_real, DIGITS_COPY_PERCENTILE))
    nn_gen = _nn_distances(pixels, cmp.pixels_copy)
    return {"copies": float((nn_gen < threshold).mean()), "copy_threshold": threshold,
            "real_b_copies": float((nn_real < threshold).mean()),
            "nn_distance_median": float(np.median(nn_gen)),
            "nn_distance_median_real_b": float(np.median(nn_real))}


def _headline_interval(feats: np.ndarray, cmp: Comparison, fd: float, floor: float, seed: int,
                       resamples: int) -> dict[str, Any]:
    """The uncertainty of the headline FD / floor that comes from the generated set being a
    sample: ``resamples`` bootstrap resamples of the generated features, each FD against the
    same reference and divided by the same (fixed) floor.

    Drawing with replacement repeats points, which raises every resampled FD by about the same
    amount; that offset (``fd_resample_bias``) is removed, so the DIGITS_INTERVAL interval is
    centred on the headline and its width is the sampling spread (docs/CONVENTIONS.md §12).
    """
    none = {"fd_interval": None, "fd_ratio_interval": None, "fd_std": None,
            "fd_ratio_std": None, "fd_resample_bias": None}
    if resamples == 0:
        return none
    n = len(feats)
    fds = np.empty(resamples)
    for k in range(resamples):
        rng = np.random.default_rng([seed, DIGITS_STREAM_BOOTSTRAP, k])
        fds[k] = _fd_features(feats[rng.integers(0, n, n)], cmp.features_ref)
    bias = float(fds.mean() - fd)
    tail = (100.0 - DIGITS_INTERVAL) / 2
    lo, hi = (float(v) for v in np.percentile(fds - bias, [tail, 100.0 - tail]))
    std = float(fds.std(ddof=1)) if resamples > 1 else 0.0
    return {"fd_interval": [lo, hi], "fd_ratio_interval": [lo / floor, hi / floor],
            "fd_std": std, "fd_ratio_std": std / floor, "fd_resample_bias": bias}


def digits_metrics(images: Any, labels: Any = None, seed: int = 0,
                   splits: int = DIGITS_RESAMPLES, comparison: Comparison | None = None
                   ) -> dict[str, Any]:
    """Distribution metric of generated digits against the real sklearn digits (§12).

    ``images``: uint8 (N, H, W, 3), H and W multiples of 8 (samples.npz's arr_0); ``labels``:
    the requested classes (arr_1), or None (class accuracy is then not reported and diversity
    groups samples by the classifier's prediction). ``seed`` drives only the subsamples of the
    real sets and the bootstrap; the split and the classifier are fixed. ``splits``: bootstrap
    resamples for the headline's interval (0: none). ``comparison``: the real sets
    (:func:`all_digits_comparison` by default, :func:`heldout_comparison` for a model trained
    on a subset). Returns a dict of plain numbers (see §12).
    """
    images = _as_images(images)
    n = len(images)
    if n < DIGITS_MIN_SAMPLES:
        raise ValueError(f"the digits metric needs at least {DIGITS_MIN_SAMPLES} samples, got {n}")
    if int(splits) != splits or splits < 0:
        raise ValueError(f"splits must be an integer >= 0, got {splits}")
    if labels is not None:
        labels = _checked_labels(labels, n)
    ref = digits_reference()
    cmp = comparison or all_digits_comparison(ref)
    pixels = digits_pixels(images)
    feats = ref.features(pixels)
    pred = ref.predict(feats)
    n_a, n_b = len(cmp.features_ref), len(cmp.features_floor)

    fd, floors = _frechet_and_floors(feats, cmp, seed)
    floor = float(np.mean(floors))
    # Precision / recall (k = 3 manifolds), the reference subsampled to the generated count.
    real_pr = cmp.features_ref[digits_subsample(n_a, n, seed, DIGITS_STREAM_PR)]
    precision, recall = precision_recall(real_pr, feats, PR_K, exact=True)
    per_class_div = _within_class_diversity(feats, labels if labels is not None else pred, cmp)
    accuracy, per_class_acc = (None, None) if labels is None else _class_accuracy(pred, labels)
    return {
        "comparison": cmp.label, "names": {"reference": cmp.ref_name, "floor": cmp.floor_name,
                                           "copies": cmp.copy_name, "probe": cmp.probe_name},
        "num_samples": n, "num_real_a": n_a, "num_real_b": n_b, "feature_dim": feats.shape[1],
        "seed": int(seed),
        "fd": fd, "fd_floor": floor, "fd_floor_std": float(np.std(floors)),
        "fd_ratio": fd / floor, "floor_samples": min(n, n_b), "floor_draws": len(floors),
        "precision": precision, "recall": recall, "pr_real_samples": min(n, n_a),
        "class_accuracy": accuracy, "per_class_accuracy": per_class_acc,
        "classifier_heldout_accuracy": ref.heldout_accuracy,
        "diversity": float(np.mean(list(per_class_div.values()))) if per_class_div else None,
        "per_class_diversity": {int(c): float(v) for c, v in per_class_div.items()},
        **_copies(pixels, cmp),
        "spread_method": "bootstrap of the generated set, floor fixed, centred on the headline",
        "spread_resamples": int(splits), "interval_percent": DIGITS_INTERVAL,
        **_headline_interval(feats, cmp, fd, floor, seed, int(splits)),
    }


def digits_class_accuracy(images: Any, labels: Any) -> dict[str, Any]:
    """Fraction of generated digits that the digits metric's classifier (the MLP fitted on real
    A, :class:`DigitsReference`) assigns to their requested ``labels``, overall and per class,
    with its accuracy on real B for scale. The same number as ``digits_metrics``'s
    ``class_accuracy``."""
    images = _as_images(images)
    labels = _checked_labels(labels, len(images))
    ref = digits_reference()
    pred = ref.predict(ref.features(digits_pixels(images)))
    accuracy, per_class = _class_accuracy(pred, labels)
    return {"accuracy": accuracy, "per_class": per_class,
            "real_heldout_accuracy": ref.heldout_accuracy, "num_images": len(images),
            "classifier": "digits metric MLP (fitted on real A)"}


def format_digits_metrics(m: dict) -> str:
    """One line per number (the table ``evaluate.py digits`` prints)."""
    def f(v, spec=".4f"):
        return "n/a" if v is None else format(v, spec)
    names = m["names"]
    floor_rel = m["fd_floor_std"] / m["fd_floor"] if m["fd_floor"] else None
    lines = [
        f"compared with: {m['comparison']}",
        f"samples: {m['num_samples']} ({names['reference']}: {m['num_real_a']}, "
        f"{names['floor']}: {m['num_real_b']}; features: {m['feature_dim']}-d classifier hidden "
        "layer)",
        f"FD vs {names['reference']}: {f(m['fd'])}",
        f"FD floor ({names['floor']}, {m['floor_samples']} images, mean of {m['floor_draws']} "
        f"draws): {f(m['fd_floor'])} +- {f(m['fd_floor_std'])} (the floor's own spread over "
        f"draws: +-{f(None if floor_rel is None else 100 * floor_rel, '.1f')}%)",
        f"FD / floor (headline): {f(m['fd_ratio'], '.3f')}",
    ]
    if m["spread_resamples"]:
        lo, hi = m["fd_ratio_interval"]
        lines.append(f"FD / floor, {m['interval_percent']:g}% interval of the headline: "
                     f"{lo:.3f} - {hi:.3f} ({m['spread_resamples']} bootstrap resamples of the "
                     "generated set against the fixed floor, centred on the headline)")
    lines += [
        f"precision (k=3, vs {m['pr_real_samples']} {names['reference']}): {f(m['precision'])}",
        f"recall (k=3, vs {m['pr_real_samples']} {names['reference']}): {f(m['recall'])}",
        f"class accuracy (requested label): {f(m['class_accuracy'])}",
        f"classifier held-out accuracy (real B): {f(m['classifier_heldout_accuracy'])}",
        f"within-class diversity / real: {f(m['diversity'], '.3f')}",
        f"copies of {names['copies']} (pixel NN distance < {m['copy_threshold']:.3f}): "
        f"{f(m['copies'])}",
        f"copies among {names['probe']} digits (same test, for scale): "
        f"{f(m['real_b_copies'])}",
        f"median pixel NN distance to {names['copies']}: {f(m['nn_distance_median'], '.3f')} "
        f"({names['probe']} digits: {f(m['nn_distance_median_real_b'], '.3f')})",
    ]
    return "\n".join(lines)


def read_labelled_npz(path: str) -> tuple[np.ndarray, np.ndarray | None]:
    """arr_0 and arr_1 (None when absent) of a samples.npz; ValueError with a plain message for
    anything else (np.load would suggest allow_pickle for a non-npz file)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not an .npz archive: pass the samples.npz that generate.py "
                         f"writes (arr_0 images, arr_1 labels)")
    with np.load(path, allow_pickle=False) as z:
        if "arr_0" not in z:
            raise ValueError(f"{path} has no images (arr_0); keys: {list(z.keys())}")
        return z["arr_0"], (z["arr_1"] if "arr_1" in z else None)


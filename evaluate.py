"""ADM-suite metrics without TensorFlow: Inception Score, FID, sFID, precision and recall.

    python evaluate.py SAMPLES.npz REFERENCE.npz --inception pt_inception-2015-12-05-6726825d.pth
    python evaluate.py make-reference SOURCE OUT.npz --inception PATH [--max-images N]
    python evaluate.py digits-accuracy SAMPLES.npz     (models trained on the sklearn digits)
    python evaluate.py digits SAMPLES.npz [--json OUT] [--seed S] [--splits K]

The numbers follow guided-diffusion's ``evaluations/evaluator.py`` (docs/CONVENTIONS.md §7):

- Features: the FID Inception-v3 (``models/inception.py``) on uint8 images resized with TF1's
  bilinear resize to 299 and mapped to (x - 128) / 128. pool3 (2048-d), Mixed_6d's 1x1 branch
  channels [:7] flattened in NHWC order (2023-d) and the logits pool3 @ W.T (no bias, 1008 classes).
- FID: Frechet distance of Gaussians fitted to pool3 (mean, covariance with N-1), trace of
  ``scipy.linalg.sqrtm(sigma1 @ sigma2)``; when that is not finite, retried with 1e-6 * I added to
  both covariances; imaginary parts are dropped when the diagonal's are below 1e-3, else an error.
  sFID: the same on the spatial features. A batch holding ``mu``/``sigma``/``mu_s``/``sigma_s``
  (an ADM reference batch, or one written by ``make-reference``) uses those instead of its images,
  for either argument, as ADM does.
- IS: softmax of the logits, split in order into chunks of 5000 (the last may be shorter),
  exp(mean KL(p(y|x) || p(y))) per chunk, averaged over chunks.
- Precision / recall (k = 3): the radius of a point is the distance to its 3rd nearest other point
  of its own set; precision is the fraction of samples inside at least one reference ball, recall
  the fraction of reference points inside at least one sample ball. The reference set is the
  first 10,000 images of the reference batch. Distances are computed in blocks in fp32 (ADM uses
  fp16 with an fp32 fallback), never as one N x N matrix.

Batches are ``.npz`` files whose ``arr_0`` is uint8 (N, H, W, 3) (what ``np.savez(path, images)``
writes and what ADM's evaluator reads); they are streamed from the file in batches, so 50k
samples never sit in memory as pixels. A GPU is used when present (TF32 off); on CPU the Inception
takes 0.5-1 s per image on a busy 2-core machine, and ``scipy.linalg.sqrtm`` of a 2048-d
covariance product 20-70 s there (``--fid-method eigh``: a few seconds, see frechet_distance).

Python: ``compute_metrics(samples, reference, model, batch_size)`` returns the same numbers as a
dict; the pieces (``frechet_distance``, ``inception_score``, ``precision_recall``, ``knn_radii``,
``compute_activations``) are pure functions of arrays.

Digits (CPU demo): ``digits_metrics(images, labels, seed, splits)`` is a distribution metric in
the hidden features of a small classifier fitted on a fixed half of the real digits: Frechet
distance over its real floor, precision/recall, class accuracy, within-class diversity and
training copies (docs/CONVENTIONS.md §12); ``digits_accuracy`` is the class accuracy alone.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from models.inception import (RESOLUTION, FIDInceptionV3, load_inception)  # noqa: E402
from models.vae import WeightsNotFound  # noqa: E402
from preprocessing.shards import ShardFormatError  # noqa: E402
from preprocessing.sources import SourceError  # noqa: E402
from runtime import strict_fp32  # noqa: E402

STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")
IS_SPLIT_SIZE = 5000
PR_REFERENCE_SIZE = 10_000
PR_K = 3
FID_EPS = 1e-6


# ----------------------------------------------------------------------------------------------
# Reading image batches: uint8 (N, H, W, 3), streamed from .npz without loading them whole.

def check_images(shape: tuple, dtype: Any, what: str = "images") -> None:
    """Raise ValueError unless ``shape``/``dtype`` describe uint8 NHWC RGB images."""
    if np.dtype(dtype) != np.uint8 or len(shape) != 4 or shape[-1] != 3:
        raise ValueError(f"{what}: expected uint8 images of shape (N, H, W, 3), got "
                         f"{np.dtype(dtype)} {tuple(shape)}" +
                         (" (channels first? transpose to NHWC)" if len(shape) == 4
                          and shape[1] == 3 and shape[-1] != 3 else ""))
    if shape[0] < 1:
        raise ValueError(f"{what}: holds no images")


class NpzImages:
    """``arr_0`` of an ADM-style ``.npz``, read in batches straight from the zip member."""

    def __init__(self, path: str | os.PathLike, key: str = "arr_0"):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such file")
        try:
            with zipfile.ZipFile(self.path) as zf:
                names = [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
        except zipfile.BadZipFile:
            raise ValueError(f"{self.path} is not an .npz file (np.savez writes one)") from None
        self.keys = names
        if key not in names:
            raise ValueError(f"{self.path} has no '{key}' array (keys: {names}); ADM batches "
                             f"keep the images in arr_0, as np.savez(path, images) writes them")
        self.key = key
        self._stats: dict | None = None
        with self._member() as f:
            self.shape, fortran, self.dtype, self._offset = _npy_header(f)
        if fortran:
            raise ValueError(f"{self.path}: {key} is Fortran-ordered; save a C-ordered array")
        check_images(self.shape, self.dtype, f"{self.path}:{key}")

    @contextlib.contextmanager
    def _member(self):
        with zipfile.ZipFile(self.path) as zf, zf.open(self.key + ".npy") as f:
            yield f

    def __len__(self) -> int:
        return int(self.shape[0])

    def batches(self, batch_size: int, limit: int | None = None) -> Iterator[np.ndarray]:
        n = len(self) if limit is None else min(limit, len(self))
        per = int(np.prod(self.shape[1:]))
        with self._member() as f:
            f.read(self._offset)
            for a in range(0, n, batch_size):
                b = min(a + batch_size, n)
                buf = f.read((b - a) * per)
                if len(buf) != (b - a) * per:
                    raise ValueError(f"{self.path}: {self.key} is truncated")
                yield np.frombuffer(buf, np.uint8).reshape((b - a,) + tuple(self.shape[1:]))

    def stats(self) -> dict[str, np.ndarray] | None:
        """mu/sigma/mu_s/sigma_s when the file holds all four (an ADM reference batch)."""
        if not all(k in self.keys for k in STAT_KEYS):
            return None
        if self._stats is None:
            with np.load(self.path) as z:
                out = {k: np.asarray(z[k], dtype=np.float64) for k in STAT_KEYS}
                if "inception_size" in z.files:
                    out["inception_size"] = int(z["inception_size"])
            self._stats = out
        return self._stats


def _npy_header(f) -> tuple[tuple, bool, np.dtype, int]:
    fmt = np.lib.format
    version = fmt.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = fmt.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, fortran, dtype = fmt.read_array_header_2_0(f)
    else:
        shape, fortran, dtype = fmt._read_array_header(f, version)  # (3, 0): utf-8 header
    return shape, fortran, dtype, f.tell()


def _as_images(images: Any, what: str):
    """Path | NpzImages | ndarray | tensor | reader -> object with len() and batches(bs, limit)."""
    if isinstance(images, (str, os.PathLike)):
        return NpzImages(images)
    if hasattr(images, "batches") and hasattr(images, "__len__"):
        return images  # NpzImages, or any reader with batches(batch_size, limit)
    arr = images.cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    check_images(arr.shape, arr.dtype, what)
    return _ArrayImages(arr)


class _ArrayImages:
    def __init__(self, arr: np.ndarray):
        self.arr = arr

    def __len__(self) -> int:
        return len(self.arr)

    def batches(self, batch_size: int, limit: int | None = None) -> Iterator[np.ndarray]:
        n = len(self.arr) if limit is None else min(limit, len(self.arr))
        for a in range(0, n, batch_size):
            yield self.arr[a:min(a + batch_size, n)]


# ----------------------------------------------------------------------------------------------
# Inception activations and their moments.

class Moments:
    """Running mean and N-1 covariance in float64 (Chan's batch merge: no cancellation)."""

    def __init__(self):
        self.n, self.mean, self.m2 = 0, None, None

    def update(self, x: torch.Tensor) -> None:
        x = x.double()
        nb = x.shape[0]
        mb = x.mean(0)
        xc = x - mb
        cb = xc.T @ xc
        if self.n == 0:
            self.n, self.mean, self.m2 = nb, mb, cb
            return
        n = self.n + nb
        delta = mb - self.mean
        self.mean = self.mean + delta * (nb / n)
        self.m2 = self.m2 + cb + torch.outer(delta, delta) * (self.n * nb / n)
        self.n = n

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        if self.n < 2:
            raise ValueError("a covariance needs at least 2 images")
        return self.mean.cpu().numpy(), (self.m2 / (self.n - 1)).cpu().numpy()


@torch.inference_mode()
def compute_activations(images: Any, model: FIDInceptionV3, batch_size: int = 100, *,
                        keep_pool: int | None = None, limit: int | None = None,
                        stats: bool = True, progress: bool = False, desc: str = "inception",
                        on_batch=None) -> dict[str, Any]:
    """Run the Inception over ``images`` (uint8 NHWC array, tensor, .npz path or NpzImages).

    Returns ``{"n", "pool3"}`` -- pool3 features (float32, the first ``keep_pool`` rows; all by
    default) -- plus ``mu``, ``sigma``, ``mu_s``, ``sigma_s`` and ``inception_size`` when ``stats``
    (such a dict is also a valid stats-only reference for :func:`compute_metrics`). Only the first
    ``limit`` images are read. ``on_batch(uint8 batch)`` sees every batch (make-reference).
    """
    from tqdm import tqdm

    src = _as_images(images, "images")
    n = len(src) if limit is None else min(limit, len(src))
    keep = n if keep_pool is None else min(keep_pool, n)
    device = next(model.parameters()).device
    pool = np.empty((keep, model.fc.in_features), np.float32)
    m_pool, m_spatial = Moments(), Moments()
    done = 0
    with strict_fp32(device.type, convs=True), tqdm(total=n, unit="img", desc=desc,
                                                    disable=not progress, file=sys.stderr) as bar:
        for batch in src.batches(batch_size, n):
            if on_batch is not None:
                on_batch(batch)
            x = torch.tensor(batch).to(device)  # a copy: stream buffers are read-only
            out = model(x)
            b = len(batch)
            if done < keep:
                take = min(b, keep - done)
                pool[done:done + take] = out.pool3[:take].float().cpu().numpy()
            if stats:
                m_pool.update(out.pool3)
                m_spatial.update(out.spatial)
            done += b
            bar.update(b)
    res: dict[str, Any] = {"n": done, "pool3": pool}
    if stats:
        res["mu"], res["sigma"] = m_pool.result()
        res["mu_s"], res["sigma_s"] = m_spatial.result()
        res["inception_size"] = model.resize_to
    return res


# ----------------------------------------------------------------------------------------------
# The metrics: pure functions of arrays.

def _sqrtm(a: np.ndarray) -> np.ndarray:
    from scipy import linalg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "matrix is singular": handled by the caller like ADM
        return linalg.sqrtm(a)


def _trace_sqrt_product_eigh(s1: np.ndarray, s2: np.ndarray) -> float:
    """tr sqrtm(S1 S2) = sum sqrt(eig(S1^1/2 S2 S1^1/2)): two symmetric eigensolves.

    In torch (float64, CPU): after Inception batches, torch's OpenMP threads still spin for a
    while and slow a second (numpy/OpenBLAS) thread pool down by up to 10x on a small machine.
    """
    t1, t2 = torch.tensor(s1), torch.tensor(s2)  # copies: inputs may be read-only
    w, v = torch.linalg.eigh(t1)
    r = (v * w.clamp_min(0).sqrt()) @ v.T
    m = r @ t2 @ r
    return float(torch.linalg.eigvalsh((m + m.T) / 2).clamp_min(0).sqrt().sum())


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = FID_EPS, method: str = "sqrtm") -> float:
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr(sqrtm(S1 S2)).

    ``method="sqrtm"`` (default) is ADM's computation: ``scipy.linalg.sqrtm`` of the product,
    retried with ``eps * I`` added to both covariances when the result is not finite, imaginary
    parts dropped when the diagonal's are below 1e-3 (else ValueError). ``"eigh"`` computes the
    same trace from two symmetric eigendecompositions (in torch), 5-20x faster at 2048-d on a
    small CPU; it agrees with sqrtm to ~1e-12 relative on full-rank covariances. On
    rank-deficient ones (fewer images than dimensions) both lose digits: the FID of such a set
    with itself comes out within ~1e-3 of 0 rather than 1e-6.
    """
    mu1, mu2 = (np.atleast_1d(np.asarray(m, np.float64)) for m in (mu1, mu2))
    s1, s2 = (np.atleast_2d(np.asarray(s, np.float64)) for s in (sigma1, sigma2))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != mu1.shape * 2:
        raise ValueError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma "
                         f"{s1.shape} vs {s2.shape} (features of different networks or inputs?)")
    diff = mu1 - mu2
    base = float(diff @ diff + np.trace(s1) + np.trace(s2))
    if method == "eigh":
        return base - 2.0 * _trace_sqrt_product_eigh(s1, s2)
    if method != "sqrtm":
        raise ValueError(f"unknown FID method {method!r} (sqrtm, eigh)")
    covmean = _sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        warnings.warn(f"FID: sqrtm of the covariance product is not finite (singular); adding "
                      f"{eps} * I to both covariances")
        offset = np.eye(s1.shape[0]) * eps
        covmean = _sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"FID: sqrtm has a large imaginary component "
                             f"({np.max(np.abs(covmean.imag)):.3g})")
        covmean = covmean.real
    return base - 2.0 * float(np.trace(covmean))


def inception_score(logits: Any, split_size: int = IS_SPLIT_SIZE,
                    weight: Any = None) -> float:
    """exp(mean_x KL(p(y|x) || p(y))) per ordered split of ``split_size``, averaged over splits.

    ``logits`` (N, C); or pool3 features with ``weight`` (C, D), logits = features @ weight.T
    (computed one split at a time). log-softmax in float64, so confident predictions give no NaN.
    """
    if isinstance(logits, torch.Tensor):
        feats = logits
    else:
        arr = np.asarray(logits)
        feats = torch.from_numpy(arr if arr.flags.writeable else arr.copy())
    w = None if weight is None else torch.as_tensor(weight).float()
    scores = []
    for a in range(0, feats.shape[0], split_size):
        part = feats[a:a + split_size]
        if w is not None:  # on the weight's device (the GPU in compute_metrics)
            part = part.to(w.device, torch.float32) @ w.T
        lp = torch.log_softmax(part.double(), dim=1)
        log_py = torch.logsumexp(lp, dim=0) - np.log(lp.shape[0])
        kl = (lp.exp() * (lp - log_py)).sum(1).mean()
        scores.append(float(torch.exp(kl)))
    if not scores:
        raise ValueError("inception score of an empty set")
    return float(np.mean(scores))


def _sq_dists(a: torch.Tensor, b: torch.Tensor, b_sq: torch.Tensor) -> torch.Tensor:
    d = (a * a).sum(1, keepdim=True) + b_sq[None, :] - 2.0 * (a @ b.T)
    return d.clamp_min_(0)


def _rows_per_block(n_cols: int, budget: int) -> int:
    return max(1, budget // max(1, n_cols))


def knn_radii(features: Any, k: int = PR_K, device: torch.device | str | None = None,
              block_elems: int = 1 << 25) -> np.ndarray:
    """Squared distance of every row to its k-th nearest other row (the row itself excluded).

    Computed by row blocks of at most ``block_elems`` distances (no N x N matrix).
    """
    x = torch.as_tensor(np.asarray(features, np.float32), device=device)
    return _knn_radii(x, k, block_elems).cpu().numpy()


def _knn_radii(x: torch.Tensor, k: int, block_elems: int) -> torch.Tensor:
    n = x.shape[0]
    if n <= k:
        raise ValueError(f"k-NN radii need more than k={k} points, got {n}")
    x = x - x.mean(0)  # distances are shift-invariant; centring cuts fp32 cancellation
    sq = (x * x).sum(1)
    out = torch.empty(n, dtype=torch.float32, device=x.device)
    rows = _rows_per_block(n, block_elems)
    for a in range(0, n, rows):
        d = _sq_dists(x[a:a + rows], x, sq)
        # The k+1 smallest include the point itself (distance ~0): take index k, like ADM.
        out[a:a + rows] = torch.topk(d, k + 1, dim=1, largest=False).values[:, k]
    return out


def precision_recall(reference: Any, samples: Any, k: int = PR_K,
                     device: torch.device | str | None = None,
                     block_elems: int = 1 << 25) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al.) as ADM's ManifoldEstimator does them.

    precision: fraction of ``samples`` within the k-NN ball of at least one ``reference`` point;
    recall: fraction of ``reference`` within the k-NN ball of at least one sample.
    """
    ref = torch.as_tensor(np.asarray(reference, np.float32), device=device)
    smp = torch.as_tensor(np.asarray(samples, np.float32), device=device)
    if ref.shape[1:] != smp.shape[1:]:
        raise ValueError(f"feature sizes differ: {tuple(ref.shape)} vs {tuple(smp.shape)}")
    shift = ref.mean(0)
    ref, smp = ref - shift, smp - shift
    r_ref = _knn_radii(ref, k, block_elems)
    r_smp = _knn_radii(smp, k, block_elems)
    smp_sq = (smp * smp).sum(1)
    sample_in = torch.zeros(smp.shape[0], dtype=torch.bool, device=smp.device)
    ref_in = torch.zeros(ref.shape[0], dtype=torch.bool, device=ref.device)
    rows = _rows_per_block(smp.shape[0], block_elems)
    for a in range(0, ref.shape[0], rows):
        d = _sq_dists(ref[a:a + rows], smp, smp_sq)            # (r, S)
        ref_in[a:a + rows] = (d <= r_smp[None, :]).any(1)       # recall
        sample_in |= (d <= r_ref[a:a + rows, None]).any(0)      # precision
    return float(sample_in.float().mean()), float(ref_in.float().mean())


# ----------------------------------------------------------------------------------------------
# Everything together.

def _reference_parts(reference: Any) -> tuple[Any, dict | None]:
    """-> (images or None, precomputed stats or None) from a path / NpzImages / array / dict."""
    if isinstance(reference, (str, os.PathLike)):
        reference = NpzImages(reference)
    if isinstance(reference, NpzImages):
        return reference, reference.stats()
    if isinstance(reference, dict):
        imgs = reference.get("arr_0", reference.get("images"))
        stats = {k: reference[k] for k in STAT_KEYS} if all(k in reference for k in STAT_KEYS) \
            else None
        if stats is not None and "inception_size" in reference:
            stats["inception_size"] = int(reference["inception_size"])
        if imgs is None and stats is None:
            raise ValueError("reference dict needs 'arr_0' (images) and/or mu, sigma, mu_s, "
                             "sigma_s")
        return (None if imgs is None else _as_images(imgs, "reference")), stats
    return _as_images(reference, "reference"), None


def _check_stats_size(stats: dict, model: FIDInceptionV3, what: str) -> None:
    size = stats.get("inception_size", RESOLUTION)
    if size != model.resize_to:
        raise ValueError(f"{what}: its statistics were computed with Inception input size {size}, "
                         f"this model resizes to {model.resize_to}")


def compute_metrics(sample_images: Any, reference_images_or_stats: Any, model: FIDInceptionV3,
                    batch_size: int = 100, *, progress: bool = False,
                    split_size: int = IS_SPLIT_SIZE, pr_reference_size: int = PR_REFERENCE_SIZE,
                    k: int = PR_K, fid_method: str = "sqrtm") -> dict[str, float]:
    """IS, FID, sFID, precision and recall of ``sample_images`` against the reference.

    ``sample_images``: uint8 (N, H, W, 3) array/tensor, an .npz path or :class:`NpzImages` (its
    mu/sigma/mu_s/sigma_s are used for FID/sFID when present, as ADM does). The reference: the
    same kinds, or a dict with ``arr_0`` and/or the four statistics. Precision and recall are NaN
    when the reference has no images (stats only). Runs on the model's device. ``fid_method``:
    see :func:`frechet_distance`.
    """
    samples = _as_images(sample_images, "samples")
    sample_stats = samples.stats() if isinstance(samples, NpzImages) else None
    ref_images, ref_stats = _reference_parts(reference_images_or_stats)
    device = next(model.parameters()).device
    for st, what in ((sample_stats, "samples"), (ref_stats, "reference")):
        if st is not None:
            _check_stats_size(st, model, what)

    ref_acts = None
    if ref_images is not None:
        ref_acts = compute_activations(
            ref_images, model, batch_size, keep_pool=pr_reference_size,
            limit=pr_reference_size if ref_stats is not None else None,
            stats=ref_stats is None, progress=progress, desc="reference")
        if ref_stats is None:
            ref_stats = ref_acts
    smp_acts = compute_activations(samples, model, batch_size, stats=sample_stats is None,
                                   progress=progress, desc="samples")
    if sample_stats is None:
        sample_stats = smp_acts

    out = {
        "inception_score": inception_score(smp_acts["pool3"], split_size,
                                           weight=model.fc.weight.detach()),
        "fid": frechet_distance(sample_stats["mu"], sample_stats["sigma"],
                                ref_stats["mu"], ref_stats["sigma"], method=fid_method),
        "sfid": frechet_distance(sample_stats["mu_s"], sample_stats["sigma_s"],
                                 ref_stats["mu_s"], ref_stats["sigma_s"], method=fid_method),
        "precision": float("nan"), "recall": float("nan"),
    }
    if ref_acts is None:
        warnings.warn("reference has no images: precision/recall not computed")
    elif min(len(ref_acts["pool3"]), len(smp_acts["pool3"])) <= k:
        warnings.warn(f"precision/recall need more than k={k} images in each set")
    else:
        with strict_fp32(device.type, convs=True):
            out["precision"], out["recall"] = precision_recall(
                ref_acts["pool3"], smp_acts["pool3"], k, device)
    return out


def format_metrics(m: dict[str, float]) -> str:
    return "\n".join([f"Inception Score: {m['inception_score']}", f"FID: {m['fid']}",
                      f"sFID: {m['sfid']}", f"Precision: {m['precision']}",
                      f"Recall: {m['recall']}"])


# ----------------------------------------------------------------------------------------------
# make-reference: write an ADM reference batch (arr_0 + statistics).

class _FolderImages:
    """An image folder, ADM centre-cropped, in a seeded random order (so the first 10k are a
    random subset, not the first classes); unreadable images are skipped and counted."""

    def __init__(self, root: str, size: int, seed: int, num_workers: int, limit: int | None):
        from preprocessing.sources import FolderSource

        self.source = FolderSource(root)
        order = np.random.default_rng(seed).permutation(len(self.source))
        self.order = order[:limit] if limit else order
        self.size, self.num_workers = size, num_workers
        self.failed: list[str] = []

    def __len__(self) -> int:
        return len(self.order)

    def batches(self, batch_size: int, limit: int | None = None) -> Iterator[np.ndarray]:
        order = self.order[:limit] if limit else self.order
        from preprocessing.sources import CroppedItems, collate_list

        loader = torch.utils.data.DataLoader(
            CroppedItems(self.source, order, self.size), batch_size=batch_size,
            num_workers=self.num_workers, collate_fn=collate_list)
        for items in loader:
            good = [a for _, a, _, err in items if err is None]
            self.failed += [f"{self.source.name(int(order[k]))}: {err}"
                            for k, _, _, err in items if err is not None]
            if good:
                yield np.stack(good)


class _ShardImages:
    """The stored ``images`` of a shard directory, in stored order, as NHWC."""

    def __init__(self, root: str, limit: int | None):
        from preprocessing.shards import ShardDataset

        ds = ShardDataset(root)
        if not ds.has_images:
            raise ValueError(f"{root} has no stored images: encode it with --store-images "
                             "(or point make-reference at the image folder)")
        self.shards = [t["images"] for t in ds.shards]
        total = len(ds)
        self.n = min(limit, total) if limit else total

    def __len__(self) -> int:
        return self.n

    def batches(self, batch_size: int, limit: int | None = None) -> Iterator[np.ndarray]:
        n = self.n if limit is None else min(limit, self.n)
        done = 0
        for imgs in self.shards:
            for a in range(0, imgs.shape[0], batch_size):
                if done >= n:
                    return
                part = imgs[a:a + min(batch_size, n - done)]
                done += part.shape[0]
                yield part.permute(0, 2, 3, 1).contiguous().numpy()


def _open_source(spec: str, args) -> Any:
    p = Path(spec)
    if p.is_dir() and (p / "manifest.json").is_file():
        return _ShardImages(spec, args.max_images)
    if p.is_file() and p.suffix == ".npz":
        src = NpzImages(spec)
        if args.max_images:
            n = min(args.max_images, len(src))
            return _ArrayLimited(src, n)
        return src
    if p.is_dir():
        return _FolderImages(spec, args.resolution, args.seed, args.num_workers, args.max_images)
    raise FileNotFoundError(f"{spec}: not a shard directory, an image folder or an .npz file")


class _ArrayLimited:
    def __init__(self, src, n: int):
        self.src, self.n = src, n

    def __len__(self) -> int:
        return self.n

    def batches(self, batch_size: int, limit: int | None = None) -> Iterator[np.ndarray]:
        yield from self.src.batches(batch_size, self.n if limit is None else min(limit, self.n))


def write_reference(out: str | os.PathLike, images_raw: Path, n_images: int, image_shape: tuple,
                    stats: dict[str, Any], inception_size: int) -> None:
    """Write arr_0 (streamed from a raw uint8 file) and the statistics into ``out`` atomically."""
    from common import fsync_dir

    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    fmt = np.lib.format
    try:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open("arr_0.npy", "w", force_zip64=True) as f:
                header = {"descr": fmt.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                          "shape": (n_images,) + tuple(image_shape)}
                fmt.write_array_header_1_0(f, header)
                with open(images_raw, "rb") as src:
                    while block := src.read(1 << 24):
                        f.write(block)
            arrays = {k: np.asarray(stats[k], np.float64) for k in STAT_KEYS}
            arrays["inception_size"] = np.asarray(inception_size, np.int64)
            for name, arr in arrays.items():
                with zf.open(name + ".npy", "w", force_zip64=True) as f:
                    fmt.write_array(f, arr, allow_pickle=False)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
        fsync_dir(out.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def make_reference(source: Any, out: str | os.PathLike, model: FIDInceptionV3,
                   batch_size: int = 100, ref_images: int = PR_REFERENCE_SIZE,
                   progress: bool = False) -> dict[str, Any]:
    """Statistics over every image of ``source`` and its first ``ref_images`` images as arr_0."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    raw = out.with_name(f".{out.name}.images-{os.getpid()}")
    kept = {"n": 0, "shape": None}
    try:
        with open(raw, "wb") as fh:
            def keep(batch: np.ndarray) -> None:
                if kept["shape"] is None:
                    kept["shape"] = batch.shape[1:]
                elif batch.shape[1:] != kept["shape"]:
                    raise ValueError(f"images of different sizes: {kept['shape']} and "
                                     f"{batch.shape[1:]}")
                take = min(len(batch), ref_images - kept["n"])
                if take > 0:
                    fh.write(np.ascontiguousarray(batch[:take]).tobytes())
                    kept["n"] += take

            acts = compute_activations(source, model, batch_size, keep_pool=0, progress=progress,
                                       desc="reference", on_batch=keep)
        if acts["n"] < 2:
            raise ValueError("a reference batch needs at least 2 images")
        write_reference(out, raw, kept["n"], kept["shape"], acts, model.resize_to)
    finally:
        if raw.exists():
            raw.unlink()
    return {"images": acts["n"], "arr_0": kept["n"], "path": str(out)}


# ----------------------------------------------------------------------------------------------
# CLI.

def _device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--inception", default=None,
                   help="pt_inception-2015-12-05-6726825d.pth (default: $FID_INCEPTION_WEIGHTS)")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--device", default="auto", help="auto (GPU when present), cpu, cuda, cuda:1")
    p.add_argument("--inception-size", type=int, default=RESOLUTION,
                   help="input size of the Inception (299; smaller only for quick tests: numbers "
                        "are then not comparable to published ones)")
    p.add_argument("--no-progress", action="store_true")


def _load_model(args) -> FIDInceptionV3:
    model = load_inception(args.inception, device=_device(args.device))
    model.resize_to = args.inception_size
    return model


def run_metrics(args: argparse.Namespace) -> int:
    """``evaluate.py [metrics] SAMPLES REFERENCE``: the ADM suite's numbers."""
    samples, reference = NpzImages(args.samples), NpzImages(args.reference)
    if samples.stats() is not None and reference.stats() is None:
        raise SystemExit(f"error: {args.samples} holds reference statistics and {args.reference} "
                         "does not: the order is SAMPLES REFERENCE (ADM's evaluator takes the "
                         "reference first)")
    if samples.shape[1:3] != reference.shape[1:3]:
        print(f"note: sample images are {samples.shape[1]}x{samples.shape[2]}, reference "
              f"{reference.shape[1]}x{reference.shape[2]}", file=sys.stderr)
    model = _load_model(args)
    print(f"samples: {len(samples)} images from {args.samples}; reference: {len(reference)} "
          f"images{' + statistics' if reference.stats() is not None else ''} from "
          f"{args.reference}; device {next(model.parameters()).device}", file=sys.stderr)
    metrics = compute_metrics(samples, reference, model, args.batch_size,
                              progress=not args.no_progress, fid_method=args.fid_method)
    print(format_metrics(metrics), flush=True)
    if args.json:
        from common import atomic_write_json
        atomic_write_json(args.json, {**metrics, "samples": str(args.samples),
                                      "reference": str(args.reference),
                                      "num_samples": len(samples)})
    return 0


def run_make_reference(args: argparse.Namespace) -> int:
    """``evaluate.py make-reference SOURCE OUT.npz``: an ADM-style reference batch."""
    source = _open_source(args.source, args)
    model = _load_model(args)
    info = make_reference(source, args.out, model, args.batch_size, args.ref_images,
                          progress=not args.no_progress)
    failed = getattr(source, "failed", [])
    if failed:
        print(f"skipped {len(failed)} unreadable images, e.g. {failed[:3]}", file=sys.stderr)
    print(f"wrote {info['path']}: statistics of {info['images']} images, {info['arr_0']} in arr_0")
    return 0


# ----------------------------------------------------------------------------------------------
# digits-accuracy: does a model trained on scikit-learn's digits draw the class it was asked for?

def digits_to_features(images: np.ndarray) -> np.ndarray:
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


def digits_accuracy(images: np.ndarray, labels: np.ndarray, seed: int = 0) -> dict:
    """Accuracy of an SVM fitted on half of the real sklearn digits (the other half gives its own
    held-out accuracy) at recognising ``labels`` in generated ``images``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.svm import SVC
    real = load_digits()
    x_tr, x_te, y_tr, y_te = train_test_split(real.data, real.target, test_size=0.5,
                                              random_state=seed, stratify=real.target)
    clf = SVC(gamma=0.001, C=10.0).fit(x_tr, y_tr)
    pred = clf.predict(digits_to_features(images))
    labels = np.asarray(labels).reshape(-1)
    if labels.shape[0] != pred.shape[0]:
        raise ValueError(f"{pred.shape[0]} images but {labels.shape[0]} labels")
    per_class = {int(c): float((pred[labels == c] == c).mean()) for c in np.unique(labels)}
    return {"accuracy": float((pred == labels).mean()), "per_class": per_class,
            "real_heldout_accuracy": float(clf.score(x_te, y_te)), "num_images": int(len(pred))}


def run_digits_accuracy(args: argparse.Namespace) -> int:
    """``evaluate.py digits-accuracy SAMPLES``: class accuracy of generated digits."""
    images, labels = _read_labelled_npz(args.samples)
    if labels is None:
        raise ValueError(f"{args.samples} has no labels (arr_1); sample with generate.py")
    res = digits_accuracy(images, labels)
    print(f"generated digits recognised as their class: {100 * res['accuracy']:.1f}% of "
          f"{res['num_images']} (classifier on held-out real digits: "
          f"{100 * res['real_heldout_accuracy']:.1f}%)")
    print("per class: " + ", ".join(f"{c}: {100 * a:.0f}%" for c, a in res["per_class"].items()))
    if args.json:
        from common import atomic_write_json
        atomic_write_json(args.json, {**res, "samples": str(args.samples)})
    return 0


# ----------------------------------------------------------------------------------------------
# digits: a distribution metric for models trained on the sklearn digits (docs/CONVENTIONS.md
# §12). Class accuracy alone rewards mode-seeking (guided sampling can reach 100% while far from
# the data); this measures how close the generated set is to the real digits as a distribution.

DIGITS_SPLIT_SEED = 0        # the fixed stratified split: real A (classifier, reference) / real B
DIGITS_HIDDEN = 128          # width of the classifier's hidden layer = feature dimension
DIGITS_COPY_PERCENTILE = 1.0  # copy threshold: this percentile of real B's NN distances to real A
DIGITS_MIN_SAMPLES = 5
DIGITS_FLOOR_DRAWS = 10      # the floor is the mean over this many real-B subsamples
# Random streams of digits_subsample / the bootstrap (np.random.default_rng([seed, stream])).
DIGITS_STREAM_FLOOR, DIGITS_STREAM_PR, DIGITS_STREAM_BOOTSTRAP = 1, 2, 3


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
        pixels = digits_to_features(images)
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


def _sq_dist_blocks(x: np.ndarray, y: np.ndarray,
                    rows: int = 512) -> Iterator[tuple[int, np.ndarray]]:
    """(start, squared Euclidean distances of x[start:start+rows] to every row of y), float64,
    computed from differences (scipy's cdist), so identical points are exactly 0 apart."""
    from scipy.spatial.distance import cdist
    for a in range(0, len(x), rows):
        yield a, cdist(x[a:a + rows], y, "sqeuclidean")


def _nn_distances(x: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Euclidean distance of every row of ``x`` to its nearest row of ``ref``."""
    out = np.empty(len(x))
    for a, d in _sq_dist_blocks(x, ref):
        out[a:a + len(d)] = np.sqrt(d.min(1))
    return out


def _knn_radii64(x: np.ndarray, k: int = PR_K) -> np.ndarray:
    """Squared distance of every row to its k-th nearest other row (float64 :func:`knn_radii`)."""
    out = np.empty(len(x))
    for a, d in _sq_dist_blocks(x, x):
        out[a:a + len(d)] = np.partition(d, k, axis=1)[:, k]  # index 0 is the point itself
    return out


def _precision_recall64(real: np.ndarray, fake: np.ndarray, k: int = PR_K) -> tuple[float, float]:
    """:func:`precision_recall` (ADM's k-NN manifolds) in float64 for the small digits sets."""
    r_real, r_fake = _knn_radii64(real, k), _knn_radii64(fake, k)
    fake_in = np.zeros(len(fake), bool)
    real_in = np.zeros(len(real), bool)
    for a, d in _sq_dist_blocks(real, fake):               # (rows of real, all fake)
        real_in[a:a + len(d)] = (d <= r_fake[None, :]).any(1)
        fake_in |= (d <= r_real[a:a + len(d), None]).any(0)
    return float(fake_in.mean()), float(real_in.mean())


def _mean_pairwise(f: np.ndarray) -> float:
    from scipy.spatial.distance import pdist
    return float(pdist(f).mean())


def digits_metrics(images: Any, labels: Any = None, seed: int = 0, splits: int = 5) -> dict:
    """Distribution metric of generated digits against the real sklearn digits (§12).

    ``images``: uint8 (N, H, W, 3), H and W multiples of 8 (samples.npz's arr_0); ``labels``:
    the requested classes (arr_1), or None (class accuracy is then not reported and diversity
    groups samples by the classifier's prediction). ``seed`` drives only the subsamples of the
    real halves and the bootstrap; the split and the classifier are fixed. ``splits``: number of
    bootstrap resamples for the spread (0: none). Returns a dict of plain numbers (see §12).
    """
    images = images.cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    check_images(images.shape, images.dtype, "samples")
    n = len(images)
    if n < DIGITS_MIN_SAMPLES:
        raise ValueError(f"the digits metric needs at least {DIGITS_MIN_SAMPLES} samples, got {n}")
    if int(splits) != splits or splits < 0:
        raise ValueError(f"splits must be an integer >= 0, got {splits}")
    if labels is not None:
        labels = np.asarray(labels).reshape(-1)
        if labels.shape[0] != n:
            raise ValueError(f"{n} images but {labels.shape[0]} labels")
        if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or labels.max() > 9:
            raise ValueError("labels must be integers 0..9 (the digit classes)")
    ref = digits_reference()
    pixels = digits_to_features(images)
    feats = ref.features(pixels)
    pred = ref.predict(feats)
    n_a, n_b = len(ref.features_a), len(ref.features_b)

    # Frechet distance against real A; the floor is real B at the same count (the mean over
    # DIGITS_FLOOR_DRAWS subsamples, so that one lucky draw does not move the ratio).
    fd = _fd_features(feats, ref.features_a)
    n_floor = min(n, n_b)
    floors = [_fd_features(ref.features_b[digits_subsample(n_b, n, seed, DIGITS_STREAM_FLOOR, j)],
                           ref.features_a)
              for j in range(DIGITS_FLOOR_DRAWS if n < n_b else 1)]
    floor = float(np.mean(floors))

    # Precision / recall (k = 3 manifolds), real A subsampled to the generated count.
    real_pr = ref.features_a[digits_subsample(n_a, n, seed, DIGITS_STREAM_PR)]
    precision, recall = _precision_recall64(real_pr, feats, PR_K)

    # Within-class diversity: mean pairwise feature distance, generated / real B, per class.
    groups = labels if labels is not None else pred
    per_class_div = {}
    for c in range(10):
        fc = feats[groups == c]
        if len(fc) >= 2:
            real_c = ref.features_b[ref.labels_b == c]
            per_class_div[c] = _mean_pairwise(fc) / _mean_pairwise(real_c)

    # Copies: pixel-space nearest real-A neighbour closer than real B's 1st percentile.
    nn_real = _nn_distances(ref.pixels_b, ref.pixels_a)
    threshold = float(np.percentile(nn_real, DIGITS_COPY_PERCENTILE))
    nn_gen = _nn_distances(pixels, ref.pixels_a)

    # Spread: bootstrap resamples of the generated set; each floor is a fresh real-B subsample of
    # the floor's count, bootstrapped the same way. Repeated points raise both FDs by about the
    # same amount, so the resamples' mean ratio is pulled towards 1: the std is the error bar of
    # the headline numbers, the means are not the headline (§12).
    fds, ratios = [], []
    for k in range(int(splits)):
        rng = np.random.default_rng([seed, DIGITS_STREAM_BOOTSTRAP, k])
        fd_k = _fd_features(feats[rng.integers(0, n, n)], ref.features_a)
        real_k = rng.choice(n_b, n_floor, replace=False)[rng.integers(0, n_floor, n_floor)]
        floor_k = _fd_features(ref.features_b[real_k], ref.features_a)
        fds.append(fd_k)
        ratios.append(fd_k / floor_k)

    def _ms(v: list[float]) -> tuple[float | None, float | None]:
        return (float(np.mean(v)), float(np.std(v))) if v else (None, None)

    out: dict[str, Any] = {
        "num_samples": n, "num_real_a": n_a, "num_real_b": n_b, "feature_dim": feats.shape[1],
        "seed": int(seed),
        "fd": fd, "fd_floor": floor, "fd_floor_std": float(np.std(floors)),
        "fd_ratio": fd / floor, "floor_samples": n_floor, "floor_draws": len(floors),
        "precision": precision, "recall": recall, "pr_real_samples": min(n, n_a),
        "class_accuracy": None if labels is None else float((pred == labels).mean()),
        "per_class_accuracy": None if labels is None else {
            int(c): float((pred[labels == c] == c).mean()) for c in np.unique(labels)},
        "classifier_heldout_accuracy": ref.heldout_accuracy,
        "diversity": float(np.mean(list(per_class_div.values()))) if per_class_div else None,
        "per_class_diversity": {int(c): float(v) for c, v in per_class_div.items()},
        "copies": float((nn_gen < threshold).mean()), "copy_threshold": threshold,
        "real_b_copies": float((nn_real < threshold).mean()),
        "nn_distance_median": float(np.median(nn_gen)),
        "nn_distance_median_real_b": float(np.median(nn_real)),
        "spread_method": "bootstrap", "spread_resamples": int(splits),
    }
    out["fd_mean"], out["fd_std"] = _ms(fds)
    out["fd_ratio_mean"], out["fd_ratio_std"] = _ms(ratios)
    return out


def format_digits_metrics(m: dict) -> str:
    """One line per number (the table ``evaluate.py digits`` prints)."""
    def f(v, spec=".4f"):
        return "n/a" if v is None else format(v, spec)
    lines = [
        f"samples: {m['num_samples']} (real A: {m['num_real_a']}, real B: {m['num_real_b']}; "
        f"features: {m['feature_dim']}-d classifier hidden layer)",
        f"FD vs real A: {f(m['fd'])}",
        f"FD floor (real B, {m['floor_samples']} images, mean of {m['floor_draws']} draws): "
        f"{f(m['fd_floor'])} +- {f(m['fd_floor_std'])}",
        f"FD / floor (headline): {f(m['fd_ratio'], '.3f')}",
    ]
    if m["spread_resamples"]:
        lines += [f"FD, {m['spread_resamples']} bootstrap resamples: {f(m['fd_mean'])} +- "
                  f"{f(m['fd_std'])}",
                  f"FD / floor, {m['spread_resamples']} bootstrap resamples: "
                  f"{f(m['fd_ratio_mean'], '.3f')} +- {f(m['fd_ratio_std'], '.3f')}"]
    lines += [
        f"precision (k=3, vs {m['pr_real_samples']} real A): {f(m['precision'])}",
        f"recall (k=3, vs {m['pr_real_samples']} real A): {f(m['recall'])}",
        f"class accuracy (requested label): {f(m['class_accuracy'])}",
        f"classifier held-out accuracy (real B): {f(m['classifier_heldout_accuracy'])}",
        f"within-class diversity / real: {f(m['diversity'], '.3f')}",
        f"copies of real A (pixel NN distance < {m['copy_threshold']:.3f}): {f(m['copies'])}",
        f"copies among real B (same test, for scale): {f(m['real_b_copies'])}",
        f"median pixel NN distance to real A: {f(m['nn_distance_median'], '.3f')} (real B: "
        f"{f(m['nn_distance_median_real_b'], '.3f')})",
    ]
    return "\n".join(lines)


def _read_labelled_npz(path: str) -> tuple[np.ndarray, np.ndarray | None]:
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


def run_digits(args: argparse.Namespace) -> int:
    """``evaluate.py digits SAMPLES``: distribution metric of generated sklearn digits."""
    images, labels = _read_labelled_npz(args.samples)
    if labels is None:
        print(f"note: {args.samples} has no labels (arr_1): no class accuracy; diversity groups "
              "samples by the predicted class", file=sys.stderr)
    res = digits_metrics(images, labels, seed=args.seed, splits=args.splits)
    if res["floor_samples"] < res["num_samples"]:
        print(f"note: {res['num_samples']} samples but real B has {res['num_real_b']} digits: "
              f"the floor uses all of real B", file=sys.stderr)
    print(format_digits_metrics(res), flush=True)
    if args.json:
        from common import atomic_write_json
        atomic_write_json(args.json, {**res, "samples": str(args.samples)})
    return 0


COMMANDS = {"metrics": run_metrics, "make-reference": run_make_reference,
            "digits-accuracy": run_digits_accuracy, "digits": run_digits}


def build_parser() -> argparse.ArgumentParser:
    """One subcommand per job; ``metrics`` is the default, so ADM's ``evaluate.py SAMPLES REF``
    form keeps working."""
    p = argparse.ArgumentParser(prog="evaluate.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command",
                           metavar="{metrics,make-reference,digits-accuracy,digits}",
                           help="metrics (default when omitted): IS, FID, sFID, precision, "
                                "recall of SAMPLES against REFERENCE")
    m = sub.add_parser("metrics", help="IS, FID, sFID, precision, recall (ADM suite)")
    m.add_argument("samples", help="samples .npz (arr_0 uint8 (N, H, W, 3))")
    m.add_argument("reference", help="reference batch .npz (arr_0 and optional mu/sigma/mu_s/"
                   "sigma_s), e.g. ADM's VIRTUAL_imagenet256_labeled.npz")
    m.add_argument("--json", default=None, help="also write the metrics to this JSON file")
    m.add_argument("--fid-method", choices=("sqrtm", "eigh"), default="sqrtm",
                   help="sqrtm: scipy.linalg.sqrtm as ADM (default); eigh: same trace from "
                        "symmetric eigensolves, much faster on a small CPU")
    _common(m)
    r = sub.add_parser(
        "make-reference", help="write an ADM-style reference batch",
        description="Write an ADM-style reference batch: arr_0 (the first --ref-images images) and "
                    "mu/sigma/mu_s/sigma_s over all images of SOURCE.")
    r.add_argument("source", help="shard directory encoded with --store-images, image folder "
                   "(root/<class>/<image>, ADM centre crop to --resolution), or an .npz batch")
    r.add_argument("out", help="output .npz")
    r.add_argument("--max-images", type=int, default=None, help="use only the first N images")
    r.add_argument("--ref-images", type=int, default=PR_REFERENCE_SIZE,
                   help="images kept in arr_0 for precision/recall (ADM: 10000)")
    r.add_argument("--resolution", type=int, default=256, help="crop size for an image folder")
    r.add_argument("--seed", type=int, default=0, help="order of an image folder's images")
    r.add_argument("--num-workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="image decoding processes (image folder)")
    _common(r)
    d = sub.add_parser(
        "digits-accuracy", help="class accuracy of generated sklearn digits",
        description="Fraction of generated digits (samples.npz from a model trained on the "
                    "sklearn digits) that an SVM fitted on real digits assigns to their label.")
    d.add_argument("samples", help="samples .npz with arr_0 images and arr_1 labels")
    d.add_argument("--json", default=None, help="also write the result to this JSON file")
    g = sub.add_parser(
        "digits", help="distribution metric of generated sklearn digits (FD ratio, P/R, ...)",
        description="Frechet distance / real floor, precision, recall, class accuracy, "
                    "within-class diversity and training copies of generated sklearn digits, in "
                    "the hidden features of a small classifier fitted on a fixed half of the real "
                    "digits (docs/CONVENTIONS.md §12).")
    g.add_argument("samples", help="samples .npz: arr_0 uint8 (N, H, W, 3), arr_1 labels")
    g.add_argument("--json", default=None, help="also write every number to this JSON file")
    g.add_argument("--seed", type=int, default=0,
                   help="seed of the real subsamples and the bootstrap (the split and the "
                        "classifier are fixed)")
    g.add_argument("--splits", type=int, default=5,
                   help="bootstrap resamples of the generated set for the spread (0: none)")
    return p


def main(argv: list[str] | None = None) -> int:
    from common import with_default_command
    argv = with_default_command(sys.argv[1:] if argv is None else argv, COMMANDS, "metrics")
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (WeightsNotFound, FileNotFoundError, ValueError, ShardFormatError, SourceError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

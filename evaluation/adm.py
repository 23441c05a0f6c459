"""The ADM suite without TensorFlow: Inception Score, FID, sFID, precision and recall, and
ADM-style reference batches (``evaluate.py metrics`` / ``make-reference``).

The numbers follow guided-diffusion's ``evaluations/evaluator.py`` (docs/CONVENTIONS.md §7):

- Features: the FID Inception-v3 (``models/inception.py``) on uint8 images resized with TF1's
  bilinear resize to 299 and mapped to (x - 128) / 128. pool3 (2048-d), Mixed_6d's 1x1 branch
  channels [:7] flattened in NHWC order (2023-d) and the logits pool3 @ W.T (no bias, 1008 classes).
- FID: Frechet distance of Gaussians fitted to pool3 (mean, covariance with N-1), trace of
  ``scipy.linalg.sqrtm(sigma1 @ sigma2)``; when that is not finite, retried with 1e-6 * I added to
  both covariances; imaginary parts are dropped when the diagonal's are below 1e-3, else an error.
  sFID: the same on the spatial features. A batch holding ``mu``/``sigma``/``mu_s``/``sigma_s``
  (an ADM reference batch, or one written by :func:`make_reference`) uses those instead of its
  images, for either argument, as ADM does.
- IS: softmax of the logits, split in order into chunks of 5000 (the last may be shorter),
  exp(mean KL(p(y|x) || p(y))) per chunk, averaged over chunks.
- Precision / recall (k = 3): the radius of a point is the distance to its 3rd nearest other point
  of its own set; precision is the fraction of samples inside at least one reference ball, recall
  the fraction of reference points inside at least one sample ball. The reference set is the
  first 10,000 images of the reference batch. Distances are computed in blocks in fp32 (ADM uses
  fp16 with an fp32 fallback), never as one N x N matrix; ``exact=True`` computes them in float64
  from differences (the digits metric's small sets).

Images come from :mod:`evaluation.images` (streamed, so 50k samples never sit in memory as
pixels). A GPU is used when present (TF32 off); on CPU the Inception takes 0.5-1 s per image on a
busy 2-core machine, and ``scipy.linalg.sqrtm`` of a 2048-d covariance product 20-70 s there
(``fid_method="eigh"``: a few seconds, see :func:`frechet_distance`).

``compute_metrics(samples, reference, model, batch_size)`` returns the numbers as a dict; the
pieces (:func:`frechet_distance`, :func:`inception_score`, :func:`precision_recall`,
:func:`knn_radii`, :func:`compute_activations`) are pure functions of arrays.
"""
from __future__ import annotations

import os
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from common import fsync_dir, pairwise_sq_dists
from evaluation.images import STAT_KEYS, NpzImages, as_images
from models.inception import RESOLUTION, FIDInceptionV3
from runtime import strict_fp32

__all__ = ["IS_SPLIT_SIZE", "PR_REFERENCE_SIZE", "PR_K", "FID_EPS", "STAT_KEYS", "NpzImages",
           "Moments", "compute_activations", "frechet_distance", "inception_score", "knn_radii",
           "precision_recall", "compute_metrics", "format_metrics", "write_reference",
           "make_reference"]

IS_SPLIT_SIZE = 5000
PR_REFERENCE_SIZE = 10_000
PR_K = 3
FID_EPS = 1e-6


# ----------------------------------------------------------------------------------------------
# Inception activations and their moments.

class Moments:
    """Running mean and N-1 covariance in float64 (Chan's batch merge: no cancellation)."""

    def __init__(self):
        self.n, self.mean, self.m2 = 0, None, None

    def update(self, x: torch.Tensor) -> None:
        """Add the rows of ``x`` (N, D)."""
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
        """(mean, covariance) as float64 numpy arrays."""
        if self.n < 2:
            raise ValueError("a covariance needs at least 2 images")
        return self.mean.cpu().numpy(), (self.m2 / (self.n - 1)).cpu().numpy()


@torch.inference_mode()
def compute_activations(images: Any, model: FIDInceptionV3, batch_size: int = 100, *,
                        keep_pool: int | None = None, limit: int | None = None,
                        stats: bool = True, progress: bool = False, desc: str = "inception",
                        on_batch: Callable[[np.ndarray], None] | None = None
                        ) -> dict[str, Any]:
    """Run the Inception over ``images`` (uint8 NHWC array, tensor, .npz path or NpzImages).

    Returns ``{"n", "pool3"}`` -- pool3 features (float32, the first ``keep_pool`` rows; all by
    default) -- plus ``mu``, ``sigma``, ``mu_s``, ``sigma_s`` and ``inception_size`` when ``stats``
    (such a dict is also a valid stats-only reference for :func:`compute_metrics`). Only the first
    ``limit`` images are read. ``on_batch(uint8 batch)`` sees every batch (make-reference).
    """
    from tqdm import tqdm

    src = as_images(images, "images")
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


def _rows_per_block(n_cols: int, budget: int) -> int:
    return max(1, budget // max(1, n_cols))


def knn_radii(features: Any, k: int = PR_K, device: torch.device | str | None = None,
              block_elems: int = 1 << 25, exact: bool = False) -> np.ndarray:
    """Squared distance of every row to its k-th nearest other row (the row itself excluded).

    Computed by row blocks of at most ``block_elems`` distances (no N x N matrix); fp32, or
    float64 from differences with ``exact`` (see :func:`precision_recall`).
    """
    x = torch.as_tensor(np.asarray(features, np.float64 if exact else np.float32), device=device)
    return _knn_radii(x, k, block_elems, exact).cpu().numpy()


def _knn_radii(x: torch.Tensor, k: int, block_elems: int, exact: bool) -> torch.Tensor:
    n = x.shape[0]
    if n <= k:
        raise ValueError(f"k-NN radii need more than k={k} points, got {n}")
    if not exact:
        x = x - x.mean(0)  # distances are shift-invariant; centring cuts fp32 cancellation
    sq = None if exact else x.square().sum(1)
    out = torch.empty(n, dtype=x.dtype, device=x.device)
    rows = _rows_per_block(n, block_elems)
    for a in range(0, n, rows):
        d = pairwise_sq_dists(x[a:a + rows], x, sq, exact=exact)
        # The k+1 smallest include the point itself (distance ~0): take index k, like ADM.
        out[a:a + rows] = torch.topk(d, k + 1, dim=1, largest=False).values[:, k]
    return out


def precision_recall(reference: Any, samples: Any, k: int = PR_K,
                     device: torch.device | str | None = None,
                     block_elems: int = 1 << 25, exact: bool = False) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al.) as ADM's ManifoldEstimator does them.

    precision: fraction of ``samples`` within the k-NN ball of at least one ``reference`` point;
    recall: fraction of ``reference`` within the k-NN ball of at least one sample.

    Default: fp32, rows centred on the reference mean, distances from norms and a matmul (fast on
    a GPU at ADM's 10k x 50k). ``exact=True``: float64 distances from differences
    (:func:`common.pairwise_sq_dists`), so a sample identical to a reference point is exactly 0
    from it and ties on a ball's edge are decided the same way whatever the machine or thread
    count; for small sets such as the digits metric's.
    """
    dtype = np.float64 if exact else np.float32
    ref = torch.as_tensor(np.asarray(reference, dtype), device=device)
    smp = torch.as_tensor(np.asarray(samples, dtype), device=device)
    if ref.shape[1:] != smp.shape[1:]:
        raise ValueError(f"feature sizes differ: {tuple(ref.shape)} vs {tuple(smp.shape)}")
    if not exact:  # centring would change the bits of exact differences
        shift = ref.mean(0)
        ref, smp = ref - shift, smp - shift
    r_ref = _knn_radii(ref, k, block_elems, exact)
    r_smp = _knn_radii(smp, k, block_elems, exact)
    smp_sq = None if exact else smp.square().sum(1)
    sample_in = torch.zeros(smp.shape[0], dtype=torch.bool, device=smp.device)
    ref_in = torch.zeros(ref.shape[0], dtype=torch.bool, device=ref.device)
    rows = _rows_per_block(smp.shape[0], block_elems)
    for a in range(0, ref.shape[0], rows):
        d = pairwise_sq_dists(ref[a:a + rows], smp, smp_sq, exact=exact)  # (r, S)
        ref_in[a:a + rows] = (d <= r_smp[None, :]).any(1)       # recall
        sample_in |= (d <= r_ref[a:a + rows, None]).any(0)      # precision
    return float(sample_in.to(ref.dtype).mean()), float(ref_in.to(ref.dtype).mean())


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
        return (None if imgs is None else as_images(imgs, "reference")), stats
    return as_images(reference, "reference"), None


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
    samples = as_images(sample_images, "samples")
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
    """The five lines ``evaluate.py metrics`` prints (ADM's names, full repr of each number)."""
    return "\n".join([f"Inception Score: {m['inception_score']}", f"FID: {m['fid']}",
                      f"sFID: {m['sfid']}", f"Precision: {m['precision']}",
                      f"Recall: {m['recall']}"])


# ----------------------------------------------------------------------------------------------
# make-reference: write an ADM reference batch (arr_0 + statistics).

def write_reference(out: str | os.PathLike, images_raw: Path, n_images: int, image_shape: tuple,
                    stats: dict[str, Any], inception_size: int) -> None:
    """Write arr_0 (streamed from a raw uint8 file) and the statistics into ``out`` atomically."""
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


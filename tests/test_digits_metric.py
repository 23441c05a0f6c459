"""evaluation/digits.py and ``evaluate.py digits``: the distribution metric for models trained on
the sklearn digits.

Every number is checked against a computation written here (rendering, features, Frechet
distance, precision/recall by brute force), never against the code's own saved output.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import linalg

from evaluate import main
from evaluation.digits import (DIGITS_FLOOR_DRAWS, DIGITS_HIDDEN, DIGITS_STREAM_FLOOR,
                               DIGITS_STREAM_PR, DigitsReference, digits_metrics, digits_reference,
                               digits_subsample)


def render(values: np.ndarray, upscale: int = 1) -> np.ndarray:
    """8x8 digits in sklearn's 0..16 scale -> uint8 (N, 8u, 8u, 3) as encode.py's digits path
    stores them and generate.py writes them: round(v * 255 / 16), grey to RGB, nearest upscale."""
    u = np.round(np.asarray(values, np.float64).reshape(-1, 8, 8) * 255.0 / 16.0).astype(np.uint8)
    u = u.repeat(upscale, axis=1).repeat(upscale, axis=2)
    return np.repeat(u[..., None], 3, axis=-1)


@pytest.fixture(scope="module")
def halves():
    """Real A / real B as the documented split makes them: sklearn's train_test_split, half each,
    stratified by class, random_state 0."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    d = load_digits()
    ia, ib = train_test_split(np.arange(len(d.target)), test_size=0.5, random_state=0,
                              stratify=d.target)
    ia, ib = np.sort(ia), np.sort(ib)
    return {"a": (render(d.data[ia]), d.target[ia]), "b": (render(d.data[ib]), d.target[ib])}


@pytest.fixture(scope="module")
def ref():
    return digits_reference()


def features(ref: DigitsReference, images: np.ndarray) -> np.ndarray:
    """The classifier's hidden ReLU layer on standardised 0..16 pixels, from its weights
    (8x8 images only: the pixel is the mean of R, G, B * 16 / 255)."""
    x = images.astype(np.float64).mean(-1).reshape(len(images), 64) * 16.0 / 255.0
    return np.maximum(((x - ref.mean) / ref.scale) @ ref.w1 + ref.b1, 0.0)


def frechet(f1: np.ndarray, f2: np.ndarray) -> float:
    m1, m2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def brute_precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3):
    def radii(x):  # distance to the k-th nearest other point (column 0 is the point itself)
        d = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))
        return np.sort(d, axis=1)[:, k]
    d = np.sqrt(((fake[:, None, :] - real[None, :, :]) ** 2).sum(-1))  # (fake, real)
    precision = np.mean([(d[i] <= radii(real)).any() for i in range(len(fake))])
    recall = np.mean([(d[:, j] <= radii(fake)).any() for j in range(len(real))])
    return precision, recall


def pick(images, labels, n, seed):
    idx = np.random.default_rng(seed).choice(len(labels), n, replace=False)
    return images[idx], labels[idx]


def test_reference_is_the_documented_split_and_classifier(ref, halves):
    assert np.array_equal(ref.images_a, halves["a"][0]) and np.array_equal(ref.labels_b,
                                                                           halves["b"][1])
    assert np.array_equal(ref.images_b, halves["b"][0])
    assert np.allclose(ref.features_a, features(ref, halves["a"][0]), rtol=0, atol=1e-12)
    assert ref.heldout_accuracy >= 0.97
    assert ref.features_a.shape == (898, DIGITS_HIDDEN)


def test_real_vs_real_is_at_the_floor(halves):
    imgs, labels = pick(*halves["b"], 300, seed=1)
    m = digits_metrics(imgs, labels, splits=20)
    assert 0.5 <= m["fd_ratio"] <= 2.0, m["fd_ratio"]
    assert m["precision"] > 0.7 and m["recall"] > 0.7
    assert m["class_accuracy"] >= 0.95 and 0.8 <= m["diversity"] <= 1.25
    assert m["copies"] < 0.1
    lo, hi = m["fd_ratio_interval"]
    assert lo < m["fd_ratio"] < hi and m["fd_ratio_std"] > 0
    # samples at 16x16 (nearest upscaled, as --resolution 16 stores them) give the same numbers
    assert digits_metrics(render(imgs[..., 0] * 16.0 / 255.0, upscale=2), labels,
                          splits=20) == m


def test_untrained_model_scores_far_worse(halves):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 300)
    noise = digits_metrics(rng.integers(0, 256, (300, 8, 8, 3), dtype=np.uint8), labels,
                           splits=0)
    assert noise["fd_ratio"] > 10 and noise["precision"] < 0.1
    assert noise["class_accuracy"] < 0.3 and noise["copies"] == 0.0
    yy, xx = np.mgrid[:8, :8]
    cy, cx = rng.uniform(2, 6, (2, 300))
    sd = rng.uniform(1, 2.5, 300)
    blobs = 16 * np.exp(-((yy - cy[:, None, None]) ** 2 + (xx - cx[:, None, None]) ** 2)
                        / (2 * sd[:, None, None] ** 2))
    m = digits_metrics(render(blobs), labels, splits=0)
    assert m["fd_ratio"] > 10 and m["precision"] < 0.5


def test_training_copies_are_flagged(halves):
    copies = digits_metrics(*pick(*halves["a"], 300, seed=2), splits=0)
    assert copies["copies"] > 0.9
    fresh = digits_metrics(*pick(*halves["b"], 300, seed=2), splits=0)
    assert fresh["copies"] < 0.1
    # the threshold: 1st percentile of real B's nearest-real-A distances in 0..16 pixel space
    pa = halves["a"][0][..., 0].reshape(-1, 64) * 16.0 / 255.0
    pb = halves["b"][0][..., 0].reshape(-1, 64) * 16.0 / 255.0
    nn = np.sqrt(((pb[:, None, :] - pa[None, :, :]) ** 2).sum(-1)).min(1)
    assert copies["copy_threshold"] == pytest.approx(np.percentile(nn, 1.0), rel=1e-9)


def test_identical_inputs_give_identical_output(halves):
    imgs, labels = pick(*halves["b"], 120, seed=3)
    assert digits_metrics(imgs, labels, seed=4, splits=10) == \
        digits_metrics(imgs, labels, seed=4, splits=10)
    # the classifier is refitted identically
    again = DigitsReference()
    assert np.array_equal(again.w1, digits_reference().w1)
    assert np.array_equal(again.features_b, digits_reference().features_b)


def real_plus_noise(halves, n_real: int, seed: int) -> np.ndarray:
    """``n_real`` held-out real digits followed by 20 uniform-noise images."""
    noise = np.random.default_rng(seed).integers(0, 256, (20, 8, 8, 3), dtype=np.uint8)
    return np.concatenate([pick(*halves["b"], n_real, seed=seed)[0], noise])


def test_frechet_distance_and_floor_match_scipy(ref, halves):
    imgs = real_plus_noise(halves, 180, seed=5)
    m = digits_metrics(imgs, None, seed=7, splits=0)
    fa = features(ref, halves["a"][0])
    assert m["fd"] == pytest.approx(frechet(features(ref, imgs), fa), rel=1e-7)
    fb = features(ref, halves["b"][0])
    floors = [frechet(fb[digits_subsample(len(fb), 200, 7, DIGITS_STREAM_FLOOR, j)], fa)
              for j in range(DIGITS_FLOOR_DRAWS)]
    assert m["fd_floor"] == pytest.approx(np.mean(floors), rel=1e-7)
    assert m["fd_ratio"] == pytest.approx(m["fd"] / np.mean(floors), rel=1e-7)
    assert m["floor_samples"] == 200 and m["fd_ratio_interval"] is None


def test_precision_recall_match_brute_force(ref, halves):
    imgs = real_plus_noise(halves, 40, seed=6)
    m = digits_metrics(imgs, None, seed=3, splits=0)
    fa = features(ref, halves["a"][0])
    real = fa[digits_subsample(len(fa), 60, 3, DIGITS_STREAM_PR)]
    p, r = brute_precision_recall(real, features(ref, imgs))
    assert m["precision"] == pytest.approx(p, abs=1e-12)
    assert m["recall"] == pytest.approx(r, abs=1e-12)
    assert 0 < p < 1 and 0 < r < 1  # the check is not vacuous


def test_mode_collapse_has_no_diversity(halves):
    imgs, labels = halves["b"]
    one_per_class = np.array([np.flatnonzero(labels == c)[0] for c in range(10)])
    want = np.repeat(np.arange(10), 20)
    m = digits_metrics(imgs[one_per_class][want], want, splits=0)
    assert m["diversity"] < 0.01 and m["class_accuracy"] >= 0.9
    assert max(m["per_class_diversity"].values()) < 0.01
    assert m["recall"] < 0.2


def test_spread_and_seed(halves):
    imgs, labels = pick(*halves["b"], 150, seed=8)
    a, b = digits_metrics(imgs, labels, seed=0, splits=3), digits_metrics(imgs, labels, seed=1,
                                                                          splits=3)
    assert a["spread_method"].startswith("bootstrap") and a["spread_resamples"] == 3
    assert a["fd_std"] > 0 and a["fd_ratio_std"] > 0
    assert a["fd"] == b["fd"] and a["class_accuracy"] == b["class_accuracy"]
    assert a["fd_floor"] != b["fd_floor"]  # the seed draws the real subsamples


def test_headline_interval_by_hand(ref, halves):
    """The interval is the bootstrap FDs of the generated set (streams [seed, 3, k]) against real
    A, shifted by their mean offset from the headline FD, 5th-95th percentile, over the fixed
    floor: it brackets the headline and the floor's own draws do not enter it."""
    imgs = real_plus_noise(halves, 120, seed=11)
    m = digits_metrics(imgs, None, seed=4, splits=40)
    f, fa = features(ref, imgs), features(ref, halves["a"][0])
    fds = np.array([frechet(f[np.random.default_rng([4, 3, k]).integers(0, len(f), len(f))], fa)
                    for k in range(40)])
    shifted = fds - (fds.mean() - m["fd"])
    lo, hi = np.percentile(shifted, [5, 95])
    assert m["fd_interval"] == pytest.approx([lo, hi], rel=1e-6)
    assert m["fd_ratio_interval"] == pytest.approx([lo / m["fd_floor"], hi / m["fd_floor"]],
                                                   rel=1e-6)
    assert m["fd_resample_bias"] == pytest.approx(fds.mean() - m["fd"], rel=1e-6)
    assert m["fd_resample_bias"] > 0  # repeated points inflate the bootstrap FD
    assert m["fd_ratio_interval"][0] < m["fd_ratio"] < m["fd_ratio_interval"][1]
    assert m["fd_std"] == pytest.approx(fds.std(ddof=1), rel=1e-6)


def test_more_samples_than_real_b_uses_all_of_it(ref, halves):
    imgs = np.concatenate([halves["b"][0], halves["b"][0][:101]])
    m = digits_metrics(imgs, None, splits=0)
    assert m["floor_samples"] == 899 and m["floor_draws"] == 1
    fa, fb = features(ref, halves["a"][0]), features(ref, halves["b"][0])
    assert m["fd_floor"] == pytest.approx(frechet(fb, fa), rel=1e-7)


def test_bad_inputs():
    imgs = np.zeros((10, 8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="labels"):
        digits_metrics(imgs, np.arange(10) + 5)
    with pytest.raises(ValueError, match="10 images but 9 labels"):
        digits_metrics(imgs, np.zeros(9, np.int64))
    with pytest.raises(ValueError, match="at least"):
        digits_metrics(imgs[:3], None)
    with pytest.raises(ValueError, match="uint8"):
        digits_metrics(imgs.astype(np.float32), None)


def test_cli(tmp_path, capsys, halves):
    imgs, labels = pick(*halves["b"], 200, seed=9)
    npz, out = tmp_path / "samples.npz", tmp_path / "digits.json"
    np.savez(npz, imgs, labels)
    assert main(["digits", str(npz), "--json", str(out), "--splits", "30"]) == 0
    printed = capsys.readouterr().out
    assert "FD / floor" in printed and "precision" in printed and "copies" in printed
    saved = json.loads(out.read_text())
    direct = digits_metrics(imgs, labels, splits=30)
    for key in ("fd", "fd_floor", "fd_ratio", "fd_interval", "fd_std", "fd_ratio_interval",
                "fd_ratio_std", "precision", "recall", "class_accuracy",
                "classifier_heldout_accuracy", "diversity", "copies", "copy_threshold"):
        assert saved[key] == direct[key], key
    assert saved["num_samples"] == 200 and saved["samples"] == str(npz)

    text = tmp_path / "samples.txt"
    text.write_text("not an archive\n")
    np.save(tmp_path / "arr.npy", imgs)
    for bad in (text, tmp_path / "arr.npy"):
        assert main(["digits", str(bad)]) == 2
        err = capsys.readouterr().err
        assert "is not an .npz archive" in err and "allow_pickle" not in err
    assert main(["digits", str(tmp_path / "missing.npz")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("evaluate.py: error: ") and "no such file" in err

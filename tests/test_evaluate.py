"""evaluation/adm.py, evaluate.py (its CLI) and models/inception.py: the ADM metrics against
independent computations.

The Inception has random weights built on the fly (nothing is downloaded). Most tests resize to
75 instead of 299 (same network and state dict, 16x fewer FLOPs); one test runs at 299 to check
the 2023-d sFID features.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
from evaluation import adm as ev
from evaluation.images import FolderImages
from models.inception import (WEIGHTS_FILE, FIDInceptionV3, load_inception,
                              tf1_resize_bilinear)
from models.vae import WeightsNotFound

ROOT = Path(__file__).resolve().parent.parent
SMALL = 75  # Inception input size for fast tests


@pytest.fixture(scope="module")
def model() -> FIDInceptionV3:
    torch.manual_seed(0)
    return FIDInceptionV3(resize_to=SMALL)


@pytest.fixture(scope="module")
def weights(model, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("inception") / WEIGHTS_FILE
    torch.save(model.state_dict(), path)
    return path


def rand_images(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


# ----------------------------------------------------------------------------------------------
# FID

def direct_fid(x1: np.ndarray, x2: np.ndarray, eps: float = 0.0) -> float:
    """From features, with the trace of sqrtm as the sum of sqrt of eig(S1 S2)."""
    m1, m2 = x1.mean(0), x2.mean(0)
    s1, s2 = np.cov(x1, rowvar=False), np.cov(x2, rowvar=False)
    s1, s2 = s1 + eps * np.eye(len(m1)), s2 + eps * np.eye(len(m1))
    ev_ = np.linalg.eigvals(s1 @ s2)
    tr = np.sqrt(ev_.astype(complex)).real.sum()
    return float(((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr) + \
        (0.0 if eps == 0 else -2 * eps * len(m1))  # traces above include the offset; undo it


def stats(x: np.ndarray):
    return x.mean(0), np.cov(x, rowvar=False)


@pytest.mark.parametrize("method", ["sqrtm", "eigh"])
def test_fid_of_a_set_against_itself_is_zero(method):
    x = np.random.default_rng(0).normal(size=(500, 32)) * 3 + 1
    mu, sigma = stats(x)
    assert abs(ev.frechet_distance(mu, sigma, mu, sigma, method=method)) < 1e-6


@pytest.mark.parametrize("method", ["sqrtm", "eigh"])
def test_fid_matches_direct_computation(method):
    rng = np.random.default_rng(1)
    a = rng.normal(size=(400, 24))
    b = rng.normal(size=(300, 24)) @ rng.normal(size=(24, 24)) * 0.7 + rng.normal(size=24)
    expected = direct_fid(a, b)
    got = ev.frechet_distance(*stats(a), *stats(b), method=method)
    assert expected > 1.0
    assert got == pytest.approx(expected, rel=1e-9)
    # symmetric
    assert ev.frechet_distance(*stats(b), *stats(a), method=method) == pytest.approx(got, rel=1e-9)


def test_fid_singular_covariances_and_the_eps_fallback(monkeypatch):
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(10, 50)), rng.normal(size=(12, 50)) + 0.5  # rank < dims: singular
    got = ev.frechet_distance(*stats(a), *stats(b))
    assert np.isfinite(got) and got > 0
    # Force ADM's fallback (scipy < 1.16 gave inf/nan on singular products): 1e-6 I added.
    real_sqrtm, calls = ev._sqrtm, []

    def flaky(m):
        calls.append(m)
        return np.full_like(m, np.nan) if len(calls) == 1 else real_sqrtm(m)

    monkeypatch.setattr(ev, "_sqrtm", flaky)
    with pytest.warns(UserWarning, match="not finite"):
        fb = ev.frechet_distance(*stats(a), *stats(b))
    assert len(calls) == 2 and np.isfinite(fb)
    s1, s2 = stats(a)[1], stats(b)[1]
    assert np.allclose(calls[1], (s1 + 1e-6 * np.eye(50)) @ (s2 + 1e-6 * np.eye(50)))
    assert fb == pytest.approx(direct_fid(a, b, eps=1e-6), rel=1e-5, abs=1e-5)


def test_fid_rejects_mismatched_statistics():
    with pytest.raises(ValueError, match="do not match"):
        ev.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# ----------------------------------------------------------------------------------------------
# TF1 resize

def tf1_resize_loops(img: np.ndarray, oh: int, ow: int) -> np.ndarray:
    """TF1 ResizeBilinear(align_corners=False), written from its formula. img (H, W, C)."""
    h, w = img.shape[:2]
    out = np.zeros((oh, ow, img.shape[2]))
    for i in range(oh):
        sy = i * h / oh
        y0 = math.floor(sy)
        y1 = min(y0 + 1, h - 1)
        ly = sy - y0
        for j in range(ow):
            sx = j * w / ow
            x0 = math.floor(sx)
            x1 = min(x0 + 1, w - 1)
            lx = sx - x0
            top = img[y0, x0] * (1 - lx) + img[y0, x1] * lx
            bottom = img[y1, x0] * (1 - lx) + img[y1, x1] * lx
            out[i, j] = top * (1 - ly) + bottom * ly
    return out


@pytest.mark.parametrize("src,dst", [((5, 7), (11, 13)), ((37, 23), (17, 19)),
                                     ((8, 8), (299, 299))])
def test_tf1_resize_matches_its_formula_and_not_half_pixel(src, dst):
    img = np.random.default_rng(3).random(src + (3,))
    x = torch.from_numpy(img).float().permute(2, 0, 1)[None]
    got = tf1_resize_bilinear(x, dst)[0].permute(1, 2, 0).double().numpy()
    ref = tf1_resize_loops(img, *dst)
    assert np.abs(got - ref).max() < 1e-5
    half_pixel = torch.nn.functional.interpolate(x, size=dst, mode="bilinear",
                                                 align_corners=False, antialias=False)
    assert np.abs(half_pixel[0].permute(1, 2, 0).double().numpy() - ref).max() > 1e-2


def test_tf1_resize_identity_and_preprocess(model):
    x = torch.rand(2, 3, 6, 9)
    assert torch.equal(tf1_resize_bilinear(x, (6, 9)), x)
    img = rand_images(1, 9, seed=4)
    pre = model.preprocess(torch.from_numpy(img))[0].permute(1, 2, 0).double().numpy()
    ref = (tf1_resize_loops(img[0].astype(np.float64), SMALL, SMALL) - 128) / 128
    assert np.abs(pre - ref).max() < 1e-6


# ----------------------------------------------------------------------------------------------
# Inception Score

def test_inception_score_uniform_and_confident():
    assert ev.inception_score(np.zeros((37, 1008))) == pytest.approx(1.0, abs=1e-6)
    c = 10
    onehot = np.eye(c) * 60.0  # softmax ~ one-hot, each class once
    assert ev.inception_score(onehot) == pytest.approx(c, abs=1e-6)
    # everyone confident in the same class: IS 1
    same = np.zeros((5, c)); same[:, 3] = 60.0
    assert ev.inception_score(same) == pytest.approx(1.0, abs=1e-6)


def test_inception_score_ordered_splits_last_shorter():
    # splits of 3 over 7 rows: [3 distinct classes] -> 3, [one class] -> 1, [1 row] -> 1
    logits = np.zeros((7, 4))
    for i, cls in enumerate([0, 1, 2, 3, 3, 3, 1]):
        logits[i, cls] = 60.0
    assert ev.inception_score(logits, split_size=3) == pytest.approx((3 + 1 + 1) / 3, abs=1e-6)
    # whole set: p(y) = (1, 2, 1, 3)/7, KL_i = -log p(y_i)
    py = np.array([1, 2, 1, 3]) / 7
    expect = np.exp(np.mean([-np.log(py[c]) for c in [0, 1, 2, 3, 3, 3, 1]]))
    assert ev.inception_score(logits, split_size=5000) == pytest.approx(expect, rel=1e-6)


def test_inception_score_from_pool_features_and_weight():
    rng = np.random.default_rng(5)
    pool = rng.normal(size=(9, 16)).astype(np.float32)
    w = rng.normal(size=(6, 16)).astype(np.float32)
    a = ev.inception_score(pool, split_size=4, weight=w)
    b = ev.inception_score(pool.astype(np.float64) @ w.T.astype(np.float64), split_size=4)
    assert a == pytest.approx(b, rel=1e-5)


# ----------------------------------------------------------------------------------------------
# Precision / recall

POINTS = np.array([[0, 0], [1, 0], [0, 2], [3, 0], [0, 5]], np.float32)


def test_knn_radius_by_hand():
    # distances to the other points, sorted; the 3rd is the radius
    # (0,0): 1, 2, 3, 5 -> 3     (1,0): 1, 2, sqrt5 -> sqrt5   (0,2): 2, sqrt5, 3 -> 3
    # (3,0): 2, 3, sqrt13 -> sqrt13   (0,5): 3, 5, sqrt26 -> sqrt26
    r = ev.knn_radii(POINTS, k=3)
    assert np.sqrt(r) == pytest.approx([3, math.sqrt(5), 3, math.sqrt(13), math.sqrt(26)], abs=1e-5)


def test_precision_recall_hand_case():
    samples = np.array([[0.5, 0], [100, 100], [101, 100], [100, 101]], np.float32)
    p, r = ev.precision_recall(POINTS, samples, k=3)
    assert p == pytest.approx(0.25)   # only (0.5, 0) lies in a reference ball
    assert r == pytest.approx(1.0)    # the sample balls (radius ~142) cover every reference point


def test_precision_recall_identical_and_far_apart():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(300, 64)).astype(np.float32) * 5 + 100  # offset: fp32 cancellation test
    assert ev.precision_recall(x, x.copy()) == (1.0, 1.0)
    far = x + 1000
    assert ev.precision_recall(x, far) == (0.0, 0.0)


def test_precision_recall_blocked_matches_brute_force():
    from scipy.spatial.distance import cdist

    rng = np.random.default_rng(7)
    ref = rng.normal(size=(70, 8)).astype(np.float32)
    smp = (rng.normal(size=(53, 8)) * 1.3 + 0.4).astype(np.float32)
    d_rr, d_ss, d_rs = cdist(ref, ref), cdist(smp, smp), cdist(ref, smp)
    r_ref, r_smp = np.sort(d_rr, 1)[:, 3], np.sort(d_ss, 1)[:, 3]
    precision = np.mean((d_rs <= r_ref[:, None]).any(0))
    recall = np.mean((d_rs <= r_smp[None, :]).any(1))
    assert 0 < precision < 1 and 0 < recall < 1
    for block in (7, 1 << 25):  # 7 distances per block: one row at a time
        assert np.sqrt(ev.knn_radii(ref, 3, block_elems=block)) == pytest.approx(r_ref, abs=1e-4)
        p, r = ev.precision_recall(ref, smp, 3, block_elems=block)
        assert (p, r) == (pytest.approx(precision), pytest.approx(recall))


def test_squared_distances_exact_and_fast():
    from scipy.spatial.distance import cdist

    from common import pairwise_sq_dists
    rng = np.random.default_rng(8)
    a = rng.normal(size=(40, 64)) * 3 + 50
    b = np.concatenate([a[:5], rng.normal(size=(30, 64)) + 50])
    exact = pairwise_sq_dists(torch.tensor(a), torch.tensor(b), exact=True).numpy()
    # differences summed feature by feature in order: scipy's cdist to the last bit
    assert np.array_equal(exact, cdist(a, b, "sqeuclidean"))
    assert (np.diagonal(exact[:5, :5]) == 0).all()  # identical rows are exactly 0 apart
    fast = pairwise_sq_dists(torch.tensor(a - 50), torch.tensor(b - 50)).numpy()
    assert fast.min() >= 0 and np.allclose(fast, exact, rtol=1e-12, atol=1e-9)


def test_precision_recall_exact_float64():
    rng = np.random.default_rng(9)
    ref = rng.normal(size=(60, 16)) + 1e4  # far from 0: fp32 could not resolve these distances
    smp = np.concatenate([ref[:10], rng.normal(size=(25, 16)) * 1.5 + 1e4])
    d = np.sqrt(((smp[:, None] - ref[None]) ** 2).sum(-1))  # (samples, reference), brute force
    r_ref = np.sort(np.sqrt(((ref[:, None] - ref[None]) ** 2).sum(-1)), 1)[:, 3]
    r_smp = np.sort(np.sqrt(((smp[:, None] - smp[None]) ** 2).sum(-1)), 1)[:, 3]
    precision, recall = (d <= r_ref[None]).any(1).mean(), (d <= r_smp[:, None]).any(0).mean()
    assert 0 < precision < 1 and 0 < recall < 1
    for block in (7, 1 << 25):
        assert np.sqrt(ev.knn_radii(ref, 3, block_elems=block, exact=True)) == \
            pytest.approx(r_ref, rel=1e-12)
        assert ev.precision_recall(ref, smp, 3, block_elems=block, exact=True) == \
            (precision, recall)


# ----------------------------------------------------------------------------------------------
# The network: layout, names, outputs

def _port_table() -> list[tuple[int, int, int, int]]:
    """(cin, cout, kh, kw) of every convolution of the FID Inception, by block."""
    def a(c, pf):
        return [(c, 64, 1, 1), (c, 48, 1, 1), (48, 64, 5, 5), (c, 64, 1, 1), (64, 96, 3, 3),
                (96, 96, 3, 3), (c, pf, 1, 1)]

    def b(c):
        return [(c, 384, 3, 3), (c, 64, 1, 1), (64, 96, 3, 3), (96, 96, 3, 3)]

    def cc(c, c7):
        return [(c, 192, 1, 1), (c, c7, 1, 1), (c7, c7, 1, 7), (c7, 192, 7, 1), (c, c7, 1, 1),
                (c7, c7, 7, 1), (c7, c7, 1, 7), (c7, c7, 7, 1), (c7, 192, 1, 7), (c, 192, 1, 1)]

    def d(c):
        return [(c, 192, 1, 1), (192, 320, 3, 3), (c, 192, 1, 1), (192, 192, 1, 7),
                (192, 192, 7, 1), (192, 192, 3, 3)]

    def e(c):
        return [(c, 320, 1, 1), (c, 384, 1, 1), (384, 384, 1, 3), (384, 384, 3, 1),
                (c, 448, 1, 1), (448, 384, 3, 3), (384, 384, 1, 3), (384, 384, 3, 1),
                (c, 192, 1, 1)]

    stem = [(3, 32, 3, 3), (32, 32, 3, 3), (32, 64, 3, 3), (64, 80, 1, 1), (80, 192, 3, 3)]
    return (stem + a(192, 32) + a(256, 64) + a(288, 64) + b(288) + cc(768, 128) + cc(768, 160)
            + cc(768, 160) + cc(768, 192) + d(768) + e(1280) + e(2048))


PORT_NAMES = {  # a hand table of the public port's state dict
    "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
    "Conv2d_1a_3x3.bn.running_var": (32,),
    "Conv2d_4a_3x3.conv.weight": (192, 80, 3, 3),
    "Mixed_5b.branch1x1.conv.weight": (64, 192, 1, 1),
    "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
    "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
    "Mixed_6d.branch1x1.conv.weight": (192, 768, 1, 1),
    "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
    "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3),
    "Mixed_7b.branch3x3dbl_3b.bn.weight": (384,),
    "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1),
    "fc.weight": (1008, 2048),
    "fc.bias": (1008,),
}


def test_state_dict_names_shapes_and_parameter_count(model):
    sd = model.state_dict()
    for name, shape in PORT_NAMES.items():
        assert tuple(sd[name].shape) == shape, name
    assert not any(k.startswith("AuxLogits") for k in sd)
    table = _port_table()
    derived = sum(ci * co * kh * kw + 2 * co for ci, co, kh, kw in table) + 2048 * 1008 + 1008
    assert derived == 23_850_960
    assert sum(p.numel() for p in model.parameters()) == derived
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(m.in_channels, m.out_channels) + m.kernel_size for m in convs] == table
    assert all(m.bias is None for m in convs)
    assert all(m.eps == 0.001 for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert (model.Mixed_7b.pool, model.Mixed_7c.pool) == ("avg", "max")


def test_state_dict_layout_equals_torchvision_inception3_without_aux(model):
    tv = pytest.importorskip("torchvision")
    ref = tv.models.inception_v3(weights=None, aux_logits=False, num_classes=1008,
                                 init_weights=False).state_dict()
    sd = model.state_dict()
    assert list(sd) == list(ref)
    assert all(sd[k].shape == ref[k].shape for k in sd)


def test_avg_pool_ignores_padding():
    from models.inception import _avg_pool

    x = torch.ones(1, 1, 4, 4)
    assert torch.equal(_avg_pool(x), x)  # count_include_pad=True would give 4/9 in the corners


def test_spatial_features_are_nhwc_flattened_mixed_6d_branch1x1(model):
    taps = []
    h = model.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: taps.append(o))
    try:
        imgs = torch.from_numpy(rand_images(3, 20, seed=8))
        with torch.no_grad():
            out = model(imgs)
            out_nchw = model(imgs.permute(0, 3, 1, 2))
    finally:
        h.remove()
    t = taps[0]
    assert t.shape[2:] == (3, 3)  # 75 px input
    want = t[:, :7].permute(0, 2, 3, 1).reshape(3, -1)
    assert torch.equal(out.spatial, want)
    assert not torch.equal(out.spatial, t[:, :7].reshape(3, -1))  # NCHW order differs
    assert torch.equal(out.logits, out.pool3 @ model.fc.weight.T)   # no bias
    assert not torch.allclose(out.logits, out.pool3 @ model.fc.weight.T + model.fc.bias)
    for a, b in zip(out, out_nchw):
        assert torch.equal(a, b)


def test_full_size_output_shapes(model):
    full = FIDInceptionV3()
    full.load_state_dict(model.state_dict())
    with torch.no_grad():
        out = full(torch.from_numpy(rand_images(1, 8)))
    assert out.pool3.shape == (1, 2048) and out.spatial.shape == (1, 7 * 17 * 17) \
        and out.logits.shape == (1, 1008)


def test_load_inception_roundtrip_and_missing_weights(model, weights, monkeypatch, tmp_path):
    imgs = torch.from_numpy(rand_images(2, 16, seed=9))
    loaded = load_inception(weights)
    loaded.resize_to = SMALL
    with torch.no_grad():
        for a, b in zip(model(imgs), loaded(imgs)):
            assert torch.equal(a, b)
    monkeypatch.setenv("FID_INCEPTION_WEIGHTS", str(weights))
    assert isinstance(load_inception(), FIDInceptionV3)
    monkeypatch.delenv("FID_INCEPTION_WEIGHTS")
    for bad in (None, tmp_path / "nowhere.pth"):
        with pytest.raises(WeightsNotFound) as e:
            load_inception(bad)
        msg = str(e.value)
        for needle in (WEIGHTS_FILE, "--inception", "FID_INCEPTION_WEIGHTS", "pytorch-fid",
                       "github.com/mseitzer/pytorch-fid/releases"):
            assert needle in msg
    sd = model.state_dict()
    sd.pop("fc.bias")
    torch.save(sd, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match="fc.bias"):
        load_inception(tmp_path / "partial.pth")


# ----------------------------------------------------------------------------------------------
# Files and compute_metrics

def test_npz_reading_streams_arr_0_and_checks_format(tmp_path):
    imgs = rand_images(7, 5)
    np.savez_compressed(tmp_path / "c.npz", imgs, np.arange(7))
    r = ev.NpzImages(tmp_path / "c.npz")
    assert len(r) == 7 and r.stats() is None
    assert np.array_equal(np.concatenate(list(r.batches(3))), imgs)
    assert np.array_equal(np.concatenate(list(r.batches(2, limit=5))), imgs[:5])
    np.savez(tmp_path / "named.npz", images=imgs)
    with pytest.raises(ValueError, match="arr_0"):
        ev.NpzImages(tmp_path / "named.npz")
    np.savez(tmp_path / "f.npz", imgs.astype(np.float32))
    with pytest.raises(ValueError, match="uint8"):
        ev.NpzImages(tmp_path / "f.npz")
    np.savez(tmp_path / "nchw.npz", imgs.transpose(0, 3, 1, 2).copy())
    with pytest.raises(ValueError, match="NHWC"):
        ev.NpzImages(tmp_path / "nchw.npz")
    with pytest.raises(FileNotFoundError):
        ev.NpzImages(tmp_path / "missing.npz")
    with pytest.raises(ValueError, match="3\\)"):
        ev.compute_metrics(imgs[..., :1], imgs, None)


def test_compute_metrics_in_process(model):
    ref, smp = rand_images(12, 16, seed=10), rand_images(9, 16, seed=11)
    acts = ev.compute_activations(ref, model, batch_size=5)
    direct = torch.cat([model(torch.from_numpy(ref[a:a + 4])).pool3 for a in range(0, 12, 4)])
    assert np.allclose(acts["pool3"], direct.detach().numpy(), atol=1e-5)
    assert np.allclose(acts["sigma"], np.cov(acts["pool3"].astype(np.float64), rowvar=False),
                       atol=1e-8)
    # (2048-d sqrtm takes ~30 s on a 2-core CPU: eigh here, sqrtm is checked on small dims above)
    same = ev.compute_metrics(ref, ref, model, batch_size=5, fid_method="eigh")
    assert set(same) == {"inception_score", "fid", "sfid", "precision", "recall"}
    assert abs(same["fid"]) < 1e-3 and abs(same["sfid"]) < 1e-3
    assert same["precision"] == 1.0 and same["recall"] == 1.0
    m = ev.compute_metrics(smp, ref, model, batch_size=4, fid_method="eigh")
    assert m["fid"] > 0 and m["inception_score"] >= 1.0
    # a stats-only reference: FID/sFID the same, precision/recall NaN
    only = {k: acts[k] for k in ev.STAT_KEYS + ("inception_size",)}
    with pytest.warns(UserWarning, match="no images"):
        m2 = ev.compute_metrics(smp, only, model, batch_size=9, fid_method="eigh")
    assert m2["fid"] == pytest.approx(m["fid"], rel=1e-6) and math.isnan(m2["precision"])
    with pytest.raises(ValueError, match="input size 299"):  # stats of another input size
        ev.compute_metrics(smp, {k: acts[k] for k in ev.STAT_KEYS}, model)


def test_make_reference_from_image_folder(model, tmp_path):
    from preprocessing.sources import adm_center_crop

    rng = np.random.default_rng(12)
    files = []
    for c in ("a", "b", "c"):
        (tmp_path / "src" / c).mkdir(parents=True)
        for i in range(3):
            p = tmp_path / "src" / c / f"{i}.png"
            Image.fromarray(rng.integers(0, 256, (30 + 7 * i, 41, 3), dtype=np.uint8)).save(p)
            files.append(p)
    src = FolderImages(str(tmp_path / "src"), 24, seed=0, num_workers=0, limit=None)
    info = ev.make_reference(src, tmp_path / "ref.npz", model, batch_size=4, ref_images=5)
    assert info == {"images": 9, "arr_0": 5, "path": str(tmp_path / "ref.npz")}
    crops = np.stack([adm_center_crop(Image.open(files[i]), 24) for i in src.order])
    with np.load(tmp_path / "ref.npz") as z:
        assert z["arr_0"].dtype == np.uint8 and np.array_equal(z["arr_0"], crops[:5])
        acts = ev.compute_activations(crops, model, batch_size=9)
        for k in ev.STAT_KEYS:
            assert np.allclose(z[k], acts[k], atol=1e-6), k
        assert int(z["inception_size"]) == SMALL
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


# ----------------------------------------------------------------------------------------------
# End to end: the real CLI

def run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("FID_INCEPTION_WEIGHTS", None)
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def parse_metrics(stdout: str) -> dict[str, float]:
    out = {}
    for line in stdout.splitlines():
        if ":" in line:
            k, v = line.split(":", 1)
            out[k.strip()] = float(v)
    return out


def test_cli_end_to_end(weights, tmp_path):
    shards = tmp_path / "shards"
    r = run("preprocessing/encode.py", "--source", "digits", "--dest", str(shards),
            "--resolution", "32", "--vae", "none", "--store-images", "--max-images", "40")
    assert r.returncode == 0, r.stderr
    ref = tmp_path / "ref.npz"
    common = ["--inception", str(weights), "--inception-size", str(SMALL), "--batch-size", "16"]
    r = run("evaluate.py", "make-reference", str(shards), str(ref), *common)
    assert r.returncode == 0, r.stderr
    with np.load(ref) as z:  # as ADM's evaluator reads it
        assert set(ev.STAT_KEYS) <= set(z.files)
        arr = z["arr_0"]
        assert arr.shape == (40, 32, 32, 3) and arr.dtype == np.uint8
        assert z["mu"].shape == (2048,) and z["sigma"].shape == (2048, 2048)
        assert z["mu_s"].shape == (63,)  # 7 x 3 x 3 at 75 px (2023 at 299)
    from preprocessing.shards import ShardDataset
    ds = ShardDataset(shards)
    stored = torch.cat([t["images"] for t in ds.shards]).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(arr, stored)

    samples = tmp_path / "samples.npz"
    np.savez(samples, rand_images(20, 32, seed=13))
    r = run("evaluate.py", str(samples), str(ref), *common, "--fid-method", "eigh",
            "--json", str(tmp_path / "m.json"))
    assert r.returncode == 0, r.stderr
    m = parse_metrics(r.stdout)
    assert list(m) == ["Inception Score", "FID", "sFID", "Precision", "Recall"]
    assert m["FID"] > 1e-3 and m["Inception Score"] >= 1.0
    saved = json.loads((tmp_path / "m.json").read_text())
    assert saved["fid"] == m["FID"] and saved["num_samples"] == 20

    r = run("evaluate.py", str(ref), str(ref), *common, "--fid-method", "eigh")
    assert r.returncode == 0, r.stderr
    m = parse_metrics(r.stdout)
    assert abs(m["FID"]) < 1e-3 and abs(m["sFID"]) < 1e-3
    assert m["Precision"] == 1.0 and m["Recall"] == 1.0


def test_cli_errors(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("FID_INCEPTION_WEIGHTS", raising=False)
    np.savez(tmp_path / "s.npz", rand_images(3, 8))
    assert evaluate.main([str(tmp_path / "s.npz"), str(tmp_path / "s.npz")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("evaluate.py: error: ")  # argparse's style, as every script
    assert WEIGHTS_FILE in err and "--inception" in err and "FID_INCEPTION_WEIGHTS" in err
    assert evaluate.main([str(tmp_path / "s.npz"), str(tmp_path / "nope.npz")]) == 2
    assert "nope.npz" in capsys.readouterr().err
    np.savez(tmp_path / "bad.npz", np.zeros((3, 8, 8), np.uint8))
    assert evaluate.main([str(tmp_path / "bad.npz"), str(tmp_path / "s.npz")]) == 2
    assert "(N, H, W, 3)" in capsys.readouterr().err
    # a reference batch given first: the arguments are swapped
    np.savez(tmp_path / "stats.npz", rand_images(3, 8),
             **{k: np.zeros((2, 2) if k.startswith("sigma") else 2) for k in ev.STAT_KEYS})
    assert evaluate.main([str(tmp_path / "stats.npz"), str(tmp_path / "s.npz")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("evaluate.py: error: ") and "SAMPLES REFERENCE" in err

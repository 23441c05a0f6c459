"""The contrastive baselines (docs/CONVENTIONS.md §13): hand-computed values of the four forms,
the two views' noise (independent / restricted), both views denoised, and train.py's flags."""
from __future__ import annotations

import contextlib
import json
import math

import pytest
import torch

from losses.contrastive import (ContrastiveLoss, contrastive_batch, contrastive_loss,
                                positive_term, restricted_times)
from losses.dispersive import VARIANTS
from losses.terms import training_losses
from models.sit import SiT
from tests.conftest import encode, run, train_cmd

T = torch.tensor


# ---------------------------------------------------------------------------------------------
# Hand-computed values (one image, M = 2 values per row; the numbers are worked out in comments)

def test_infonce_l2_by_hand():
    # z1 = (0, 0), z2 = (2, 0): ||z1 - z2||^2 / M = 4 / 2 = 2 -> positive 2 (tau 1).
    # Negatives over the rows {z1, z2}: per-feature squared distances 0, 2, 2, 0,
    # log mean exp(-d) = log((2 + 2 e^-2) / 4).
    c = contrastive_loss(T([[0., 0.]]), T([[2., 0.]]), "infonce_l2", tau=1.0)
    neg = math.log((2 + 2 * math.exp(-2)) / 4)
    assert c["pos"].item() == pytest.approx(2.0, abs=1e-6)
    assert c["neg"].item() == pytest.approx(neg, abs=1e-6)                  # -0.566219
    assert c["loss"].item() == pytest.approx(2.0 + neg, abs=1e-6)
    # tau 0.5 doubles the positive term and sharpens the negatives
    c = contrastive_loss(T([[0., 0.]]), T([[2., 0.]]), "infonce_l2", tau=0.5)
    assert c["pos"].item() == pytest.approx(4.0, abs=1e-6)
    assert c["neg"].item() == pytest.approx(math.log((2 + 2 * math.exp(-4)) / 4), abs=1e-6)


def test_infonce_cosine_by_hand():
    # z1 = (1, 0), z2 = (1, 1): cos = 1/sqrt(2); positive -cos / tau with tau 0.5 = -sqrt(2).
    # Negatives: log mean exp(cos / tau) over cos = 1, 1/sqrt2, 1/sqrt2, 1.
    c = contrastive_loss(T([[1., 0.]]), T([[1., 1.]]), "infonce_cosine", tau=0.5)
    neg = math.log((2 * math.exp(2) + 2 * math.exp(math.sqrt(2))) / 4)     # 1.749400
    assert c["pos"].item() == pytest.approx(-math.sqrt(2), abs=1e-6)
    assert c["neg"].item() == pytest.approx(neg, abs=1e-6)


def test_hinge_by_hand():
    # z2 = (2, 0): D = 4 / 2 = 2 -> positive D^2 = 4; the negative pair is beyond the margin 1.
    c = contrastive_loss(T([[0., 0.]]), T([[2., 0.]]), "hinge", hinge_margin=1.0)
    assert (c["pos"].item(), c["neg"].item()) == pytest.approx((4.0, 0.0), abs=1e-6)
    # z2 = (1, 0): D = 0.5 -> positive 0.25, negative (1 - 0.5)^2 = 0.25 on both ordered pairs
    c = contrastive_loss(T([[0., 0.]]), T([[1., 0.]]), "hinge", hinge_margin=1.0)
    assert (c["pos"].item(), c["neg"].item()) == pytest.approx((0.25, 0.25), abs=1e-6)


def test_covariance_by_hand():
    # z1 = (1, 0), z2 = (0, 3): normalised (1, 0) and (0, 1), positive ||(1, -1)||^2 = 2.
    # Negatives: centred rows (0.5, -0.5), (-0.5, 0.5); Cov = Zc^T Zc / (2 - 1) has
    # off-diagonal entries -0.5, so sum_{m != n} Cov^2 = 0.5.
    c = contrastive_loss(T([[1., 0.]]), T([[0., 3.]]), "covariance")
    assert (c["pos"].item(), c["neg"].item()) == pytest.approx((2.0, 0.5), abs=1e-6)


def test_batch_of_two_against_a_loop(variant="infonce_l2"):
    # B = 2 pairs, tau 2: positive = mean of the pair distances / (M tau); negatives over 4 rows
    z1, z2 = T([[0., 0.], [1., 1.]]), T([[1., 0.], [1., 3.]])
    rows = [(0, 0), (1, 1), (1, 0), (1, 3)]
    d = [[((a - c) ** 2 + (b - e) ** 2) / 2 for (c, e) in rows] for (a, b) in rows]
    neg = math.log(sum(math.exp(-x / 2) for r in d for x in r) / 16)
    pos = ((1 + 0) / 2 + (0 + 4) / 2) / 2 / 2
    c = contrastive_loss(z1, z2, variant, tau=2.0)
    assert (c["pos"].item(), c["neg"].item()) == pytest.approx((pos, neg), abs=1e-6)


@pytest.mark.parametrize("variant", VARIANTS)
def test_positive_term_is_smallest_for_identical_views(variant):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(8, 4, 6, generator=g)
    same = positive_term(z, z, variant).item()
    other = positive_term(z, z + torch.randn(z.shape, generator=g), variant).item()
    assert other > same
    assert same == pytest.approx(-1.0 if variant == "infonce_cosine" else 0.0, abs=1e-6)


@pytest.mark.parametrize("variant", VARIANTS)
def test_gradient_of_the_positive_term_pulls_the_views_together(variant):
    g = torch.Generator().manual_seed(1)
    z1 = torch.randn(6, 10, generator=g, requires_grad=True)
    z2 = torch.randn(6, 10, generator=g)
    before = positive_term(z1, z2, variant)
    before.backward()
    with torch.no_grad():
        after = positive_term(z1 - 1e-2 * z1.grad, z2, variant)
    assert after < before
    # and the distance between each pair shrinks under that step (cosine: the angle)
    cos = torch.nn.functional.cosine_similarity
    assert (cos(z1 - 1e-2 * z1.grad, z2) > cos(z1, z2)).all()


def test_contrastive_module_splits_views_and_weights_by_lambda():
    g = torch.Generator().manual_seed(2)
    f1, f2 = torch.randn(4, 3, 5, generator=g), torch.randn(4, 3, 5, generator=g)
    feats = {1: torch.randn(8, 3, 5, generator=g), 2: torch.cat([f1, f2])}
    loss = ContrastiveLoss(lambda_disp=0.3, tau=0.7, variant="infonce_l2", blocks="last")
    out = loss(feats, depth=2)
    ref = contrastive_loss(f1, f2, "infonce_l2", tau=0.7)
    assert out["pos"].item() == pytest.approx(ref["pos"].item(), abs=1e-6)
    assert out["disp"].item() == pytest.approx(ref["neg"].item(), abs=1e-6)
    assert out["loss"].item() == pytest.approx(0.3 * ref["loss"].item(), abs=1e-6)
    with pytest.raises(ValueError, match="even number of rows"):
        loss({2: torch.randn(5, 3, 5)}, depth=2)


# ---------------------------------------------------------------------------------------------
# The two views' noise

def _views(noise: str, delta: float = 0.0, n: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 4, 4, generator=g)
    y = torch.arange(n) % 10
    b = contrastive_batch(x, y, num_classes=10, noise=noise, delta=delta, cfg_prob=0.5,
                          generator=torch.Generator().manual_seed(seed + 1))
    return x, b


@pytest.mark.parametrize("noise,delta", [("independent", 0.0), ("restricted", 0.0),
                                         ("restricted", 0.1)])
def test_views_are_two_noisings_of_the_same_images(noise, delta):
    x, b = _views(noise, delta)
    n = x.shape[0]
    t1, t2 = b["t"][:n], b["t"][n:]
    e1, e2 = b["eps"][:n], b["eps"][n:]
    assert torch.equal(b["x0"][:n], x) and torch.equal(b["x0"][n:], x)
    assert torch.equal(b["y"][:n], b["y"][n:])       # one (possibly dropped) label per image
    assert (b["y"] == 10).any()                       # cfg_prob 0.5 dropped some labels
    assert not torch.allclose(e1, e2)                 # every view draws its own eps
    tt = b["t"].view(-1, 1, 1, 1)                     # linear path: x_t = (1-t) x + t eps
    assert torch.allclose(b["x_t"], (1 - tt) * b["x0"] + tt * b["eps"], atol=1e-6)
    assert torch.allclose(b["target"], b["eps"] - b["x0"], atol=1e-6)
    if noise == "independent":
        assert (t1 - t2).abs().max() > 0.2
    elif delta == 0:
        assert torch.equal(t1, t2)
    else:
        assert (t1 - t2).abs().max() <= delta + 1e-7 and not torch.equal(t1, t2)


def test_restricted_times_stay_within_delta_and_uniform():
    g = torch.Generator().manual_seed(3)
    t1 = torch.rand(200_000, generator=g, dtype=torch.float64)
    t2 = restricted_times(t1, 0.3, g)
    assert (t2 - t1).abs().max() <= 0.3 + 1e-12
    assert 0 <= t2.min() and t2.max() <= 1
    # reflection keeps the uniform law: the histogram is flat (binomial sd 0.0007 per bin)
    hist = torch.histc(t2.float(), bins=10, min=0, max=1) / t2.numel()
    assert (hist - 0.1).abs().max() < 0.004
    with pytest.raises(ValueError, match="delta"):
        restricted_times(t1, 1.5)


def test_both_views_get_the_denoising_loss():
    torch.manual_seed(0)
    model = SiT(input_size=4, patch_size=1, in_channels=3, hidden_size=32, depth=2, num_heads=2,
                num_classes=10).eval()
    x, b = _views("independent")
    n = x.shape[0]
    loss = ContrastiveLoss(lambda_disp=0.0)
    terms = training_losses(model, b, depth=2, disp=loss)
    with torch.no_grad():
        per_view = [((model(b["x_t"][s], b["t"][s], b["y"][s]) - b["target"][s]) ** 2).mean()
                    for s in (slice(0, n), slice(n, 2 * n))]
    assert terms["si"].item() == pytest.approx(sum(per_view).item() / 2, rel=1e-5)
    assert "contrast_pos" in terms and "disp" in terms


# ---------------------------------------------------------------------------------------------
# train.py

@pytest.fixture(scope="module")
def digits8(tmp_path_factory):
    return encode(tmp_path_factory.mktemp("c8") / "digits", 8)


@pytest.mark.slow
def test_train_py_contrastive_run_logs_both_terms(digits8, tmp_path):
    run(train_cmd(digits8, tmp_path, "--max-train-steps", "4", "--log-every", "2",
                  "--contrastive", "hinge", "--contrastive-noise", "restricted",
                  "--contrastive-delta", "0.2", "--disp-lambda", "0.5", "--disp-blocks", "1"))
    rd = tmp_path / "run"
    cfg = json.loads((rd / "config.json").read_text())["train"]
    assert (cfg["contrastive"], cfg["contrastive_noise"], cfg["contrastive_delta"]) == \
        ("hinge", "restricted", 0.2)
    log = [json.loads(x) for x in (rd / "log.jsonl").read_text().splitlines()]
    for r in log:
        assert r["contrast_pos"] >= 0 and r["disp"] >= 0
        assert r["loss"] == pytest.approx(r["si"] + 0.5 * (r["contrast_pos"] + r["disp"]),
                                          rel=1e-5)


@pytest.mark.parametrize("args,needle", [
    (["--contrastive", "hinge", "--disp"], "replaces --disp"),
    (["--contrastive", "hinge", "--loss-type", "meanflow"], "needs --loss-type si"),
    (["--contrastive", "hinge", "--contrastive-delta", "0.1"], "only applies to"),
    (["--contrastive", "hinge", "--contrastive-noise", "restricted", "--contrastive-delta", "2"],
     "in [0, 1]"),
    (["--contrastive", "hinge", "--disp-blocks", "9"], "--contrastive: "),
    (["--contrastive", "nope"], "invalid choice"),
])
def test_contrastive_clear_errors(digits8, tmp_path, capsys, args, needle):
    import train
    with pytest.raises(SystemExit) if "nope" in args else contextlib.nullcontext():
        code = train.main(["--data-dir", str(digits8), "--output-dir", str(tmp_path),
                           "--preset", "digits", *args])
        assert code == 2
    assert needle in capsys.readouterr().err
    assert not any(tmp_path.iterdir())

"""Dispersive loss against the reference values of docs/CONVENTIONS.md §5 and direct O(B^2) loop
definitions."""
from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

from losses.dispersive import VARIANTS, DispersiveLoss, dispersive_loss, gather_negatives
from losses.interpolant import interpolate, si_loss
from models.sit import SiT

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------
# Independent definitions: plain Python loops over pairs, float64, written from
# docs/CONVENTIONS.md §5.

def loop_reference(z, variant, tau=1.0, margin=1.0, negatives=None):
    local = [row.double() for row in z.detach().reshape(z.shape[0], -1)]
    extra = [] if negatives is None else [r.double() for r in negatives.reshape(len(negatives), -1)]
    rows = local + extra
    m = local[0].numel()
    if variant == "covariance":
        return explicit_covariance_loss(torch.stack(rows))
    vals = []
    for i, zi in enumerate(local):
        for j, zj in enumerate(rows):
            sq = ((zi - zj) ** 2).sum().item()
            if variant == "infonce_l2":
                vals.append(math.exp(-sq / (m * tau)))
            elif variant == "infonce_cosine":
                cos = (zi @ zj).item() / (zi.norm().item() * zj.norm().item())
                vals.append(math.exp(cos / tau))          # exp(-D / tau), D = -cos
            elif variant == "hinge" and i != j:
                vals.append(max(0.0, margin - sq / m) ** 2)
    if variant == "hinge":
        return sum(vals) / len(vals) if vals else 0.0
    return math.log(sum(vals) / len(vals))


def explicit_covariance_loss(rows):
    """sum_{m != n} Cov_mn^2 from the full M x M covariance of the l2-normalised rows."""
    n = rows.shape[0]
    if n < 2:
        return 0.0
    zn = rows / rows.norm(dim=1, keepdim=True)
    zc = zn - zn.mean(0)
    cov = zc.T @ zc / (n - 1)
    off = cov - torch.diag(torch.diag(cov))
    return (off ** 2).sum().item()


# ---------------------------------------------------------------------------------------------
# Reference values

def test_design_reference_values():
    z = torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 0.0]])
    assert dispersive_loss(z, tau=1.0).item() == pytest.approx(-0.640726, abs=1e-5)
    assert dispersive_loss(z, tau=0.5).item() == pytest.approx(-0.922428, abs=1e-5)


@pytest.mark.parametrize("variant", ["infonce_l2", "hinge", "covariance"])
def test_single_row_gives_zero(variant):
    assert dispersive_loss(torch.randn(1, 4, 5), variant).item() == 0.0


@pytest.mark.parametrize("variant", ["infonce_l2", "covariance"])
def test_identical_rows_give_zero(variant):
    z = torch.randn(1, 4, 5).expand(6, 4, 5) * 30 + 7
    assert abs(dispersive_loss(z, variant, tau=0.3).item()) < 1e-6


def test_cosine_and_hinge_constants_for_degenerate_batches():
    # cos(z, z) = 1 -> log mean exp(1 / tau) = 1 / tau; identical rows -> hinge margin^2.
    z = torch.randn(1, 8).expand(4, 8)
    assert dispersive_loss(z, "infonce_cosine", tau=0.5).item() == pytest.approx(2.0, abs=1e-5)
    assert dispersive_loss(z[:1], "infonce_cosine", tau=0.5).item() == pytest.approx(2.0, abs=1e-5)
    assert dispersive_loss(z, "hinge", hinge_margin=1.5).item() == pytest.approx(2.25, abs=1e-6)


def test_spread_rows_give_minus_log_b():
    z = 100.0 * torch.eye(8).reshape(8, 2, 4)
    assert dispersive_loss(z, tau=1.0).item() == pytest.approx(-math.log(8), abs=1e-4)


# ---------------------------------------------------------------------------------------------
# Against the loop definitions

@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("tau", [0.1, 0.5, 1.0, 2.0])
def test_variants_match_loop_definition(variant, tau):
    g = torch.Generator().manual_seed(int(tau * 10))
    z = torch.randn(6, 4, 5, generator=g) * 0.8 + 0.3
    got = dispersive_loss(z, variant, tau=tau, hinge_margin=2.5)
    assert got.dtype == torch.float32 and got.ndim == 0
    want = loop_reference(z, variant, tau, margin=2.5)
    assert got.item() == pytest.approx(want, abs=1e-5, rel=1e-5)


@pytest.mark.parametrize("margin", [0.5, 1.0, 2.0, 3.0])
def test_hinge_margins(margin):
    # D_ij / M of unit normals is ~2, so these margins go from all-inactive to all-active pairs.
    z = torch.randn(5, 12, generator=torch.Generator().manual_seed(1))
    got = dispersive_loss(z, "hinge", hinge_margin=margin).item()
    assert got == pytest.approx(loop_reference(z, "hinge", margin=margin), abs=1e-6)


def test_covariance_against_explicit_matrix_small_m():
    z = torch.randn(7, 3, 4, generator=torch.Generator().manual_seed(3)).double()
    got = dispersive_loss(z, "covariance").item()
    assert got == pytest.approx(explicit_covariance_loss(z.reshape(7, -1)), rel=1e-5, abs=1e-7)


def test_large_feature_size_stays_accurate():
    # SiT-like: large M, features with a large common offset (the norm trick's hard case).
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4, 64, 96, generator=g) + 50.0
    got = dispersive_loss(z, tau=0.5).item()
    assert got == pytest.approx(loop_reference(z, "infonce_l2", 0.5), abs=1e-4)


@pytest.mark.parametrize("variant", VARIANTS)
def test_negatives_match_loop_definition(variant):
    g = torch.Generator().manual_seed(5)
    z, neg = torch.randn(4, 3, 5, generator=g), torch.randn(5, 15, generator=g)
    got = dispersive_loss(z, variant, tau=0.7, hinge_margin=2.5, negatives=neg)
    want = loop_reference(z, variant, 0.7, margin=2.5, negatives=neg)
    assert got.item() == pytest.approx(want, abs=1e-5, rel=1e-5)
    # an empty negatives tensor is the local loss
    empty = torch.zeros(0, 15)
    assert torch.equal(dispersive_loss(z, variant, 0.7, 2.5, negatives=empty),
                       dispersive_loss(z, variant, 0.7, 2.5))


def test_negatives_shape_mismatch():
    with pytest.raises(ValueError, match="values per row"):
        dispersive_loss(torch.randn(2, 6), negatives=torch.randn(3, 5))


def test_hinge_single_local_row_with_negatives():
    z, neg = torch.randn(1, 6), torch.randn(2, 6)
    got = dispersive_loss(z, "hinge", hinge_margin=4.0, negatives=neg).item()
    assert got == pytest.approx(loop_reference(z, "hinge", margin=4.0, negatives=neg), abs=1e-5)


# ---------------------------------------------------------------------------------------------
# Gradients, precision

@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("kind", ["random", "identical", "zeros"])
def test_gradients_finite(variant, kind):
    if kind == "random":
        z = torch.randn(5, 3, 4)
    elif kind == "identical":   # sqrt-based distances (pdist) give NaN gradients here
        z = torch.randn(1, 3, 4).repeat(5, 1, 1)
    else:
        z = torch.zeros(5, 3, 4)
    z.requires_grad_()
    dispersive_loss(z, variant, tau=0.5).backward()
    assert torch.isfinite(z.grad).all()


def test_gradient_matches_double_precision_autograd():
    z = torch.randn(5, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    z.requires_grad_()
    dispersive_loss(z, tau=0.5).backward()

    # the definition, autograd in float64 with broadcasting differences
    z2 = z.detach().clone().requires_grad_()
    d = ((z2[:, None] - z2[None]) ** 2).sum(-1)
    torch.log(torch.exp(-d / (12 * 0.5)).mean()).backward()
    torch.testing.assert_close(z.grad, z2.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("variant", VARIANTS)
def test_bf16_input_gives_fp32_output(variant):
    z = torch.randn(6, 4, 5, generator=torch.Generator().manual_seed(9))
    zb = z.bfloat16().requires_grad_()
    out = dispersive_loss(zb, variant, tau=0.5, hinge_margin=2.5)
    assert out.dtype == torch.float32
    ref = dispersive_loss(zb.detach().float(), variant, tau=0.5, hinge_margin=2.5)
    assert out.item() == pytest.approx(ref.item(), abs=1e-6)          # same values, fp32 maths
    full = dispersive_loss(z, variant, tau=0.5, hinge_margin=2.5)
    assert out.item() == pytest.approx(full.item(), abs=2e-2, rel=2e-2)
    out.backward()
    assert zb.grad.dtype == torch.bfloat16 and torch.isfinite(zb.grad.float()).all()


def test_autocast_does_not_lower_precision():
    z = torch.randn(6, 4, 5, generator=torch.Generator().manual_seed(4))
    ref = dispersive_loss(z, tau=0.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = dispersive_loss(z, tau=0.5)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(ref.item(), abs=1e-6)


def test_invalid_arguments():
    with pytest.raises(ValueError) as err:
        dispersive_loss(torch.randn(2, 3), "l1")
    for name in VARIANTS:
        assert name in str(err.value)
    with pytest.raises(ValueError, match="tau"):
        dispersive_loss(torch.randn(2, 3), tau=0.0)
    with pytest.raises(ValueError, match="non-empty"):
        dispersive_loss(torch.zeros(0, 3))


# ---------------------------------------------------------------------------------------------
# DispersiveLoss module

def test_block_resolution():
    assert DispersiveLoss().feature_blocks(12) == [12]
    assert DispersiveLoss(blocks="all").feature_blocks(4) == [1, 2, 3, 4]
    assert DispersiveLoss(blocks=3).feature_blocks(12) == [3]
    assert DispersiveLoss(blocks=[2, 5, 2]).feature_blocks(12) == [2, 5]
    assert DispersiveLoss(blocks="4,8").feature_blocks(12) == [4, 8]
    assert DispersiveLoss(blocks=28 // 4).feature_blocks(28) == [7]      # paper's JAX setting
    for bad in (13, 0, [1, 13]):
        with pytest.raises(ValueError, match=r"outside 1\.\.12"):
            DispersiveLoss(blocks=bad).feature_blocks(12)
    for bad in ("first", [], True, [1.5]):
        with pytest.raises(ValueError, match="blocks"):
            DispersiveLoss(blocks=bad)
    with pytest.raises(ValueError, match="variant"):
        DispersiveLoss(variant="nope")


def test_defaults_are_pytorch_reference():
    loss = DispersiveLoss()
    assert (loss.lambda_disp, loss.tau, loss.variant, loss.blocks, loss.gather) == \
        (0.25, 1.0, "infonce_l2", "last", False)


def test_forward_averages_blocks_and_weights_by_lambda():
    g = torch.Generator().manual_seed(0)
    feats = {k: torch.randn(4, 3, 5, generator=g) for k in (1, 2, 3)}
    loss = DispersiveLoss(lambda_disp=0.5, tau=0.5, blocks=[1, 3])
    out = loss(feats)
    d1, d3 = dispersive_loss(feats[1], tau=0.5), dispersive_loss(feats[3], tau=0.5)
    assert set(out["per_block"]) == {1, 3}
    torch.testing.assert_close(out["per_block"][1], d1)
    torch.testing.assert_close(out["disp"], (d1 + d3) / 2)
    torch.testing.assert_close(out["loss"], 0.5 * (d1 + d3) / 2)
    # 'last' = the highest block present (or `depth`), 'all' = every block present
    torch.testing.assert_close(DispersiveLoss()(feats)["disp"], dispersive_loss(feats[3]))
    all_ = DispersiveLoss(blocks="all", lambda_disp=1.0)(feats)
    torch.testing.assert_close(all_["loss"], torch.stack(
        [dispersive_loss(feats[k]) for k in (1, 2, 3)]).mean())
    with pytest.raises(ValueError, match="missing"):
        DispersiveLoss()(feats, depth=4)
    with pytest.raises(ValueError, match="missing"):
        DispersiveLoss(blocks=[2, 4])(feats)


def test_with_tiny_sit_backprops_into_model():
    torch.manual_seed(0)
    model = SiT(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=4, num_heads=4,
                num_classes=10)
    disp = DispersiveLoss(blocks="all", tau=0.5)
    x, eps = torch.randn(6, 3, 8, 8), torch.randn(6, 3, 8, 8)
    t, y = torch.rand(6), torch.randint(0, 10, (6,))
    xt, _ = interpolate(x, eps, t)
    pred, aux = model(xt, t, y, return_features=disp.feature_blocks(model.depth))
    assert sorted(aux["features"]) == [1, 2, 3, 4]
    terms = disp(aux["features"], depth=model.depth)
    for k, f in aux["features"].items():
        assert f.shape == (6, 16, 32)
        torch.testing.assert_close(terms["per_block"][k], dispersive_loss(f, tau=0.5))
    total = si_loss(pred, x, eps, t)["loss"] + terms["loss"]
    total.backward()
    # adaLN-Zero: blocks start as identities, so the dispersive gradient reaches the patch
    # embedding through the features and the gates through the residual branches.
    for p in (model.x_embedder.proj.weight, model.blocks[0].adaLN_modulation[-1].weight):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# gather_negatives

def test_gather_negatives_single_process_is_empty():
    z = torch.randn(3, 4, 5, dtype=torch.bfloat16)
    neg = gather_negatives(z)
    assert neg.shape == (0, 20) and neg.dtype == torch.bfloat16
    assert torch.equal(dispersive_loss(z, negatives=neg), dispersive_loss(z))
    assert torch.equal(DispersiveLoss(gather=True)({4: z})["loss"],
                       DispersiveLoss()({4: z})["loss"])


GATHER_SCRIPT = textwrap.dedent("""
    import sys
    import torch
    import torch.distributed as dist
    sys.path.insert(0, sys.argv[1])
    from losses.dispersive import DispersiveLoss, dispersive_loss, gather_negatives

    dist.init_process_group("gloo", init_method="env://")
    rank, world = dist.get_rank(), dist.get_world_size()

    def rows(r):  # every rank can rebuild every other rank's batch
        return torch.randn(3, 2, 5, generator=torch.Generator().manual_seed(100 + r))

    z = rows(rank).requires_grad_()
    neg = gather_negatives(z)
    others = torch.cat([rows(r).reshape(3, 10) for r in range(world) if r != rank])
    assert neg.shape == (3 * (world - 1), 10), neg.shape
    assert torch.equal(neg, others), "wrong rows or order"
    assert not neg.requires_grad and neg.grad_fn is None

    loss = dispersive_loss(z, tau=0.5, negatives=neg)
    loss.backward()
    # same value and gradient as the other ranks' rows used as constants
    z2 = rows(rank).requires_grad_()
    want = dispersive_loss(z2, tau=0.5, negatives=others)
    want.backward()
    assert torch.allclose(loss, want), (loss, want)
    assert torch.allclose(z.grad, z2.grad) and z.grad.abs().sum() > 0

    # the module with gather=True
    z3 = rows(rank).requires_grad_()
    out = DispersiveLoss(gather=True, tau=0.5, lambda_disp=2.0)({4: z3})
    assert torch.allclose(out["loss"], 2.0 * want)
    out["loss"].backward()
    assert torch.allclose(z3.grad, 2.0 * z2.grad)
    dist.barrier()
    dist.destroy_process_group()
    print("rank", rank, "ok")
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_gather_negatives_across_gloo_processes(tmp_path):
    script = tmp_path / "gather.py"
    script.write_text(GATHER_SCRIPT)
    world, port = 3, _free_port()   # 3 ranks so that the rank order of the result is checked
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, str(script), ROOT], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=90)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for rank, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"rank {rank} failed:\n{out}"
        assert f"rank {rank} ok" in out

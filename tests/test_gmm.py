"""gmm_exp.py: exact mixture fields against Monte Carlo and autograd, variance identities with
hand values, the stable targets against a float64 formula, and tiny runs of the real script.

References are computed here without gmm_exp's code paths: the Monte Carlo estimates weight
samples of x0 by the Gaussian kernel of the path in float64, the score is autograd of the
log-density, and the end-point variances come from the mixture parameters.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import gmm_exp as G

EXPS = ("cfm", "cfm_equal_data", "stf", "stable_vm", "stable_vm_efficient")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices: with two threads on a busy 2-core machine, spinning OpenMP workers make
    a step tens of times slower (the script itself defaults to --threads 1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _posterior_mc(gmm: G.GMM, x: torch.Tensor, t: float, m: int, seed: int):
    """Self-normalised importance estimate of E[eps - x0 | x_t = x] and E[-eps/t | x_t = x]
    from m prior draws of x0 (float64), with the delta-method standard errors and the ESS."""
    g = torch.Generator().manual_seed(seed)
    k = torch.multinomial(gmm.weights, m, replacement=True, generator=g)
    x0 = gmm.means[k] + gmm.stds[k] * torch.randn(m, gmm.dim, generator=g, dtype=torch.float64)
    x = x.double()
    logw = -((x - (1 - t) * x0) ** 2).sum(1) / (2 * t * t)
    w = torch.softmax(logw, 0)
    eps = (x - (1 - t) * x0) / t
    out = []
    for f in (eps - x0, -eps / t):
        mean = (w[:, None] * f).sum(0)
        se = torch.sqrt((w[:, None] ** 2 * (f - mean) ** 2).sum(0))
        out.append((mean, se))
    return out, float(1 / (w ** 2).sum())


@pytest.mark.parametrize("dim,components,ts", [(2, 6, (0.1, 0.3, 0.5, 0.8)),
                                               (10, 100, (0.5, 0.7, 0.9))])
def test_exact_field_matches_monte_carlo(dim, components, ts):
    gmm = G.GMM.random(dim, components, seed=3)
    g = torch.Generator().manual_seed(0)
    for t in ts:
        for x0 in gmm.sample(2, g):  # points where p_t has mass
            x = (1 - t) * x0 + t * torch.randn(dim, generator=g)
            ((v_mc, v_se), (s_mc, s_se)), ess = _posterior_mc(gmm, x[None], t, 400_000, seed=1)
            assert ess > 200, f"Monte Carlo too poor to test at t={t} (ESS {ess:.0f})"
            v = gmm.field(x[None], t, "velocity")[0]
            s = gmm.field(x[None], t, "score")[0]
            assert ((v - v_mc).abs() <= 5 * v_se + 1e-3).all(), (t, v, v_mc, v_se)
            assert ((s - s_mc).abs() <= 5 * s_se + 1e-3).all(), (t, s, s_mc, s_se)


def test_score_is_gradient_of_log_density_and_velocity_identity():
    gmm = G.GMM.random(5, 7, seed=1)
    g = torch.Generator().manual_seed(2)
    x = (gmm.sample(64, g).double() * 0.8 + 0.5 * torch.randn(64, 5, generator=g,
                                                                 dtype=torch.float64))
    t = torch.rand(64, generator=g, dtype=torch.float64) * 0.9 + 0.05
    xr = x.clone().requires_grad_(True)
    # log p_t written out directly: sum_k w_k N(x; (1-t) mu_k, (1-t)^2 sigma_k^2 + t^2)
    var = (1 - t)[:, None, None] ** 2 * gmm.stds ** 2 + t[:, None, None] ** 2
    logn = (-0.5 * ((xr[:, None] - (1 - t)[:, None, None] * gmm.means) ** 2 / var
                    + torch.log(2 * math.pi * var))).sum(-1)
    torch.logsumexp(logn + torch.log(gmm.weights), 1).sum().backward()
    score = gmm.field(x, t, "score")
    torch.testing.assert_close(score, xr.grad, rtol=1e-9, atol=1e-9)
    # linear path: x = (1-t) E[x0|x] + t E[eps|x], score = -E[eps|x]/t => v = -(x + t s)/(1-t)
    v = gmm.field(x, t, "velocity")
    torch.testing.assert_close(v, -(x + t[:, None] * score) / (1 - t[:, None]),
                               rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kind", G.FIELDS)
def test_shared_t_and_per_sample_t_paths_agree(kind):
    gmm = G.GMM.random(10, 100, seed=0)
    x = gmm.sample(300, torch.Generator().manual_seed(0)).double() * 0.7
    for t in (0.05, 0.4, 0.95):
        shared = gmm.field(x, t, kind)                       # matrix-product path
        per = gmm.field(x, torch.full((300,), t, dtype=torch.float64).index_put_(
            (torch.tensor([0]),), torch.tensor([t + 1e-13], dtype=torch.float64)), kind)
        torch.testing.assert_close(shared, per, rtol=1e-8, atol=1e-8)


def test_cfm_variance_end_points_are_hand_values():
    gmm = G.GMM.random(6, 9, seed=4)
    x = torch.randn(50, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    # t = 0: x_t = x0, the target eps - x0 varies only through eps: variance 1 per dimension
    within, between = gmm.cfm_variance(x, 0.0, "velocity")
    torch.testing.assert_close(within + between, torch.ones(50, dtype=torch.float64))
    # t = 1: x_t = eps carries no information about x0: variance trace(Cov x0) / D
    w, mu, sd = gmm.weights.numpy(), gmm.means.numpy(), gmm.stds.numpy()
    mean = w @ mu
    cov_trace = float(w @ (sd ** 2).sum(1) + w @ ((mu - mean) ** 2).sum(1))
    within, between = gmm.cfm_variance(x, 1.0, "velocity")
    np.testing.assert_allclose((within + between).numpy(), cov_trace / 6, rtol=1e-10)
    assert gmm.data_variance() == pytest.approx(cov_trace / 6, rel=1e-12)


@pytest.mark.parametrize("kind", G.FIELDS)
def test_cfm_variance_matches_monte_carlo_deviation(kind):
    gmm = G.GMM.random(10, 100, seed=0)
    for t in (0.2, 0.5, 0.8):
        total, between = G.cfm_variance_curve(gmm, t, 20000, kind,
                                              torch.Generator().manual_seed(1))
        mc = G.cfm_deviation_curve(gmm, t, 20000, kind, torch.Generator().manual_seed(2))
        se = float(mc.std() / math.sqrt(mc.numel()))
        assert float(total.mean()) == pytest.approx(float(mc.mean()), abs=5 * se)
        assert (between <= total + 1e-12).all() and (between >= 0).all()


def test_empirical_variance_hand_values():
    data = torch.tensor([[-1.0], [1.0]], dtype=torch.float64)
    t, a = 0.5, 0.5
    x = torch.tensor([[0.2]], dtype=torch.float64)
    # w_j proportional to exp(-(x - a x0_j)^2 / (2 t^2))
    l = [-(0.2 - a * v) ** 2 / (2 * t * t) for v in (-1.0, 1.0)]
    w1 = math.exp(l[1]) / (math.exp(l[0]) + math.exp(l[1]))
    mu = 2 * w1 - 1
    var_x0 = 1 - mu * mu                                  # x0 = +-1 with weights (1 - w1, w1)
    w = G.empirical_posterior(x, t, data)
    assert float(w[0, 1]) == pytest.approx(w1, rel=1e-12)
    assert float(G.empirical_field(x, t, data, "velocity")) == pytest.approx((0.2 - mu) / t)
    assert float(G.empirical_field(x, t, data, "score")) == pytest.approx(
        -(0.2 - a * mu) / t ** 2)
    assert float(G.empirical_cfm_variance(x, t, data, "velocity")) == pytest.approx(
        var_x0 / t ** 2)
    assert float(G.empirical_cfm_variance(x, t, data, "score")) == pytest.approx(
        a ** 2 * var_x0 / t ** 4)
    # one data point: the posterior is certain, the CFM target has no variance
    single = torch.tensor([[0.3, -0.4]])
    v = G.empirical_cfm_variance_curve(single, 0.7, 16, "velocity",
                                       torch.Generator().manual_seed(0))
    assert float(v.abs().max()) < 1e-12
    # two points far apart at small t: still certain; at t near 1: Var(x0) = 1 per dim (+-1)
    g = torch.Generator().manual_seed(0)
    assert float(G.empirical_cfm_variance_curve(data * 50, 0.05, 64, "velocity", g).max()) \
        < 1e-12
    v1 = G.empirical_cfm_variance_curve(data, 1 - 1e-9, 4000, "velocity", g)
    assert float(v1.mean()) == pytest.approx(1.0, rel=1e-6)


def test_knee_and_headline():
    ts = np.linspace(0, 1, 11)
    assert G.knee(ts, ts) == pytest.approx(0.5)
    assert G.knee(ts, np.clip(ts - 0.3, 0, None)) == pytest.approx(0.65)
    assert math.isnan(G.knee(ts, 1 - ts))
    fd = np.arange(len(G.EVAL_TS), dtype=float)
    idx = [G.EVAL_TS.index(t) for t in G.HEADLINE_TS]
    assert G.headline(fd, G.EVAL_TS) == pytest.approx(np.mean(idx))


# ----------------------------------------------------------------------------------------------
# Training targets.

def _stable_ref(x, t, refs):
    """(x - sum_j w_j x0_j) / t with w = softmax(-||x - (1-t) x0_j||^2 / (2 t^2)), float64."""
    x, refs, t = x.double(), refs.double(), t.double()[:, None]
    d2 = ((x[:, None] - (1 - t)[:, None] * refs[None]) ** 2).sum(-1)
    w = torch.softmax(-d2 / (2 * t ** 2), 1)
    return (x - w @ refs) / t, w @ refs


@pytest.mark.parametrize("efficient", [False, True])
def test_stable_velocity_matches_float64_formula(efficient):
    g = torch.Generator().manual_seed(0)
    refs = torch.randn(300, 4, generator=g) * 0.5
    x = torch.randn(64, 4, generator=g)
    t = torch.rand(64, generator=g) * 0.95 + 0.05
    cfm = torch.randn(64, 4, generator=g)
    v = G.stable_velocity(x, t, refs, cfm, efficient=efficient, chunk_size=37)
    ref, mu = _stable_ref(x, t, refs)
    torch.testing.assert_close(v.double(), ref, rtol=1e-4, atol=1e-4)
    # t * score from the velocity equals -(x - (1 - t) mu) / t
    ts = G.velocity_to_scaled_score(x, t, v)
    torch.testing.assert_close(ts.double(), -(x.double() - (1 - t.double())[:, None] * mu)
                               / t.double()[:, None], rtol=1e-4, atol=1e-4)


def test_stable_velocity_split_keeps_the_conditional_target():
    g = torch.Generator().manual_seed(0)
    refs = torch.randn(50, 3, generator=g)
    x = torch.randn(6, 3, generator=g)
    t = torch.tensor([0.0, 1e-5, 0.2, 0.4, 0.6, 0.9])
    cfm = torch.randn(6, 3, generator=g)
    v = G.stable_velocity(x, t, refs, cfm, split=0.5)
    assert torch.equal(v[:4], cfm[:4])                 # below the split: untouched
    torch.testing.assert_close(v[4:].double(), _stable_ref(x[4:], t[4:], refs)[0],
                               rtol=1e-4, atol=1e-4)
    v0 = G.stable_velocity(x, t, refs, cfm)            # split 0: only t < T_FLOOR keeps it
    assert torch.equal(v0[:2], cfm[:2]) and not torch.equal(v0[2:], cfm[2:])


@pytest.mark.parametrize("field", G.FIELDS)
def test_stable_vm_and_efficient_give_the_same_targets(field):
    gmm = G.GMM.random(10, 100, seed=0)
    for seed in range(3):
        b1 = G.make_batch("stable_vm", gmm, 256, 1024, field, torch.Generator().manual_seed(seed),
                          chunk_size=100)
        b2 = G.make_batch("stable_vm_efficient", gmm, 256, 1024, field,
                          torch.Generator().manual_seed(seed), chunk_size=100)
        assert torch.equal(b1["x_t"], b2["x_t"]) and torch.equal(b1["t"], b2["t"])
        assert float((b1["target"] - b2["target"]).abs().max()) <= 1e-5


def test_make_batch_sources_and_conditional_targets():
    gmm = G.GMM.random(3, 5, seed=0)
    g = torch.Generator().manual_seed(0)
    b = G.make_batch("cfm", gmm, 32, 64, "velocity", g)
    eps = (b["x_t"] - (1 - b["t"])[:, None] * b["x0"]) / b["t"][:, None]
    torch.testing.assert_close(b["target"], eps - b["x0"], rtol=1e-4, atol=1e-4)
    bs = G.make_batch("cfm", gmm, 32, 64, "score", torch.Generator().manual_seed(0))
    torch.testing.assert_close(bs["target"], -eps, rtol=1e-4, atol=1e-4)   # t * (-eps / t)
    # stf: one fixed source for the whole batch, the first reference
    gen = torch.Generator().manual_seed(5)
    refs = gmm.sample(64, torch.Generator().manual_seed(5))
    b = G.make_batch("stf", gmm, 32, 64, "velocity", gen)
    assert torch.equal(b["x0"], refs[0].expand(32, 3))
    # stable_vm: sources drawn from the reference set, several distinct ones
    b = G.make_batch("stable_vm", gmm, 32, 64, "velocity", torch.Generator().manual_seed(5))
    member = (b["x0"][:, None] == refs[None]).all(-1).any(1)
    assert member.all() and torch.unique(b["x0"], dim=0).shape[0] > 10
    torch.testing.assert_close(b["target"].double(), _stable_ref(b["x_t"], b["t"], refs)[0],
                               rtol=1e-3, atol=1e-3)


def test_stable_target_of_a_large_reference_set_approaches_the_exact_field():
    gmm = G.GMM.random(2, 6, seed=2)
    g = torch.Generator().manual_seed(0)
    refs = gmm.sample(100_000, g)
    x = gmm.sample(64, g) * 0.4 + 0.6 * torch.randn(64, 2, generator=g)
    t = torch.full((64,), 0.6)
    v = G.stable_velocity(x, t, refs, torch.zeros(64, 2), efficient=True)
    err = (v.double() - gmm.field(x, 0.6, "velocity")).square().mean()
    assert float(err) < 1e-3


def test_fisher_eval_zero_for_the_exact_field():
    gmm = G.GMM.random(3, 4, seed=0)
    ev = G.FisherEval(gmm, "score", (0.2, 0.5), 256, seed=0)

    class Exact(torch.nn.Module):
        def __init__(self, scale: float):
            super().__init__()
            self.scale = scale

        def field(self, x, t, kind):
            return self.scale * gmm.field(x, t, kind).float()

    assert ev(Exact(1.0)).max() < 1e-10
    zero = ev(Exact(0.0))
    for i, t in enumerate((0.2, 0.5)):
        assert zero[i] == pytest.approx(float(gmm.field(ev.x[i], t, "score").square().mean()),
                                        rel=1e-5)


def test_short_training_lowers_the_fisher_divergence():
    args = G.parse_args(["--steps", "80", "--eval-every", "80", "--eval-samples", "256",
                         "--ref-size", "256", "--batch-size", "128", "--dim", "4"])
    gmm = G.GMM.random(args.dim, args.components, args.gmm_seed)
    ev = G.FisherEval(gmm, "velocity", G.EVAL_TS, 256, 0)
    for exp in ("cfm", "stable_vm"):
        rec = G.train_run(args, exp, 0, gmm, ev, progress=False)
        assert rec["steps"] == [0, 80]
        assert rec["final"]["fd_ema_avg"] < 0.8 * G.headline(rec["fd_ema"][0], G.EVAL_TS)


# ----------------------------------------------------------------------------------------------
# The equal-data baseline and the time budget.

def test_cfm_equal_data_is_cfm_at_batch_ref_size():
    gmm = G.GMM.random(3, 5, seed=0)
    b = G.make_batch("cfm_equal_data", gmm, 32, 96, "velocity", torch.Generator().manual_seed(4))
    assert b["x_t"].shape == (96, 3) and b["t"].shape == (96,) and b["target"].shape == (96, 3)
    # the same random stream as plain cfm with a batch of 96 (its ref-size is unused)
    ref = G.make_batch("cfm", gmm, 96, 7, "velocity", torch.Generator().manual_seed(4))
    for k in ("x_t", "t", "target", "x0"):
        assert torch.equal(b[k], ref[k]), k
    eps = (b["x_t"] - (1 - b["t"])[:, None] * b["x0"]) / b["t"][:, None]
    torch.testing.assert_close(b["target"], eps - b["x0"], rtol=1e-4, atol=1e-4)
    # 96 distinct fresh data samples, not 32 repeated
    assert torch.unique(b["x0"], dim=0).shape[0] == 96


def test_fresh_samples_drawn_per_step(monkeypatch):
    """Count the mixture samples each method draws per training step."""
    args = G.parse_args(["--steps", "3", "--eval-every", "3", "--batch-size", "16",
                         "--ref-size", "48", "--dim", "3", "--components", "4", "--hidden", "16"])
    gmm = G.GMM.random(args.dim, args.components, args.gmm_seed)
    ev = G.FisherEval(gmm, "velocity", G.EVAL_TS, 32, 0)     # draws its points before counting
    drawn: list[int] = []
    real_sample = G.GMM.sample

    def counting(self, n, generator=None):
        drawn.append(n)
        return real_sample(self, n, generator)

    monkeypatch.setattr(G.GMM, "sample", counting)
    expected = {"cfm": (16, 16), "cfm_equal_data": (48, 48), "stable_vm": (48, 16)}
    for exp, (data, x_t) in expected.items():
        drawn.clear()
        rec = G.train_run(args, exp, 0, gmm, ev, progress=False)
        assert drawn == [data] * 3, (exp, drawn)
        assert rec["data_per_step"] == data and rec["batch_size"] == x_t


def test_time_budget_counts_training_steps_only(monkeypatch):
    """A fake clock: every batch costs 0.25 s and every evaluation 5 s. With a 1 s budget the
    run must stop after exactly 4 steps (evaluations not counted), evaluating at 0, 3 and 4."""
    now = [100.0]

    def clock() -> float:
        return now[0]

    real_batch = G.make_batch

    def slow_batch(*a, **k):
        now[0] += 0.25
        return real_batch(*a, **k)

    monkeypatch.setattr(G, "make_batch", slow_batch)
    gmm = G.GMM.random(2, 3, 0)
    ev = G.FisherEval(gmm, "velocity", G.EVAL_TS, 16, 0)

    class SlowEval:
        ts = ev.ts

        def __call__(self, model):
            now[0] += 5.0
            return ev(model)

    slow_eval = SlowEval()

    common = ["--eval-every", "3", "--batch-size", "8", "--ref-size", "16", "--dim", "2",
              "--components", "3", "--hidden", "8"]
    args = G.parse_args(common + ["--time-budget", "1", "--steps", "2"])
    rec = G.train_run(args, "cfm_equal_data", 0, gmm, slow_eval, progress=False, clock=clock)
    assert rec["steps_done"] == 4 and rec["steps"] == [0, 3, 4]    # --steps 2 is ignored
    assert rec["clock"] == [0.0, 0.75, 1.0] and rec["step_seconds"] == 1.0
    assert rec["ms_per_step"] == pytest.approx(250.0)
    # the whole loop on the same clock: 4 steps, then two evaluations of EMA and raw model
    assert rec["train_seconds"] == 21.0 and rec["eval_seconds"] == 20.0
    assert rec["time_budget"] == 1.0 and rec["study"]["time_budget"] == 1.0
    assert rec["study"]["steps"] is None
    # without a budget the step count decides, whatever the clock says
    args = G.parse_args(common + ["--steps", "7"])
    rec = G.train_run(args, "cfm", 0, gmm, slow_eval, progress=False, clock=clock)
    assert rec["steps_done"] == 7 and rec["steps"] == [0, 3, 6, 7]
    assert rec["step_seconds"] == 1.75 and rec["time_budget"] is None


def test_study_key_of_fixed_step_runs_is_unchanged():
    """Runs saved before --time-budget existed must still match (for --only_plot)."""
    old = {"dim", "components", "gmm_seed", "vector_field", "steps", "batch_size", "ref_size",
           "lr", "hidden", "depth", "ema_decay", "split", "eval_every", "eval_samples",
           "eval_seed"}
    assert set(G.study_key(G.parse_args([]))) == old
    assert G.run_name("cfm", "velocity", 2) == "cfm-velocity-seed2"
    assert G.run_name("cfm", "velocity", 2, 20.5) == "cfm-velocity-budget20.5s-seed2"
    assert set(G.study_key(G.parse_args(["--time-budget", "3"]))) == old | {"time_budget"}


@pytest.mark.slow
def test_script_time_budget(tmp_path, repo_root):
    out = tmp_path / "budget"
    base = [sys.executable, "gmm_exp.py", "--dim", "3", "--components", "4",
            "--no_plot_variance", "--out", str(out), *TINY]
    r = subprocess.run(base + ["--exp", "cfm"], cwd=repo_root, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    fixed = out / "runs" / "cfm-velocity-seed0.json"
    before = fixed.stat().st_mtime_ns
    budget = 0.4
    t0 = time.perf_counter()
    r = subprocess.run(base + ["--exp", "cfm", "cfm_equal_data", "stable_vm", "--time-budget",
                               str(budget)], cwd=repo_root, capture_output=True, text=True,
                       timeout=120)
    wall = time.perf_counter() - t0
    assert r.returncode == 0, r.stderr[-3000:]
    assert fixed.stat().st_mtime_ns == before              # fixed-step results not overwritten
    summary = json.loads((out / "summary_velocity_budget0.4s.json").read_text())
    assert summary["study"]["time_budget"] == budget
    assert set(summary["methods"]) == {"cfm", "cfm_equal_data", "stable_vm"}
    for exp in ("cfm", "cfm_equal_data", "stable_vm"):
        rec = json.loads((out / "runs" / f"{exp}-velocity-budget0.4s-seed0.json").read_text())
        # spent the budget and stopped after the step that crossed it (a tiny step is ~1 ms;
        # the slack is for a busy machine)
        assert budget <= rec["step_seconds"] < budget + 0.5
        assert rec["steps_done"] > 4                           # TINY's --steps 4 is ignored
        assert rec["steps"][-1] == rec["steps_done"] and rec["clock"][-1] == rec["step_seconds"]
        assert np.all(np.diff(rec["clock"]) > 0) and np.all(np.diff(rec["steps"]) > 0)
        assert rec["eval_seconds"] > 0 and rec["train_seconds"] > rec["step_seconds"]
        assert summary["methods"][exp]["steps_per_seed"] == [rec["steps_done"]]
    assert wall < 60
    old = json.loads((out / "summary_velocity.json").read_text())
    assert set(old["methods"]) == {"cfm"}                  # the fixed-step summary is its own
    for name in ("fisher_velocity_budget0.4s.png", "fisher_vs_t_velocity_budget0.4s.png"):
        assert _png_ok(out / name)


# ----------------------------------------------------------------------------------------------
# The script.

TINY = ["--steps", "4", "--eval-every", "2", "--eval-samples", "64", "--batch-size", "16",
        "--ref-size", "32", "--chunk-size", "8", "--hidden", "16", "--variance-dims", "2", "3",
        "--variance-ts", "4", "--variance-samples", "32", "--variance-data-size", "64",
        "--no-progress"]


@pytest.fixture(scope="module")
def digits_shards(tmp_path_factory, repo_root):
    dest = tmp_path_factory.mktemp("gmmdigits") / "digits"
    subprocess.run([sys.executable, "preprocessing/encode.py", "--source", "digits", "--dest",
                    str(dest), "--resolution", "8", "--vae", "none", "--max-images", "200"],
                   cwd=repo_root, check=True, capture_output=True)
    return dest


def _png_ok(path):
    from PIL import Image
    with Image.open(path) as im:
        im.verify()
    return path.stat().st_size > 1000


@pytest.mark.slow
def test_script_end_to_end_all_methods(tmp_path, repo_root, digits_shards):
    out = tmp_path / "gmm"
    cmd = [sys.executable, "gmm_exp.py", "--exp", "all", "--dim", "2", "--components", "5",
           "--imagenet-data-path", str(digits_shards), "--real-max", "100", "--out", str(out),
           *TINY]
    r = subprocess.run(cmd + ["--enable_visualization"], cwd=repo_root, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    for exp in EXPS:
        for seed in (0,):
            rec = json.loads((out / "runs" / f"{exp}-velocity-seed{seed}.json").read_text())
            assert rec["steps"] == [0, 2, 4]
            fd = np.array(rec["fd_ema"])
            assert fd.shape == (3, len(G.EVAL_TS)) and np.isfinite(fd).all()
            with np.load(out / "runs" / f"{exp}-velocity-seed{seed}.npz") as z:
                np.testing.assert_allclose(z["fd_ema"], fd)
            from PIL import Image
            with Image.open(out / f"field_{exp}-velocity-seed{seed}.gif") as im:
                assert im.n_frames == 3
    summary = json.loads((out / "summary_velocity.json").read_text())["methods"]
    assert set(summary) == set(EXPS) and all(s["seeds"] == [0] for s in summary.values())
    assert (out / "summary_velocity.md").read_text().count("\n| ") == 5
    # TINY: --batch-size 16, --ref-size 32; the equal-data baseline trains on ref-size samples
    x_t_per_step = {"cfm": 16, "cfm_equal_data": 32, "stf": 16, "stable_vm": 16,
                    "stable_vm_efficient": 16}
    for exp in EXPS:
        rec = json.loads((out / "runs" / f"{exp}-velocity-seed0.json").read_text())
        assert rec["batch_size"] == x_t_per_step[exp]
        assert rec["data_per_step"] == (16 if exp == "cfm" else 32)
        assert rec["steps_done"] == 4 and rec["time_budget"] is None
        assert summary[exp]["data_per_step"] == rec["data_per_step"]
    for name in ("fisher_velocity.png", "fisher_vs_t_velocity.png", "variance_velocity.png"):
        assert _png_ok(out / name)
    curves = json.loads((out / "variance_velocity.json").read_text())["curves"]
    assert {"exact/d=2", "between/d=3", "empirical/d=3", "stable/d=2", "cfm/d=2",
            "real/D=192"} <= set(curves)
    assert not list(out.rglob(".*.tmp-*"))               # no temp files left behind
    # --only_plot redraws from the saved numbers without training
    before = (out / "runs" / "cfm-velocity-seed0.json").stat().st_mtime_ns
    (out / "fisher_velocity.png").unlink()
    r = subprocess.run(cmd + ["--only_plot"], cwd=repo_root, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _png_ok(out / "fisher_velocity.png")
    assert (out / "runs" / "cfm-velocity-seed0.json").stat().st_mtime_ns == before


def test_score_field_runs_for_every_method(tmp_path):
    out = tmp_path / "score"
    rc = G.main(["--exp", "all", "--seed", "0", "1", "--vector_field", "score", "--dim", "3",
                 "--components", "4", "--no_plot_variance", "--out", str(out), *TINY])
    assert rc == 0
    summary = json.loads((out / "summary_score.json").read_text())["methods"]
    assert set(summary) == set(EXPS)
    for s in summary.values():
        per_seed = np.array(s["avg_per_seed"])
        assert s["seeds"] == [0, 1] and np.isfinite(per_seed).all()
        assert s["avg_mean"] == pytest.approx(per_seed.mean())
        assert s["avg_std"] == pytest.approx(per_seed.std(ddof=1))


@pytest.mark.parametrize("argv,message", [
    (["--dim", "0"], "--dim must be >= 1"),
    (["--components", "0"], "--components must be >= 1"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--enable_visualization"], "use --dim 2"),
    (["--imagenet-data-path", "/nonexistent/shards"], "no such directory"),
    (["--split", "1.5"], "--split must be in [0, 1]"),
    (["--time-budget", "0"], "--time-budget must be a positive number"),
    (["--time-budget", "-3"], "--time-budget must be a positive number"),
    (["--time-budget", "nan"], "--time-budget must be a positive number"),
])
def test_bad_arguments_fail_clearly(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        G.parse_args(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_data_path_without_manifest(tmp_path, capsys):
    with pytest.raises(SystemExit):
        G.parse_args(["--imagenet-data-path", str(tmp_path)])
    assert "no manifest.json" in capsys.readouterr().err


def test_wandb_missing_is_reported_before_training(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)       # import wandb -> ImportError
    assert G.main(["--use_wandb", "--no_plot_variance", "--out", str(tmp_path), *TINY]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gmm_exp.py: error: --use_wandb needs the wandb package")
    assert "pip install wandb" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def test_cli_rejects_bad_input_and_imports_no_plotting_library(repo_root):
    r = subprocess.run([sys.executable, "gmm_exp.py", "--dim", "0"], cwd=repo_root,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--dim must be >= 1" in r.stderr
    r = subprocess.run([sys.executable, "-c", "import sys, gmm_exp; "
                        "print('matplotlib' in sys.modules, 'wandb' in sys.modules)"],
                       cwd=repo_root, capture_output=True, text=True, timeout=60)
    assert r.stdout.split() == ["False", "False"], r.stderr

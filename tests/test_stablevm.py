"""StableVM: memory bank and stable target against independent definitions
(docs/CONVENTIONS.md §5, §10).

The references here do not use losses.stablevm's code paths: path coefficients are written out
with math.cos/sin, the softmax with math.exp after subtracting the max, in float64 Python loops.
"""
from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import pytest
import torch

from losses.interpolant import interpolate
from losses.stablevm import (MemoryBank, build_stablevm_batch, stable_target,
                             stable_target_efficient)

SHAPE = (2, 3, 3)  # a small latent: D = 18
D = 18


# ---------------------------------------------------------------------------------------------
# Independent references.

def coeffs64(t: float, path_type: str) -> tuple[float, float, float, float]:
    """(a, s, a', s') in float64, written out from docs/CONVENTIONS.md §1."""
    if path_type == "linear":
        return 1.0 - t, t, -1.0, 1.0
    h = math.pi / 2
    return math.cos(h * t), math.sin(h * t), -h * math.sin(h * t), h * math.cos(h * t)


def brute_force(x_t, t, bank, mask, path_type, split, cfm_target, return_weights=False):
    """Per-sample float64 loop: w_j = exp(l_j - max l) / sum, l_j = -||x_t - a x0_j||^2 / (2s^2)."""
    b = x_t.shape[0]
    x = x_t.reshape(b, -1).double()
    ref = bank.reshape(b, bank.shape[1], -1).double()
    out, weights = [], []
    for i in range(b):
        ti = float(t[i])
        if ti < split:
            out.append(cfm_target[i].reshape(-1).double())
            weights.append(None)
            continue
        a, s, da, ds = coeffs64(ti, path_type)
        valid = [j for j in range(ref.shape[1]) if bool(mask[i, j])]
        logits = [-float(((x[i] - a * ref[i, j]) ** 2).sum()) / (2 * s * s) for j in valid]
        top = max(logits)
        w = [math.exp(v - top) for v in logits]
        total = sum(w)
        w = [v / total for v in w]
        mu = sum(wj * ref[i, j] for wj, j in zip(w, valid))
        out.append(ds / s * x[i] + (da - ds * a / s) * mu)
        weights.append(dict(zip(valid, w)))
    result = torch.stack(out).reshape(x_t.shape)
    return (result, weights) if return_weights else result


def random_problem(b=6, k=9, seed=0, spread=0.3, t=None, path_type="linear", all_valid=False):
    """Banks whose entries are close enough that the weights are far from one-hot; the source of
    each sample is one of its valid entries."""
    g = torch.Generator().manual_seed(seed)
    centre = torch.randn(b, 1, *SHAPE, generator=g)
    bank = (centre + spread * torch.randn(b, k, *SHAPE, generator=g)).half().float()
    mask = torch.rand(b, k, generator=g) < 0.7
    if all_valid:
        mask[:] = True
    src = torch.randint(0, k, (b,), generator=g)
    mask[torch.arange(b), src] = True
    x0 = bank[torch.arange(b), src]
    eps = torch.randn(b, *SHAPE, generator=g)
    if t is None:
        t = torch.tensor([0.2, 0.5, 0.63, 0.8, 0.97, 0.999])[:b]
    x_t, cfm = interpolate(x0, eps, t, path_type)
    return x_t, t, bank, mask, x0, eps, cfm


# ---------------------------------------------------------------------------------------------
# The target.

@pytest.mark.parametrize("path_type", ["linear", "cosine"])
def test_bank_with_only_the_source_gives_the_cfm_target(path_type):
    t = torch.tensor([0.5, 0.6, 0.75, 0.9, 0.99, 1.0])
    x_t, t, bank, mask, x0, eps, cfm = random_problem(t=t, path_type=path_type)
    only = torch.zeros_like(mask)
    src = (bank == x0.unsqueeze(1)).flatten(2).all(2).float().argmax(1)
    only[torch.arange(6), src] = True
    for fn in (stable_target, stable_target_efficient):
        out = fn(x_t, t, bank, only, path_type, split=0.5)
        torch.testing.assert_close(out, cfm, atol=1e-5, rtol=1e-5)
    # K = 1: the bank is the source itself.
    out = stable_target(x_t, t, x0.unsqueeze(1), None, path_type, split=0.5)
    torch.testing.assert_close(out, cfm, atol=1e-5, rtol=1e-5)
    if path_type == "linear":
        torch.testing.assert_close(out, eps - x0, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("path_type", ["linear", "cosine"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_float64_loop(path_type, seed):
    x_t, t, bank, mask, x0, eps, cfm = random_problem(seed=seed, path_type=path_type)
    ref, weights = brute_force(x_t, t, bank, mask, path_type, 0.5, cfm, return_weights=True)
    # The problem is not trivial: some rows spread their weight over several entries.
    assert any(w is not None and max(w.values()) < 0.9 for w in weights)
    for out in (stable_target(x_t, t, bank, mask, path_type, 0.5, cfm),
                stable_target_efficient(x_t, t, bank, mask, path_type, 0.5, cfm, chunk_size=4)):
        assert out.dtype == torch.float32
        torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)
        below = t < 0.5
        assert torch.equal(out[below], cfm[below])  # the plain target, untouched


def test_matches_float64_loop_with_latent_scale_banks():
    # Latent-like scale (D entries of std ~1, ~far apart): weights close to one-hot, large logits.
    x_t, t, bank, mask, x0, eps, cfm = random_problem(seed=5, spread=1.0)
    ref = brute_force(x_t, t, bank, mask, "linear", 0.5, cfm)
    torch.testing.assert_close(stable_target(x_t, t, bank, mask, "linear", 0.5, cfm).double(),
                               ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("path_type", ["linear", "cosine"])
def test_midway_between_two_points_weights_are_half(path_type):
    g = torch.Generator().manual_seed(3)
    p1, p2 = torch.randn(2, 4, *SHAPE, generator=g)
    t = torch.tensor([0.5, 0.7, 0.9, 0.99])
    a, s, da, ds = (torch.tensor([coeffs64(float(v), path_type)[i] for v in t]).view(-1, 1, 1, 1)
                    for i in range(4))
    x_t = (a * (p1 + p2) / 2).float()           # exactly midway between a p1 and a p2
    bank = torch.stack([p1, p2], dim=1)
    out = stable_target(x_t, t, bank, None, path_type, split=0.5)
    mid = (p1 + p2) / 2
    expected = ds / s * x_t + (da - ds * a / s) * mid
    torch.testing.assert_close(out, expected.float(), atol=1e-5, rtol=1e-5)
    if path_type == "linear":
        torch.testing.assert_close(out, (x_t - mid) / t.view(-1, 1, 1, 1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("path_type", ["linear", "cosine"])
def test_no_nan_or_silent_zero_near_the_ends(path_type):
    for tv in (0.5, 0.9, 0.999999, 1.0):
        x_t, _, bank, mask, x0, eps, cfm = random_problem(seed=7, path_type=path_type,
                                                          t=torch.full((6,), tv))
        t = torch.full((6,), tv)
        for out in (stable_target(x_t, t, bank, mask, path_type, 0.5, cfm),
                    stable_target_efficient(x_t, t, bank, mask, path_type, 0.5, cfm, chunk_size=2)):
            assert torch.isfinite(out).all()
            assert (out.flatten(1).abs().amax(1) > 0).all()
            ref = brute_force(x_t, t, bank, mask, path_type, 0.5, cfm)
            torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("path_type", ["linear", "cosine"])
@pytest.mark.parametrize("tv", [0.5, 0.8, 0.95, 0.999999, 1.0])
def test_far_away_x_t_takes_the_nearest_entry(path_type, tv):
    g = torch.Generator().manual_seed(11)
    b, k = 5, 8
    bank = torch.randn(b, k, *SHAPE, generator=g)
    mask = torch.ones(b, k, dtype=torch.bool)
    mask[:, ::3] = False                                   # some entries invalid
    direction = torch.randn(b, *SHAPE, generator=g)
    x_t = 1e4 * direction / direction.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    t = torch.full((b,), tv)
    for out in (stable_target(x_t, t, bank, mask, path_type),
                stable_target_efficient(x_t, t, bank, mask, path_type, chunk_size=3)):
        assert torch.isfinite(out).all()
        assert (out.flatten(1).abs().amax(1) > 0).all()
        if tv > 0.99:
            # a(t) ~ 0: the entries barely move the logits, the weights are not one-hot; the
            # large logits must still give the exact softmax.
            ref = brute_force(x_t, t, bank, mask, path_type, 0.5, None)
            torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-3)
            continue
        for i in range(b):
            a, s, da, ds = coeffs64(float(t[i]), path_type)
            dist = [float(((x_t[i].double() - a * bank[i, j].double()) ** 2).sum())
                    if mask[i, j] else math.inf for j in range(k)]
            j = min(range(k), key=dist.__getitem__)
            expected = ds / s * x_t[i].double() + (da - ds * a / s) * bank[i, j].double()
            torch.testing.assert_close(out[i].double(), expected, rtol=1e-5, atol=1e-3)


def test_refuses_rows_without_valid_entries_and_missing_cfm_target():
    x_t, t, bank, mask, x0, eps, cfm = random_problem()
    mask[4] = False                                      # t = 0.97 >= split, nothing valid
    for fn in (stable_target, stable_target_efficient):
        with pytest.raises(ValueError, match="no valid bank entry"):
            fn(x_t, t, bank, mask, "linear", 0.5, cfm)
    mask[4] = True
    mask[0] = False                                      # t = 0.2 < split: not needed, fine
    out = stable_target(x_t, t, bank, mask, "linear", 0.5, cfm)
    assert torch.equal(out[0], cfm[0]) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="below split"):
        stable_target(x_t, t, bank, mask, "linear", 0.5, None)
    with pytest.raises(ValueError, match="bank must be"):
        stable_target(x_t, t, bank[:, :, :1], mask, "linear", 0.5, cfm)


@pytest.mark.parametrize("chunk", [1, 2, 3, 4, 5, 7, 9, 10, 64])
@pytest.mark.parametrize("path_type", ["linear", "cosine"])
def test_efficient_equals_batched(chunk, path_type):
    x_t, t, bank, mask, x0, eps, cfm = random_problem(b=6, k=9, seed=chunk, path_type=path_type)
    full = stable_target(x_t, t, bank, mask, path_type, 0.5, cfm)
    stream = stable_target_efficient(x_t, t, bank, mask, path_type, 0.5, cfm, chunk_size=chunk)
    torch.testing.assert_close(stream, full, atol=1e-5, rtol=0)
    # fp16 bank given directly: chunks are cast on the fly.
    stream16 = stable_target_efficient(x_t, t, bank.half(), mask, path_type, 0.5, cfm,
                                       chunk_size=chunk)
    torch.testing.assert_close(stream16, full, atol=1e-5, rtol=0)


def run_python(code: str) -> None:
    """Run ``code`` in a fresh interpreter at the repository root; it must print 'ok'.

    The TF32 switches are process-wide, and torch refuses to read the legacy ones once the new
    per-backend API was used (and vice versa), so each scenario gets its own process and cannot
    disturb, or be disturbed by, other tests.
    """
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=root,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stdout + res.stderr


def test_strict_fp32_restores_legacy_tf32_switch():
    run_python("""
        import pytest, torch
        from losses.stablevm import stable_target, stable_target_efficient, strict_fp32
        b = torch.backends
        b.cuda.matmul.allow_tf32 = True
        assert torch.get_float32_matmul_precision() == "high"
        with strict_fp32("cpu"):
            assert torch.get_float32_matmul_precision() == "highest"
            assert b.cuda.matmul.allow_tf32 is False
            assert b.mkldnn.matmul.fp32_precision == "ieee"
        assert b.cuda.matmul.allow_tf32 is True
        x, t, bank = torch.randn(3, 4), torch.full((3,), 0.7), torch.randn(3, 5, 4)
        seen, bmm = [], torch.bmm

        def spy(*args):  # the settings in force when the target's matmuls run
            seen.append((torch.get_float32_matmul_precision(), b.cuda.matmul.allow_tf32,
                         torch.is_autocast_enabled("cpu")))
            return bmm(*args)

        torch.bmm = spy
        with torch.autocast("cpu", dtype=torch.bfloat16):
            stable_target(x, t, bank)
            stable_target_efficient(x, t, bank, chunk_size=2)
        torch.bmm = bmm
        assert len(seen) == 2 + 2 * 3 and set(seen) == {("highest", False, False)}, seen
        assert b.cuda.matmul.allow_tf32 is True
        assert torch.get_float32_matmul_precision() == "high"
        torch.set_float32_matmul_precision("medium")   # bf16 matmuls allowed on oneDNN
        stable_target(x, t, bank)
        assert torch.get_float32_matmul_precision() == "medium"
        with pytest.raises(ValueError):                 # restored on error too
            stable_target(x, t, bank, torch.zeros(3, 5, dtype=torch.bool))
        assert torch.get_float32_matmul_precision() == "medium"
        torch.set_float32_matmul_precision("highest")  # already strict: nothing is touched
        stable_target(x, t, bank)
        assert torch.get_float32_matmul_precision() == "highest"
        print("ok")
    """)


def test_strict_fp32_restores_new_api_settings():
    run_python("""
        import torch
        from losses.stablevm import stable_target, strict_fp32
        b = torch.backends
        b.cuda.matmul.fp32_precision = "tf32"
        b.mkldnn.matmul.fp32_precision = "bf16"
        with strict_fp32("cpu"):
            assert b.cuda.matmul.fp32_precision == "ieee"
            assert b.mkldnn.matmul.fp32_precision == "ieee"
        x = torch.randn(3, 4)
        stable_target(x, torch.full((3,), 0.7), torch.randn(3, 5, 4))
        assert b.cuda.matmul.fp32_precision == "tf32", b.cuda.matmul.fp32_precision
        assert b.mkldnn.matmul.fp32_precision == "bf16", b.mkldnn.matmul.fp32_precision
        print("ok")
    """)


def test_autocast_is_disabled_inside():
    x_t, t, bank, mask, x0, eps, cfm = random_problem()
    ref = stable_target(x_t, t, bank, mask, "linear", 0.5, cfm)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = stable_target(x_t, t, bank, mask, "linear", 0.5, cfm)
        out2 = stable_target_efficient(x_t, t, bank, mask, "linear", 0.5, cfm)
    assert out.dtype == torch.float32 and torch.equal(out, ref)
    torch.testing.assert_close(out2, ref, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# The bank.

def const_latents(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, *SHAPE)


def test_fifo_order_capacity_and_null_pool():
    k = 5
    bank = MemoryBank(3, SHAPE, capacity=k)
    assert bank.latents.shape == (4, k, *SHAPE) and bank.latents.dtype == torch.float16
    for v in range(1, k + 4):                       # push 1..K+3 to class 1, one at a time
        bank.push(const_latents([v]), torch.tensor([1]), torch.tensor([100 + v]))
    lat, idx = bank.entries(1)
    assert lat[:, 0, 0, 0].tolist() == [4, 5, 6, 7, 8]          # the last K, oldest first
    assert idx.tolist() == [104, 105, 106, 107, 108]
    assert int(bank.counts[1]) == k and int(bank.counts[0]) == 0
    null_lat, null_idx = bank.entries(bank.null_label)
    assert null_lat[:, 0, 0, 0].tolist() == [4, 5, 6, 7, 8] and null_idx.tolist()[0] == 104
    # Several items of the same class in one push keep their order; the null pool gets all.
    bank.push(const_latents([20, 21, 22, 23]), torch.tensor([0, 2, 0, 0]), torch.arange(4))
    assert bank.entries(0)[0][:, 0, 0, 0].tolist() == [20, 22, 23]
    assert bank.entries(0)[1].tolist() == [0, 2, 3]
    assert bank.entries(2)[0][:, 0, 0, 0].tolist() == [21]
    assert bank.entries(3)[0][:, 0, 0, 0].tolist() == [8, 20, 21, 22, 23]
    # More than K of a class in one push: the last K win, in order.
    bank.push(const_latents(range(30, 30 + 2 * k + 2)), torch.full((2 * k + 2,), 2))
    assert bank.entries(2)[0][:, 0, 0, 0].tolist() == list(range(30 + k + 2, 30 + 2 * k + 2))
    assert bank.entries(2)[1].tolist() == [-1] * k              # no indices given
    assert bank.counts.tolist() == [3, k, k, k]
    with pytest.raises(ValueError, match="labels must be"):
        bank.push(const_latents([1]), torch.tensor([3]))        # the null label is not data


@pytest.mark.parametrize("seed", [0, 1])
def test_batched_push_equals_one_at_a_time(seed):
    g = torch.Generator().manual_seed(seed)
    one, many = MemoryBank(4, SHAPE, capacity=6), MemoryBank(4, SHAPE, capacity=6)
    for n in (3, 17, 1, 40, 9, 0, 25):              # batches bigger and smaller than K
        x = torch.randn(n, *SHAPE, generator=g)
        y = torch.randint(0, 4, (n,), generator=g)
        idx = torch.randint(0, 10**6, (n,), generator=g)
        many.push(x, y, idx)
        for i in range(n):
            one.push(x[i:i + 1], y[i:i + 1], idx[i:i + 1])
        for key, val in one.state_dict().items():
            assert torch.equal(val, many.state_dict()[key]), key


def filled_bank(c=4, k=6, seed=0, store_indices=True) -> MemoryBank:
    g = torch.Generator().manual_seed(seed)
    bank = MemoryBank(c, SHAPE, capacity=k, store_indices=store_indices)
    n = 3 * c * k
    bank.push(torch.randn(n, *SHAPE, generator=g), torch.randint(0, c, (n,), generator=g),
              torch.arange(n))
    return bank


def test_state_dict_round_trip_including_safetensors(tmp_path):
    from safetensors.torch import load_file, save_file

    bank = filled_bank()
    bank.push(torch.randn(3, *SHAPE), torch.tensor([0, 0, 1]), torch.tensor([7, 8, 9]))
    sd = bank.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in sd.values())
    fresh = MemoryBank(4, SHAPE, capacity=6)
    fresh.load_state_dict(sd)
    save_file(bank.state_dict(), str(tmp_path / "bank.safetensors"))
    loaded = MemoryBank(4, SHAPE, capacity=6)
    loaded.load_state_dict(load_file(str(tmp_path / "bank.safetensors")))
    for other in (fresh, loaded):
        for key, val in sd.items():
            assert torch.equal(other.state_dict()[key], val), key
        for c in range(5):
            assert torch.equal(other.entries(c)[0], bank.entries(c)[0])
        # It continues identically: the same pushes give the same state.
        x = torch.randn(5, *SHAPE, generator=torch.Generator().manual_seed(1))
        y = torch.tensor([3, 1, 1, 0, 2])
        other.push(x, y, torch.arange(5))
    bank.push(x, y, torch.arange(5))
    for key, val in bank.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], val) and torch.equal(loaded.state_dict()[key],
                                                                           val)
    with pytest.raises(ValueError, match="capacity"):
        MemoryBank(4, SHAPE, capacity=5).load_state_dict(sd)
    with pytest.raises(ValueError, match="keys"):
        MemoryBank(4, SHAPE, capacity=6, store_indices=False).load_state_dict(sd)
    assert "indices" not in filled_bank(store_indices=False).state_dict()


def test_memory_bytes():
    bank = MemoryBank(10, (4, 8, 8), capacity=16)
    expected = 11 * 16 * 256 * 2 + 11 * 8 * 2 + 11 * 16 * 8
    assert bank.memory_bytes() == expected
    assert MemoryBank(10, (4, 8, 8), capacity=16, store_indices=False).memory_bytes() == \
        11 * 16 * 256 * 2 + 11 * 8 * 2


def synthetic_batches(labels: list[int], batch_size: int, cycle: bool = False):
    """A loader-like iterator: dicts with x (fp32), y, index over a fixed labelled dataset."""
    n = len(labels)
    y_all = torch.tensor(labels)
    x_all = torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(0))
    while True:
        for i in range(0, n - batch_size + 1, batch_size):
            yield {"x": x_all[i:i + batch_size], "y": y_all[i:i + batch_size],
                   "index": torch.arange(i, i + batch_size)}
        if not cycle:
            return


def test_prefill_modes_and_errors():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 5, (400,), generator=g).tolist()
    bank = MemoryBank(5, SHAPE, capacity=8)
    stats = bank.prefill(synthetic_batches(labels, 10), mode="one_per_class")
    assert bank.ready("one_per_class") and (bank.counts[:5] >= 1).all()
    assert stats["batches"] <= 5
    full = MemoryBank(5, SHAPE, capacity=8)
    stats_full = full.prefill(synthetic_batches(labels, 10), mode="full")
    assert full.ready("full") and full.counts.tolist() == [8] * 6
    assert stats_full["batches"] > stats["batches"]
    # The entries are the data: indices point at samples of the right class.
    for c in range(5):
        assert all(labels[i] == c for i in full.entries(c)[1].tolist())
    # A class that never appears: finite data runs out; a cycling loader is caught on its 2nd pass.
    missing = [v if v != 3 else 4 for v in labels]
    with pytest.raises(RuntimeError, match="ran out.*3: 0"):
        MemoryBank(5, SHAPE, capacity=8).prefill(synthetic_batches(missing, 10))
    with pytest.raises(RuntimeError, match=r"never showed class\(es\) 3"):
        MemoryBank(5, SHAPE, capacity=8).prefill(synthetic_batches(missing, 10, cycle=True),
                                                 mode="one_per_class")
    with pytest.raises(RuntimeError, match="2 batches were not enough"):
        MemoryBank(5, SHAPE, capacity=8).prefill(synthetic_batches(labels, 10), max_batches=2)
    # A class with fewer than K samples per pass fills from later passes of a cycling loader.
    rare = [v if not (v == 2 and i > 120) else 1 for i, v in enumerate(labels)]
    assert sum(v == 2 for v in rare) < 40
    few = MemoryBank(5, SHAPE, capacity=40)
    few.prefill(synthetic_batches(rare, 10, cycle=True), mode="full")
    assert few.ready("full")


def test_sample_sources_and_gather():
    bank = filled_bank()
    bank.push(torch.randn(2, *SHAPE), torch.tensor([0, 0]))
    part = MemoryBank(4, SHAPE, capacity=6)
    part.push(torch.randn(3, *SHAPE), torch.tensor([1, 1, 2]), torch.tensor([10, 11, 12]))
    labels = torch.tensor([1, 2, 1, 4, 1] * 40)
    g = torch.Generator().manual_seed(0)
    x0, slot, idx = part.sample_sources(labels, g)
    assert x0.dtype == torch.float32 and x0.shape == (200, *SHAPE)
    assert set(slot[labels == 1].tolist()) == {0, 1} and set(slot[labels == 2].tolist()) == {0}
    assert set(slot[labels == 4].tolist()) == {0, 1, 2}
    assert torch.equal(x0, part.latents[labels, slot].float())
    assert torch.equal(idx, part.indices[labels, slot])
    ref, mask = part.gather(labels)
    assert ref.shape == (200, 6, D) and ref.dtype == torch.float32
    assert mask[0].tolist() == [True, True, False, False, False, False]
    assert mask[3].tolist() == [True, True, True, False, False, False]
    with pytest.raises(ValueError, match="empty"):
        part.sample_sources(torch.tensor([0]), g)


def test_bank_stable_target_equals_gather_then_stable_target():
    bank = filled_bank(k=7)
    bank.push(torch.randn(2, *SHAPE), torch.tensor([2, 2]))
    part = MemoryBank(4, SHAPE, capacity=7)
    part.push(torch.randn(5, *SHAPE), torch.tensor([0, 1, 1, 2, 3]))
    for b in (bank, part):
        g = torch.Generator().manual_seed(2)
        y = torch.tensor([0, 1, 2, 3, 4, 1, 0, 4])
        x0, _, _ = b.sample_sources(y, g)
        t = torch.tensor([0.1, 0.5, 0.6, 0.7, 0.8, 0.9, 0.99, 1.0])
        x_t, cfm = interpolate(x0, torch.randn(x0.shape, generator=g), t)
        ref, mask = b.gather(y)
        full = stable_target(x_t, t, ref, mask, "linear", 0.5, cfm)
        for chunk in (1, 3, 7, 32):
            torch.testing.assert_close(b.stable_target(x_t, t, y, "linear", 0.5, cfm, chunk),
                                       full, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# Batch construction.

def test_batch_labels_uniform_and_cfg_dropout():
    c = 4
    bank = filled_bank(c=c, k=6)
    g = torch.Generator().manual_seed(0)
    batch = build_stablevm_batch(bank, c, 4000, 0.0, "linear", g)
    counts = torch.bincount(batch["y"], minlength=c + 1)
    assert counts[c] == 0
    assert (counts[:c] - 1000).abs().max() < 150           # ~5.5 sigma of a binomial(4000, 1/4)
    assert (build_stablevm_batch(bank, c, 500, 1.0, "linear", g)["y"] == c).all()
    dropped = (build_stablevm_batch(bank, c, 4000, 0.1, "linear", g)["y"] == c).float().mean()
    assert 0.07 < float(dropped) < 0.13


@pytest.mark.parametrize("path_type", ["linear", "cosine"])
def test_batch_contents_and_determinism(path_type):
    c = 4
    bank = filled_bank(c=c, k=6)
    batches = [build_stablevm_batch(bank, c, 64, 0.2, path_type,
                                    torch.Generator().manual_seed(5), efficient=eff)
               for eff in (True, True, False)]
    a, b, full = batches
    for key in a:
        if a[key] is not None:
            assert torch.equal(a[key], b[key]), key
    torch.testing.assert_close(a["target"], full["target"], atol=1e-5, rtol=0)
    other = build_stablevm_batch(bank, c, 64, 0.2, path_type, torch.Generator().manual_seed(6))
    assert not torch.equal(other["x_t"], a["x_t"])
    # The source is the bank entry drawn; x_t and the target follow docs/CONVENTIONS.md §5.
    assert torch.equal(a["x0"], bank.latents[a["y"], a["slot"]].float())
    assert torch.equal(a["indices"], bank.indices[a["y"], a["slot"]])
    x_t, cfm = interpolate(a["x0"], a["eps"], a["t"], path_type)
    assert torch.equal(a["x_t"], x_t)
    below = a["t"] < 0.5
    assert below.any() and (~below).any()
    assert torch.equal(a["target"][below], cfm[below])
    ref, mask = bank.gather(a["y"])
    expected = brute_force(a["x_t"], a["t"], ref, mask, path_type, 0.5, cfm)
    torch.testing.assert_close(a["target"].double(), expected, atol=1e-5, rtol=0)


def test_batch_time_options():
    bank = filled_bank()
    fixed = build_stablevm_batch(bank, 4, 16, 0.0, "linear", torch.Generator().manual_seed(0),
                                 t=0.75)
    assert torch.equal(fixed["t"], torch.full((16,), 0.75))
    custom = build_stablevm_batch(bank, 4, 16, 0.0, "linear", torch.Generator().manual_seed(0),
                                  time_sampler=lambda n, g: torch.rand(n, generator=g) * 0.1 + 0.9)
    assert ((custom["t"] >= 0.9) & (custom["t"] < 1.0)).all()
    logn = build_stablevm_batch(bank, 4, 16, 0.0, "linear", torch.Generator().manual_seed(0),
                                time_sampler="lognormal")
    assert ((logn["t"] > 0) & (logn["t"] < 1)).all()
    with pytest.raises(ValueError, match="num_classes"):
        build_stablevm_batch(bank, 5, 16, 0.0, "linear")


# ---------------------------------------------------------------------------------------------
# Toy with a known field: the stable target is closer to the true velocity than eps - x0.

def test_gaussian_mixture_toy_stable_target_beats_cfm_most_near_noise(capsys):
    # Data: N = 2048 points drawn from a mixture of 4 Gaussians (std 1, centres ~ N(0, 4 I)) in
    # 32-D. The bank is a subsample (K = 256 of the N points). The exact marginal velocity of
    # this empirical distribution for the linear path is (x_t - E[x0 | x_t]) / t with
    # E[x0 | x_t] the softmax(-||x_t - a x0_i||^2 / (2 s^2))-weighted mean over ALL N points.
    # (In 8-D the points of a cluster are not separated by the noise even at t = 0.6, so both
    # errors are dominated by the bank's subsampling there and the ratio is not monotone in t;
    # 32-D has the low-variance regime near the data that the method relies on.)
    g = torch.Generator().manual_seed(0)
    dim, n_data, k, m = 32, 2048, 256, 2048
    centres = 2.0 * torch.randn(4, dim, generator=g, dtype=torch.float64)
    data = centres[torch.randint(0, 4, (n_data,), generator=g)] \
        + torch.randn(n_data, dim, generator=g, dtype=torch.float64)
    data = data.float()
    bank = MemoryBank(1, (dim,), capacity=k, dtype=torch.float32)
    bank.push(data[torch.randperm(n_data, generator=g)], torch.zeros(n_data, dtype=torch.long))
    data = data.double()
    sq = (data ** 2).sum(1)

    def mse_at(t_value: float) -> tuple[float, float]:
        y = torch.zeros(m, dtype=torch.long)
        x0, _, _ = bank.sample_sources(y, g)
        eps = torch.randn(m, dim, generator=g)
        t = torch.full((m,), t_value)
        x_t, cfm = interpolate(x0, eps, t)
        stable = bank.stable_target(x_t, t, y, "linear", 0.5, cfm)
        # True field in float64 (||x_t||^2 is constant per row and cancels in the softmax).
        a, s = 1 - t_value, t_value
        xt = x_t.double()
        logits = (a * xt @ data.T - 0.5 * a * a * sq) / (s * s)
        true = (xt - torch.softmax(logits, dim=1) @ data) / s
        return (float(((cfm.double() - true) ** 2).sum(1).mean()),
                float(((stable.double() - true) ** 2).sum(1).mean()))

    grid = [0.5 + 0.05 * i for i in range(10)]             # t in [0.5, 0.95]
    results = {tv: mse_at(tv) for tv in grid + [0.6, 0.8, 0.95]}
    avg_cfm = sum(results[tv][0] for tv in grid) / len(grid)
    avg_stable = sum(results[tv][1] for tv in grid) / len(grid)
    ratios = {tv: results[tv][0] / results[tv][1] for tv in (0.6, 0.8, 0.95)}
    with capsys.disabled():
        print(f"\n[stablevm toy] mean MSE over t in [0.5, 0.95]: cfm {avg_cfm:.3f} stable "
              f"{avg_stable:.3f}; " + "; ".join(
                  f"t={tv}: cfm {results[tv][0]:.3f} stable {results[tv][1]:.4f} "
                  f"ratio {ratios[tv]:.1f}" for tv in ratios))
    assert avg_stable < avg_cfm
    assert all(results[tv][1] < results[tv][0] for tv in grid)
    assert ratios[0.6] < ratios[0.8] < ratios[0.95]
    assert ratios[0.95] > 10 * ratios[0.6]

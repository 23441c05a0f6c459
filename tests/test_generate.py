"""generate.py end to end on CPU with a tiny pixel-space SiT (no VAE, no downloads)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import generate
from samplers import make_labels

ROOT = Path(__file__).resolve().parent.parent
N = 11


def _save_run(path: Path, hidden: int = 32, seed: int = 0, config_hidden: int | None = None):
    from safetensors.torch import save_file
    from models.sit import SiT
    torch.manual_seed(seed)
    m = SiT(input_size=8, patch_size=2, in_channels=3, hidden_size=hidden, depth=2, num_heads=4,
            num_classes=10)
    with torch.no_grad():  # zero-initialised layers would make every sample the same
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, path / "ema.safetensors")
    cfg = {"model": "SiT-S/2", "input_size": 8, "in_channels": 3, "num_classes": 10,
           "model_kwargs": {"hidden_size": config_hidden or hidden, "depth": 2, "num_heads": 4},
           "vae": None, "latent_scale": 0.18215, "latent_bias": 0.0, "path_type": "linear"}
    (path / "config.json").write_text(json.dumps(cfg))
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return _save_run(tmp_path_factory.mktemp("run") / "run")


def _args(run_dir, sample_dir, mode="ode", bs=3, n=N, extra=()):
    return ["--ckpt", str(run_dir), "--mode", mode, "--num-steps", "4", "--cfg-scale", "1.8",
            "--guidance-high", "0.7", "--num-fid-samples", str(n), "--per-proc-batch-size",
            str(bs), "--global-seed", "3", "--sample-dir", str(sample_dir), *extra]


def _env():
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    return env


def _subprocess(cmd, **kw):
    return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=120, **kw)


def test_npz_format_like_adm_evaluator(run_dir, tmp_path):
    assert generate.cli(_args(run_dir, tmp_path / "s", extra=["--save-png"])) == 0
    f = np.load(tmp_path / "s" / "samples.npz")  # as ADM's evaluator reads it
    assert f.files[0] == "arr_0"
    arr = f["arr_0"]
    assert arr.dtype == np.uint8 and arr.shape == (N, 8, 8, 3)
    labels = f["arr_1"]
    assert labels.dtype == np.int64 and labels.shape == (N,)
    np.testing.assert_array_equal(labels, make_labels(N, 10, "random", 3))
    assert len({arr[i].tobytes() for i in range(N)}) == N  # the model is not constant
    side = json.loads((tmp_path / "s" / "samples.json").read_text())
    for key in ("checkpoint_sha256", "model", "mode", "num_steps", "heun", "cfg_scale",
                "guidance_low", "guidance_high", "path_type", "global_seed", "label_sampling",
                "precision", "num_fid_samples", "vae", "torch_version"):
        assert key in side
    assert side["num_fid_samples"] == N and side["vae"] is None
    assert len(list((tmp_path / "s" / "png").glob("*.png"))) == N


@pytest.mark.parametrize("mode", ["ode", "sde"])
def test_bytes_independent_of_processes_and_batch_size(run_dir, tmp_path, mode):
    assert generate.cli(_args(run_dir, tmp_path / "b3", mode, bs=3)) == 0
    assert generate.cli(_args(run_dir, tmp_path / "b5", mode, bs=5)) == 0
    r = _subprocess([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                     "generate.py", *_args(run_dir, tmp_path / "p2", mode.upper(), bs=4)])
    assert r.returncode == 0, r.stderr[-3000:]
    ref = (tmp_path / "b3" / "samples.npz").read_bytes()
    assert (tmp_path / "b5" / "samples.npz").read_bytes() == ref
    assert (tmp_path / "p2" / "samples.npz").read_bytes() == ref
    # both ranks wrote parts (global-index sharding)
    assert len(list((tmp_path / "p2" / "parts").glob("*.npz"))) == 3


def test_kill_and_rerun_gives_same_bytes(run_dir, tmp_path):
    out = tmp_path / "k"
    argv = _args(run_dir, out, "sde", bs=2)
    # tests/fault.py sleeps after each finished part (no test hook in generate.py itself)
    proc = subprocess.Popen([sys.executable, "tests/fault.py", "slow-parts", "1.0", "--",
                             "generate.py", *argv], cwd=ROOT, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parts = out / "parts"
    deadline = time.time() + 60
    while time.time() < deadline and not list(parts.glob("*.npz")):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = {p.name: p.stat().st_mtime_ns for p in parts.glob("*.npz")}
    assert 1 <= len(finished) < 6 and not (out / "samples.npz").exists()

    assert generate.cli(argv) == 0
    for name, mtime in finished.items():  # finished parts were kept, not recomputed
        assert (parts / name).stat().st_mtime_ns == mtime
    assert generate.cli(_args(run_dir, tmp_path / "ref", "sde", bs=5)) == 0
    assert (out / "samples.npz").read_bytes() == (tmp_path / "ref" / "samples.npz").read_bytes()


def test_rerun_with_other_settings_is_refused(run_dir, tmp_path, capsys):
    assert generate.cli(_args(run_dir, tmp_path / "s", n=4)) == 0
    assert generate.cli(_args(run_dir, tmp_path / "s", n=4, extra=["--num-steps", "5"])) == 2
    assert "num_steps" in capsys.readouterr().err


@pytest.mark.parametrize("n,c", [(50, 10), (20, 4), (23, 10), (7, 10)])
def test_equal_labels(n, c):
    labels = make_labels(n, c, "equal", 0)
    assert labels.shape == (n,) and labels.dtype == np.int64
    counts = np.bincount(labels, minlength=c)
    q, r = divmod(n, c)
    # documented rule: N // C each, the N mod C extras to the first classes of a seeded permutation
    rng = np.random.default_rng(__import__("samplers").sample_seed(0, 0, 3))
    expected = np.full(c, q)
    expected[rng.permutation(c)[:r]] += 1
    np.testing.assert_array_equal(counts, expected)
    if r == 0:
        assert (counts == n // c).all()
    np.testing.assert_array_equal(labels, make_labels(n, c, "equal", 0))
    assert not np.array_equal(labels, np.sort(labels)) or n < 3  # shuffled


def test_random_labels_reproducible():
    a = make_labels(100, 10, "random", 5)
    np.testing.assert_array_equal(a, make_labels(100, 10, "random", 5))
    assert not np.array_equal(a, make_labels(100, 10, "random", 6))
    assert a.min() >= 0 and a.max() < 10


def test_checkpoint_of_other_size_exits_2(tmp_path):
    bad = _save_run(tmp_path / "bad", hidden=48, config_hidden=32)
    r = _subprocess([sys.executable, "generate.py", *_args(bad, tmp_path / "s", n=2)])
    assert r.returncode == 2
    assert "does not match" in r.stderr and "shape" in r.stderr and "48" in r.stderr
    assert "Traceback" not in r.stderr


def test_missing_vae_exits_2(run_dir, tmp_path):
    missing = tmp_path / "no-such-vae"
    r = _subprocess([sys.executable, "generate.py",
                     *_args(run_dir, tmp_path / "s", n=2, extra=["--vae", str(missing)])])
    assert r.returncode == 2 and "VAE" in r.stderr and "no-such-vae" in r.stderr
    assert "Traceback" not in r.stderr


def test_unknown_model_and_repa_flags(run_dir, tmp_path, capsys):
    assert generate.cli(_args(run_dir, tmp_path / "s", n=2, extra=["--model", "SiT-Q/3"])) == 2
    assert "unknown model" in capsys.readouterr().err
    a = generate.parse_args(["--model", "SiT-XL/2", "--num-fid-samples", "50000", "--ckpt", "x.pt",
                             "--path-type=linear", "--encoder-depth=8", "--projector-embed-dims=768",
                             "--per-proc-batch-size=64", "--mode=sde", "--num-steps=250",
                             "--cfg-scale=1.8", "--guidance-high=0.7", "--resolution", "256",
                             "--vae", "mse", "--global-seed", "0", "--sample-dir", "s"])
    assert a.mode == "sde" and a.vae == "mse" and a.precision == "fp32"
    assert generate.parse_args(["ODE", "--ckpt", "x"]).mode == "ode"

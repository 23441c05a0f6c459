"""End-to-end checks of preprocessing/encode.py on the bundled digits (real data, offline)."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from preprocessing import shards as fmt
from preprocessing.encode import main as encode_main
from preprocessing.encode import posterior_noise as sample_noise

ROOT = Path(__file__).resolve().parent.parent


def load_all(dest: Path) -> dict[str, torch.Tensor]:
    """Concatenate every shard's tensors in manifest order."""
    m = json.loads((dest / "manifest.json").read_text())
    parts = [load_file(dest / s["file"]) for s in m["shards"]]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def shard_bytes(dest: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(dest.glob("shard-*.safetensors"))}


def run_cli(*args: str, env_extra: dict | None = None, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", **(env_extra or {}))
    return subprocess.run([sys.executable, "preprocessing/encode.py", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, **kw)


def test_digits_pixels_match_sklearn(tmp_path):
    from sklearn.datasets import load_digits

    dest = tmp_path / "d"
    assert encode_main(["--source", "digits", "--dest", str(dest), "--resolution", "16",
                        "--vae", "none", "--dtype", "fp32", "--shard-size", "500",
                        "--num-workers", "0"]) == 0
    m = json.loads((dest / "manifest.json").read_text())
    assert m["count"] == 1797 and m["num_classes"] == 10 and m["key"] == "latents"
    assert [s["count"] for s in m["shards"]] == [500, 500, 500, 297]
    t = load_all(dest)
    d = load_digits()
    idx = t["index"].numpy()
    assert sorted(idx.tolist()) == list(range(1797))          # every image exactly once
    assert not np.array_equal(idx, np.arange(1797))           # stored in a seeded permutation
    np.testing.assert_array_equal(t["labels"].numpy(), d.target[idx])
    # Documented resize: uint8 round(v*255/16), nearest upscale x2, grey -> RGB, then [-1, 1].
    u8 = np.rint(d.images * 255.0 / 16.0)[idx]
    up = np.repeat(np.repeat(u8, 2, axis=1), 2, axis=2)
    want = np.repeat(up[:, None], 3, axis=1) / 127.5 - 1.0
    np.testing.assert_allclose(t["latents"].numpy(), want, atol=1e-6)
    # Channel statistics of the stored pixels.
    np.testing.assert_allclose(m["latent"]["channel_mean"], [want.mean()] * 3, rtol=1e-6)
    np.testing.assert_allclose(m["latent"]["channel_std"], [want.std()] * 3, rtol=1e-6)
    assert m["latent"]["scale"] == 1.0 and m["latent"]["bias"] == 0.0
    assert fmt.verify(dest) == []


@pytest.mark.parametrize("store", ["moments", "sample", "mean"])
def test_vae_latents_equal_direct_diffusers(tmp_path, tiny_vae_dir, store):
    """Latents equal encoding the same images directly with diffusers (same seed for samples)."""
    from diffusers import AutoencoderKL
    from sklearn.datasets import load_digits

    res, seed = 32, 7
    dest = tmp_path / store
    assert encode_main(["--source", "digits", "--dest", str(dest), "--resolution", str(res),
                        "--vae", str(tiny_vae_dir), "--store", store, "--dtype", "fp32",
                        "--max-images", "40", "--shard-size", "16", "--batch-size", "5",
                        "--seed", str(seed), "--hflip", "--num-workers", "0"]) == 0
    m = json.loads((dest / "manifest.json").read_text())
    key = "moments" if store == "moments" else "latents"
    assert m["key"] == key and m["count"] == 40
    assert (m["latent"]["channels"], m["latent"]["height"], m["latent"]["width"]) == \
        (4, res // 8, res // 8)
    assert m["vae"]["revision"].startswith("sha256:")
    t = load_all(dest)
    idx = t["index"]

    vae = AutoencoderKL.from_pretrained(tiny_vae_dir).eval()
    d = load_digits()
    u8 = np.rint(d.images * 255.0 / 16.0)[idx.numpy()]
    up = np.repeat(np.repeat(u8, res // 8, axis=1), res // 8, axis=2)
    x = torch.from_numpy(np.repeat(up[:, None], 3, axis=1)).float() / 127.5 - 1.0
    for flip, name in ((0, key), (1, key + "_flip")):
        xi = x.flip(-1) if flip else x
        with torch.no_grad():
            dist = vae.encode(xi).latent_dist
        mean, std = dist.mean, dist.std
        if store == "moments":
            want = torch.cat([mean, std], 1)
        elif store == "mean":
            want = mean
        else:
            eps = torch.stack([sample_noise(seed, int(i), flip, (4, res // 8, res // 8))
                               for i in idx])
            want = mean + std * eps
        assert t[name].shape == (40,) + tuple(want.shape[1:])
        torch.testing.assert_close(t[name], want, atol=1e-5, rtol=1e-5)


def test_two_processes_byte_identical(tmp_path, tiny_vae_dir):
    common = ["--source", "digits", "--resolution", "16", "--vae", str(tiny_vae_dir),
              "--max-images", "300", "--shard-size", "64", "--hflip", "--store-images",
              "--batch-size", "16", "--num-workers", "1"]
    one = run_cli("--dest", str(tmp_path / "one"), *common, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
         "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
         "preprocessing/encode.py", "--dest", str(tmp_path / "two"), *common],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert two.returncode == 0, two.stderr[-3000:]
    assert "[rank 1/2]" in two.stdout  # really two processes, each with its own shards
    a, b = shard_bytes(tmp_path / "one"), shard_bytes(tmp_path / "two")
    assert len(a) == 5 and a == b
    assert (tmp_path / "one/manifest.json").read_bytes() == (tmp_path / "two/manifest.json").read_bytes()


def test_kill_and_rerun_is_byte_identical(tmp_path, tiny_vae_dir):
    """kill -9 a real encode at random moments (also mid-write), rerun, compare with a clean run."""
    common = ["--source", "digits", "--resolution", "32", "--vae", str(tiny_vae_dir),
              "--max-images", "480", "--shard-size", "40", "--batch-size", "8", "--hflip",
              "--num-workers", "0"]
    ref = tmp_path / "ref"
    r = run_cli("--dest", str(ref), *common, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    want = shard_bytes(ref)
    assert len(want) == 12

    dest = tmp_path / "killed"
    rng = random.Random(0)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    kills = 0
    for attempt in range(4):
        p = subprocess.Popen([sys.executable, "preprocessing/encode.py", "--dest", str(dest),
                              *common], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        # Wait until this attempt has written a shard, then kill at a random moment.
        start = len(list(dest.glob("shard-*"))) if dest.exists() else 0
        deadline = time.time() + 120
        while p.poll() is None and time.time() < deadline:
            if dest.exists() and len(list(dest.glob("shard-*"))) > start:
                break
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.4))
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            kills += 1
        p.wait()
        # Writes are atomic: any shard file visible after a kill is complete and final.
        bad = [k for k, v in shard_bytes(dest).items() if want[k] != v]
        assert bad == [], f"attempt {attempt}: {bad} differ from the uninterrupted run"
    assert kills >= 2
    partial = shard_bytes(dest)
    assert not (dest / "manifest.json").exists() or len(partial) == 12
    finished_before = {k: v for k, v in partial.items() if want.get(k) == v}
    mtimes = {k: (dest / k).stat().st_mtime_ns for k in finished_before}

    r = run_cli("--dest", str(dest), *common, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert shard_bytes(dest) == want
    assert (dest / "manifest.json").read_bytes() == (ref / "manifest.json").read_bytes()
    assert not list(dest.glob(".shard-*")) and not (dest / ".progress").exists()
    # Finished shards were not re-encoded (the file was left in place).
    recorded = [k for k in finished_before if (dest / k).stat().st_mtime_ns == mtimes[k]]
    assert len(recorded) >= 1
    assert f"{len(recorded)} of 12 shards already finished" in r.stdout or \
        "shards already finished" in r.stdout


def test_rerun_of_complete_dest_does_nothing_and_repairs(tmp_path):
    args = ["--source", "digits", "--dest", str(tmp_path / "d"), "--resolution", "8",
            "--vae", "none", "--shard-size", "600", "--num-workers", "0"]
    assert encode_main(args) == 0
    before = shard_bytes(tmp_path / "d")
    assert encode_main(args) == 0
    assert shard_bytes(tmp_path / "d") == before
    # A damaged shard is detected by its hash and re-encoded; the others are kept.
    victim = tmp_path / "d" / "shard-00001.safetensors"
    victim.write_bytes(b"garbage")
    assert fmt.verify(tmp_path / "d") != []
    assert encode_main(args) == 0
    assert shard_bytes(tmp_path / "d") == before
    assert fmt.verify(tmp_path / "d") == []


def test_missing_vae_message(tmp_path):
    r = run_cli("--source", "digits", "--dest", str(tmp_path / "d"), "--resolution", "16",
                "--vae", "nobody/no-such-vae", timeout=120)
    assert r.returncode == 2
    assert "encode.py: error: VAE 'nobody/no-such-vae'" in r.stderr and "hf download" in r.stderr
    assert "Traceback" not in r.stderr


def test_resolution_not_a_multiple_of_the_vae_factor(tmp_path, tiny_vae_dir, capsys):
    rc = encode_main(["--source", "digits", "--dest", str(tmp_path / "d"), "--resolution", "12",
                      "--vae", str(tiny_vae_dir), "--num-workers", "0"])
    assert rc == 2
    assert ("encode.py: error: --resolution 12 is not a multiple of the VAE's downsampling "
            "factor 8\n") in capsys.readouterr().err
    assert not (tmp_path / "d").exists()

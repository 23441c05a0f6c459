"""Shared fixtures and helpers: the repository root, tiny models built on the fly (no downloads),
encoded digits, and running train.py / checking its resume in subprocesses. Test modules import
the plain helpers from here (``from tests.conftest import ...``); pytest provides the fixtures."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a test that tries the network fails loudly


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def tiny_vae_dir(tmp_path_factory) -> Path:
    """A random-init diffusers AutoencoderKL with SD-VAE's layout (4 latent channels, /8) but tiny."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3,
                        down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(8, 16, 16, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=32)
    path = tmp_path_factory.mktemp("vae") / "tiny-vae"
    vae.save_pretrained(path)
    return path


# ----------------------------------------------------------------------------------------------
# Training runs in subprocesses.

REPO = ROOT  # the repository (scripts run from here)
TINY = ["--model", "SiT-S/2", "--depth", "2", "--hidden-size", "32", "--num-heads", "2",
        "--batch-size", "32", "--learning-rate", "1e-3", "--log-every", "1",
        "--checkpointing-steps", "3", "--report-to", "none", "--sampling-steps", "0",
        "--num-sample-images", "4", "--sample-num-steps", "2", "--ema-decay", "0.9",
        "--cfg-prob", "0.2"]
LOSS_KEYS = ("loss", "si", "disp", "proj", "grad_norm")


def script_env(extra: dict | None = None) -> dict:
    """The environment of a script run by a test: one thread, offline, the repository on the path."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    env.update(extra or {})
    return env


def encode(dest: Path, res: int, *extra: str) -> Path:
    subprocess.run([sys.executable, str(REPO / "preprocessing" / "encode.py"), "--source",
                    "digits", "--dest", str(dest), "--resolution", str(res), "--vae", "none",
                    *extra], check=True, capture_output=True, env=script_env())
    return dest


@pytest.fixture(scope="module")
def digits8(tmp_path_factory) -> Path:
    return encode(tmp_path_factory.mktemp("d8") / "digits", 8, "--hflip")


@pytest.fixture(scope="module")
def digits32_images(tmp_path_factory) -> Path:
    return encode(tmp_path_factory.mktemp("d32") / "digits", 32, "--store-images", "--hflip")


@pytest.fixture(scope="module")
def tiny_dinov2(tmp_path_factory) -> Path:
    """A DINOv2 ViT-S/14 with random weights saved where --encoder-weights-dir finds it."""
    import timm
    from safetensors.torch import save_file
    with torch.device("meta"):
        m = timm.create_model("vit_small_patch14_dinov2.lvd142m", pretrained=False,
                              num_classes=0, img_size=224)
    m = m.to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in m.named_parameters():
            p.normal_(1.0 if (p.ndim == 1 and "norm" in n and n.endswith(".weight")) else 0.0,
                      0.02, generator=g)
    d = tmp_path_factory.mktemp("enc")
    save_file({k: v.contiguous() for k, v in m.state_dict().items()},
              str(d / "vit_small_patch14_dinov2.lvd142m.safetensors"))
    return d


def train_cmd(data: Path, out: Path, *args: str, nproc: int = 1) -> list[str]:
    head = [sys.executable, str(REPO / "train.py")]
    if nproc > 1:
        head = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                "--master_port", str(random.randint(20000, 40000)), str(REPO / "train.py")]
    return head + ["--data-dir", str(data), "--output-dir", str(out), "--exp-name", "run",
                   *TINY, *args]


def run(cmd: list[str], env: dict | None = None, check: bool = True, timeout: int = 600
        ) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, capture_output=True, text=True, env=script_env(env), timeout=timeout,
                       cwd=REPO)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)}\nexit {p.returncode}\n{p.stdout[-3000:]}\n"
                             f"{p.stderr[-5000:]}")
    return p


def read_log(run_dir: Path) -> dict[int, dict]:
    out = {}
    for line in (run_dir / "log.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out[rec["step"]] = {k: rec[k] for k in LOSS_KEYS if k in rec}
    return out


def kill_then_resume(cmd: list[str], run_dir: Path, kill_step: int | None,
                     env: dict | None = None, resume_cmd: list[str] | None = None) -> None:
    """Start ``cmd``, SIGKILL its process group once the log reaches ``kill_step`` (None: the
    command dies by itself, e.g. by a fault injected with tests/fault.py), then resume to the
    end with ``resume_cmd`` (default: ``cmd``)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=script_env(env), cwd=REPO, start_new_session=True)
    log = run_dir / "log.jsonl"
    try:
        if kill_step is not None:
            deadline = time.time() + 300
            while time.time() < deadline and proc.poll() is None:
                if log.is_file() and len(log.read_text().splitlines()) >= kill_step:
                    break
                time.sleep(0.02)
            assert proc.poll() is None, f"run ended before step {kill_step}: {proc.stderr.read()}"
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0, "the interrupted run was not interrupted"
    run((resume_cmd or cmd) + ["--resume", "latest"])


def assert_same_run(ref: Path, resumed: Path, steps: int) -> None:
    a, b = read_log(ref), read_log(resumed)
    assert sorted(a) == sorted(b) == list(range(1, steps + 1))
    for s in a:
        assert a[s] == b[s], f"step {s}: {a[s]} != {b[s]}"
    final = f"checkpoints/step-{steps:07d}"
    for f in (f"{final}/model.safetensors", f"{final}/ema.safetensors", "ema.safetensors"):
        assert (ref / f).read_bytes() == (resumed / f).read_bytes(), f
    assert not list((resumed / "checkpoints").glob(".tmp-*"))

"""Full disks: a checkpoint, EMA export, shard or samples file that cannot be written leaves every
earlier file intact, removes its temporary files, stops with one line naming the path and the
bytes it needed, and the rerun after freeing space continues exactly (docs/CONVENTIONS.md §8).

A file-size limit (``ulimit -f``, RLIMIT_FSIZE) stands in for a full disk: Python ignores
SIGXFSZ, so a write past the limit fails with EFBIG as a write to a full disk fails with ENOSPC.
"""
from __future__ import annotations

import contextlib
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, assert_same_run, encode, run, script_env, train_cmd


@contextlib.contextmanager
def file_size_limit(nbytes: int):
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def limited(cmd: list[str], nbytes: int) -> subprocess.CompletedProcess:
    """Run ``cmd`` with every file it writes limited to ``nbytes``."""
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, resource.RLIM_INFINITY))
    return subprocess.run(cmd, capture_output=True, text=True, env=script_env(), cwd=REPO,
                          preexec_fn=limit, timeout=600)


def the_error(p: subprocess.CompletedProcess, prog: str) -> str:
    """The one error line of a failed run (progress bars aside)."""
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    lines = [ln for ln in p.stderr.replace("\r", "\n").splitlines() if ": error: " in ln]
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: cannot write "), p.stderr
    return lines[0]


def leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if ".tmp" in p.name]


def test_atomic_write_keeps_the_old_file_and_names_the_bytes(tmp_path):
    from common import WriteFailed, atomic_write_bytes, save_safetensors_atomic
    import torch
    target = tmp_path / "f.bin"
    atomic_write_bytes(target, b"old")
    with file_size_limit(1000), pytest.raises(WriteFailed) as e:
        atomic_write_bytes(target, b"x" * 5000)
    assert target.read_bytes() == b"old" and leftovers(tmp_path) == []
    assert str(target) in str(e.value) and "5,000 bytes" in str(e.value)
    with file_size_limit(1000), pytest.raises(WriteFailed):
        save_safetensors_atomic({"w": torch.zeros(1000)}, tmp_path / "w.safetensors")
    assert not (tmp_path / "w.safetensors").exists() and leftovers(tmp_path) == []


@pytest.mark.slow
def test_checkpoint_on_a_full_disk_then_resume_is_exact(digits8, tmp_path):
    from training.checkpoint import checkpoint_problem
    ref, out = tmp_path / "ref", tmp_path / "out"
    run(train_cmd(digits8, ref, "--max-train-steps", "6"))
    run(train_cmd(digits8, out, "--max-train-steps", "3"))  # step-3 checkpoint, then a full disk
    step3 = out / "run" / "checkpoints" / "step-0000003"
    before = {f.name: f.read_bytes() for f in step3.iterdir()}
    limit = (step3 / "model.safetensors").stat().st_size // 2
    assert limit > (out / "run" / "config.json").stat().st_size  # only checkpoints hit it
    cmd = train_cmd(digits8, out, "--max-train-steps", "6")
    line = the_error(limited(cmd + ["--resume", "latest"], limit), "train.py")
    assert ".tmp-step-0000006" in line and "bytes" in line
    assert {f.name: f.read_bytes() for f in step3.iterdir()} == before
    assert checkpoint_problem(step3, 1) is None and leftovers(out / "run" / "checkpoints") == []
    run(cmd + ["--resume", "latest"])  # space freed: continues from step 3
    assert_same_run(ref / "run", out / "run", 6)


@pytest.mark.slow
def test_samples_and_shards_on_a_full_disk_then_rerun(digits8, tmp_path):
    gen = [sys.executable, "generate.py", "--mode", "ode", "--num-steps", "2",
           "--num-fid-samples", "40", "--per-proc-batch-size", "8", "--label-sampling", "equal"]
    run(train_cmd(digits8, tmp_path, "--max-train-steps", "2"))
    ckpt = ["--ckpt", str(tmp_path / "run")]
    run(gen + ckpt + ["--sample-dir", str(tmp_path / "fresh")])
    # parts (8 images) fit under the limit, the 40-image samples.npz does not
    line = the_error(limited(gen + ckpt + ["--sample-dir", str(tmp_path / "full")], 4000),
                     "generate.py")
    assert "samples.npz" in line and leftovers(tmp_path / "full") == []
    run(gen + ckpt + ["--sample-dir", str(tmp_path / "full")])
    assert (tmp_path / "full" / "samples.npz").read_bytes() == \
        (tmp_path / "fresh" / "samples.npz").read_bytes()

    fresh = encode(tmp_path / "shards-fresh", 8)
    cmd = [sys.executable, "preprocessing/encode.py", "--source", "digits", "--dest",
           str(tmp_path / "shards"), "--resolution", "8", "--vae", "none"]
    shard = (fresh / "shard-00000.safetensors").stat().st_size
    line = the_error(limited(cmd, shard // 2), "encode.py")
    assert "shard-" in line and leftovers(tmp_path / "shards") == []
    subprocess.run(cmd, check=True, capture_output=True, env=script_env(), cwd=REPO)
    for f in sorted(fresh.glob("shard-*.safetensors")) + [fresh / "manifest.json"]:
        assert (tmp_path / "shards" / f.name).read_bytes() == f.read_bytes(), f.name

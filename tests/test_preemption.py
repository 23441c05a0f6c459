"""Preemption (SLURM's SIGUSR1 warning, SIGTERM at the time limit): every process finishes its
step, one checkpoint of the agreed step is written, the run exits 75, and ``--resume latest``
continues bit-identically (docs/CLUSTER.md). generate.py and encode.py stop after their current
batch or shard with the same code, and a rerun continues."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common import PREEMPTED_EXIT
from tests.conftest import REPO, assert_same_run, encode, run, script_env, train_cmd

STEPS = ["--max-train-steps", "8", "--checkpointing-steps", "4"]


def steps_saved(run_dir: Path) -> list[int]:
    return sorted(int(p.name[5:]) for p in (run_dir / "checkpoints").glob("step-*"))


def signal_when(cmd: list[str], ready, sig: int) -> subprocess.CompletedProcess:
    """Start ``cmd``, send ``sig`` to it once ``ready()`` holds, and wait for it to end."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=script_env(), cwd=REPO)
    deadline = time.time() + 300
    while not ready() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, f"ended before the signal: {proc.communicate()[1][-2000:]}"
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.mark.slow
def test_signals_stop_at_a_checkpoint_and_resume_is_exact(digits8, tmp_path):
    ref = tmp_path / "ref"
    run(train_cmd(digits8, ref, *STEPS))
    # SIGUSR1 between steps: the step in flight finishes, is saved, exit 75
    out = tmp_path / "usr1"
    cmd = train_cmd(digits8, out, *STEPS)
    log = out / "run" / "log.jsonl"
    p = signal_when(cmd, lambda: log.is_file() and len(log.read_text().splitlines()) >= 2,
                    signal.SIGUSR1)
    assert p.returncode == PREEMPTED_EXIT, p.stderr[-2000:]
    stop = steps_saved(out / "run")[-1]
    assert 2 <= stop < 8 and f"stopped by SIGUSR1 at step {stop}" in p.stderr
    run(cmd + ["--resume", "latest"])
    assert_same_run(ref / "run", out / "run", 8)
    # SIGTERM inside the write of step 4's checkpoint: that one completes, step 5 stops
    out = tmp_path / "term"
    cmd = train_cmd(digits8, out, *STEPS)
    faulty = [sys.executable, "tests/fault.py", "signal-after-save-state", "TERM:4", "--",
              *cmd[1:]]
    p = subprocess.run(faulty, capture_output=True, text=True, env=script_env(), cwd=REPO)
    assert p.returncode == PREEMPTED_EXIT, p.stderr[-2000:]
    assert steps_saved(out / "run") == [4, 5] and "stopped by SIGTERM at step 5" in p.stderr
    run(cmd + ["--resume", "latest"])
    assert_same_run(ref / "run", out / "run", 8)


@pytest.mark.slow
def test_two_processes_agree_on_the_stop_step(digits8, tmp_path):
    args = [*STEPS, "--preemption-check-every", "2"]
    ref = tmp_path / "ref"
    run(train_cmd(digits8, ref, *args, nproc=2))
    out = tmp_path / "out"
    cmd = train_cmd(digits8, out, *args, nproc=2)
    i = cmd.index(str(REPO / "train.py"))
    # only rank 1 is signalled, inside step 4's checkpoint write; both agree at step 6
    faulty = cmd[:i] + ["tests/fault.py", "signal-after-save-state", "TERM:4:1", "--",
                        *cmd[i:]]
    p = subprocess.run(faulty, capture_output=True, text=True, env=script_env(), cwd=REPO)
    assert p.returncode != 0  # torchrun reports its workers' 75 as its own failure (1)
    assert steps_saved(out / "run") == [4, 6], p.stderr[-3000:]
    # rank 0 (not signalled itself) speaks for all: they agreed at the next check, step 6
    assert "stopped by a signal to another process at step 6" in p.stderr
    assert "exitcode: 75" in p.stderr
    run(cmd + ["--resume", "latest"])
    assert_same_run(ref / "run", out / "run", 8)


@pytest.mark.slow
def test_generate_and_encode_stop_after_their_batch_and_continue(digits8, tmp_path):
    run(train_cmd(digits8, tmp_path, "--max-train-steps", "2"))
    gen = [sys.executable, "tests/fault.py", "slow-parts", "0.5", "--", "generate.py",
           "--ckpt", str(tmp_path / "run"), "--num-steps", "2", "--num-fid-samples", "40",
           "--per-proc-batch-size", "8"]
    fresh, stopped = tmp_path / "fresh", tmp_path / "stopped"
    run(gen + ["--sample-dir", str(fresh)])
    parts = stopped / "parts"
    p = signal_when(gen + ["--sample-dir", str(stopped)],
                    lambda: parts.is_dir() and len(list(parts.glob("0*.npz"))) >= 1,
                    signal.SIGTERM)
    assert p.returncode == PREEMPTED_EXIT and "stopped by SIGTERM" in p.stderr, p.stderr[-2000:]
    assert not (stopped / "samples.npz").exists() and 1 <= len(list(parts.glob("0*.npz"))) < 5
    run(gen + ["--sample-dir", str(stopped)])
    assert (stopped / "samples.npz").read_bytes() == (fresh / "samples.npz").read_bytes()

    ref = encode(tmp_path / "enc-ref", 8, "--shard-size", "300")
    dest = tmp_path / "enc"
    enc = [sys.executable, "preprocessing/encode.py", "--source", "digits", "--dest", str(dest),
           "--resolution", "8", "--vae", "none", "--shard-size", "300", "--batch-size", "4"]
    p = signal_when(enc, lambda: len(list(dest.glob("shard-*.safetensors"))) >= 1,
                    signal.SIGUSR1)
    assert p.returncode == PREEMPTED_EXIT and "stopped by SIGUSR1" in p.stderr, p.stderr[-2000:]
    assert not (dest / "manifest.json").exists()
    subprocess.run(enc, check=True, capture_output=True, env=script_env(), cwd=REPO)
    for f in sorted(ref.glob("shard-*.safetensors")) + [ref / "manifest.json"]:
        assert (dest / f.name).read_bytes() == f.read_bytes(), f.name

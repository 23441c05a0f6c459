"""Several machines, played by two ``accelerate launch --num_machines 2`` launchers on this host
(gloo on CPU, one process each): encode, train and generate write the same bytes as one machine
with the same two processes, and a directory the "nodes" do not share is refused before work.
"""
from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, TINY, assert_same_run, script_env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script: str, args: list[str], machines: int, cwds: tuple[Path, ...] | None = None,
           timeout: int = 420) -> list[subprocess.CompletedProcess]:
    """Run ``script`` as 2 processes: on one machine, or as ``machines`` launchers of one process
    each that meet at 127.0.0.1 (each launcher in its own working directory ``cwds[rank]``)."""
    head = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
            "--num_processes", "2", "--num_machines", str(machines), "--mixed_precision", "no",
            "--dynamo_backend", "no", "--main_process_ip", "127.0.0.1",
            "--main_process_port", str(free_port())]
    cwds = cwds or (REPO,) * machines
    procs = [subprocess.Popen(
        head + (["--machine_rank", str(r)] if machines > 1 else []) + [str(REPO / script), *args],
        cwd=cwds[r], env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True) for r in range(machines)]
    done = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return done


def ok(results: list[subprocess.CompletedProcess]) -> None:
    for r in results:
        assert r.returncode == 0, f"{' '.join(r.args)}\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"


def files(root: Path, pattern: str) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob(pattern))}


def test_encode_two_machines_same_bytes(tmp_path):
    args = ["--source", "digits", "--vae", "none", "--resolution", "8", "--max-images", "300",
            "--shard-size", "64", "--hflip", "--num-workers", "0"]
    ok(launch("preprocessing/encode.py", ["--dest", str(tmp_path / "one"), *args], machines=1))
    two = launch("preprocessing/encode.py", ["--dest", str(tmp_path / "two"), *args], machines=2)
    ok(two)
    assert "[rank 1/2]" in two[1].stdout  # the second launcher's process encoded shards
    a, b = files(tmp_path / "one", "*.safetensors"), files(tmp_path / "two", "*.safetensors")
    assert len(a) == 5 and a == b
    assert (tmp_path / "one/manifest.json").read_bytes() == \
        (tmp_path / "two/manifest.json").read_bytes()
    assert not list((tmp_path / "two").glob(".shared-check-*"))  # the marker is cleaned up


def test_train_and_generate_two_machines_same_bytes(digits8, tmp_path):
    steps = 6
    train = ["--data-dir", str(digits8), "--exp-name", "run", *TINY,
             "--max-train-steps", str(steps)]
    ok(launch("train.py", ["--output-dir", str(tmp_path / "one"), *train], machines=1))
    two = launch("train.py", ["--output-dir", str(tmp_path / "two"), *train], machines=2)
    ok(two)
    assert "2 process(es)" in two[0].stdout
    # the loss of every step, the checkpoints' weights and the EMA export, byte for byte
    assert_same_run(tmp_path / "one" / "run", tmp_path / "two" / "run", steps)
    assert len(files(tmp_path / "two" / "run" / "checkpoints", "random_states_*")) == 2 * 2

    gen = ["--ckpt", str(tmp_path / "one" / "run"), "--mode", "sde", "--num-steps", "4",
           "--num-fid-samples", "20", "--per-proc-batch-size", "4", "--cfg-scale", "2"]
    ok(launch("generate.py", [*gen, "--sample-dir", str(tmp_path / "s1")], machines=1))
    ok(launch("generate.py", [*gen, "--sample-dir", str(tmp_path / "s2")], machines=2))
    assert (tmp_path / "s1/samples.npz").read_bytes() == (tmp_path / "s2/samples.npz").read_bytes()


def _unshared_args(script: str, digits8: Path, tmp_path: Path) -> list[str]:
    if script == "train.py":  # a relative --output-dir: each launcher resolves it in its own cwd
        return ["--data-dir", str(digits8), "--output-dir", "runs", "--exp-name", "run", *TINY,
                "--max-train-steps", "2"]
    if script == "preprocessing/encode.py":
        return ["--source", "digits", "--vae", "none", "--resolution", "8", "--max-images",
                "64", "--dest", "data"]
    return ["--ckpt", str(tmp_path / "no-such-run"), "--sample-dir", "samples"]


@pytest.mark.parametrize("script", ["train.py", "preprocessing/encode.py", "generate.py"])
def test_directory_not_shared_between_nodes_is_refused(digits8, tmp_path, script):
    """Each "node" works in its own directory, as node-local disks would: rank 0's marker is
    invisible to rank 1, so both stop with one line before any work (generate even before it
    looks for the checkpoint, which does not exist here)."""
    nodes = (tmp_path / "node0", tmp_path / "node1")
    for d in nodes:
        d.mkdir()
    flag = {"train.py": "--output-dir runs", "generate.py": "--sample-dir samples",
            "preprocessing/encode.py": "--dest data"}[script]
    results = launch(script, _unshared_args(script, digits8, tmp_path), machines=2, cwds=nodes,
                     timeout=240)
    prog = Path(script).name
    for r in results:
        assert r.returncode != 0
        said = [line for line in r.stderr.splitlines() if line.startswith(f"{prog}: error:")]
        assert len(said) == 1, r.stderr[-3000:]
        assert f"{flag} is not one shared filesystem" in said[0]
        assert "rank(s) 1 (host" in said[0]
    made = [p for d in nodes for p in d.rglob("*") if p.is_file()]
    assert made == [], made  # no log, no shard, no samples, and the marker is gone

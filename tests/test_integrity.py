"""Integrity beyond crashes: divergence never reaches a checkpoint, a refused resume changes
nothing, changed settings are refused or recorded, damaged shards and checkpoints are named (and
a damaged latest checkpoint falls back to the previous one, bit for bit), and small misuses give
one clear line."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, encode, read_log, run, script_env, train_cmd

DIVERGE = ["--learning-rate", "1e6", "--max-grad-norm", "0", "--log-every", "12",
           "--checkpointing-steps", "4", "--max-train-steps", "12"]


@pytest.fixture(scope="module")
def digits8(tmp_path_factory) -> Path:
    return encode(tmp_path_factory.mktemp("d8") / "digits", 8)


def strict_json_lines(path: Path) -> list[dict]:
    def refuse(name):
        raise ValueError(f"{path} holds {name}, which is not JSON")
    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def all_finite(path: Path) -> bool:
    from safetensors.torch import load_file
    return all(torch.isfinite(v.float()).all() for v in load_file(str(path)).values())


def error_lines(stderr: str) -> list[str]:
    # tqdm rewrites its line with \r; the message may follow the bar on the same line
    return [ln[ln.index("train.py: error:"):] for ln in stderr.replace("\r", "\n").splitlines()
            if "train.py: error:" in ln]


# ----------------------------------------------------------------------------------------------
# 1-2. Divergence.

def _assert_nothing_nonfinite_saved(rd: Path) -> None:
    for ck in (rd / "checkpoints").glob("step-*"):
        assert all_finite(ck / "model.safetensors") and all_finite(ck / "ema.safetensors"), ck
    if (rd / "ema.safetensors").exists():
        assert all_finite(rd / "ema.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_divergence_between_log_points_stops_before_any_checkpoint(digits8, tmp_path, nproc):
    p = run(train_cmd(digits8, tmp_path, *DIVERGE, nproc=nproc), check=False, timeout=300)
    rd = tmp_path / "run"
    assert p.returncode != 0
    errors = error_lines(p.stderr)
    assert len(errors) == 1, p.stderr[-3000:]  # one message, from the main process only
    assert "diverged" in errors[0] and "no checkpoint had been written yet" in errors[0]
    assert "train.py\", line" not in p.stderr  # no traceback of ours (torchrun prints its own)
    assert not list((rd / "checkpoints").glob("step-*")) if (rd / "checkpoints").exists() else True
    _assert_nothing_nonfinite_saved(rd)


@pytest.mark.slow
def test_fp16_divergence_stops_after_consecutive_skips_with_valid_log(digits8, tmp_path):
    args = [*DIVERGE[:4], "--log-every", "2", "--checkpointing-steps", "4",
            "--max-train-steps", "40", "--mixed-precision", "fp16", "--max-consecutive-skips", "5"]
    p = run(train_cmd(digits8, tmp_path, *args), check=False)
    assert p.returncode == 3, p.stderr[-2000:]
    (msg,) = error_lines(p.stderr)
    assert "consecutive fp16 steps skipped" in msg and "--max-consecutive-skips 5" in msg
    rd = tmp_path / "run"
    recs = strict_json_lines(rd / "log.jsonl")  # no bare NaN
    assert recs and any(r["loss"] is None for r in recs)
    assert recs[-1]["step"] < 40
    _assert_nothing_nonfinite_saved(rd)
    done = sorted((rd / "checkpoints").glob("step-*"))
    if done:
        assert str(done[-1]) in msg  # names the last good checkpoint


def test_json_safe_and_guard_counters():
    from training.monitor import json_safe
    assert json_safe({"a": math.nan, "b": math.inf, "c": 1.5, "d": "x"}) == \
        {"a": None, "b": None, "c": 1.5, "d": "x"}


# ----------------------------------------------------------------------------------------------
# 3-4. Resume is all-or-nothing; changed settings are refused or recorded.

@pytest.fixture()
def finished_run(digits8, tmp_path) -> Path:
    run(train_cmd(digits8, tmp_path, "--max-train-steps", "4", "--checkpointing-steps", "2"))
    return tmp_path / "run"


def _snapshot(rd: Path) -> dict[str, bytes]:
    return {str(p.relative_to(rd)): p.read_bytes() for p in sorted(rd.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_refused_resume_rewrites_nothing(finished_run, tmp_path_factory, tmp_path):
    d16 = encode(tmp_path_factory.mktemp("d16") / "digits", 16)
    before = _snapshot(finished_run)
    p = run(train_cmd(d16, tmp_path, "--max-train-steps", "6", "--resume", "latest"),
            check=False)
    assert p.returncode == 2 and "resolution: 8 -> 16" in p.stderr
    assert "Traceback" not in p.stderr
    assert _snapshot(finished_run) == before
    run([sys.executable, str(REPO / "generate.py"), "--ckpt", str(finished_run), "--num-steps",
         "2", "--num-fid-samples", "2", "--sample-dir", str(tmp_path / "s")])


@pytest.mark.slow
def test_changed_objective_refused_unless_allowed_then_recorded(finished_run, digits8, tmp_path):
    changed = ["--learning-rate", "0.05", "--disp", "--weighting", "lognormal", "--cfg-prob", "0.5"]
    before = _snapshot(finished_run)
    p = run(train_cmd(digits8, tmp_path, "--max-train-steps", "6", "--resume", "latest",
                      *changed), check=False)
    assert p.returncode == 2
    for line in ("learning_rate: 0.001 -> 0.05", "disp: False -> True",
                 "weighting: 'uniform' -> 'lognormal'", "cfg_prob: 0.2 -> 0.5"):
        assert line in p.stderr, line
    assert _snapshot(finished_run) == before
    run(train_cmd(digits8, tmp_path, "--max-train-steps", "6", "--resume", "latest", *changed,
                  "--allow-config-change"))
    cfg = json.loads((finished_run / "config.json").read_text())
    first, second = cfg["history"]
    assert first["from_step"] == 0 and first["train"]["learning_rate"] == 1e-3
    assert first["train"]["disp"] is False and first["train"]["cfg_prob"] == 0.2
    assert second["from_step"] == 4
    assert second["changed"]["learning_rate"] == {"old": 1e-3, "new": 0.05}
    assert second["changed"]["weighting"] == {"old": "uniform", "new": "lognormal"}
    assert cfg["train"]["learning_rate"] == 0.05  # the settings in force now


# ----------------------------------------------------------------------------------------------
# 5. Shards are checked before training reads them.

def _flip_bytes(path: Path, offset_from_end: int, n: int = 8) -> None:
    b = bytearray(path.read_bytes())
    for i in range(n):
        b[-offset_from_end - i] ^= 0xFF
    path.write_bytes(bytes(b))


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["flipped-latents", "header", "truncated", "missing"])
def test_damaged_shards_are_named(digits8, tmp_path, damage):
    data = tmp_path / "data"
    shutil.copytree(digits8, data)
    shard = data / "shard-00001.safetensors"
    if damage == "flipped-latents":
        _flip_bytes(shard, 5000)
    elif damage == "header":
        b = bytearray(shard.read_bytes())
        b[20:28] = b"\xff\xfe\x00\x81\xff\xfe\x00\x81"
        shard.write_bytes(bytes(b))
    elif damage == "truncated":
        shard.write_bytes(shard.read_bytes()[:-4096])
    else:
        shard.unlink()
    for extra in ([], ["--no-verify-shards"]):
        if damage == "flipped-latents" and extra:
            continue  # only the checksum can see flipped data bytes
        p = run(train_cmd(data, tmp_path / "out", "--max-train-steps", "2", *extra), check=False)
        assert p.returncode == 2, p.stderr[-2000:]
        errors = error_lines(p.stderr)
        assert errors and "shard-00001.safetensors" in p.stderr, p.stderr[-2000:]
        assert "Traceback" not in p.stderr
        assert not (tmp_path / "out" / "run").exists()


# ----------------------------------------------------------------------------------------------
# 6. A damaged latest checkpoint: fall back to the previous one, end bit-identical.

@pytest.fixture(scope="module")
def ref_and_partial(digits8, tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("fallback")
    run(train_cmd(digits8, base / "ref", "--max-train-steps", "9"))      # checkpoints 3, 6, 9
    run(train_cmd(digits8, base / "part", "--max-train-steps", "6"))     # checkpoints 3, 6
    return base / "ref" / "run", base / "part" / "run"


DAMAGES = {
    "garbage-optimizer": lambda ck: (ck / "optimizer.bin").write_bytes(b"garbage"),
    "garbage-model": lambda ck: (ck / "model.safetensors").write_bytes(b"\x08" + b"\0" * 15),
    "truncated-ema": lambda ck: (ck / "ema.safetensors").write_bytes(
        (ck / "ema.safetensors").read_bytes()[:1000]),
    "bad-rank-json": lambda ck: (ck / "rank-0.json").write_text("{not json"),
    "missing-file": lambda ck: (ck / "random_states_0.pkl").unlink(),
    "garbage-random-states": lambda ck: (ck / "random_states_0.pkl").write_bytes(b"\x80garbage"),
}


@pytest.mark.slow
@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_damaged_latest_checkpoint_falls_back_bit_identical(ref_and_partial, digits8, tmp_path,
                                                            damage):
    ref, part = ref_and_partial
    work = tmp_path / "w"
    shutil.copytree(part.parent, work)
    DAMAGES[damage](work / "run" / "checkpoints" / "step-0000006")
    p = run(train_cmd(digits8, work, "--max-train-steps", "9", "--resume", "latest"))
    assert "skipped checkpoint step-0000006" in p.stdout
    assert "resumed from" in p.stdout and "step-0000003 at step 3" in p.stdout
    rd = work / "run"
    final = "checkpoints/step-0000009"
    for f in (f"{final}/model.safetensors", f"{final}/ema.safetensors", "ema.safetensors"):
        assert (rd / f).read_bytes() == (ref / f).read_bytes(), f
    assert read_log(rd) == read_log(ref)
    assert (rd / "checkpoints" / ".damaged-step-0000006").is_dir()


@pytest.mark.slow
def test_named_damaged_checkpoint_is_an_error(ref_and_partial, digits8, tmp_path):
    _, part = ref_and_partial
    work = tmp_path / "w"
    shutil.copytree(part.parent, work)
    DAMAGES["garbage-optimizer"](work / "run" / "checkpoints" / "step-0000006")
    p = run(train_cmd(digits8, work, "--max-train-steps", "9", "--resume", "6"), check=False)
    assert p.returncode == 2 and "optimizer.bin does not match its checksum" in p.stderr


# ----------------------------------------------------------------------------------------------
# 7. generate.py verifies the EMA export.

@pytest.mark.slow
def test_generate_refuses_a_bit_flipped_ema(ref_and_partial, tmp_path):
    ref, _ = ref_and_partial
    rd = tmp_path / "run"
    shutil.copytree(ref, rd)
    _flip_bytes(rd / "ema.safetensors", 100, n=1)
    p = run([sys.executable, str(REPO / "generate.py"), "--ckpt", str(rd), "--num-steps", "2",
             "--num-fid-samples", "2", "--sample-dir", str(tmp_path / "s")], check=False)
    assert p.returncode == 2 and "does not match its checksum" in p.stderr
    assert not (tmp_path / "s" / "samples.npz").exists()


# ----------------------------------------------------------------------------------------------
# 8. Small misuses: one line each.

@pytest.mark.parametrize("args,needle", [
    (["--learning-rate", "-1"], "--learning-rate must be > 0, got -1.0"),
    (["--learning-rate", "nan"], "--learning-rate must be > 0"),
    (["--ema-decay", "1.5"], "--ema-decay must be in [0, 1]"),
    (["--sample-cfg-scale", "-3"], "--sample-cfg-scale must be >= 0"),
])
def test_numeric_flags_out_of_range(digits8, tmp_path, args, needle):
    import train
    rc = train.main(["--data-dir", str(digits8), "--output-dir", str(tmp_path), *args,
                     "--max-train-steps", "1"])
    assert rc == 2
    assert not any(tmp_path.iterdir())


def test_numeric_flag_message(digits8, tmp_path, capsys):
    import train
    assert train.main(["--data-dir", str(digits8), "--output-dir", str(tmp_path),
                       "--learning-rate", "-1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["train.py: error: --learning-rate must be > 0, got -1.0"]


def test_generate_unknown_flag_is_named(capsys):
    import generate
    with pytest.raises(SystemExit):
        generate.parse_args(["--ckpt", "x", "--bogus", "1"])
    err = capsys.readouterr().err
    assert "unrecognized arguments: --bogus" in err and "ODE|SDE" not in err.splitlines()[-1]


def test_generate_negative_cfg_scale(capsys):
    import generate
    with pytest.raises(SystemExit):
        generate.parse_args(["--ckpt", "x", "--cfg-scale", "-3"])
    assert "--cfg-scale must be >= 0" in capsys.readouterr().err


def test_digits_accuracy_on_a_json_file(digits8, capsys):
    import evaluate
    assert evaluate.main(["digits-accuracy", str(digits8 / "manifest.json")]) == 2
    err = capsys.readouterr().err
    assert "is not an .npz archive" in err and "allow_pickle" not in err


def test_encode_rerun_on_damaged_dir_says_what_it_did(digits8, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(digits8, data)
    _flip_bytes(data / "shard-00001.safetensors", 5000)
    cmd = [sys.executable, str(REPO / "preprocessing" / "encode.py"), "--source", "digits",
           "--dest", str(data), "--resolution", "8", "--vae", "none"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=script_env(), check=True)
    assert "nothing to do" not in p.stdout and "re-encoded 1 missing or damaged shard" in p.stdout
    assert (data / "shard-00001.safetensors").read_bytes() == \
        (digits8 / "shard-00001.safetensors").read_bytes()
    p = subprocess.run(cmd, capture_output=True, text=True, env=script_env(), check=True)
    assert "nothing to do" in p.stdout

"""What a new user meets first: the launcher's mixed precision, trackers (offline), commands named
in messages, iREPA checkpoints of StableVelocity, the start-up summary and the run's log file."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, encode, read_log, run, train_cmd


@pytest.fixture(scope="module")
def digits8(tmp_path_factory) -> Path:
    return encode(tmp_path_factory.mktemp("d8") / "digits", 8)


def launch_cmd(precision: str, cmd: list[str]) -> list[str]:
    """``accelerate launch --mixed_precision P`` in front of a train_cmd (python train.py ...)."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1",
            "--num_machines", "1", "--dynamo_backend", "no", "--mixed_precision", precision,
            *cmd[1:]]


# ----------------------------------------------------------------------------------------------
# 1. One source of truth for mixed precision.

@pytest.mark.slow
def test_launcher_bf16_is_what_runs_and_what_is_recorded(digits8, tmp_path):
    steps = ["--max-train-steps", "2"]
    run(launch_cmd("bf16", train_cmd(digits8, tmp_path / "launch", *steps)))
    run(train_cmd(digits8, tmp_path / "flag", *steps, "--mixed-precision", "bf16"))
    run(train_cmd(digits8, tmp_path / "fp32", *steps))
    cfg = json.loads((tmp_path / "launch" / "run" / "config.json").read_text())
    assert cfg["train"]["mixed_precision"] == "bf16" and cfg["runtime"]["autocast"] == "bf16"
    launched, flagged = (read_log(tmp_path / d / "run") for d in ("launch", "flag"))
    fp32 = read_log(tmp_path / "fp32" / "run")
    assert launched == flagged           # the launcher's bf16 is the flag's bf16, not more
    # and it did change the numerics (step 1 is exact either way: the output layer starts at 0)
    assert launched[2]["loss"] != fp32[2]["loss"]


@pytest.mark.slow
def test_launcher_fp16_gets_loss_scaling(digits8, tmp_path):
    run(launch_cmd("fp16", train_cmd(digits8, tmp_path, "--max-train-steps", "2")))
    rd = tmp_path / "run"
    cfg = json.loads((rd / "config.json").read_text())
    assert cfg["train"]["mixed_precision"] == "fp16" and cfg["runtime"]["grad_scaler"] is True
    recs = [json.loads(line) for line in (rd / "log.jsonl").read_text().splitlines()]
    assert all(r["loss_scale"] > 1 for r in recs)  # GradScaler on (initial scale 2**16)


@pytest.mark.slow
def test_launcher_and_flag_that_disagree_stop_before_anything_is_written(digits8, tmp_path):
    p = run(launch_cmd("bf16", train_cmd(digits8, tmp_path, "--mixed-precision", "fp16")),
            check=False)
    assert p.returncode != 0
    assert "'bf16'" in p.stderr and "--mixed-precision is 'fp16'" in p.stderr
    assert "train.py: error:" in p.stderr  # a message, not a traceback from train.py
    assert not (tmp_path / "run").exists()


def test_launcher_precision_resolution(monkeypatch):
    from configs import TrainingConfig
    from common import UsageError
    from training.resolve import resolve_precision
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # launcher default: defers to flag
    cfg = TrainingConfig(mixed_precision="bf16")
    resolve_precision(cfg, {"mixed_precision"})
    assert cfg.mixed_precision == "bf16"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    cfg = TrainingConfig(mixed_precision="bf16")  # e.g. a preset's value: the launcher wins
    resolve_precision(cfg, set())
    assert cfg.mixed_precision == "fp16"
    with pytest.raises(UsageError, match="disagree|give one of them"):
        resolve_precision(TrainingConfig(mixed_precision="bf16"), {"mixed_precision"})
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp8")
    with pytest.raises(UsageError, match="fp8"):
        resolve_precision(TrainingConfig(), set())


# ----------------------------------------------------------------------------------------------
# 2. Trackers: installed, offline, files under the run directory, sample grids as images.

def test_requirements_install_both_trackers():
    reqs = (REPO / "requirements.txt").read_text()
    for pkg in ("wandb", "tensorboard"):
        assert re.search(rf"(?m)^{pkg}==\S+", reqs), f"{pkg} is not pinned in requirements.txt"


GRID_ARGS = ["--max-train-steps", "2", "--sampling-steps", "1", "--num-sample-images", "4",
             "--sample-num-steps", "2"]


@pytest.mark.slow
def test_wandb_offline_writes_under_the_run_dir_with_sample_images(digits8, tmp_path):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    cmd = train_cmd(digits8, tmp_path / "out", *GRID_ARGS)
    cmd[cmd.index("--report-to") + 1] = "wandb"
    from tests.conftest import script_env
    p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True,
                       env=script_env({"WANDB_MODE": "offline", "WANDB_SILENT": "true"}), timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert list(cwd.iterdir()) == []  # nothing in the current directory
    runs = list((tmp_path / "out" / "run" / "logs" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    images = sorted(p.name for p in (runs[0] / "files" / "media" / "images").glob("*.png"))
    assert [n.split("_")[:2] for n in images] == [["samples", "1"], ["samples", "2"]]


@pytest.mark.slow
def test_tensorboard_gets_scalars_and_sample_grids(digits8, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    cmd = train_cmd(digits8, tmp_path, *GRID_ARGS, "--log-every", "1")
    cmd[cmd.index("--report-to") + 1] = "tensorboard"
    run(cmd)
    events = list((tmp_path / "run" / "logs").rglob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tags = acc.Tags()
    assert "samples" in tags["images"] and "loss" in tags["scalars"]
    assert [e.step for e in acc.Images("samples")] == [1, 2]
    grid = acc.Images("samples")[0]
    assert grid.width > 8 and grid.height > 8  # the grid, not one 8x8 cell


# ----------------------------------------------------------------------------------------------
# 3. Every command a message tells the user to run exists in this environment.

def _commands(message: str) -> list[list[str]]:
    """The commands after 'run:' in a message (same line or the next), as [program, subcommand]."""
    found = re.findall(r"run:\s*\n?\s*([A-Za-z][\w.-]*) ([\w-]+)", message)
    return [list(c) for c in found]


def _messages() -> list[str]:
    from models.encoders import find_weights
    from models.vae import WeightsNotFound, load_vae
    out = []
    for call in (lambda: load_vae("nobody/no-such-vae", "cpu"),
                 lambda: find_weights("dinov2-vit-b", weights_dir="/nonexistent")):
        with pytest.raises(WeightsNotFound) as e:
            call()
        out.append(str(e.value))
    return out


def test_messages_name_commands_that_exist():
    messages = _messages()
    commands = [c for m in messages for c in _commands(m)]
    assert len(commands) == len(messages), messages  # each message names one
    # pip puts console scripts next to the interpreter (a venv's bin/), which need not be on PATH
    # when the tests run as `venv/bin/python -m pytest` without an activated venv
    scripts = os.pathsep.join([sysconfig.get_path("scripts"), str(Path(sys.executable).parent)])
    for program, sub in commands:
        exe = shutil.which(program, path=scripts) or shutil.which(program)
        assert exe, f"message names `{program}`, which is not installed"
        p = subprocess.run([exe, sub, "--help"], capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, f"`{program} {sub} --help` failed: {p.stderr[-500:]}"


def test_no_file_names_the_removed_cli():
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True)
    if files.returncode != 0:
        pytest.skip("not a git checkout")
    for name in files.stdout.split():
        path = REPO / name
        if path.suffix in (".py", ".md") and path.is_file() and name != "tests/test_first_contact.py":
            assert "huggingface" + "-cli" not in path.read_text(), name


# ----------------------------------------------------------------------------------------------
# 4. StableVelocity's iREPA checkpoints (projectors.k.conv.*) load.

def _irepa_model(seed: int):
    from models.sit import SiT
    torch.manual_seed(seed)
    return SiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2,
               num_classes=10, z_dims=[16, 24], encoder_depth=1, projector_type="conv",
               projector_kernel_size=3)


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_stablevelocity_irepa_checkpoint_loads(tmp_path, fmt):
    from models.sit import load_checkpoint, projector_kwargs, read_checkpoint
    src = _irepa_model(0).state_dict()
    theirs = {re.sub(r"^(projectors\.\d+)\.proj\.", r"\1.conv.", k): v for k, v in src.items()}
    assert sum(".conv." in k for k in theirs) == 4  # 2 projectors x (weight, bias)
    path = tmp_path / f"ckpt.{fmt}"
    if fmt == "pt":
        torch.save({"ema": theirs, "opt": {}}, path)
    else:
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in theirs.items()}, str(path))
    model = _irepa_model(1)
    load_checkpoint(model, path, strict=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, src[k]), k
    from models.sit import convert_sit_state_dict
    inferred = projector_kwargs(convert_sit_state_dict(read_checkpoint(path), 4, 2))
    assert inferred == {"z_dims": [16, 24], "projector_type": "conv", "projector_kernel_size": 3}


def test_projector_kwargs_of_repa_mlp_and_linear():
    from models.sit import SiT, projector_kwargs
    for kind, z in (("mlp", [12]), ("linear", [12, 20])):
        m = SiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2,
                num_classes=10, z_dims=z, encoder_depth=1, projector_type=kind, projector_dim=40)
        got = projector_kwargs(m.state_dict())
        assert got["z_dims"] == z and got["projector_type"] == kind


def test_generate_builds_an_irepa_checkpoint_without_flags(tmp_path):
    from training.load import build_model, resolve_run
    src = _irepa_model(0).state_dict()
    theirs = {re.sub(r"^(projectors\.\d+)\.proj\.", r"\1.conv.", k): v for k, v in src.items()}
    torch.save({"ema": theirs}, tmp_path / "irepa.pt")
    run_ = resolve_run(str(tmp_path / "irepa.pt"), model="SiT-S/2", vae="none", resolution=8,
                       num_classes=10, encoder_depth=1)
    run_["size"].update(depth=2, hidden_size=32, num_heads=2)
    run_["in_channels"] = 4
    model = build_model(run_, "cpu")
    for k, v in model.state_dict().items():
        assert torch.equal(v, src[k]), k


# ----------------------------------------------------------------------------------------------
# 5. A short start-up summary, and log.txt in the run directory with what went to stdout.

@pytest.mark.slow
def test_startup_summary_and_log_file(digits8, tmp_path):
    p = run(train_cmd(digits8, tmp_path, "--max-train-steps", "3"))
    rd = tmp_path / "run"
    out = p.stdout.splitlines()
    assert len(out) <= 10, p.stdout  # was ~100 lines of JSON
    assert "{" not in p.stdout
    text = "\n".join(out)
    for needle in ("SiT-S/2", "M trainable parameters", "batch    32", str(digits8),
                   "precision no", str(rd)):
        assert needle in text, needle
    log = (rd / "log.txt").read_text()
    assert all(line in log for line in out)
    p2 = run(train_cmd(digits8, tmp_path, "--max-train-steps", "4", "--resume", "latest"))
    log = (rd / "log.txt").read_text()
    assert log.count("---- ") == 2 and "resumed from" in log and "done: step 4" in log
    assert all(line in log for line in p2.stdout.splitlines())

"""Sharing a model on the Hub (README, "Sharing a model on the Hub"): train.py --push-to-hub
offline, export.py, the Hub model folder (huggingface_hub's PyTorchModelHubMixin + ModelCard), and
generate.py from that folder or from a Hub id in a local HF cache, all offline on CPU."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import generate
from common import UsageError
from configs import TrainingConfig, parse_config
from tests.conftest import REPO, run, script_env, train_cmd
from training.checkpoint import FREE_KEYS, check_resume_settings, checkpoint_problem

REPO_ID = "me/x"
REV = "0123456789abcdef0123456789abcdef01234567"  # a commit hash, as the cache layout names it
GEN = ["--mode", "sde", "--num-steps", "4", "--cfg-scale", "1.5", "--num-fid-samples", "8",
       "--per-proc-batch-size", "3", "--global-seed", "2"]


@pytest.fixture(scope="module")
def trained(digits8, tmp_path_factory):
    """A tiny run (dispersive loss, online evaluation) trained with --push_to_hub offline."""
    out = tmp_path_factory.mktemp("hub")
    p = run(train_cmd(digits8, out, "--max-train-steps", "3", "--disp", "--disp-lambda", "0.5",
                      "--eval-every", "3", "--eval-samples", "20", "--eval-num-steps", "2",
                      "--push_to_hub", "--hub_model_id", REPO_ID))
    return out / "run", p


@pytest.fixture(scope="module")
def reference(trained, tmp_path_factory) -> bytes:
    """samples.npz generated from the run directory itself."""
    out = tmp_path_factory.mktemp("ref")
    assert generate.cli(["--ckpt", str(trained[0]), *GEN, "--sample-dir", str(out)]) == 0
    return (out / "samples.npz").read_bytes()


def _generate(ckpt, sample_dir: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return run([sys.executable, str(REPO / "generate.py"), "--ckpt", str(ckpt), *GEN,
                "--sample-dir", str(sample_dir)], env=env, check=False)


def _cache(root: Path, repo_id: str, folder: Path) -> Path:
    """``folder`` placed in an HF cache at ``root`` as ``hf download`` lays it out."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(folder, repo / "snapshots" / REV)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REV)
    return root


def test_train_push_offline_writes_the_folder_and_says_how_to_push(trained):
    run_dir, p = trained
    hub = run_dir / "hub"
    assert sorted(f.name for f in hub.iterdir()) == ["README.md", "config.json",
                                                     "model.safetensors"]
    said = [line for line in p.stdout.splitlines() if "push it later" in line]
    assert said == [f"not pushed to the Hub (HF_HUB_OFFLINE is set); push it later with: "
                    f"hf upload {REPO_ID} {hub}"]
    assert "Traceback" not in p.stderr
    # the run is intact: its final checkpoint verifies and the EMA export is there
    assert checkpoint_problem(run_dir / "checkpoints" / "step-0000003", 1) is None
    assert (run_dir / "ema.safetensors").is_file()
    assert json.loads((run_dir / "config.json").read_text())["train"]["hub_model_id"] == REPO_ID


def test_folder_holds_the_ema_weights_and_the_model_contract(trained):
    run_dir = trained[0]
    ema, hub = load_file(run_dir / "ema.safetensors"), load_file(run_dir / "hub" /
                                                                   "model.safetensors")
    assert sorted(hub) == sorted(ema) and not any(k.startswith("projectors.") for k in hub)
    for k in ema:
        assert torch.equal(hub[k], ema[k]), k
    mode = (run_dir / "ema.safetensors").stat().st_mode  # shared as the run's export is
    assert (run_dir / "hub" / "model.safetensors").stat().st_mode == mode
    config = json.loads((run_dir / "hub" / "config.json").read_text())
    # what the tiny run's flags (tests/conftest.py TINY) and the 8x8 pixel digits fix
    assert config["model"] == "SiT-S/2" and config["input_size"] == 8
    assert config["in_channels"] == 3 and config["num_classes"] == 10
    assert config["model_kwargs"] == {"depth": 2, "hidden_size": 32, "num_heads": 2,
                                      "qk_norm": False}
    assert config["vae"] is None and config["path_type"] == "linear"
    # and it round-trips through the mixin
    from training.hub import HubSiT
    model = HubSiT.from_pretrained(run_dir / "hub")
    assert not model.training and model.depth == 2 and model.hidden_size == 32
    state = model.state_dict()
    assert sorted(state) == sorted(ema) and all(torch.equal(state[k], ema[k]) for k in ema)


def test_model_card_describes_the_run(trained, digits8):
    run_dir = trained[0]
    card = (run_dir / "hub" / "README.md").read_text()
    manifest_sha = json.loads((digits8 / "manifest.json").read_text())["config_sha256"]
    assert len(manifest_sha) == 64 and manifest_sha in card
    for text in ("SiT-S/2", "| depth | 2 |", "| hidden size | 32 |", "pixel space",
                 "**si + disp**", "| `--disp` | true |", "| `--disp-lambda` | 0.5 |",
                 "| `--disp-tau` | 1.0 |", "| `--cfg-prob` | 0.2 |", "3 optimizer steps",
                 "| steps | 3 |", "hf download me/x", "python generate.py --ckpt me/x --mode ode"):
        assert text in card, text
    assert "--use-proj-loss` | false" in card and "--proj-coeff" not in card  # REPA is off
    last = json.loads((run_dir / "eval.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 3 and "(step 3," in card
    assert f"| fd_ratio | {last['fd_ratio']:.6g} |" in card
    from huggingface_hub import ModelCard
    data = ModelCard.load(run_dir / "hub" / "README.md").data
    assert data.library_name == "sitkit" and "pytorch_model_hub_mixin" in data.tags


def test_export_then_generate_gives_the_run_directory_samples(trained, reference, tmp_path):
    run_dir = trained[0]
    p = run([sys.executable, str(REPO / "export.py"), str(run_dir), "--out",
             str(tmp_path / "exported")])
    assert f"wrote the Hub model folder {tmp_path / 'exported'}" in p.stdout
    for folder in (tmp_path / "exported", run_dir / "hub"):
        out = tmp_path / f"s-{folder.name}"
        assert generate.cli(["--ckpt", str(folder), *GEN, "--sample-dir", str(out)]) == 0
        assert (out / "samples.npz").read_bytes() == reference, folder
    # the comparison can fail: other weights in the folder give other samples
    bent = tmp_path / "bent"
    shutil.copytree(tmp_path / "exported", bent)
    w = load_file(bent / "model.safetensors")
    w["final_layer.linear.bias"] = w["final_layer.linear.bias"] + 0.5
    save_file(w, str(bent / "model.safetensors"))
    assert generate.cli(["--ckpt", str(bent), *GEN, "--sample-dir", str(tmp_path / "s-b")]) == 0
    assert (tmp_path / "s-b" / "samples.npz").read_bytes() != reference
    with np.load(tmp_path / "s-b" / "samples.npz") as z:
        assert z["arr_0"].shape == (8, 8, 8, 3)


def test_hub_id_in_the_local_cache_loads(trained, reference, tmp_path):
    cache = _cache(tmp_path / "cache", REPO_ID, trained[0] / "hub")
    p = _generate(REPO_ID, tmp_path / "s", env={"HF_HUB_CACHE": str(cache)})
    assert p.returncode == 0, p.stderr[-3000:]
    assert (tmp_path / "s" / "samples.npz").read_bytes() == reference
    from training.hub import HubSiT  # the mixin finds it there too, without the network
    model = HubSiT.from_pretrained(REPO_ID, cache_dir=cache, local_files_only=True)
    ema = load_file(trained[0] / "ema.safetensors")
    assert all(torch.equal(model.state_dict()[k], ema[k]) for k in ema)


def test_absent_hub_id_says_how_to_download(tmp_path):
    (tmp_path / "cache").mkdir()
    p = _generate("me/absent", tmp_path / "s", env={"HF_HUB_CACHE": str(tmp_path / "cache")})
    assert p.returncode == 2 and "Traceback" not in p.stderr
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("generate.py: error: ")
    assert lines[0].endswith("hf download me/absent") and str(tmp_path / "cache") in lines[0]
    # a path that is not of the ORG/NAME form is still just a missing checkpoint
    from training.load import resolve_checkpoint
    with pytest.raises(UsageError, match="does not exist"):
        resolve_checkpoint(str(tmp_path / "nope" / "run"))


def test_export_errors_exit_2(trained, tmp_path):
    run_dir = trained[0]
    missing = run([sys.executable, str(REPO / "export.py"), str(tmp_path / "nope")], check=False)
    assert missing.returncode == 2 and "export.py: error: " in missing.stderr
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    taken = run([sys.executable, str(REPO / "export.py"), str(run_dir), "--out",
                 str(tmp_path / "mine")], check=False)
    assert taken.returncode == 2 and "not a Hub model folder" in taken.stderr
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    # online but not logged in: the folder is written, the push is not, and the line says how
    env = script_env({"HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf-home")})
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH"):
        env.pop(name, None)
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, str(REPO / "export.py"), str(run_dir), "--out", str(out),
                        "--push-to-hub", "--hub-model-id", REPO_ID], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and (out / "model.safetensors").is_file()
    assert p.stderr.strip().splitlines() == [
        f"export.py: error: not pushed to the Hub (not logged in: run `hf auth login`); push it "
        f"later with: hf upload {REPO_ID} {out}"]


def test_hub_flags_aliases_and_resume(tmp_path):
    for argv in (["--push_to_hub", "--hub_model_id", "a/b"],
                 ["--push-to-hub", "--hub-model-id", "a/b"]):
        cfg, given = parse_config(argv)
        assert cfg.push_to_hub is True and cfg.hub_model_id == "a/b"
        assert given == {"push_to_hub", "hub_model_id"}
    assert TrainingConfig().push_to_hub is False and {"push_to_hub", "hub_model_id"} <= FREE_KEYS
    # a resume may start (or stop) pushing without --allow-config-change
    old = TrainingConfig(data_dir="d", num_classes=10)
    new = TrainingConfig(data_dir="d", num_classes=10, push_to_hub=True, hub_model_id="a/b")
    changes = check_resume_settings({"train": old.to_dict(), "data": {"config_sha256": "s",
                                                                     "count": 5}},
                                    new, data_sha="s", data_count=5, input_size=8,
                                    run_dir=tmp_path)
    assert set(changes) == {"push_to_hub", "hub_model_id"}
    with pytest.raises(UsageError, match="changed settings"):  # the check does refuse others
        check_resume_settings({"train": old.to_dict(), "data": {"config_sha256": "s",
                                                                "count": 5}},
                              TrainingConfig(data_dir="d", num_classes=10, learning_rate=1.0),
                              data_sha="s", data_count=5, input_size=8, run_dir=tmp_path)


def test_hub_model_id_checked_before_training(digits8, tmp_path):
    bad = run(train_cmd(digits8, tmp_path, "--push-to-hub", "--hub-model-id", "not an id",
                        "--dry-run"), check=False)
    assert bad.returncode == 2 and "--hub-model-id 'not an id' is not a Hub model id" in bad.stderr
    ok = run(train_cmd(digits8, tmp_path, "--push-to-hub", "--dry-run"))
    assert json.loads(ok.stdout)["hub_model_id"] == "run"  # the run directory's name


def test_card_flags_follow_the_objective():
    from training.hub import objective_flags
    train = TrainingConfig(loss_type="meanflow", time_mu=0.0).to_dict()
    flags = dict(objective_flags(train))
    assert flags["--loss-type"] == "meanflow" and flags["--time-mu"] == "0.0"
    assert flags["--disp"] == "false" and "--disp-lambda" not in flags
    assert "--bank-capacity-per-class" not in flags and "--legacy" not in flags
    flags = dict(objective_flags(TrainingConfig(use_proj_loss=True, proj_coeff=0.7).to_dict()))
    assert flags["--proj-coeff"] == "0.7" and "--time-mu" not in flags

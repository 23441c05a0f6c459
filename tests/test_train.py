"""train.py: exact resume after kill -9 (1 and 2 processes, StableVM bank, dispersive, REPA, grad
accumulation), checkpoints, fp16 overflow steps, clear errors, logging; schedules and EMA by hand."""
from __future__ import annotations

import json
import math
import os
import pickle
import random
import re
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import (REPO, assert_same_run, encode, kill_then_resume,
                            read_log, run, train_cmd)

# ----------------------------------------------------------------------------------------------
# Exact resume.

@pytest.mark.slow
def test_resume_after_kill_is_exact_si(digits8, tmp_path):
    steps = 10
    run(train_cmd(digits8, tmp_path / "ref", "--max-train-steps", str(steps)))
    kill_step = random.Random().randint(4, 9)
    print("kill after step", kill_step)
    cmd = train_cmd(digits8, tmp_path / "int", "--max-train-steps", str(steps))
    kill_then_resume(cmd, tmp_path / "int" / "run", kill_step)
    assert_same_run(tmp_path / "ref" / "run", tmp_path / "int" / "run", steps)
    ckpts = sorted(p.name for p in (tmp_path / "int" / "run" / "checkpoints").iterdir())
    assert ckpts == ["step-0000006", "step-0000009", "step-0000010"]  # keep-last-3


@pytest.mark.slow
def test_resume_between_log_points_logs_the_same_window_contrastive(digits8, tmp_path):
    """Checkpoints every 3 steps, log lines every 4: the resumed run's first line averages the
    steps before the checkpoint too (the open window is in the checkpoint), so log.jsonl is the
    uninterrupted run's. Also exact resume of the two-view contrastive objective."""
    extra = ["--max-train-steps", "8", "--log-every", "4", "--contrastive", "infonce_l2",
             "--contrastive-noise", "restricted", "--contrastive-delta", "0.3"]
    run(train_cmd(digits8, tmp_path / "ref", *extra))
    cmd = train_cmd(digits8, tmp_path / "int", *extra)
    kill_then_resume(cmd, tmp_path / "int" / "run", 1)  # after the first line (step 4)

    def lines(d: Path) -> list[dict]:
        timing = ("img_per_s", "memory_mb", "mfu")
        return [{k: v for k, v in json.loads(x).items() if k not in timing}
                for x in (d / "run" / "log.jsonl").read_text().splitlines()]
    ref, got = lines(tmp_path / "ref"), lines(tmp_path / "int")
    assert [r["step"] for r in ref] == [4, 8] and got == ref
    assert all("contrast_pos" in r for r in ref)
    assert (tmp_path / "ref" / "run" / "ema.safetensors").read_bytes() == \
        (tmp_path / "int" / "run" / "ema.safetensors").read_bytes()


@pytest.mark.slow
def test_resume_killed_inside_checkpoint_stablevm_disp_accum(digits8, tmp_path):
    """Killed while step 6's checkpoint is half written: the resume starts from step 3."""
    steps = 8
    extra = ["--max-train-steps", str(steps), "--loss-type", "stablevm",
             "--bank-capacity-per-class", "8", "--disp", "--disp-blocks", "1,2",
             "--gradient-accumulation-steps", "2"]
    run(train_cmd(digits8, tmp_path / "ref", *extra))
    cmd = train_cmd(digits8, tmp_path / "int", *extra)
    # the fault comes from outside: tests/fault.py kills the process inside step 6's checkpoint
    faulty = [cmd[0], str(REPO / "tests" / "fault.py"), "kill-after-save-state", "6", "--",
              *cmd[1:]]
    kill_then_resume(faulty, tmp_path / "int" / "run", None, resume_cmd=cmd)
    assert_same_run(tmp_path / "ref" / "run", tmp_path / "int" / "run", steps)
    log = read_log(tmp_path / "ref" / "run")
    assert all("disp" in r and r["disp"] < 0 for r in log.values())  # InfoNCE-L2 is <= 0


@pytest.mark.slow
def test_resume_killed_before_the_final_ema_export(digits8, tmp_path):
    """Killed after the final checkpoint was renamed but before run_dir/ema.safetensors was
    replaced: the resume (at the final step, nothing left to train) must still export the final
    EMA, or generate.py samples the previous checkpoint's weights."""
    steps = 4
    extra = ["--max-train-steps", str(steps), "--checkpointing-steps", "2"]
    run(train_cmd(digits8, tmp_path / "ref", *extra))
    cmd = train_cmd(digits8, tmp_path / "int", *extra)
    faulty = [cmd[0], str(REPO / "tests" / "fault.py"), "kill-before-ema-export", str(steps),
              "--", *cmd[1:]]
    kill_then_resume(faulty, tmp_path / "int" / "run", None, resume_cmd=cmd)
    assert_same_run(tmp_path / "ref" / "run", tmp_path / "int" / "run", steps)


@pytest.mark.slow
def test_resume_after_kill_two_processes(digits8, tmp_path):
    steps = 8
    extra = ["--max-train-steps", str(steps), "--loss-type", "stablevm",
             "--bank-capacity-per-class", "4", "--disp", "--gradient-accumulation-steps", "2"]
    run(train_cmd(digits8, tmp_path / "ref", *extra, nproc=2))
    cmd = train_cmd(digits8, tmp_path / "int", *extra, nproc=2)
    kill_then_resume(cmd, tmp_path / "int" / "run", random.Random().randint(4, 7))
    assert_same_run(tmp_path / "ref" / "run", tmp_path / "int" / "run", steps)
    one = tmp_path / "int" / "run" / "checkpoints" / f"step-{steps:07d}"
    assert (one / "bank-0.safetensors").is_file() and (one / "bank-1.safetensors").is_file()
    p = run(train_cmd(digits8, tmp_path / "int", *extra[2:], "--max-train-steps", "9",
                      "--resume", "latest"), check=False)  # one process now
    assert p.returncode == 2 and "written by 2 process(es)" in p.stderr, p.stderr


@pytest.mark.slow
def test_resume_after_kill_repa_irepa(digits32_images, tiny_dinov2, tmp_path):
    steps = 6
    extra = ["--max-train-steps", str(steps), "--model", "SiT-S/4", "--enc-type",
             "dinov2-vit-s", "--encoder-depth", "1", "--encoder-weights-dir", str(tiny_dinov2),
             "--use-irepa", "--proj-weight-schedule", "sigmoid", "--projector-dim", "64",
             "--loss-type", "stablevm", "--bank-capacity-per-class", "2"]
    p = run(train_cmd(digits32_images, tmp_path / "ref", *extra))
    assert "targets are upsampled 2x2 -> 8x8" in p.stdout
    cmd = train_cmd(digits32_images, tmp_path / "int", *extra)
    kill_then_resume(cmd, tmp_path / "int" / "run", 1)  # after the first line (step 4)
    assert_same_run(tmp_path / "ref" / "run", tmp_path / "int" / "run", steps)
    log = read_log(tmp_path / "ref" / "run")
    assert all(-1.0 <= r["proj"] <= 1.0 for r in log.values())
    cfg = json.loads((tmp_path / "ref" / "run" / "config.json").read_text())
    assert cfg["train"]["projector_type"] == "conv" and cfg["train"]["use_proj_loss"]


# ----------------------------------------------------------------------------------------------
# Checkpoints, sampling contract, fp16, compile.

@pytest.mark.slow
def test_run_dir_contract_and_generate(digits8, tmp_path):
    """config.json is written before step 0; ema.safetensors + config.json sample with
    generate.py; the grid PNG exists; loading a checkpoint never unpickles code."""
    p = run(train_cmd(digits8, tmp_path, "--max-train-steps", "3"))
    rd = tmp_path / "run"
    cfg = json.loads((rd / "config.json").read_text())
    assert {"model", "input_size", "in_channels", "num_classes", "model_kwargs", "vae",
            "latent_scale", "latent_bias", "path_type", "train"} <= set(cfg)
    assert cfg["input_size"] == 8 and cfg["in_channels"] == 3 and cfg["num_classes"] == 10
    assert cfg["vae"] is None and cfg["train"]["learning_rate"] == 1e-3
    assert "steps per epoch" in p.stdout and '"train"' not in p.stdout  # a summary, not the JSON
    assert (rd / "samples" / "step-0000003.png").is_file()
    from safetensors.torch import load_file
    ema = load_file(str(rd / "ema.safetensors"))
    assert not any(k.startswith("projectors.") for k in ema)
    run([sys.executable, str(REPO / "generate.py"), "--ckpt", str(rd), "--mode", "ode",
         "--num-steps", "2", "--num-fid-samples", "6", "--per-proc-batch-size", "4",
         "--cfg-scale", "2", "--sample-dir", str(tmp_path / "s")])
    import numpy as np
    with np.load(tmp_path / "s" / "samples.npz") as z:
        assert z["arr_0"].shape == (6, 8, 8, 3) and z["arr_0"].dtype == np.uint8

    # A pickle that would run code when unpickled, planted as the optimizer state.
    ck = rd / "checkpoints" / "step-0000003"
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    (ck / "optimizer.bin").write_bytes(pickle.dumps(Evil()))
    p = run(train_cmd(digits8, tmp_path, "--max-train-steps", "4", "--resume", "latest"),
            check=False)
    assert p.returncode != 0 and not marker.exists()
    assert "optimizer.bin does not match its checksum" in p.stderr  # caught before loading
    # with a matching checksum (a malicious checkpoint), the loader still refuses to unpickle
    from common import sha256_file
    sums = json.loads((ck / "checksums.json").read_text())
    sums["files"]["optimizer.bin"] = sha256_file(ck / "optimizer.bin")
    (ck / "checksums.json").write_text(json.dumps(sums))
    p = run(train_cmd(digits8, tmp_path, "--max-train-steps", "4", "--resume", "latest"),
            check=False)
    assert p.returncode != 0 and not marker.exists()
    assert re.search(r"weights.only|unpickl", p.stderr, re.I), p.stderr[-2000:]


@pytest.mark.slow
def test_fp16_overflow_steps_are_skipped_and_logged(digits8, tmp_path):
    """One sample scaled to 3e4 overflows fp16 activations: exactly the steps whose batch holds
    it are skipped by the scaler (weights unchanged, scale halved) and counted in the log."""
    import shutil

    from safetensors.torch import load_file, save_file

    from preprocessing.shards import ShardDataset, ShardLoader
    data = tmp_path / "data"
    shutil.copytree(digits8, data)
    # the sample at global position 0 is row 0 of shard 0
    shard = data / "shard-00000.safetensors"
    t = load_file(str(shard))
    for k in ("latents", "latents_flip"):
        t[k][0] = 3e4
    from preprocessing.shards import read_header
    save_file(t, str(shard), metadata=read_header(shard)[0].get("__metadata__"))
    # the changed shard is the dataset now: record its sha256 (train.py verifies shards)
    from common import sha256_file
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["shards"][0]["sha256"] = sha256_file(shard)
    (data / "manifest.json").write_text(json.dumps(manifest))
    steps = 12
    run(train_cmd(data, tmp_path, "--max-train-steps", str(steps), "--mixed-precision", "fp16",
                  "--checkpointing-steps", "100", "--batch-size", "256"))
    loader = ShardLoader(ShardDataset(data), 256, seed=0)
    per_epoch = len(loader)
    bad = [e * per_epoch + k for e in range(2) for k in range(per_epoch)
           if 0 in loader.epoch_order(e)[k * 256:(k + 1) * 256].tolist()
           and e * per_epoch + k < steps]
    assert bad, "the overflowing sample was never drawn; the test proves nothing"
    recs = [json.loads(ln) for ln in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert recs[-1]["skipped_steps"] == len(bad)
    for r in recs:
        expect_bad = (r["step"] - 1) in bad
        assert (r["grad_norm"] is None) == expect_bad, r  # non-finite is null in strict JSON
    scales = [r["loss_scale"] for r in recs]
    for r, prev in zip(recs[1:], scales):
        if (r["step"] - 1) in bad:
            assert r["loss_scale"] == prev / 2
    sd = load_file(str(tmp_path / "run" / "checkpoints" / f"step-{steps:07d}" /
                       "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in sd.values())


@pytest.mark.slow
def test_compile_checkpoint_and_resume(digits8, tmp_path):
    run(train_cmd(digits8, tmp_path, "--max-train-steps", "2", "--compile",
                  "--checkpointing-steps", "2"))
    run(train_cmd(digits8, tmp_path, "--max-train-steps", "3", "--compile", "--resume", "latest"))
    from safetensors.torch import load_file
    sd = load_file(str(tmp_path / "run" / "checkpoints" / "step-0000003" / "model.safetensors"))
    assert not any("_orig_mod" in k for k in sd) and "blocks.0.attn.qkv.weight" in sd
    assert sorted(read_log(tmp_path / "run")) == [1, 2, 3]


# ----------------------------------------------------------------------------------------------
# Clear errors.

@pytest.mark.parametrize("args, message", [
    (["--batch-size", "30", "--gradient-accumulation-steps", "4"],
     "not divisible by 1 processes x 4 accumulation"),
    (["--resolution", "16"], "encoded at 8 px"),
    (["--num-classes", "1000"], "shards have 10 classes"),
    (["--enc-type", "dinov2-vit-s", "--encoder-depth", "1"], "no stored images"),
    (["--model", "SiT-S/16"], "unknown model"),
    (["--disp", "--disp-blocks", "7"], "outside 1..2"),
    (["--cfg-prob", "1.5"], "--cfg-prob must be in [0, 1]"),
])
def test_clear_errors(digits8, tmp_path, args, message):
    p = run(train_cmd(digits8, tmp_path, *args), check=False)
    assert p.returncode == 2, p.stderr
    assert message in p.stderr and "Traceback" not in p.stderr


def test_patch_that_does_not_divide_the_shards(tmp_path):
    data = encode(tmp_path / "d12", 12)  # 12x12 pixels: patch 8 does not divide them
    p = run(train_cmd(data, tmp_path, "--model", "SiT-S/8"), check=False)
    assert p.returncode == 2 and "does not fit the shards" in p.stderr, p.stderr
    assert "12x12" in p.stderr


def test_encoder_depth_beyond_model(digits32_images, tiny_dinov2, tmp_path):
    p = run(train_cmd(digits32_images, tmp_path, "--enc-type", "dinov2-vit-s",
                      "--encoder-weights-dir", str(tiny_dinov2), "--encoder-depth", "5"),
            check=False)
    assert p.returncode == 2 and "--encoder-depth 5 is outside 1..2" in p.stderr, p.stderr


def test_missing_encoder_weights_named(digits32_images, tmp_path):
    p = run(train_cmd(digits32_images, tmp_path, "--enc-type", "dinov2-vit-b",
                      "--encoder-depth", "1", "--encoder-weights-dir", str(tmp_path / "nothing")),
            check=False)
    assert p.returncode == 2 and "vit_base_patch14_dinov2.lvd142m" in p.stderr


def test_resume_with_other_model_refused_and_existing_run_protected(digits8, tmp_path):
    run(train_cmd(digits8, tmp_path, "--max-train-steps", "1"))
    p = run(train_cmd(digits8, tmp_path, "--max-train-steps", "2"), check=False)
    assert p.returncode == 2 and "--resume latest" in p.stderr
    p = run(train_cmd(digits8, tmp_path, "--max-train-steps", "2", "--depth", "3",
                      "--resume", "latest"), check=False)
    assert p.returncode == 2 and "depth: 2 -> 3" in p.stderr


def test_dry_run_prints_resolved_config(digits8, tmp_path):
    p = run([sys.executable, str(REPO / "train.py"), "--preset", "digits", "--data-dir",
             str(digits8), "--lr", "5e-4", "--output-dir", str(tmp_path / "out"), "--dry-run"])
    cfg = json.loads(p.stdout)
    assert cfg["learning_rate"] == 5e-4 and cfg["depth"] == 4 and cfg["hidden_size"] == 128
    assert cfg["resolution"] == 8 and cfg["num_classes"] == 10 and cfg["batch_size"] == 64
    assert not (tmp_path / "out").exists()  # a dry run writes nothing


def test_repa_readme_command_flags_parse():
    """REPA's README training command, flags unchanged (data dir aside)."""
    from configs import parse_config
    cfg, given = parse_config([
        "--report-to=wandb", "--allow-tf32", "--mixed-precision=fp16", "--seed=0",
        "--path-type=linear", "--prediction=v", "--weighting=uniform", "--model=SiT-XL/2",
        "--enc-type=dinov2-vit-b", "--proj-coeff=0.5", "--encoder-depth=8",
        "--output-dir=exps", "--exp-name=linear-dinov2-b-enc8", "--data-dir=DATA"])
    assert (cfg.enc_type, cfg.proj_coeff, cfg.encoder_depth, cfg.mixed_precision) == \
        ("dinov2-vit-b", 0.5, 8, "fp16")
    from training.resolve import resolve
    assert resolve(cfg, given, None).use_proj_loss  # REPA: --enc-type turns the term on
    cfg, _ = parse_config(["--loss-type", "stablevm", "--bank-capacity-per-class", "128",
                           "--prefill-bank-fully", "--disp", "--use-proj-loss",
                           "--proj-weight-schedule", "snr", "--proj-tau", "0.6",
                           "--proj-k", "10", "--use-irepa", "--irepa-gamma", "0.5",
                           "--global-batch-size", "64", "--global-seed", "3",
                           "--results-dir", "R", "--ckpt-every", "5", "--image-size", "256"])
    assert (cfg.loss_type, cfg.bank_capacity_per_class, cfg.prefill_bank_fully, cfg.disp,
            cfg.proj_weight_schedule, cfg.proj_tau, cfg.proj_k, cfg.irepa_gamma,
            cfg.batch_size, cfg.seed, cfg.output_dir, cfg.checkpointing_steps,
            cfg.resolution) == ("stablevm", 128, True, True, "snr", 0.6, 10.0, 0.5, 64, 3, "R",
                                5, 256)


# ----------------------------------------------------------------------------------------------
# Pieces of the loop, against hand values.

def test_lr_schedule_by_hand():
    from configs import TrainingConfig
    from training.loop import lr_at
    c = TrainingConfig(learning_rate=1e-3, lr_warmup_steps=4, lr_schedule="cosine", lr_min=1e-4)
    assert [lr_at(s, c, 14) for s in range(4)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert lr_at(4, c, 14) == pytest.approx(1e-3)
    assert lr_at(9, c, 14) == pytest.approx(1e-4 + 0.5 * 9e-4)          # half way: cos = 0
    assert lr_at(14, c, 14) == pytest.approx(1e-4)
    assert lr_at(7, TrainingConfig(learning_rate=3e-4), 10) == 3e-4


def test_ema_by_hand():
    from common import ema_decay, ema_update
    assert ema_decay(1, 0.999, warmup=True) == 2 / 11
    assert ema_decay(10_000, 0.999, warmup=True) == 0.999
    assert ema_decay(1, 0.9999, warmup=False) == 0.9999
    e, p = [torch.tensor([1.0, 2.0])], [torch.tensor([3.0, -2.0])]
    ema_update(e, p, 0.75)
    assert torch.allclose(e[0], torch.tensor([1.5, 1.0]))


@pytest.mark.parametrize("cfg_prob", [0.0, 0.2])
def test_label_dropout_rate(cfg_prob):
    from losses.interpolant import drop_labels
    y = torch.randint(0, 10, (20000,), generator=torch.Generator().manual_seed(1))
    out = drop_labels(y, 10, cfg_prob, torch.Generator().manual_seed(2))
    dropped = (out == 10)
    assert ((out == y) | dropped).all()
    rate = dropped.float().mean().item()
    sd = math.sqrt(cfg_prob * (1 - cfg_prob) / y.numel())
    assert abs(rate - cfg_prob) <= 4 * sd + 1e-12


def test_objective_terms_by_hand():
    """training_losses = SI + lambda * disp + coeff * proj, with SI the plain MSE to a' x + s' eps."""
    from losses import DispersiveLoss, dispersive_loss
    from losses import AlignmentTerm, si_batch, training_losses
    from models.sit import SiT_models
    torch.manual_seed(0)
    m = SiT_models["SiT-S/2"](input_size=8, in_channels=3, num_classes=10, depth=2,
                              hidden_size=32, num_heads=2, z_dims=[16], encoder_depth=1,
                              projector_dim=24)
    for p in m.parameters():  # leave the zero init so the output and features are not trivial
        p.data.add_(0.05 * torch.randn_like(p))
    x, y = torch.randn(6, 3, 8, 8), torch.randint(0, 10, (6,))
    g = torch.Generator().manual_seed(3)
    b = si_batch(x, y, num_classes=10, cfg_prob=0.5, generator=g)
    t = b["t"].view(-1, 1, 1, 1)
    assert torch.allclose(b["x_t"], (1 - t) * x + t * b["eps"])
    assert torch.allclose(b["target"], b["eps"] - x)
    targets = [torch.randn(6, 16, 16)]
    disp = DispersiveLoss(0.25, 1.0, blocks=[2])
    terms = training_losses(m, b, depth=2, disp=disp, align=AlignmentTerm(coeff=0.5),
                            align_targets=targets)
    out, aux = m(b["x_t"], b["t"], b["y"], return_features=[2], return_proj=True)
    si = (out - b["target"]).square().mean()
    d = dispersive_loss(aux["features"][2])
    cos = torch.nn.functional.cosine_similarity(aux["proj"][0], targets[0], dim=-1)
    proj = -cos.mean()
    assert torch.allclose(terms["si"], si, atol=1e-6)
    assert torch.allclose(terms["disp"], d, atol=1e-6)
    assert torch.allclose(terms["proj"], proj, atol=1e-6)
    assert torch.allclose(terms["loss"], si + 0.25 * d + 0.5 * proj, atol=1e-6)


@pytest.mark.parametrize("name", [f"SiT-{s}/{p}" for s in ("S", "B", "L", "XL")
                                  for p in (1, 2, 4, 8)])
def test_every_size_and_patch_trains_one_step(name):
    """Each registered width/heads/patch (depth cut to 1 to keep CPU time small) takes an
    optimizer step on the real objective with finite gradients that change the weights."""
    from losses import si_batch, training_losses
    from models.sit import SiT_models
    torch.manual_seed(0)
    m = SiT_models[name](input_size=8, in_channels=4, num_classes=3, depth=1)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    b = si_batch(torch.randn(2, 4, 8, 8), torch.tensor([0, 2]), num_classes=3, cfg_prob=0.5,
                 generator=torch.Generator().manual_seed(0))
    before = m.final_layer.linear.weight.detach().clone()
    terms = training_losses(m, b, depth=1)
    terms["loss"].backward()
    grads = [p.grad for p in m.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    opt.step()
    assert not torch.equal(before, m.final_layer.linear.weight)

"""MeanFlow through the scripts: train.py --loss-type meanflow (exact resume, precision, compile,
initialising from a SiT run, clear errors) and generate.py --mode meanflow."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import (REPO, assert_same_run, encode, kill_then_resume, read_log, run,
                            train_cmd)

MF = ["--loss-type", "meanflow"]


@pytest.fixture(scope="module")
def digits8(tmp_path_factory) -> Path:
    return encode(tmp_path_factory.mktemp("d8") / "digits", 8, "--hflip")


def generate_cmd(run_dir: Path, out: Path, *args: str) -> list[str]:
    return [sys.executable, str(REPO / "generate.py"), "--ckpt", str(run_dir),
            "--num-fid-samples", "6", "--per-proc-batch-size", "4", "--label-sampling", "equal",
            "--sample-dir", str(out), *args]


@pytest.mark.slow
def test_meanflow_run_samples_with_one_and_two_steps(digits8, tmp_path):
    run(train_cmd(digits8, tmp_path, *MF, "--max-train-steps", "3", "--disp",
                  "--cfg-omega", "2", "--cfg-kappa", "0.3", "--cfg-max-t", "0.8"))
    rd = tmp_path / "run"
    cfg = json.loads((rd / "config.json").read_text())
    assert cfg["model_kwargs"]["meanflow"] is True
    log = [json.loads(x) for x in (rd / "log.jsonl").read_text().splitlines()]
    assert all(r["mf"] > 0 and r["disp"] < 0 and math_finite(r["loss"]) for r in log)
    assert (rd / "samples" / "step-0000003.png").is_file()
    for k in ("1", "2"):  # (the k-step sampler itself is checked by hand in test_meanflow.py)
        run(generate_cmd(rd, tmp_path / f"mf{k}", "--mode", "meanflow", "--num-steps", k))
        with np.load(tmp_path / f"mf{k}" / "samples.npz") as z:
            assert z["arr_0"].shape == (6, 8, 8, 3) and z["arr_0"].dtype == np.uint8
    # world-size independent: 2 processes and another batch size give the same bytes
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
         str(29500 + (hash(str(tmp_path)) % 5000)), *generate_cmd(rd, tmp_path / "mf1p2",
         "--mode", "meanflow", "--num-steps", "1", "--per-proc-batch-size", "2")[1:]])
    assert (tmp_path / "mf1p2" / "samples.npz").read_bytes() == \
        (tmp_path / "mf1" / "samples.npz").read_bytes()
    # with r = t the model is an instantaneous-velocity model: the ODE sampler works on it
    run(generate_cmd(rd, tmp_path / "ode", "--mode", "ode", "--num-steps", "4"))
    p = run(generate_cmd(rd, tmp_path / "bad", "--mode", "meanflow", "--cfg-scale", "2"),
            check=False)
    assert p.returncode == 2 and "guidance is set at training" in p.stderr


def math_finite(v) -> bool:
    return v is not None and np.isfinite(v)


@pytest.mark.slow
def test_meanflow_mode_on_a_plain_sit_is_refused(digits8, tmp_path):
    run(train_cmd(digits8, tmp_path, "--max-train-steps", "1"))
    p = run(generate_cmd(tmp_path / "run", tmp_path / "s", "--mode", "meanflow"), check=False)
    assert p.returncode == 2 and "--loss-type meanflow" in p.stderr


@pytest.mark.slow
def test_meanflow_resume_after_kill_is_exact(digits8, tmp_path):
    steps = 8
    extra = [*MF, "--max-train-steps", str(steps), "--disp", "--gradient-accumulation-steps", "2",
             "--cfg-omega", "1.5"]
    run(train_cmd(digits8, tmp_path / "ref", *extra))
    kill_then_resume(train_cmd(digits8, tmp_path / "int", *extra), tmp_path / "int" / "run", 5)
    assert_same_run(tmp_path / "ref" / "run", tmp_path / "int" / "run", steps)


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_meanflow_mixed_precision(digits8, tmp_path, precision):
    run(train_cmd(digits8, tmp_path, *MF, "--max-train-steps", "3", "--mixed-precision",
                  precision))
    log = read_log(tmp_path / "run")
    assert all(math_finite(r["loss"]) for r in log.values())


@pytest.mark.slow
def test_meanflow_two_processes_and_compile(digits8, tmp_path):
    run(train_cmd(digits8, tmp_path / "p2", *MF, "--max-train-steps", "2", nproc=2))
    run(train_cmd(digits8, tmp_path / "c", *MF, "--max-train-steps", "2", "--compile"))
    for d in ("p2", "c"):
        assert all(math_finite(r["loss"]) for r in read_log(tmp_path / d / "run").values())


@pytest.mark.slow
def test_meanflow_with_repa_and_va_repa(digits32_images, tiny_dinov2, tmp_path):
    run(train_cmd(digits32_images, tmp_path, *MF, "--max-train-steps", "2", "--model", "SiT-S/4",
                  "--enc-type", "dinov2-vit-s", "--encoder-depth", "1", "--encoder-weights-dir",
                  str(tiny_dinov2), "--proj-weight-schedule", "sigmoid", "--projector-dim", "64",
                  "--disp"))
    log = read_log(tmp_path / "run")
    assert all(-1 <= r["proj"] <= 1 and r["disp"] < 0 for r in log.values())  # -cos similarity


@pytest.mark.slow
def test_meanflow_starts_from_a_sit_run_as_that_model(digits8, tmp_path):
    """--ckpt with an SI run's EMA: only the interval embedder is new, and it starts at zero, so
    at step 0 the MeanFlow model is the SI model for every r."""
    run(train_cmd(digits8, tmp_path / "si", "--max-train-steps", "3"))
    ema = tmp_path / "si" / "run" / "ema.safetensors"
    p = run(train_cmd(digits8, tmp_path / "mf", *MF, "--max-train-steps", "1", "--ckpt",
                      str(ema), "--learning-rate", "1e-12"))
    assert "left at their initialisation: h_embedder" in p.stdout
    from models.sit import SiT, load_checkpoint
    kw = dict(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=2, num_heads=2,
              num_classes=10)
    si, mf = SiT(**kw).eval(), SiT(**kw, meanflow=True).eval()
    load_checkpoint(si, ema)
    load_checkpoint(mf, tmp_path / "mf" / "run" / "checkpoints" / "step-0000001" /
                    "model.safetensors")
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(5, 3, 8, 8, generator=g), torch.rand(5, generator=g)
    y, r = torch.randint(0, 10, (5,), generator=g), torch.rand(5, generator=g) * t
    with torch.no_grad():
        assert torch.allclose(mf(x, t, y, r=r), si(x, t, y), atol=1e-6)


@pytest.mark.parametrize("args,needle", [
    ([*MF, "--path-type", "cosine"], "linear path"),
    ([*MF, "--cfg-kappa", "1"], "--cfg-kappa < 1"),
    ([*MF, "--time-sigma", "0"], "--time-sigma must be > 0"),
    ([*MF, "--bank-capacity-per-class", "8"], "does not use the StableVM memory bank"),
])
def test_meanflow_clear_errors(digits8, tmp_path, capsys, args, needle):
    import train
    assert train.main(["--data-dir", str(digits8), "--output-dir", str(tmp_path), *args]) == 2
    assert needle in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_forwards_per_image_counts_the_jvp_and_guidance():
    from configs import TrainingConfig
    from training.monitor import forwards_per_image
    assert forwards_per_image(TrainingConfig()) == 3
    assert forwards_per_image(TrainingConfig(loss_type="meanflow")) == 5
    assert forwards_per_image(TrainingConfig(loss_type="meanflow", cfg_omega=2.0)) == 7

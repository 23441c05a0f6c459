"""The library face: presets, train_with_dispersive_loss (same loss as train.py), and the seed
repositories' command forms."""
from __future__ import annotations

import json
import sys
from itertools import islice

import pytest
import torch

import runtime

from tests.conftest import REPO, TINY, encode, read_log, run, train_cmd


@pytest.fixture(scope="module")
def digits8(tmp_path_factory):
    return encode(tmp_path_factory.mktemp("api") / "digits", 8)


def test_dispersive_presets_exact():
    from configs import get_dispersive_loss_config
    assert get_dispersive_loss_config("default") == {
        "lambda_disp": 0.25, "tau": 1.0, "variant": "infonce_l2", "blocks": "last"}
    jax = get_dispersive_loss_config("jax_reproduction", depth=28)
    assert (jax["lambda_disp"], jax["tau"], jax["blocks"]) == (0.5, 0.5, 7)
    assert get_dispersive_loss_config("jax_reproduction", depth=12)["blocks"] == 3
    from losses import DispersiveLoss
    assert DispersiveLoss(**jax).feature_blocks(28) == [7]
    with pytest.raises(KeyError, match="known: default, jax_reproduction"):
        get_dispersive_loss_config("paper")


def test_training_presets():
    from configs import TRAINING_PRESETS, TrainingConfig, get_training_config
    c = get_training_config("imagenet_256")
    assert (c.model, c.resolution, c.batch_size, c.learning_rate, c.ema_decay) == \
        ("SiT-XL/2", 256, 256, 1e-4, 0.9999)
    r = get_training_config("irepa")
    assert r.use_irepa and r.projector_type == "conv" and r.irepa_gamma == 0.6
    s = get_training_config("stablevm", bank_capacity_per_class=64)
    assert (s.loss_type, s.bank_capacity_per_class, s.stablevm_split) == ("stablevm", 64, 0.5)
    assert isinstance(get_training_config("digits"), TrainingConfig)
    with pytest.raises(KeyError) as e:
        get_training_config("imagenet_512")
    assert all(name in str(e.value) for name in TRAINING_PRESETS)
    with pytest.raises(TypeError, match="lr_typo"):
        get_training_config("digits", lr_typo=1)


def _tiny_model(seed=0):
    from models.sit import SiT_models
    torch.manual_seed(seed)
    return SiT_models["SiT-S/2"](input_size=8, in_channels=3, num_classes=10, depth=2,
                                 hidden_size=32, num_heads=2)


def test_train_with_dispersive_loss_lowers_the_loss(digits8):
    from configs import get_training_config
    from preprocessing.shards import ShardDataset, ShardLoader
    from training import train_with_dispersive_loss
    cfg = get_training_config("digits", disp=True, cfg_prob=0.1)
    model = _tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loader = ShardLoader(ShardDataset(digits8), 64, seed=0)
    first = train_with_dispersive_loss(model, loader, opt, "cpu", cfg)
    second = train_with_dispersive_loss(model, loader, opt, "cpu", cfg, start_step=len(loader))
    assert second < first, (first, second)
    # a plain (x, y) DataLoader works too
    ds = torch.utils.data.TensorDataset(torch.randn(16, 3, 8, 8), torch.randint(0, 10, (16,)))
    dl = torch.utils.data.DataLoader(ds, batch_size=8)
    assert train_with_dispersive_loss(model, dl, opt, "cpu", cfg.to_dict()) > 0


def test_train_with_dispersive_loss_equals_train_py_step(digits8, tmp_path):
    """Same batches, same seed: the API's losses are train.py's logged losses. Several steps, as
    at step 1 the zero-initialised model outputs 0 whatever the labels; later a loop that ignored
    --cfg-prob (REPA's bug) would differ, which the control (cfg_prob 0) shows."""
    from preprocessing.shards import ShardDataset, ShardLoader
    from training import train_with_dispersive_loss
    steps = 4
    run(train_cmd(digits8, tmp_path, "--max-train-steps", str(steps), "--disp", "--disp-blocks",
                  "1", "--no-hflip", "--learning-rate", "1e-2"))
    logged = read_log(tmp_path / "run")
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())["train"]
    assert cfg["cfg_prob"] == 0.2

    def api_losses(config):
        model = _tiny_model(seed=config["seed"])
        # train.py's optimizer: fused AdamW where the device has it (rounds unlike foreach)
        opt = torch.optim.AdamW(model.parameters(), lr=config["learning_rate"],
                                betas=(config["adam_beta1"], config["adam_beta2"]),
                                eps=config["adam_epsilon"],
                                weight_decay=config["adam_weight_decay"],
                                fused=runtime.fused_adamw_available(torch.device("cpu")) or None)
        loader = ShardLoader(ShardDataset(digits8), config["batch_size"], seed=config["seed"],
                             hflip=False, output="raw")
        it = iter(loader)
        return [train_with_dispersive_loss(model, islice(it, 1), opt, "cpu", config,
                                           start_step=k, to_latents=loader.to_latents)
                for k in range(steps)]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocess (OMP_NUM_THREADS=1): same kernels, same sums
    try:
        losses = api_losses(cfg)
        control = api_losses({**cfg, "cfg_prob": 0.0})
    finally:
        torch.set_num_threads(threads)
    for k in range(steps):
        assert losses[k] == pytest.approx(logged[k + 1]["loss"], rel=1e-6, abs=1e-7)
    assert abs(control[-1] / logged[steps]["loss"] - 1) > 1e-4


def test_sit_disploss_command_forms(digits8, tmp_path):
    """SiT/DispLoss: --data-path, --results-dir, --global-batch-size, --global-seed, --ckpt
    (a weights file to start from, or a run's checkpoint to resume), --wandb."""
    out = tmp_path / "results"
    base = [sys.executable, str(REPO / "train.py"), "--data-path", str(digits8),
            "--results-dir", str(out), "--exp-name", "r", *TINY[:8], "--global-batch-size",
            "32", "--global-seed", "1", "--report-to", "none", "--log-every", "1",
            "--sampling-steps", "0", "--num-sample-images", "2", "--sample-num-steps", "1",
            "--disp"]
    run(base + ["--max-train-steps", "2", "--ckpt-every", "2"])
    ckpt_dir = out / "r" / "checkpoints" / "step-0000002"
    run(base + ["--max-train-steps", "3", "--ckpt", str(ckpt_dir)])  # resume by path
    assert sorted(read_log(out / "r")) == [1, 2, 3]
    # start a new run from the exported EMA weights
    p = run(base + ["--max-train-steps", "1", "--exp-name", "from-weights", "--ckpt",
                    str(out / "r" / "ema.safetensors")])
    assert "initialised the model (and EMA) from" in p.stdout
    missing = run(base + ["--max-train-steps", "1", "--exp-name", "x", "--ckpt",
                          str(tmp_path / "nope.pt")], check=False)
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    try:
        import wandb  # noqa: F401
    except ImportError:
        p = run(base + ["--max-train-steps", "1", "--exp-name", "w", "--wandb"], check=False)
        assert p.returncode == 2 and "pip install wandb" in p.stderr
    # generate.py with the positional mode of SiT's sample_ddp.py
    p = run([sys.executable, str(REPO / "generate.py"), "SDE", "--ckpt", str(out / "r"),
             "--num-fid-samples", "3", "--num-steps", "3", "--per-proc-batch-size", "3",
             "--sample-dir", str(tmp_path / "s")])
    import numpy as np
    with np.load(tmp_path / "s" / "samples.npz") as z:
        assert z["arr_0"].shape == (3, 8, 8, 3)
    side = json.loads((tmp_path / "s" / "samples.json").read_text())
    assert "sde" in json.dumps(side).lower()


def test_public_names_importable():
    from configs import get_dispersive_loss_config, get_training_config  # noqa: F401
    from losses import (DispersiveLoss, MemoryBank, alignment_loss,  # noqa: F401
                        si_loss, stable_target)
    from models import SiT, SiT_models, get_model_config
    from samplers import sample_ode, sample_sde  # noqa: F401
    from training import train_with_dispersive_loss  # noqa: F401
    assert get_model_config("SiT-XL/2") == {"depth": 28, "hidden_size": 1152, "num_heads": 16,
                                            "patch_size": 2}
    assert isinstance(SiT_models["SiT-S/8"](input_size=8, num_classes=2, depth=1), SiT)

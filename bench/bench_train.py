#!/usr/bin/env python
"""End-to-end training speed: train.py against a faithful re-implementation of REPA's loop.

    python bench/bench_train.py                        # CPU: SiT-B/2, 32x32 inputs, batch 4
    python bench/bench_train.py --model SiT-XL/2 --batch-size 256 --steps 60 --precision bf16

Both runs read the same shards (digits encoded at 32 px, pixel space, 3x32x32 = the 256-token
grid of ImageNet-256 latents at patch 2) with the same model class, batch, optimizer and precision.

- ours: ``train.py`` itself in a subprocess (its JSON log gives img/s per logging window; the
  first window, which holds start-up and warm-up, is dropped);
- REPA-style: REPA's ``train.py`` structure re-implemented in this process -- label dropout
  inside the model call, the SI loss per sample with ``mean_flat``, the projection loss as a
  Python loop over encoders and samples, ``accelerator.gather(...).item()`` of the loss and grad
  norm every step, EMA as a Python loop over named parameters, no compile.

``--proj`` adds the REPA term on both sides with a DINOv2-B/14 of random weights (timm,
pretrained=False, saved to a temporary folder), so the encoder forward is timed too.
Reports the median img/s over steady-state windows / steps and the ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench._machine import BackgroundLoad, describe_machine  # noqa: E402


def encode_digits(dest: Path) -> Path:
    subprocess.run([sys.executable, str(ROOT / "preprocessing" / "encode.py"), "--source",
                    "digits", "--dest", str(dest), "--resolution", "32", "--vae", "none",
                    "--store-images"], check=True, capture_output=True)
    return dest


def save_random_dinov2(folder: Path) -> Path:
    import timm
    from safetensors.torch import save_file
    name = "vit_base_patch14_dinov2.lvd142m"
    with torch.device("meta"):
        m = timm.create_model(name, pretrained=False, num_classes=0, img_size=224)
    m = m.to_empty(device="cpu")
    with torch.no_grad():
        for n, p in m.named_parameters():
            p.normal_(1.0 if (p.ndim == 1 and "norm" in n) else 0.0, 0.02)
    save_file({k: v.contiguous() for k, v in m.state_dict().items()},
              str(folder / f"{name}.safetensors"))
    return folder


def common_flags(args, enc_dir: Path | None) -> list[str]:
    flags = ["--model", args.model, "--batch-size", str(args.batch_size), "--learning-rate",
             "1e-4", "--mixed-precision", args.precision, "--cfg-prob", "0.1",
             "--report-to", "none", "--seed", "0"]
    if enc_dir is not None:
        flags += ["--enc-type", "dinov2-vit-b", "--encoder-depth", "4", "--proj-coeff", "0.5",
                  "--encoder-weights-dir", str(enc_dir)]
    return flags


def run_ours(args, data: Path, out: Path, enc_dir: Path | None
             ) -> tuple[list[float], list[float]]:
    """train.py in a subprocess; img/s and (on GPUs with a known peak) MFU of each timed window."""
    window = args.window
    cmd = [sys.executable, str(ROOT / "train.py"), "--data-dir", str(data), "--output-dir",
           str(out), "--exp-name", "ours", "--max-train-steps", str(window * (args.windows + 1)),
           "--log-every", str(window), "--checkpointing-steps", "1000000",
           "--sampling-steps", "1000000", "--num-sample-images", "1", "--sample-num-steps", "1",
           *common_flags(args, enc_dir)] + (["--compile"] if args.compile else []) + \
        (["--peak-tflops", str(args.peak_tflops)] if args.peak_tflops else [])
    subprocess.run(cmd, check=True, capture_output=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    recs = [json.loads(ln) for ln in (out / "ours" / "log.jsonl").read_text().splitlines()]
    return [r["img_per_s"] for r in recs[1:]], [r["mfu"] for r in recs[1:] if "mfu" in r]


def _mean_flat(x: torch.Tensor) -> torch.Tensor:
    return torch.mean(x, dim=list(range(1, len(x.size()))))


@torch.no_grad()
def _repa_update_ema(ema_model, m, accelerator, decay: float = 0.9999) -> None:
    """REPA's EMA update: a Python loop over named parameters."""
    ema_params = OrderedDict(ema_model.named_parameters())
    for name, param in accelerator.unwrap_model(m).named_parameters():
        ema_params[name].mul_(decay).add_(param.data, alpha=1 - decay)


def _repa_loss(m, x, y, zs, num_classes: int, device):
    """REPA's SILoss: denoising and projection terms, a Python loop over samples for the latter."""
    import torch.nn.functional as F
    t = torch.rand((x.shape[0], 1, 1, 1), device=device)
    noises = torch.randn_like(x)
    x_t = (1 - t) * x + t * noises
    target = noises - x
    drop = torch.rand(y.shape[0], device=device) < 0.1  # REPA drops labels in the embedder
    y = torch.where(drop, torch.full_like(y, num_classes), y)
    out = m(x_t, t.flatten(), y, return_proj=bool(zs))
    pred, zs_tilde = (out[0], out[1]["proj"]) if zs else (out, [])
    denoising_loss = _mean_flat((pred - target) ** 2)
    proj_loss = torch.zeros((), device=device)
    bsz = x.shape[0]
    for z, z_tilde in zip(zs, zs_tilde):
        for z_j, z_tilde_j in zip(z, z_tilde):
            z_tilde_j = F.normalize(z_tilde_j, dim=-1)
            z_j = F.normalize(z_j, dim=-1)
            proj_loss = proj_loss + _mean_flat(-(z_j * z_tilde_j).sum(dim=-1))
    if zs:
        proj_loss = proj_loss / (len(zs) * bsz)
    return denoising_loss, proj_loss


def run_repa_style(args, data: Path, enc_dir: Path | None) -> list[float]:
    """REPA's loop, step for step (see the module docstring); returns img/s of each timed step."""
    import copy

    from accelerate import Accelerator

    from losses.alignment import align_tokens
    from models.encoders import load_encoders
    from models.sit import SiT_models
    from preprocessing.shards import ShardDataset, ShardLoader

    accelerator = Accelerator(cpu=not torch.cuda.is_available(),
                              mixed_precision=args.precision if args.precision != "no" else "no")
    device = accelerator.device
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    ds = ShardDataset(data, with_images=enc_dir is not None)
    loader = ShardLoader(ds, args.batch_size, seed=0, output="raw")
    encoders = []
    if enc_dir is not None:
        enc_dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
        encoders = load_encoders("dinov2-vit-b", 32, device, enc_dtype, enc_dir)
    torch.manual_seed(0)
    z_dims = [e.embed_dim for e in encoders]
    model = SiT_models[args.model](input_size=32, in_channels=3, num_classes=ds.num_classes,
                                   z_dims=z_dims, encoder_depth=4)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0,
                            eps=1e-8)
    model, opt = accelerator.prepare(model, opt)

    times = []
    data_iter = iter(loader)
    for step in range(args.window * (args.windows + 1)):
        t0 = time.perf_counter()
        batch = next(data_iter)
        x = loader.to_latents(batch["x"].to(device))
        y = batch["y"].to(device)
        zs = []
        if encoders:
            with torch.no_grad():
                imgs = batch["image"].to(device)
                # REPA needs equal token counts; at 32 px the encoder grid is 2x2, so resize
                # to SiT's 16x16 as our alignment loss does internally.
                zs = [align_tokens(enc(imgs), 16) for enc in encoders]
        with accelerator.accumulate(model):
            with accelerator.autocast():
                loss, proj_loss = _repa_loss(model, x, y, zs, ds.num_classes, device)
            loss_mean, proj_mean = loss.mean(), proj_loss.mean()
            total = loss_mean + 0.5 * proj_mean
            accelerator.backward(total)
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            _repa_update_ema(ema, model, accelerator)
        logs = {"loss": accelerator.gather(loss_mean).mean().detach().item(),
                "proj_loss": accelerator.gather(proj_mean).mean().detach().item(),
                "grad_norm": accelerator.gather(grad_norm).mean().detach().item()}
        del logs
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    steady = times[args.window:]  # same warm-up cut as for train.py's first window
    return [args.batch_size / t for t in steady]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="SiT-B/2")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--precision", choices=["no", "bf16", "fp16"], default="no")
    p.add_argument("--window", type=int, default=5, help="steps per logging window")
    p.add_argument("--windows", type=int, default=4, help="timed windows after the warm-up one")
    p.add_argument("--proj", action="store_true", help="add the REPA term (random DINOv2-B)")
    p.add_argument("--compile", action="store_true",
                   help="train.py with --compile (the REPA-style loop never compiles, as REPA)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="device peak for train.py's MFU (default: known GPUs only)")
    args = p.parse_args()
    print(json.dumps(describe_machine()))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = encode_digits(tmp / "digits32")
        enc_dir = save_random_dinov2(tmp) if args.proj else None
        bg = BackgroundLoad().start()
        ours, mfu = run_ours(args, data, tmp / "runs", enc_dir)
        load_ours = bg.stop()
        bg = BackgroundLoad().start()
        repa = run_repa_style(args, data, enc_dir)
        load_repa = bg.stop()
    m_ours, m_repa = statistics.median(ours), statistics.median(repa)
    what = f"{args.model}, batch {args.batch_size}, precision {args.precision}" + \
        (", + REPA term (DINOv2-B)" if args.proj else "") + \
        (", train.py compiled" if args.compile else "")
    print(f"\n{what}")
    print(f"train.py    : median {m_ours:8.2f} img/s over {len(ours)} windows of {args.window} "
          f"steps {['%.2f' % v for v in ours]}  [background load {load_ours:.0%}]")
    print(f"REPA-style  : median {m_repa:8.2f} img/s over {len(repa)} steps  [background load {load_repa:.0%}]")
    print(f"ratio train.py / REPA-style: {m_ours / m_repa:.2f}x")
    if mfu:  # train.py logs it on GPUs whose peak it knows (H100/H200/A100) or with --peak-tflops
        print(f"train.py MFU: median {statistics.median(mfu):.1%} "
              f"{['%.1f%%' % (100 * v) for v in mfu]}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Generation speed with REPA's evaluation recipe (SDE, CFG 1.8 on [0, 0.7]) in fp32 vs bf16.

    python bench/bench_generate.py                       # CPU, SiT-B/2, batch 2, 10 of 250 steps
    python bench/bench_generate.py --model SiT-XL/2 --batch-size 64 --num-steps 250   # on a GPU

The sampler is the real one (``samplers.sample_sde``). On a CPU a full 250-step run takes many
minutes per image, so ``--num-steps`` runs a prefix of the same kind of steps and the time per
image for 250 steps is extrapolated linearly (each step costs the same: one model evaluation,
doubled batch inside the guidance interval). Also prints the largest difference between the fp32
and bf16 samples (same seeds), and a FLOP-based projection of 50K SiT-XL/2 samples on one H100.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from bench._machine import BackgroundLoad, describe_machine
from models.sit import SiT_models
from samplers import images_to_uint8, sample_sde

H100_BF16_DENSE_TFLOPS = 989.4


def evals_per_image(num_steps: int, low: float, high: float) -> float:
    """Model evaluations (in batch rows) per image: 2 inside the guidance interval, 1 outside."""
    grid = torch.linspace(1.0, 0.04, num_steps, dtype=torch.float64).tolist() + [0.0]
    ts = grid[:num_steps]  # each step evaluates the model once at its start time
    return sum(2.0 if low <= t <= high else 1.0 for t in ts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="SiT-B/2")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--num-steps", type=int, default=10, help="steps actually run")
    p.add_argument("--full-steps", type=int, default=250, help="recipe steps to extrapolate to")
    p.add_argument("--cfg-scale", type=float, default=1.8)
    p.add_argument("--guidance-low", type=float, default=0.0)
    p.add_argument("--guidance-high", type=float, default=0.7)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--assumed-mfu", type=float, default=0.4,
                   help="MFU assumed for the H100 projection (bf16)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    print("machine:", describe_machine())

    torch.manual_seed(0)
    model = SiT_models[args.model](input_size=32, num_classes=1000).to(device).eval()
    with torch.no_grad():  # random but non-trivial weights (zero-init layers would output 0)
        for prm in model.parameters():
            if prm.requires_grad:
                prm.add_(torch.randn_like(prm) * 0.02)
    y = torch.arange(args.batch_size, device=device) % 1000
    shape = (args.batch_size, 4, 32, 32)
    # A prefix of the full grid: same t values as the first num_steps of a full run would use
    # differ, but the cost per step is the same, which is what is measured.
    kw = dict(num_steps=args.num_steps, cfg_scale=args.cfg_scale, guidance_low=args.guidance_low,
              guidance_high=args.guidance_high, y=y, seed=0)
    results, samples = {}, {}
    for prec in ("fp32", "bf16"):
        times = []
        load = BackgroundLoad().start()
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16,
                                                 enabled=prec == "bf16"):
                z = sample_sde(model, shape, **kw)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        results[prec] = (statistics.median(times), load.stop())
        samples[prec] = z.float().cpu()

    steps_evals = evals_per_image(args.num_steps, args.guidance_low, args.guidance_high)
    full_evals = evals_per_image(args.full_steps, args.guidance_low, args.guidance_high)
    print(f"{args.model}, batch {args.batch_size}, SDE {args.num_steps} steps run "
          f"({steps_evals:.0f} evals/img), extrapolated to {args.full_steps} steps "
          f"({full_evals:.0f} evals/img), CFG {args.cfg_scale} on [{args.guidance_low}, "
          f"{args.guidance_high}]")
    print(f"{'precision':9} {'run s':>8} {'img/s (run)':>12} {'s/img @full':>12} {'bg':>5}")
    for prec, (sec, bg) in results.items():
        per_img_full = sec / args.batch_size * full_evals / steps_evals
        print(f"{prec:9} {sec:8.2f} {args.batch_size / sec:12.3f} {per_img_full:12.1f} "
              f"{bg:5.0%}")
    ratio = results["fp32"][0] / results["bf16"][0]
    diff = (samples["fp32"] - samples["bf16"]).abs().max().item()
    u8 = (images_to_uint8(samples["fp32"].clamp(-1, 1)).int()
          - images_to_uint8(samples["bf16"].clamp(-1, 1)).int()).abs().max().item()
    print(f"bf16 speed-up {ratio:.2f}x; max |z_fp32 - z_bf16| = {diff:.4f} (latents, scaled); "
          f"as uint8 of clamp(z) {u8} (a pixel difference needs the real VAE decoder)")

    with torch.device("meta"):
        xl = SiT_models["SiT-XL/2"](input_size=32, num_classes=1000)
    flops = 2 * xl.forward_macs() * full_evals * 50_000
    hours = flops / (H100_BF16_DENSE_TFLOPS * 1e12 * args.assumed_mfu) / 3600
    print(f"projection: 50K SiT-XL/2 samples, {full_evals:.0f} evals/img x "
          f"{2 * xl.forward_macs() / 1e9:.0f} GFLOP = {flops:.3g} FLOP; one H100 at "
          f"{args.assumed_mfu:.0%} bf16 MFU: {hours:.2f} h (VAE decode not included)")


if __name__ == "__main__":
    main()

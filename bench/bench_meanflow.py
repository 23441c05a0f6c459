#!/usr/bin/env python
"""MeanFlow training step time over SI training step time: same model, batch and process.

    python bench/bench_meanflow.py                                   # CPU: SiT-B/2, batch 4
    python bench/bench_meanflow.py --model SiT-XL/2 --batch-size 32 --device cuda --precision bf16

Each step is what train.py runs (:func:`losses.terms.training_losses` or
:func:`losses.meanflow.meanflow_losses`, backward, gradient clipping, AdamW) on random latents
4x32x32 (SD-VAE at 256 px). SI and MeanFlow steps are interleaved so that machine noise hits both
alike; medians are reported. A MeanFlow step is one JVP (primal + tangent, math attention) plus
the forward and backward of SI, and with training-time guidance (``--guided``) two more forwards.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

import runtime
from bench._machine import add_step_args, apply_threads, describe_machine
from losses import MeanFlowLoss, meanflow_batch, meanflow_losses
from losses import si_batch, training_losses
from models.sit import SiT_models


def build(args: argparse.Namespace) -> tuple:
    """``(device, model, optimizer, x, y)``: a MeanFlow SiT of ``args.model`` with AdamW and a
    fixed batch of random SD-VAE-shaped latents (4x32x32) and labels, seeded."""
    device = torch.device(args.device)
    runtime.configure(device, True, args.precision)
    torch.manual_seed(0)
    model = SiT_models[args.model](input_size=32, in_channels=4, num_classes=1000,
                                   meanflow=True).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(args.batch_size, 4, 32, 32, device=device)
    y = torch.randint(0, 1000, (args.batch_size,), device=device)
    return device, model, opt, x, y


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_step_args(p, steps=6)
    p.add_argument("--precision", choices=runtime.PRECISIONS, default="no")
    p.add_argument("--guided", action="store_true", help="training-time guidance on (w=2)")
    args = p.parse_args()
    apply_threads(args)
    device, model, opt, x, y = build(args)
    mf = MeanFlowLoss(cfg_w=2.0 if args.guided else 1.0)

    def step(kind: str) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        g = torch.Generator(device).manual_seed(0)
        with runtime.autocast(device, args.precision):
            if kind == "si":
                b = si_batch(x, y, num_classes=1000, cfg_prob=0.1, generator=g)
                loss = training_losses(model, b, depth=model.depth)["loss"]
            else:
                b = meanflow_batch(x, y, num_classes=1000, cfg_prob=0.1, mf=mf, generator=g)
                loss = meanflow_losses(model, model.forward, b, depth=model.depth, mf=mf,
                                       null_label=1000)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    for _ in range(args.warmup):
        step("si"), step("meanflow")
    times = {"si": [], "meanflow": []}
    for _ in range(args.steps):
        for kind in times:
            times[kind].append(step(kind))
    si, mfs = statistics.median(times["si"]), statistics.median(times["meanflow"])
    out = {"machine": describe_machine(), "model": args.model, "batch": args.batch_size,
           "device": str(device), "precision": args.precision, "guided": args.guided,
           "si_step_s": si, "meanflow_step_s": mfs, "ratio": mfs / si,
           "all_s": times}
    print(json.dumps(out, indent=1))
    print(f"\n{args.model} batch {args.batch_size} on {device} ({args.precision}): SI step "
          f"{si * 1e3:.0f} ms, MeanFlow step {mfs * 1e3:.0f} ms{' (guided)' if args.guided else ''}"
          f": {mfs / si:.2f}x (medians of {args.steps}, interleaved)")


if __name__ == "__main__":
    main()

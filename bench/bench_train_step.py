#!/usr/bin/env python
"""Training-step speed of SiT: forward + backward + AdamW on random latents, img/s and MFU.

    python bench/bench_train_step.py                                   # CPU: B/2 and XL/2, batch 2
    python bench/bench_train_step.py --models SiT-XL/2 --batch-size 64 --precisions tf32 bf16

FLOPs per image = 3 (forward + backward) x 2 (FLOPs per MAC) x the model's forward MACs
(``SiT.forward_macs``, equal to DiT's published "Gflops": 118.6 G for XL/2 at 256 px). MFU divides
the achieved FLOP/s by the peak of the precision used: ``--peak-tflops`` overrides the built-in
table (H100/H200 SXM dense peaks; for CPUs the nominal AVX-512 FMA peak for fp32 and the AMX peak
for bf16 at the base clock, so CPU MFU is indicative only).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

import runtime
from bench._machine import BackgroundLoad, describe_machine
from losses.interpolant import interpolate, sample_time, si_loss
from models.sit import SiT_models



def cpu_peak_tflops(precision: str) -> float:
    """Nominal CPU peak: cores x base GHz x FLOP/cycle (AVX-512: 2 FMA x 16 fp32 x 2; AMX bf16:
    1024 per core per cycle). Read from lscpu flags; a rough yardstick, not a measured roof."""
    import os
    import re
    cores = os.cpu_count() or 1
    flags, ghz = "", 2.0
    try:
        text = Path("/proc/cpuinfo").read_text()
        flags = re.search(r"^flags\s*:(.*)$", text, re.M).group(1)
        m = re.search(r"^model name\s*:.*@\s*([\d.]+)GHz", text, re.M)
        if m:
            ghz = float(m.group(1))
        else:
            mips = re.search(r"^bogomips\s*:\s*([\d.]+)", text, re.M)
            ghz = float(mips.group(1)) / 2000 if mips else 2.0
    except (OSError, AttributeError):
        pass
    per_cycle = 64 if "avx512f" in flags else 32
    if precision == "bf16" and "amx_bf16" in flags:
        per_cycle = 1024
    return cores * ghz * per_cycle / 1000


def step_time(name: str, batch: int, precision: str, compile_: bool, steps: int, warmup: int,
              device: torch.device) -> dict:
    torch.manual_seed(0)
    model = SiT_models[name](input_size=32, num_classes=1000).to(device)
    # Zero-initialised output layers would make the first steps trivially cheap for nothing; a
    # short random perturbation keeps the numerics realistic.
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 1e-3)
    fused = device.type == "cuda"
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                            weight_decay=0, fused=fused)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
        torch.backends.cudnn.allow_tf32 = precision == "tf32"
    fwd = torch.compile(model) if compile_ else model
    g = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(batch, 4, 32, 32, generator=g).to(device)
    eps = torch.randn(batch, 4, 32, 32, generator=g).to(device)
    y = torch.randint(0, 1000, (batch,), generator=g).to(device)
    t = sample_time(batch, "uniform", generator=g).to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def one_step() -> None:
        x_t, v = interpolate(x, eps, t, "linear")
        with autocast:
            pred = fwd(x_t, t, y)
        loss = si_loss(pred.float(), x, eps, t)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    for _ in range(warmup):
        one_step()
    sync()
    warm_s = time.perf_counter() - t0
    times = []
    load = BackgroundLoad().start()
    for _ in range(steps):
        t0 = time.perf_counter()
        one_step()
        sync()
        times.append(time.perf_counter() - t0)
    other = load.stop()
    med = statistics.median(times)
    flops = 3 * 2 * model.forward_macs() * batch
    if device.type == "cuda":  # the table train.py's MFU uses
        peak = runtime.peak_flops(device, "bf16" if precision == "bf16" else "no",
                                  allow_tf32=precision == "tf32")
        peak = peak / 1e12 if peak else None
    else:
        peak = cpu_peak_tflops(precision)
    tflops = flops / med / 1e12
    return {"model": name, "batch": batch, "precision": precision, "compile": compile_,
            "median_s": med, "img_s": batch / med, "tflops": tflops,
            "mfu": tflops / peak if peak else float("nan"), "peak": peak, "warmup_s": warm_s,
            "other_load": other}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", nargs="+", default=["SiT-B/2", "SiT-XL/2"])
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--precisions", nargs="+", default=None,
                   help="fp32, tf32 (CUDA only), bf16 (autocast); default: all that apply")
    p.add_argument("--compile", choices=["no", "yes", "both"], default="both")
    p.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    precisions = args.precisions or (["fp32", "tf32", "bf16"] if device.type == "cuda"
                                     else ["fp32", "bf16"])
    compiles = {"no": [False], "yes": [True], "both": [False, True]}[args.compile]
    print("machine:", describe_machine())
    print(f"device {device}; batch {args.batch_size}; {args.steps} timed steps after "
          f"{args.warmup} warm-up; FLOPs/img = 6 x forward MACs")
    print(f"{'model':10} {'prec':5} {'compile':7} {'step s':>8} {'img/s':>8} {'TFLOP/s':>8} "
          f"{'MFU':>6} {'peak':>7} {'warmup s':>8} {'other load':>10}")
    for name in args.models:
        for prec in precisions:
            for c in compiles:
                r = step_time(name, args.batch_size, prec, c, args.steps, args.warmup, device)
                print(f"{r['model']:10} {r['precision']:5} {str(r['compile']):7} "
                      f"{r['median_s']:8.3f} {r['img_s']:8.2f} {r['tflops']:8.3f} "
                      f"{r['mfu']:6.1%} {r['peak'] or float('nan'):7.1f} {r['warmup_s']:8.1f} "
                      f"{r['other_load']:10.0%}", flush=True)


if __name__ == "__main__":
    main()

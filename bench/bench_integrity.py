#!/usr/bin/env python
"""Cost of train.py's integrity checks: the per-step finiteness guard, and the shard checksums
verified before training.

    python bench/bench_integrity.py                       # CPU: SiT-B/2, batch 4, digits shards
    python bench/bench_integrity.py --model SiT-XL/2 --batch-size 32 --device cuda

1. Guard: ``training.monitor.DivergenceGuard.update`` (a few scalar kernels on the device, no host sync)
   against one SiT training step (forward + backward + clip + AdamW) of the same process. Both are
   timed as medians; the steps with and without the guard are interleaved so machine noise hits
   both alike.
2. Shards: ``preprocessing.shards.hash_problems`` over a shard directory (default: the digits,
   encoded into a temporary directory), in MB/s, and the projection for ImageNet-256 latents
   (1,281,167 images, SD-VAE moments 8x32x32 fp16, with mirrored copies; with stored images) when
   the processes share the work as train.py does.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from bench._machine import add_step_args, apply_threads, describe_machine
from losses.interpolant import interpolate, sample_time, si_loss
from models.sit import SiT_models
from preprocessing.shards import hash_problems, read_manifest
from training.monitor import DivergenceGuard

IMAGENET = 1_281_167


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_guard(args, device: torch.device) -> dict:
    torch.manual_seed(0)
    model = SiT_models[args.model](input_size=32, in_channels=4, num_classes=1000).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(args.batch_size, 4, 32, 32, device=device)
    y = torch.randint(0, 1000, (args.batch_size,), device=device)
    guard = DivergenceGuard(SimpleNamespace(device=device), 0, weights=list(model.parameters()),
                            scaler_enabled=args.fp16, max_skips=1000, latest_checkpoint=lambda: None)

    def step(with_guard: bool) -> float:
        _sync(device)
        t0 = time.perf_counter()
        t = sample_time(x.shape[0], "uniform", device=device)
        eps = torch.randn_like(x)
        x_t, v = interpolate(x, eps, t, "linear")
        loss = si_loss(model(x_t, t, y), x, eps, t, "linear", target=v)["loss"]
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if with_guard:
            guard.update({"loss": loss.detach(), "grad_norm": gn.detach()})
        _sync(device)
        return time.perf_counter() - t0

    for _ in range(args.warmup):
        step(True)
    plain, guarded = [], []
    for _ in range(args.steps):
        plain.append(step(False))
        guarded.append(step(True))
    one = torch.tensor(1.0, device=device)
    terms = {"loss": one, "grad_norm": one}
    upd = []
    for _ in range(args.update_reps):
        _sync(device)
        t0 = time.perf_counter()
        guard.update(terms)
        _sync(device)
        upd.append(time.perf_counter() - t0)
    s_plain, s_guard, s_upd = (statistics.median(v) for v in (plain, guarded, upd))
    return {"model": args.model, "batch": args.batch_size, "device": str(device),
            "step_s": s_plain, "step_with_guard_s": s_guard, "update_s": s_upd,
            "update_over_step": s_upd / s_plain, "guarded_over_plain": s_guard / s_plain}


def bench_hashes(args) -> dict:
    data = args.data_dir
    tmp = None
    if data is None:
        tmp = tempfile.TemporaryDirectory()
        data = Path(tmp.name) / "digits"
        subprocess.run([sys.executable, str(Path(__file__).resolve().parent.parent / "preprocessing"
                                            / "encode.py"), "--source", "digits", "--dest",
                        str(data), "--resolution", "8", "--vae", "none", "--hflip"],
                       check=True, capture_output=True)
    manifest = read_manifest(data)
    nbytes = sum((Path(data) / s["file"]).stat().st_size for s in manifest["shards"])
    times = []
    for _ in range(args.hash_reps):
        t0 = time.perf_counter()
        problems = hash_problems(data, manifest)
        times.append(time.perf_counter() - t0)
        assert not problems, problems
    mb_s = nbytes / statistics.median(times) / 1e6
    moments = IMAGENET * 2 * (8 * 32 * 32 * 2)  # mean+std fp16, with mirrored copies
    images = IMAGENET * 3 * 256 * 256            # uint8 pixels (--store-images, REPA)
    if tmp is not None:
        tmp.cleanup()
    return {"dir": str(args.data_dir or "digits (temporary, 8 px, hflip)"), "bytes": nbytes,
            "median_s": statistics.median(times), "mb_per_s": mb_s,
            "imagenet_moments_gb": moments / 1e9,
            "imagenet_moments_s_per_process": {w: moments / w / (mb_s * 1e6) for w in (1, 8)},
            "imagenet_with_images_s_per_process": {w: (moments + images) / w / (mb_s * 1e6)
                                                   for w in (1, 8)}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_step_args(p, steps=10)
    p.add_argument("--fp16", action="store_true", help="guard in its fp16 (skip-streak) form")
    p.add_argument("--update-reps", type=int, default=2000)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--hash-reps", type=int, default=3)
    args = p.parse_args()
    apply_threads(args)
    device = torch.device(args.device)
    out = {"machine": describe_machine(), "guard": bench_guard(args, device),
           "hashes": bench_hashes(args)}
    g, h = out["guard"], out["hashes"]
    print(json.dumps(out, indent=1))
    print(f"\nguard.update {g['update_s'] * 1e6:.1f} us vs {g['model']} step "
          f"{g['step_s'] * 1e3:.0f} ms (batch {g['batch']}, {g['device']}): "
          f"{100 * g['update_over_step']:.4f}% of a step; interleaved steps with/without the "
          f"guard: {g['guarded_over_plain']:.3f}x")
    print(f"shard sha256: {h['mb_per_s']:.0f} MB/s on {h['bytes'] / 1e6:.1f} MB; ImageNet-256 "
          f"moments ({h['imagenet_moments_gb']:.0f} GB): "
          f"{h['imagenet_moments_s_per_process'][1]:.0f} s on 1 process, "
          f"{h['imagenet_moments_s_per_process'][8]:.0f} s each on 8; with stored images "
          f"{h['imagenet_with_images_s_per_process'][8]:.0f} s each on 8")


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Peak memory and step time of the two ways to build a MeanFlow step, on the same model and batch.

    python bench/bench_meanflow_memory.py                         # CPU: SiT-B/2, batch 4, fp32
    python bench/bench_meanflow_memory.py --model SiT-XL/2 --batch-size 32 --device cuda \\
        --precision bf16

- ``two-pass`` (what train.py runs, :func:`losses.meanflow.meanflow_losses`): one JVP without
  gradient builds the target, then an ordinary forward (autocast, any attention kernel) carries
  the gradient.
- ``one-jvp`` (the reference formulation, :func:`losses.meanflow.meanflow_prediction_one_jvp`):
  one JVP with autograd on; its primal output is the prediction, its tangent (detached) the
  target. One forward less, but the tangent's activations are recorded too and attention runs
  the math kernel.

Both then do backward, gradient clipping and AdamW. Time: steps interleaved in one process,
medians. Memory: on CUDA the allocator's peak during a step; on CPU each formulation runs in a
fresh child process and reports its peak resident set during the steps minus the resident set
before them (glibc keeps freed memory, so this is the high-water mark), plus, exactly, the bytes
autograd saved for backward (distinct storages, counted by saved-tensor hooks).
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.autograd.forward_ad as fwAD

import runtime
from bench._machine import add_step_args, apply_threads, describe_machine
from bench.bench_meanflow import build
from losses import MeanFlowLoss, meanflow_batch, meanflow_losses
from losses.meanflow import meanflow_prediction_one_jvp
from models.sit import SiT_models

KINDS = ("two-pass", "one-jvp")


def step_loss(kind: str, model, x, y, mf: MeanFlowLoss) -> torch.Tensor:
    g = torch.Generator(x.device).manual_seed(0)
    b = meanflow_batch(x, y, num_classes=1000, cfg_prob=0.1, mf=mf, generator=g)
    if kind == "two-pass":
        return meanflow_losses(model, model, b, depth=model.depth, mf=mf, null_label=1000)["loss"]
    yb = b["y"]
    pred, target = meanflow_prediction_one_jvp(lambda z, r, t: model(z, t, yb, r=r),
                                               b["x_t"], b["r"], b["t"], b["v"])
    return mf(pred, target)["loss"]


def saved_bytes(kind: str, model, x, y, mf, precision: str) -> int:
    """Bytes of the distinct storages autograd holds for backward after the loss is built."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        primal, tangent = fwAD.unpack_dual(t)  # a dual tensor holds both
        for part in (primal, tangent):
            if part is None:
                continue
            try:
                s = part.untyped_storage()
                seen[s.data_ptr()] = s.nbytes()
            except RuntimeError:  # a view the JVP rules made without a python storage
                seen[id(part)] = part.numel() * part.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with runtime.autocast(x.device, precision):
            loss = step_loss(kind, model, x, y, mf)
    del loss
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for ptr, n in seen.items() if ptr not in params)


def run_steps(kind: str, model, opt, x, y, mf, precision: str, n: int) -> list[float]:
    times = []
    for _ in range(n):
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
        t0 = time.perf_counter()
        with runtime.autocast(x.device, precision):
            loss = step_loss(kind, model, x, y, mf)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
        times.append(time.perf_counter() - t0)
    return times


def rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()


def peak_rss_bytes() -> int:
    """The resident set's high-water mark (VmHWM) since it was last reset."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def child(args) -> None:
    """One formulation in this fresh process: its peak resident set during the steps (CPU)."""
    device, model, opt, x, y = build(args)
    mf = MeanFlowLoss()
    # AdamW's state exists from the first step on: allocate it (with zero gradients) before the
    # baseline; the resident high-water mark must not include any forward yet
    for q in model.parameters():
        q.grad = torch.zeros_like(q)
    opt.step()
    opt.zero_grad(set_to_none=True)
    # first use loads code (forward-AD rules, kernels) worth far more than a small model's
    # activations: take those one-time costs on a tiny model of the same kind first
    tiny = SiT_models["SiT-S/2"](input_size=8, in_channels=4, num_classes=1000, depth=1,
                                 hidden_size=32, num_heads=2, meanflow=True).to(device)
    tiny_opt = torch.optim.AdamW(tiny.parameters(), lr=1e-4)
    run_steps(args.child, tiny, tiny_opt, x[:, :, :8, :8], y, mf, args.precision, 1)
    del tiny, tiny_opt
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark (Linux >= 4.0)
    before = rss_bytes()
    run_steps(args.child, model, opt, x, y, mf, args.precision, 2)
    print(json.dumps({"peak_over_start_bytes": peak_rss_bytes() - before}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_step_args(p, steps=4)
    p.add_argument("--precision", choices=runtime.PRECISIONS, default="no")
    p.add_argument("--child", choices=KINDS, help=argparse.SUPPRESS)
    args = p.parse_args()
    apply_threads(args)
    if args.child:
        return child(args)
    device, model, opt, x, y = build(args)
    mf = MeanFlowLoss()
    out = {"machine": describe_machine(), "model": args.model, "batch": args.batch_size,
           "device": str(device), "precision": args.precision}
    for kind in KINDS:
        out[f"{kind}_saved_bytes"] = saved_bytes(kind, model, x, y, mf, args.precision)
    for kind in KINDS:
        run_steps(kind, model, opt, x, y, mf, args.precision, args.warmup)
    times = {k: [] for k in KINDS}
    for _ in range(args.steps):
        for kind in KINDS:
            times[kind] += run_steps(kind, model, opt, x, y, mf, args.precision, 1)
    for kind in KINDS:
        out[f"{kind}_step_s"] = statistics.median(times[kind])
        out[f"{kind}_peak_bytes"] = peak_bytes(kind, args, model, opt, x, y, mf)
    out["all_s"] = times
    print(json.dumps(out, indent=1))
    report(out)


def peak_bytes(kind: str, args, model, opt, x, y, mf) -> int:
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
        base = torch.cuda.memory_allocated(x.device)
        torch.cuda.reset_peak_memory_stats(x.device)
        run_steps(kind, model, opt, x, y, mf, args.precision, 1)
        return torch.cuda.max_memory_allocated(x.device) - base
    cmd = [sys.executable, __file__, "--child", kind, "--model", args.model, "--batch-size",
           str(args.batch_size), "--device", args.device, "--precision", args.precision]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    r = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])["peak_over_start_bytes"]


def report(out: dict) -> None:
    mib = 2 ** 20
    a, b = "two-pass", "one-jvp"
    print(f"\n{out['model']} batch {out['batch']} on {out['device']} ({out['precision']}):")
    for k in KINDS:
        print(f"  {k:9s} step {out[f'{k}_step_s'] * 1e3:7.0f} ms   peak "
              f"+{out[f'{k}_peak_bytes'] / mib:8.1f} MiB   saved for backward "
              f"{out[f'{k}_saved_bytes'] / mib:8.1f} MiB")
    print(f"  one-jvp / two-pass: time {out[f'{b}_step_s'] / out[f'{a}_step_s']:.2f}x, peak "
          f"{out[f'{b}_peak_bytes'] / out[f'{a}_peak_bytes']:.2f}x, saved "
          f"{out[f'{b}_saved_bytes'] / out[f'{a}_saved_bytes']:.2f}x")


if __name__ == "__main__":
    main()

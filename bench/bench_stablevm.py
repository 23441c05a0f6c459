#!/usr/bin/env python
"""StableVM target: the batched and streamed implementations against a per-class loop.

    python bench/bench_stablevm.py              # B=256, K=256, 4x32x32, C=1000; CPU (+CUDA)
    python bench/bench_stablevm.py --devices cuda --step-model SiT-XL/2 --step-batch 32

ImageNet-like setting: a full bank (C=1000 classes x K=256 fp16 latents of 4x32x32, plus the null
pool), B labels drawn uniformly from the 1000 classes, the source of each sample drawn from its
label's bank, t ~ U[0.5, 1) so every sample needs the stable target (the implementations compute
every row anyway; the split only selects afterwards). Bank entries are N(0, 1) (SD-VAE latents
times 0.18215 have std ~1); with them the weights range from one-hot (t ~ 0.5) to spread over
many entries (t -> 1).

Timed (median of --repeats runs, after one warm-up for the fast ones):
- ``stable_target``: gather of the labels' rows to (B, K, D) fp32, then the batched target;
- ``stable_target_efficient``: fp16 gather, then the target streamed over chunks of K;
- ``MemoryBank.stable_target``: streamed straight from the bank's storage (what training uses);
- ``per-class loop``: the straightforward implementation of the same maths written below -- loop
  over the classes present in the batch, direct squared distances, softmax per class (the shape of
  the reference StableVM code).
Accuracy: max |difference| to the loop (fp32) and to the same loop run in float64.

Also timed on CPU, as a bound rather than an implementation: ``floor`` reads every sample's bank
row once in fp16 and sums it (no other arithmetic). Any implementation with an fp16 bank reads
these bytes (less the rows of classes repeated in the batch, ~10% here), so ``loop / floor`` is
about the most any rewrite can gain over the loop on that machine (see docs/BENCHMARKS.md).

On a CPU shared with other jobs, compare thread counts (``--threads 1 2``): the loop's many small
ops, each split over OpenMP threads, slow down by an order of magnitude when another process holds
one of the cores, which inflates the speed-up; with one thread the loop is not slower at all
(both are bound by reading the same bytes of the bank).

The GPU share of a training step is measured with ``--step-model`` on CUDA (fwd + bwd + AdamW in
bf16 autocast from bench_train_step.py) and estimated from FLOPs and bytes otherwise.
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
from losses.interpolant import interpolate, path_coefficients
from losses.stablevm import (MemoryBank, _chunk_size, stable_target,
                             stable_target_efficient)

SIT_XL2_MACS = 118.6e9  # forward MACs per 256x256 image (DiT's "Gflops"), SiT.forward_macs()


def loop_target(bank: MemoryBank, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                cfm: torch.Tensor, path_type: str = "linear", split: float = 0.5,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The straightforward implementation: one iteration per class present in the batch."""
    out = cfm.to(dtype).flatten(1).clone()
    for c in torch.unique(y).tolist():
        sel = torch.nonzero(y == c).flatten()
        ref = bank.latents[c, :int(bank.counts[c])].to(dtype).flatten(1)       # (n_c, D)
        x = x_t[sel].to(dtype).flatten(1)                                       # (m, D)
        a, s, da, ds = (v.unsqueeze(1) for v in path_coefficients(t[sel].to(dtype), path_type))
        d2 = ((x.unsqueeze(1) - a.unsqueeze(2) * ref.unsqueeze(0)) ** 2).sum(-1)  # (m, n_c)
        w = torch.softmax(-d2 / (2 * s ** 2), dim=1)
        v = ds / s * x + (da - ds * a / s) * (w @ ref)
        out[sel] = torch.where((t[sel] >= split).unsqueeze(1), v, out[sel])
    return out.view(cfm.shape)


def fill_bank(bank: MemoryBank, generator: torch.Generator, pool_size: int = 8192) -> None:
    """Every row full of N(0, 1) latents: rows copied from a random pool (fast, 2 GB in seconds)."""
    d, k = bank.latent_dim, bank.capacity
    pool = torch.randn(pool_size, d, generator=generator, device=generator.device)
    pool = pool.to(bank.device, bank.latents.dtype)
    flat = bank.latents.view(bank.num_classes + 1, k, d)
    for c0 in range(0, bank.num_classes + 1, 50):
        c1 = min(c0 + 50, bank.num_classes + 1)
        pick = torch.randint(0, pool_size, ((c1 - c0) * k,), generator=generator,
                             device=generator.device).to(bank.device)
        flat[c0:c1] = pool[pick].view(c1 - c0, k, d)
    bank.counts.fill_(k)
    bank.ptr.zero_()


def timed(fn, repeats: int, device: torch.device, warmup: bool = True):
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    if warmup:
        fn()
        sync()
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times, out


def run_device(args, device: torch.device) -> dict:
    torch.manual_seed(0)
    gen = torch.Generator(device=device).manual_seed(0)
    bank = MemoryBank(args.num_classes, tuple(args.latent), args.capacity, device=device)
    t0 = time.perf_counter()
    fill_bank(bank, gen)
    fill_s = time.perf_counter() - t0
    b = args.batch_size
    y = torch.randint(0, args.num_classes, (b,), generator=gen, device=device)
    x0, _, _ = bank.sample_sources(y, gen)
    eps = torch.randn(x0.shape, generator=gen, device=device)
    t = 0.5 + 0.5 * torch.rand(b, generator=gen, device=device)
    x_t, cfm = interpolate(x0, eps, t, args.path_type)
    pt, split, ch = args.path_type, 0.5, args.chunk_size
    auto = _chunk_size(None, b, args.capacity, bank.latent_dim, device)  # the library's default
    ch_label = ch if ch else f"auto: {auto}"

    def batched():
        ref, mask = bank.gather(y)
        return stable_target(x_t, t, ref, mask, pt, split, cfm)

    def efficient():
        ref16 = bank.latents[y]                              # (B, K, ...) fp16
        return stable_target_efficient(x_t, t, ref16, bank.valid_mask(y), pt, split, cfm, ch)

    def from_bank():
        return bank.stable_target(x_t, t, y, pt, split, cfm, chunk_size=ch)

    def loop():
        return loop_target(bank, x_t, t, y, cfm, pt, split)

    def floor():
        # One fp16 read of each sample's row and nothing written but B sums: the fastest full read
        # measured here (fp16 sum 84 ms; amax 102, sum(dtype=float32) 290, .float() 240).
        return torch.stack([bank.latents[c].sum() for c in y.tolist()])

    rows = {}
    for name, fn, warm in (("stable_target (gather + batched)", batched, True),
                           (f"stable_target_efficient (chunk {ch_label})", efficient, True),
                           (f"MemoryBank.stable_target (chunk {ch_label})", from_bank, True),
                           ("per-class Python loop", loop, device.type == "cuda")):
        load = BackgroundLoad().start()
        med, times, out = timed(fn, args.repeats, device, warmup=warm)
        rows[name] = {"median_s": med, "min_s": min(times), "times": times, "out": out,
                      "other_load": load.stop()}
        print(f"  {name:44s} runs " + " ".join(f"{v * 1e3:.0f}" for v in times) + " ms",
              flush=True)
    floor_row = None
    if device.type == "cpu":  # on a GPU this would time 256 kernel launches, not bytes
        load = BackgroundLoad().start()
        floor_s, floor_times, _ = timed(floor, args.repeats, device)
        floor_row = {"median_s": floor_s, "min_s": min(floor_times), "other_load": load.stop(),
                     "bound": rows["per-class Python loop"]["median_s"] / floor_s}
        print(f"  {'floor (read each row once, no maths)':44s} runs "
              + " ".join(f"{v * 1e3:.0f}" for v in floor_times) + " ms", flush=True)
    reference = loop_target(bank, x_t, t, y, cfm, pt, split, dtype=torch.float64)
    loop_out = rows["per-class Python loop"]["out"]
    for r in rows.values():
        r["diff_loop"] = float((r["out"].double() - loop_out.double()).abs().max())
        r["diff_f64"] = float((r["out"].double() - reference).abs().max())
        r["speedup"] = rows["per-class Python loop"]["median_s"] / r["median_s"]
        r["speedup_min"] = rows["per-class Python loop"]["min_s"] / r["min_s"]
        del r["out"]
    result = {"device": str(device), "rows": rows, "fill_s": fill_s,
              "floor": floor_row,
              "classes_in_batch": int(torch.unique(y).numel()),
              "target_abs_max": float(reference.abs().max())}
    if device.type == "cuda" and args.step_model:
        from bench.bench_train_step import step_time

        sb = args.step_batch
        ys, ts = y[:sb], t[:sb]
        xs, cs = x_t[:sb], cfm[:sb]
        med, _, _ = timed(lambda: bank.stable_target(xs, ts, ys, pt, split, cs, chunk_size=ch),
                          max(args.repeats, 5), device)
        step = step_time(args.step_model, sb, "bf16", False, 5, 2, device)
        result["step"] = {"model": args.step_model, "batch": sb, "step_s": step["median_s"],
                          "target_s": med, "share": med / (step["median_s"] + med)}
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--capacity", type=int, default=256, help="K, entries per class")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--latent", type=int, nargs="+", default=[4, 32, 32])
    p.add_argument("--path-type", default="linear", choices=["linear", "cosine"])
    p.add_argument("--chunk-size", type=int, default=None,
                   help="bank entries per streamed chunk (default: the library's, a 16 MiB fp32 "
                        "chunk on CPU, 128 MiB on GPU: 4 and 32 entries at B=256)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per implementation")
    p.add_argument("--devices", nargs="+", default=None,
                   help="default: cpu, plus cuda when available")
    p.add_argument("--threads", type=int, nargs="+", default=None,
                   help="CPU only: torch thread counts to run with (default: torch's default)")
    p.add_argument("--step-model", default="SiT-XL/2",
                   help="CUDA only: model whose bf16 training step the target is compared with "
                        "('' to skip)")
    p.add_argument("--step-batch", type=int, default=32, help="per-GPU batch for that comparison")
    args = p.parse_args()
    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    d = 1
    for v in args.latent:
        d *= v
    b, k, c = args.batch_size, args.capacity, args.num_classes

    print("machine:", describe_machine())
    print(f"B={b} K={k} D={'x'.join(map(str, args.latent))}={d} C={c} path={args.path_type} "
          f"t~U[0.5,1); median of {args.repeats} runs")

    # Memory of the bank (allocated for real below; this is the same arithmetic).
    mem = MemoryBank(1, tuple(args.latent), k, store_indices=True)
    per_row = mem.latents[0].numel() * mem.latents.element_size()
    idx_row = k * 8
    total = (c + 1) * (per_row + idx_row + 16)
    print(f"bank memory: {c} classes x {k} x {d} fp16 = {c * per_row / 1e9:.3f} GB, null pool "
          f"{per_row / 1e6:.2f} MB, dataset indices {(c + 1) * idx_row / 1e6:.2f} MB; total "
          f"{total / 1e9:.3f} GB ({total / 2**30:.3f} GiB)")
    del mem

    # Cost model of the target (per step, all B rows): two passes over (B, K, D).
    flops = 4 * b * k * d
    step_flops = 6 * SIT_XL2_MACS * b
    bytes_moved = b * k * d * (2 + 4 + 3 * 4)   # fp16 gather, fp32 write, dots/norms/sum reads
    print(f"target cost: {flops / 1e9:.2f} GFLOP (2 B K D for the distances + 2 B K D for the "
          f"weighted sum) vs SiT-XL/2 step 6 x 118.6e9 x B = {step_flops / 1e12:.1f} TFLOP: "
          f"{flops / step_flops:.2e} of the FLOPs; ~{bytes_moved / 1e9:.1f} GB of memory traffic")

    runs = []
    for dev in devices:
        if dev == "cpu" and args.threads:
            runs += [(dev, n) for n in args.threads]
        else:
            runs.append((dev, None))
    for dev, threads in runs:
        device = torch.device(dev)
        if threads:
            torch.set_num_threads(threads)
        print(f"\n[{device}" + (f", {torch.get_num_threads()} threads]" if dev == "cpu" else "]"))
        r = run_device(args, device)
        print(f"  classes present in the batch: {r['classes_in_batch']}; bank fill "
              f"{r['fill_s']:.1f} s; max |target| {r['target_abs_max']:.2f}; bg = CPU share "
              "used by other processes while timing (2 cores = 100%)")
        print(f"  {'implementation':44s} {'median ms':>9} {'min ms':>8} {'speed-up':>9} "
              f"{'(by min)':>8} {'max|d| loop':>11} {'max|d| f64':>10} {'bg':>4}")
        for name, row in r["rows"].items():
            print(f"  {name:44s} {row['median_s'] * 1e3:9.1f} {row['min_s'] * 1e3:8.1f} "
                  f"{row['speedup']:8.1f}x {row['speedup_min']:7.1f}x {row['diff_loop']:11.2e} "
                  f"{row['diff_f64']:10.2e} {row['other_load']:4.0%}")
        fl = r["floor"]
        if fl:
            print(f"  {'floor (read each row once, no maths)':44s} {fl['median_s'] * 1e3:9.1f} "
                  f"{fl['min_s'] * 1e3:8.1f} {fl['bound']:8.1f}x {'':8s} {'':11s} {'':10s} "
                  f"{fl['other_load']:4.0%}  <- about the most any rewrite can gain over the loop")
        if "step" in r:
            s = r["step"]
            print(f"  share of a {s['model']} bf16 training step at batch {s['batch']}: target "
                  f"{s['target_s'] * 1e3:.2f} ms, step {s['step_s'] * 1e3:.1f} ms -> "
                  f"{s['share']:.2%}")


if __name__ == "__main__":
    main()

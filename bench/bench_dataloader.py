#!/usr/bin/env python
"""Latent delivery throughput: the shard reader against a one-.npy-file-per-sample loader.

    python bench/bench_dataloader.py                # N=100000 samples, 5 timed epochs per loader
    python bench/bench_dataloader.py --quick        # N=20000, 3 timed epochs

Both loaders deliver the same thing to the training step, from the same synthetic data: a batch
of fp16 SD-VAE posterior moments (B, 8, 32, 32) -- 4x32x32 latents, mean then std -- plus int64
labels (B,). Posterior sampling, z = (mean + std * eps) * 0.18215, happens inside the training
step on the device in both cases (``ShardLoader(output="raw")`` + ``to_latents``), so what is
timed here is the delivery of moments + labels, nothing else; the consumer does no work.

Data (deterministic from --seed): N samples of random fp16 moments and labels 0..999, written
  * as shards with the real writer (``preprocessing.shards.write_shard``, --shard-size 1000,
    a manifest.json with the fields encode.py's ``build_manifest`` writes), and
  * in the REPA layout (edm2 ``dataset_tool.py`` encode output): ``vae-sd/NNNNN/
    img-mean-std-NNNNNNNN.npy`` (one fp16 (8, 32, 32) array per sample, 1000 per folder) plus
    ``vae-sd/dataset.json`` = ``{"labels": [[relative file name, label], ...]}``.
Both copies are read in full once before anything is timed (warm page cache for both); then each
loader runs one untimed warm-up epoch (starts the DataLoader workers / maps the shard pages into
the process) and --repeats timed full epochs, interleaved across loaders so that all see the same
machine conditions. The table gives the median samples/s and the ratio to the per-file loader of
the same run, and how much CPU other processes used meanwhile (the machines are shared).

Loaders:
  * per-file: a ``torch.utils.data.Dataset`` whose ``__getitem__`` is one ``np.load`` returning
    (tensor, label), in a ``DataLoader(batch_size=256, shuffle=True, num_workers=2,
    drop_last=True, persistent_workers=True)`` -- REPA / fast-DiT style. Workers run with one
    torch thread each (DataLoader's default); no pin_memory (there is no device here).
  * shard: ``ShardLoader(ShardDataset(dir), 256, output="raw")`` with ``prefetch=0`` and with
    the default prefetch (2 batches, 1 pool thread), at --threads intra-op torch threads
    (default 2: the two cores) and at 1 thread, plus prefetch 2 with 2 pool threads at 1 torch
    thread.

--contended repeats the measurement while a busy-looping process takes one core; --profile
times the pieces of one ShardLoader batch (where the time goes).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable

if __package__ in (None, ""):  # `python bench/bench_dataloader.py` puts bench/ on the path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch

import common
from bench._machine import BackgroundLoad, describe_machine
from common import cli_error
from preprocessing import shards as fmt

CHANNELS, HEIGHT, WIDTH = 4, 32, 32          # SD-VAE latents of 256x256 images
SAMPLE_SHAPE = (2 * CHANNELS, HEIGHT, WIDTH)  # stored posterior moments: mean then std
LATENT_SCALE = 0.18215
DATA_VERSION = 1  # bump when the synthetic data changes, so an old --keep'd workdir is rebuilt


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keep the module docstring's layout and show every flag's default."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=_HelpFormatter)
    p.add_argument("--num-samples", "-n", type=int, default=None,
                   help="synthetic samples (None: 100000, or 20000 with --quick)")
    p.add_argument("--quick", action="store_true",
                   help="N=20000 and 3 repeats unless those are given explicitly")
    p.add_argument("--workdir", default="/tmp/bench_dataloader",
                   help="where both copies of the data are written (about 2 x 16 KiB x N)")
    p.add_argument("--keep", action="store_true",
                   help="keep --workdir afterwards (a later run with the same settings reuses it)")
    p.add_argument("--batch-size", type=int, default=256, help="samples per batch, both loaders")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard file")
    p.add_argument("--num-classes", type=int, default=1000, help="labels are 0..num_classes-1")
    p.add_argument("--workers", type=int, default=2, help="per-file DataLoader worker processes")
    p.add_argument("--threads", type=int, default=2,
                   help="torch intra-op threads of the main process (torch.set_num_threads)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed full epochs per loader; the median is reported (None: 5, or 3 "
                        "with --quick)")
    p.add_argument("--seed", type=int, default=0, help="seeds the data and both loaders' order")
    p.add_argument("--profile", action="store_true",
                   help="also time the pieces of one ShardLoader batch (where the time goes)")
    p.add_argument("--contended", action="store_true",
                   help="measure everything a second time while a busy-looping process takes "
                        "one core (a shared machine)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    if args.num_samples is None:
        args.num_samples = 20_000 if args.quick else 100_000
    if args.repeats is None:
        args.repeats = 3 if args.quick else 5
    for name in ("num_samples", "batch_size", "shard_size", "num_classes", "threads", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.workers < 0:
        p.error("--workers must be >= 0")
    if args.num_samples < args.batch_size:
        p.error("--num-samples must be at least one batch")
    return args


# ----------------------------------------------------------------------------------------------
# Synthetic data, written twice.

def synth_block(seed: int, start: int, n: int, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Moments (n, 8, 32, 32) fp16 and labels (n,) int64 of samples start..start+n-1.

    Seeded by (seed, start), so the data depends only on the seed and the block boundaries.
    """
    rng = np.random.default_rng([seed, start])
    mean = rng.standard_normal((n, CHANNELS, HEIGHT, WIDTH), dtype=np.float32) * 5.0
    std = np.exp(rng.uniform(-7.0, -2.0, size=(n, CHANNELS, HEIGHT, WIDTH)).astype(np.float32))
    moments = np.concatenate([mean, std], axis=1).astype(np.float16)
    labels = rng.integers(0, num_classes, size=n, dtype=np.int64)
    return moments, labels


def perfile_name(i: int) -> str:
    """REPA / edm2 dataset_tool layout: 1000 files per folder named by the first 5 digits."""
    s = f"{i:08d}"
    return f"{s[:5]}/img-mean-std-{s}.npy"


def write_data(work: Path, n: int, shard_size: int, num_classes: int, seed: int) -> dict:
    """Write the shard directory and the per-file tree; return timing info."""
    shard_dir, file_dir = work / "shards", work / "perfile" / "vae-sd"
    for d in (shard_dir, file_dir):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    records, label_list = [], []
    t_shard = t_file = 0.0
    cfg = {"bench": "bench_dataloader", "n": n, "seed": seed, "shard_size": shard_size}
    config_sha = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()
    for s, start in enumerate(range(0, n, shard_size)):
        m, y = synth_block(seed, start, min(shard_size, n - start), num_classes)
        t0 = time.perf_counter()
        tensors = {"moments": torch.from_numpy(m), "labels": torch.from_numpy(y),
                   "index": torch.arange(start, start + len(y), dtype=torch.int64)}
        sha = fmt.write_shard(shard_dir / fmt.shard_name(s), tensors,
                              metadata={"format_version": str(fmt.FORMAT_VERSION),
                                        "shard": str(s), "config_sha256": config_sha})
        v = torch.from_numpy(m).double()  # channel stats of z as encode.py records them
        mean, std = v.chunk(2, dim=1)
        records.append({"file": fmt.shard_name(s), "count": len(y), "sha256": sha,
                        "n": len(y) * HEIGHT * WIDTH, "sum": mean.sum((0, 2, 3)),
                        "sumsq": (mean ** 2 + std ** 2).sum((0, 2, 3))})
        t1 = time.perf_counter()
        for k in range(len(y)):
            name = perfile_name(start + k)
            path = file_dir / name
            if k == 0 or not path.parent.is_dir():
                path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path, m[k])
            label_list.append([name, int(y[k])])
        t_file += time.perf_counter() - t1
        t_shard += t1 - t0
        if sys.stdout.isatty() or s % 20 == 19 or start + len(y) == n:
            print(f"\rwriting data: {start + len(y)}/{n}", end="" if sys.stdout.isatty() else
                  "\n", flush=True)
    if sys.stdout.isatty():
        print()
    elems = sum(r["n"] for r in records)
    ch_mean = sum(r["sum"] for r in records) / elems
    ch_std = (sum(r["sumsq"] for r in records) / elems - ch_mean ** 2).clamp_min(0).sqrt()
    names = [str(c) for c in range(num_classes)]
    # The fields encode.py's `build_manifest` writes (the reader needs format_version, key, dtype,
    # latent, num_classes, hflip, images and shards).
    manifest = {
        "format_version": fmt.FORMAT_VERSION,
        "source": {"type": "synthetic", "generator": "bench/bench_dataloader.py", "seed": seed},
        "resolution": 256, "crop": "adm", "vae": None, "store": "moments", "dtype": "fp16",
        "key": "moments",
        "latent": {"channels": CHANNELS, "height": HEIGHT, "width": WIDTH, "scale": LATENT_SCALE,
                   "bias": 0.0, "channel_mean": ch_mean.tolist(), "channel_std": ch_std.tolist()},
        "count": n, "num_classes": num_classes, "class_names": names,
        "class_to_idx": {c: i for i, c in enumerate(names)},
        "hflip": False, "images": False,
        "shards": [{"file": r["file"], "count": r["count"], "sha256": r["sha256"]}
                   for r in records],
        "num_failed": 0, "num_upsampled": 0, "num_skipped_files": 0, "empty_classes": [],
        "config": cfg, "config_sha256": config_sha,
        "created_with": {"torch": torch.__version__},
    }
    common.atomic_write_json(shard_dir / fmt.MANIFEST, manifest)
    common.atomic_write_json(file_dir / "dataset.json", {"labels": label_list})
    return {"write_shards_s": t_shard, "write_perfile_s": t_file}


def prepare(args: argparse.Namespace) -> tuple[Path, Path, dict]:
    """Write the data unless --workdir already holds data of the same settings."""
    work = Path(args.workdir)
    stamp = work / "bench-data.json"
    spec = {"version": DATA_VERSION, "n": args.num_samples, "seed": args.seed,
            "shard_size": args.shard_size, "num_classes": args.num_classes}
    info: dict[str, Any] = {}
    if stamp.is_file() and json.loads(stamp.read_text()) == spec:
        print(f"reusing the data in {work}")
        info["reused"] = True
    else:
        work.mkdir(parents=True, exist_ok=True)
        stamp.unlink(missing_ok=True)
        info = write_data(work, args.num_samples, args.shard_size, args.num_classes, args.seed)
        common.atomic_write_json(stamp, spec)
    shard_dir, file_dir = work / "shards", work / "perfile" / "vae-sd"
    problems = fmt.verify(shard_dir, check_hashes=False)
    if problems:
        sys.exit(cli_error("bench_dataloader.py", "the benchmark shards do not verify:\n  "
                           + "\n  ".join(problems)))
    return shard_dir, file_dir, info


def warm_page_cache(paths: Iterable[Path]) -> tuple[int, int, float]:
    """Read every file once (page cache warm for both formats); return (files, bytes, seconds)."""
    t0 = time.perf_counter()
    files = total = 0
    for p in paths:
        with open(p, "rb") as f:
            while block := f.read(1 << 22):
                total += len(block)
        files += 1
    return files, total, time.perf_counter() - t0


# ----------------------------------------------------------------------------------------------
# The per-file baseline (REPA / fast-DiT style).

class PerFileMoments(torch.utils.data.Dataset):
    """One ``np.load`` per sample from a REPA-layout folder; labels from its dataset.json."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        labels = dict(json.loads((self.root / "dataset.json").read_text())["labels"])
        self.names = sorted(labels)  # REPA sorts the file names it finds
        self.labels = np.array([labels[n] for n in self.names], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = torch.from_numpy(np.load(self.root / self.names[i]))
        return x, int(self.labels[i])


# ----------------------------------------------------------------------------------------------
# Timing.

def time_epoch(batches: Iterable, check: Callable[[Any], tuple[torch.Tensor, torch.Tensor]]
               ) -> tuple[float, float]:
    """Iterate one full epoch; return (samples/s, share of the machine other processes used)."""
    n = 0
    bg = BackgroundLoad().start()
    t0 = time.perf_counter()
    for b in batches:
        x, _ = check(b)
        n += x.shape[0]
    dt = time.perf_counter() - t0
    return n / dt, bg.stop()


def make_check(batch_size: int) -> Callable[[Any], tuple[torch.Tensor, torch.Tensor]]:
    """The null training step: unpack the batch and check what it is (cheap, O(1))."""
    want = (batch_size,) + SAMPLE_SHAPE

    def check(b: Any) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = (b["x"], b["y"]) if isinstance(b, dict) else b
        if tuple(x.shape) != want or x.dtype != torch.float16 or y.dtype != torch.int64 \
                or tuple(y.shape) != (batch_size,):
            raise AssertionError(f"unexpected batch {x.dtype}{tuple(x.shape)}, "
                                 f"{y.dtype}{tuple(y.shape)}")
        return x, y
    return check


def same_content(shard_dir: Path, file_dir: Path, batch_size: int, seed: int) -> None:
    """Both loaders serve the same samples: compare one shard batch with the .npy files."""
    ds = fmt.ShardDataset(shard_dir)
    files = PerFileMoments(file_dir)
    b = next(iter(fmt.ShardLoader(ds, batch_size, output="raw", prefetch=0, seed=seed)))
    for row in range(0, batch_size, max(1, batch_size // 16)):
        i = int(b["index"][row])
        x, y = files[i]
        if not torch.equal(x, b["x"][row]) or y != int(b["y"][row]):
            raise AssertionError(f"sample {i} differs between the shard and the .npy copy")


def profile_batch(shard_dir: Path, batch_size: int, threads: int, reps: int = 300) -> dict:
    """Median microseconds of the pieces of one ShardLoader batch (output='raw', no flips).

    The pieces re-do what ``ShardLoader._batch`` / ``ShardDataset.gather`` do, separately:
    the per-batch seeded generator, the bookkeeping (sort, shard lookup, grouping, allocation),
    the ``index_select`` copies alone (groups precomputed, output preallocated), the label and
    index gathers -- and, for scale, a plain copy of as many contiguous rows (memcpy bound).
    """
    torch.set_num_threads(threads)
    ds = fmt.ShardDataset(shard_dir)
    loader = fmt.ShardLoader(ds, batch_size, output="raw", prefetch=0)
    order = loader.epoch_order(0)
    for _ in loader:  # fault every page into this process
        pass
    steps = len(loader)
    plans = []  # per batch: sorted positions, [(shard tensor, local indices, out rows)]
    out = torch.empty((batch_size,) + SAMPLE_SHAPE, dtype=torch.float16)
    for k in range(steps):
        p, _ = order[k * batch_size:(k + 1) * batch_size].sort()
        sh = torch.searchsorted(ds.offsets, p, right=True) - 1
        local = p - ds.offsets[sh]
        _, counts = torch.unique_consecutive(sh, return_counts=True)
        groups, a = [], 0
        for c in counts.tolist():
            groups.append((ds.shards[int(sh[a])]["moments"], local[a:a + c], out[a:a + c]))
            a += c
        plans.append((p, groups))

    def med(f: Callable[[int], Any]) -> float:
        f(0)
        ts = []
        for r in range(reps):
            k = r % steps
            t0 = time.perf_counter()
            f(k)
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts) * 1e6

    def pos(k: int) -> torch.Tensor:
        return order[k * batch_size:(k + 1) * batch_size]

    def generator(k: int) -> None:
        torch.Generator().manual_seed(common.mix_seed(0, 0, k, 0, 0xBA7C))

    def bookkeeping(k: int) -> None:
        p = pos(k)
        flip = torch.zeros_like(p, dtype=torch.bool)
        srt = torch.argsort(p * 2 + flip.long())
        p, flip = p[srt], flip[srt]
        sh = torch.searchsorted(ds.offsets, p, right=True) - 1
        local = p - ds.offsets[sh]
        _, counts = torch.unique_consecutive(sh * 2 + flip.long(), return_counts=True)
        torch.empty((p.numel(),) + SAMPLE_SHAPE, dtype=torch.float16)
        a = 0
        for c in counts.tolist():
            int(sh[a]), bool(flip[a]), local[a:a + c]
            a += c

    def copies(k: int) -> None:
        for src, idx, dst in plans[k][1]:
            torch.index_select(src, 0, idx, out=dst)

    def side(k: int) -> None:
        p = plans[k][0]
        ds.labels[p], ds.index[p]

    def contiguous(k: int) -> None:
        out.copy_(ds.shards[k % len(ds.shards)]["moments"][:batch_size])

    bg = BackgroundLoad().start()
    res = {"threads": threads,
           "ShardLoader._batch (whole batch)": med(lambda k: loader._batch(0, k)),
           "ShardDataset.gather": med(lambda k: ds.gather(pos(k))),
           "  per-batch generator (mix_seed + manual_seed)": med(generator),
           "  bookkeeping (sort, lookup, group, alloc)": med(bookkeeping),
           "  index_select copies alone": med(copies),
           "  labels + index gathers": med(side),
           "copy of as many contiguous rows (memcpy)": med(contiguous)}
    res["background"] = bg.stop()
    return res


def measure(args: argparse.Namespace, shard_dir: Path, file_dir: Path) -> list[dict]:
    """Time every loader: one untimed warm-up epoch each, then --repeats interleaved epochs."""
    check = make_check(args.batch_size)
    files = PerFileMoments(file_dir)
    loader = torch.utils.data.DataLoader(
        files, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
        drop_last=True, persistent_workers=args.workers > 0,
        generator=torch.Generator().manual_seed(args.seed))
    # (name, settings, torch intra-op threads, iterable of batches)
    contestants: list[tuple[str, str, int, Iterable]] = [
        ("per-file .npy DataLoader", f"num_workers={args.workers}, 1 torch thread each",
         args.threads, loader)]
    # (prefetch, pool threads, torch threads): ShardLoader's defaults (prefetch 2, 1 pool
    # thread) and prefetch=0 at --threads first; the rest vary the thread settings.
    variants = [(0, 1, args.threads), (2, 1, args.threads)]
    if args.threads != 1:
        variants += [(0, 1, 1), (2, 1, 1)]
    variants += [(2, 2, 1)]
    for prefetch, pool, threads in variants:
        sl = fmt.ShardLoader(fmt.ShardDataset(shard_dir), args.batch_size, output="raw",
                             prefetch=prefetch, num_threads=pool, seed=args.seed)
        settings = f"{threads} torch thread{'s' if threads > 1 else ''}"
        if prefetch:
            settings += f", {pool} pool thread{'s' if pool > 1 else ''}"
        contestants.append((f"ShardLoader prefetch={prefetch}", settings, threads, sl))

    # The warm-up epoch starts the DataLoader workers and maps the shard pages into this
    # process; the timed epochs are interleaved so that every loader sees the same conditions.
    runs: list[list[tuple[float, float]]] = [[] for _ in contestants]
    for r in range(args.repeats + 1):
        for k, (_, _, threads, it) in enumerate(contestants):
            torch.set_num_threads(threads)
            runs[k].append(time_epoch(it, check))
        print(f"{'warm-up epoch' if r == 0 else f'timed epoch {r}/{args.repeats}'} done: " +
              ", ".join(f"{v[-1][0]:,.0f}/s" for v in runs), flush=True)
    torch.set_num_threads(args.threads)
    results: list[dict] = []
    for (name, settings, threads, _), rr in zip(contestants, runs):
        rates, bg = [v for v, _ in rr[1:]], [b for _, b in rr[1:]]
        results.append({"loader": name, "settings": settings, "torch_threads": threads,
                        "median": statistics.median(rates), "min": min(rates),
                        "max": max(rates), "repeats": rates, "background": bg,
                        "background_max": max(bg), "background_min": min(bg),
                        "warmup_epoch": rr[0][0]})
    return results


def print_table(results: list[dict]) -> None:
    base = results[0]["median"]
    head = (f"{'loader':<26} {'settings':<34} {'median/s':>10} {'min/s':>10} {'max/s':>10} "
            f"{'x per-file':>10} {'bg':>9}")
    print(head + "\n" + "-" * len(head))
    for r in results:
        bg = f"{100 * r['background_min']:.0f}-{100 * r['background_max']:.0f}%"
        print(f"{r['loader']:<26} {r['settings']:<34} {r['median']:>10,.0f} {r['min']:>10,.0f} "
              f"{r['max']:>10,.0f} {r['median'] / base:>10.1f} {bg:>9}")
    print("x per-file: median / the per-file median of the same table. bg: share of the machine "
          "(2 cores = 100%) that\nother processes used during the timed epochs (min-max)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    machine = describe_machine()
    print(", ".join(f"{k} {v}" for k, v in machine.items()) + f", numpy {np.__version__}, "
          f"main-process torch threads {torch.get_num_threads()}")
    print("delivered per batch: fp16 moments (B, 8, 32, 32) + int64 labels (B,); posterior "
          "sampling happens in the train step on the device (not timed here)")
    shard_dir, file_dir, info = prepare(args)
    same_content(shard_dir, file_dir, args.batch_size, args.seed)
    npy = sorted(file_dir.rglob("*.npy"))
    f1, b1, t1 = warm_page_cache(sorted(shard_dir.glob(fmt.SHARD_GLOB)))
    f2, b2, t2 = warm_page_cache(npy + [file_dir / "dataset.json"])
    print(f"warm page cache: shards {f1} files {b1 / 2**20:.0f} MiB in {t1:.2f}s; "
          f"per-file {f2} files {b2 / 2**20:.0f} MiB in {t2:.2f}s")

    results = measure(args, shard_dir, file_dir)
    print(f"\nN={args.num_samples}, batch {args.batch_size}, shard size {args.shard_size}, "
          f"median of {args.repeats} full epochs after 1 warm-up epoch, page cache warm")
    print_table(results)

    contended = None
    if args.contended:
        # Another job on the machine: a busy-looping process takes one of the cores.
        burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        BackgroundLoad.exclude.add(burner.pid)
        try:
            time.sleep(0.5)
            print(f"\nagain with a busy-loop process (pid {burner.pid}) taking one core:")
            contended = measure(args, shard_dir, file_dir)
        finally:
            burner.kill()
            burner.wait()
            BackgroundLoad.exclude.discard(burner.pid)
        print_table(contended)

    prof = None
    if args.profile:
        prof = [profile_batch(shard_dir, args.batch_size, t) for t in
                sorted({args.threads, 1}, reverse=True)]
        print(f"\nwhere one batch of {args.batch_size} goes (median microseconds):")
        for p in prof:
            print(f"  torch threads = {p['threads']} (other processes used "
                  f"{100 * p['background']:.0f}% of the machine meanwhile)")
            for k, v in p.items():
                if k not in ("threads", "background"):
                    print(f"    {k:<44} {v:8.0f} us  ({args.batch_size / v * 1e6:>10,.0f}/s)")

    if args.json:
        out = {"args": vars(args), "machine": machine, "data": info, "results": results,
               "contended": contended, "profile": prof}
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    if not args.keep:  # remove only what this script wrote, then the folder if it is empty
        work = Path(args.workdir)
        shutil.rmtree(shard_dir, ignore_errors=True)
        shutil.rmtree(work / "perfile", ignore_errors=True)
        (work / "bench-data.json").unlink(missing_ok=True)
        try:
            work.rmdir()
        except OSError:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())

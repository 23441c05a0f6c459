#!/usr/bin/env python
"""Encoding throughput of preprocessing/encode.py on CPU: the real SD-VAE architecture, random weights.

    python bench/bench_encode.py                    # M=32 images at 256 px, ~5 minutes on 2 cores
    python bench/bench_encode.py --max-images 16    # quicker

Builds a diffusers ``AutoencoderKL`` with the SD-VAE configuration (block_out_channels
(128, 256, 512, 512), layers_per_block 2, latent_channels 4, 4 DownEncoder/UpDecoder blocks,
norm_num_groups 32, scaling_factor 0.18215) and random weights, saves it with ``save_pretrained``
to a temporary directory (nothing is downloaded; the encoder's cost does not depend on the weight
values), then runs encode.py as a subprocess on the bundled ``digits`` source upscaled to 256 px:

  1. ``--vae none`` (pixel mode): the data path alone (decode, crop, batch, write shards);
  2. ``--vae DIR``, one process, ``--cpu-threads 1`` (encode.py's default);
  3. ``--vae DIR``, one process, ``--cpu-threads 2``;
  4. ``accelerate launch --multi_gpu --num_processes 2 ... --num-workers 1``: on a CPU-only
     machine that is two gloo processes, each pinned to one torch thread by --cpu-threads 1.

For each run it reports the subprocess wall time (python start, imports, VAE load and shard
writing included), the ``[rank R] encoded N images in Ts (X img/s)`` lines encode.py prints (the
encode loop only), and the shard sha256s, so that runs 2 and 4 can be checked bit-identical.
All runs use the same --shard-size (default M/4) so that two processes both get shards: encode.py
assigns whole shards to processes round-robin.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python bench/bench_encode.py` puts bench/ on the path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from bench._machine import BackgroundLoad, describe_machine
from common import cli_error

REPO = Path(__file__).resolve().parent.parent
ENCODE = REPO / "preprocessing" / "encode.py"
RANK_LINE = re.compile(r"\[rank (\d+)\] encoded (\d+) images in ([\d.]+)s \(([\d.]+) img/s\)")

SD_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2, "act_fn": "silu", "latent_channels": 4, "norm_num_groups": 32,
    "sample_size": 256, "scaling_factor": 0.18215,
}


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keep the module docstring's layout and show every flag's default."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=_HelpFormatter)
    p.add_argument("--max-images", type=int, default=32,
                   help="images per VAE run (M); about 4 s per image per core at 256 px")
    p.add_argument("--pixel-max-images", type=int, default=512,
                   help="images of the --vae none run (it is much faster)")
    p.add_argument("--batch-size", type=int, default=8, help="encode.py --batch-size (B)")
    p.add_argument("--shard-size", type=int, default=None,
                   help="encode.py --shard-size for every run (None: M/4 rounded down to a "
                        "multiple of B)")
    p.add_argument("--resolution", type=int, default=256, help="encode.py --resolution")
    p.add_argument("--workdir", default=None,
                   help="VAE weights and output shards (None: a fresh temp dir, deleted at the end)")
    p.add_argument("--skip", nargs="*", default=[], choices=["pixels", "vae1", "vae1t2", "vae2p"],
                   help="runs to leave out")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per subprocess")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    for name in ("max_images", "pixel_max_images", "batch_size", "resolution"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.shard_size is None:
        args.shard_size = max(args.batch_size, args.max_images // 4 // args.batch_size
                              * args.batch_size)
    return args


def make_vae(path: Path) -> int:
    """Save a random-weight SD-VAE-architecture AutoencoderKL to ``path``; return #parameters."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(**{k: tuple(v) if isinstance(v, list) else v
                           for k, v in SD_VAE_CONFIG.items()})
    vae.save_pretrained(path, safe_serialization=True)
    return sum(p.numel() for p in vae.parameters())


def run(name: str, cmd: list[str], dest: Path, timeout: float) -> dict[str, Any]:
    """Run one encode command; return wall time, the per-rank lines and the shard hashes."""
    shutil.rmtree(dest, ignore_errors=True)
    env = dict(os.environ, TQDM_DISABLE="1", PYTHONUNBUFFERED="1")
    print(f"\n[{name}] $ {' '.join(cmd)}", flush=True)
    bg = BackgroundLoad().start()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    background = bg.stop()
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        print(out[-4000:])
        sys.exit(cli_error("bench_encode.py", f"[{name}] exited with status {proc.returncode}"))
    ranks = {int(m[1]): {"images": int(m[2]), "seconds": float(m[3]), "img_s": float(m[4])}
             for m in RANK_LINE.finditer(out)}
    for line in out.splitlines():
        if RANK_LINE.search(line) or line.startswith("wrote "):
            print(f"  {line}")
    manifest = json.loads((dest / "manifest.json").read_text())
    images = manifest["count"]
    # Encode-loop throughput: all images over the slowest rank's loop time (ranks run at once).
    loop = max(r["seconds"] for r in ranks.values()) if ranks else float("nan")
    res = {"name": name, "cmd": cmd, "wall_s": wall, "images": images,
           "wall_img_s": images / wall, "ranks": ranks, "loop_img_s": images / loop,
           "sum_rank_img_s": sum(r["img_s"] for r in ranks.values()),
           "shard_sha256": [s["sha256"] for s in manifest["shards"]], "background": background}
    print(f"  wall {wall:.1f}s -> {res['wall_img_s']:.2f} img/s end to end; encode loop "
          f"{res['loop_img_s']:.2f} img/s; other processes used {100 * background:.0f}% of the "
          "machine meanwhile", flush=True)
    return res


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    own_tmp = args.workdir is None
    work = Path(tempfile.mkdtemp(prefix="bench_encode_") if own_tmp else args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    machine = describe_machine()
    print(", ".join(f"{k} {v}" for k, v in machine.items()) +
          f", cuda available: {torch.cuda.is_available()}")
    vae_dir = work / "sd-vae-random"
    t0 = time.perf_counter()
    n_params = make_vae(vae_dir)
    print(f"random-weight SD-VAE ({n_params / 1e6:.1f}M parameters) saved to {vae_dir} in "
          f"{time.perf_counter() - t0:.1f}s")

    py = sys.executable
    common = ["--source", "digits", "--resolution", str(args.resolution),
              "--batch-size", str(args.batch_size), "--shard-size", str(args.shard_size)]
    m = ["--max-images", str(args.max_images)]
    runs = {
        "pixels": ("pixels, 1 process (--vae none)",
                   [py, str(ENCODE)] + common + ["--vae", "none", "--max-images",
                                                 str(args.pixel_max_images)]),
        "vae1": ("SD-VAE, 1 process, --cpu-threads 1",
                 [py, str(ENCODE)] + common + m + ["--vae", str(vae_dir), "--cpu-threads", "1"]),
        "vae1t2": ("SD-VAE, 1 process, --cpu-threads 2",
                   [py, str(ENCODE)] + common + m + ["--vae", str(vae_dir), "--cpu-threads", "2"]),
        "vae2p": ("SD-VAE, 2 processes (accelerate, gloo), --cpu-threads 1 each",
                  ["accelerate", "launch", "--multi_gpu", "--num_processes", "2",
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   str(ENCODE)] + common + m + ["--vae", str(vae_dir), "--num-workers", "1"]),
    }
    results = []
    for key, (name, cmd) in runs.items():
        if key in args.skip:
            continue
        dest = work / f"out-{key}"
        results.append(run(name, cmd + ["--dest", str(dest)], dest, args.timeout) | {"key": key})
        shutil.rmtree(dest, ignore_errors=True)

    by = {r["key"]: r for r in results}
    print(f"\n{args.resolution}px digits, batch {args.batch_size}, shard size {args.shard_size}")
    head = (f"{'run':<60} {'images':>6} {'wall s':>7} {'img/s e2e':>9} {'img/s loop':>10} "
            f"{'bg':>4}")
    print(head + "\n" + "-" * len(head))
    for r in results:
        print(f"{r['name']:<60} {r['images']:>6} {r['wall_s']:>7.1f} {r['wall_img_s']:>9.2f} "
              f"{r['loop_img_s']:>10.2f} {100 * r['background']:>3.0f}%")
    print("e2e: images / subprocess wall time (start-up, imports, VAE load, shard writes "
          "included); loop: images /\nthe slowest rank's 'encoded ... in Ts' time; bg: share of "
          "the machine other processes used")
    if "vae1" in by and "vae2p" in by:
        same = by["vae1"]["shard_sha256"] == by["vae2p"]["shard_sha256"]
        print(f"shards of 1 process x 1 thread and 2 processes x 1 thread are "
              f"{'byte-identical' if same else 'DIFFERENT'}")
        print(f"2 processes / 1 process (encode loop): "
              f"{by['vae2p']['loop_img_s'] / by['vae1']['loop_img_s']:.2f}x")
    if "vae1" in by and "vae1t2" in by:
        same = by["vae1"]["shard_sha256"] == by["vae1t2"]["shard_sha256"]
        print(f"shards of --cpu-threads 1 and --cpu-threads 2 are "
              f"{'byte-identical' if same else 'different (expected: kernels round differently)'}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "machine": machine,
                                               "results": results}, indent=1) + "\n")
    if own_tmp:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

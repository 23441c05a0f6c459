#!/usr/bin/env python
"""Encode an image dataset into SD-VAE latents (or pixels) as safetensors shards + manifest.json.

    python preprocessing/encode.py --source digits --dest data/digits --resolution 8 --vae none
    accelerate launch preprocessing/encode.py --source /data/imagenet/train --dest data/in256 \\
        --vae stabilityai/sd-vae-ft-ema --hflip
    python preprocessing/encode.py verify data/in256

Shard i always holds the same samples (positions i*S..(i+1)*S-1 of a seeded permutation of the
source), encoded in the same batches, so any number of processes -- and any interruption followed
by a rerun -- gives byte-identical shards. Finished shards are recorded in DEST/.progress with
their sha256 and skipped on rerun; manifest.json is written last and marks completion.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # `python preprocessing/encode.py` puts preprocessing/ on the path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch

import runtime
from common import (PREEMPTED_EXIT, Preempted, Preemption, UsageError, WriteFailed,
                    atomic_write_json, check_shared_directory, cli_error, mix_seed,
                    sha256_file, with_default_command)
from preprocessing import shards as fmt
from preprocessing.sources import CroppedItems, SourceError, collate_list, open_source
from models.vae import encode_moments, load_vae

PROG = "encode.py"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"


COMMANDS = ("encode", "verify")


def build_parsers() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """``encode.py [encode] FLAGS`` (the default command) and ``encode.py verify DIR``: the
    top-level parser and the ``encode`` subparser (its errors show the encode usage)."""
    p = argparse.ArgumentParser(prog="encode.py", description=__doc__,
                                formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="command", metavar="{encode,verify}",
                           help="encode (default when omitted): write shards; verify: check them")
    enc = sub.add_parser("encode", help="encode a dataset into shards (default)",
                         formatter_class=argparse.RawTextHelpFormatter)
    _add_encode_flags(enc)
    v = sub.add_parser("verify", help="check every shard against manifest.json")
    v.add_argument("dest")
    v.add_argument("--no-hash", action="store_true", help="skip the sha256 check (faster)")
    return p, enc


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse a command line (``encode`` flags are checked here, beyond what argparse can)."""
    p, enc = build_parsers()
    args = p.parse_args(with_default_command(sys.argv[1:] if argv is None else argv, COMMANDS,
                                              "encode"))
    if args.command == "encode":
        _check_encode_flags(args, enc)
    return args


def _add_encode_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", default="digits",
                   help="'digits', an ImageNet-style class-folder tree, or a HF dataset saved to disk")
    p.add_argument("--source-type", default="auto", choices=["auto", "folder", "hf", "digits"])
    p.add_argument("--subset", choices=["train", "heldout"], default=None,
                   help="digits only: one side of a seeded, class-balanced split (docs/"
                        "ABLATIONS.md, held-out protocol): 'train' keeps --subset-size digits, "
                        "'heldout' the rest")
    p.add_argument("--subset-size", type=int, default=None,
                   help="digits in the training side of --subset")
    p.add_argument("--subset-seed", type=int, default=0, help="seeds the --subset split")
    p.add_argument("--dest", required=True, help="output shard directory")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--vae", default=DEFAULT_VAE,
                   help="diffusers AutoencoderKL: local dir or hub id in the local HF cache; "
                        "'none' stores pixels in [-1, 1]")
    p.add_argument("--store", default="moments", choices=["moments", "sample", "mean"],
                   help="posterior moments (re-sampled at every read), one fixed sample, or the mean")
    p.add_argument("--dtype", default="fp16", choices=list(DTYPES))
    p.add_argument("--hflip", action="store_true", help="also encode mirrored copies")
    p.add_argument("--store-images", action="store_true",
                   help="also keep the cropped uint8 pixels (needed by encoder losses such as REPA)")
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="image-decoding worker processes per encoding process")
    p.add_argument("--max-images", type=int, default=None,
                   help="encode only the first N images of the seeded permutation")
    p.add_argument("--seed", type=int, default=0,
                   help="seeds the storage order and --store sample noise")
    p.add_argument("--no-shuffle", dest="shuffle", action="store_false",
                   help="store samples in source order instead of a seeded permutation")
    p.add_argument("--latent-scale", type=float, default=None,
                   help="recorded scale (default: the VAE's scaling_factor, 1 for pixels)")
    p.add_argument("--latent-bias", type=float, default=0.0)
    p.add_argument("--image-column", default="image", help="HF dataset image column")
    p.add_argument("--label-column", default="label", help="HF dataset label column")
    p.add_argument("--split", default="train", help="HF DatasetDict split")
    p.add_argument("--cpu-threads", type=int, default=1,
                   help="torch threads per process when encoding on CPU. CPU kernels round "
                        "differently with different thread counts, so this is fixed (not "
                        "'all cores') to keep shards byte-identical for any process count; "
                        "use `accelerate launch --num_processes N` to use N cores")
    p.add_argument("--overwrite", action="store_true",
                   help="delete shards of a different configuration found in --dest")


def _check_encode_flags(args: argparse.Namespace, p: argparse.ArgumentParser) -> None:
    for name in ("resolution", "shard_size", "batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.max_images is not None and args.max_images < 1:
        p.error("--max-images must be >= 1")
    if args.cpu_threads < 1:
        p.error("--cpu-threads must be >= 1")
    if args.num_workers < 0:
        p.error("--num-workers must be >= 0")
    if (args.subset is None) != (args.subset_size is None):
        p.error("--subset and --subset-size go together")
    args.vae = None if args.vae.lower() == "none" else args.vae
    if args.vae is None and args.store != "moments":
        p.error("--store applies to VAE latents; with --vae none pixels are stored")


# ----------------------------------------------------------------------------------------------
# Destination: refuse foreign content, find finished shards.

def _config_diff(old: dict, new: dict) -> list[str]:
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k)]


def check_dest(dest: Path, config: dict, overwrite: bool, is_main: bool) -> dict | None:
    """Validate ``dest`` against ``config``; return the finished manifest if one matches.

    Every process runs the checks (so all refuse together, with :class:`UsageError`); only the
    main process deletes.
    """
    manifest_path = dest / fmt.MANIFEST
    cfg_path = dest / fmt.PROGRESS_DIR / "config.json"
    old = None
    if manifest_path.is_file():
        old = json.loads(manifest_path.read_text()).get("config")
    elif cfg_path.is_file():
        old = json.loads(cfg_path.read_text())
    has_shards = any(dest.glob(fmt.SHARD_GLOB)) if dest.is_dir() else False
    problem = None
    if old is not None and old != config:
        problem = ("holds shards of a different configuration (" +
                   "; ".join(_config_diff(old, config)) + ")")
    elif old is None and has_shards:
        problem = "holds shard files of unknown configuration (no manifest.json or .progress/)"
    if problem and not overwrite:
        raise UsageError(f"--dest {dest} {problem}; choose another --dest, or pass "
                         "--overwrite to delete those shards")
    if problem and is_main:
        for f in list(dest.glob(fmt.SHARD_GLOB)) + list(dest.glob(".shard-*")):
            f.unlink()
        for name in (fmt.MANIFEST, fmt.REPORT):
            (dest / name).unlink(missing_ok=True)
        shutil.rmtree(dest / fmt.PROGRESS_DIR, ignore_errors=True)
        print(f"--overwrite: removed the previous shards from {dest}", flush=True)
        return None
    if old == config and manifest_path.is_file():
        return json.loads(manifest_path.read_text())
    return None


def finished_record(dest: Path, shard: int, old_manifest: dict | None,
                    check_hash: bool = True) -> dict | None:
    """The record of ``shard`` if it is finished: from .progress/ or from a finished manifest of
    the same configuration, and (with ``check_hash``) its file still matches the sha256."""
    rec = None
    p = dest / fmt.PROGRESS_DIR / f"{fmt.shard_name(shard)}.json"
    if p.is_file():
        try:
            rec = json.loads(p.read_text())
        except json.JSONDecodeError:
            rec = None
    if rec is None and old_manifest is not None:
        rec = next((r for r in old_manifest["shard_records"] if r["shard"] == shard), None)
    path = dest / fmt.shard_name(shard)
    if rec is None or not path.is_file():
        return None
    if check_hash and sha256_file(path) != rec["sha256"]:
        return None
    return rec


# ----------------------------------------------------------------------------------------------
# Encoding.

def posterior_noise(seed: int, index: int, flip: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The --store sample noise of source item ``index`` (flip 0/1): independent of batching."""
    g = torch.Generator().manual_seed(mix_seed(seed, index, flip, 0xE5C0))
    return torch.randn(shape, generator=g)


def encode_batch(vae, arrs: list[np.ndarray], index: list[int], args, device) -> dict:
    """Encode one batch (and its mirror) -> tensors in storage layout, on the CPU."""
    pix = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).contiguous()  # uint8 NCHW
    out = {}
    if args.store_images:
        out["images"] = pix
    views = [(0, pix)] + ([(1, pix.flip(-1))] if args.hflip else [])
    for flip, p in views:
        x = p.to(device=device, dtype=torch.float32) / 127.5 - 1.0
        name = "" if flip == 0 else "_flip"
        if vae is None:
            out["latents" + name] = x.cpu()
            continue
        mean, std = encode_moments(vae, x)
        mean, std = mean.float().cpu(), std.float().cpu()
        if args.store == "moments":
            out["moments" + name] = torch.cat([mean, std], dim=1)
        elif args.store == "mean":
            out["latents" + name] = mean
        else:
            shape = tuple(mean.shape[1:])
            eps = torch.stack([posterior_noise(args.seed, i, flip, shape) for i in index])
            out["latents" + name] = mean + std * eps
    return out


def write_one_shard(dest: Path, shard: int, parts: list[dict], labels: list[int],
                    index: list[int], failures: list[dict], upsampled: int, key: str,
                    dtype: torch.dtype, sample_shape: tuple, config_sha: str, args) -> dict:
    """Assemble a shard from its batches, write it atomically, then its progress record."""
    def cat(name: str, shape: tuple, dt: torch.dtype) -> torch.Tensor:
        got = [p[name] for p in parts if name in p]
        return torch.cat(got) if got else torch.empty((0,) + shape, dtype=dt)

    tensors = {key: cat(key, sample_shape, dtype).to(dtype),
               "labels": torch.tensor(labels, dtype=torch.int64),
               "index": torch.tensor(index, dtype=torch.int64)}
    if args.hflip:
        tensors[key + "_flip"] = cat(key + "_flip", sample_shape, dtype).to(dtype)
    if args.store_images:
        tensors["images"] = cat("images", (3, args.resolution, args.resolution), torch.uint8)
    sha = fmt.write_shard(dest / fmt.shard_name(shard), tensors,
                          metadata={"format_version": str(fmt.FORMAT_VERSION),
                                    "shard": str(shard), "config_sha256": config_sha})
    # Channel statistics of the latents z (posterior samples for moments), from stored values.
    v = tensors[key].double()
    if key == "moments":
        mean, std = v.chunk(2, dim=1)
        s1, s2 = mean.sum((0, 2, 3)), (mean ** 2 + std ** 2).sum((0, 2, 3))
    else:
        s1, s2 = v.sum((0, 2, 3)), (v ** 2).sum((0, 2, 3))
    rec = {"shard": shard, "file": fmt.shard_name(shard), "count": len(labels), "sha256": sha,
           "failed": failures, "upsampled": upsampled,
           "stats": {"n": int(v.shape[0] * v.shape[2] * v.shape[3]), "sum": s1.tolist(),
                     "sumsq": s2.tolist()}}
    atomic_write_json(dest / fmt.PROGRESS_DIR / f"{fmt.shard_name(shard)}.json", rec)
    return rec


def _versions() -> dict:
    out = {"torch": torch.__version__}
    try:
        import importlib.metadata as md
        out["diffusers"] = md.version("diffusers")
    except Exception:  # noqa: BLE001
        pass
    return out


# ----------------------------------------------------------------------------------------------
# The steps of an encode run, in order: inputs and settings, destination, plan, shards, manifest.

@dataclass(frozen=True)
class Layout:
    """What one stored sample is: the tensor name and the latent channels and size."""

    key: str              # "moments" (mean then std, 2C channels) or "latents" (C channels)
    channels: int
    hw: tuple[int, int]

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return (2 * self.channels if self.key == "moments" else self.channels,) + self.hw


def open_inputs(args: argparse.Namespace, state) -> tuple:
    """The source and the VAE (None for pixels, with its identity); a source or VAE the user
    must fix raises :class:`UsageError` in every process."""
    try:
        subset = None if args.subset is None else {
            "subset": args.subset, "subset_size": args.subset_size,
            "subset_seed": args.subset_seed}
        source = open_source(args.source, args.source_type, args.resolution, subset,
                             image_column=args.image_column, label_column=args.label_column,
                             split=args.split)
        vae, vae_ident = None, None
        if args.vae is not None:
            with state.main_process_first():
                vae, vae_ident = load_vae(args.vae, state.device)
    except (SourceError, FileNotFoundError, ImportError) as e:
        raise UsageError(str(e)) from None
    return source, vae, vae_ident


def resolve_settings(args: argparse.Namespace, source, vae_ident: dict | None
                     ) -> tuple[Layout, dict]:
    """The stored layout and the configuration recorded in (and required of) ``--dest``."""
    if vae_ident is None:
        key, channels, down, default_scale = "latents", 3, 1, 1.0
    else:
        key = "moments" if args.store == "moments" else "latents"
        channels, down = vae_ident["latent_channels"], vae_ident["downsample"]
        default_scale = vae_ident["scaling_factor"]
        if args.resolution % down:
            raise UsageError(f"--resolution {args.resolution} is not a multiple of the VAE's "
                             f"downsampling factor {down}")
    layout = Layout(key, channels, (args.resolution // down, args.resolution // down))
    config = {
        "format_version": fmt.FORMAT_VERSION, "source": source.describe(),
        "resolution": args.resolution, "crop": "adm",
        "vae": None if vae_ident is None else {"vae": vae_ident["vae"],
                                                "revision": vae_ident["revision"]},
        "store": "pixels" if vae_ident is None else args.store, "dtype": args.dtype,
        "hflip": args.hflip, "store_images": args.store_images, "shard_size": args.shard_size,
        "max_images": args.max_images, "seed": args.seed, "shuffle": args.shuffle,
        "latent_scale": default_scale if args.latent_scale is None else args.latent_scale,
        "latent_bias": args.latent_bias,
    }
    return layout, config


def prepare_dest(dest: Path, config: dict, overwrite: bool, state) -> dict | None:
    """Check ``dest`` (:func:`check_dest`), then, in the main process, make .progress/, remove
    the temp files of a killed run and record the configuration. Returns the finished manifest
    of the same configuration, if there is one."""
    is_main = state.is_main_process
    if is_main:
        print("encode config:\n" + json.dumps(config, indent=1, sort_keys=True), flush=True)
    old_manifest = check_dest(dest, config, overwrite, is_main)
    if is_main:
        (dest / fmt.PROGRESS_DIR).mkdir(parents=True, exist_ok=True)
        for stale in dest.glob(".shard-*.tmp-*"):  # debris of a killed run
            stale.unlink(missing_ok=True)
        if old_manifest is None:
            atomic_write_json(dest / fmt.PROGRESS_DIR / "config.json", config)
    state.wait_for_everyone()
    return old_manifest


def plan_shards(args: argparse.Namespace, num_items: int, dest: Path,
                old_manifest: dict | None, state) -> tuple[int, np.ndarray, list[tuple]]:
    """Which source items go to which shard, identical in every process: the shard count, the
    items this process encodes (its unfinished shards, concatenated) and the batches, each
    ``(shard, positions into those items, last batch of the shard?)``."""
    order = (np.random.default_rng(args.seed).permutation(num_items) if args.shuffle
             else np.arange(num_items))
    if args.max_images is not None:
        order = order[:args.max_images]
    num_shards = math.ceil(len(order) / args.shard_size)
    shard_items = [order[s * args.shard_size:(s + 1) * args.shard_size]
                   for s in range(num_shards)]
    mine = [s for s in range(num_shards) if s % state.num_processes == state.process_index]
    todo = [s for s in mine if finished_record(dest, s, old_manifest) is None]

    positions = (np.concatenate([shard_items[s] for s in todo]) if todo
                 else np.empty(0, dtype=np.int64))
    batches = []
    k = 0
    for s in todo:
        n = len(shard_items[s])
        for a in range(0, n, args.batch_size):
            b = min(a + args.batch_size, n)
            batches.append((s, list(range(k + a, k + b)), b == n))
        k += n
    print(f"[rank {state.process_index}/{state.num_processes}] {len(mine) - len(todo)} of "
          f"{len(mine)} shards already finished, encoding {len(todo)} ({len(positions)} images)",
          flush=True)
    return num_shards, positions, batches


def encode_shards(args: argparse.Namespace, source, vae, layout: Layout, config_sha: str,
                  dest: Path, positions: np.ndarray, batches: list[tuple], state) -> int:
    """Decode, encode and write this process's shards, each as soon as its last batch is done;
    returns the number of shards (re-)encoded by all processes together."""
    from tqdm import tqdm

    loader = torch.utils.data.DataLoader(
        CroppedItems(source, positions, args.resolution), batch_sampler=[b for _, b, _ in batches],
        num_workers=args.num_workers if len(batches) else 0, collate_fn=collate_list,
        persistent_workers=False)
    bar = tqdm(total=len(positions), unit="img",
               disable=not state.is_main_process or not len(positions), dynamic_ncols=True,
               desc=f"encode (rank 0 of {state.num_processes})")
    dtype = DTYPES[args.dtype]
    cur, written = None, 0
    t0 = time.time()
    # the bar is closed before an error is printed, so the message starts its own line
    with bar, Preemption() as preemption:
        for (s, _, last), items in zip(batches, loader):
            if cur is None:
                cur = {"parts": [], "labels": [], "index": [], "failed": [], "upsampled": 0}
            good = [(k, a, small) for k, a, small, err in items if a is not None]
            for k, a, small, err in items:
                if err is not None:
                    i = int(positions[k])
                    cur["failed"].append({"index": i, "name": source.name(i), "error": err})
            if good:
                idx = [int(positions[k]) for k, _, _ in good]
                cur["parts"].append(encode_batch(vae, [a for _, a, _ in good], idx, args,
                                                 state.device))
                cur["labels"] += [source.label(i) for i in idx]
                cur["index"] += idx
                cur["upsampled"] += sum(small for _, _, small in good)
            bar.update(len(items))
            if last:
                write_one_shard(dest, s, cur["parts"], cur["labels"], cur["index"],
                                cur["failed"], cur["upsampled"], layout.key, dtype,
                                layout.sample_shape, config_sha, args)
                cur, written = None, written + 1
                bar.set_postfix(shard=s)
                if preemption.requested:  # this shard is saved; a rerun encodes the rest
                    raise Preempted(f"stopped by {preemption.signal} after shard {s}; rerun "
                                    "the same command to continue")
    if len(positions):
        dt = time.time() - t0
        print(f"[rank {state.process_index}] encoded {len(positions)} images in {dt:.1f}s "
              f"({len(positions) / max(dt, 1e-9):.1f} img/s)", flush=True)
    from accelerate.utils import gather_object
    encoded_now = sum(gather_object([written]))
    state.wait_for_everyone()
    return encoded_now


def finish(args: argparse.Namespace, dest: Path, num_shards: int, encoded_now: int,
           old_manifest: dict | None, config: dict, config_sha: str, source, layout: Layout,
           vae_ident: dict | None) -> int:
    """Main process: manifest.json and report.json from the shard records, then the summary.

    The manifest is rebuilt from the records every time; the bytes are deterministic, so a rerun
    of a finished directory rewrites the same file."""
    records = []
    for s in range(num_shards):
        rec = finished_record(dest, s, old_manifest, check_hash=False)
        if rec is None:  # a failed run rather than a bad command line: exit status 1
            cli_error(PROG, f"shard {s} did not finish; rerun the command")
            return 1
        records.append(rec)
    manifest, report = build_manifest(config, config_sha, source, records, layout.key,
                                      layout.channels, layout.hw, args, vae_ident)
    atomic_write_json(dest / fmt.REPORT, report)
    atomic_write_json(dest / fmt.MANIFEST, manifest)
    shutil.rmtree(dest / fmt.PROGRESS_DIR, ignore_errors=True)
    if manifest == old_manifest and encoded_now == 0:
        print(f"{dest} is already complete ({manifest['count']} samples); nothing to do")
    elif manifest == old_manifest:
        print(f"{dest}: re-encoded {encoded_now} missing or damaged shard(s); the directory "
              f"is complete again ({manifest['count']} samples, same bytes as before)")
    else:
        summarize(manifest, report, dest)
    if manifest["count"] == 0:  # everything was written, nothing was readable: exit status 1
        cli_error(PROG, "no image could be encoded; see report.json")
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "verify":
        return verify(args)
    from accelerate import PartialState

    # On a machine without CUDA, accelerate only forms a multi-process (gloo) group with cpu=True.
    state = PartialState(cpu=not torch.cuda.is_available())
    runtime.configure_reproducible(state.device, args.cpu_threads)
    dest = Path(args.dest)
    try:
        check_shared_directory(dest, state, "--dest")
        source, vae, vae_ident = open_inputs(args, state)
        layout, config = resolve_settings(args, source, vae_ident)
        old_manifest = prepare_dest(dest, config, args.overwrite, state)
    except UsageError as e:  # every process reports it, as every process found it
        return cli_error(PROG, e)
    config_sha = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
    num_shards, positions, batches = plan_shards(args, len(source), dest, old_manifest, state)
    try:
        encoded_now = encode_shards(args, source, vae, layout, config_sha, dest, positions,
                                    batches, state)
        if not state.is_main_process:
            return 0
        return finish(args, dest, num_shards, encoded_now, old_manifest, config, config_sha,
                      source, layout, vae_ident)
    except WriteFailed as e:  # a full disk: finished shards stay; the rerun does the rest
        return cli_error(PROG, e)
    except Preempted as e:
        print(f"{PROG}: {e}", file=sys.stderr, flush=True)
        return PREEMPTED_EXIT


def build_manifest(config: dict, config_sha: str, source, records: list[dict], key: str,
             channels: int, hw: tuple[int, int], args, vae_ident: dict | None) -> tuple[dict, dict]:
    """Manifest and report from the per-shard records (in shard order: deterministic)."""
    n = sum(r["count"] for r in records)
    elems = sum(r["stats"]["n"] for r in records)
    s1 = np.sum([r["stats"]["sum"] for r in records], axis=0)
    s2 = np.sum([r["stats"]["sumsq"] for r in records], axis=0)
    ch_mean = s1 / max(elems, 1)
    ch_std = np.sqrt(np.maximum(s2 / max(elems, 1) - ch_mean ** 2, 0.0))
    notes = source.notes()
    failed = [f for r in records for f in r["failed"]]
    manifest = {
        "format_version": fmt.FORMAT_VERSION,
        "source": config["source"],
        "resolution": args.resolution,
        "crop": "adm",
        "vae": vae_ident,
        "store": config["store"],
        "dtype": args.dtype,
        "key": key,
        "latent": {"channels": channels, "height": hw[0], "width": hw[1],
                   "scale": config["latent_scale"], "bias": config["latent_bias"],
                   "channel_mean": ch_mean.tolist(), "channel_std": ch_std.tolist()},
        "count": n,
        "num_classes": len(source.class_names),
        "class_names": source.class_names,
        "class_to_idx": {c: i for i, c in enumerate(source.class_names)},
        "hflip": args.hflip,
        "images": args.store_images,
        "shards": [{"file": r["file"], "count": r["count"], "sha256": r["sha256"]}
                   for r in records],
        "num_failed": len(failed),
        "num_upsampled": sum(r["upsampled"] for r in records),
        "num_skipped_files": len(notes["skipped_files"]),
        "empty_classes": notes["empty_classes"],
        "config": config,
        "config_sha256": config_sha,
        "shard_records": [{k: r[k] for k in ("shard", "file", "count", "sha256")} |
                          {"failed": r["failed"], "upsampled": r["upsampled"], "stats": r["stats"]}
                          for r in records],
        "created_with": _versions(),
    }
    report = {"failed": failed, "skipped_files": notes["skipped_files"],
              "empty_classes": notes["empty_classes"],
              "num_upsampled": manifest["num_upsampled"]}
    return manifest, report


def summarize(manifest: dict, report: dict, dest: Path) -> None:
    lat = manifest["latent"]
    print(f"wrote {manifest['count']} samples in {len(manifest['shards'])} shards to {dest} "
          f"({manifest['key']} {lat['channels']}x{lat['height']}x{lat['width']}, "
          f"{manifest['num_classes']} classes)")
    if report["failed"]:
        print(f"WARNING: {len(report['failed'])} unreadable images were skipped "
              f"(listed in {dest / fmt.REPORT}), e.g.:")
        for f in report["failed"][:5]:
            print(f"  {f['name']}: {f['error']}")
    if report["skipped_files"]:
        print(f"note: {len(report['skipped_files'])} non-image files ignored "
              f"(listed in {fmt.REPORT}), e.g. {report['skipped_files'][:3]}")
    if report["empty_classes"]:
        print(f"WARNING: {len(report['empty_classes'])} class folders hold no images "
              f"(they keep their class index): {report['empty_classes'][:10]}")
    if report["num_upsampled"]:
        print(f"note: {report['num_upsampled']} images were smaller than the resolution "
              "and were upsampled")


def verify(args: argparse.Namespace) -> int:
    """``encode.py verify DIR``: 0 when every shard matches the manifest, else 1."""
    problems = fmt.verify(args.dest, check_hashes=not args.no_hash)
    if problems:
        print(f"{args.dest}: {len(problems)} problem(s)")
        for line in problems:
            print(f"  {line}")
        return 1
    m = fmt.read_manifest(args.dest)
    print(f"{args.dest}: OK ({m['count']} samples, {len(m['shards'])} shards, "
          f"{'hashes checked' if not args.no_hash else 'hashes not checked'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Sample a trained SiT into an ADM-format ``samples.npz`` (plus a JSON sidecar).

Launch with plain ``python``, ``torchrun --nproc_per_node N`` or ``accelerate launch``, on CPU or
GPU; the output bytes do not depend on the launcher, the number of processes or the batch size::

    torchrun --nproc_per_node 8 generate.py --ckpt RUN_DIR --mode sde --num-steps 250 \\
        --cfg-scale 1.8 --guidance-high 0.7 --num-fid-samples 50000 --sample-dir samples/run

Checkpoint contract (what ``--ckpt`` may point to)
--------------------------------------------------
- a run directory holding ``ema.safetensors`` (the EMA SiT state dict) and ``config.json``;
- that ``ema.safetensors`` directly (``config.json`` is read from its directory when present);
- a Hub model folder (``config.json`` + ``model.safetensors``: export.py or ``train.py
  --push-to-hub`` writes it), or the Hub id ``ORG/NAME`` of one, read from the local HF cache only
  (fetch it first with ``hf download ORG/NAME``; a local path of that name wins); the samples
  are those of the run directory;
- a REPA/SiT-style ``.pt`` file (loaded with ``weights_only=True``; 'ema' entry preferred) or any
  ``.safetensors`` state dict; without a ``config.json`` next to it, the model comes from the flags
  (``--model``, ``--resolution``, ``--vae``, ``--num-classes``, ``--qk-norm``, ...; REPA defaults).

``config.json`` keys (at least)::

    {"model": "SiT-B/2",            # a models.sit.SiT_models name
     "input_size": 32,              # latent (or pixel) side length the model sees
     "in_channels": 4,
     "num_classes": 1000,           # null label = num_classes
     "model_kwargs": {...},         # optional extra SiT kwargs (qk_norm, z_dims, hidden_size, ...)
     "vae": "stabilityai/sd-vae-ft-ema",   # hub id in the local HF cache, a local dir, or null
     "latent_scale": 0.18215, "latent_bias": 0.0,   # z = latent * scale + bias (floats or lists)
     "path_type": "linear"}

``vae: null`` means pixel space: the sampled tensor is the image in [-1, 1]. ``--model`` given
explicitly and different from the config's name discards the config's size overrides
(depth/hidden_size/num_heads/patch_size in model_kwargs).

Determinism
-----------
Sample i (global index) uses ``samplers`` per-sample seeding with (global_seed, i), so its noise
never depends on the batch or the rank. Labels for all N samples are computed identically on every
rank from numpy Generators seeded with ``samplers.sample_seed(global_seed, 0, stream)``:

- ``random`` (stream 2): ``rng.integers(0, C, N)``.
- ``equal`` (stream 3): every class gets N // C samples; the N mod C remaining samples go one each
  to the first N mod C classes of ``rng.permutation(C)``; the label list (class-sorted) is then
  shuffled with ``rng.permutation`` (same generator). With N divisible by C each class has
  exactly N / C samples.

Resuming
--------
Finished batches are written atomically to ``SAMPLE_DIR/parts/START-END.npz`` (images uint8 and
labels for global indices [START, END)). ``parts/run.json`` records everything the samples depend
on; a rerun with the same settings skips the indices already covered by parts (whatever batch
size or process count wrote them) and a rerun with different settings is refused. When all parts
exist, rank 0 writes ``samples.npz`` (``arr_0`` uint8 (N, H, W, 3) in index order, FIRST array;
``arr_1`` int64 labels), deterministic zip bytes, atomically, and ``samples.json``.

Pixels: ``clamp(127.5 x + 128, 0, 255)`` truncated to uint8 (``samplers.images_to_uint8``).
Errors the user can fix (checkpoint/model mismatch, missing VAE, unknown model, ...) exit with
status 2 and a message, no traceback.
"""
from __future__ import annotations

import argparse
import io
import json
import re
import sys
import zipfile
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # `python generate.py` from elsewhere: the repository's modules
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (PREEMPTED_EXIT, Preempted, Preemption, UsageError,  # noqa: E402
                    atomic_write_bytes, atomic_write_json, check_shared_directory, cli_error,
                    sha256_file)

PART_RE = re.compile(r"^(\d+)-(\d+)\.npz$")
MODES = ("ode", "sde", "meanflow")


# ----------------------------------------------------------------------------------------------
# Arguments and the run's configuration.

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode_pos", nargs="?", metavar="ODE|SDE|MEANFLOW", type=str.lower,
                   help="sampler (same as --mode)")
    p.add_argument("--ckpt", required=True,
                   help="run dir, ema.safetensors, a Hub model folder or ORG/NAME in the local "
                        "HF cache, or a .pt/.safetensors")
    p.add_argument("--model", default=None, help="SiT size (default: config.json's, else SiT-XL/2)")
    p.add_argument("--mode", type=str.lower, choices=MODES, default=None,
                   help="sampler (default ode); meanflow: k steps of a MeanFlow model (--num-steps "
                        "1 is one-step generation), no CFG (guidance is trained in)")
    p.add_argument("--num-steps", type=int, default=50)
    p.add_argument("--heun", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--cfg-scale", type=float, default=1.0)
    p.add_argument("--guidance-low", type=float, default=0.0)
    p.add_argument("--guidance-high", type=float, default=1.0)
    p.add_argument("--path-type", choices=["linear", "cosine"], default=None,
                   help="default: the run's (config.json), else linear")
    p.add_argument("--num-fid-samples", type=int, default=50_000)
    p.add_argument("--per-proc-batch-size", type=int, default=32)
    p.add_argument("--label-sampling", choices=["random", "equal"], default="random")
    p.add_argument("--global-seed", type=int, default=0)
    p.add_argument("--precision", choices=["fp32", "tf32", "bf16"], default=None,
                   help="default fp32 (tf32 when REPA's --tf32 is given)")
    p.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=None,
                   help="REPA compatibility: --tf32 means --precision tf32")
    p.add_argument("--vae", default=None,
                   help="VAE: 'ema'/'mse' (SD-VAE ft from the local HF cache), a hub id, a local "
                        "dir, or 'none' for pixel space (default: the run's)")
    p.add_argument("--sample-dir", default="samples")
    p.add_argument("--save-png", action="store_true", help="also write SAMPLE_DIR/png/IIIIII.png")
    p.add_argument("--num-classes", type=int, default=None, help="default: the run's, else 1000")
    p.add_argument("--resolution", type=int, default=None,
                   help="image size, used only without config.json (default 256)")
    # REPA flags accepted for command-line compatibility.
    p.add_argument("--encoder-depth", type=int, default=None)
    p.add_argument("--projector-embed-dims", type=str, default=None)
    p.add_argument("--qk-norm", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--use-projector", action="store_true",
                   help="StableVM: the checkpoint holds projectors (built from "
                        "--projector-embed-dims, or inferred); they are not run at sampling")
    p.add_argument("--use-irepa", action="store_true",
                   help="StableVM/iREPA: the checkpoint's projectors are convolutions")
    p.add_argument("--fused-attn", action=argparse.BooleanOptionalAction, default=None,
                   help="ignored (SDPA is always used)")
    p.add_argument("--local-rank", "--local_rank", type=int, default=-1, help="ignored")
    args, unknown = p.parse_known_args(argv)
    if unknown:  # before the positional: `--bogus 1` must blame --bogus, not the mode
        p.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.mode_pos is not None and args.mode_pos not in MODES:
        p.error(f"argument ODE|SDE|MEANFLOW: invalid choice: {args.mode_pos!r} (choose from "
                f"{', '.join(MODES)})")
    if args.mode and args.mode_pos and args.mode != args.mode_pos:
        p.error(f"--mode {args.mode} contradicts the positional {args.mode_pos.upper()}")
    args.mode = args.mode or args.mode_pos or "ode"
    if args.mode == "meanflow" and (args.cfg_scale != 1.0 or args.heun):
        p.error("--mode meanflow takes no --cfg-scale or --heun: a MeanFlow model's guidance is "
                "set at training (--cfg-omega / --cfg-kappa)")
    if args.precision is None:
        args.precision = "tf32" if args.tf32 else "fp32"
    for name in ("num_steps", "num_fid_samples", "per_proc_batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.global_seed < 0:
        p.error("--global-seed must be >= 0")
    if args.cfg_scale < 0:  # 1 = no guidance, 0 = the unconditional model; below 0 is meaningless
        p.error(f"--cfg-scale must be >= 0 (1 = no guidance), got {args.cfg_scale}")
    if not 0.0 <= args.guidance_low <= args.guidance_high <= 1.0:
        p.error(f"need 0 <= --guidance-low <= --guidance-high <= 1, got "
                f"[{args.guidance_low}, {args.guidance_high}]")
    return args


# ----------------------------------------------------------------------------------------------
# Parts and npz bytes.

def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """An uncompressed .npz like np.savez, but with fixed zip timestamps: same arrays, same
    bytes."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, arr in arrays.items():
            info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_STORED
            info.external_attr = 0o644 << 16
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def scan_parts(parts_dir: Path, n: int) -> list[tuple[int, int]]:
    """Ranges [start, end) of finished, readable part files within [0, n)."""
    done = []
    if not parts_dir.is_dir():
        return done
    for f in sorted(parts_dir.iterdir()):
        m = PART_RE.match(f.name)
        if not m:
            continue
        s, e = int(m.group(1)), int(m.group(2))
        if not 0 <= s < e <= n:
            continue
        try:
            with np.load(f) as z:
                if z["images"].shape[0] != e - s or z["labels"].shape[0] != e - s:
                    continue
        except Exception:
            continue
        done.append((s, e))
    return done


def pending_chunks(n: int, done: list[tuple[int, int]], batch: int) -> list[tuple[int, int]]:
    """Contiguous runs of indices not covered by ``done``, cut into chunks of at most ``batch``."""
    covered = np.zeros(n, dtype=bool)
    for s, e in done:
        covered[s:e] = True
    chunks, i = [], 0
    while i < n:
        if covered[i]:
            i += 1
            continue
        j = i
        while j < n and not covered[j] and j - i < batch:
            j += 1
        chunks.append((i, j))
        i = j
    return chunks


def run_spec(args, run: dict, ckpt_sha: str) -> dict:
    """Everything the sample bytes depend on (parts/run.json and the samples.json sidecar)."""
    import torch
    return {"checkpoint": str(Path(run["weights"]).resolve()), "checkpoint_sha256": ckpt_sha,
            "model": run["model"], "model_size": run["size"], "model_kwargs": run["model_kwargs"],
            "input_size": run["input_size"], "in_channels": run["in_channels"],
            "num_classes": run["num_classes"], "vae": run["vae"],
            "latent_scale": run["latent_scale"], "latent_bias": run["latent_bias"],
            "mode": args.mode, "num_steps": args.num_steps, "heun": args.heun,
            "cfg_scale": args.cfg_scale, "guidance_low": args.guidance_low,
            "guidance_high": args.guidance_high, "path_type": run["path_type"],
            "global_seed": args.global_seed, "label_sampling": args.label_sampling,
            "precision": args.precision, "num_fid_samples": args.num_fid_samples,
            "torch_version": torch.__version__}


# ----------------------------------------------------------------------------------------------
# Main.

def _broadcast(obj, state):
    if state.num_processes == 1:
        return obj
    import torch.distributed as dist
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def load_for_sampling(args: argparse.Namespace, device) -> tuple[object, dict, object, object]:
    """(model, run, vae, vae_ident): the trained model (:func:`training.load_run`) and the VAE
    its samples are decoded with (None for pixel-space runs)."""
    from models.vae import WeightsNotFound, load_vae
    from training import load_run
    model, run = load_run(args.ckpt, device, model=args.model, vae=args.vae,
                          resolution=args.resolution, num_classes=args.num_classes,
                          qk_norm=args.qk_norm, encoder_depth=args.encoder_depth,
                          projector_embed_dims=args.projector_embed_dims,
                          use_irepa=args.use_irepa, path_type=args.path_type)
    if args.mode == "meanflow" and not model.meanflow:
        raise UsageError(f"--mode meanflow needs a model trained with --loss-type meanflow; "
                         f"{run['weights']} holds an instantaneous-velocity model (use --mode ode "
                         f"or sde)")
    if run["vae"] is None:
        return model, run, None, None
    try:
        vae, vae_ident = load_vae(run["vae"], device)
    except WeightsNotFound as e:
        raise UsageError(f"missing VAE: {e}") from None
    except ImportError as e:
        raise UsageError(str(e)) from None
    return model, run, vae, vae_ident


def plan_parts(args: argparse.Namespace, run: dict, sample_dir: Path, state
               ) -> tuple[list[tuple[int, int]], dict]:
    """Rank 0 checks that SAMPLE_DIR belongs to this run and lists the finished parts; every rank
    gets the same list (scanning on every rank would race with early writers) and the spec."""
    parts_dir = sample_dir / "parts"
    msg = None
    if state.is_main_process:
        spec = run_spec(args, run, sha256_file(run["weights"]))
        parts_dir.mkdir(parents=True, exist_ok=True)
        spec_path = parts_dir / "run.json"
        err = None
        if spec_path.is_file():
            old = json.loads(spec_path.read_text())
            diff = sorted(k for k in set(old) | set(spec)
                          if k != "torch_version" and old.get(k) != spec.get(k))
            if diff:
                err = (f"{sample_dir} holds parts of a different run (differs in: "
                       f"{', '.join(diff)}); use another --sample-dir or delete {parts_dir}")
        else:
            atomic_write_json(spec_path, spec)
        msg = (err, [] if err else scan_parts(parts_dir, args.num_fid_samples), spec)
    err, done, spec = _broadcast(msg, state)
    if err:
        raise UsageError(err)
    return done, spec


def sample_parts(args: argparse.Namespace, model, run: dict, vae, labels: np.ndarray,
                 chunks: list[tuple[int, int]], parts_dir: Path, device, is_main: bool) -> None:
    """Sample this process's chunks and write each as an atomic part file."""
    import torch
    from tqdm.auto import tqdm

    import runtime
    from samplers import latents_to_uint8, sample
    autocast = runtime.autocast(device, "bf16" if args.precision == "bf16" else "no")
    shape_one = (run["in_channels"], run["input_size"], run["input_size"])
    bar = tqdm(total=sum(e - s for s, e in chunks), disable=not is_main, desc="sampling")
    with bar, Preemption() as preemption:
        for s, e in chunks:
            y = torch.from_numpy(labels[s:e]).to(device)
            with autocast:
                z = sample(model, (e - s, *shape_one), args.mode, num_steps=args.num_steps, y=y,
                           seed=args.global_seed, indices=range(s, e), cfg_scale=args.cfg_scale,
                           guidance_low=args.guidance_low, guidance_high=args.guidance_high,
                           heun=args.heun, path_type=run["path_type"])
                arr = latents_to_uint8(z, vae, run["latent_scale"], run["latent_bias"]).numpy()
            atomic_write_bytes(parts_dir / f"{s:07d}-{e:07d}.npz",
                               npz_bytes({"images": arr, "labels": labels[s:e]}))
            bar.update(e - s)
            if preemption.requested:  # this batch is saved; a rerun samples the rest
                raise Preempted(f"stopped by {preemption.signal} after samples [{s}, {e}); "
                                "rerun the same command to continue")


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    from accelerate import PartialState

    import runtime
    from samplers import make_labels
    state = PartialState(cpu=not torch.cuda.is_available())
    device, rank, world = state.device, state.process_index, state.num_processes
    runtime.configure(device, allow_tf32=args.precision == "tf32")
    n, sample_dir = args.num_fid_samples, Path(args.sample_dir)
    check_shared_directory(sample_dir, state, "--sample-dir")
    model, run, vae, vae_ident = load_for_sampling(args, device)
    done, spec = plan_parts(args, run, sample_dir, state)
    labels = make_labels(n, run["num_classes"], args.label_sampling, args.global_seed)
    chunks = pending_chunks(n, done, args.per_proc_batch_size)
    if state.is_main_process:
        n_done = sum(e - s for s, e in done)
        print(f"generate: {run['model']} {args.mode} steps={args.num_steps} cfg={args.cfg_scale} "
              f"[{args.guidance_low}, {args.guidance_high}] N={n} processes={world} "
              f"device={device} precision={args.precision}; {n_done} samples already done, "
              f"{n - n_done} to go", flush=True)
    sample_parts(args, model, run, vae, labels, chunks[rank::world], sample_dir / "parts",
                 device, state.is_main_process)
    state.wait_for_everyone()
    if state.is_main_process:
        write_samples_npz(sample_dir, sample_dir / "parts", n, labels, spec, args, vae_ident)
    state.wait_for_everyone()
    return 0


def write_samples_npz(sample_dir: Path, parts_dir: Path, n: int, labels: np.ndarray, spec: dict,
                      args: argparse.Namespace, vae_ident) -> None:
    """Join the finished parts into samples.npz (ADM layout) and its sidecar samples.json."""
    images = None
    covered = np.zeros(n, dtype=bool)
    for s, e in scan_parts(parts_dir, n):
        with np.load(parts_dir / f"{s:07d}-{e:07d}.npz") as z:
            part, lab = z["images"], z["labels"]
        if images is None:
            images = np.zeros((n, *part.shape[1:]), dtype=np.uint8)
        if not np.array_equal(lab, labels[s:e]):
            raise UsageError(f"part {s}-{e} has labels that do not match this run")
        images[s:e] = part
        covered[s:e] = True
    if images is None or not covered.all():
        missing = int((~covered).sum())
        raise UsageError(f"{missing} samples have no finished part in {parts_dir}; rerun")
    out = sample_dir / "samples.npz"
    atomic_write_bytes(out, npz_bytes({"arr_0": images, "arr_1": labels.astype(np.int64)}))
    side = dict(spec, file="samples.npz", samples_sha256=None, image_shape=list(images.shape),
                vae_ident=vae_ident, sampler_args={"per_proc_batch_size_last":
                                                   args.per_proc_batch_size})
    side["samples_sha256"] = sha256_file(out)
    atomic_write_json(sample_dir / "samples.json", side)
    if args.save_png:
        from PIL import Image
        png = sample_dir / "png"
        png.mkdir(exist_ok=True)
        for i in range(n):
            Image.fromarray(images[i]).save(png / f"{i:06d}.png")
    print(f"wrote {out} ({n} images {images.shape[1]}x{images.shape[2]}) and samples.json",
          flush=True)


def cli(argv=None) -> int:
    try:
        return main(argv)
    except UsageError as e:
        return cli_error("generate.py", e)
    except Preempted as e:
        print(f"generate.py: {e}", file=sys.stderr, flush=True)
        return PREEMPTED_EXIT


if __name__ == "__main__":
    sys.exit(cli())

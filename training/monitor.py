"""Watching a run: the console and trackers, the metrics log (log.jsonl), the divergence guard,
sample grids and online evaluation of the EMA model. Each piece is built from the objects it reads
and writes, never from the whole run.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn as nn

from common import UsageError, atomic_write_bytes, atomic_write_text
from configs import TrainingConfig

class Console:
    """Prints on the main process and keeps a copy in RUN_DIR/log.txt (as DiT/REPA's logger).

    Lines said before the run directory may be written (checks still running) are buffered and
    written by :meth:`attach`.
    """

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.path: Path | None = None
        self.pending: list[str] = []

    def __call__(self, msg: str) -> None:
        if not self.enabled:
            return
        print(msg, flush=True)
        if self.path is None:
            self.pending.append(msg)
        else:
            with open(self.path, "a") as f:
                f.write(msg + "\n")

    def attach(self, path: Path) -> None:
        if not self.enabled:
            return
        self.path = path
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        with open(path, "a") as f:
            f.write(f"---- {stamp} train.py {' '.join(sys.argv[1:])}\n")
            f.writelines(m + "\n" for m in self.pending)
        self.pending = []


def tracker_name(report_to: str) -> str | None:
    """Resolve --report-to to an accelerate tracker name, with a clear message when missing."""
    import importlib.util
    if report_to == "none":
        return None
    has_tb = any(importlib.util.find_spec(m) for m in ("tensorboard", "tensorboardX"))
    if report_to == "auto":
        return "tensorboard" if has_tb else None
    if report_to == "tensorboard" and not has_tb:
        raise UsageError("--report-to tensorboard needs the tensorboard package: "
                         "pip install tensorboard (or use --report-to none)")
    if report_to == "wandb" and importlib.util.find_spec("wandb") is None:
        raise UsageError("--report-to wandb needs the wandb package: pip install wandb "
                         "(or use --report-to tensorboard / none)")
    return report_to


def start_trackers(accelerator, cfg: TrainingConfig, run_dir: Path) -> None:
    """Open the tracker (files under RUN_DIR/logs, wandb's too) with the flat config."""
    tracker = tracker_name(cfg.report_to)
    if tracker is None:
        return
    flat = {k: (v if isinstance(v, (int, float, str, bool)) else str(v))
            for k, v in cfg.to_dict().items()}
    init_kwargs = {}
    if tracker == "wandb":
        import wandb
        if os.environ.get("WANDB_KEY"):
            wandb.login(key=os.environ["WANDB_KEY"])
        log_dir = run_dir / cfg.logging_dir
        if accelerator.is_main_process:
            log_dir.mkdir(parents=True, exist_ok=True)
        # dir: wandb writes its files (offline runs included) in the run dir, not the cwd
        init_kwargs = {"wandb": {"entity": os.environ.get("WANDB_ENTITY"), "name": cfg.exp_name,
                                 "dir": str(log_dir)}}
    project = os.environ.get("WANDB_PROJECT", cfg.exp_name) if tracker == "wandb" else cfg.exp_name
    accelerator.init_trackers(project, config=flat, init_kwargs=init_kwargs)


def log_image(accelerator, tag: str, image: np.ndarray, step: int) -> None:
    """Send one uint8 (H, W, 3) image to every open tracker (tensorboard, wandb)."""
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({tag: image[None]}, step, dataformats="NHWC")
        elif tracker.name == "wandb":
            tracker.log_images({tag: [image]}, step)


def write_grid(images: torch.Tensor, path: Path, min_cell: int = 48, pad: int = 2) -> np.ndarray:
    """uint8 (N, H, W, 3) -> one PNG grid, cells upscaled (nearest) to at least ``min_cell`` px
    and separated by ``pad`` grey pixels; written atomically. Returns the grid (H, W, 3)."""
    import io

    from PIL import Image
    n, h, w, _ = images.shape
    up = max(1, min_cell // max(h, w))
    cells = images.permute(0, 3, 1, 2).repeat_interleave(up, 2).repeat_interleave(up, 3)
    ch, cw = h * up, w * up
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = torch.full((3, rows * (ch + pad) + pad, cols * (cw + pad) + pad), 128, dtype=torch.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        y, x = pad + r * (ch + pad), pad + c * (cw + pad)
        grid[:, y:y + ch, x:x + cw] = cells[i]
    array = grid.permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
    return array


def memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def forwards_per_image(cfg: TrainingConfig) -> float:
    """Forward-pass equivalents of one training image, for MFU (2 FLOP per MAC on top): forward +
    backward = 3; MeanFlow adds its JVP (primal + tangent = 2) and, with guidance, 2 more forwards
    (the unconditional and conditional u at r = t). The contrastive baseline runs two views of
    every image (6)."""
    if cfg.loss_type != "meanflow":
        return 6.0 if cfg.contrastive != "none" else 3.0
    guided = cfg.cfg_omega != 1.0 or cfg.cfg_kappa != 0.0
    return 3.0 + 2.0 + (2.0 if guided else 0.0)


class MetricsLog:
    """Sums the loss terms on the device between log points; :meth:`write` is the only host sync
    of the loop. Writes log.jsonl (main process), the trackers and the progress bar.

    ``images_per_step``: the global batch; ``flops_per_image``: training FLOP of one image (for
    MFU, with ``peak_flops`` per process; None: no MFU); ``epoch``: the data loader's epoch now."""

    def __init__(self, accelerator, log_path: Path, bar, *, images_per_step: int,
                 flops_per_image: float, peak_flops: float | None,
                 scaler: torch.amp.GradScaler, epoch: Callable[[], int]):
        self.accelerator, self.log_path, self.bar = accelerator, log_path, bar
        self.images_per_step, self.flops_per_image, self.peak = (images_per_step,
                                                                 flops_per_image, peak_flops)
        self.scaler, self.epoch = scaler, epoch
        self.device = accelerator.device
        self.skipped = torch.zeros((), device=self.device)
        self.last: dict = {}
        self.restart()

    def restart(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.steps = 0
        self.t0 = time.perf_counter()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent inside (checkpoints, evaluations) does not count as training time."""
        t = time.perf_counter()
        try:
            yield
        finally:
            self.t0 += time.perf_counter() - t

    def add(self, terms: dict[str, torch.Tensor], nonfinite: torch.Tensor) -> None:
        """``nonfinite``: the step's flag from :meth:`DivergenceGuard.update` (fp16 skips it)."""
        for k, v in terms.items():
            self.sums[k] = self.sums.get(k, 0) + v
        self.skipped += nonfinite
        self.steps += 1

    def state_dict(self) -> dict:
        """The open window (this process's sums since the last log point) and the skip count,
        so that a run resumed from a checkpoint between log points logs the same numbers."""
        return {"steps": self.steps, "skipped": int(self.skipped.item()),
                "sums": {k: [float(v), str(v.dtype).removeprefix("torch.")]
                         for k, v in self.sums.items()}}

    def load_state_dict(self, state: dict | None) -> None:
        if not state:  # a fresh run, or a checkpoint that saved no window
            return
        self.steps = int(state["steps"])
        self.skipped.fill_(int(state["skipped"]))
        self.sums = {k: torch.tensor(v, dtype=getattr(torch, dtype), device=self.device)
                     for k, (v, dtype) in state["sums"].items()}

    def write(self, step: int, lr: float) -> dict:
        """Reduce the window over processes, write one log.jsonl line, start a new window."""
        acc = self.accelerator
        names = sorted(self.sums)
        vals = torch.stack([self.sums[k] for k in names]) / self.steps
        vals = acc.reduce(vals, reduction="mean")
        img_s = self.steps * self.images_per_step / (time.perf_counter() - self.t0)
        rec = {"step": step, **{k: float(v) for k, v in zip(names, vals.tolist())},
               "lr": lr, "img_per_s": img_s, "epoch": self.epoch(),
               "skipped_steps": int(acc.reduce(self.skipped, "sum").item()),
               "memory_mb": memory_mb(self.device)}
        if self.scaler.is_enabled():
            rec["loss_scale"] = self.scaler.get_scale()
        if self.peak:
            rec["mfu"] = self.flops_per_image * img_s / acc.num_processes / self.peak
        rec = json_safe(rec)
        if acc.is_main_process:
            with open(self.log_path, "a") as fh:
                fh.write(json.dumps(rec, allow_nan=False) + "\n")
            shown = rec.get("mf", rec["loss"])  # MeanFlow's adaptive loss sits near 1: show L
            self.bar.set_postfix(loss=f"{shown}", lr=f"{lr:.2e}", img_s=f"{img_s:.0f}")
        acc.log({k: v for k, v in rec.items() if k != "step" and v is not None}, step=step)
        self.last = rec
        self.restart()
        return rec


def truncate_logs(run_dir: Path, step: int) -> None:
    """Keep log.jsonl and eval.jsonl true to a resumed history: drop lines after ``step``."""
    for log_path in (run_dir / "log.jsonl", run_dir / "eval.jsonl"):
        if log_path.is_file():
            kept = [ln for ln in log_path.read_text().splitlines()
                    if ln.strip() and json.loads(ln).get("step", 0) <= step]
            atomic_write_text(log_path, "".join(ln + "\n" for ln in kept))


class Diverged(Exception):
    """The run produced non-finite values; it stopped before saving any of them."""


class DivergenceGuard:
    """Non-finite losses, gradients or weights, found without a host sync per step: device
    counters are updated every step and read, by every process at once, only at log, sample and
    checkpoint points (which sync anyway), and always before a checkpoint or EMA export.

    Without a gradient scaler a non-finite step has already corrupted the weights: the run stops.
    With fp16's scaler a skipped step is normal (the scale halves), but ``max_skips`` skips in a
    row mean the run has diverged. ``weights``: the parameters (model and EMA) checked before a
    save; ``latest_checkpoint``: where the message tells the user to resume from.
    """

    def __init__(self, accelerator, step: int, *, weights: list[torch.Tensor],
                 scaler_enabled: bool, max_skips: int,
                 latest_checkpoint: Callable[[], tuple[int, Path] | None]):
        dev = accelerator.device
        self.accelerator, self.weights, self.scaler_enabled = accelerator, weights, scaler_enabled
        self.max_skips, self.latest_checkpoint = max_skips, latest_checkpoint
        self.step = torch.full((), step, dtype=torch.long, device=dev)  # device copy of the step
        self.first_bad = torch.full((), -1, dtype=torch.long, device=dev)
        self.streak = torch.zeros((), dtype=torch.long, device=dev)  # fp16 skips in a row, now
        self.longest = torch.zeros((), dtype=torch.long, device=dev)

    def update(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        """After each optimizer step: a few scalar kernels, no sync. Returns the step's
        non-finite flag (0-d, 0 or 1)."""
        self.step += 1
        bad = ~(torch.isfinite(terms["loss"]) & torch.isfinite(terms["grad_norm"]))
        if self.scaler_enabled:
            self.streak = (self.streak + 1) * bad
            self.longest = torch.maximum(self.longest, self.streak)
        else:
            self.first_bad = torch.where((self.first_bad < 0) & bad, self.step, self.first_bad)
        return bad.float()

    def check(self, step: int, weights: bool = False) -> None:
        """Raise :class:`Diverged` on every process if any process saw a non-finite step (or,
        with ``weights``, holds non-finite weights or EMA)."""
        acc = self.accelerator
        bad_weights = torch.zeros((), dtype=torch.long, device=acc.device)
        if weights:
            finite = torch.stack([torch.isfinite(p).all() for p in self.weights]).all()
            bad_weights = (~finite).long()
        mine = torch.stack([self.first_bad, self.longest, bad_weights])
        first_bad, longest, bad_weights = acc.gather(mine[None]).reshape(-1, 3).T
        what = []
        if (first_bad >= 0).any():
            what.append(f"a non-finite loss or gradient at step "
                        f"{int(first_bad[first_bad >= 0].min())}")
        if (longest >= self.max_skips).any():
            what.append(f"{int(longest.max())} consecutive fp16 steps skipped for non-finite "
                        f"gradients (limit --max-consecutive-skips {self.max_skips})")
        if bad_weights.any():
            what.append("non-finite weights")
        if what:
            raise Diverged(self._message(step, what) if acc.is_main_process else "")

    def _message(self, step: int, what: list[str]) -> str:
        done = self.latest_checkpoint()
        last = (f"the last good checkpoint is {done[1]} (step {done[0]})" if done
                else "no checkpoint had been written yet")
        return (f"training diverged: {'; '.join(what)}. Stopped at step {step}; nothing "
                f"non-finite was saved, {last}. Lower --learning-rate or use --max-grad-norm, "
                f"then continue with --resume latest.")


def json_safe(record: dict) -> dict:
    """Non-finite floats as null: log.jsonl stays strict JSON."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in record.items()}


class Previewer:
    """uint8 images from the EMA model for grids and online evaluation: sample i starts from the
    noise of (seed, i); MeanFlow models take ``num_steps`` MeanFlow steps (no sampling CFG),
    others the Euler ODE. Latents are decoded with the run's VAE, loaded on first use; without
    it (weights missing) :meth:`images` says why once and returns None."""

    def __init__(self, model: nn.Module, latent_shape: tuple, *, mode: str, seed: int,
                 path_type: str, vae: str | None, latent_scale, latent_bias,
                 device: torch.device, say: Callable[[str], None]):
        self.model, self.latent_shape, self.mode, self.seed = model, latent_shape, mode, seed
        self.path_type, self.vae_name, self.say = path_type, vae, say
        self.scale, self.bias, self.device = latent_scale, latent_bias, device
        self.vae, self.unavailable = None, None

    def _decoder_ready(self) -> bool:
        if self.vae_name is None or self.vae is not None:
            return True
        if self.unavailable is None:
            from models.vae import WeightsNotFound, load_vae
            try:
                self.vae, _ = load_vae(self.vae_name, self.device)
                return True
            except (WeightsNotFound, ImportError) as e:
                self.unavailable = str(e)
                self.say(f"sample grids and online evaluation skipped: {e}")
        return False

    def images(self, labels: torch.Tensor, num_steps: int, cfg_scale: float
               ) -> torch.Tensor | None:
        """uint8 (N, H, W, 3) for ``labels``, or None when the VAE is unavailable."""
        from samplers import latents_to_uint8, sample
        if not self._decoder_ready():
            return None
        z = sample(self.model, (labels.shape[0], *self.latent_shape), self.mode,
                         num_steps=num_steps, y=labels, seed=self.seed, cfg_scale=cfg_scale,
                         path_type=self.path_type)
        return latents_to_uint8(z, self.vae, self.scale, self.bias)


class SampleGrid:
    """samples/step-N.png from the EMA model (eval mode, fixed noise and labels), also sent to
    the trackers, on the main process."""

    def __init__(self, preview: Previewer, accelerator, out_dir: Path, labels: torch.Tensor, *,
                 num_steps: int, cfg_scale: float):
        self.preview, self.accelerator, self.out_dir = preview, accelerator, out_dir
        self.labels, self.num_steps, self.cfg_scale = labels, num_steps, cfg_scale

    def __call__(self, step: int) -> None:
        out_path = self.out_dir / f"step-{step:07d}.png"
        if not self.accelerator.is_main_process or out_path.is_file():  # e.g. a finished rerun
            return
        images = self.preview.images(self.labels, self.num_steps, self.cfg_scale)
        if images is None:
            return
        self.out_dir.mkdir(exist_ok=True)
        grid = write_grid(images, out_path)
        log_image(self.accelerator, "samples", grid, step)


class OnlineEval:
    """Every ``every`` steps: sample the EMA model (eval mode, fixed noise, ``labels``) and log a
    distribution metric to eval.jsonl and the trackers, on the main process. ``metric`` maps
    (uint8 images, labels) to a dict of numbers; ``headline`` names the ones printed. It draws no
    random number of the training streams, so exact resume is unchanged."""

    def __init__(self, preview: Previewer, accelerator, log_path: Path, say: Callable, *,
                 every: int, labels: torch.Tensor, num_steps: int, cfg_scale: float,
                 metric: Callable[[np.ndarray, np.ndarray], dict], headline: tuple[str, ...]):
        self.preview, self.accelerator, self.log_path, self.say = (preview, accelerator,
                                                                    log_path, say)
        self.every, self.labels = every, labels
        self.num_steps, self.cfg_scale = num_steps, cfg_scale
        self.metric, self.headline = metric, headline

    def __call__(self, step: int) -> None:
        if not self.every or step % self.every or not self.accelerator.is_main_process:
            return
        images = self.preview.images(self.labels, self.num_steps, self.cfg_scale)
        if images is None:
            return
        metrics = self.metric(images.numpy(), self.labels.cpu().numpy())
        rec = json_safe({"step": step, **{k: float(v) for k, v in metrics.items()
                                          if isinstance(v, (int, float))}})
        with open(self.log_path, "a") as fh:
            fh.write(json.dumps(rec, allow_nan=False) + "\n")
        self.accelerator.log({f"eval/{k}": v for k, v in rec.items()
                              if k != "step" and v is not None}, step=step)
        self.say(f"eval step {step} ({len(self.labels)} samples, {self.num_steps} steps, cfg "
                 f"{self.cfg_scale:g}): " + ", ".join(f"{k} {rec.get(k)}" for k in self.headline))

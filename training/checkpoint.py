"""Checkpoints of a run: find, verify, check settings, load, save atomically, prune.

``checkpoints/step-N/`` holds accelerate's state (model, optimizer, RNG), ``ema.safetensors``,
``rank-R.json`` (step, data position, grad scaler, open metrics window) and ``bank-R.safetensors``
(StableVM); ``checksums.json`` is written last, so a directory without it is not a checkpoint. A
checkpoint is written under a temporary name and renamed; ``RUN_DIR/ema.safetensors`` is the EMA
export generate.py samples from.
"""
from __future__ import annotations

import errno
import json
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from common import (UsageError, WriteFailed, atomic_write_text, save_safetensors_atomic,
                    sha256_file)

CKPT_RE = re.compile(r"^step-(\d{7,})$")
CHECKSUMS = "checksums.json"  # written last: a checkpoint without it is not complete

# What a resume may change. FIXED_KEYS fix the model, the data stream or the random streams (the
# checkpoint's state depends on them): never. FREE_KEYS are bookkeeping, not the run's maths:
# freely (config.json still records the change). Everything else changes the objective, data or
# optimizer: refused unless --allow-config-change.
FIXED_KEYS = frozenset({
    "model", "depth", "hidden_size", "num_heads", "qk_norm", "num_classes", "path_type",
    "loss_type", "bank_capacity_per_class", "enc_type", "use_proj_loss", "projector_type",
    "projector_dim", "projector_kernel_size", "encoder_depth", "use_irepa", "batch_size",
    "gradient_accumulation_steps", "seed", "hflip", "latent_norm", "mixed_precision",
    "resolution"})
FREE_KEYS = frozenset({
    "output_dir", "exp_name", "resume", "resume_step", "ckpt", "dry_run", "max_train_steps",
    "epochs", "checkpointing_steps", "checkpoints_total_limit", "log_every", "report_to",
    "logging_dir", "wandb", "sampling_steps", "sample_num_steps", "sample_cfg_scale",
    "num_sample_images", "eval_every", "eval_samples", "eval_num_steps", "eval_cfg_scale",
    "eval_reference", "inception", "vae", "peak_tflops", "num_workers", "compile",
    "verify_shards", "encoder_weights_dir", "allow_config_change", "max_consecutive_skips",
    "preemption_check_every",
    "fused_attn", "legacy", "allow_tf32", "push_to_hub", "hub_model_id"})


def list_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (renamed from their temporary name, checksums written), oldest
    first."""
    if not ckpt_dir.is_dir():
        return []
    out = []
    for p in ckpt_dir.iterdir():
        m = CKPT_RE.match(p.name)
        if m and p.is_dir() and (p / CHECKSUMS).is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def resume_candidates(spec: str | None, resume_step: int, ckpt_dir: Path) -> list[Path]:
    """Checkpoints to try for --resume (latest | step number | path) or REPA's --resume-step:
    for ``latest`` every complete one, newest first (a damaged one falls back to the previous);
    a named one alone."""
    if not spec and resume_step:
        spec = str(resume_step)
    if not spec:
        return []
    found = list_checkpoints(ckpt_dir)
    if spec == "latest":
        return [p for _, p in reversed(found)]  # nothing yet: start fresh
    if spec.isdigit():
        for step, p in found:
            if step == int(spec):
                return [p]
        raise UsageError(f"no complete checkpoint of step {spec} in {ckpt_dir} (have: "
                         f"{[s for s, _ in found] or 'none'})")
    p = Path(spec)
    if not (p / CHECKSUMS).is_file():
        raise UsageError(f"{p} is not a complete checkpoint directory (no {CHECKSUMS})")
    return [p]


def checkpoint_problem(path: Path, world: int) -> str | None:
    """Why the checkpoint at ``path`` cannot be resumed by ``world`` processes (None: intact)."""
    try:
        record = json.loads((path / CHECKSUMS).read_text())
        files = record["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{CHECKSUMS} is unreadable ({e})"
    if record.get("world_size") != world:  # each process resumes its own data position and bank
        raise UsageError(f"{path} was written by {record.get('world_size')} process(es); resume "
                         f"it with the same number (now {world})")
    for name, digest in sorted(files.items()):
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if sha256_file(f) != digest:
            return f"{name} does not match its checksum"
    return None


def settings_changes(old: dict, new: dict) -> dict[str, tuple]:
    """{field: (old, new)} of the training settings that differ."""
    return {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
            if k != "history" and old.get(k) != new.get(k)}


def check_resume_settings(old_config: dict, cfg, *, data_sha: str | None, data_count: int,
                          input_size: int, run_dir: Path) -> dict[str, tuple]:
    """The settings that changed since the run's config.json; refuses what a resume cannot
    honour (``cfg``: the new :class:`configs.TrainingConfig`; ``data_*``: the shards now)."""
    changes = settings_changes(old_config.get("train", {}), cfg.to_dict())
    data_old = old_config.get("data", {})
    same_data = data_old.get("config_sha256") == data_sha and data_old.get("count") == data_count
    if same_data:
        changes.pop("data_dir", None)  # the same shards, moved: nothing changes
    fixed = {k: v for k, v in changes.items() if k in FIXED_KEYS}
    if not same_data and old_config.get("input_size") != input_size:
        fixed["data (latent size)"] = (old_config.get("input_size"), input_size)
    if fixed:
        raise UsageError(f"cannot resume {run_dir}: these settings fix the model, the "
                         "data stream or the random streams and cannot change:\n  "
                         + "\n  ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in fixed.items()))
    guarded = {k: v for k, v in changes.items() if k not in FREE_KEYS}
    if not same_data:
        guarded.setdefault("data_dir", (data_old.get("dir"), str(cfg.data_dir)))
    if guarded and not cfg.allow_config_change:
        raise UsageError(f"cannot resume {run_dir} with changed settings (they would "
                         "change the objective, the data or the optimizer):\n  "
                         + "\n  ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in guarded.items())
                         + "\npass --allow-config-change to continue with them anyway "
                           "(config.json then records from which step they hold)")
    return changes


def sampling_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The EMA weights generate.py needs (projectors are training-only)."""
    return {k: v for k, v in model.state_dict().items() if not k.startswith("projectors.")}


def export_step(path: Path) -> int | None:
    """The step an EMA export was written at (its metadata); None: missing or unreadable."""
    from safetensors import safe_open
    try:
        with safe_open(str(path), "pt") as f:
            return int((f.metadata() or {})["step"])
    except (OSError, ValueError, KeyError, RuntimeError):
        return None


def as_os_error(e: BaseException) -> OSError | None:
    """``e`` as the OSError of a failed write, or None when it is something else. torch.save and
    safetensors wrap the operating system's error in their own exception types."""
    if isinstance(e, OSError):
        return e
    text = str(e)
    m = re.search(r"os error (\d+)", text)
    if m:
        return OSError(int(m.group(1)), os.strerror(int(m.group(1))))
    if "failed writing" in text.lower() or "i/o error" in text.lower():
        return OSError(errno.EIO, text.splitlines()[0])
    return None


class Checkpointer:
    """Saves and loads exactly the objects it is given (as EDM2's checkpoint I/O does): the
    accelerator's prepared model and optimizer (and RNG states), the data loader's position, the
    EMA model, the grad scaler and the optional StableVM bank, under ``run_dir/checkpoints``."""

    def __init__(self, run_dir: Path, accelerator, *, loader, ema: nn.Module,
                 scaler: torch.amp.GradScaler, bank=None, keep: int = 0):
        self.run_dir, self.dir, self.accelerator = run_dir, run_dir / "checkpoints", accelerator
        self.loader, self.ema, self.scaler, self.bank, self.keep = loader, ema, scaler, bank, keep
        self.rank, self.world = accelerator.process_index, accelerator.num_processes
        self.is_main = accelerator.is_main_process

    def choose(self, spec: str | None, resume_step: int, strict: bool
               ) -> tuple[Path | None, list[tuple[Path, str]]]:
        """The intact checkpoint to resume for ``--resume spec`` (None: start fresh) and the
        damaged ones skipped on the way; ``strict``: a damaged named checkpoint is an error."""
        candidates = resume_candidates(spec, resume_step, self.dir)
        if not candidates and list_checkpoints(self.dir):
            raise UsageError(f"{self.run_dir} already has checkpoints; pass --resume latest to "
                             "continue it or choose another --exp-name / --output-dir")
        skipped = []
        for path in candidates:
            problem = checkpoint_problem(path, self.world)
            if problem is None:
                return path, skipped
            if len(candidates) == 1 and strict:
                raise UsageError(f"{path} is damaged: {problem}")
            skipped.append((path, problem))
        if candidates:
            raise UsageError("no intact checkpoint to resume: " + "; ".join(
                f"{p.name}: {why}" for p, why in skipped))
        return None, skipped

    def load(self, path: Path) -> tuple[int, dict | None]:
        """Load a verified checkpoint into memory (model, optimizer, RNG, EMA, scaler, bank, data
        position); returns its step and the metrics window it saved. A checkpoint that does not
        fit this run is a clear error."""
        from safetensors.torch import load_file
        mine = json.loads((path / f"rank-{self.rank}.json").read_text())
        try:
            self.loader.load_state_dict(mine["loader"])
            self.accelerator.load_state(str(path))
            self.ema.load_state_dict(load_file(path / "ema.safetensors"))  # copies onto the device
            if mine.get("scaler"):
                self.scaler.load_state_dict(mine["scaler"])
            if self.bank is not None:
                self.bank.load_state_dict(load_file(path / f"bank-{self.rank}.safetensors"))
        except (ValueError, RuntimeError, KeyError, pickle.UnpicklingError) as e:
            # another batch, shape or dataset; or a pickle that weights_only refuses to run
            raise UsageError(f"{path} does not fit this run: {str(e).splitlines()[0]}") from None
        return int(mine["step"]), mine.get("log_window")

    @staticmethod
    def set_aside(skipped: list[tuple[Path, str]]) -> None:
        """Move damaged checkpoints out of the way of a new step-N, kept for inspection."""
        for path, _ in skipped:
            aside = path.with_name(f".damaged-{path.name}")
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(path, aside)

    def has(self, step: int) -> bool:
        return (self.dir / f"step-{step:07d}" / CHECKSUMS).is_file()

    def latest(self) -> tuple[int, Path] | None:
        """(step, path) of the newest complete checkpoint, None before the first."""
        done = list_checkpoints(self.dir)
        return done[-1] if done else None

    def save(self, step: int, log_window: dict | None = None) -> None:
        """Write checkpoints/step-N (temp dir, checksums last, rename), export the EMA, keep the
        last K. The caller has checked that the state is finite. ``log_window``: the metrics'
        open window (:meth:`training.monitor.MetricsLog.state_dict`), restored on resume.

        A write that fails on any process (disk full, file-size limit, I/O error) removes the
        temporary directory and raises :class:`common.WriteFailed` on every process; the earlier
        checkpoints stay intact (pruning happens only after the new one is complete)."""
        final, tmp = self.dir / f"step-{step:07d}", self.dir / f".tmp-step-{step:07d}"
        needed = self._needed_bytes()
        if self.is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
            for stale in self.dir.glob(".tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
        self._all_or_none(lambda: self._write_state(tmp, step, log_window), tmp, needed)
        self._all_or_none(lambda: self._complete(tmp, final, step) if self.is_main else None,
                          tmp, needed)
        self._all_or_none(lambda: self.export_ema(step) if self.is_main else None, tmp, needed)
        if self.is_main:
            self._prune()
        self.accelerator.wait_for_everyone()

    def _write_state(self, tmp: Path, step: int, log_window: dict | None) -> None:
        """Every process writes its part of the checkpoint into ``tmp``."""
        if self.is_main:
            tmp.mkdir()
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(str(tmp))
        state = {"step": step, "loader": self.loader.state_dict(),
                 "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
                 "log_window": log_window}
        atomic_write_text(tmp / f"rank-{self.rank}.json", json.dumps(state))
        if self.bank is not None:
            save_safetensors_atomic(self.bank.state_dict(), tmp / f"bank-{self.rank}.safetensors")
        if self.is_main:
            save_safetensors_atomic(self.ema.state_dict(), tmp / "ema.safetensors")

    def _complete(self, tmp: Path, final: Path, step: int) -> None:
        """Checksums last, then the rename that makes the checkpoint exist (main process)."""
        self._write_checksums(tmp, step)
        if final.exists():  # an incomplete leftover (no checksums) of an interrupted run
            shutil.rmtree(final)
        os.replace(tmp, final)

    def _all_or_none(self, write: Callable[[], None], tmp: Path, needed: int) -> None:
        """Run ``write`` on every process, then agree: if it failed anywhere, remove ``tmp`` and
        raise the failure everywhere (no process is left waiting for another)."""
        from accelerate.utils import gather_object
        problem = None
        try:
            write()
        except WriteFailed as e:
            problem = str(e)
        except Exception as e:  # torch.save / safetensors inside accelerate's save_state
            os_error = as_os_error(e)
            if os_error is None:
                raise
            problem = str(WriteFailed(tmp, needed, os_error))
        problems = [p for p in (gather_object([problem]) if self.world > 1 else [problem]) if p]
        if problems:
            if self.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            self.accelerator.wait_for_everyone()
            raise UsageError(problems[0])

    def _needed_bytes(self) -> int:
        """The size of a checkpoint: the latest one's, or before the first, model + EMA + two
        Adam moments (four times the EMA weights) and the bank."""
        latest = self.latest()
        if latest is not None:
            return sum(f.stat().st_size for f in latest[1].rglob("*") if f.is_file())
        ema = sum(t.numel() * t.element_size() for t in self.ema.state_dict().values())
        bank = 0 if self.bank is None else sum(t.numel() * t.element_size()
                                               for t in self.bank.state_dict().values())
        return 4 * ema + bank

    def export_ema(self, step: int) -> None:
        """RUN_DIR/ema.safetensors: the EMA weights generate.py samples, tagged with ``step``."""
        save_safetensors_atomic(sampling_state_dict(self.ema), self.run_dir / "ema.safetensors",
                                metadata={"step": str(step)}, checksum=True)

    def exported_step(self) -> int | None:
        """The step of RUN_DIR/ema.safetensors (None: missing or unreadable)."""
        return export_step(self.run_dir / "ema.safetensors")

    def _write_checksums(self, tmp: Path, step: int) -> None:
        files = {str(f.relative_to(tmp)): sha256_file(f) for f in sorted(tmp.rglob("*"))
                 if f.is_file()}
        record = {"step": step, "world_size": self.world, "files": files}
        atomic_write_text(tmp / CHECKSUMS, json.dumps(record, indent=1) + "\n")

    def _prune(self) -> None:
        old = list_checkpoints(self.dir)
        for _, p in (old[:-self.keep] if self.keep > 0 else []):
            doomed = p.with_name(".tmp-delete-" + p.name)
            os.replace(p, doomed)  # a half-deleted checkpoint never looks finished
            shutil.rmtree(doomed, ignore_errors=True)

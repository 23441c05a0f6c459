"""Run one of the repository's scripts with a fault injected from outside (tests only).

    python tests/fault.py kill-after-save-state STEP -- train.py ARGS...
        SIGKILL the process right after accelerate wrote checkpoints/.tmp-step-STEP, i.e. with
        a half-written checkpoint (the rank files, EMA and rename still to come).
    python tests/fault.py kill-before-ema-export STEP -- train.py ARGS...
        SIGKILL the process after checkpoints/step-STEP is complete and renamed, just before
        run_dir/ema.safetensors (the sampling export) is replaced by step STEP's EMA.
    python tests/fault.py signal-after-save-state SIG:STEP[:RANK] -- train.py ARGS...
        send signal SIG (TERM, USR1) to the process itself right after accelerate wrote
        checkpoints/.tmp-step-STEP (inside the checkpoint write); with RANK, only on that rank.
    python tests/fault.py slow-parts SECONDS -- generate.py ARGS...
        sleep SECONDS after each finished part file, so a test can kill generation between parts.

The product code has no test hooks: the faults are patched into the library functions the scripts
call (accelerate's ``Accelerator.save_state``, ``common.atomic_write_bytes`` and
``common.save_safetensors_atomic``), then the script runs
as ``__main__``. Works under ``torchrun`` too (each process patches itself).
"""
from __future__ import annotations

import os
import runpy
import signal
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def kill_after_save_state(step: int) -> None:
    from accelerate import Accelerator
    save_state = Accelerator.save_state

    def patched(self, output_dir=None, *args, **kwargs):
        out = save_state(self, output_dir, *args, **kwargs)
        if output_dir is not None and Path(output_dir).name.endswith(f"step-{step:07d}"):
            os.kill(os.getpid(), signal.SIGKILL)
        return out

    Accelerator.save_state = patched


def kill_before_ema_export(step: int) -> None:
    import common
    save = common.save_safetensors_atomic

    def patched(tensors, path, metadata=None, checksum=False):
        in_checkpoint = Path(path).parent.name.startswith(".tmp-step-")
        if (Path(path).name == "ema.safetensors" and not in_checkpoint
                and (metadata or {}).get("step") == str(step)):
            os.kill(os.getpid(), signal.SIGKILL)
        return save(tensors, path, metadata=metadata, checksum=checksum)

    common.save_safetensors_atomic = patched


def signal_after_save_state(spec: str) -> None:
    from accelerate import Accelerator
    name, step, *rank = spec.split(":")
    if rank and os.environ.get("RANK", "0") != rank[0]:
        return
    save_state = Accelerator.save_state

    def patched(self, output_dir=None, *args, **kwargs):
        out = save_state(self, output_dir, *args, **kwargs)
        if output_dir is not None and Path(output_dir).name.endswith(f"step-{int(step):07d}"):
            os.kill(os.getpid(), getattr(signal, f"SIG{name}"))
        return out

    Accelerator.save_state = patched


def slow_parts(seconds: float) -> None:
    import common
    write = common.atomic_write_bytes

    def patched(path, data):
        write(path, data)
        if Path(path).parent.name == "parts":
            time.sleep(seconds)

    common.atomic_write_bytes = patched


FAULTS = {"kill-after-save-state": lambda v: kill_after_save_state(int(v)),
          "kill-before-ema-export": lambda v: kill_before_ema_export(int(v)),
          "signal-after-save-state": signal_after_save_state,
          "slow-parts": lambda v: slow_parts(float(v))}


def main(argv: list[str]) -> None:
    if len(argv) < 4 or argv[0] not in FAULTS or argv[2] != "--":
        raise SystemExit(__doc__)
    fault, value, script, args = argv[0], argv[1], argv[3], argv[4:]
    sys.path.insert(0, str(REPO))
    FAULTS[fault](value)
    path = Path(script) if Path(script).is_absolute() else REPO / script
    sys.argv = [str(path), *args]
    runpy.run_path(str(path), run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])

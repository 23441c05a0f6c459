#!/usr/bin/env python
"""Train SiT on encoded shards: ``accelerate launch train.py ...`` (or plain ``python train.py``).

The command line only: parse the flags (:class:`configs.TrainingConfig`, REPA/StableVM/DispLoss
names accepted), resolve and check them (``--dry-run`` prints the result and exits), then
:func:`training.train` does the run (set-up in training/run.py, the loop in training/loop.py).

Run directory ``OUTPUT_DIR/EXP_NAME``::

    config.json            model/data contract read by generate.py + the resolved training config
    ema.safetensors        EMA weights of the latest checkpoint (no projectors), for sampling
    log.txt                what the run printed (all starts and resumes, appended)
    log.jsonl              one JSON line per logging step
    samples/step-N.png     sample grids from the EMA model (eval mode, fixed noise and labels)
    logs/                  tensorboard / wandb tracker files
    checkpoints/step-N/    accelerate state (model, optimizer, RNG) + ema.safetensors,
                           rank-R.json (step, data position, grad scaler, open log window),
                           bank-R.safetensors
    hub/                   --push-to-hub: the Hub model folder (config.json, model.safetensors,
                           README.md), then uploaded with the HF login (later: export.py RUN_DIR)

Exit status: 0 done, 2 a problem with the flags or files (one line on stderr), 3 the run diverged
(nothing non-finite was saved; the message names the checkpoint to resume from), 75 stopped by
SIGTERM or SIGUSR1 after writing a checkpoint of the step all processes agreed on (rerun with
``--resume latest``; docs/CLUSTER.md).
"""
from __future__ import annotations

import sys
from pathlib import Path

from common import PREEMPTED_EXIT, Preempted, UsageError, cli_error
from configs import parse_config
from training import train
from training.monitor import Diverged
from training.resolve import read_data_manifest, resolve

DIVERGED_EXIT = 3


def main(argv: list[str] | None = None) -> int:
    cfg, given = parse_config(argv)
    try:
        if cfg.dry_run:
            manifest = None
            if cfg.data_dir and (Path(cfg.data_dir) / "manifest.json").is_file():
                manifest = read_data_manifest(cfg)
            print(resolve(cfg, given, manifest).to_json())
            return 0
        train(cfg, given)
    except UsageError as e:
        return cli_error("train.py", e)
    except Preempted as e:
        if str(e):  # the main process says it once; every process stops at the same step
            print(f"train.py: {e}", file=sys.stderr)
        return PREEMPTED_EXIT
    except Diverged as e:
        if str(e):  # the main process says it once; every process stops
            print(f"train.py: error: {e}", file=sys.stderr)
        return DIVERGED_EXIT
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Export a trained run as a Hugging Face Hub model folder, and optionally push it::

    python export.py RUN_DIR                        # writes RUN_DIR/hub
    python export.py RUN_DIR --out DIR --push-to-hub --hub-model-id ORG/NAME

The folder (training/hub.py) holds ``config.json`` (what generate.py needs to rebuild the model
and decode its samples), ``model.safetensors`` (the EMA weights of ``RUN_DIR/ema.safetensors``)
and ``README.md``, a model card generated from the run. ``generate.py --ckpt DIR`` samples from it
exactly as from the run directory, and ``generate.py --ckpt ORG/NAME`` from the local HF cache once
``hf download ORG/NAME`` has fetched it. The push uses your Hugging Face login (``hf auth login``
or ``HF_TOKEN``), never a flag. ``train.py --push-to-hub`` does the same at the end of a run.

Exit status: 0 done, 2 a problem the user can fix (one line on stderr): no such run, a damaged
export, an --out that is not a Hub folder, or a push that did not happen (offline, not logged in,
no network; the folder is written and the line says how to push it later).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python export.py` from elsewhere: the repository's modules
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import UsageError, cli_error  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="export.py", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by train.py")
    p.add_argument("--out", default=None, help="the Hub model folder (default: RUN_DIR/hub)")
    p.add_argument("--push-to-hub", "--push_to_hub", dest="push_to_hub", action="store_true",
                   help="upload the folder with your Hugging Face login")
    p.add_argument("--hub-model-id", "--hub_model_id", dest="hub_model_id", default=None,
                   help="Hub repository ORG/NAME (or NAME, under your account); named in the "
                        "model card's generate command (default with --push-to-hub: RUN_DIR's "
                        "name)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from training.hub import HUB_WEIGHTS, export_run, push_folder
    from training.resolve import check_hub_model_id
    repo_id = args.hub_model_id
    if args.push_to_hub and repo_id is None:
        repo_id = Path(args.run_dir).resolve().name
    if repo_id is not None:
        check_hub_model_id(repo_id)
    folder = export_run(args.run_dir, args.out, repo_id)
    print(f"wrote the Hub model folder {folder} (config.json, {HUB_WEIGHTS}, README.md)")
    if args.push_to_hub:
        pushed, line = push_folder(folder, repo_id)
        if not pushed:
            raise UsageError(line)
        print(line)
    return 0


def cli(argv=None) -> int:
    try:
        return main(argv)
    except UsageError as e:
        return cli_error("export.py", e)


if __name__ == "__main__":
    sys.exit(cli())

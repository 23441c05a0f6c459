"""ADM-suite metrics without TensorFlow: Inception Score, FID, sFID, precision and recall.

    python evaluate.py SAMPLES.npz REFERENCE.npz --inception pt_inception-2015-12-05-6726825d.pth
    python evaluate.py make-reference SOURCE OUT.npz --inception PATH [--max-images N]
    python evaluate.py digits SAMPLES.npz [--json OUT] [--seed S] [--splits K] [--heldout DATA]
    python evaluate.py digits-accuracy SAMPLES.npz [--json OUT]

The command line of the ``evaluation`` package: it parses and checks the flags, reads the files
and calls :mod:`evaluation.adm` (IS, FID, sFID, precision/recall, reference batches; how each
number is computed is documented there) or :mod:`evaluation.digits` (the distribution metric for
models trained on the sklearn digits, and its classifier's class accuracy). Batches are ``.npz``
files whose ``arr_0`` is uint8 (N, H, W, 3), as ``np.savez(path, images)`` writes them and ADM's
evaluator reads them.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from common import atomic_write_json, cli_error, with_default_command  # noqa: E402
from evaluation.adm import (PR_REFERENCE_SIZE, NpzImages, compute_metrics,  # noqa: E402
                            format_metrics, make_reference)
from evaluation.digits import (DIGITS_RESAMPLES, comparison_for_data,  # noqa: E402
                               digits_class_accuracy, digits_metrics, format_digits_metrics,
                               read_labelled_npz)
from evaluation.images import open_source  # noqa: E402
from models.inception import RESOLUTION, FIDInceptionV3, load_inception  # noqa: E402
from models.vae import WeightsNotFound  # noqa: E402
from preprocessing.shards import ShardFormatError, read_manifest  # noqa: E402
from preprocessing.sources import SourceError  # noqa: E402

PROG = "evaluate.py"


def _device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--inception", default=None,
                   help="pt_inception-2015-12-05-6726825d.pth (default: $FID_INCEPTION_WEIGHTS)")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--device", default="auto", help="auto (GPU when present), cpu, cuda, cuda:1")
    p.add_argument("--inception-size", type=int, default=RESOLUTION,
                   help="input size of the Inception (299; smaller only for quick tests: numbers "
                        "are then not comparable to published ones)")
    p.add_argument("--no-progress", action="store_true")


def _load_model(args: argparse.Namespace) -> FIDInceptionV3:
    model = load_inception(args.inception, device=_device(args.device))
    model.resize_to = args.inception_size
    return model


def run_metrics(args: argparse.Namespace) -> int:
    """``evaluate.py [metrics] SAMPLES REFERENCE``: the ADM suite's numbers."""
    samples, reference = NpzImages(args.samples), NpzImages(args.reference)
    if samples.stats() is not None and reference.stats() is None:
        raise ValueError(f"{args.samples} holds reference statistics and {args.reference} "
                         "does not: the order is SAMPLES REFERENCE (ADM's evaluator takes the "
                         "reference first)")
    if samples.shape[1:3] != reference.shape[1:3]:
        print(f"note: sample images are {samples.shape[1]}x{samples.shape[2]}, reference "
              f"{reference.shape[1]}x{reference.shape[2]}", file=sys.stderr)
    model = _load_model(args)
    print(f"samples: {len(samples)} images from {args.samples}; reference: {len(reference)} "
          f"images{' + statistics' if reference.stats() is not None else ''} from "
          f"{args.reference}; device {next(model.parameters()).device}", file=sys.stderr)
    metrics = compute_metrics(samples, reference, model, args.batch_size,
                              progress=not args.no_progress, fid_method=args.fid_method)
    print(format_metrics(metrics), flush=True)
    if args.json:
        atomic_write_json(args.json, {**metrics, "samples": str(args.samples),
                                      "reference": str(args.reference),
                                      "num_samples": len(samples)})
    return 0


def run_make_reference(args: argparse.Namespace) -> int:
    """``evaluate.py make-reference SOURCE OUT.npz``: an ADM-style reference batch."""
    source = open_source(args.source, args.max_images, args.resolution, args.seed,
                         args.num_workers)
    model = _load_model(args)
    info = make_reference(source, args.out, model, args.batch_size, args.ref_images,
                          progress=not args.no_progress)
    failed = getattr(source, "failed", [])
    if failed:
        print(f"skipped {len(failed)} unreadable images, e.g. {failed[:3]}", file=sys.stderr)
    print(f"wrote {info['path']}: statistics of {info['images']} images, {info['arr_0']} in arr_0")
    return 0


def run_digits_accuracy(args: argparse.Namespace) -> int:
    """``evaluate.py digits-accuracy SAMPLES``: class accuracy of generated digits, by the digits
    metric's classifier."""
    images, labels = read_labelled_npz(args.samples)
    if labels is None:
        raise ValueError(f"{args.samples} has no labels (arr_1); sample with generate.py")
    res = digits_class_accuracy(images, labels)
    print(f"generated digits recognised as their class: {100 * res['accuracy']:.1f}% of "
          f"{res['num_images']} (the digits metric's classifier, an MLP fitted on real A; on the "
          f"held-out real B: {100 * res['real_heldout_accuracy']:.1f}%)")
    print("per class: " + ", ".join(f"{c}: {100 * a:.0f}%" for c, a in res["per_class"].items()))
    if args.json:
        atomic_write_json(args.json, {**res, "samples": str(args.samples)})
    return 0


def run_digits(args: argparse.Namespace) -> int:
    """``evaluate.py digits SAMPLES``: distribution metric of generated sklearn digits."""
    images, labels = read_labelled_npz(args.samples)
    if labels is None:
        print(f"note: {args.samples} has no labels (arr_1): no class accuracy; diversity groups "
              "samples by the predicted class", file=sys.stderr)
    comparison = None
    if args.heldout:
        comparison = comparison_for_data(read_manifest(args.heldout))
        if comparison is None:
            raise ValueError(f"--heldout {args.heldout}: those shards are not a digits subset; "
                             "encode the training data with `encode.py --source digits --subset "
                             "train --subset-size N`")
    res = digits_metrics(images, labels, seed=args.seed, splits=args.splits,
                         comparison=comparison)
    if res["floor_samples"] < res["num_samples"]:
        name = res["names"]["floor"]
        print(f"note: {res['num_samples']} samples but {name} has {res['num_real_b']} digits: "
              f"the floor uses all of {name}", file=sys.stderr)
    print(format_digits_metrics(res), flush=True)
    if args.json:
        atomic_write_json(args.json, {**res, "samples": str(args.samples)})
    return 0


COMMANDS = {"metrics": run_metrics, "make-reference": run_make_reference,
            "digits-accuracy": run_digits_accuracy, "digits": run_digits}


def build_parser() -> argparse.ArgumentParser:
    """One subcommand per job; ``metrics`` is the default, so ADM's ``evaluate.py SAMPLES REF``
    form keeps working."""
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command",
                           metavar="{metrics,make-reference,digits-accuracy,digits}",
                           help="metrics (default when omitted): IS, FID, sFID, precision, "
                                "recall of SAMPLES against REFERENCE")
    m = sub.add_parser("metrics", help="IS, FID, sFID, precision, recall (ADM suite)")
    m.add_argument("samples", help="samples .npz (arr_0 uint8 (N, H, W, 3))")
    m.add_argument("reference", help="reference batch .npz (arr_0 and optional mu/sigma/mu_s/"
                   "sigma_s), e.g. ADM's VIRTUAL_imagenet256_labeled.npz")
    m.add_argument("--json", default=None, help="also write the metrics to this JSON file")
    m.add_argument("--fid-method", choices=("sqrtm", "eigh"), default="sqrtm",
                   help="sqrtm: scipy.linalg.sqrtm as ADM (default); eigh: same trace from "
                        "symmetric eigensolves, much faster on a small CPU")
    _common(m)
    r = sub.add_parser(
        "make-reference", help="write an ADM-style reference batch",
        description="Write an ADM-style reference batch: arr_0 (the first --ref-images images) and "
                    "mu/sigma/mu_s/sigma_s over all images of SOURCE.")
    r.add_argument("source", help="shard directory encoded with --store-images, image folder "
                   "(root/<class>/<image>, ADM centre crop to --resolution), or an .npz batch")
    r.add_argument("out", help="output .npz")
    r.add_argument("--max-images", type=int, default=None, help="use only the first N images")
    r.add_argument("--ref-images", type=int, default=PR_REFERENCE_SIZE,
                   help="images kept in arr_0 for precision/recall (ADM: 10000)")
    r.add_argument("--resolution", type=int, default=256, help="crop size for an image folder")
    r.add_argument("--seed", type=int, default=0, help="order of an image folder's images")
    r.add_argument("--num-workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="image decoding processes (image folder)")
    _common(r)
    d = sub.add_parser(
        "digits-accuracy", help="class accuracy of generated sklearn digits",
        description="Fraction of generated digits (samples.npz from a model trained on the "
                    "sklearn digits) that the digits metric's classifier (an MLP fitted on a "
                    "fixed half of the real digits) assigns to their label.")
    d.add_argument("samples", help="samples .npz with arr_0 images and arr_1 labels")
    d.add_argument("--json", default=None, help="also write the result to this JSON file")
    g = sub.add_parser(
        "digits", help="distribution metric of generated sklearn digits (FD ratio, P/R, ...)",
        description="Frechet distance / real floor, precision, recall, class accuracy, "
                    "within-class diversity and training copies of generated sklearn digits, in "
                    "the hidden features of a small classifier fitted on a fixed half of the real "
                    "digits (docs/CONVENTIONS.md §12).")
    g.add_argument("samples", help="samples .npz: arr_0 uint8 (N, H, W, 3), arr_1 labels")
    g.add_argument("--json", default=None, help="also write every number to this JSON file")
    g.add_argument("--seed", type=int, default=0,
                   help="seed of the real subsamples and the bootstrap (the split and the "
                        "classifier are fixed)")
    g.add_argument("--splits", type=int, default=DIGITS_RESAMPLES,
                   help="bootstrap resamples of the generated set for the headline's interval "
                        "(0: none)")
    g.add_argument("--heldout", default=None, metavar="DATA_DIR",
                   help="the model trained on these shards, one side of a digits split "
                        "(encode.py --subset): measure against the digits it never saw and "
                        "count copies of the ones it saw (docs/CONVENTIONS.md §12)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one command; problems the user can fix print ``evaluate.py: error: ...``, exit 2."""
    argv = with_default_command(sys.argv[1:] if argv is None else argv, COMMANDS, "metrics")
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (WeightsNotFound, FileNotFoundError, ValueError, ShardFormatError, SourceError) as e:
        return cli_error(PROG, e)


if __name__ == "__main__":
    sys.exit(main())

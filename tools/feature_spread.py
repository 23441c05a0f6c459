"""How spread out a trained model's block features are: the quantity the dispersive loss acts on.

    python tools/feature_spread.py RUN_DIR [RUN_DIR ...] [--data-dir data/digits] [--csv OUT]

For each run (its ema.safetensors and config.json), 256 fixed real samples of ``--data-dir`` are
noised to t = 0.25, 0.5, 0.75 with fixed noise and passed through the EMA model; for the first and
the last block it reports the feature RMS (sqrt of the mean squared token feature), the median
over pairs of the per-feature squared distance ``||z_i - z_j||^2 / M`` (what InfoNCE-L2 divides by
tau), and the InfoNCE-L2 dispersive value of the first 64 rows at tau 1 (its floor is
-log 64 = -4.16 once every pair is far apart; docs/CONVENTIONS.md §5). docs/ABLATIONS.md uses it.
"""
from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import UsageError, atomic_write_text, cli_error, pairwise_sq_dists  # noqa: E402
from losses.dispersive import dispersive_loss  # noqa: E402

TIMES = (0.25, 0.5, 0.75)


def spread(z: torch.Tensor) -> dict[str, float]:
    """RMS, median pairwise per-feature squared distance and InfoNCE-L2 (first 64 rows, tau 1)
    of features ``z`` (B, ...)."""
    z = z.flatten(1).double()
    b, m = z.shape
    zc = z - z.mean(0, keepdim=True)  # translation keeps distances, centring keeps them exact
    d = pairwise_sq_dists(zc, zc) / m  # the dispersive loss's distance helper, in float64
    off = d[~torch.eye(b, dtype=torch.bool)]
    return {"rms": z.square().mean().sqrt().item(), "median_sq_dist": off.median().item(),
            "infonce_l2": dispersive_loss(z[:64]).item()}


def model_spread(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor,
                 times=TIMES) -> dict[str, float]:
    """:func:`spread` of the first and last block at each t (linear path x_t = (1-t) x + t eps)."""
    out = {}
    for t in times:
        x_t = (1 - t) * x + t * eps
        with torch.no_grad():
            _, aux = model(x_t, torch.full((x.shape[0],), t), y,
                           return_features=[1, model.depth])
        for k, z in aux["features"].items():
            name = "first" if k == 1 else "last"
            for key, v in spread(z).items():
                out[f"{name}_{key}_t{t:g}"] = v
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="feature_spread.py", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="run directories (ema.safetensors + config.json)")
    p.add_argument("--data-dir", default="data/digits", help="shards of the real samples")
    p.add_argument("--csv", default=None, help="also write the numbers to this CSV file")
    args = p.parse_args(argv)
    from training import load_run
    from preprocessing.shards import ShardDataset, latents_from_raw
    try:
        ds = ShardDataset(args.data_dir)
        if len(ds) < 256:
            raise UsageError(f"{args.data_dir} has {len(ds)} samples; 256 are needed")
        b = ds.gather(torch.arange(256) * (len(ds) // 256))
        g = torch.Generator().manual_seed(0)
        x = latents_from_raw(b["raw"], ds.key, ds.scale, ds.bias, g)
        eps = torch.randn(x.shape, generator=g)
        rows = []
        for run in args.runs:
            model, _ = load_run(run, "cpu")  # exactly as the run's config.json describes it
            rows.append({"run": run, **model_spread(model, x, b["y"], eps)})
    except (UsageError, FileNotFoundError, ValueError) as e:
        return cli_error("feature_spread.py", e)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    print(buf.getvalue(), end="")
    if args.csv:
        atomic_write_text(args.csv, buf.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())

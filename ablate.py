"""Sweep runner: one command trains, samples and evaluates every cell of an ablation over seeds,
then writes results.csv, a markdown table (mean +- std over seeds, delta vs the baseline cell) and
a plot.

    python ablate.py --out runs/ablate --base "--preset digits --data-dir data/digits" \\
        --grid disp_lambda=0.1,0.5 disp_tau=0.5,1 --fixed disp=true --seeds 0 1 2 --jobs 2

Cells: ``baseline`` (the base command alone; ``--no-baseline`` drops it), then every combination
of ``--grid`` (``key=v1,v2``: train.py's flag ``--key`` with each value; ``true``/``false`` for
on/off switches) with the ``--fixed`` settings, then each ``--cell NAME=FLAGS`` as given. Every
cell runs with every seed (``--seed k``) and is sampled at every ``--cfg-scales`` value with the
same noise and labels (generate.py ``--global-seed 0``).

Resumable: each (cell, seed) directory records what finished (train.done, samples per scale,
metrics per scale); a rerun skips finished steps and resumes a killed training from its last
checkpoint (``--resume latest``, exact), so a killed sweep rerun gives the same results.csv.
``--print-commands`` prints one shell line per (cell, seed) instead, for a cluster scheduler; a
later local run with the same arguments only collects the results. docs/ABLATIONS.md shows it in use.
"""
from __future__ import annotations

import argparse
import csv
import io
import itertools
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from common import UsageError, atomic_write_bytes, atomic_write_json, atomic_write_text, cli_error

PROG = "ablate.py"
REPO = Path(__file__).resolve().parent
# (json key, column name, digits shown): the digits metric (docs/CONVENTIONS.md §12) ...
DIGITS_COLUMNS = (("fd_ratio", "FD/floor", 2), ("fd_ratio_halfwidth", "FD/floor 90% +-", 2),
                  ("fd", "FD", 2), ("fd_floor", "floor", 2),
                  ("precision", "precision", 3), ("recall", "recall", 3),
                  ("class_accuracy", "accuracy", 3), ("diversity", "diversity", 3),
                  ("copies", "copies", 3))
# ... and the ADM suite (evaluate.py metrics) when --eval-reference is given
ADM_COLUMNS = (("fid", "FID", 2), ("sfid", "sFID", 2), ("inception_score", "IS", 1),
               ("precision", "precision", 3), ("recall", "recall", 3))
# curves of the online evaluation (each run's eval.jsonl, train.py --eval-every)
DIGITS_CURVES = (("fd_ratio", "FD / floor"), ("copies", "copy rate"))
ADM_CURVES = (("fid", "FID"),)
# training terms read from each run's log.jsonl (the last logged window)
TRAIN_TERMS = ("si", "disp", "contrast_pos")


@dataclass(frozen=True)
class Cell:
    name: str
    flags: tuple[str, ...]


@dataclass(frozen=True)
class Job:
    cell: Cell
    seed: int

    @property
    def key(self) -> str:
        return f"{self.cell.name} seed {self.seed}"


def _switch(key: str, value: str) -> list[str]:
    flag = "--" + key.replace("_", "-")
    low = value.lower()
    if low in ("true", "on", "yes"):
        return [flag]
    if low in ("false", "off", "no"):
        return ["--no-" + flag[2:]]
    return [flag, value]


def parse_settings(items: list[str], what: str) -> list[tuple[str, list[str]]]:
    """``["a=1,2", "b=x"]`` -> ``[("a", ["1", "2"]), ("b", ["x"])]`` with clear errors."""
    out = []
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip().lstrip("-").replace("-", "_")
        vals = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not key or not vals:
            raise UsageError(f"{what} {item!r}: expected KEY=VALUE[,VALUE...] (e.g. "
                             "disp_lambda=0.1,0.25)")
        if key in dict(out):
            raise UsageError(f"{what}: {key} given twice")
        out.append((key, vals))
    return out


def build_cells(grid: list[str], fixed: list[str], cells: list[str], baseline: bool
                ) -> list[Cell]:
    """The study's cells in order: baseline, the grid's combinations, the explicit cells."""
    out = [Cell("baseline", ())] if baseline else []
    axes = parse_settings(grid, "--grid")
    fixed_flags = [f for k, vs in parse_settings(fixed, "--fixed") for v in vs
                   for f in _switch(k, v)]
    if axes:
        keys = [k for k, _ in axes]
        for combo in itertools.product(*(vs for _, vs in axes)):
            name = ",".join(f"{k}={v}" for k, v in zip(keys, combo))
            flags = fixed_flags + [f for k, v in zip(keys, combo) for f in _switch(k, v)]
            out.append(Cell(name, tuple(flags)))
    elif fixed_flags:
        raise UsageError("--fixed needs --grid (for a single extra setting use --cell)")
    for item in cells:
        name, sep, flags = item.partition("=")
        if not sep or not name.strip():
            raise UsageError(f"--cell {item!r}: expected NAME=FLAGS, e.g. "
                             "'disp=--disp --disp-lambda 0.5'")
        out.append(Cell(name.strip(), tuple(shlex.split(flags))))
    names = [c.name for c in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UsageError(f"cell name(s) {dup} used twice")
    if not out:
        raise UsageError("no cells: give --grid or --cell (or keep the baseline)")
    return out


def cell_dir(out: Path, job: Job) -> Path:
    safe = re.sub(r"[^A-Za-z0-9._=,+-]", "_", job.cell.name)
    return out / "runs" / safe / f"seed{job.seed}"


def _scale_tag(scale: float) -> str:
    return f"cfg{scale:g}"


class Study:
    """The arguments that define a study; what a rerun of the same output directory must keep."""

    def __init__(self, args: argparse.Namespace):
        self.out = Path(args.out).resolve()  # the commands run from the repository root
        self.base = shlex.split(args.base)
        self.generate = shlex.split(args.generate)
        self.cfg_scales = list(dict.fromkeys(args.cfg_scales))
        self.num_samples = args.num_samples
        self.eval_reference = args.eval_reference
        self.eval_args = shlex.split(args.eval_args)
        self.cells = build_cells(args.grid, args.fixed, args.cell, not args.no_baseline)
        self.seeds = list(dict.fromkeys(args.seeds))
        self.jobs = [Job(c, s) for c in self.cells for s in self.seeds]
        self.columns = ADM_COLUMNS if self.eval_reference else DIGITS_COLUMNS
        self.curve_keys = ADM_CURVES if self.eval_reference else DIGITS_CURVES
        for bad in ("--seed", "--output-dir", "--exp-name", "--resume"):
            if bad in self.base or any(bad in c.flags for c in self.cells):
                raise UsageError(f"{bad} is set by the runner per cell; drop it from --base/--cell")
        if any(s < 0 for s in self.cfg_scales):
            raise UsageError("--cfg-scales must be >= 0 (1 = no guidance)")

    def spec(self) -> dict:
        """What fixes the numbers of every (cell, seed): changing it needs a new --out."""
        return {"base": self.base, "generate": self.generate, "num_samples": self.num_samples,
                "eval_reference": self.eval_reference, "eval_args": self.eval_args}

    def check_spec(self, record: bool = True) -> None:
        """Refuse a changed spec; with ``record``, store the spec and this command line."""
        path = self.out / "study.json"
        if path.is_file():
            old = json.loads(path.read_text()).get("spec")
            if old != self.spec():
                diff = {k: (old.get(k), v) for k, v in self.spec().items() if old.get(k) != v}
                raise UsageError(f"{self.out} holds a study with other settings {diff}; keep them "
                                 "or choose another --out (cells and seeds may be added)")
        if record or not path.is_file():
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write_json(path, {"spec": self.spec(), "command": shlex.join(sys.argv)})

    # -- the commands of one (cell, seed) -------------------------------------------------------
    def commands(self, job: Job) -> list[tuple[str, list[str], Path]]:
        """``(what, argv, file it produces)`` in order; a step whose file exists is done."""
        d = cell_dir(self.out, job)
        py = sys.executable
        steps = [("train", [py, str(REPO / "train.py"), *self.base, *job.cell.flags,
                            "--seed", str(job.seed), "--output-dir", str(d.parent),
                            "--exp-name", d.name, "--resume", "latest"], d / "train.done")]
        for s in self.cfg_scales:
            tag = _scale_tag(s)
            sdir = d / f"samples-{tag}"
            steps.append((f"sample {tag}", [
                py, str(REPO / "generate.py"), "--ckpt", str(d), "--mode", "ode",
                "--num-steps", "50", "--per-proc-batch-size", "100", "--label-sampling", "equal",
                *self.generate, "--cfg-scale", f"{s:g}", "--num-fid-samples",
                str(self.num_samples), "--sample-dir", str(sdir)], sdir / "samples.npz"))
            metrics = d / f"metrics-{tag}.json"
            if self.eval_reference:
                ev = [py, str(REPO / "evaluate.py"), "metrics", str(sdir / "samples.npz"),
                      self.eval_reference, *self.eval_args, "--json", str(metrics)]
            else:
                ev = [py, str(REPO / "evaluate.py"), "digits", str(sdir / "samples.npz"),
                      *self.eval_args, "--json", str(metrics)]
            steps.append((f"evaluate {tag}", ev, metrics))
        return steps

    def shell_line(self, job: Job) -> str:
        """One line a scheduler can run; each step is skipped when its output exists."""
        parts = []
        for what, argv, done in self.commands(job):
            cmd = shlex.join(argv)
            if what == "train":
                cmd = f"{cmd} && touch {shlex.quote(str(done))}"
            parts.append(f"{{ test -e {shlex.quote(str(done))} || {{ {cmd}; }}; }}")
        return " && ".join(parts)


def run_job(study: Study, job: Job, threads: int, stop: threading.Event) -> dict:
    """Run the unfinished steps of ``job`` (adding each step's seconds to timing.json);
    returns ``{'ok', 'job'}`` plus ``'error'`` when a step failed or the sweep was stopped."""
    d = cell_dir(study.out, job)
    d.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    timing_path = d / "timing.json"
    timing = json.loads(timing_path.read_text()) if timing_path.is_file() else {}
    with open(d / "runner.log", "a") as log:
        for what, argv, done in study.commands(job):
            if done.exists():
                continue
            if stop.is_set():
                return {"ok": False, "job": job, "error": "stopped"}
            log.write(f"\n$ {shlex.join(argv)}\n")
            log.flush()
            t0 = time.perf_counter()
            p = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
            timing[what] = timing.get(what, 0.0) + time.perf_counter() - t0
            atomic_write_json(timing_path, timing)
            if p.returncode != 0:
                return {"ok": False, "job": job,
                        "error": f"{what} exited {p.returncode}; see {d / 'runner.log'}"}
            if what == "train":
                atomic_write_text(done, "done\n")
    return {"ok": True, "job": job}


# -- results -----------------------------------------------------------------------------------

def collect(study: Study) -> list[dict]:
    """One row per (cell, seed, guidance scale) with a finished evaluation, in study order."""
    rows = []
    for job in study.jobs:
        d = cell_dir(study.out, job)
        for s in study.cfg_scales:
            path = d / f"metrics-{_scale_tag(s)}.json"
            if not path.is_file():
                continue
            m = json.loads(path.read_text())
            row = {"cell": job.cell.name, "seed": job.seed, "cfg_scale": s,
                   "flags": shlex.join(job.cell.flags)}
            interval = m.get("fd_ratio_interval")  # the headline's own 90% interval
            m["fd_ratio_halfwidth"] = (interval[1] - interval[0]) / 2 if interval else None
            row.update({k: m.get(k) for k, _, _ in study.columns})
            row.update(final_terms(d))
            rows.append(row)
    return rows


def final_terms(run_dir: Path) -> dict:
    """The training loss terms of the last log.jsonl record (the mean over the last logging
    window): shows, e.g., a dispersive term that sits at its floor -log(batch)."""
    out = {f"train_{k}": None for k in TRAIN_TERMS}
    log = run_dir / "log.jsonl"
    if log.is_file():
        lines = log.read_text().splitlines()
        if lines:
            last = json.loads(lines[-1])
            out.update({f"train_{k}": last.get(k) for k in TRAIN_TERMS})
    return out


def write_csv(path: Path, rows: list[dict], study: Study) -> None:
    buf = io.StringIO()
    fields = (["cell", "seed", "cfg_scale", "flags"] + [k for k, _, _ in study.columns]
              + [f"train_{k}" for k in TRAIN_TERMS])
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    w.writeheader()
    for r in rows:
        # repr of the float: the exact number, so two runs compare byte for byte
        w.writerow({k: ("" if r[k] is None else repr(r[k]) if isinstance(r[k], float) else r[k])
                    for k in fields})
    atomic_write_text(path, buf.getvalue())


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for one value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(rows: list[dict], study: Study) -> list[dict]:
    """Per (cell, scale): seeds, mean and std of every metric, delta % of the headline metric
    against the baseline cell at the same scale (the first cell when there is no baseline)."""
    head = study.columns[0][0]
    out = []
    for s in study.cfg_scales:
        ref = None
        for cell in study.cells:
            got = [r for r in rows if r["cell"] == cell.name and r["cfg_scale"] == s]
            if not got:
                continue
            stats = {}
            for k in [k for k, _, _ in study.columns] + [f"train_{k}" for k in TRAIN_TERMS]:
                vals = [r[k] for r in got if r[k] is not None]
                stats[k] = mean_std(vals) if vals else None
            if ref is None:
                ref = stats[head]
            delta = (100.0 * (stats[head][0] / ref[0] - 1) if ref and stats[head] and ref[0]
                     else None)
            out.append({"cell": cell.name, "cfg_scale": s, "seeds": sorted(r["seed"] for r in got),
                        "stats": stats, "delta": delta, "flags": shlex.join(cell.flags)})
    return out


def markdown(summary: list[dict], study: Study, command: str, timings: dict) -> str:
    head_name = study.columns[0][1]
    lines = [f"Reproduce: `{command}`", "",
             "Mean +- std over seeds (the mean alone for one seed); delta: change of the mean "
             f"{head_name} against the first cell at the same guidance scale (negative is "
             "better for FD and FID); the terms (end) are the unweighted training terms of the "
             "last logged window; train s: median training seconds per run."
             + (" FD/floor 90% +-: half the width of one run's 90% interval of its headline "
                "(bootstrap of its generated set against the fixed floor), mean over seeds: the "
                "noise of a single run's number, beside the spread over seeds."
                if study.columns is DIGITS_COLUMNS else ""), ""]
    terms = [(f"train_{k}", name, 2) for k, name in (("disp", "disp term (end)"),
                                                      ("contrast_pos", "positive term (end)"))
             if any(r["stats"][f"train_{k}"] for r in summary)]
    shown = list(study.columns) + terms
    cols = [name for _, name, _ in shown]
    lines.append("| cell | CFG | seeds | " + " | ".join(cols) + f" | delta {head_name} | train s |")
    lines.append("|" + "---|" * (len(cols) + 5))
    for r in summary:
        cells = []
        for k, _, digits in shown:
            st = r["stats"][k]
            cells.append("n/a" if st is None else f"{st[0]:.{digits}f}" if len(r["seeds"]) == 1
                         else f"{st[0]:.{digits}f} +- {st[1]:.{digits}f}")  # no spread of one
        delta = "" if r["delta"] is None else f"{r['delta']:+.0f}%"
        secs = timings.get(r["cell"])
        lines.append(f"| {r['cell']} | {r['cfg_scale']:g} | {len(r['seeds'])} | "
                     + " | ".join(cells) + f" | {delta} | "
                     + ("" if secs is None else f"{secs:.0f}") + " |")
    lines += ["", "Cells:", ""]
    lines += [f"- `{c.name}`: `{shlex.join(c.flags) or '(base command only)'}`"
              for c in study.cells]
    return "\n".join(lines) + "\n"


def median_train_seconds(study: Study) -> dict[str, float]:
    out = {}
    for cell in study.cells:
        secs = []
        for s in study.seeds:
            path = cell_dir(study.out, Job(cell, s)) / "timing.json"
            if path.is_file():
                t = json.loads(path.read_text()).get("train")
                if t is not None:
                    secs.append(t)
        if secs:
            out[cell.name] = sorted(secs)[len(secs) // 2]
    return out


def plot(path: Path, summary: list[dict], study: Study) -> None:
    """Bar chart of the headline metric (mean +- std) per cell, one colour per guidance scale."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key, name, _ = study.columns[0]
    names = [c.name for c in study.cells]
    width = 0.8 / max(1, len(study.cfg_scales))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.7 * len(names) + 2), 4.2))
    for i, s in enumerate(study.cfg_scales):
        xs, ms, sd = [], [], []
        for r in summary:
            if r["cfg_scale"] == s and r["stats"][key] is not None:
                xs.append(names.index(r["cell"]) + (i - (len(study.cfg_scales) - 1) / 2) * width)
                ms.append(r["stats"][key][0])
                sd.append(r["stats"][key][1])
        ax.bar(xs, ms, width, yerr=sd, capsize=3, label=f"CFG {s:g}")
    if key == "fd_ratio":
        ax.axhline(1.0, color="k", lw=0.8, ls="--", label="real-data floor")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel(f"{name} (mean +- std over seeds)")
    # above the axes: the bars fill the plot, so any spot inside would hide one
    ax.legend(fontsize=8, loc="lower left", bbox_to_anchor=(0, 1.01), ncol=4, frameon=False)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


# -- curves: the online evaluation over training steps ------------------------------------------

def collect_curves(study: Study) -> list[dict]:
    """One row per (cell, seed, evaluated step) from every run's eval.jsonl (the last record of
    a step wins: a resumed run may have written it twice)."""
    rows = []
    for job in study.jobs:
        path = cell_dir(study.out, job) / "eval.jsonl"
        if not path.is_file():
            continue
        by_step = {}
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            by_step[rec["step"]] = {k: rec.get(k) for k, _ in study.curve_keys}
            by_step[rec["step"]]["real_b_copies"] = rec.get("real_b_copies")  # copy-rate scale
        rows += [{"cell": job.cell.name, "seed": job.seed, "step": step, **vals}
                 for step, vals in sorted(by_step.items())]
    return rows


def summarise_curves(rows: list[dict], study: Study) -> dict[str, dict[int, dict]]:
    """cell -> step -> {key: (mean, std over seeds, number of seeds)}."""
    out: dict[str, dict[int, dict]] = {}
    for cell in study.cells:
        mine = [r for r in rows if r["cell"] == cell.name]
        for step in sorted({r["step"] for r in mine}):
            at = [r for r in mine if r["step"] == step]
            stats = {}
            for k, _ in study.curve_keys:
                vals = [r[k] for r in at if r[k] is not None]
                stats[k] = (*mean_std(vals), len(vals)) if vals else None
            out.setdefault(cell.name, {})[step] = stats
    return out


def curves_markdown(curves: dict[str, dict[int, dict]], study: Study, max_cols: int = 6) -> str:
    """One table per curve metric: cells x (evenly spaced) evaluated steps, mean +- std."""
    steps = sorted({s for by_step in curves.values() for s in by_step})
    if len(steps) > max_cols:
        steps = [steps[round(i * (len(steps) - 1) / (max_cols - 1))] for i in range(max_cols)]
    lines = ["Curves: the online evaluation during training (train.py --eval-every, eval.jsonl "
             "of each run), mean +- std over the seeds that reached the step (the mean alone "
             "for one seed); curves.csv has every point, curves.png plots them.", ""]
    for key, name in study.curve_keys:
        lines += [f"{name}:", "", "| cell | " + " | ".join(f"step {s}" for s in steps) + " |",
                  "|---|" + "---:|" * len(steps)]
        for cell, by_step in curves.items():
            cells = []
            for s in steps:
                st = (by_step.get(s) or {}).get(key)
                cells.append("" if st is None else f"{st[0]:.3f}" if st[2] == 1
                             else f"{st[0]:.3f} +- {st[1]:.3f}")
            lines.append(f"| {cell} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot_curves(path: Path, curves: dict[str, dict[int, dict]], study: Study,
                real_copies: float | None = None) -> None:
    """One panel per curve metric: mean over seeds per cell against steps, band +- std; the
    real-data floor on FD / floor, and ``real_copies`` (real digits the model never saw, by the
    same copy test) on the copy rate."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = study.curve_keys
    fig, axes = plt.subplots(1, len(keys), figsize=(5.2 * len(keys), 3.8), squeeze=False)
    for ax, (key, name) in zip(axes[0], keys):
        for cell, by_step in curves.items():
            pts = [(s, st[key]) for s, st in sorted(by_step.items()) if st.get(key)]
            if not pts:
                continue
            xs = [s for s, _ in pts]
            m = [v[0] for _, v in pts]
            sd = [v[1] for _, v in pts]
            line, = ax.plot(xs, m, marker="o", ms=3, label=cell)
            ax.fill_between(xs, [a - b for a, b in zip(m, sd)], [a + b for a, b in zip(m, sd)],
                            color=line.get_color(), alpha=0.15)
        if key == "fd_ratio":
            ax.axhline(1.0, color="k", lw=0.8, ls="--", label="real-data floor")
        if key == "copies" and real_copies is not None:
            ax.axhline(real_copies, color="k", lw=0.8, ls=":", label="real digits not trained on")
            ax.legend(fontsize=7)
        ax.set_xlabel("training step")
        ax.set_ylabel(f"{name} (mean +- std over seeds)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def write_curves(study: Study) -> str:
    """curves.csv and curves.png from the runs' eval.jsonl; the markdown ('' if none)."""
    rows = collect_curves(study)
    if not rows:
        return ""
    buf = io.StringIO()
    fields = ["cell", "seed", "step"] + [k for k, _ in study.curve_keys]
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: "" if r[k] is None else repr(r[k]) if isinstance(r[k], float) else r[k]
                    for k in fields})
    atomic_write_text(study.out / "curves.csv", buf.getvalue())
    curves = summarise_curves(rows, study)
    real = [r["real_b_copies"] for r in rows if r.get("real_b_copies") is not None]
    plot_curves(study.out / "curves.png", curves, study,
                statistics.median(real) if real else None)
    return curves_markdown(curves, study)


def report(study: Study) -> str:
    """Write results.csv, results.md and results.png (and curves.csv / .png when the runs
    evaluated online); return the markdown."""
    rows = collect(study)
    write_csv(study.out / "results.csv", rows, study)
    summary = summarise(rows, study)
    command = json.loads((study.out / "study.json").read_text())["command"]
    md = markdown(summary, study, command, median_train_seconds(study))
    curves = write_curves(study)
    if curves:
        md += "\n" + curves
    atomic_write_text(study.out / "results.md", md)
    if summary:
        plot(study.out / "results.png", summary, study)
    return md


# -- command line ------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--out", required=True, help="study directory (results and every run)")
    p.add_argument("--base", required=True, help="train.py arguments shared by every cell, "
                   "quoted, e.g. \"--preset digits --data-dir data/digits\"")
    p.add_argument("--grid", nargs="*", default=[], metavar="KEY=V1,V2",
                   help="train.py settings to cross (flag name without --, - or _)")
    p.add_argument("--fixed", nargs="*", default=[], metavar="KEY=V",
                   help="settings added to every grid cell (not the baseline), e.g. disp=true")
    p.add_argument("--cell", action="append", default=[], metavar="NAME=FLAGS",
                   help="an explicit cell, e.g. 'contrastive=--contrastive infonce_l2' "
                        "(repeatable)")
    p.add_argument("--no-baseline", action="store_true", help="no cell for the base command")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--cfg-scales", type=float, nargs="+", default=[1.0],
                   help="guidance scales each model is sampled at (1 = no guidance)")
    p.add_argument("--num-samples", type=int, default=200, help="samples per (cell, seed, scale)")
    p.add_argument("--generate", default="", help="extra generate.py arguments, quoted (default "
                   "--mode ode --num-steps 50), e.g. \"--mode meanflow --num-steps 1\"")
    p.add_argument("--eval-reference", default=None,
                   help="ADM reference batch: evaluate with `evaluate.py metrics` (FID, sFID, IS, "
                        "P/R) instead of the digits metric")
    p.add_argument("--eval-args", default="", help="extra evaluate.py arguments, quoted "
                   "(e.g. \"--inception PATH\")")
    p.add_argument("--jobs", type=int, default=1, help="(cell, seed) runs at once; at most the "
                   "number of cores, which are shared evenly between them")
    p.add_argument("--print-commands", action="store_true",
                   help="print one shell line per unfinished (cell, seed) and exit")
    p.add_argument("--report-only", action="store_true",
                   help="only rewrite results.csv / .md / .png from what has finished")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        study = Study(args)
        cores = os.cpu_count() or 1
        if not 1 <= args.jobs <= cores:
            raise UsageError(f"--jobs must be in 1..{cores} (this machine's cores)")
        if args.num_samples < 1:
            raise UsageError("--num-samples must be >= 1")
        study.check_spec(record=not args.report_only)  # a report keeps the study's command
    except UsageError as e:
        return cli_error(PROG, e)
    todo = [j for j in study.jobs
            if not all(done.exists() for _, _, done in study.commands(j))]
    if args.print_commands:
        for job in todo:
            print(study.shell_line(job))
        return 0
    failed = []
    if todo and not args.report_only:
        print(f"{len(study.cells)} cells x {len(study.seeds)} seeds: {len(todo)} of "
              f"{len(study.jobs)} runs to do, {args.jobs} at a time ({study.out})", flush=True)
        threads = max(1, cores // args.jobs)
        stop = threading.Event()
        from tqdm import tqdm
        with ThreadPoolExecutor(args.jobs) as pool, tqdm(total=len(todo), desc="runs") as bar:
            futures = [pool.submit(run_job, study, j, threads, stop) for j in todo]
            try:
                for f in as_completed(futures):
                    res = f.result()
                    if not res["ok"]:
                        failed.append(res)
                        tqdm.write(f"failed: {res['job'].key}: {res['error']}")
                    bar.update(1)
            except KeyboardInterrupt:
                stop.set()  # the running steps finish (or die with the process group)
                raise
    md = report(study)
    print(md)
    print(f"wrote {study.out / 'results.csv'}, results.md, results.png")
    if failed:
        print(f"{len(failed)} run(s) failed: " + "; ".join(f["job"].key for f in failed),
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""ablate.py, the sweep runner: cells from a grid, aggregation against hand-computed statistics,
--print-commands, and a real 2x2 grid x 2 seeds sweep killed in the middle and rerun."""
from __future__ import annotations

import csv
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

import ablate
from tests.conftest import REPO, encode

TINY = ("--preset digits --max-train-steps 4 --checkpointing-steps 2 --depth 2 --hidden-size 32 "
        "--num-heads 2 --batch-size 32")


def test_cells_cross_the_grid_in_order():
    cells = ablate.build_cells(["disp_lambda=0.1,0.5", "disp-tau=1"], ["disp=true"],
                               ["c=--contrastive hinge --contrastive-noise restricted"], True)
    assert [c.name for c in cells] == ["baseline", "disp_lambda=0.1,disp_tau=1",
                                       "disp_lambda=0.5,disp_tau=1", "c"]
    assert cells[0].flags == ()
    assert cells[1].flags == ("--disp", "--disp-lambda", "0.1", "--disp-tau", "1")
    assert cells[3].flags == ("--contrastive", "hinge", "--contrastive-noise", "restricted")
    off = ablate.build_cells(["hflip=false,true"], [], [], False)
    assert [c.flags for c in off] == [("--no-hflip",), ("--hflip",)]


@pytest.mark.parametrize("grid,fixed,cells,needle", [
    (["disp_lambda"], [], [], "KEY=VALUE"),
    (["a=1", "a=2"], [], [], "given twice"),
    ([], ["disp=true"], [], "--fixed needs --grid"),
    ([], [], ["noflags"], "NAME=FLAGS"),
    ([], [], ["baseline=--disp"], "used twice"),
])
def test_bad_cells_are_refused(grid, fixed, cells, needle):
    with pytest.raises(ablate.UsageError, match=needle):
        ablate.build_cells(grid, fixed, cells, True)


def _fake_study(tmp_path: Path, metrics: dict[tuple[str, int], float], *extra: str):
    """A study whose evaluations are written by hand: FD/floor per (cell, seed), CFG 1."""
    args = ablate.build_parser().parse_args(
        ["--out", str(tmp_path / "study"), "--base", "--preset digits", "--grid", "disp_tau=1,2",
         "--fixed", "disp=true", "--seeds", "0", "1", "2", *extra])
    study = ablate.Study(args)
    study.check_spec()
    for (cell, seed), ratio in metrics.items():
        job = next(j for j in study.jobs if j.cell.name == cell and j.seed == seed)
        d = ablate.cell_dir(study.out, job)
        d.mkdir(parents=True)
        (d / "metrics-cfg1.json").write_text(json.dumps({"fd_ratio": ratio, "fd": 10 * ratio}))
        if cell != "baseline":  # the last logged window's terms are what the table shows
            (d / "log.jsonl").write_text(json.dumps({"step": 1, "si": 9.0, "disp": -1.0}) + "\n"
                                         + json.dumps({"step": 2, "si": 0.5, "disp": -ratio}))
    return study


def test_table_is_mean_std_over_seeds_and_delta_against_the_baseline(tmp_path):
    vals = {("baseline", 0): 2.0, ("baseline", 1): 2.2, ("baseline", 2): 2.4,
            ("disp_tau=1", 0): 3.0, ("disp_tau=1", 1): 3.3, ("disp_tau=1", 2): 3.6,
            ("disp_tau=2", 0): 1.5, ("disp_tau=2", 1): 1.5}        # one seed missing
    study = _fake_study(tmp_path, vals)
    md = ablate.report(study)
    rows = {r["cell"]: r for r in ablate.summarise(ablate.collect(study), study)}
    # by hand: baseline mean 2.2, sample std 0.2; disp_tau=1 mean 3.3 (+50%), std 0.3
    assert rows["baseline"]["stats"]["fd_ratio"] == pytest.approx((2.2, 0.2))
    assert rows["disp_tau=1"]["stats"]["fd_ratio"] == pytest.approx((3.3, 0.3))
    assert rows["disp_tau=1"]["delta"] == pytest.approx(50.0)
    assert rows["disp_tau=2"]["seeds"] == [0, 1]
    assert rows["disp_tau=2"]["delta"] == pytest.approx(100 * (1.5 / 2.2 - 1))
    assert rows["baseline"]["stats"]["recall"] is None              # not in these files
    assert "| disp_tau=1 | 1 | 3 | 3.30 +- 0.30 | n/a | 33.00 +- 3.00 |" in md
    assert "+50%" in md and "-32%" in md
    assert rows["disp_tau=1"]["stats"]["train_disp"] == pytest.approx((-3.3, 0.3))
    assert rows["baseline"]["stats"]["train_disp"] is None
    assert "disp term (end)" in md and "positive term (end)" not in md
    with open(study.out / "results.csv") as f:
        got = list(csv.DictReader(f))
    assert len(got) == 8 and {r["cell"] for r in got} == {"baseline", "disp_tau=1", "disp_tau=2"}
    assert statistics.stdev(float(r["fd_ratio"]) for r in got if r["cell"] == "baseline") == \
        pytest.approx(0.2)
    assert (study.out / "results.png").stat().st_size > 1000


def test_curves_over_steps_and_the_headline_interval(tmp_path):
    """eval.jsonl of each run -> per (cell, step) mean and sample std over seeds, by hand; a
    step written twice (a resumed run) counts once, its last record; one run's 90% interval
    becomes its half-width column."""
    study = _fake_study(tmp_path, {("baseline", 0): 2.0, ("baseline", 1): 2.0,
                                   ("disp_tau=1", 0): 3.0})
    d0 = ablate.cell_dir(study.out, study.jobs[0])
    d1 = ablate.cell_dir(study.out, study.jobs[1])
    recs = {d0: [(10, 4.0, 0.0), (20, 2.0, 0.1), (20, 3.0, 0.2)], d1: [(10, 6.0, 0.0),
                                                                         (20, 5.0, 0.4)]}
    for d, points in recs.items():
        (d / "eval.jsonl").write_text("".join(
            json.dumps({"step": s, "fd_ratio": r, "copies": c, "fd": 1.0}) + "\n"
            for s, r, c in points))
    (d0 / "metrics-cfg1.json").write_text(json.dumps({"fd_ratio": 2.0,
                                                      "fd_ratio_interval": [1.5, 2.9]}))
    md = ablate.report(study)
    curves = ablate.summarise_curves(ablate.collect_curves(study), study)
    assert curves["baseline"][10]["fd_ratio"] == pytest.approx((5.0, 2 ** 0.5, 2))
    assert curves["baseline"][20]["fd_ratio"] == pytest.approx((4.0, 2 ** 0.5, 2))  # 3 and 5
    assert curves["baseline"][20]["copies"] == pytest.approx((0.3, 0.1 * 2 ** 0.5, 2))
    assert "disp_tau=1" not in curves  # no eval.jsonl there
    with open(study.out / "curves.csv") as f:
        assert len(list(csv.DictReader(f))) == 4
    assert (study.out / "curves.png").stat().st_size > 1000
    assert "| baseline | 5.000 +- 1.414 | 4.000 +- 1.414 |" in md and "copy rate:" in md
    rows = {r["cell"]: r for r in ablate.summarise(ablate.collect(study), study)}
    assert rows["baseline"]["stats"]["fd_ratio_halfwidth"] == pytest.approx((0.7, 0.0))


def test_print_commands_lists_only_unfinished_runs(tmp_path, capsys):
    out = str(tmp_path / "s")
    argv = ["--out", out, "--base", "--preset digits --data-dir d", "--grid", "disp_tau=1,2",
            "--fixed", "disp=true", "--seeds", "0", "1", "--print-commands"]
    assert ablate.main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 6                                          # 3 cells x 2 seeds
    for line in lines:
        assert subprocess.run(["bash", "-n", "-c", line]).returncode == 0
    assert "--disp --disp-tau 2 --seed 1" in lines[-1] and "--cfg-scale 1" in lines[-1]
    # a finished run (all its outputs present) is not printed again
    study = ablate.Study(ablate.build_parser().parse_args(argv))
    for _, _, done in study.commands(study.jobs[0]):
        done.parent.mkdir(parents=True, exist_ok=True)
        done.write_text("{}")
    assert ablate.main(argv) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 5


def test_study_settings_cannot_change_under_the_same_out(tmp_path, capsys):
    out = str(tmp_path / "s")
    base = ["--out", out, "--grid", "disp_tau=1", "--print-commands"]
    assert ablate.main([*base, "--base", "--preset digits"]) == 0
    assert ablate.main([*base, "--base", "--preset digits --max-train-steps 9"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ablate.py: error: ") and "other settings" in err
    assert len(err.splitlines()) == 1
    assert ablate.main([*base, "--base", "--preset digits", "--seeds", "7"]) == 0  # seeds may grow
    assert ablate.main([*base, "--base", "--preset digits --seed 3"]) == 2
    assert ablate.main([*base, "--base", "--preset digits", "--jobs", "999"]) == 2


def _sweep(data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "ablate.py"), "--out", str(out), "--no-baseline",
            "--base", f"{TINY} --data-dir {data}", "--grid", "disp_lambda=0.1,0.5",
            "--fixed", "disp=true", "disp_tau=0.5", "--num-samples", "20",
            "--generate", "--num-steps 2", "--eval-args", "--splits 5", "--jobs", "2", *extra]


@pytest.mark.slow
def test_killed_sweep_rerun_gives_the_same_results(tmp_path):
    data = encode(tmp_path / "digits", 8)
    out = tmp_path / "sweep"
    cmd = _sweep(data, out, "--seeds", "0", "1")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            cwd=REPO, start_new_session=True)
    # kill the whole sweep once a training has checkpointed but not finished
    interrupted = None
    deadline = time.time() + 600
    while interrupted is None and time.time() < deadline and proc.poll() is None:
        for ckpts in out.glob("runs/*/seed*/checkpoints/step-0000002"):
            run_dir = ckpts.parent.parent
            if not (run_dir / "train.done").exists() and (ckpts / "checksums.json").exists():
                interrupted = run_dir
                break
        time.sleep(0.05)
    assert interrupted is not None, "no training was caught between checkpoints"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "results.csv").exists()

    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| disp_lambda=0.5 | 1 | 2 |" in (out / "results.md").read_text()
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and all(float(r["fd_ratio"]) > 0 for r in rows)
    assert (out / "results.png").is_file()

    # the interrupted (cell, seed), run again from scratch without a kill: the same numbers
    cell, seed = interrupted.parent.name, int(interrupted.name[4:])
    ref_out = tmp_path / "fresh"
    ref = _sweep(data, ref_out, "--seeds", str(seed))
    ref[ref.index("disp_lambda=0.1,0.5")] = cell
    subprocess.run(ref, check=True, capture_output=True, cwd=REPO)
    with open(ref_out / "results.csv") as f:
        fresh = list(csv.DictReader(f))
    assert len(fresh) == 1
    resumed = [r for r in rows if r["cell"] == cell and r["seed"] == str(seed)]
    assert resumed == fresh
    # and the rerun of a finished sweep changes nothing
    before = (out / "results.csv").read_bytes()
    subprocess.run(cmd, check=True, capture_output=True, cwd=REPO)
    assert (out / "results.csv").read_bytes() == before

"""train.py --eval-every: the logged metric is the one evaluate.py computes on generate.py's samples
of the same EMA, it is logged to eval.jsonl and the trackers, and exact resume is unchanged."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import (REPO, assert_same_run, encode, kill_then_resume, run,
                            train_cmd)

EVAL = ["--eval-every", "2", "--eval-samples", "20", "--eval-num-steps", "3"]


@pytest.fixture(scope="module")
def digits8(tmp_path_factory) -> Path:
    return encode(tmp_path_factory.mktemp("d8") / "digits", 8)


def eval_lines(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "eval.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_online_digits_metric_equals_evaluate_on_generated_samples(digits8, tmp_path):
    p = run(train_cmd(digits8, tmp_path, "--max-train-steps", "4", *EVAL))
    rd = tmp_path / "run"
    recs = eval_lines(rd)
    assert [r["step"] for r in recs] == [2, 4]
    assert "eval step 4 (20 samples, 3 steps, cfg 1)" in p.stdout
    # the same EMA (step 4 export), sampler, seed and labels through the scripts
    run([sys.executable, str(REPO / "generate.py"), "--ckpt", str(rd), "--mode", "ode",
         "--num-steps", "3", "--num-fid-samples", "20", "--label-sampling", "equal",
         "--sample-dir", str(tmp_path / "s")])
    from evaluation.digits import digits_metrics
    with np.load(tmp_path / "s" / "samples.npz") as z:
        expected = digits_metrics(z["arr_0"], z["arr_1"], splits=0)
    # Not bit-equal: the classifier's features and the covariances are BLAS matmuls, whose
    # rounding depends on how many threads split the reduction, and train.py's process need not
    # run numpy with this one's thread count. The Frechet distance, a difference of traces much
    # larger than itself, turns that into ~1e-9 relative (measured: floor 27.47163834 vs
    # 27.47163837 on a loaded 2-core machine); rel 1e-6 stays far below what another EMA, sample
    # or seed would move (percents).
    for key in ("fd", "fd_floor", "fd_ratio", "precision", "recall", "class_accuracy",
                "diversity", "copies"):
        assert recs[-1][key] == pytest.approx(expected[key], rel=1e-6, abs=1e-12), key


@pytest.mark.slow
def test_online_eval_leaves_exact_resume_unchanged(digits8, tmp_path):
    steps = 8
    extra = ["--max-train-steps", str(steps), *EVAL]
    run(train_cmd(digits8, tmp_path / "ref", *extra))
    kill_then_resume(train_cmd(digits8, tmp_path / "int", *extra), tmp_path / "int" / "run", 5)
    assert_same_run(tmp_path / "ref" / "run", tmp_path / "int" / "run", steps)
    assert eval_lines(tmp_path / "ref" / "run") == eval_lines(tmp_path / "int" / "run")


def _not_digits(digits8: Path, dest: Path) -> Path:
    shutil.copytree(digits8, dest)
    m = json.loads((dest / "manifest.json").read_text())
    m["source"]["type"] = "folder"  # the same shards, described as an image folder
    (dest / "manifest.json").write_text(json.dumps(m))
    return dest


def test_online_eval_without_a_metric_is_a_clear_error(digits8, tmp_path, capsys):
    import train
    data = _not_digits(digits8, tmp_path / "data")
    assert train.main(["--data-dir", str(data), "--output-dir", str(tmp_path / "out"),
                       "--eval-every", "2", "--report-to", "none", "--model", "SiT-S/2",
                       "--depth", "1", "--hidden-size", "32", "--num-heads", "2",
                       "--batch-size", "16"]) == 2
    assert "--eval-every needs digits shards" in capsys.readouterr().err


@pytest.mark.slow
def test_online_adm_metrics_with_a_reference_batch(digits8, tmp_path):
    """Other data: IS/FID/sFID/P/R against --eval-reference with --inception (random weights
    here), the same numbers as evaluate.py on generate.py's samples."""
    from evaluation.adm import NpzImages, compute_metrics
    from evaluation.digits import digits_real_images
    from models.inception import FIDInceptionV3, load_inception
    torch.manual_seed(0)
    weights = tmp_path / "inception.pth"
    torch.save(FIDInceptionV3().state_dict(), weights)
    ref = tmp_path / "ref.npz"
    np.savez(ref, digits_real_images()[0][:24])
    data = _not_digits(digits8, tmp_path / "data")
    run(train_cmd(data, tmp_path, "--max-train-steps", "2", "--eval-every", "2",
                  "--eval-samples", "12", "--eval-num-steps", "2", "--eval-reference", str(ref),
                  "--inception", str(weights)))
    rec = eval_lines(tmp_path / "run")[-1]
    run([sys.executable, str(REPO / "generate.py"), "--ckpt", str(tmp_path / "run"),
         "--num-steps", "2", "--num-fid-samples", "12", "--label-sampling", "equal",
         "--sample-dir", str(tmp_path / "s")])
    expected = compute_metrics(NpzImages(tmp_path / "s" / "samples.npz"), NpzImages(ref),
                               load_inception(weights))
    for key in ("fid", "sfid", "inception_score", "precision", "recall"):
        assert rec[key] == pytest.approx(expected[key], rel=1e-6, abs=1e-9), key

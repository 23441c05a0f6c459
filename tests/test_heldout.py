"""The held-out protocol: ``encode.py --source digits --subset train|heldout --subset-size N`` and
``evaluate.py digits --heldout DATA`` (docs/CONVENTIONS.md §12).

Checked against hand-built cases: the split's counts and disjointness, an exact copy of a training
digit is a copy, a held-out real digit is not, a mirrored training digit is a copy only when the
model saw mirrored digits, and the Frechet reference and floor are digits the model never saw.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from evaluate import main as evaluate_main
from evaluation.digits import (comparison_for_data, digits_metrics, digits_pixels,
                               digits_real_images, digits_reference, heldout_comparison)
from preprocessing.shards import read_manifest
from preprocessing.sources import DigitsSource, digits_subset_indices
from tests.conftest import encode


@pytest.fixture(scope="module")
def real():
    return digits_real_images()


def test_split_is_class_balanced_disjoint_and_seeded(real):
    _, labels = real
    train, held = digits_subset_indices(labels, 300, seed=0)
    assert np.bincount(labels[train]).tolist() == [30] * 10  # round-robin over the classes
    assert len(np.intersect1d(train, held)) == 0
    assert np.array_equal(np.union1d(train, held), np.arange(1797))
    again, _ = digits_subset_indices(labels, 300, seed=0)
    other, _ = digits_subset_indices(labels, 300, seed=1)
    assert np.array_equal(train, again) and not np.array_equal(train, other)
    # 905 is not a multiple of 10: the first five classes in turn get one more
    counts = np.bincount(labels[digits_subset_indices(labels, 905, 0)[0]])
    assert counts.tolist() == [91] * 5 + [90] * 5
    for bad in (0, 1797):
        with pytest.raises(ValueError, match="between 1 and 1796"):
            digits_subset_indices(labels, bad, 0)


def test_source_sides_are_the_split(real):
    images, labels = real
    train, held = digits_subset_indices(labels, 300, seed=2)
    a = DigitsSource(8, "train", 300, 2)
    b = DigitsSource(8, "heldout", 300, 2)
    assert len(a) == 300 and len(b) == 1497
    assert [a.label(i) for i in range(len(a))] == labels[train].tolist()
    assert np.array_equal(np.asarray(a.load(7))[..., 0], images[train[7], ..., 0])
    assert b.name(0) == f"digits[{held[0]}]"
    assert a.describe() == {"type": "digits", "num_files": 300, "upscale": "nearest",
                            "subset": "train", "subset_size": 300, "subset_seed": 2}
    assert "subset" not in DigitsSource(8).describe()  # whole-digits manifests are unchanged


def test_copies_and_distance_against_digits_never_seen(real):
    images, labels = real
    ref = digits_reference()
    train, held = digits_subset_indices(labels, 300, seed=0)
    cmp = heldout_comparison(ref, 300, 0)
    pixels = digits_pixels(images)
    # the reference and floor are held-out digits, the copy set is exactly the training subset
    assert len(cmp.features_ref) + len(cmp.features_floor) == len(held)
    np.testing.assert_array_equal(cmp.pixels_copy, pixels[train])
    np.testing.assert_array_equal(cmp.pixels_probe, pixels[held])
    copies = digits_metrics(images[train], labels[train], splits=0, comparison=cmp)
    assert copies["copies"] == 1.0 and copies["nn_distance_median"] == 0.0
    pick = np.random.default_rng(0).choice(held, 300, replace=False)
    fresh = digits_metrics(images[pick], labels[pick], splits=0, comparison=cmp)
    assert fresh["copies"] <= 0.03  # the threshold is held-out digits' 1st percentile
    assert 0.6 <= fresh["fd_ratio"] <= 1.4
    assert fresh["real_b_copies"] == pytest.approx(0.01, abs=0.003)
    # the same held-out digits against all digits (which contain them): far more "copies"
    assert digits_metrics(images[pick], labels[pick], splits=0)["copies"] > 0.3


def test_mirrored_training_digit_is_a_copy_only_with_hflip(real):
    images, labels = real
    ref = digits_reference()
    train, _ = digits_subset_indices(labels, 300, seed=0)
    mirrored = images[train][:, :, ::-1]
    plain = heldout_comparison(ref, 300, 0, hflip=False)
    flipped = heldout_comparison(ref, 300, 0, hflip=True)
    assert len(flipped.pixels_copy) == 600
    m_flip = digits_metrics(mirrored, labels[train], splits=0, comparison=flipped)
    m_plain = digits_metrics(mirrored, labels[train], splits=0, comparison=plain)
    assert m_flip["copies"] == 1.0
    assert m_plain["copies"] < 0.5  # most digits are not mirror-symmetric


def test_encode_subsets_and_evaluate_heldout(tmp_path, real, capsys):
    images, labels = real
    train_dir = encode(tmp_path / "train", 8, "--subset", "train", "--subset-size", "300",
                       "--subset-seed", "3")
    held_dir = encode(tmp_path / "held", 8, "--subset", "heldout", "--subset-size", "300",
                      "--subset-seed", "3")
    mt, mh = read_manifest(train_dir), read_manifest(held_dir)
    assert mt["count"] == 300 and mh["count"] == 1497
    assert mt["source"]["subset"] == "train" and mh["source"]["subset"] == "heldout"
    assert mt["config_sha256"] != mh["config_sha256"]
    cmp = comparison_for_data(mt)
    train, held = digits_subset_indices(labels, 300, seed=3)
    np.testing.assert_array_equal(cmp.pixels_copy, digits_pixels(images[train]))
    # trained on the held-out side: the roles swap
    np.testing.assert_array_equal(comparison_for_data(mh).pixels_copy,
                                  digits_pixels(images[held]))

    npz, out = tmp_path / "samples.npz", tmp_path / "m.json"
    np.savez(npz, images[train[:100]], labels[train[:100]])
    assert evaluate_main(["digits", str(npz), "--heldout", str(train_dir), "--splits", "0",
                          "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "compared with: held-out: trained on 300 digits (subset seed 3)" in printed
    assert "copies of training subset" in printed
    assert json.loads(out.read_text())["copies"] == 1.0

    whole = encode(tmp_path / "whole", 8)
    assert evaluate_main(["digits", str(npz), "--heldout", str(whole)]) == 2
    assert "not a digits subset" in capsys.readouterr().err


def test_subset_flags_are_checked(tmp_path):
    import subprocess
    import sys

    from tests.conftest import REPO, script_env
    for args, message in ((["--subset", "train"], "--subset and --subset-size go together"),
                          (["--subset", "train", "--subset-size", "1797"], "between 1 and 1796")):
        p = subprocess.run([sys.executable, str(REPO / "preprocessing/encode.py"), "--source",
                            "digits", "--dest", str(tmp_path / "d"), "--vae", "none",
                            "--resolution", "8", *args], capture_output=True, text=True,
                           env=script_env())
        assert p.returncode == 2 and message in p.stderr, p.stderr

"""evaluate.py digits-accuracy: the class accuracy of generated digits, by the digits metric's own
classifier (evaluation/digits.py), checked against facts known without the code: real digits it
never saw are recognised, wrong or shuffled labels are not."""
from __future__ import annotations

import json

import numpy as np
import pytest

from evaluate import main
from evaluation.digits import digits_class_accuracy, digits_metrics, digits_pixels


def real_digit_images(upscale: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """sklearn digits as encode.py stores them, then as samples.npz holds them:
    u = round(v * 255 / 16) grey -> RGB, nearest upscaling."""
    from sklearn.datasets import load_digits
    d = load_digits()
    u = np.round(d.images * 255.0 / 16.0).astype(np.uint8)
    u = u.repeat(upscale, axis=1).repeat(upscale, axis=2)
    return np.repeat(u[..., None], 3, axis=-1), d.target


def held_out_digits() -> tuple[np.ndarray, np.ndarray]:
    """Real B: the half of the digits the classifier is not fitted on (the documented split,
    sklearn's stratified train_test_split, half each, random_state 0)."""
    from sklearn.model_selection import train_test_split
    imgs, labels = real_digit_images()
    _, ib = train_test_split(np.arange(len(labels)), test_size=0.5, random_state=0,
                             stratify=labels)
    ib = np.sort(ib)
    return imgs[ib], labels[ib]


@pytest.mark.parametrize("upscale", [1, 2])
def test_pixels_invert_the_encoding(upscale):
    from sklearn.datasets import load_digits
    imgs, _ = real_digit_images(upscale)
    # uint8 rounding costs at most half a level: 0.5 * 16 / 255
    assert np.abs(digits_pixels(imgs) - load_digits().data).max() <= 0.5 * 16 / 255 + 1e-12


def test_held_out_real_digits_are_recognised_and_wrong_labels_are_not():
    imgs, labels = held_out_digits()
    res = digits_class_accuracy(imgs, labels)
    assert res["accuracy"] >= 0.95 and res["num_images"] == 899
    assert res["accuracy"] == res["real_heldout_accuracy"]  # real B is what it reports for scale
    assert min(res["per_class"].values()) >= 0.85 and sorted(res["per_class"]) == list(range(10))
    # every digit labelled as the next class: right only where the classifier is wrong
    assert digits_class_accuracy(imgs, (labels + 1) % 10)["accuracy"] <= 1 - res["accuracy"]
    # labels shuffled: chance, 10% (binomial sd over 899 digits: 1%)
    shuffled = np.random.default_rng(0).permutation(labels)
    assert 0.05 <= digits_class_accuracy(imgs, shuffled)["accuracy"] <= 0.15


def test_noise_is_not_recognised():
    rng = np.random.default_rng(1)
    noise = rng.integers(0, 256, size=(500, 8, 8, 3), dtype=np.uint8)
    assert digits_class_accuracy(noise, rng.integers(0, 10, 500))["accuracy"] < 0.3


def test_same_classifier_as_the_digits_metric():
    imgs, labels = held_out_digits()
    pick = np.random.default_rng(2).choice(len(labels), 120, replace=False)
    m = digits_metrics(imgs[pick], labels[pick], splits=0)
    res = digits_class_accuracy(imgs[pick], labels[pick])
    assert res["accuracy"] == m["class_accuracy"]
    assert res["per_class"] == m["per_class_accuracy"]


def test_bad_labels():
    imgs, labels = real_digit_images()
    with pytest.raises(ValueError, match="10 images but 9 labels"):
        digits_class_accuracy(imgs[:10], labels[:9])
    with pytest.raises(ValueError, match="0..9"):
        digits_class_accuracy(imgs[:10], labels[:10] + 1)


def test_cli(tmp_path, capsys):
    imgs, labels = held_out_digits()
    np.savez(tmp_path / "s.npz", imgs[:200], labels[:200])
    assert main(["digits-accuracy", str(tmp_path / "s.npz"), "--json",
                 str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    saved = json.loads((tmp_path / "r.json").read_text())
    direct = digits_class_accuracy(imgs[:200], labels[:200])
    assert saved["accuracy"] == direct["accuracy"] and saved["num_images"] == 200
    assert (f"recognised as their class: {100 * direct['accuracy']:.1f}% of 200 (the digits "
            f"metric's classifier") in out
    np.savez(tmp_path / "nolabels.npz", imgs[:5])
    assert main(["digits-accuracy", str(tmp_path / "nolabels.npz")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("evaluate.py: error: ") and "no labels" in err

"""evaluate.py digits-accuracy: the classifier used to judge the CPU demo's samples."""
from __future__ import annotations

import numpy as np
import pytest

from evaluate import digits_accuracy, digits_to_features, main


def real_digit_images(upscale: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """sklearn digits as encode.py stores them, then as samples.npz holds them:
    u = round(v * 255 / 16) grey -> RGB, nearest upscaling."""
    from sklearn.datasets import load_digits
    d = load_digits()
    u = np.round(d.images * 255.0 / 16.0).astype(np.uint8)
    u = u.repeat(upscale, axis=1).repeat(upscale, axis=2)
    return np.repeat(u[..., None], 3, axis=-1), d.target


@pytest.mark.parametrize("upscale", [1, 2])
def test_features_invert_the_encoding(upscale):
    from sklearn.datasets import load_digits
    imgs, _ = real_digit_images(upscale)
    feats = digits_to_features(imgs)
    # uint8 rounding costs at most half a level: 0.5 * 16 / 255
    assert np.abs(feats - load_digits().data).max() <= 0.5 * 16 / 255 + 1e-12


def test_real_digits_are_recognised_and_noise_is_not():
    imgs, labels = real_digit_images()
    res = digits_accuracy(imgs, labels)
    assert res["real_heldout_accuracy"] >= 0.97 and res["accuracy"] >= 0.97
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, size=(500, 8, 8, 3), dtype=np.uint8)
    assert digits_accuracy(noise, rng.integers(0, 10, 500))["accuracy"] < 0.3
    shuffled = digits_accuracy(imgs, np.roll(labels, 1))  # right images, wrong labels
    assert shuffled["accuracy"] < 0.3


def test_cli(tmp_path, capsys):
    imgs, labels = real_digit_images()
    np.savez(tmp_path / "s.npz", imgs[:200], labels[:200])
    assert main(["digits-accuracy", str(tmp_path / "s.npz"), "--json",
                 str(tmp_path / "r.json")]) == 0
    assert "recognised as their class" in capsys.readouterr().out
    np.savez(tmp_path / "nolabels.npz", imgs[:5])
    assert main(["digits-accuracy", str(tmp_path / "nolabels.npz")]) == 2

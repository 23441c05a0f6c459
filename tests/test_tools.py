"""tools/feature_spread.py against hand-computed values."""
from __future__ import annotations

import math
import sys

import pytest
import torch

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "tools"))
import feature_spread  # noqa: E402

from models.sit import SiT  # noqa: E402


def test_spread_by_hand():
    # rows (0,0), (2,0), (0,2), M = 2: squared distances / M are 2, 2 and 4 (pairs 01, 02, 12)
    s = feature_spread.spread(torch.tensor([[0., 0.], [2., 0.], [0., 2.]]))
    assert s["rms"] == pytest.approx(math.sqrt(8 / 6))
    assert s["median_sq_dist"] == pytest.approx(2.0)        # of 2, 2, 2, 2, 4, 4 (lower middle)
    assert s["infonce_l2"] == pytest.approx(math.log((3 + 4 * math.exp(-2) + 2 * math.exp(-4)) / 9))


def test_model_spread_reads_the_first_and_last_block():
    torch.manual_seed(0)
    model = SiT(input_size=4, patch_size=1, in_channels=3, hidden_size=16, depth=3, num_heads=2,
                num_classes=10).eval()
    x, eps = torch.randn(8, 3, 4, 4), torch.randn(8, 3, 4, 4)
    y = torch.arange(8)
    out = feature_spread.model_spread(model, x, y, eps, times=(0.5,))
    assert set(out) == {f"{b}_{k}_t0.5" for b in ("first", "last")
                        for k in ("rms", "median_sq_dist", "infonce_l2")}
    with torch.no_grad():
        _, aux = model(0.5 * x + 0.5 * eps, torch.full((8,), 0.5), y, return_features=[3])
    z = aux["features"][3].double()
    assert out["last_rms_t0.5"] == pytest.approx(z.square().mean().sqrt().item())

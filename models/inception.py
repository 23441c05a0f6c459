"""The FID Inception-v3, written here, with the TF1 input pipeline of the ADM evaluator.

This is the network behind every published FID/sFID/IS number: TensorFlow's
``inception-2015-12-05`` graph, as ported to PyTorch by pytorch-fid (``fid_inception_v3``). The
layout is torchvision's Inception3 without the auxiliary head, with the FID variants of three
blocks: the A and C blocks (Mixed_5b-d, Mixed_6b-e) and E_1 (Mixed_7b) average-pool their pool
branch with ``count_include_pad=False``, and E_2 (Mixed_7c) max-pools it. The classifier has 1008
outputs. BatchNorm eps is 0.001, convolutions have no bias.

Weights
-------
The public port of the TF weights is ``pt_inception-2015-12-05-6726825d.pth`` (95 MB), attached to
pytorch-fid's GitHub releases::

    https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth

Nothing downloads it at run time: pass its path (``load_inception(path)``, ``--inception PATH``)
or set ``FID_INCEPTION_WEIGHTS=PATH``. It is a plain state dict, read with
``torch.load(weights_only=True)`` and loaded with ``strict=True``. Its names are exactly this
module's (``num_batches_tracked`` may be absent; BatchNorm fills it in):

- ``Conv2d_1a_3x3``, ``Conv2d_2a_3x3``, ``Conv2d_2b_3x3``, ``Conv2d_3b_1x1``, ``Conv2d_4a_3x3``:
  stem convolutions, each ``<name>.conv.weight`` and ``<name>.bn.{weight,bias,running_mean,
  running_var}`` (e.g. ``Conv2d_1a_3x3.conv.weight`` (32, 3, 3, 3)).
- ``Mixed_5b``, ``Mixed_5c``, ``Mixed_5d`` (A): ``branch1x1``, ``branch5x5_1``, ``branch5x5_2``,
  ``branch3x3dbl_1..3``, ``branch_pool``.
- ``Mixed_6a`` (B): ``branch3x3``, ``branch3x3dbl_1..3``.
- ``Mixed_6b`` .. ``Mixed_6e`` (C): ``branch1x1``, ``branch7x7_1..3``, ``branch7x7dbl_1..5``,
  ``branch_pool``.
- ``Mixed_7a`` (D): ``branch3x3_1``, ``branch3x3_2``, ``branch7x7x3_1..4``.
- ``Mixed_7b``, ``Mixed_7c`` (E): ``branch1x1``, ``branch3x3_1``, ``branch3x3_2a``,
  ``branch3x3_2b``, ``branch3x3dbl_1``, ``branch3x3dbl_2``, ``branch3x3dbl_3a``,
  ``branch3x3dbl_3b``, ``branch_pool``
  (e.g. ``Mixed_7c.branch_pool.conv.weight`` (192, 2048, 1, 1)).
- ``fc.weight`` (1008, 2048), ``fc.bias`` (1008,).

23,850,960 learnable parameters (fc included).

Input pipeline and outputs (ADM evaluator parity)
-------------------------------------------------
``forward`` takes uint8 images (N, H, W, 3) or (N, 3, H, W) (or floats holding 0..255), resizes
them to 299x299 with TF1's ``ResizeBilinear`` (align_corners=False *without* half-pixel centres:
``src = dst * in / out``; no antialiasing), maps them to ``(x - 128) / 128`` and returns
:class:`InceptionOutput`:

- ``pool3`` (N, 2048): the final average pool (FID, precision/recall);
- ``spatial`` (N, 2023): ``Mixed_6d.branch1x1`` output channels ``[:7]`` flattened in NHWC order,
  the tensor ``mixed_6/conv`` of the TF graph (sFID);
- ``logits`` (N, 1008): ``pool3 @ fc.weight.T`` *without* the bias, as ADM computes them (IS).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.vae import WeightsNotFound

WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
               + WEIGHTS_FILE)
WEIGHTS_ENV = "FID_INCEPTION_WEIGHTS"
RESOLUTION = 299
POOL_DIM = 2048
SPATIAL_CHANNELS = 7
SPATIAL_DIM = SPATIAL_CHANNELS * 17 * 17  # 2023
NUM_LOGITS = 1008


class InceptionOutput(NamedTuple):
    pool3: torch.Tensor    # (N, 2048)
    spatial: torch.Tensor  # (N, 2023)
    logits: torch.Tensor   # (N, 1008)


# ----------------------------------------------------------------------------------------------
# TF1 bilinear resize (align_corners=False, no half-pixel centres).

def _tf1_taps(n_in: int, n_out: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Source indices (i0, i1) and weight of i1 for each output position, in float32 like TF."""
    scale = torch.tensor(n_in / n_out, dtype=torch.float32)
    src = torch.arange(n_out, dtype=torch.float32) * scale
    i0 = torch.floor(src)
    lerp = src - i0
    i0 = i0.long().clamp_(max=n_in - 1)
    i1 = (i0 + 1).clamp_(max=n_in - 1)
    return i0.to(device), i1.to(device), lerp.to(device)


def tf1_resize_bilinear(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """TF1 ``tf.image.resize_bilinear(align_corners=False)`` of a float (N, C, H, W) tensor.

    Output pixel (i, j) reads source coordinates (i * H / h, j * W / w) -- no half-pixel offset --
    and interpolates linearly between floor and floor + 1 (clamped to the border): first along
    the width, then the height, as TF does.
    """
    h_out, w_out = size
    n, c, h_in, w_in = x.shape
    x0, x1, wx = _tf1_taps(w_in, w_out, x.device)
    y0, y1, wy = _tf1_taps(h_in, h_out, x.device)
    left, right = x.index_select(3, x0), x.index_select(3, x1)
    rows = left + (right - left) * wx.to(x.dtype)
    top, bottom = rows.index_select(2, y0), rows.index_select(2, y1)
    return top + (bottom - top) * wy.to(x.dtype).view(-1, 1)


# ----------------------------------------------------------------------------------------------
# Blocks. Module names are the port's: they are the state-dict keys.

class BasicConv2d(nn.Module):
    """Conv (no bias) -> BatchNorm (eps 0.001) -> ReLU."""

    def __init__(self, cin: int, cout: int, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)), inplace=True)


def _avg_pool(x: torch.Tensor) -> torch.Tensor:
    # TF's average pool ignores the padding: count_include_pad=False (FID variant).
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_avg_pool(x)),
        ], 1)


class InceptionB(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, 3, stride=2),
        ], 1)


class InceptionC(nn.Module):
    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x: torch.Tensor, taps: dict | None = None) -> torch.Tensor:
        b1 = self.branch1x1(x)
        if taps is not None:
            taps["branch1x1"] = b1
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        for m in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                  self.branch7x7dbl_5):
            bd = m(bd)
        return torch.cat([b1, b7, bd, self.branch_pool(_avg_pool(x))], 1)


class InceptionD(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7x3_1(x)
        for m in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = m(b7)
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7,
                          F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):
    """E block; ``pool='avg'`` is the port's FIDInceptionE_1, ``'max'`` its FIDInceptionE_2."""

    def __init__(self, cin: int, pool: str):
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_1(x)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        if self.pool == "avg":
            p = _avg_pool(x)
        else:
            p = F.max_pool2d(x, 3, stride=1, padding=1)
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(b3), self.branch3x3_2b(b3),
            self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd),
            self.branch_pool(p),
        ], 1)


class FIDInceptionV3(nn.Module):
    """The FID Inception-v3 (see the module docstring for names, weights and outputs).

    A freshly built model has random weights (He-normal convolutions, so activations keep their
    scale through the 47 layers): good for tests only. Real numbers need :func:`load_inception`.
    """

    def __init__(self, resize_to: int = RESOLUTION):
        super().__init__()
        # 299 always for real numbers; a smaller size only makes tests fast (sFID dims change).
        self.resize_to = resize_to
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, 32)
        self.Mixed_5c = InceptionA(256, 64)
        self.Mixed_5d = InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, 128)
        self.Mixed_6c = InceptionC(768, 160)
        self.Mixed_6d = InceptionC(768, 160)
        self.Mixed_6e = InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, "avg")
        self.Mixed_7c = InceptionE(2048, "max")
        self.fc = nn.Linear(2048, NUM_LOGITS)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
        nn.init.normal_(self.fc.weight, std=2048 ** -0.5)
        nn.init.normal_(self.fc.bias, std=0.1)  # non-zero, so a test can see it is not used
        self.eval()

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, H, W, 3) or (N, 3, H, W) -> float (N, 3, 299, 299) in [-1, 1) as ADM feeds it.

        Channels last when the last axis is 3 and the second is not; (N, 3, H, 3) reads as NCHW.
        """
        if images.ndim != 4:
            raise ValueError(f"expected a batch of images (N, H, W, 3) or (N, 3, H, W), got shape "
                             f"{tuple(images.shape)}")
        if images.shape[-1] == 3 and images.shape[1] != 3:
            images = images.permute(0, 3, 1, 2)
        elif images.shape[1] != 3:
            raise ValueError(f"expected 3 colour channels (N, H, W, 3) or (N, 3, H, W), got shape "
                             f"{tuple(images.shape)}")
        x = tf1_resize_bilinear(images.float(), (self.resize_to, self.resize_to))
        return (x - 128.0) / 128.0

    def forward(self, images: torch.Tensor) -> InceptionOutput:
        x = self.preprocess(images)
        x = self.Conv2d_1a_3x3(x)
        x = self.Conv2d_2a_3x3(x)
        x = self.Conv2d_2b_3x3(x)
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_3b_1x1(x)
        x = self.Conv2d_4a_3x3(x)
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))
        x = self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(x)))
        taps: dict[str, torch.Tensor] = {}
        x = self.Mixed_6d(x, taps)
        spatial = taps["branch1x1"][:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(self.Mixed_6e(x))))
        pool3 = x.mean(dim=(2, 3))
        logits = pool3 @ self.fc.weight.T  # no bias: ADM's softmax graph skips it
        return InceptionOutput(pool3, spatial, logits)


def load_inception(path: str | os.PathLike | None = None,
                   device: torch.device | str = "cpu") -> FIDInceptionV3:
    """The FID Inception with the public weights from ``path`` (or ``$FID_INCEPTION_WEIGHTS``).

    Raises :class:`WeightsNotFound` naming the file, where to get it and how to pass it.
    """
    how = (f"Download {WEIGHTS_FILE} (the FID Inception weights, ported from TensorFlow's "
           f"inception-2015-12-05 by pytorch-fid) on a machine with network:\n"
           f"    {WEIGHTS_URL}\n"
           f"then pass it with --inception PATH (evaluate.py) or set {WEIGHTS_ENV}=PATH. "
           f"Nothing is downloaded at run time.")
    if path is None:
        path = os.environ.get(WEIGHTS_ENV) or None
    if path is None:
        raise WeightsNotFound(f"no Inception weights given.\n{how}")
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsNotFound(f"Inception weights not found at {path}.\n{how}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict ({type(state).__name__})")
    model = FIDInceptionV3()
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path} is not the FID Inception state dict ({WEIGHTS_FILE} layout):\n"
                         f"{e}") from None
    return model.to(device).eval().requires_grad_(False)

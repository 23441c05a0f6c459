"""The shard reader used by training: coverage, sharding, flips, posterior sampling, resume."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from preprocessing.encode import main as encode_main
from preprocessing.shards import ShardDataset, ShardLoader, latent_scale_bias, latents_from_raw


@pytest.fixture(scope="module")
def pixel_dir(tmp_path_factory):
    """Digits in pixel space (scale 1, bias 0), mirrored copies and images, 8 shards."""
    dest = tmp_path_factory.mktemp("px") / "d"
    assert encode_main(["--source", "digits", "--dest", str(dest), "--resolution", "8",
                        "--vae", "none", "--dtype", "fp32", "--hflip", "--store-images",
                        "--shard-size", "230", "--num-workers", "0"]) == 0
    return dest


@pytest.fixture(scope="module")
def moments_dir(tmp_path_factory, tiny_vae_dir):
    dest = tmp_path_factory.mktemp("mo") / "d"
    assert encode_main(["--source", "digits", "--dest", str(dest), "--resolution", "16",
                        "--vae", str(tiny_vae_dir), "--max-images", "96", "--shard-size", "32",
                        "--dtype", "fp32", "--num-workers", "0"]) == 0
    return dest


def stored(dest) -> dict[str, torch.Tensor]:
    m = json.loads((dest / "manifest.json").read_text())
    parts = [load_file(dest / s["file"]) for s in m["shards"]]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_sample_once_per_epoch_across_ranks(pixel_dir, world):
    ds = ShardDataset(pixel_dir)
    n, bs = len(ds), 50
    seen = []
    for epoch in range(2):
        got = []
        for rank in range(world):
            loader = ShardLoader(ds, bs, rank=rank, world_size=world, seed=3)
            loader.epoch = epoch
            for b in loader:
                assert b["x"].shape[0] == bs
                got.append(b["index"])
        got = torch.cat(got)
        steps = n // (bs * world)
        assert got.numel() == steps * bs * world
        assert got.unique().numel() == got.numel()          # no sample twice in an epoch
        seen.append(got)
    assert not torch.equal(seen[0], seen[1])                  # reshuffled every epoch


def test_values_labels_flips_and_images(pixel_dir):
    ref = stored(pixel_dir)
    by_index = {int(i): k for k, i in enumerate(ref["index"])}
    ds = ShardDataset(pixel_dir, with_images=True)
    loader = ShardLoader(ds, 64, seed=0)
    flips = []
    for b in loader:
        rows = torch.tensor([by_index[int(i)] for i in b["index"]])
        assert torch.equal(b["y"], ref["labels"][rows])
        want = torch.where(b["flip"].view(-1, 1, 1, 1), ref["latents_flip"][rows],
                           ref["latents"][rows])
        assert torch.equal(b["x"], want)                      # scale 1, bias 0: values as stored
        want_img = torch.where(b["flip"].view(-1, 1, 1, 1), ref["images"][rows].flip(-1),
                               ref["images"][rows])
        assert torch.equal(b["image"], want_img)
        # The mirrored latent of a pixel-space sample is the mirrored image, in [-1, 1].
        torch.testing.assert_close(b["x"], b["image"].float() / 127.5 - 1, atol=1e-6, rtol=0)
        flips.append(b["flip"])
    rate = torch.cat(flips).float().mean().item()
    assert 0.45 < rate < 0.55
    no_flip = ShardLoader(ds, 64, seed=0, hflip=False)
    assert not any(b["flip"].any() for b in no_flip)


def test_batches_touch_few_shards(pixel_dir):
    ds = ShardDataset(pixel_dir)
    loader = ShardLoader(ds, 64, seed=1, shard_window=2)
    for b in loader:
        shards = torch.searchsorted(ds.offsets, b["position"], right=True) - 1
        assert shards.unique().numel() <= 4                   # at most two adjacent windows


def test_posterior_is_resampled_with_the_right_moments(moments_dir):
    ref = stored(moments_dir)
    mean, std = ref["moments"].chunk(2, dim=1)
    ds = ShardDataset(moments_dir)
    scale = ds.manifest["latent"]["scale"]
    assert scale == pytest.approx(0.18215)                    # the tiny VAE's default factor
    loader = ShardLoader(ds, 96, seed=0, hflip=False)
    pos_of = {int(i): k for k, i in enumerate(ref["index"])}
    draws = []
    for _ in range(400):
        b = next(iter(loader))
        rows = torch.tensor([pos_of[int(i)] for i in b["index"]])
        draws.append(b["x"][torch.argsort(rows)])
    z = torch.stack(draws).double()                           # (draws, N, C, h, w)
    assert not torch.equal(z[0], z[1])                        # fresh noise every epoch
    # Mean and std of the draws estimate (mean, std) * scale: 400 draws -> ~5% error bars.
    torch.testing.assert_close(z.mean(0), mean.double() * scale,
                               atol=float(4 * std.max() * scale / 20), rtol=0)
    ratio = z.std(0) / (std.double() * scale)
    assert 0.85 < ratio.mean() < 1.15 and ratio.min() > 0.6 and ratio.max() < 1.4


def test_raw_output_sampled_on_device_matches_formula(moments_dir):
    ds = ShardDataset(moments_dir)
    loader = ShardLoader(ds, 32, output="raw", hflip=False)
    b = next(iter(loader))
    assert b["x"].dtype == torch.float32 and b["x"].shape[1] == 8  # moments (mean, std)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    z = loader.to_latents(b["x"], g1)
    mean, std = b["x"].chunk(2, 1)
    eps = torch.randn(mean.shape, generator=g2)
    torch.testing.assert_close(z, (mean + std * eps) * 0.18215 + 0.0)


def test_channel_normalisation(pixel_dir):
    ds = ShardDataset(pixel_dir, latent_norm="channel")
    loader = ShardLoader(ds, len(ds), hflip=False, shuffle=False)
    x = next(iter(loader))["x"].double()
    # The manifest's per-channel stats are of the stored (unflipped) data, so this is exact.
    torch.testing.assert_close(x.mean((0, 2, 3)), torch.zeros(3, dtype=torch.float64),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(x.std((0, 2, 3), unbiased=False),
                               torch.ones(3, dtype=torch.float64), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="manifest' or 'channel"):
        latent_scale_bias(ds.manifest, "bogus")


@pytest.mark.parametrize("prefetch", [0, 2])
def test_resume_mid_epoch_is_exact(moments_dir, prefetch):
    ds = ShardDataset(moments_dir)

    def run(n_batches, state=None):
        loader = ShardLoader(ds, 16, rank=1, world_size=2, seed=9, prefetch=prefetch)
        if state is not None:
            loader.load_state_dict(state)
        out = []
        while len(out) < n_batches:
            for b in loader:
                out.append(b)
                if len(out) == n_batches:
                    break
        return out, loader.state_dict()

    full, _ = run(7)                                          # 3 batches/epoch: crosses 2 epochs
    head, state = run(4)
    assert state == {"epoch": 1, "step": 1, "seed": 9, "batch_size": 16, "world_size": 2,
                     "num_samples": 96}
    state = json.loads(json.dumps(state))                     # survives a JSON checkpoint
    tail, _ = run(3, state)
    for a, b in zip(full, head + tail):
        assert torch.equal(a["index"], b["index"]) and torch.equal(a["x"], b["x"])
    with pytest.raises(ValueError, match="batch_size"):
        ShardLoader(ds, 8, rank=1, world_size=2, seed=9).load_state_dict(state)


def test_map_style_access(pixel_dir):
    ds = ShardDataset(pixel_dir, with_images=True)
    x, y, img = ds[5]
    ref = stored(pixel_dir)
    assert x.shape == (3, 8, 8) and img.shape == (3, 8, 8) and img.dtype == torch.uint8
    assert y == int(ref["labels"][5])
    torch.testing.assert_close(x, img.float() / 127.5 - 1, atol=1e-6, rtol=0)
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_clear_errors(moments_dir):
    with pytest.raises(ValueError, match="--store-images"):
        ShardDataset(moments_dir, with_images=True)
    ds = ShardDataset(moments_dir)
    with pytest.raises(ValueError, match="lower the batch size"):
        ShardLoader(ds, 64, world_size=2)
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        ShardDataset(moments_dir.parent)


def test_latents_from_raw_follows_device_and_dtype():
    raw = torch.tensor([[[[1.0]], [[2.0]]]], dtype=torch.float16)  # mean 1, std 2, C=1
    scale, bias = torch.full((1, 1, 1), 0.5), torch.full((1, 1, 1), 0.25)
    g = torch.Generator().manual_seed(0)
    eps = torch.randn((1, 1, 1, 1), generator=torch.Generator().manual_seed(0))
    z = latents_from_raw(raw, "moments", scale, bias, g)
    assert z.dtype == torch.float32
    torch.testing.assert_close(z, (1 + 2 * eps) * 0.5 + 0.25)
    z2 = latents_from_raw(raw[:, :1], "latents", scale, bias)
    torch.testing.assert_close(z2, torch.full((1, 1, 1, 1), 0.75))

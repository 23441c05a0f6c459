"""SiT: sizes, zero init, features/projectors, precision, compile, and checkpoint loading."""
from __future__ import annotations

import argparse

import pytest
import torch

from models.sit import (SiT, SiT_models, convert_sit_state_dict, get_model_config,
                        load_checkpoint, sincos_pos_embed_2d, timestep_embedding)

SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}


def tiny(**kw) -> SiT:
    args = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=4, num_heads=4,
                num_classes=10)
    args.update(kw)
    return SiT(**args)


def randomize(model: SiT, seed: int = 0) -> SiT:
    """Give the zero-initialised layers values so outputs are not trivially 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


@pytest.mark.parametrize("name", list(SiT_models))
def test_registry_and_output_shape_every_size(name):
    size, patch = name[4:].split("/")
    depth, hidden, heads = SIZES[size]
    assert get_model_config(name) == {"depth": depth, "hidden_size": hidden, "num_heads": heads,
                                      "patch_size": int(patch)}
    with torch.device("meta"):                      # shapes only: no memory, no time
        model = SiT_models[name](input_size=32, num_classes=1000)
        x = torch.empty(2, 4, 32, 32)
        out = model(x, torch.empty(2), torch.zeros(2, dtype=torch.long))
    assert out.shape == (2, 4, 32, 32)
    assert len(model.blocks) == depth and model.pos_embed.shape == (1, (32 // int(patch)) ** 2, hidden)


@pytest.mark.parametrize("name,millions", [("SiT-S/2", 33.0), ("SiT-B/2", 130.5),
                                           ("SiT-L/2", 458.1), ("SiT-XL/2", 675.1)])
def test_parameter_counts(name, millions):
    with torch.device("meta"):
        model = SiT_models[name](input_size=32, num_classes=1000)
    n = sum(p.numel() for p in model.parameters())
    # DiT/SiT publish counts with a learn_sigma head (2C outputs); ours has C outputs.
    hidden, p = model.hidden_size, model.patch_size
    learn_sigma_head = hidden * p * p * 4 + p * p * 4
    assert abs((n + learn_sigma_head) / 1e6 - millions) < 0.05


@pytest.mark.parametrize("name", ["SiT-S/1", "SiT-S/2", "SiT-S/4", "SiT-S/8"])
def test_small_sizes_run_and_output_zero_at_init(name):
    torch.manual_seed(0)
    model = SiT_models[name](input_size=16, num_classes=10)
    x = torch.randn(3, 4, 16, 16)
    out = model(x, torch.rand(3), torch.tensor([0, 5, 10]))  # 10 = null label
    assert out.shape == x.shape and torch.count_nonzero(out) == 0


def test_embeddings_match_formulas():
    t = torch.tensor([0.0, 0.3, 1.0])
    e = timestep_embedding(t, 8)
    w = torch.tensor([10000 ** (-k / 4) for k in range(4)])
    want = torch.cat([torch.cos(t[:, None] * w), torch.sin(t[:, None] * w)], 1)
    torch.testing.assert_close(e, want)
    pe = sincos_pos_embed_2d(8, 3)                   # token (row 1, col 2) = index 5
    om = torch.tensor([1.0, 1.0 / 100.0], dtype=torch.float64)
    col = torch.cat([torch.sin(2 * om), torch.cos(2 * om)])
    row = torch.cat([torch.sin(1 * om), torch.cos(1 * om)])
    torch.testing.assert_close(pe[5], torch.cat([col, row]).float())


def test_features_and_projectors():
    torch.manual_seed(0)
    model = randomize(tiny(z_dims=(16, 24), encoder_depth=2)).eval()
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2])
    calls = []
    for p in model.projectors:
        p.register_forward_hook(lambda *a: calls.append(1))
    out0 = model(x, t, y)
    assert calls == []                               # sampling never runs the projectors
    out, aux = model(x, t, y, return_features=[1, 4], return_proj=True)
    torch.testing.assert_close(out, out0)
    assert set(aux["features"]) == {1, 4} and len(calls) == 2
    # Independent recomputation of the block outputs.
    h = model.x_embedder(x) + model.pos_embed
    c = model.t_embedder(t) + model.y_embedder(y)
    hs = []
    for b in model.blocks:
        h = b(h, c)
        hs.append(h)
    torch.testing.assert_close(aux["features"][1], hs[0])
    torch.testing.assert_close(aux["features"][4], hs[3])
    assert [p.shape for p in aux["proj"]] == [(2, 16, 16), (2, 16, 24)]
    torch.testing.assert_close(aux["proj"][0], model.projectors[0](hs[1]))
    with pytest.raises(ValueError, match="outside 1..4"):
        model(x, t, y, return_features=[0])
    with pytest.raises(ValueError, match="encoder_depth 5"):
        tiny(z_dims=(8,), encoder_depth=5)


def test_conv_projector_keeps_grid():
    model = randomize(tiny(z_dims=(6,), encoder_depth=1, projector_type="conv",
                           projector_kernel_size=3))
    _, aux = model(torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([0, 1]), return_proj=True)
    assert aux["proj"][0].shape == (2, 16, 6)
    assert model.projectors[0].proj.weight.shape == (6, 32, 3, 3)


def test_bf16_autocast_matches_fp32():
    torch.manual_seed(0)
    model = randomize(tiny(hidden_size=64, depth=2)).eval()
    x, t, y = torch.randn(4, 4, 8, 8), torch.rand(4), torch.arange(4)
    ref = model(x, t, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(x, t, y)
    assert low.dtype == torch.bfloat16
    err = (low.float() - ref).norm() / ref.norm()
    assert err < 3e-2                                # bf16 has an 8-bit mantissa (~4e-3 per op)


def test_gradients_reach_every_trainable_parameter():
    model = randomize(tiny(z_dims=(8,), encoder_depth=2))
    out, aux = model(torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([0, 10]),
                     return_proj=True)
    (out.square().mean() + aux["proj"][0].square().mean()).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == [] and model.pos_embed.grad is None


@pytest.mark.slow
def test_torch_compile_on_cpu():
    torch.manual_seed(0)
    model = randomize(tiny()).eval()
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([0, 1])
    compiled = torch.compile(model)
    torch.testing.assert_close(compiled(x, t, y), model(x, t, y), atol=1e-5, rtol=1e-4)


def test_repa_checkpoint_layout_loads_strict(tmp_path):
    """The names and shapes of REPA's SiT-XL/2 (with one 768-d projector), written out by hand."""
    with torch.device("meta"):
        model = SiT_models["SiT-XL/2"](input_size=32, num_classes=1000, z_dims=(768,),
                                       encoder_depth=8)
    D = 1152
    expected = {
        "x_embedder.proj.weight": (D, 4, 2, 2), "x_embedder.proj.bias": (D,),
        "pos_embed": (1, 256, D),
        "t_embedder.mlp.0.weight": (D, 256), "t_embedder.mlp.0.bias": (D,),
        "t_embedder.mlp.2.weight": (D, D), "t_embedder.mlp.2.bias": (D,),
        "y_embedder.embedding_table.weight": (1001, D),
        "projectors.0.0.weight": (2048, D), "projectors.0.0.bias": (2048,),
        "projectors.0.2.weight": (2048, 2048), "projectors.0.2.bias": (2048,),
        "projectors.0.4.weight": (768, 2048), "projectors.0.4.bias": (768,),
        "final_layer.linear.weight": (16, D), "final_layer.linear.bias": (16,),
        "final_layer.adaLN_modulation.1.weight": (2 * D, D),
        "final_layer.adaLN_modulation.1.bias": (2 * D,),
    }
    for i in range(28):
        expected |= {
            f"blocks.{i}.attn.qkv.weight": (3 * D, D), f"blocks.{i}.attn.qkv.bias": (3 * D,),
            f"blocks.{i}.attn.proj.weight": (D, D), f"blocks.{i}.attn.proj.bias": (D,),
            f"blocks.{i}.mlp.fc1.weight": (4 * D, D), f"blocks.{i}.mlp.fc1.bias": (4 * D,),
            f"blocks.{i}.mlp.fc2.weight": (D, 4 * D), f"blocks.{i}.mlp.fc2.bias": (D,),
            f"blocks.{i}.adaLN_modulation.1.weight": (6 * D, D),
            f"blocks.{i}.adaLN_modulation.1.bias": (6 * D,),
        }
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == expected


def test_load_repa_style_pt_file_safely(tmp_path):
    src = randomize(tiny(z_dims=(8,), encoder_depth=2))
    ckpt = {"model": {"module." + k: v for k, v in src.state_dict().items()},
            "ema": src.state_dict(), "opt": {}, "args": argparse.Namespace(model="SiT-XL/2"),
            "steps": 4000}
    path = tmp_path / "0004000.pt"
    torch.save(ckpt, path)
    dst = tiny(z_dims=(8,), encoder_depth=2)
    load_checkpoint(dst, path)                      # weights_only=True; Namespace allowed
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([3, 4])
    torch.testing.assert_close(dst(x, t, y), src(x, t, y))
    load_checkpoint(dst, path, key="model")         # DDP prefixes stripped
    with pytest.raises(ValueError, match="does not match the model"):
        load_checkpoint(tiny(hidden_size=64), path)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    torch.save({"ema": src.state_dict(), "x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        load_checkpoint(dst, tmp_path / "evil.pt")


def test_sit_learn_sigma_checkpoint_and_flipped_time():
    """A SiT-style model: 2C output channels (v then sigma per patch position), t=1 is data,
    and its velocity points from noise to data (v_sit = x - eps = -v_ours)."""
    torch.manual_seed(0)
    src = randomize(tiny(), seed=1)
    sd = {k: v.clone() for k, v in src.state_dict().items()}
    p, C, D = 2, 4, 32
    g = torch.Generator().manual_seed(3)
    W2 = torch.randn(p * p * 2 * C, D, generator=g) * 0.1
    b2 = torch.randn(p * p * 2 * C, generator=g) * 0.1
    sd["final_layer.linear.weight"], sd["final_layer.linear.bias"] = W2, b2

    def sit_reference(x, t_sit, y):
        """What the original SiT computes: tokens -> 2C-channel output -> first C channels."""
        h = src.x_embedder(x) + src.pos_embed
        c = src.t_embedder(t_sit) + src.y_embedder(y)
        for b in src.blocks:
            h = b(h, c)
        shift, scale = src.final_layer.adaLN_modulation(c).chunk(2, -1)
        tok = torch.nn.functional.linear(
            src.final_layer.norm_final(h) * (1 + scale[:, None]) + shift[:, None], W2, b2)
        n, g_ = x.shape[0], 4
        img = tok.reshape(n, g_, g_, p, p, 2 * C).permute(0, 5, 1, 3, 2, 4).reshape(n, 2 * C, 8, 8)
        return img[:, :C]

    dst = tiny(flip_time=True)
    dst.load_state_dict(convert_sit_state_dict(sd, in_channels=C, patch_size=p))
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([0.1, 0.5, 0.9]), torch.tensor([0, 1, 10])
    torch.testing.assert_close(dst(x, t, y), -sit_reference(x, 1 - t, y))


@pytest.mark.parametrize("name,gmacs", [("SiT-S/2", 6.06), ("SiT-B/2", 23.01),
                                        ("SiT-L/2", 80.71), ("SiT-XL/2", 118.64),
                                        ("SiT-XL/4", 29.05), ("SiT-XL/8", 7.39)])
def test_forward_macs_match_dit_published(name, gmacs):
    """DiT (Peebles & Xie, Table 4) publishes these 'Gflops' (MACs) for 256 px (32x32 latents)."""
    with torch.device("meta"):
        model = SiT_models[name](input_size=32, num_classes=1000)
    assert model.forward_macs() / 1e9 == pytest.approx(gmacs, rel=5e-3)

"""REPA target encoders: random-init timm ViTs saved to local files and loaded through the same
code path a released checkpoint takes (nothing is downloaded)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.encoders import (ENCODERS, align_tokens, check_token_grid, clear_encoder_cache,
                             load_encoders, parse_enc_types)
from models.vae import WeightsNotFound

IMNET = (torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1),
         torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))
OPENAI = (torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1),
          torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1))
DINO_B = "vit_base_patch14_dinov2.lvd142m"
DINO_B_REG = "vit_base_patch14_reg4_dinov2.lvd142m"


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    """No HF cache or torch.hub folder of the machine leaks in; every test starts uncached."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    clear_encoder_cache()
    yield
    clear_encoder_cache()


def make_timm(name, img_size, depth=None, num_classes=0, seed=0):
    """A timm model built with pretrained=False, filled with seeded random values (built on the
    meta device and filled directly: timm's own init of a full ViT-B takes seconds on CPU).
    Layer scales ~0.5 so that every block matters."""
    import timm
    kw = dict(pretrained=False, num_classes=num_classes, img_size=img_size)
    if depth is not None:
        kw["depth"] = depth
    with torch.device("meta"):
        model = timm.create_model(name, **kw)
    model = model.to_empty(device="cpu").eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(".gamma"):
                p.uniform_(0.3, 0.7, generator=g)
            elif p.ndim == 1 and ("norm" in n) and n.endswith(".weight"):
                p.normal_(1.0, 0.1, generator=g)
            else:
                p.normal_(0.0, 0.02, generator=g)
    assert not list(model.buffers())
    return model


def save_safetensors(model, path):
    from safetensors.torch import save_file
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def images(n, res, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, res, res), generator=g, dtype=torch.uint8)


def ref_preprocess(imgs, size, mean_std, resize_first=False):
    """REPA's preprocess_raw_image written out: /255, mean/std, bicubic resize (no antialias)."""
    mean, std = mean_std
    x = imgs.float() / 255.0
    if resize_first:
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
        return (x - mean) / std
    x = (x - mean) / std
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
    return x


def check_frozen(enc):
    assert not enc.training and not enc.model.training
    enc.train()                                     # a training loop's model.train() elsewhere
    assert not enc.training and not enc.model.training
    assert all(not p.requires_grad for p in enc.parameters())


def test_dinov2_vit_b_full_depth_256(tmp_path):
    ref = make_timm(DINO_B, 224)                                   # the real ViT-B/14 layout
    save_safetensors(ref, tmp_path / "w" / f"{DINO_B}.safetensors")
    (enc,) = load_encoders("dinov2-vit-b", 256, weights_dir=tmp_path / "w")
    assert (enc.embed_dim, enc.num_tokens, enc.grid, enc.input_size) == (768, 256, 16, 224)
    check_frozen(enc)
    saved = ref.state_dict()
    own = enc.model.state_dict()
    assert set(own) == set(saved)
    assert all(torch.equal(own[k], saved[k]) for k in saved)
    x = images(2, 256)
    out = enc(x)
    assert out.shape == (2, 256, 768) and out.dtype == torch.float32
    with torch.no_grad():
        expect = ref.forward_features(ref_preprocess(x, 224, IMNET))[:, 1:]
    torch.testing.assert_close(out, expect, rtol=1e-4, atol=1e-4)
    # loaded once per process: the same arguments give the same module
    assert load_encoders("dinov2-vit-b", 256, weights_dir=tmp_path / "w")[0] is enc


def test_dinov2_512_resamples_position_embedding(tmp_path):
    from timm.layers import resample_abs_pos_embed
    ref = make_timm(DINO_B, 224, depth=2)
    save_safetensors(ref, tmp_path / f"{DINO_B}.safetensors")
    (enc,) = load_encoders("dinov2-vit-b", 512, weights_dir=tmp_path, model_kwargs={"depth": 2})
    assert (enc.grid, enc.num_tokens, enc.input_size) == (32, 1024, 448)
    saved, own = ref.state_dict(), enc.model.state_dict()
    for k in saved:
        if k != "pos_embed":
            assert torch.equal(own[k], saved[k]), k
    pos = resample_abs_pos_embed(saved["pos_embed"], new_size=(32, 32), num_prefix_tokens=1)
    assert own["pos_embed"].shape == (1, 1 + 1024, 768)
    torch.testing.assert_close(own["pos_embed"], pos)
    x = images(1, 512, seed=1)
    out = enc(x)
    assert out.shape == (1, 1024, 768)
    big = make_timm(DINO_B, 448, depth=2)
    big.load_state_dict({**saved, "pos_embed": pos})
    with torch.no_grad():
        expect = big.forward_features(ref_preprocess(x, 448, IMNET))[:, 1:]
    torch.testing.assert_close(out, expect, rtol=1e-4, atol=1e-4)


def test_hub_layout_file_at_518_px_is_resampled_to_16x16(tmp_path):
    ref = make_timm(DINO_B, 518, depth=1)                          # as timm's hub weights (37x37)
    save_safetensors(ref, tmp_path / f"{DINO_B}.safetensors")
    (enc,) = load_encoders("dinov2-vit-b", 256, weights_dir=tmp_path, model_kwargs={"depth": 1})
    assert enc.model.pos_embed.shape == (1, 257, 768)
    assert enc(images(1, 256)).shape == (1, 256, 768)


def test_dinov2_registers_from_hf_cache_layout(tmp_path, monkeypatch):
    ref = make_timm(DINO_B_REG, 224, depth=2)
    cache = tmp_path / "hf"
    repo = cache / f"models--timm--{DINO_B_REG}"
    save_safetensors(ref, repo / "snapshots" / "0123abcd" / "model.safetensors")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    (enc,) = load_encoders("dinov2-vit-b-reg", 256, model_kwargs={"depth": 2})
    assert enc.weights_path == repo / "snapshots" / "0123abcd" / "model.safetensors"
    assert enc.num_prefix_tokens == 5                              # cls + 4 registers dropped
    x = images(2, 256, seed=2)
    out = enc(x)
    assert out.shape == (2, 256, 768)
    with torch.no_grad():
        expect = ref.forward_features(ref_preprocess(x, 224, IMNET))[:, 5:]
    torch.testing.assert_close(out, expect, rtol=1e-4, atol=1e-4)


def test_original_dinov2_release_file_name_and_layout(tmp_path):
    ref = make_timm(DINO_B, 224, depth=2)
    sd = dict(ref.state_dict())
    sd["mask_token"] = torch.zeros(1, 768)                         # facebookresearch/dinov2 layout
    torch.save(sd, tmp_path / "dinov2_vitb14_pretrain.pth")
    (enc,) = load_encoders("dinov2-vit-b", 256, weights_dir=tmp_path, model_kwargs={"depth": 2})
    own = enc.model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in ref.state_dict().items())
    # the same file where torch.hub (and so REPA) keeps it is found without a weights_dir
    hub = tmp_path / "empty-torch-home" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    (tmp_path / "dinov2_vitb14_pretrain.pth").rename(hub / "dinov2_vitb14_pretrain.pth")
    clear_encoder_cache()
    (enc,) = load_encoders("dinov2-vit-b", 256, model_kwargs={"depth": 2})
    assert enc.weights_path == hub / "dinov2_vitb14_pretrain.pth"


def test_mae_from_original_pth_no_resize_at_256(tmp_path):
    from timm.layers import resample_abs_pos_embed
    ref = make_timm("vit_base_patch16_224.mae", 224, depth=2)
    torch.save({"model": ref.state_dict()}, tmp_path / "mae_pretrain_vit_base.pth")
    (enc,) = load_encoders("mae-vit-b", 256, weights_dir=tmp_path, model_kwargs={"depth": 2})
    assert (enc.grid, enc.input_size, enc.embed_dim) == (16, 256, 768)   # patch 16: image as is
    x = images(2, 256, seed=3)
    out = enc(x)
    assert out.shape == (2, 256, 768)
    big = make_timm("vit_base_patch16_224.mae", 256, depth=2)
    sd = ref.state_dict()
    big.load_state_dict({**sd, "pos_embed": resample_abs_pos_embed(
        sd["pos_embed"], new_size=(16, 16), num_prefix_tokens=1)})
    with torch.no_grad():
        expect = big.forward_features(ref_preprocess(x, 256, IMNET))[:, 1:]
    torch.testing.assert_close(out, expect, rtol=1e-4, atol=1e-4)


def test_clip_l_resizes_then_normalises_and_drops_projection_head(tmp_path):
    name = "vit_large_patch14_clip_224.openai"
    ref = make_timm(name, 224, depth=1, num_classes=768)           # hub file has the projection
    save_safetensors(ref, tmp_path / f"{name}.safetensors")
    (enc,) = load_encoders("clip-vit-L", 256, weights_dir=tmp_path, model_kwargs={"depth": 1})
    assert (enc.grid, enc.input_size, enc.embed_dim) == (16, 224, 1024)
    x = images(2, 256, seed=4)
    out = enc(x)
    with torch.no_grad():
        expect = ref.forward_features(ref_preprocess(x, 224, OPENAI, resize_first=True))[:, 1:]
    torch.testing.assert_close(out, expect, rtol=1e-4, atol=1e-4)


def test_bf16_and_several_encoders_at_once(tmp_path):
    save_safetensors(make_timm(DINO_B, 224, depth=2), tmp_path / f"{DINO_B}.safetensors")
    save_safetensors(make_timm(DINO_B_REG, 224, depth=2, seed=1),
                     tmp_path / f"{DINO_B_REG}.safetensors")
    encs = load_encoders("dinov2-vit-b,dinov2-vit-b-reg", 256, weights_dir=tmp_path,
                         model_kwargs={"depth": 2})
    encs16 = load_encoders(["dinov2-vit-b", "dinov2-vit-b-reg"], 256, dtype=torch.bfloat16,
                           weights_dir=tmp_path, model_kwargs={"depth": 2})
    x = images(2, 256, seed=5)
    for e32, e16 in zip(encs, encs16):
        assert e16.dtype == torch.bfloat16 and all(p.dtype == torch.bfloat16
                                                   for p in e16.parameters())
        check_frozen(e16)
        a, b = e32(x), e16(x)
        assert b.dtype == torch.bfloat16 and b.shape == a.shape == (2, 256, 768)
        assert ((b.float() - a).norm() / a.norm()).item() < 0.05


def test_main_process_first_with_accelerate_state(tmp_path):
    from accelerate import PartialState
    save_safetensors(make_timm(DINO_B, 224, depth=1), tmp_path / f"{DINO_B}.safetensors")
    (enc,) = load_encoders("dinov2-vit-b", 256, weights_dir=tmp_path, state=PartialState(),
                           model_kwargs={"depth": 1})
    assert enc(images(1, 256)).shape == (1, 256, 768)


def test_registry_matches_timm_architectures():
    import timm
    for name, spec in ENCODERS.items():
        assert timm.models.get_pretrained_cfg(spec.timm_name).hf_hub_id == spec.hub_repo
        with torch.device("meta"):                       # shapes only: no memory, no time
            model = timm.create_model(spec.timm_name, pretrained=False, num_classes=0,
                                      img_size=16 * spec.patch_size)
        assert model.embed_dim == spec.embed_dim, name
        assert model.patch_embed.patch_size == (spec.patch_size, spec.patch_size), name
        assert model.num_prefix_tokens == (5 if name.endswith("-reg") else 1), name


def test_missing_weights_message(tmp_path):
    with pytest.raises(WeightsNotFound) as err:
        load_encoders("dinov2-vit-b", 256, weights_dir=tmp_path / "weights")
    msg = str(err.value)
    assert DINO_B in msg and f"timm/{DINO_B}" in msg
    assert f"hf download timm/{DINO_B}" in msg
    assert str(tmp_path / "weights" / f"{DINO_B}.safetensors") in msg
    assert str(tmp_path / "empty-hf-cache") in msg                 # the cache it looked in
    assert isinstance(err.value, FileNotFoundError)


def test_mismatched_file_names_the_tensors(tmp_path):
    save_safetensors(make_timm(DINO_B, 224, depth=2), tmp_path / f"{DINO_B}.safetensors")
    with pytest.raises(ValueError, match=r"missing blocks\.2\."):
        load_encoders("dinov2-vit-b", 256, weights_dir=tmp_path, model_kwargs={"depth": 3})


def test_parse_enc_types():
    assert parse_enc_types("dinov2-vit-b") == ["dinov2-vit-b"]
    assert parse_enc_types(" dinov2-vit-B , clip-vit-L,mae-vit-l") == [
        "dinov2-vit-b", "clip-vit-l", "mae-vit-l"]
    assert parse_enc_types("none") == [] and parse_enc_types("") == []
    for c in "sblg":
        assert f"dinov2-vit-{c}" in ENCODERS and f"dinov2-vit-{c}-reg" in ENCODERS
    with pytest.raises(ValueError, match="choices: .*dinov2-vit-b.*mae-vit-l"):
        parse_enc_types("dinov2-vit-b,dinov3-vit-b")
    with pytest.raises(ValueError, match="dinov3-vit-b"):
        load_encoders("dinov3-vit-b", 256)
    with pytest.raises(ValueError, match="twice"):
        parse_enc_types("mae-vit-l,MAE-vit-l")


def test_token_grid_check_and_alignment_into_sit(tmp_path):
    from losses import alignment_loss
    from models.sit import SiT
    save_safetensors(make_timm(DINO_B, 224, depth=1), tmp_path / f"{DINO_B}.safetensors")
    (enc,) = load_encoders("dinov2-vit-b", 256, weights_dir=tmp_path, model_kwargs={"depth": 1})
    assert "one to one" in check_token_grid(enc, 16)
    msg = check_token_grid(enc, 8)                                 # SiT patch 4 at 256 px
    assert "16x16 -> 8x8" in msg and "2x2 average pooling" in msg
    assert "upsampled" in check_token_grid(enc, 32)
    target = enc(images(2, 256))
    assert align_tokens(target, 16) is target
    torch.manual_seed(0)
    sit = SiT(input_size=32, patch_size=4, in_channels=4, hidden_size=32, depth=2, num_heads=2,
              num_classes=10, z_dims=[enc.embed_dim], encoder_depth=1, projector_type="conv")
    _, aux = sit(torch.randn(2, 4, 32, 32), torch.rand(2), torch.tensor([1, 2]), return_proj=True)
    out = alignment_loss(aux["proj"], [target], t=torch.tensor([0.2, 0.9]), schedule="sigmoid")
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    assert sit.projectors[0].proj.weight.grad.abs().sum() > 0

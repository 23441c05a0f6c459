"""Image sources and the ADM centre crop (preprocessing/sources.py), checked against values
worked out independently in this file (never against saved outputs of the code itself)."""
from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
from PIL import Image

from preprocessing.sources import (DigitsSource, FolderSource, HFSource, SourceError,
                                   adm_center_crop, load_and_crop, open_source, to_rgb)


def _noise(w: int, h: int, seed: int = 0, channels: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed + 1000 * w + h)
    shape = (h, w, channels) if channels > 1 else (h, w)
    return rng.integers(0, 256, shape, dtype=np.uint8)


# ----------------------------------------------------------------------------------------------
# ADM centre crop

def reference_adm_crop(img: Image.Image, size: int):
    """guided-diffusion's ``center_crop_arr``, written out from the formula with plain PIL.

    Returns the crop and the trace (size after the box halvings, size after the bicubic resize,
    crop offsets) so the test can also check the trace against hand-computed numbers.
    """
    if img.mode != "RGB":
        img = img.convert("RGB")
    w, h = img.size
    while min(w, h) >= 2 * size:
        w, h = w // 2, h // 2
        img = img.resize((w, h), resample=Image.BOX)
    halved = (w, h)
    s = size / min(w, h)
    new = (round(w * s), round(h * s))  # Python round(): half to even, as ADM
    img = img.resize(new, resample=Image.BICUBIC)
    arr = np.array(img)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top:top + size, left:left + size], halved, new, (top, left)


# (w, h), size, size after halvings, size after bicubic resize, (top, left) -- by hand:
ADM_CASES = [
    # 600 >= 512 -> 500x300; 300 < 512. 500*256/300 = 426.67 -> 427. left (427-256)//2 = 85
    ((1000, 600), 256, (500, 300), (427, 256), (0, 85)),
    ((600, 1000), 256, (300, 500), (256, 427), (85, 0)),
    # no halving (257 < 512); 513*256/257 = 511.004 -> 511; left (511-256)//2 = 127
    ((513, 257), 256, (513, 257), (511, 256), (0, 127)),
    # 257 >= 128 -> 256x128; 128 >= 128 -> 128x64; then scale 1; left (128-64)//2 = 32
    ((513, 257), 64, (128, 64), (128, 64), (0, 32)),
    # odd sizes all the way: 601 -> 300 -> 150 -> 75 (floor halving); 125*64/75 = 106.67 -> 107
    ((1001, 601), 64, (125, 75), (107, 64), (0, 21)),
    ((300, 300), 256, (300, 300), (256, 256), (0, 0)),
    ((256, 256), 256, (256, 256), (256, 256), (0, 0)),
    # tiny, upsampled: 10*256/7 = 365.71 -> 366; left (366-256)//2 = 55
    ((10, 7), 256, (10, 7), (366, 256), (0, 55)),
    # 11*12/8 = 16.5 exactly: Python round() gives 16 (half to even), not 17
    ((11, 8), 12, (11, 8), (16, 12), (0, 2)),
]


@pytest.mark.parametrize("wh,size,halved,resized,offset", ADM_CASES,
                         ids=[f"{c[0][0]}x{c[0][1]}->{c[1]}" for c in ADM_CASES])
def test_adm_center_crop_matches_reference(wh, size, halved, resized, offset):
    img = Image.fromarray(_noise(*wh))
    ref, got_halved, got_resized, got_offset = reference_adm_crop(img, size)
    # The reference itself follows the hand-computed trace ...
    assert (got_halved, got_resized, got_offset) == (halved, resized, offset)
    # ... and the implementation equals it bit for bit.
    out = adm_center_crop(img, size)
    assert out.shape == (size, size, 3)
    assert out.dtype == np.uint8
    assert out.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(out, ref)


def test_adm_center_crop_identity_and_crop_only():
    a = _noise(256, 256, seed=3)
    np.testing.assert_array_equal(adm_center_crop(Image.fromarray(a), 256), a)
    # Short side already == size: no resampling, just the centred window (floor offsets).
    b = _noise(256, 301, seed=4)  # h = 301: top = (301 - 256) // 2 = 22
    np.testing.assert_array_equal(adm_center_crop(Image.fromarray(b), 256), b[22:22 + 256])


def test_adm_center_crop_converts_other_modes():
    grey = _noise(40, 30, seed=5, channels=1)
    img = Image.fromarray(grey, "L")
    out = adm_center_crop(img, 16)
    ref = reference_adm_crop(img.convert("RGB"), 16)[0]
    np.testing.assert_array_equal(out, ref)
    assert out.shape == (16, 16, 3)
    np.testing.assert_array_equal(out[..., 0], out[..., 2])


def test_load_and_crop_rejects_extreme_aspect_and_flags_upsampling():
    class One:
        def __init__(self, img):
            self.img = img

        def load(self, i):
            return self.img

    arr, small = load_and_crop(One(Image.new("RGB", (3, 5), (10, 20, 30))), 0, 16)
    assert small and arr.shape == (16, 16, 3)
    np.testing.assert_array_equal(arr, np.broadcast_to(np.array([10, 20, 30], np.uint8), arr.shape))
    arr, small = load_and_crop(One(Image.new("RGB", (40, 20))), 0, 16)
    assert not small
    with pytest.raises(ValueError, match="aspect"):
        load_and_crop(One(Image.new("RGB", (2000, 10))), 0, 16)
    load_and_crop(One(Image.new("RGB", (640, 10))), 0, 16)  # exactly 64:1 is still accepted


# ----------------------------------------------------------------------------------------------
# to_rgb

def _rgb(img: Image.Image) -> np.ndarray:
    out = to_rgb(img)
    assert out.mode == "RGB"
    assert out.size == img.size
    return np.asarray(out)


def test_to_rgb_L_and_LA():
    v = np.arange(0, 256, dtype=np.uint8).reshape(16, 16)
    out = _rgb(Image.fromarray(v, "L"))
    np.testing.assert_array_equal(out, np.stack([v, v, v], -1))
    alpha = (255 - v)  # alpha must be dropped, not blended
    out = _rgb(Image.fromarray(np.stack([v, alpha], -1), "LA"))
    np.testing.assert_array_equal(out, np.stack([v, v, v], -1))


def test_to_rgb_RGBA_drops_alpha_like_convert():
    rgba = _noise(8, 6, seed=7, channels=4)
    rgba[..., 3] = 0  # fully transparent: compositing on white/black would change every pixel
    rgba[0, 0] = (200, 100, 50, 0)
    img = Image.fromarray(rgba, "RGBA")
    out = _rgb(img)
    np.testing.assert_array_equal(out, rgba[..., :3])
    np.testing.assert_array_equal(out, np.asarray(img.convert("RGB")))
    assert tuple(out[0, 0]) == (200, 100, 50)


def test_to_rgb_palette_with_transparency():
    palette = [0, 0, 0, 255, 0, 0, 0, 255, 0, 10, 20, 30] + [0] * (256 * 3 - 12)
    idx = np.array([[0, 1, 2, 3], [3, 2, 1, 0]], dtype=np.uint8)
    img = Image.fromarray(idx, "P")
    img.putpalette(palette)
    img.info["transparency"] = 1  # index 1 (red) is the transparent colour
    out = _rgb(img)
    colours = np.array(palette, dtype=np.uint8).reshape(256, 3)
    np.testing.assert_array_equal(out, colours[idx])
    assert tuple(out[0, 1]) == (255, 0, 0)


def test_to_rgb_CMYK():
    # Corners where every CMYK->RGB formula agrees, plus one mid value checked against PIL.
    px = [(0, 0, 0, 0), (255, 0, 0, 0), (0, 255, 0, 0), (0, 0, 255, 0), (0, 0, 0, 255),
          (100, 50, 20, 30)]
    img = Image.new("CMYK", (len(px), 1))
    img.putdata(px)
    out = _rgb(img)
    assert [tuple(int(c) for c in p) for p in out[0, :5]] == [
        (255, 255, 255), (0, 255, 255), (255, 0, 255), (255, 255, 0), (0, 0, 0)]
    np.testing.assert_array_equal(out, np.asarray(img.convert("RGB")))


def test_to_rgb_I16_rescales_instead_of_clipping():
    a = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    img = Image.fromarray(a)
    assert img.mode == "I;16"
    out = _rgb(img)
    # v * 255 / 65535 rounded: 0, 1, 127.50 -> 128, 255 (clipping would give 0, 255, 255, 255)
    np.testing.assert_array_equal(out[0, :, 0], [0, 1, 128, 255])
    np.testing.assert_array_equal(out[..., 0], out[..., 1])
    np.testing.assert_array_equal(out[..., 0], out[..., 2])


def test_to_rgb_bilevel():
    bits = np.array([[0, 1, 1, 0], [1, 0, 0, 1]], dtype=bool)
    img = Image.fromarray(bits)
    assert img.mode == "1"
    out = _rgb(img)
    np.testing.assert_array_equal(out, np.stack([bits * 255] * 3, -1).astype(np.uint8))


def test_to_rgb_RGB_passthrough():
    img = Image.fromarray(_noise(5, 4, seed=9))
    np.testing.assert_array_equal(_rgb(img), np.asarray(img))


# ----------------------------------------------------------------------------------------------
# DigitsSource

@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits
    return load_digits()


def _digit_u8(raw: np.ndarray) -> np.ndarray:
    # Values are integers 0..16: round-half-up of v*255/16 in exact integer arithmetic.
    v = raw.astype(np.int64)
    assert np.array_equal(v, raw)
    return ((v * 255 + 8) // 16).astype(np.uint8)


def test_digits_native_size(digits):
    src = DigitsSource(8)
    assert len(src) == 1797
    assert src.class_names == [str(c) for c in range(10)]
    assert [src.label(i) for i in range(len(src))] == digits.target.tolist()
    for i in range(len(src)):
        img = src.load(i)
        assert img.mode == "RGB" and img.size == (8, 8)
        want = _digit_u8(digits.images[i])
        np.testing.assert_array_equal(np.asarray(img), np.stack([want] * 3, -1))
    assert _digit_u8(np.array([16.0, 8.0, 1.0]))[[0, 1, 2]].tolist() == [255, 128, 16]


def test_digits_nearest_upscale(digits):
    src = DigitsSource(32)
    for i in range(0, 1797, 7):
        want = np.kron(_digit_u8(digits.images[i]), np.ones((4, 4), dtype=np.uint8))
        got = np.asarray(src.load(i))
        assert got.shape == (32, 32, 3)
        np.testing.assert_array_equal(got, np.stack([want] * 3, -1))
        # The ADM crop of an image that already has the target size is the identity.
        np.testing.assert_array_equal(load_and_crop(src, i, 32)[0], got)


def test_digits_non_multiple_size():
    src = DigitsSource(12)
    img = src.load(0)
    assert img.size == (12, 12) and img.mode == "RGB"
    assert load_and_crop(src, 0, 12)[0].shape == (12, 12, 3)
    assert DigitsSource(12).describe() != DigitsSource(16).describe()


def test_digits_open_source_and_pickle():
    src = open_source("digits", resolution=16)
    assert isinstance(src, DigitsSource) and len(src) == 1797
    back = pickle.loads(pickle.dumps(src))
    np.testing.assert_array_equal(np.asarray(back.load(5)), np.asarray(src.load(5)))
    with pytest.raises(SourceError):
        open_source("not-digits", kind="digits")


# ----------------------------------------------------------------------------------------------
# FolderSource

def _save(path, arr, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, fmt)


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "tree"
    # Class folders created out of order; the index must follow the sorted names.
    _save(root / "n02" / "z.png", _noise(9, 7, 1))
    _save(root / "n02" / "B.JPEG", _noise(9, 7, 2), "JPEG")  # upper-case extension
    (root / "n02" / "notes.csv").write_text("a,b\n")
    _save(root / "n01" / "x.png", _noise(9, 7, 3))
    _save(root / "n01" / "sub" / "deep.png", _noise(9, 7, 4))  # nested sub-folder
    (root / "n01" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (root / "b").mkdir()  # empty class
    _save(root / "a" / "img2.png", _noise(9, 7, 5))
    _save(root / "a" / "img1.jpg", _noise(9, 7, 6), "JPEG")
    (root / "a" / "README.txt").write_text("hello")
    (root / ".git").mkdir()  # hidden folder: not a class
    (root / "LICENSE").write_text("stray file at the root")
    return root


def test_folder_classes_files_and_notes(tree):
    src = open_source(str(tree))
    assert isinstance(src, FolderSource)
    assert src.class_names == ["a", "b", "n01", "n02"]
    # Files: classes in sorted order, file names sorted within a folder, a folder's own files
    # before its sub-folders (torchvision ImageFolder order).
    expected = [("a/img1.jpg", 0), ("a/img2.png", 0), ("n01/x.png", 2),
                ("n01/sub/deep.png", 2), ("n02/B.JPEG", 3), ("n02/z.png", 3)]
    assert len(src) == len(expected)
    assert [(src.name(i), src.label(i)) for i in range(len(src))] == expected
    notes = src.notes()
    assert sorted(notes["skipped_files"]) == sorted(["LICENSE", "a/README.txt", "n02/notes.csv"])
    assert notes["empty_classes"] == ["b"]
    assert 1 not in src.labels  # the empty class keeps index 1 and has no samples
    assert all(".DS_Store" not in f for f in src.files)
    img = src.load(expected.index(("n01/sub/deep.png", 2)))
    np.testing.assert_array_equal(np.asarray(img), _noise(9, 7, 4))
    back = pickle.loads(pickle.dumps(src))
    assert back.files == src.files and back.labels == src.labels


def test_folder_describe_tracks_content(tree):
    d0 = FolderSource(tree).describe()
    assert d0 == FolderSource(tree).describe()  # stable
    assert d0["type"] == "folder" and d0["num_files"] == 6
    _save(tree / "b" / "new.png", _noise(4, 4, 8))
    d1 = FolderSource(tree).describe()
    assert d1["num_files"] == 7
    assert d1["listing_sha256"] != d0["listing_sha256"]
    # Same number of files but a different name -> different listing.
    (tree / "b" / "new.png").rename(tree / "b" / "renamed.png")
    d2 = FolderSource(tree).describe()
    assert d2["num_files"] == 7 and d2["listing_sha256"] not in (d0["listing_sha256"],
                                                                 d1["listing_sha256"])
    # Non-image files do not change what is encoded, so they do not change the listing.
    (tree / "b" / "more-notes.txt").write_text("x")
    assert FolderSource(tree).describe() == d2


def test_folder_errors(tmp_path):
    missing = tmp_path / "no" / "such" / "dir"
    with pytest.raises(SourceError, match="does not exist") as e:
        FolderSource(missing)
    assert str(missing) in str(e.value)
    with pytest.raises(SourceError) as e:
        open_source(str(missing))
    assert str(missing) in str(e.value)

    flat = tmp_path / "flat"
    _save(flat / "img.png", _noise(4, 4))
    with pytest.raises(SourceError, match="class sub-folders"):
        FolderSource(flat)

    no_images = tmp_path / "noimg"
    (no_images / "cls").mkdir(parents=True)
    (no_images / "cls" / "README.txt").write_text("x")
    with pytest.raises(SourceError, match="no image files"):
        open_source(str(no_images))


# ----------------------------------------------------------------------------------------------
# HFSource

def _png_bytes(arr: np.ndarray) -> bytes:
    b = io.BytesIO()
    Image.fromarray(arr).save(b, "PNG")
    return b.getvalue()


HF_LABELS = [0, 2, 1, 2, 0]
HF_NAMES = ["cat", "dog", "zebra"]


def _hf_dataset(corrupt: int | None = None):
    datasets = pytest.importorskip("datasets")
    arrs = [_noise(7 + i, 5, seed=20 + i) for i in range(len(HF_LABELS))]
    col = [{"bytes": _png_bytes(a), "path": None} for a in arrs]
    if corrupt is not None:
        col[corrupt] = {"bytes": b"definitely not an image", "path": None}
    feats = datasets.Features({"image": datasets.Image(),
                               "label": datasets.ClassLabel(names=HF_NAMES)})
    ds = datasets.Dataset.from_dict({"image": col, "label": HF_LABELS}, features=feats)
    return ds, arrs


def test_hf_dataset_saved_to_disk(tmp_path):
    ds, arrs = _hf_dataset()
    path = tmp_path / "hf"
    ds.save_to_disk(str(path))
    src = open_source(str(path))
    assert isinstance(src, HFSource)
    assert len(src) == len(HF_LABELS)
    assert [src.label(i) for i in range(len(src))] == HF_LABELS
    assert src.class_names == HF_NAMES
    for i, a in enumerate(arrs):
        np.testing.assert_array_equal(np.asarray(src.load(i)), a)
    d = src.describe()
    assert d["type"] == "hf" and d["num_files"] == len(HF_LABELS)
    back = pickle.loads(pickle.dumps(src))
    np.testing.assert_array_equal(np.asarray(back.load(3)), arrs[3])


def test_hf_dataset_dict_splits_and_columns(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds, arrs = _hf_dataset()
    ds = ds.rename_column("image", "img").rename_column("label", "cls")
    dd = datasets.DatasetDict({"train": ds, "validation": ds.select([1, 3])})
    path = tmp_path / "hfdict"
    dd.save_to_disk(str(path))

    src = open_source(str(path), image_column="img", label_column="cls")
    assert isinstance(src, HFSource) and len(src) == 5
    val = open_source(str(path), image_column="img", label_column="cls", split="validation")
    assert [val.label(i) for i in range(len(val))] == [HF_LABELS[1], HF_LABELS[3]]
    np.testing.assert_array_equal(np.asarray(val.load(1)), arrs[3])

    with pytest.raises(SourceError) as e:
        open_source(str(path), image_column="img", label_column="cls", split="test")
    assert "'train'" in str(e.value) and "'validation'" in str(e.value) and "test" in str(e.value)
    with pytest.raises(SourceError) as e:
        open_source(str(path), label_column="cls")  # default --image-column image
    assert "'img'" in str(e.value) and "'cls'" in str(e.value) and "--image-column" in str(e.value)
    with pytest.raises(SourceError) as e:
        open_source(str(path), image_column="img")  # default --label-column label
    assert "'img'" in str(e.value) and "--label-column" in str(e.value)


def test_hf_integer_labels_without_classlabel(tmp_path):
    datasets = pytest.importorskip("datasets")
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    arrs = [_noise(6, 6, seed=40 + i) for i in range(3)]
    ds = datasets.Dataset.from_dict(
        {"image": [{"bytes": _png_bytes(a), "path": None} for a in arrs], "label": [4, 0, 2]},
        features=feats)
    ds.save_to_disk(str(tmp_path / "ints"))
    src = open_source(str(tmp_path / "ints"))
    assert src.class_names == ["0", "1", "2", "3", "4"]
    assert [src.label(i) for i in range(3)] == [4, 0, 2]


def test_hf_corrupt_image_fails_on_load_not_construction(tmp_path):
    ds, arrs = _hf_dataset(corrupt=2)
    ds.save_to_disk(str(tmp_path / "bad"))
    src = open_source(str(tmp_path / "bad"))  # must not raise
    assert len(src) == 5
    with pytest.raises(Exception):
        load_and_crop(src, 2, 8)
    for i in (0, 1, 3, 4):
        np.testing.assert_array_equal(np.asarray(src.load(i)), arrs[i])

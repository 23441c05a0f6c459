"""Bad and awkward inputs through the real encode CLI (preprocessing/encode.py), end to end.

Most runs call ``preprocessing.encode.main([...])`` in-process (fast); a few go through
``python preprocessing/encode.py`` in a subprocess to check what a user sees: exit codes,
messages, no tracebacks. Pixel mode (--vae none) at tiny resolutions keeps it all on CPU and fast.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from preprocessing import encode

REPO = Path(__file__).resolve().parent.parent
ENCODE = ["--vae", "none", "--num-workers", "0"]


def run_main(argv: list[str], capsys) -> tuple[int, str, str]:
    """Run encode.main in-process like the CLI would: (exit code, stdout, stderr)."""
    threads = torch.get_num_threads()  # encode sets --cpu-threads; don't leak it to other tests
    try:
        rc = encode.main([str(a) for a in argv])
    except SystemExit as e:  # argparse's errors (and --help) exit through SystemExit
        rc = int(e.code or 0)
    finally:
        torch.set_num_threads(threads)
    out, err = capsys.readouterr()
    return rc, out, err


def run_cli(*args) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "preprocessing/encode.py", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, env=env, timeout=300)


def load_shards(dest: Path) -> dict[str, np.ndarray]:
    """All shards of ``dest`` concatenated (read with safetensors directly, not our reader)."""
    from safetensors.numpy import load_file
    m = json.loads((dest / "manifest.json").read_text())
    parts = [load_file(str(dest / s["file"])) for s in m["shards"]]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def save_img(path: Path, img: Image.Image, fmt: str | None = None, **kw) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, fmt, **kw)


def noise(w: int, h: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# ----------------------------------------------------------------------------------------------
# A class-folder tree full of awkward files.

GREY = np.add.outer(np.arange(20) * 9, np.arange(16) * 3).astype(np.uint8)  # 16 wide, 20 high
RGBA = np.concatenate([noise(16, 16, 3), np.zeros((16, 16, 1), np.uint8)], -1)  # transparent
TINY_COLOUR = (200, 40, 120)

# Index in the source = position in (sorted classes, sorted files); worked out by hand.
FILES = [
    ("ants/good1.jpg", 0, True), ("ants/good2.jpg", 0, True), ("ants/good3.png", 0, True),
    ("ants/truncated.jpg", 0, False), ("ants/x.jpg", 0, False),
    ("bees/cmyk.jpg", 1, True), ("bees/grey.png", 1, True), ("bees/palette.png", 1, True),
    ("bees/rgba.png", 1, True), ("bees/y.png", 1, False),
    ("cats/good4.png", 2, True), ("cats/tiny1.png", 2, True), ("cats/tiny35.png", 2, True),
    ("cats/wide.png", 2, False),
]
INDEX = {name: i for i, (name, _, _) in enumerate(FILES)}


def make_awkward_tree(root: Path) -> None:
    save_img(root / "ants/good1.jpg", Image.fromarray(noise(24, 20, 1)), "JPEG")
    save_img(root / "ants/good2.jpg", Image.fromarray(noise(20, 30, 2)), "JPEG")
    save_img(root / "ants/good3.png", Image.fromarray(noise(40, 33, 3)), "PNG")
    b = io.BytesIO()
    Image.fromarray(noise(64, 64, 4)).save(b, "JPEG", quality=95)
    data = b.getvalue()
    (root / "ants/truncated.jpg").write_bytes(data[:len(data) // 2])
    (root / "ants/x.jpg").write_bytes(np.random.default_rng(5).bytes(3000))
    save_img(root / "bees/cmyk.jpg", Image.new("CMYK", (20, 20), (10, 200, 30, 40)), "JPEG")
    save_img(root / "bees/grey.png", Image.fromarray(GREY, "L"), "PNG")
    pal = Image.fromarray((np.arange(256, dtype=np.uint8) % 4).reshape(16, 16), "P")
    pal.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (252 * 3))
    save_img(root / "bees/palette.png", pal, "PNG", transparency=1)
    save_img(root / "bees/rgba.png", Image.fromarray(RGBA, "RGBA"), "PNG")
    (root / "bees/y.png").write_text("this is a text file, not a PNG\n")
    (root / "bees/README.txt").write_text("about the bees\n")
    save_img(root / "cats/good4.png", Image.fromarray(noise(17, 19, 6)), "PNG")
    save_img(root / "cats/tiny1.png", Image.new("RGB", (1, 1), TINY_COLOUR), "PNG")
    save_img(root / "cats/tiny35.png", Image.fromarray(noise(3, 5, 7)), "PNG")
    save_img(root / "cats/wide.png", Image.fromarray(noise(2000, 10, 8)), "PNG")
    (root / "dogs").mkdir()


def test_awkward_folder_tree(tmp_path, capsys):
    src, dest = tmp_path / "src", tmp_path / "out"
    make_awkward_tree(src)
    rc, out, err = run_main(["--source", src, "--dest", dest, "--resolution", 16, "--vae", "none",
                             "--dtype", "fp32", "--num-workers", 1, "--shard-size", 4,
                             "--batch-size", 3], capsys)
    assert rc == 0, err
    readable = [n for n, _, ok in FILES if ok]
    unreadable = [n for n, _, ok in FILES if not ok]

    m = json.loads((dest / "manifest.json").read_text())
    assert m["count"] == len(readable) == 10
    assert m["num_failed"] == len(unreadable) == 4
    assert m["class_names"] == ["ants", "bees", "cats", "dogs"]
    assert m["num_classes"] == 4
    assert m["empty_classes"] == ["dogs"]
    assert m["num_upsampled"] == 2  # the 1x1 and the 3x5 image
    assert m["resolution"] == 16 and m["key"] == "latents" and m["dtype"] == "fp32"

    report = json.loads((dest / "report.json").read_text())
    failed = {f["name"]: f for f in report["failed"]}
    assert sorted(failed) == sorted(unreadable)
    for name, f in failed.items():
        assert f["index"] == INDEX[name]
        assert isinstance(f["error"], str) and len(f["error"]) > 5
    assert "truncated" in failed["ants/truncated.jpg"]["error"]
    assert "aspect" in failed["cats/wide.png"]["error"]
    assert report["skipped_files"] == ["bees/README.txt"]
    assert report["empty_classes"] == ["dogs"]

    t = load_shards(dest)
    assert t["latents"].dtype == np.float32 and t["latents"].shape == (10, 3, 16, 16)
    assert sorted(t["index"].tolist()) == sorted(INDEX[n] for n in readable)
    labels = {name: c for name, c, _ in FILES}
    for i, y in zip(t["index"].tolist(), t["labels"].tolist()):
        assert y == labels[FILES[i][0]]
    row = {i: k for k, i in enumerate(t["index"].tolist())}

    def pixels(name: str) -> np.ndarray:
        return t["latents"][row[INDEX[name]]]  # (3, 16, 16)

    # Greyscale 16x20: short side already 16, so the crop is rows 2..17, replicated to RGB.
    want = GREY[2:18].astype(np.float32) / np.float32(127.5) - np.float32(1)
    for c in range(3):
        np.testing.assert_allclose(pixels("bees/grey.png")[c], want, rtol=0, atol=1e-6)
    # RGBA: alpha dropped (it is 0 everywhere; blending would change the colours).
    want = RGBA[..., :3].transpose(2, 0, 1).astype(np.float32) / np.float32(127.5) - 1
    np.testing.assert_allclose(pixels("bees/rgba.png"), want, rtol=0, atol=1e-6)
    # Palette: indices 0..3 -> black, red, green, blue; index 1 is transparent (dropped).
    pal = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255]], np.float32)
    idx = (np.arange(256) % 4).reshape(16, 16)
    want = pal[idx].transpose(2, 0, 1) / np.float32(127.5) - 1
    np.testing.assert_allclose(pixels("bees/palette.png"), want, rtol=0, atol=1e-6)
    # A 1x1 image upsamples to a flat 16x16 square of its colour.
    want = np.array(TINY_COLOUR, np.float32)[:, None, None] / np.float32(127.5) - 1
    np.testing.assert_allclose(pixels("cats/tiny1.png"), np.broadcast_to(want, (3, 16, 16)),
                               rtol=0, atol=1e-6)
    assert np.all(np.abs(t["latents"]) <= 1.0)

    assert "4 unreadable" in out and "report.json" in out
    assert "Traceback" not in out + err

    rc, out, _ = run_main(["verify", dest], capsys)
    assert rc == 0 and "OK" in out


@pytest.mark.slow  # a subprocess run of the real CLI
def test_missing_source_is_a_clean_error(tmp_path):
    missing = tmp_path / "not-there" / "train"
    r = run_cli("--source", missing, "--dest", tmp_path / "out", "--resolution", 8, *ENCODE)
    assert r.returncode == 2, r.stderr
    assert f"encode.py: error: source {missing} does not exist" in r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # a subprocess run of the real CLI
def test_dest_with_different_configuration(tmp_path, capsys):
    dest = tmp_path / "d"
    rc, _, err = run_main(["--source", "digits", "--dest", dest, "--resolution", 8, *ENCODE],
                          capsys)
    assert rc == 0, err
    before = snapshot(dest)
    assert any(k.startswith("shard-") for k in before)

    r = run_cli("--source", "digits", "--dest", dest, "--resolution", 16, *ENCODE)
    assert r.returncode == 2
    error = [line for line in r.stderr.splitlines() if "error" in line]
    assert len(error) == 1 and error[0].startswith(f"encode.py: error: --dest {dest} ")
    assert "different configuration (resolution: 8 -> 16)" in error[0]
    assert "--overwrite" in error[0]
    assert "Traceback" not in r.stderr
    assert snapshot(dest) == before  # nothing touched, nothing added

    rc, out, err = run_main(["--source", "digits", "--dest", dest, "--resolution", 16, *ENCODE,
                             "--overwrite"], capsys)
    assert rc == 0, err
    m = json.loads((dest / "manifest.json").read_text())
    assert m["resolution"] == 16 and m["latent"]["height"] == 16 and m["count"] == 1797
    assert load_shards(dest)["latents"].shape == (1797, 3, 16, 16)
    assert run_main(["verify", dest], capsys)[0] == 0


def test_rerun_on_finished_dest_is_a_no_op(tmp_path, capsys):
    dest = tmp_path / "d"
    argv = ["--source", "digits", "--dest", dest, "--resolution", 8, *ENCODE]
    assert run_main(argv, capsys)[0] == 0
    before = snapshot(dest)
    rc, out, err = run_main(argv, capsys)
    assert rc == 0, err
    assert "already complete" in out
    assert snapshot(dest) == before
    assert not (dest / ".progress").exists()  # no debris: the run left nothing behind
    # A run killed after writing manifest.json but before removing .progress/ is finished too.
    (dest / ".progress").mkdir()
    (dest / ".progress" / "config.json").write_text(
        json.dumps(json.loads((dest / "manifest.json").read_text())["config"]))
    rc, out, err = run_main(argv, capsys)
    assert rc == 0 and "already complete" in out, err
    assert snapshot(dest) == before and not (dest / ".progress").exists()


def test_dest_with_foreign_shards(tmp_path, capsys):
    dest = tmp_path / "d"
    dest.mkdir()
    junk = b"not written by encode.py" * 10
    (dest / "shard-00000.safetensors").write_bytes(junk)
    argv = ["--source", "digits", "--dest", dest, "--resolution", 8, *ENCODE]
    rc, _, err = run_main(argv, capsys)
    assert rc == 2
    assert err.startswith(f"encode.py: error: --dest {dest} holds shard files of unknown "
                          "configuration") and "--overwrite" in err
    assert snapshot(dest) == {"shard-00000.safetensors": junk}

    rc, _, err = run_main(argv + ["--overwrite"], capsys)
    assert rc == 0, err
    assert (dest / "shard-00000.safetensors").read_bytes() != junk
    assert json.loads((dest / "manifest.json").read_text())["count"] == 1797
    assert run_main(["verify", dest], capsys)[0] == 0


def test_all_images_unreadable(tmp_path, capsys):
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    (src / "a" / "x.jpg").write_bytes(np.random.default_rng(0).bytes(500))
    (src / "a" / "y.png").write_text("text")
    (src / "b").mkdir()
    (src / "b" / "z.jpeg").write_bytes(b"")
    rc, out, err = run_main(["--source", src, "--dest", tmp_path / "out", "--resolution", 8,
                             *ENCODE], capsys)
    assert rc == 1  # the run finished (report.json says why), it did not refuse to start
    assert "encode.py: error: no image could be encoded" in err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert sorted(f["name"] for f in report["failed"]) == ["a/x.jpg", "a/y.png", "b/z.jpeg"]


def test_hf_dataset_with_a_corrupt_image(tmp_path, capsys):
    datasets = pytest.importorskip("datasets")
    n, bad = 6, 3
    col = []
    for i in range(n):
        b = io.BytesIO()
        Image.fromarray(noise(10 + i, 9, 30 + i)).save(b, "PNG")
        col.append({"bytes": b.getvalue(), "path": None})
    col[bad] = {"bytes": b"\x89PNG\r\n\x1a\n but then garbage", "path": None}
    labels = [0, 1, 2, 0, 1, 2]
    feats = datasets.Features({"image": datasets.Image(),
                               "label": datasets.ClassLabel(names=["r", "s", "t"])})
    datasets.Dataset.from_dict({"image": col, "label": labels}, features=feats) \
        .save_to_disk(str(tmp_path / "hf"))

    dest = tmp_path / "out"
    rc, out, err = run_main(["--source", tmp_path / "hf", "--dest", dest, "--resolution", 8,
                             *ENCODE], capsys)
    assert rc == 0, err
    m = json.loads((dest / "manifest.json").read_text())
    assert m["count"] == n - 1 and m["num_failed"] == 1
    assert m["class_names"] == ["r", "s", "t"]
    report = json.loads((dest / "report.json").read_text())
    assert len(report["failed"]) == 1
    f = report["failed"][0]
    assert f["index"] == bad and f"[{bad}]" in f["name"] and f["error"]
    t = load_shards(dest)
    assert sorted(t["index"].tolist()) == [i for i in range(n) if i != bad]
    assert [labels[i] for i in t["index"].tolist()] == t["labels"].tolist()
    assert "1 unreadable" in out


# ----------------------------------------------------------------------------------------------
# encode.py verify

@pytest.fixture(scope="module")
def good_dir(tmp_path_factory):
    dest = tmp_path_factory.mktemp("verify") / "good"
    threads = torch.get_num_threads()
    try:
        rc = encode.main(["--source", "digits", "--dest", str(dest), "--resolution", "8",
                          "--shard-size", "500", *ENCODE])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    assert sorted(p.name for p in dest.glob("shard-*")) == [
        f"shard-0000{i}.safetensors" for i in range(4)]
    return dest


@pytest.fixture
def copy_of_good(good_dir, tmp_path):
    d = tmp_path / "copy"
    shutil.copytree(good_dir, d)
    return d


@pytest.mark.slow  # a subprocess run of the real CLI
def test_verify_ok_cli(good_dir):
    r = run_cli("verify", good_dir)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "OK" in r.stdout and "1797 samples" in r.stdout and "4 shards" in r.stdout


def test_verify_flipped_byte(copy_of_good, capsys):
    p = copy_of_good / "shard-00001.safetensors"
    data = bytearray(p.read_bytes())
    data[-1] ^= 0x01
    p.write_bytes(bytes(data))
    rc, out, _ = run_main(["verify", copy_of_good], capsys)
    assert rc == 1
    bad = [line for line in out.splitlines() if "shard-" in line]
    assert len(bad) == 1 and "shard-00001.safetensors" in bad[0] and "sha256" in bad[0]
    assert "OK" not in out


def test_verify_missing_shard(copy_of_good, capsys):
    (copy_of_good / "shard-00002.safetensors").unlink()
    rc, out, _ = run_main(["verify", copy_of_good], capsys)
    assert rc == 1
    assert "shard-00002.safetensors: missing" in out


def test_verify_truncated_shard(copy_of_good, capsys):
    p = copy_of_good / "shard-00003.safetensors"
    data = p.read_bytes()
    p.write_bytes(data[:len(data) // 2])
    rc, out, _ = run_main(["verify", copy_of_good], capsys)
    assert rc == 1 and "shard-00003.safetensors" in out and "sha256" in out
    # Without hashes the structural check still finds it.
    rc, out, _ = run_main(["verify", copy_of_good, "--no-hash"], capsys)
    assert rc == 1 and "shard-00003.safetensors" in out and "truncated" in out


def test_verify_edited_manifest_count(copy_of_good, capsys):
    p = copy_of_good / "manifest.json"
    m = json.loads(p.read_text())
    m["count"] += 1
    p.write_text(json.dumps(m))
    rc, out, _ = run_main(["verify", copy_of_good], capsys)
    assert rc == 1
    assert "1797" in out and "1798" in out and "count" in out


def test_verify_not_a_shard_dir(tmp_path, capsys):
    rc, out, _ = run_main(["verify", tmp_path], capsys)
    assert rc == 1 and "manifest.json" in out

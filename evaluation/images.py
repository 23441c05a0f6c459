"""Image sources for the metrics: uint8 (N, H, W, 3) batches from an .npz, an array, a shard
directory or an image folder, read in batches so that 50k images never sit in memory as pixels.

Every source has ``len()`` and ``batches(batch_size, limit=None)``, which yields uint8 NHWC arrays.
"""
from __future__ import annotations

import contextlib
import os
import zipfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")  # the statistics an ADM reference batch carries


def check_images(shape: tuple, dtype: Any, what: str = "images") -> None:
    """Raise ValueError unless ``shape``/``dtype`` describe uint8 NHWC RGB images."""
    if np.dtype(dtype) != np.uint8 or len(shape) != 4 or shape[-1] != 3:
        raise ValueError(f"{what}: expected uint8 images of shape (N, H, W, 3), got "
                         f"{np.dtype(dtype)} {tuple(shape)}" +
                         (" (channels first? transpose to NHWC)" if len(shape) == 4
                          and shape[1] == 3 and shape[-1] != 3 else ""))
    if shape[0] < 1:
        raise ValueError(f"{what}: holds no images")


class NpzImages:
    """``arr_0`` of an ADM-style ``.npz``, read in batches straight from the zip member."""

    def __init__(self, path: str | os.PathLike, key: str = "arr_0"):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such file")
        try:
            with zipfile.ZipFile(self.path) as zf:
                names = [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
        except zipfile.BadZipFile:
            raise ValueError(f"{self.path} is not an .npz file (np.savez writes one)") from None
        self.keys = names
        if key not in names:
            raise ValueError(f"{self.path} has no '{key}' array (keys: {names}); ADM batches "
                             f"keep the images in arr_0, as np.savez(path, images) writes them")
        self.key = key
        self._stats: dict | None = None
        with self._member() as f:
            self.shape, fortran, self.dtype, self._offset = _npy_header(f)
        if fortran:
            raise ValueError(f"{self.path}: {key} is Fortran-ordered; save a C-ordered array")
        check_images(self.shape, self.dtype, f"{self.path}:{key}")

    @contextlib.contextmanager
    def _member(self):
        with zipfile.ZipFile(self.path) as zf, zf.open(self.key + ".npy") as f:
            yield f

    def __len__(self) -> int:
        return int(self.shape[0])

    def batches(self, batch_size: int, limit: int | None = None) -> Iterator[np.ndarray]:
        """uint8 (b, H, W, 3) read-only arrays of at most ``batch_size`` images, in order."""
        n = len(self) if limit is None else min(limit, len(self))
        per = int(np.prod(self.shape[1:]))
        with self._member() as f:
            f.read(self._offset)
            for a in range(0, n, batch_size):
                b = min(a + batch_size, n)
                buf = f.read((b - a) * per)
                if len(buf) != (b - a) * per:
                    raise ValueError(f"{self.path}: {self.key} is truncated")
                yield np.frombuffer(buf, np.uint8).reshape((b - a,) + tuple(self.shape[1:]))

    def stats(self) -> dict[str, np.ndarray] | None:
        """mu/sigma/mu_s/sigma_s when the file holds all four (an ADM reference batch)."""
        if not all(k in self.keys for k in STAT_KEYS):
            return None
        if self._stats is None:
            with np.load(self.path) as z:
                out = {k: np.asarray(z[k], dtype=np.float64) for k in STAT_KEYS}
                if "inception_size" in z.files:
                    out["inception_size"] = int(z["inception_size"])
            self._stats = out
        return self._stats


def _npy_header(f) -> tuple[tuple, bool, np.dtype, int]:
    fmt = np.lib.format
    version = fmt.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = fmt.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, fortran, dtype = fmt.read_array_header_2_0(f)
    else:
        shape, fortran, dtype = fmt._read_array_header(f, version)  # (3, 0): utf-8 header
    return shape, fortran, dtype, f.tell()


class ArrayImages:
    """An in-memory uint8 (N, H, W, 3) array as a source."""

    def __init__(self, arr: np.ndarray):
        self.arr = arr

    def __len__(self) -> int:
        return len(self.arr)

    def batches(self, batch_size: int, limit: int | None = None) -> Iterator[np.ndarray]:
        """Consecutive slices of the array (views, no copies)."""
        n = len(self.arr) if limit is None else min(limit, len(self.arr))
        for a in range(0, n, batch_size):
            yield self.arr[a:min(a + batch_size, n)]


def as_images(images: Any, what: str) -> Any:
    """Path | NpzImages | ndarray | tensor | reader -> a source with len() and batches()."""
    if isinstance(images, (str, os.PathLike)):
        return NpzImages(images)
    if hasattr(images, "batches") and hasattr(images, "__len__"):
        return images  # NpzImages, or any reader with batches(batch_size, limit)
    arr = images.cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    check_images(arr.shape, arr.dtype, what)
    return ArrayImages(arr)


class LimitedImages:
    """The first ``n`` images of another source."""

    def __init__(self, src: Any, n: int):
        self.src, self.n = src, n

    def __len__(self) -> int:
        return self.n

    def batches(self, batch_size: int, limit: int | None = None) -> Iterator[np.ndarray]:
        """The wrapped source's batches, stopped after ``n`` images."""
        yield from self.src.batches(batch_size, self.n if limit is None else min(limit, self.n))


class FolderImages:
    """An image folder, ADM centre-cropped, in a seeded random order (so the first 10k are a
    random subset, not the first classes); unreadable images are skipped and listed in
    ``failed``."""

    def __init__(self, root: str, size: int, seed: int, num_workers: int, limit: int | None):
        from preprocessing.sources import FolderSource

        self.source = FolderSource(root)
        order = np.random.default_rng(seed).permutation(len(self.source))
        self.order = order[:limit] if limit else order
        self.size, self.num_workers = size, num_workers
        self.failed: list[str] = []

    def __len__(self) -> int:
        return len(self.order)

    def batches(self, batch_size: int, limit: int | None = None) -> Iterator[np.ndarray]:
        """Decoded and cropped by ``num_workers`` processes, in the seeded order."""
        order = self.order[:limit] if limit else self.order
        from preprocessing.sources import CroppedItems, collate_list

        loader = torch.utils.data.DataLoader(
            CroppedItems(self.source, order, self.size), batch_size=batch_size,
            num_workers=self.num_workers, collate_fn=collate_list)
        for items in loader:
            good = [a for _, a, _, err in items if err is None]
            self.failed += [f"{self.source.name(int(order[k]))}: {err}"
                            for k, _, _, err in items if err is not None]
            if good:
                yield np.stack(good)


class ShardImages:
    """The stored ``images`` of a shard directory, in stored order, as NHWC."""

    def __init__(self, root: str, limit: int | None):
        from preprocessing.shards import ShardDataset

        ds = ShardDataset(root)
        if not ds.has_images:
            raise ValueError(f"{root} has no stored images: encode it with --store-images "
                             "(or point make-reference at the image folder)")
        self.shards = [t["images"] for t in ds.shards]
        total = len(ds)
        self.n = min(limit, total) if limit else total

    def __len__(self) -> int:
        return self.n

    def batches(self, batch_size: int, limit: int | None = None) -> Iterator[np.ndarray]:
        """Stored order, converted from the shards' NCHW to NHWC."""
        n = self.n if limit is None else min(limit, self.n)
        done = 0
        for imgs in self.shards:
            for a in range(0, imgs.shape[0], batch_size):
                if done >= n:
                    return
                part = imgs[a:a + min(batch_size, n - done)]
                done += part.shape[0]
                yield part.permute(0, 2, 3, 1).contiguous().numpy()


def open_source(spec: str, max_images: int | None = None, resolution: int = 256, seed: int = 0,
                num_workers: int = 0) -> Any:
    """A shard directory, an .npz batch or an image folder (centre-cropped to ``resolution``,
    shuffled with ``seed``) as a source of at most ``max_images`` images."""
    p = Path(spec)
    if p.is_dir() and (p / "manifest.json").is_file():
        return ShardImages(spec, max_images)
    if p.is_file() and p.suffix == ".npz":
        src = NpzImages(spec)
        return LimitedImages(src, min(max_images, len(src))) if max_images else src
    if p.is_dir():
        return FolderImages(spec, resolution, seed, num_workers, max_images)
    raise FileNotFoundError(f"{spec}: not a shard directory, an image folder or an .npz file")

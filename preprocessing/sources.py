"""Image sources for encode.py and the ADM centre crop.

A source is an indexable list of (image, label): ``len(src)``, ``src.label(i)``, ``src.load(i)``
(a PIL image, raising on unreadable input), plus ``class_names``, ``describe()`` (what identifies
its content, for the manifest and the resume check) and ``notes()`` (skipped files, empty classes).
Sources are picklable so DataLoader workers can decode images in parallel.
"""
from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

# Images whose aspect ratio exceeds this would need an enormous intermediate when resized
# (ADM resizes the whole image before cropping), so they are reported instead of encoded.
MAX_ASPECT = 64.0


class SourceError(Exception):
    """The source cannot be opened (missing path, no images, wrong columns...)."""


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. Alpha is dropped as ``convert('RGB')`` does (ADM/REPA parity)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: rescale to 8 bits instead of clipping at 255.
        a = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        img = Image.fromarray(np.clip(a * (255.0 / hi) + 0.5, 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        a = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(a * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    return img.convert("RGB")


def adm_center_crop(img: Image.Image, size: int) -> np.ndarray:
    """ADM's centre crop (guided-diffusion ``center_crop_arr``) -> uint8 array (size, size, 3).

    Halve with a box filter while the short side is >= 2*size, resize the short side to ``size``
    with bicubic, then take the centred square. FID reference batches were made this way.
    """
    img = to_rgb(img)
    while min(img.size) >= 2 * size:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    scale = size / min(img.size)
    img = img.resize(tuple(round(x * scale) for x in img.size), resample=Image.BICUBIC)
    arr = np.asarray(img)
    top = (arr.shape[0] - size) // 2
    left = (arr.shape[1] - size) // 2
    return np.ascontiguousarray(arr[top:top + size, left:left + size])


def load_and_crop(src: "Source", i: int, size: int) -> tuple[np.ndarray, bool]:
    """Decode item ``i`` fully and crop it; return (uint8 HxWx3, was it upsampled)."""
    img = src.load(i)
    img.load()  # force the full decode here so truncated files fail now, not later
    w, h = img.size
    if w < 1 or h < 1:
        raise ValueError(f"empty image ({w}x{h})")
    if max(w, h) / min(w, h) > MAX_ASPECT:
        raise ValueError(f"aspect ratio {w}x{h} exceeds {MAX_ASPECT:g}:1")
    return adm_center_crop(img, size), min(w, h) < size


class CroppedItems(torch.utils.data.Dataset):
    """Source items at ``positions``, decoded and ADM-cropped (in DataLoader workers).

    Item k is ``(k, uint8 HxWx3 or None, upsampled?, error message or None)``: an unreadable
    image comes back as a message for the caller's report instead of stopping the loader.
    """

    def __init__(self, source: "Source", positions: np.ndarray, size: int):
        self.source, self.positions, self.size = source, positions, size

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, k: int) -> tuple[int, np.ndarray | None, bool, str | None]:
        try:
            arr, small = load_and_crop(self.source, int(self.positions[k]), self.size)
            return k, arr, small, None
        except Exception as e:  # noqa: BLE001 -- any decode failure is reported, not fatal
            return k, None, False, f"{type(e).__name__}: {e}"


def collate_list(items: list) -> list:
    """DataLoader collate that keeps the items as they are (arrays of varying validity)."""
    return items


def _image_extensions() -> set[str]:
    Image.init()
    return {ext.lower() for ext in Image.registered_extensions()}


class FolderSource:
    """An ImageNet-style tree: ``root/<class>/<image>``; class index = sorted folder names."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise SourceError(f"source folder {root} does not exist")
        exts = _image_extensions()
        self.class_names = sorted(d.name for d in os.scandir(self.root)
                                  if d.is_dir() and not d.name.startswith("."))
        if not self.class_names:
            raise SourceError(f"{root} has no class sub-folders (expected root/<class>/<image>)")
        self.files: list[str] = []
        self.labels: list[int] = []
        self.skipped: list[str] = []
        self.empty_classes: list[str] = []
        stray = [e.name for e in os.scandir(self.root) if e.is_file() and not e.name.startswith(".")]
        self.skipped += stray
        for c, name in enumerate(self.class_names):
            found = 0
            for dirpath, dirnames, filenames in os.walk(self.root / name, followlinks=True):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                rel_dir = Path(dirpath).relative_to(self.root)
                for f in sorted(filenames):
                    rel = str(rel_dir / f)
                    if f.startswith("."):
                        continue
                    if Path(f).suffix.lower() in exts:
                        self.files.append(rel)
                        self.labels.append(c)
                        found += 1
                    else:
                        self.skipped.append(rel)
            if not found:
                self.empty_classes.append(name)
        if not self.files:
            raise SourceError(f"no image files under {root} (extensions: {sorted(exts)[:12]}...)")

    def __len__(self) -> int:
        return len(self.files)

    def label(self, i: int) -> int:
        return self.labels[i]

    def name(self, i: int) -> str:
        return self.files[i]

    def load(self, i: int) -> Image.Image:
        return Image.open(self.root / self.files[i])

    def describe(self) -> dict[str, Any]:
        listing = hashlib.sha256("\n".join(f"{f}\t{l}" for f, l in zip(self.files, self.labels))
                                 .encode()).hexdigest()
        return {"type": "folder", "path": str(self.root), "num_files": len(self.files),
                "listing_sha256": listing}

    def notes(self) -> dict[str, Any]:
        return {"skipped_files": self.skipped, "empty_classes": self.empty_classes}


DIGITS_SUBSETS = ("train", "heldout")


def digits_subset_indices(labels: np.ndarray, size: int, seed: int
                          ) -> tuple[np.ndarray, np.ndarray]:
    """``(train, heldout)``: sorted indices of a seeded, class-balanced split of the digits.

    Each class's indices are put in a random order (``np.random.default_rng(seed)``, classes in
    turn 0..9); the classes are then visited round-robin (the first digit of every class, then
    the second, ...) and the first ``size`` visited form the training subset, so every class
    gets ``size / 10`` digits (+-1 while no class runs out). The held-out subset is the rest.
    """
    labels = np.asarray(labels)
    if not 1 <= size < len(labels):
        raise ValueError(f"--subset-size must be between 1 and {len(labels) - 1}, got {size}")
    rng = np.random.default_rng(seed)
    per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    order = [idx[k] for k in range(max(map(len, per_class))) for idx in per_class
             if k < len(idx)]
    train = np.sort(np.asarray(order[:size], dtype=np.int64))
    heldout = np.setdiff1d(np.arange(len(labels)), train)
    return train, heldout


class DigitsSource:
    """scikit-learn's bundled handwritten digits: 1797 real 8x8 greyscale images, 10 classes.

    Pixel values 0..16 become uint8 ``round(v * 255 / 16)``, replicated to RGB, and are upscaled to
    ``size`` with nearest neighbour when it is a multiple of 8 (exact pixel blocks) and bicubic
    otherwise. The ADM crop is then the identity. ``subset`` ('train' or 'heldout', with
    ``subset_size`` and ``subset_seed``) keeps one side of :func:`digits_subset_indices`.
    """

    def __init__(self, size: int, subset: str | None = None, subset_size: int | None = None,
                 subset_seed: int = 0):
        from sklearn.datasets import load_digits

        d = load_digits()
        self.images = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)  # (1797, 8, 8)
        self.targets = d.target.astype(np.int64)
        self.size = size
        self.class_names = [str(c) for c in range(10)]
        self.subset = None
        self.index = np.arange(len(self.targets))
        if subset is not None:
            if subset not in DIGITS_SUBSETS or subset_size is None:
                raise SourceError(f"--subset must be one of {DIGITS_SUBSETS} with --subset-size")
            try:
                train, heldout = digits_subset_indices(self.targets, subset_size, subset_seed)
            except ValueError as e:
                raise SourceError(str(e)) from None
            self.index = train if subset == "train" else heldout
            self.subset = {"subset": subset, "subset_size": int(subset_size),
                           "subset_seed": int(subset_seed)}

    def __len__(self) -> int:
        return len(self.index)

    def label(self, i: int) -> int:
        return int(self.targets[self.index[i]])

    def name(self, i: int) -> str:
        return f"digits[{self.index[i]}]"

    def load(self, i: int) -> Image.Image:
        img = Image.fromarray(self.images[self.index[i]], "L").convert("RGB")
        if self.size != 8:
            method = Image.NEAREST if self.size % 8 == 0 else Image.BICUBIC
            img = img.resize((self.size, self.size), resample=method)
        return img

    def describe(self) -> dict[str, Any]:
        out = {"type": "digits", "num_files": len(self), "upscale":
               "nearest" if self.size % 8 == 0 else "bicubic"}
        if self.subset is not None:  # absent for all digits: their manifests stay as they were
            out.update(self.subset)
        return out

    def notes(self) -> dict[str, Any]:
        return {"skipped_files": [], "empty_classes": []}


class HFSource:
    """A HuggingFace ``datasets`` dataset saved with ``save_to_disk`` (image + label columns)."""

    def __init__(self, path: str | os.PathLike, image_column: str = "image",
                 label_column: str = "label", split: str = "train"):
        try:
            import datasets
        except ImportError:
            raise SourceError("reading a HF dataset needs the `datasets` package: "
                              "pip install datasets") from None
        self.path = Path(path).resolve()
        if not self.path.exists():
            raise SourceError(f"HF dataset directory {path} does not exist")
        ds = datasets.load_from_disk(str(self.path))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise SourceError(f"{path} has splits {sorted(ds)}, not '{split}' (--split)")
            ds = ds[split]
        self.split = split
        for col, flag in ((image_column, "--image-column"), (label_column, "--label-column")):
            if col not in ds.column_names:
                raise SourceError(f"{path} has columns {ds.column_names}; no '{col}' ({flag})")
        if isinstance(ds.features[image_column], datasets.Image):
            # Decode ourselves so one corrupt image is reported instead of failing the row read.
            ds = ds.cast_column(image_column, datasets.Image(decode=False))
        self.ds = ds
        self.image_column, self.label_column = image_column, label_column
        labels = np.asarray(ds[label_column])
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer) or \
                (labels.size and labels.min() < 0):
            raise SourceError(f"column '{label_column}' must hold non-negative integer labels")
        self.labels = labels.astype(np.int64)
        feat = ds.features[label_column]
        if isinstance(feat, datasets.ClassLabel):
            self.class_names = list(feat.names)
        else:
            self.class_names = [str(c) for c in range(int(labels.max()) + 1 if labels.size else 0)]
        self.fingerprint = getattr(ds, "_fingerprint", None)

    def __len__(self) -> int:
        return len(self.labels)

    def label(self, i: int) -> int:
        return int(self.labels[i])

    def name(self, i: int) -> str:
        return f"{self.path}[{self.split}][{i}]"

    def load(self, i: int) -> Image.Image:
        v = self.ds[int(i)][self.image_column]
        if isinstance(v, Image.Image):
            return v
        if isinstance(v, dict):
            if v.get("bytes"):
                return Image.open(io.BytesIO(v["bytes"]))
            if v.get("path"):
                return Image.open(v["path"])
            raise ValueError("image entry has neither bytes nor path")
        if v is None:
            raise ValueError("image is missing (None)")
        return Image.fromarray(np.asarray(v, dtype=np.uint8))

    def describe(self) -> dict[str, Any]:
        return {"type": "hf", "path": str(self.path), "split": self.split,
                "image_column": self.image_column, "label_column": self.label_column,
                "num_files": len(self), "fingerprint": self.fingerprint}

    def notes(self) -> dict[str, Any]:
        return {"skipped_files": [], "empty_classes": []}


Source = FolderSource | DigitsSource | HFSource


def open_source(spec: str, kind: str = "auto", resolution: int = 256,
                digits_subset: dict | None = None, **hf_kwargs: Any) -> Source:
    """Open ``spec`` ('digits', a class-folder tree, or a saved HF dataset); ``digits_subset``
    (``{'subset', 'subset_size', 'subset_seed'}``) keeps a split of the digits."""
    if kind == "auto":
        if spec == "digits":
            kind = "digits"
        else:
            p = Path(spec)
            if not p.exists():
                raise SourceError(f"source {spec} does not exist (use 'digits' for the bundled "
                                  "dataset, a class-folder tree, or a HF dataset saved to disk)")
            hf_markers = ("dataset_info.json", "dataset_dict.json", "state.json")
            kind = "hf" if any((p / f).is_file() for f in hf_markers) else "folder"
    if kind == "digits":
        if spec != "digits":
            raise SourceError(f"--source-type digits needs --source digits, got {spec!r}")
        return DigitsSource(resolution, **(digits_subset or {}))
    if digits_subset:
        raise SourceError("--subset applies to --source digits only")
    if not Path(spec).exists():
        raise SourceError(f"source {spec} does not exist")
    if kind == "hf":
        return HFSource(spec, **hf_kwargs)
    if kind == "folder":
        return FolderSource(spec)
    raise SourceError(f"unknown source type {kind!r}")

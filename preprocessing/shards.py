"""The shard format: how encode.py writes it and how training reads it.

A shard directory holds ``manifest.json`` and ``shard-NNNNN.safetensors`` files
(docs/CONVENTIONS.md §3).
Each shard has ``moments`` (N, 2C, h, w) -- posterior mean then std -- or ``latents`` (N, C, h, w)
for stored samples/means and pixel mode, ``labels`` int64 (N,), ``index`` int64 (N,) (position in
the source), optionally ``images`` uint8 (N, 3, H, W) and the mirrored copies ``moments_flip`` /
``latents_flip``. Everything about the format lives in this module so writer and reader agree.

The reader maps shards into memory (``torch.from_file``, no copy, no per-sample file opens) and
serves whole batches with a few ``index_select`` calls, which is what makes it fast.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from common import atomic_write_bytes, mix_seed, sha256_file

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
REPORT = "report.json"
PROGRESS_DIR = ".progress"
SHARD_GLOB = "shard-*.safetensors"

_ST_DTYPES = {
    "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8, "BOOL": torch.bool,
}


class ShardFormatError(Exception):
    """A shard directory or file does not follow the format."""


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


def write_shard(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                metadata: dict[str, str] | None = None) -> str:
    """Serialise ``tensors`` to safetensors atomically; return the file's sha256.

    The bytes depend only on the tensors and metadata (safetensors sorts keys), so the same
    content always gives the same file -- the basis of byte-identical resume.
    """
    from safetensors.torch import save

    # safetensors writes metadata keys in hash-map order: fold them into one key to stay stable.
    meta = {"info": json.dumps(metadata, sort_keys=True)} if metadata else None
    data = save({k: v.contiguous().cpu() for k, v in tensors.items()}, metadata=meta)
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


# ----------------------------------------------------------------------------------------------
# Reading headers and the manifest.

def read_header(path: str | os.PathLike) -> tuple[dict, int]:
    """Return (header dict, byte offset of the data section) of a safetensors file."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ShardFormatError(f"{path}: too short to be a safetensors file")
        (n,) = struct.unpack("<Q", raw)
        if n > 100_000_000:
            raise ShardFormatError(f"{path}: implausible header length {n}")
        blob = f.read(n)
        if len(blob) != n:
            raise ShardFormatError(f"{path}: truncated header")
    try:
        header = json.loads(blob)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ShardFormatError(f"{path}: damaged header, not JSON ({e})") from None
    if not isinstance(header, dict):
        raise ShardFormatError(f"{path}: damaged header (not a JSON object)")
    return header, 8 + n


def read_manifest(root: str | os.PathLike) -> dict:
    """Load and sanity-check ``root/manifest.json``."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        hint = ""
        if (Path(root) / PROGRESS_DIR).is_dir():
            hint = " (encoding was started but has not finished: rerun the same encode command)"
        raise FileNotFoundError(f"no {MANIFEST} in {root}{hint}")
    manifest = json.loads(path.read_text())
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ShardFormatError(
            f"{path}: format_version {version!r}, this toolkit reads {FORMAT_VERSION}")
    return manifest


def map_shard(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Memory-map a safetensors file and return zero-copy tensor views of every entry."""
    header, start = read_header(path)
    size = os.path.getsize(path)
    # MAP_PRIVATE mapping: pages come from the page cache on demand and are shared by processes.
    buf = torch.from_file(str(path), shared=False, size=size, dtype=torch.uint8)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _ST_DTYPES.get(info["dtype"])
            a, b = (int(v) for v in info["data_offsets"])
            shape = [int(v) for v in info["shape"]]
        except (KeyError, TypeError, ValueError):
            raise ShardFormatError(f"{path}: damaged header entry for {name!r}") from None
        if dtype is None:
            raise ShardFormatError(f"{path}: unsupported dtype {info['dtype']} for {name}")
        if start + b > size:
            raise ShardFormatError(f"{path}: {name} runs past the end of the file (truncated?)")
        if b == a:
            out[name] = torch.empty(shape, dtype=dtype)
        else:
            out[name] = buf[start + a:start + b].view(dtype).view(shape)
    return out


def hash_problems(root: str | os.PathLike, manifest: dict, which: Iterable[int] | None = None
                  ) -> list[str]:
    """sha256 of the shards ``which`` (indices into the manifest's list; default all) against the
    manifest; one line per shard that is missing or differs."""
    root = Path(root)
    shards = manifest["shards"]
    problems = []
    for i in (range(len(shards)) if which is None else which):
        path = root / shards[i]["file"]
        if not path.is_file():
            problems.append(f"{path}: missing (listed in the manifest)")
        elif sha256_file(path) != shards[i]["sha256"]:
            problems.append(f"{path}: sha256 differs from the manifest (corrupt or replaced)")
    return problems


def verify(root: str | os.PathLike, check_hashes: bool = True) -> list[str]:
    """Check every shard against the manifest; return a list of problems (empty when all good)."""
    root = Path(root)
    try:
        m = read_manifest(root)
    except (FileNotFoundError, ShardFormatError, json.JSONDecodeError) as e:
        return [str(e)]
    problems = []
    key = m["key"]
    lat = m["latent"]
    chans = 2 * lat["channels"] if key == "moments" else lat["channels"]
    sample_shape = [chans, lat["height"], lat["width"]]
    img_shape = [3, m["resolution"], m["resolution"]]
    expected_dtype = {"fp16": "F16", "bf16": "BF16", "fp32": "F32"}[m["dtype"]]
    seen_index: list[torch.Tensor] = []
    total = 0
    listed = {s["file"] for s in m["shards"]}
    for extra in sorted(p.name for p in root.glob(SHARD_GLOB)):
        if extra not in listed:
            problems.append(f"{extra}: not listed in the manifest")
    for s in m["shards"]:
        path = root / s["file"]
        if not path.is_file():
            problems.append(f"{s['file']}: missing")
            continue
        if check_hashes and sha256_file(path) != s["sha256"]:
            problems.append(f"{s['file']}: sha256 differs from the manifest (corrupt or replaced)")
            continue
        try:
            header, _ = read_header(path)
            t = map_shard(path)
        except ShardFormatError as e:
            problems.append(str(e))
            continue
        n = s["count"]
        want = {key: ([n] + sample_shape, expected_dtype), "labels": ([n], "I64"),
                "index": ([n], "I64")}
        if m["hflip"]:
            want[key + "_flip"] = ([n] + sample_shape, expected_dtype)
        if m["images"]:
            want["images"] = ([n] + img_shape, "U8")
        for name, (shape, dtype) in want.items():
            info = header.get(name)
            if info is None:
                problems.append(f"{s['file']}: no '{name}' tensor")
            elif info["shape"] != shape or info["dtype"] != dtype:
                problems.append(f"{s['file']}: '{name}' is {info['dtype']}{info['shape']}, "
                                f"manifest says {dtype}{shape}")
        if "labels" in t and t["labels"].numel():
            lo, hi = int(t["labels"].min()), int(t["labels"].max())
            if lo < 0 or hi >= m["num_classes"]:
                problems.append(f"{s['file']}: labels in [{lo}, {hi}] outside [0, {m['num_classes']})")
        if "index" in t:
            seen_index.append(t["index"].clone())
        for name in (key, key + "_flip"):
            if name in t and t[name].is_floating_point() and t[name].numel():
                if not torch.isfinite(t[name].float()).all():
                    problems.append(f"{s['file']}: '{name}' has NaN/inf values")
        total += n
    if total != m["count"] and not problems:
        problems.append(f"shards hold {total} samples, manifest count is {m['count']}")
    if seen_index:
        idx = torch.cat(seen_index)
        if idx.unique().numel() != idx.numel():
            problems.append("some source indices appear in more than one sample")
    return problems


# ----------------------------------------------------------------------------------------------
# Latent scaling and posterior sampling (pure functions: usable on any device).

def latent_scale_bias(manifest: dict, norm: str = "manifest") -> tuple[torch.Tensor, torch.Tensor]:
    """Return (scale, bias) of shape (C, 1, 1) so that z = raw * scale + bias.

    ``manifest``: the scalar latent_scale/latent_bias recorded at encode time (0.18215 / 0 for
    SD-VAE, REPA parity). ``channel``: per-channel standardisation from the dataset statistics.
    """
    lat = manifest["latent"]
    c = lat["channels"]
    if norm == "manifest":
        scale = torch.full((c,), float(lat["scale"]))
        bias = torch.full((c,), float(lat["bias"]))
    elif norm == "channel":
        mean = torch.tensor(lat["channel_mean"], dtype=torch.float64)
        std = torch.tensor(lat["channel_std"], dtype=torch.float64).clamp_min(1e-8)
        scale, bias = (1.0 / std).float(), (-mean / std).float()
    else:
        raise ValueError(f"latent norm must be 'manifest' or 'channel', got {norm!r}")
    return scale.view(c, 1, 1), bias.view(c, 1, 1)


def latents_from_raw(raw: torch.Tensor, key: str, scale: torch.Tensor, bias: torch.Tensor,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Turn stored values into model latents in fp32: sample the posterior if they are moments.

    ``raw`` is (B, 2C, h, w) moments (mean then std) or (B, C, h, w) latents; works on any device.
    """
    raw = raw.float()
    if key == "moments":
        mean, std = raw.chunk(2, dim=1)
        eps = torch.randn(mean.shape, generator=generator, device=raw.device, dtype=raw.dtype)
        z = mean + std * eps
    else:
        z = raw
    return z * scale.to(raw.device) + bias.to(raw.device)


# ----------------------------------------------------------------------------------------------
# Reader.

class ShardDataset:
    """All shards of a directory, memory-mapped. Map-style access plus a fast batched ``gather``.

    ``dataset[i]`` returns ``(latent, label)`` or ``(latent, label, image)`` with the posterior
    sampled afresh from the global torch RNG on every call (for notebooks and simple loops);
    training uses :class:`ShardLoader`, which is deterministic and batched.
    """

    def __init__(self, root: str | os.PathLike, latent_norm: str = "manifest",
                 with_images: bool = False):
        self.root = Path(root)
        self.manifest = m = read_manifest(self.root)
        self.key: str = m["key"]
        self.num_classes: int = m["num_classes"]
        self.has_flip: bool = bool(m["hflip"])
        self.has_images: bool = bool(m["images"])
        if with_images and not self.has_images:
            raise ValueError(f"{self.root} has no stored images: re-encode with --store-images "
                             "(an encoder loss such as REPA needs the pixels)")
        self.with_images = with_images
        lat = m["latent"]
        self.latent_shape = (lat["channels"], lat["height"], lat["width"])
        self.scale, self.bias = latent_scale_bias(m, latent_norm)
        self.shards: list[dict[str, torch.Tensor]] = []
        for s in m["shards"]:
            path = self.root / s["file"]
            if not path.is_file():
                raise FileNotFoundError(f"{path} is listed in the manifest but missing; "
                                        f"run `python preprocessing/encode.py verify {self.root}`")
            t = map_shard(path)
            if t["labels"].shape[0] != s["count"]:
                raise ShardFormatError(f"{path}: holds {t['labels'].shape[0]} samples, "
                                       f"manifest says {s['count']}")
            self.shards.append(t)
        counts = torch.tensor([s["count"] for s in m["shards"]], dtype=torch.int64)
        self.offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
        # Labels and source indices are small: keep one contiguous copy for one-op gathers.
        self.labels = torch.cat([t["labels"] for t in self.shards]) if self.shards else \
            torch.empty(0, dtype=torch.int64)
        self.index = torch.cat([t["index"] for t in self.shards]) if self.shards else \
            torch.empty(0, dtype=torch.int64)
        # numpy views for the per-batch bookkeeping in gather()
        self._offsets_np = self.offsets.numpy()
        self._labels_np, self._index_np = self.labels.numpy(), self.index.numpy()
        c = 2 * lat["channels"] if self.key == "moments" else lat["channels"]
        self._row_shape = (c, lat["height"], lat["width"])
        self._row_dtype = self.shards[0][self.key].dtype if self.shards else torch.float32

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _locate(self, i: int) -> tuple[int, int]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        s = int(torch.searchsorted(self.offsets, torch.tensor(i), right=True)) - 1
        return s, i - int(self.offsets[s])

    def __getitem__(self, i: int):
        s, j = self._locate(i)
        flip = self.has_flip and bool(torch.randint(0, 2, ()).item())
        raw = self.shards[s][self.key + ("_flip" if flip else "")][j:j + 1]
        x = latents_from_raw(raw, self.key, self.scale, self.bias)[0]
        y = int(self.labels[i])
        if not self.with_images:
            return x, y
        img = self.shards[s]["images"][j]
        return x, y, (img.flip(-1) if flip else img.clone())

    def gather(self, positions: torch.Tensor | np.ndarray, flip: torch.Tensor | None = None,
               with_images: bool = False) -> dict[str, torch.Tensor]:
        """Read the stored rows at global ``positions`` (mirrored where ``flip``) in few copies.

        Rows are returned sorted by (shard, flip, position) so each shard is read in one
        ``index_select``; the returned ``position`` tensor says which sample each row is. The
        bookkeeping runs in numpy on small arrays (microseconds); the copies are torch kernels.
        """
        pos = positions.numpy() if isinstance(positions, torch.Tensor) else np.asarray(positions)
        pos = pos.astype(np.int64, copy=False)
        if flip is None or not self.has_flip:
            f = np.zeros(pos.shape[0], dtype=bool)
        else:
            f = (flip.numpy() if isinstance(flip, torch.Tensor) else np.asarray(flip)).astype(bool)
        order = np.argsort(pos * 2 + f, kind="stable")
        pos, f = pos[order], f[order]
        shard = np.searchsorted(self._offsets_np, pos, side="right") - 1
        local = torch.from_numpy(pos - self._offsets_np[shard])
        bounds = [0, *(np.flatnonzero(np.diff(shard * 2 + f)) + 1).tolist(), pos.shape[0]]
        n = pos.shape[0]
        raw = torch.empty((n,) + self._row_shape, dtype=self._row_dtype)
        imgs = None
        if with_images:
            imgs = torch.empty((n,) + tuple(self.shards[0]["images"].shape[1:]), dtype=torch.uint8)
        for a, b in zip(bounds[:-1], bounds[1:]):
            if a == b:
                continue
            s, mirrored = int(shard[a]), bool(f[a])
            src = self.shards[s][self.key + ("_flip" if mirrored else "")]
            torch.index_select(src, 0, local[a:b], out=raw[a:b])
            if imgs is not None:
                torch.index_select(self.shards[s]["images"], 0, local[a:b], out=imgs[a:b])
                if mirrored:
                    imgs[a:b] = imgs[a:b].flip(-1)
        out = {"raw": raw, "y": torch.from_numpy(self._labels_np[pos]),
               "position": torch.from_numpy(pos), "index": torch.from_numpy(self._index_np[pos]),
               "flip": torch.from_numpy(f)}
        if imgs is not None:
            out["image"] = imgs
        return out


class ShardLoader:
    """Deterministic, resumable batch iterator over a :class:`ShardDataset` for one process.

    Epoch order is shard-aware: shards are shuffled, then samples are shuffled within windows of
    ``shard_window`` consecutive shards (encode.py already stores a seeded permutation of the
    source, so every shard is a random subset). Each global batch of ``batch_size * world_size``
    is split by rank. Flip choices and posterior noise of batch k come from a generator seeded by
    (seed, epoch, k, rank), so a restored ``state_dict`` reproduces the exact same batches.

    Each batch is a dict with ``x`` (fp32 latents, scaled) -- or, with ``output="raw"``, the stored
    moments/latents in storage dtype, to be sampled on the device by :meth:`to_latents` --
    ``y`` labels, ``index`` source indices, ``flip`` and, with ``with_images``, ``image`` uint8.
    """

    def __init__(self, dataset: ShardDataset, batch_size: int, *, rank: int = 0,
                 world_size: int = 1, seed: int = 0, shuffle: bool = True, drop_last: bool = True,
                 hflip: bool = True, with_images: bool | None = None, output: str = "latents",
                 shard_window: int = 4, prefetch: int = 2, num_threads: int = 1):
        if output not in ("latents", "raw"):
            raise ValueError(f"output must be 'latents' or 'raw', got {output!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        if batch_size < 1 or shard_window < 1:
            raise ValueError("batch_size and shard_window must be >= 1")
        self.ds = dataset
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.hflip = hflip and dataset.has_flip
        self.with_images = dataset.with_images if with_images is None else with_images
        if self.with_images and not dataset.has_images:
            raise ValueError(f"{dataset.root} has no stored images: re-encode with --store-images")
        self.output, self.shard_window = output, shard_window
        self.prefetch, self.num_threads = prefetch, num_threads
        global_batch = batch_size * world_size
        n = len(dataset)
        self.steps_per_epoch = n // global_batch if drop_last else -(-n // global_batch)
        if self.steps_per_epoch == 0:
            raise ValueError(f"{n} samples cannot fill one global batch of {global_batch} "
                             f"({batch_size} x {world_size} processes); lower the batch size")
        self.epoch, self.step = 0, 0
        self._order_cache: tuple[int, torch.Tensor] | None = None

    def __len__(self) -> int:
        return self.steps_per_epoch

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, int]:
        """Position of the next batch; everything else is recomputed from the seed."""
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed,
                "batch_size": self.batch_size, "world_size": self.world_size,
                "num_samples": len(self.ds)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        for k in ("seed", "batch_size", "world_size", "num_samples"):
            mine = self.state_dict()[k]
            if k in state and state[k] != mine:
                raise ValueError(f"cannot resume the data position: {k} was {state[k]}, now {mine}")
        self.epoch, self.step = int(state["epoch"]), int(state["step"])

    # -- order ----------------------------------------------------------------------------------
    def epoch_order(self, epoch: int) -> torch.Tensor:
        """Global sample positions of ``epoch`` in the order they are served (all ranks)."""
        if self._order_cache is not None and self._order_cache[0] == epoch:
            return self._order_cache[1]
        offsets = self.ds.offsets
        n_shards = offsets.numel() - 1
        if not self.shuffle:
            order = torch.arange(len(self.ds))
        else:
            g = torch.Generator().manual_seed(mix_seed(self.seed, epoch, 0x5A4D))
            shard_perm = torch.randperm(n_shards, generator=g).tolist()
            parts = []
            for w in range(0, n_shards, self.shard_window):
                ids = shard_perm[w:w + self.shard_window]
                pos = torch.cat([torch.arange(int(offsets[s]), int(offsets[s + 1])) for s in ids])
                parts.append(pos[torch.randperm(pos.numel(), generator=g)])
            order = torch.cat(parts)
        self._order_cache = (epoch, order)
        return order

    def _batch(self, epoch: int, step: int) -> dict[str, torch.Tensor]:
        order = self.epoch_order(epoch)
        gb = self.batch_size * self.world_size
        chunk = order[step * gb:(step + 1) * gb]
        per = -(-chunk.numel() // self.world_size)  # a short last batch is split evenly
        mine = chunk[self.rank * per:(self.rank + 1) * per]
        need_rng = self.hflip or (self.output == "latents" and self.ds.key == "moments")
        g = torch.Generator().manual_seed(mix_seed(self.seed, epoch, step, self.rank, 0xBA7C)) \
            if need_rng else None
        flip = torch.randint(0, 2, (mine.numel(),), generator=g).bool() if self.hflip else None
        b = self.ds.gather(mine, flip, with_images=self.with_images)
        raw = b.pop("raw")
        if self.output == "latents":
            b["x"] = latents_from_raw(raw, self.ds.key, self.ds.scale, self.ds.bias, g)
        else:
            b["x"] = raw
        return b

    def to_latents(self, raw: torch.Tensor, generator: torch.Generator | None = None
                   ) -> torch.Tensor:
        """Sample/scale ``output="raw"`` batches on their device (e.g. inside the train step)."""
        return latents_from_raw(raw, self.ds.key, self.ds.scale, self.ds.bias, generator)

    # -- iteration ------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        """Serve the rest of the current epoch (the next one if it is used up), then advance."""
        if self.step >= self.steps_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
        epoch = self.epoch
        todo = deque(range(self.step, self.steps_per_epoch))
        if self.prefetch <= 0:
            for k in todo:
                batch = self._batch(epoch, k)
                self.step = k + 1
                yield batch
        else:
            # torch's copy kernels release the GIL, so threads overlap reads with the train step.
            with ThreadPoolExecutor(max_workers=self.num_threads) as pool:
                pending: deque = deque()
                while todo or pending:
                    while todo and len(pending) < self.prefetch:
                        k = todo.popleft()
                        pending.append((k, pool.submit(self._batch, epoch, k)))
                    k, fut = pending.popleft()
                    batch = fut.result()
                    self.step = k + 1
                    yield batch
        self.epoch, self.step = epoch + 1, 0

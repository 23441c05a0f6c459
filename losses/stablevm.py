"""StableVM: a per-class memory bank of clean latents and the stable (variance-reduced) target.

docs/CONVENTIONS.md §5. For a sample with label y, time t and ``x_t = a(t) x0 + s(t) eps`` (x0
drawn from the bank of y), the target for ``t >= split`` is the exact marginal velocity of the empirical
distribution held in that bank:

    v*(x_t, t) = (s'/s) x_t + (a' - s' a / s) * sum_j w_j x0_j,
    w = softmax_j( -||x_t - a x0_j||^2 / (2 s^2) )        over the valid entries of the bank,

which for the linear path (a = 1 - t, s = t) is ``(x_t - sum_j w_j x0_j) / t``. Below the split the
plain conditional target (``eps - x0`` for linear) is used.

How this differs from the reference implementation (docs/CONVENTIONS.md §10):

- no per-class Python loop: one gather of every sample's bank row (``(B, K, D)``) and two batched
  matrix products, or a streamed variant over chunks of K with an online softmax;
- no silent zero target: a weight row is a softmax over logits where only invalid entries are
  ``-inf``, and a row with no valid entry raises instead of producing NaN weights that were then
  replaced by zeros (the source itself is always in its bank, so a real batch never hits this);
- strict fp32: TF32 / reduced-precision matmuls and autocast are switched off inside and the
  previous settings restored.

The squared distance is expanded as ``||x_t||^2 - 2 a <x_t, x0_j> + a^2 ||x0_j||^2``; the first
term is the same for every j and cancels in the softmax, so it is never formed: the logits are
``(a <x_t, x0_j> - a^2 ||x0_j||^2 / 2) / s^2``. This drops the largest (and most cancellation-prone)
term and leaves two memory-bound passes over the bank (dot products, weighted sum).
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator

import torch

from runtime import strict_fp32

from .interpolant import interpolate, path_coefficients, sample_time

__all__ = ["MemoryBank", "stable_target", "stable_target_efficient", "build_stablevm_batch",
           "strict_fp32"]

PREFILL_MODES = ("full", "one_per_class")


def _require(cond: torch.Tensor, msg: str) -> None:
    """Raise ValueError when the boolean scalar ``cond`` is False.

    On CPU this is an ordinary check; on an accelerator it is an asynchronous device assertion,
    so a training step is not stalled by a host sync (a failure surfaces at the next sync).
    """
    if cond.device.type == "cpu":
        if not bool(cond):
            raise ValueError(msg)
    else:
        torch._assert_async(cond, msg)


# Default streamed chunk: the (B, chunk, D) fp32 buffer is about this big. On a CPU a chunk that
# stays in cache is faster (measured at B=256, 4x32x32: 4 entries 0.62 s, 32 entries 0.97 s);
# on a GPU larger chunks mean fewer kernel launches.
CHUNK_BYTES = {"cpu": 1 << 24, "default": 1 << 27}


def _chunk_size(chunk_size: int | None, b: int, k: int, d: int, device: torch.device) -> int:
    """``chunk_size`` checked, or by default as many bank entries as fit :data:`CHUNK_BYTES`
    (B=256, D=4096: 4 on CPU, 32 on GPU; small latents: the whole bank in one chunk)."""
    if chunk_size is None:
        budget = CHUNK_BYTES.get(device.type, CHUNK_BYTES["default"])
        return max(1, min(k, budget // max(1, b * d * 4)))
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return int(chunk_size)


# ----------------------------------------------------------------------------------------------
# The stable target.

class _Prepared:
    """Flattened inputs and per-sample coefficients shared by the batched and streamed targets."""

    def __init__(self, x_t: torch.Tensor, t: torch.Tensor | float, mask: torch.Tensor | None,
                 num_entries: int, path_type: str, split: float | None,
                 cfm_target: torch.Tensor | None):
        if x_t.ndim < 2:
            raise ValueError(f"x_t must be (B, ...), got shape {tuple(x_t.shape)}")
        self.shape = x_t.shape
        self.device = x_t.device
        b = x_t.shape[0]
        self.x = x_t.detach().reshape(b, -1).float()
        t = torch.as_tensor(t, device=self.device)
        t = t.float().expand(b) if t.ndim == 0 else t.detach().reshape(-1).float()
        if t.shape[0] != b:
            raise ValueError(f"t has {t.shape[0]} entries but x_t has {b} samples")
        split = 0.0 if split is None else float(split)
        if not 0.0 <= split <= 1.0:
            raise ValueError(f"split must be in [0, 1], got {split}")
        if cfm_target is not None and cfm_target.shape != x_t.shape:
            raise ValueError(f"cfm_target {tuple(cfm_target.shape)} and x_t {tuple(x_t.shape)} "
                             "differ in shape")
        # Samples that get the stable target. s(t) = 0 only at t = 0 (the data end), where the
        # formula is 0/0; such a sample is never "in use" unless split is 0, and then it is refused.
        self.use = t >= split
        if cfm_target is None:
            _require(self.use.all(), f"some t are below split={split}: pass cfm_target (the plain "
                                     "target for those samples) or a lower split")
        self.cfm_target = cfm_target
        # Rows not in use get t = 1 (finite coefficients) and an all-valid mask, so they compute
        # harmless finite numbers that torch.where discards.
        t_safe = torch.where(self.use, t, torch.ones_like(t))
        # Per-sample scalars in float64, then fp32: cos(pi t / 2) near t = 1 is a difference of
        # nearly equal numbers, which fp32 would get wrong by percents.
        a, s, da, ds = path_coefficients(t_safe.double(), path_type)
        _require((s > 0).all(), "t = 0 with split = 0: the stable target is undefined at the data "
                                "end (s(t) = 0); use split > 0")
        self.t_safe = t_safe
        self.linear = path_type == "linear"

        def col(v: torch.Tensor) -> torch.Tensor:
            return v.float().unsqueeze(1)

        self.p = col(a / s.square())                 # weight of <x_t, x0_j> in the logits
        self.q = col(0.5 * a.square() / s.square())  # weight of ||x0_j||^2
        self.c_x = col(ds / s)                       # (s'/s) x_t
        self.c_mu = col(da - ds * a / s)             # (a' - s' a / s) mu
        if mask is None:
            mask = torch.ones(b, num_entries, dtype=torch.bool, device=self.device)
        else:
            mask = mask.to(self.device, torch.bool)
            if mask.shape != (b, num_entries):
                raise ValueError(f"mask must be (B, K) = ({b}, {num_entries}), "
                                 f"got {tuple(mask.shape)}")
        _require((mask.any(dim=1) | ~self.use).all(),
                 "a sample with t >= split has no valid bank entry; its bank must hold at least "
                 "its own source (refusing to return a zero or NaN target)")
        self.mask = mask | ~self.use.unsqueeze(1)

    def logits(self, x0: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, k) logits -||x_t - a x0_j||^2 / (2 s^2) + const(row) for a (B, k, D) fp32 chunk."""
        dots = torch.bmm(x0, self.x.unsqueeze(2)).squeeze(2)
        sq = torch.linalg.vector_norm(x0, dim=2).square()
        logits = self.p * dots - self.q * sq
        return logits.masked_fill(~mask, float("-inf"))

    def finish(self, mu: torch.Tensor) -> torch.Tensor:
        if self.linear:
            target = (self.x - mu) / self.t_safe.unsqueeze(1)
        else:
            target = self.c_x * self.x + self.c_mu * mu
        target = target.reshape(self.shape)
        if self.cfm_target is None:
            return target
        plain = self.cfm_target.detach().to(self.device, torch.float32)
        return torch.where(self.use.reshape(-1, *([1] * (target.ndim - 1))), target, plain)


def _flat_bank(bank: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
    """(B, K, ...) -> (B, K, D) view, checked against x_t (B, ...)."""
    b, d = x_t.shape[0], x_t[0].numel() if x_t.ndim >= 2 else -1
    if bank.ndim < 3 or bank.shape[0] != b or bank.shape[1] < 1 or bank[0, 0].numel() != d:
        raise ValueError(f"bank must be (B, K, ...) with B = {b} and {d} values per entry "
                         f"(like x_t), got shape {tuple(bank.shape)}")
    return bank.detach().reshape(b, bank.shape[1], d)


@torch.no_grad()
def stable_target(x_t: torch.Tensor, t: torch.Tensor | float, bank: torch.Tensor,
                  mask: torch.Tensor | None = None, path_type: str = "linear",
                  split: float | None = 0.5, cfm_target: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """The StableVM target, batched: returns fp32 of ``x_t``'s shape.

    ``bank`` (B, K, ...) holds each sample's reference latents (its label's bank row; any float
    dtype, it is cast to fp32), ``mask`` (B, K) which entries are valid (None: all). For samples
    with ``t >= split`` the target is ``(s'/s) x_t + (a' - s' a/s) sum_j w_j x0_j`` with
    ``w = softmax_j(-||x_t - a x0_j||^2 / (2 s^2))`` over valid entries; the others get
    ``cfm_target`` unchanged (required when some t is below the split; ``split=None`` or 0 means
    the stable target everywhere). Strict fp32, no TF32, no autocast. Raises if a sample that needs
    the stable target has no valid entry.
    """
    x0 = _flat_bank(bank, x_t)
    with strict_fp32(x_t.device.type):
        prep = _Prepared(x_t, t, mask, x0.shape[1], path_type, split, cfm_target)
        x0 = x0.to(prep.device, torch.float32, non_blocking=True)
        w = torch.softmax(prep.logits(x0, prep.mask), dim=1)  # max-subtracted: stable for any scale
        mu = torch.bmm(w.unsqueeze(1), x0).squeeze(1)
        return prep.finish(mu)


def _online_mean(prep: _Prepared, chunks: Iterable[tuple[torch.Tensor, torch.Tensor]]
                 ) -> torch.Tensor:
    """sum_j softmax(logits)_j x0_j streamed over (x0 chunk (B,k,D) fp32, mask chunk (B,k)).

    Online softmax: running max m, running normaliser l = sum exp(logit - m) and running weighted
    sum acc = sum exp(logit - m) x0; both rescaled by exp(m_old - m_new) when the max grows. Only a
    (B, k) block of weights exists at any time.
    """
    b, d = prep.x.shape
    m = torch.full((b,), float("-inf"), device=prep.device)
    norm = torch.zeros(b, device=prep.device)
    acc = torch.zeros(b, d, device=prep.device)
    for x0, mask in chunks:
        logits = prep.logits(x0, mask)
        m_new = torch.maximum(m, logits.amax(dim=1))
        # A row with no valid entry yet keeps m = -inf; shift by 0 there so nothing is -inf - -inf.
        shift = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))
        rescale = torch.exp(m - shift)              # exp(-inf) = 0 while nothing was accumulated
        p = torch.exp(logits - shift.unsqueeze(1))  # masked entries: exp(-inf) = 0
        norm = norm * rescale + p.sum(dim=1)
        acc = acc * rescale.unsqueeze(1) + torch.bmm(p.unsqueeze(1), x0).squeeze(1)
        m = m_new
    return acc / norm.unsqueeze(1)


@torch.no_grad()
def stable_target_efficient(x_t: torch.Tensor, t: torch.Tensor | float, bank: torch.Tensor,
                            mask: torch.Tensor | None = None, path_type: str = "linear",
                            split: float | None = 0.5, cfm_target: torch.Tensor | None = None,
                            chunk_size: int | None = None) -> torch.Tensor:
    """:func:`stable_target` streamed over chunks of ``chunk_size`` bank entries (default: a
    16 MiB fp32 chunk buffer on CPU, 128 MiB on GPU; at B=256 and 4x32x32 latents 4 and 32
    entries).

    Never materialises the (B, K) weight matrix nor an fp32 copy of the whole bank: each chunk is
    cast to fp32 (and moved to x_t's device) on its own, so an fp16 or pinned-CPU ``bank`` costs
    only a (B, chunk_size, D) fp32 buffer. Same result as :func:`stable_target` up to fp32
    rounding. :meth:`MemoryBank.stable_target` streams straight from the bank's storage.
    """
    x0 = _flat_bank(bank, x_t)
    b, k, d = x0.shape
    chunk_size = _chunk_size(chunk_size, b, k, d, x_t.device)
    with strict_fp32(x_t.device.type):
        prep = _Prepared(x_t, t, mask, k, path_type, split, cfm_target)
        chunks = ((x0[:, i:i + chunk_size].to(prep.device, torch.float32, non_blocking=True),
                   prep.mask[:, i:i + chunk_size]) for i in range(0, k, chunk_size))
        return prep.finish(_online_mean(prep, chunks))


# ----------------------------------------------------------------------------------------------
# The memory bank.

class MemoryBank:
    """Per-class FIFO ring buffers of clean latents plus one pool for the null label.

    Storage ``latents`` is ``(C + 1, K, *latent_shape)`` in ``dtype`` (fp16): row c < C holds the
    last K latents pushed with label c, row C (the null label) the last K pushed latents whatever
    their class. ``counts`` (C + 1,) says how many slots of a row are filled (slots 0..count-1:
    a ring fills in order before it wraps) and ``ptr`` (C + 1,) where the next write goes. With
    ``store_indices`` the dataset index of every entry is kept in ``indices`` (C + 1, K) int64
    (-1 where unknown), so the pixels of a drawn source can be re-read (REPA).

    The bank lives on ``device``; a CPU bank is allocated in pinned memory when CUDA is available
    (fast non-blocking copies to the GPU). :meth:`state_dict` holds tensors only, for accelerate
    checkpoints and safetensors. Memory for ImageNet-256 (C=1000, K=256, 4x32x32 fp16): 2.10 GB.
    """

    def __init__(self, num_classes: int, latent_shape: tuple[int, ...] | torch.Size | int,
                 capacity: int = 256, *, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float16, store_indices: bool = True,
                 pin_memory: bool | None = None):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if isinstance(latent_shape, int):
            latent_shape = (latent_shape,)
        self.num_classes = int(num_classes)
        self.capacity = int(capacity)
        self.latent_shape = tuple(int(v) for v in latent_shape)
        device = torch.device(device if device is not None else "cpu")
        if pin_memory is None:
            pin_memory = device.type == "cpu" and torch.cuda.is_available()
        pin = bool(pin_memory) and device.type == "cpu" and torch.cuda.is_available()
        rows = self.num_classes + 1

        def alloc(shape, dt, fill=0):
            return torch.full(shape, fill, dtype=dt, device=device, pin_memory=pin)

        self.latents = alloc((rows, self.capacity) + self.latent_shape, dtype)
        self.counts = alloc((rows,), torch.int64)
        self.ptr = alloc((rows,), torch.int64)
        self.indices = alloc((rows, self.capacity), torch.int64, -1) if store_indices else None

    # -- description ---------------------------------------------------------------------------

    @property
    def null_label(self) -> int:
        return self.num_classes

    @property
    def device(self) -> torch.device:
        return self.latents.device

    @property
    def latent_dim(self) -> int:
        n = 1
        for v in self.latent_shape:
            n *= v
        return n

    def memory_bytes(self) -> int:
        """Bytes held by the bank's tensors (latents, counts, pointers, indices)."""
        tensors = [self.latents, self.counts, self.ptr]
        if self.indices is not None:
            tensors.append(self.indices)
        return sum(t.numel() * t.element_size() for t in tensors)

    def __repr__(self) -> str:
        filled = int((self.counts[:self.num_classes] == self.capacity).sum())
        return (f"MemoryBank(num_classes={self.num_classes}, capacity={self.capacity}, "
                f"latent_shape={self.latent_shape}, dtype={self.latents.dtype}, "
                f"device={self.device}, full_classes={filled}/{self.num_classes}, "
                f"{self.memory_bytes() / 2**20:.1f} MiB)")

    def ready(self, mode: str = "full") -> bool:
        """Whether every class (0..C-1) is full (``full``) or has an entry (``one_per_class``)."""
        if mode not in PREFILL_MODES:
            raise ValueError(f"prefill mode must be one of {PREFILL_MODES}, got {mode!r}")
        need = self.capacity if mode == "full" else 1
        return bool((self.counts[:self.num_classes] >= need).all())

    # -- writing -------------------------------------------------------------------------------

    @torch.no_grad()
    def push(self, latents: torch.Tensor, labels: torch.Tensor,
             indices: torch.Tensor | None = None) -> None:
        """Append a batch: each latent goes to its class row and to the null pool, in batch order.

        Vectorised (no loop over classes): entries are stably sorted by destination row, ranked
        within their row, and written with one indexed copy to ``(ptr + rank) mod K``. When a row
        receives more than K entries in one push only the last K survive (FIFO); the earlier ones
        are redirected to write the survivor's value into the same slot, so the duplicate writes
        are identical and the result is deterministic on every device without a host sync.
        """
        n = labels.shape[0]
        if latents.shape[0] != n or tuple(latents.shape[1:]) != self.latent_shape:
            raise ValueError(f"push expects latents (N, {', '.join(map(str, self.latent_shape))})"
                             f" with N = len(labels) = {n}, got {tuple(latents.shape)}")
        if n == 0:
            return
        dev, k, c = self.device, self.capacity, self.num_classes
        labels = labels.to(dev, torch.int64).reshape(-1)
        _require(((labels >= 0) & (labels < c)).all(),
                 f"push: labels must be class indices in [0, {c}) (the null label {c} is "
                 "filled automatically)")
        rows = torch.cat([labels, torch.full_like(labels, c)])          # class row, then null pool
        src = torch.arange(n, device=dev).repeat(2)                       # which sample
        order = torch.argsort(rows, stable=True)
        rows_s, src_s = rows[order], src[order]
        # First position and number of entries of each row in the sorted order (searchsorted,
        # not bincount/cumsum: deterministic on CUDA under torch.use_deterministic_algorithms).
        all_rows = torch.arange(c + 1, device=dev)
        start = torch.searchsorted(rows_s, all_rows)
        per_row = torch.searchsorted(rows_s, all_rows, right=True) - start
        rank = torch.arange(2 * n, device=dev) - start[rows_s]            # 0.. within its row
        cnt = per_row[rows_s]
        # Entry of rank r lands in slot (ptr + r) mod K; the last writer of that slot has rank
        # r + K * floor((cnt - 1 - r) / K). Every entry writes the last writer's value.
        final = rank + k * torch.div(cnt - 1 - rank, k, rounding_mode="floor")
        src_final = src_s[start[rows_s] + final]
        slot = (self.ptr[rows_s] + rank) % k
        values = latents.detach().to(dev, self.latents.dtype, non_blocking=True)
        self.latents[rows_s, slot] = values[src_final]
        if self.indices is not None:
            if indices is None:
                idx = torch.full((n,), -1, dtype=torch.int64, device=dev)
            else:
                idx = indices.to(dev, torch.int64).reshape(-1)
                if idx.shape[0] != n:
                    raise ValueError(f"push: {idx.shape[0]} indices for {n} latents")
            self.indices[rows_s, slot] = idx[src_final]
        self.ptr.copy_((self.ptr + per_row) % k)
        self.counts.copy_(torch.clamp(self.counts + per_row, max=k))

    @torch.no_grad()
    def prefill(self, batches: Iterable[dict], mode: str = "full", max_batches: int | None = None,
                latents_fn: Callable[[dict], torch.Tensor] | None = None) -> dict:
        """Push batches (dicts with ``x`` latents, ``y`` labels, optional ``index``) until every
        class holds K entries (``full``) or at least one (``one_per_class``).

        Stops with a RuntimeError naming the short classes when the iterator ends, when
        ``max_batches`` batches did not suffice, or when a dataset index comes back (a second
        pass over the data has begun) while some class has still never appeared. In ``full`` mode
        a class with fewer than K samples per pass keeps filling from later passes. ``latents_fn``
        maps a batch to latents (default ``batch['x']``), e.g. to sample raw moments on the device.
        Returns ``{'batches', 'samples'}`` consumed.
        """
        if mode not in PREFILL_MODES:
            raise ValueError(f"prefill mode must be one of {PREFILL_MODES}, got {mode!r}")
        seen: set[int] = set()
        second_pass = False
        n_batches = n_samples = 0
        it = iter(batches)
        while not self.ready(mode):
            if max_batches is not None and n_batches >= max_batches:
                raise RuntimeError(f"StableVM prefill ({mode}): {max_batches} batches were not "
                                   f"enough; {self._shortfall(mode)}")
            try:
                batch = next(it)
            except StopIteration:
                raise RuntimeError(f"StableVM prefill ({mode}): the data ran out after "
                                   f"{n_batches} batches ({n_samples} samples); "
                                   f"{self._shortfall(mode)}") from None
            index = batch.get("index")
            if index is not None and not second_pass:
                ids = index.reshape(-1).tolist()
                if seen.intersection(ids):
                    second_pass = True
                    missing = (self.counts[:self.num_classes] == 0).nonzero().flatten().tolist()
                    if missing:
                        raise RuntimeError(
                            f"StableVM prefill ({mode}): a full pass over the data "
                            f"({len(seen)} samples) never showed class(es) "
                            f"{_short_list(missing)}; every class needs at least one sample")
                    seen.clear()
                else:
                    seen.update(ids)
            x = latents_fn(batch) if latents_fn is not None else batch["x"]
            self.push(x, batch["y"], index)
            n_batches += 1
            n_samples += int(batch["y"].shape[0])
        return {"batches": n_batches, "samples": n_samples}

    def _shortfall(self, mode: str) -> str:
        need = self.capacity if mode == "full" else 1
        counts = self.counts[:self.num_classes].cpu()
        short = (counts < need).nonzero().flatten().tolist()
        detail = ", ".join(f"{c}: {int(counts[c])}" for c in short[:10])
        more = f", ... ({len(short)} classes in all)" if len(short) > 10 else ""
        return f"classes below {need} entries (class: count): {detail}{more}"

    # -- reading -------------------------------------------------------------------------------

    def entries(self, label: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The filled entries of one row, oldest first: ``(latents (n, ...), indices (n,))``."""
        n, p = int(self.counts[label]), int(self.ptr[label])
        order = torch.arange(n, device=self.device)
        if n == self.capacity:
            order = (order + p) % self.capacity
        idx = self.indices[label, order] if self.indices is not None else None
        return self.latents[label, order], idx

    def valid_mask(self, labels: torch.Tensor) -> torch.Tensor:
        """(B, K) bool: which slots of each label's row are filled."""
        labels = labels.to(self.device, torch.int64)
        slots = torch.arange(self.capacity, device=self.device)
        return slots.unsqueeze(0) < self.counts[labels].unsqueeze(1)

    @torch.no_grad()
    def sample_sources(self, labels: torch.Tensor, generator: torch.Generator | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Draw one source per label uniformly from that label's filled entries.

        Returns ``(x0 (B, ...) fp32, slot (B,) position in the row, dataset indices (B,) or
        None)``. The uniform numbers come from ``generator`` (on its device) -- deterministic for a
        seeded generator. Raises if a label's row is empty.
        """
        labels = labels.to(self.device, torch.int64).reshape(-1)
        counts = self.counts[labels]
        _require((counts > 0).all(), "sample_sources: a label's bank row is empty; prefill the "
                                     "bank (at least one entry per class) first")
        gen_device = generator.device if generator is not None else self.device
        u = torch.rand(labels.shape[0], generator=generator, device=gen_device,
                       dtype=torch.float64).to(self.device)
        slot = torch.minimum((u * counts).long(), counts - 1)
        x0 = self.latents[labels, slot].float()
        idx = self.indices[labels, slot] if self.indices is not None else None
        return x0, slot, idx

    @torch.no_grad()
    def gather(self, labels: torch.Tensor, device: torch.device | str | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Every label's whole row: ``(bank (B, K, D) fp32, mask (B, K) bool)`` on ``device``.

        This is the input of :func:`stable_target`. It costs B*K*D*4 bytes (1 GiB at B=K=256,
        D=4096); :meth:`stable_target` streams instead.
        """
        labels = labels.to(self.device, torch.int64).reshape(-1)
        device = torch.device(device) if device is not None else self.device
        bank = self.latents[labels].reshape(labels.shape[0], self.capacity, self.latent_dim)
        bank = bank.to(device, non_blocking=True).float()
        return bank, self.valid_mask(labels).to(device)

    def _chunks(self, labels: torch.Tensor, device: torch.device, chunk_size: int
                ) -> Iterator[tuple[int, torch.Tensor]]:
        """(first slot, (B, k, D) fp32 on ``device``) for consecutive slot ranges of each row."""
        flat = self.latents.view(-1, self.latent_dim)
        b = labels.shape[0]
        for i in range(0, self.capacity, chunk_size):
            j = min(i + chunk_size, self.capacity)
            rows = (labels.unsqueeze(1) * self.capacity
                    + torch.arange(i, j, device=self.device)).reshape(-1)
            x0 = flat.index_select(0, rows).view(b, j - i, self.latent_dim)
            yield i, x0.to(device, non_blocking=True).float()

    @torch.no_grad()
    def stable_target(self, x_t: torch.Tensor, t: torch.Tensor | float, labels: torch.Tensor,
                      path_type: str = "linear", split: float | None = 0.5,
                      cfm_target: torch.Tensor | None = None, chunk_size: int | None = None
                      ) -> torch.Tensor:
        """:func:`stable_target_efficient` reading each label's row straight from storage.

        Peak extra memory is one (B, chunk_size, D) fp32 chunk; never the (B, K, D) gather.
        """
        labels = labels.to(self.device, torch.int64).reshape(-1)
        chunk_size = _chunk_size(chunk_size, labels.shape[0], self.capacity, self.latent_dim,
                                 x_t.device)
        with strict_fp32(x_t.device.type):
            prep = _Prepared(x_t, t, self.valid_mask(labels).to(x_t.device), self.capacity,
                             path_type, split, cfm_target)
            if prep.x.shape[1] != self.latent_dim:
                raise ValueError(f"x_t has {prep.x.shape[1]} values per sample, the bank "
                                 f"{self.latent_dim}")
            chunks = ((x0, prep.mask[:, i:i + x0.shape[1]])
                      for i, x0 in self._chunks(labels, prep.device, chunk_size))
            return prep.finish(_online_mean(prep, chunks))

    # -- checkpointing -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors only (accelerate ``register_for_checkpointing``, safetensors ``save_file``)."""
        sd = {"latents": self.latents, "counts": self.counts, "ptr": self.ptr}
        if self.indices is not None:
            sd["indices"] = self.indices
        return sd

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Copy a :meth:`state_dict` in place (keeps this bank's device and pinning)."""
        want = self.state_dict()
        if set(state_dict) != set(want):
            raise ValueError(f"bank state has keys {sorted(state_dict)}, expected {sorted(want)} "
                             "(a bank built with a different store_indices setting?)")
        for name, dst in want.items():
            src = state_dict[name]
            if tuple(src.shape) != tuple(dst.shape) or src.dtype != dst.dtype:
                raise ValueError(f"bank state '{name}' is {src.dtype}{tuple(src.shape)}, this "
                                 f"bank has {dst.dtype}{tuple(dst.shape)} (num_classes, "
                                 "capacity, latent shape and dtype must match)")
        counts, ptr = state_dict["counts"].cpu(), state_dict["ptr"].cpu()
        k = self.capacity
        if ((counts < 0) | (counts > k) | (ptr < 0) | (ptr >= k)
                | ((counts < k) & (ptr != counts))).any():
            raise ValueError("bank state has inconsistent counts/pointers")
        for name, dst in want.items():
            dst.copy_(state_dict[name])


def _short_list(values: list[int], n: int = 10) -> str:
    head = ", ".join(map(str, values[:n]))
    return head + (f", ... ({len(values)} in all)" if len(values) > n else "")


# ----------------------------------------------------------------------------------------------
# Batch construction.

@torch.no_grad()
def build_stablevm_batch(bank: MemoryBank, num_classes: int, batch_size: int,
                         cfg_prob: float = 0.0, path_type: str = "linear",
                         generator: torch.Generator | None = None,
                         time_sampler: str | Callable[..., torch.Tensor] = "uniform",
                         t: torch.Tensor | float | None = None, split: float = 0.5,
                         efficient: bool = True, chunk_size: int | None = None,
                         device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """One StableVM training batch drawn from the bank (docs/CONVENTIONS.md §5).

    Labels uniform over the ``num_classes`` classes, each replaced by the null label C with
    probability ``cfg_prob``; the source x0 uniform over that label's bank row; eps ~ N(0, I);
    t from ``time_sampler`` (a :func:`~losses.interpolant.sample_time` name, or a callable
    ``(n, generator) -> (n,)``) unless ``t`` is given; ``x_t = a x0 + s eps``; the target is the
    stable target over the label's whole row for ``t >= split`` and ``a' x0 + s' eps`` below.
    Every random number comes from ``generator`` in a fixed order (labels, dropout, sources, eps,
    t), so a seeded generator gives the same batch. Outputs are on ``device`` (default: the
    bank's); ``efficient`` streams the bank in chunks (:meth:`MemoryBank.stable_target`),
    otherwise one (B, K, D) gather and :func:`stable_target`.

    Returns ``{x_t, t, y, target, x0, eps, indices, slot}`` (``indices`` None when the bank keeps
    no dataset indices).
    """
    if num_classes != bank.num_classes:
        raise ValueError(f"num_classes={num_classes} but the bank has {bank.num_classes}")
    if not 0.0 <= cfg_prob <= 1.0:
        raise ValueError(f"cfg_prob must be in [0, 1], got {cfg_prob}")
    device = torch.device(device) if device is not None else bank.device
    gdev = generator.device if generator is not None else device
    y = torch.randint(0, num_classes, (batch_size,), generator=generator, device=gdev)
    drop = torch.rand(batch_size, generator=generator, device=gdev) < cfg_prob
    y = torch.where(drop, torch.full_like(y, bank.null_label), y).to(device)
    x0, slot, indices = bank.sample_sources(y, generator)
    x0 = x0.to(device)
    eps = torch.randn(x0.shape, generator=generator, device=gdev).to(device)
    if t is None:
        if callable(time_sampler):
            t = time_sampler(batch_size, generator)
        else:
            t = sample_time(batch_size, time_sampler, path_type=path_type, generator=generator,
                            device=gdev)
    t = torch.as_tensor(t, dtype=torch.float32).to(device)
    t = t.expand(batch_size).clone() if t.ndim == 0 else t.reshape(-1)
    x_t, cfm = interpolate(x0, eps, t, path_type)
    if efficient:
        target = bank.stable_target(x_t, t, y, path_type, split, cfm, chunk_size=chunk_size)
    else:
        ref, mask = bank.gather(y, device)
        target = stable_target(x_t, t, ref, mask, path_type, split, cfm)
    return {"x_t": x_t, "t": t, "y": y, "target": target, "x0": x0, "eps": eps,
            "indices": indices.to(device) if indices is not None else None,
            "slot": slot.to(device)}

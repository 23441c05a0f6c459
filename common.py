"""Small utilities every script shares: the CLI error type, atomic file writes, seed mixing,
the EMA update and pairwise squared distances. Nothing here imports another module of the
project, so any module may import it.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch


class UsageError(Exception):
    """A problem the user can fix (bad flag, missing file): printed without a traceback, exit 2."""


USAGE_EXIT = 2  # argparse's own status for a bad command line


class WriteFailed(UsageError):
    """A file could not be written (disk full, file-size limit, I/O error). Earlier files are
    intact and the partial temporary file is gone, so the same command continues once there is
    room."""

    def __init__(self, path: str | os.PathLike, needed: int, error: OSError):
        self.path, self.needed, self.error = Path(path), needed, error
        free = free_bytes(Path(path).parent)
        super().__init__(f"cannot write {path}: {error.strerror or error} (it needs about "
                         f"{needed:,} bytes; {free:,} free there); free some space and rerun "
                         "the same command to continue")


PREEMPTED_EXIT = 75  # sysexits' EX_TEMPFAIL: stopped on request at a safe point; rerun to continue
PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # SLURM: the time limit, --signal=B:USR1@T


class Preempted(Exception):
    """The program stopped at a safe point after SIGTERM or SIGUSR1; what it finished is saved and
    the same command continues from there (exit status :data:`PREEMPTED_EXIT`)."""


class Preemption:
    """Records SIGTERM and SIGUSR1 instead of dying, so work stops at the next safe point (an
    optimizer step, a sampled batch, an encoded shard). A context manager: the previous handlers
    are restored on exit. Outside the main thread signals cannot be caught and it does nothing."""

    def __init__(self) -> None:
        self.signal: str | None = None
        self._previous: dict = {}

    def __enter__(self) -> "Preemption":
        if threading.current_thread() is threading.main_thread():
            for sig in PREEMPT_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._record)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _record(self, signum: int, frame) -> None:
        self.signal = self.signal or signal.Signals(signum).name

    @property
    def requested(self) -> bool:
        return self.signal is not None


def free_bytes(directory: str | os.PathLike) -> int:
    """Bytes available to this user on the filesystem of ``directory`` (-1 if unknown)."""
    try:
        st = os.statvfs(directory)
    except OSError:
        return -1
    return st.f_bavail * st.f_frsize


def cli_error(prog: str, error: BaseException | str) -> int:
    """Report a problem the user can fix the way every script of the project does (argparse's
    ``PROG: error: MESSAGE`` on stderr, no traceback) and return the exit status 2. An empty
    message prints nothing: another process of the same node has said it."""
    if str(error):
        print(f"{prog}: error: {error}", file=sys.stderr)
    return USAGE_EXIT


def check_shared_directory(directory: str | os.PathLike, state, flag: str) -> None:
    """Refuse to start a multi-process run whose ``directory`` is not one filesystem for every
    process: files are written once per run (by rank 0, or one per rank), so a node-local
    directory would scatter a run over the nodes. Rank 0 writes a marker with a random token
    there, every process must read it back. ``state`` is accelerate's PartialState (or an
    Accelerator). Raises :class:`UsageError` with one line on each node (the other processes of
    a node raise it empty, see :func:`cli_error`)."""
    if state.num_processes == 1:
        return
    import secrets
    import socket

    from accelerate.utils import broadcast_object_list, gather_object
    directory = Path(directory)
    sent: list = [None, None]  # token, or the reason rank 0 could not write the marker
    if state.is_main_process:
        try:
            directory.mkdir(parents=True, exist_ok=True)
            token = secrets.token_hex(16)
            (directory / f".shared-check-{token}").write_text(token)
            sent[0] = token
        except OSError as e:
            sent[1] = f"cannot write to {flag} {directory}: {e.strerror or e}"
    broadcast_object_list(sent)
    token, failure = sent
    if token is not None:
        marker = directory / f".shared-check-{token}"
        try:
            seen = marker.read_text() == token
        except OSError:
            seen = False
        views = gather_object([(state.process_index, socket.gethostname(), seen)])
        if state.is_main_process:
            marker.unlink(missing_ok=True)
        blind = [f"{rank} (host {host})" for rank, host, ok in views if not ok]
        if blind:
            failure = (f"{flag} {directory} is not one shared filesystem for all processes: "
                       f"rank(s) {', '.join(blind)} cannot see the file rank 0 (host "
                       f"{views[0][1]}) wrote there; give every node the same shared "
                       "directory (NFS, Lustre, GPFS)")
    if failure:
        raise UsageError(failure if state.local_process_index == 0 else "")


# ----------------------------------------------------------------------------------------------
# Atomic writes: a reader, a resumed run or a crash never sees a half-written file.

def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temp name in the same directory, fsync, then rename over ``path``. When the
    write fails (ENOSPC, EFBIG, EIO, ...) the temp file is removed, ``path`` keeps its previous
    content, and :class:`WriteFailed` names the path and the bytes it needed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise WriteFailed(path, len(data), e) from None
    fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """JSON with sorted keys (stable bytes for the same content), written atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


DATA_SHA256 = "data_sha256"  # safetensors metadata key: sha256 of the file's data section


def save_safetensors_atomic(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                            metadata: dict[str, str] | None = None,
                            checksum: bool = False) -> None:
    """safetensors file of ``tensors`` (moved to the CPU), written atomically. With ``checksum``
    the header's metadata carries the sha256 of the data section (the header itself cannot hash
    the bytes it is part of), which :func:`safetensors_checksum_problem` verifies."""
    from safetensors.torch import save
    cpu = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    data = memoryview(save(cpu, metadata=metadata))
    n = int.from_bytes(data[:8], "little")
    header, body = json.loads(bytes(data[8:8 + n])), data[8 + n:]
    if checksum:  # the data section does not depend on the header: hash it once, add the key
        header.setdefault("__metadata__", {})[DATA_SHA256] = hashlib.sha256(body).hexdigest()
    # sorted keys: safetensors writes metadata in hash-map order, which differs between
    # processes, and resumed runs must write the same bytes
    blob = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keep the data section 8-byte aligned, as safetensors does
    atomic_write_bytes(path, b"".join((len(blob).to_bytes(8, "little"), blob, body)))


def safetensors_checksum_problem(path: str | os.PathLike) -> str | None:
    """Why a safetensors file written with ``checksum=True`` is damaged, or None when it is
    intact or carries no checksum (a file from elsewhere)."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n > 100_000_000:
                return f"{path}: damaged header (length {n})"
            header = json.loads(f.read(n))
            want = (header.get("__metadata__") or {}).get(DATA_SHA256)
            if want is None:
                return None
            h = hashlib.sha256()
            while block := f.read(1 << 22):
                h.update(block)
    except (OSError, ValueError, AttributeError) as e:
        return f"{path}: unreadable ({e})"
    if h.hexdigest() != want:
        return f"{path}: the tensor data does not match its checksum (the file is damaged)"
    return None


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# Seeds.

def mix_seed(*values: int, bits: int = 63) -> int:
    """A ``bits``-bit seed from several integers.

    numpy's SeedSequence hashes the 32-bit words of ``values``, so nearby inputs (seed 0 and 1,
    step 7 and 8) give unrelated generators. 63 bits fit ``torch.Generator.manual_seed``'s signed
    range; 64 bits are the full state word (per-sample generation seeds).
    """
    if not 1 <= bits <= 64:
        raise ValueError(f"bits must be in 1..64, got {bits}")
    words = [int(v) & 0xFFFFFFFF for v in values]
    state = np.random.SeedSequence(words).generate_state(1, np.uint64)[0]
    return int(state >> np.uint64(64 - bits))


# ----------------------------------------------------------------------------------------------
# Exponential moving average of weights.

def ema_decay(step: int, decay: float, warmup: bool) -> float:
    """Decay after ``step`` optimizer steps (1-based); with ``warmup`` min(decay, (1+n)/(10+n))."""
    return min(decay, (1 + step) / (10 + step)) if warmup else decay


@torch.no_grad()
def ema_update(ema_params: Sequence[torch.Tensor], params: Sequence[torch.Tensor],
               decay: float) -> None:
    """ema = decay * ema + (1 - decay) * param, one fused kernel per dtype/device group."""
    torch._foreach_lerp_(list(ema_params), list(params), 1.0 - decay)


# ----------------------------------------------------------------------------------------------
# Distances (the dispersive loss, the k-NN manifolds of precision/recall, the digits copies).

def pairwise_sq_dists(a: torch.Tensor, b: torch.Tensor, b_sq: torch.Tensor | None = None,
                      exact: bool = False) -> torch.Tensor:
    """(len(a), len(b)) squared Euclidean distances between the rows of ``a`` and of ``b``.

    Default: ``|a|^2 + |b|^2 - 2 a b^T`` (one matmul, differentiable), clamped at 0; ``b_sq`` is
    ``|b|^2`` when the caller reuses ``b`` over row blocks. The cancellation error grows with the
    norms, so callers shift the rows towards their mean first, and identical rows need not come
    out exactly 0.

    ``exact=True``: from the differences, summed one feature at a time in column order (as a
    scalar loop, scipy's ``cdist``, sums them). Identical rows are exactly 0 apart, d(a, b) and
    d(b, a) are the same bits, and nothing depends on BLAS blocking or the thread count; costs a
    (len(a), len(b)) pass per feature, so it is for small sets. ``b_sq`` is not used.
    """
    if exact:
        out = a.new_zeros((a.shape[0], b.shape[0]))
        for j in range(a.shape[1]):
            d = a[:, j, None] - b[None, :, j]
            out += d * d
        return out
    if b_sq is None:
        b_sq = b.square().sum(1)
    return (a.square().sum(1, keepdim=True) + b_sq[None] - 2 * (a @ b.T)).clamp_min_(0)


def with_default_command(argv: Sequence[str], commands: Sequence[str], default: str) -> list[str]:
    """``argv`` with ``default`` put in front unless it starts with a subcommand or -h, so CLIs
    with argparse subcommands keep accepting their original command-less form."""
    argv = list(argv)
    if argv[:1] and argv[0] in (*commands, "-h", "--help"):
        return argv
    return [default, *argv]

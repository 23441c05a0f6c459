"""Runtime switches, applied in one place and logged: TF32, autocast dtype, SDPA backend, fused
AdamW, compile. Nothing here runs at import time; a script calls :func:`configure` (training)
or :func:`configure_reproducible` (encoding) once.

torch >= 2.9 has two APIs for the TF32 switches (legacy ``allow_tf32`` /
``set_float32_matmul_precision`` and the per-backend ``fp32_precision``) and refuses to *read* one
after the other was used to *set* them, so :func:`strict_fp32` saves and restores through whichever
API the caller's current state can be read with.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

PRECISIONS = ("no", "fp16", "bf16")


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a ``--mixed-precision`` value (None: plain fp32)."""
    if precision not in PRECISIONS:
        raise ValueError(f"mixed precision must be one of {PRECISIONS}, got {precision!r}")
    return {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast context for ``precision`` on ``device`` (a no-op context for ``no``).

    Applied by the scripts rather than by accelerate so fp16 behaves the same on CPU (tests) and
    GPU: accelerate silently trains fp32 without a GradScaler when asked for fp16 on CPU.
    """
    dtype = autocast_dtype(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def configure(device: torch.device, allow_tf32: bool = True, precision: str = "no",
              compile: bool = False) -> dict:
    """Set the process-wide numerics switches once and return a description for the run log."""
    autocast_dtype(precision)  # validate
    _set_tf32(device, allow_tf32)
    sdpa = "flash/mem-efficient/math (torch picks)" if device.type == "cuda" else "math/cpu-flash"
    return {"device": str(device), "tf32": bool(allow_tf32) and device.type == "cuda",
            "autocast": precision, "grad_scaler": precision == "fp16", "sdpa": sdpa,
            "compile": bool(compile), "fused_adamw": fused_adamw_available(device),
            "torch": torch.__version__, "threads": torch.get_num_threads()}


def configure_reproducible(device: torch.device, cpu_threads: int) -> None:
    """Set the switches for bit-reproducible output whatever the number of processes (used by
    preprocessing/encode.py): no TF32, no autotuned or nondeterministic cuDNN kernels, and on the
    CPU a fixed thread count, since CPU kernels round differently with different thread counts."""
    _set_tf32(device, False)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    if device.type == "cpu":
        torch.set_num_threads(cpu_threads)


def _set_tf32(device: torch.device, allow_tf32: bool) -> None:
    """The one place that writes the TF32 switches (cuBLAS matmuls and cuDNN convolutions)."""
    if device.type == "cuda":
        # Legacy API on purpose: it is what accelerate, timm and most user code read.
        torch.backends.cuda.matmul.allow_tf32 = bool(allow_tf32)
        torch.backends.cudnn.allow_tf32 = bool(allow_tf32)


def fused_adamw_available(device: torch.device) -> bool:
    """Whether ``torch.optim.AdamW(fused=True)`` supports ``device`` in this torch build."""
    try:
        p = torch.nn.Parameter(torch.zeros(1, device=device))
        torch.optim.AdamW([p], fused=True)
        return True
    except (RuntimeError, ValueError):
        return False


@contextlib.contextmanager
def strict_fp32(device_type: str = "cpu", convs: bool = False) -> Iterator[None]:
    """Run the body with IEEE fp32 matmuls (no TF32 on cuBLAS, no TF32/bf16 on oneDNN), cuDNN
    convolutions too when ``convs``, and no autocast; restore the previous settings afterwards,
    even on error. Nothing is written when the state is already strict.

    These are process-wide flags: another thread's matmuls during the body also run in IEEE fp32.
    """
    b = torch.backends
    saved_legacy: tuple[str, bool] | None = None
    saved_new: tuple[str, str] | None = None
    saved_conv = None
    try:
        legacy = (torch.get_float32_matmul_precision(), b.cuda.matmul.allow_tf32)
    except RuntimeError:  # the caller used the new API: stay with it
        saved_new = (b.cuda.matmul.fp32_precision, b.mkldnn.matmul.fp32_precision)
        b.cuda.matmul.fp32_precision = "ieee"
        b.mkldnn.matmul.fp32_precision = "ieee"
    else:
        if legacy != ("highest", False):
            saved_legacy = legacy
            torch.set_float32_matmul_precision("highest")  # also turns cuBLAS TF32 off
    if convs and device_type == "cuda":
        try:
            saved_conv = ("new", b.cudnn.conv.fp32_precision)
            b.cudnn.conv.fp32_precision = "ieee"
        except (AttributeError, RuntimeError):
            saved_conv = ("legacy", b.cudnn.allow_tf32)
            b.cudnn.allow_tf32 = False
    try:
        with torch.autocast(device_type=device_type, enabled=False):
            yield
    finally:
        if saved_legacy is not None:
            torch.set_float32_matmul_precision(saved_legacy[0])
            if b.cuda.matmul.allow_tf32 != saved_legacy[1]:
                b.cuda.matmul.allow_tf32 = saved_legacy[1]
        if saved_new is not None:
            b.cuda.matmul.fp32_precision = saved_new[0]
            b.mkldnn.matmul.fp32_precision = saved_new[1]
        if saved_conv is not None:
            if saved_conv[0] == "new":
                b.cudnn.conv.fp32_precision = saved_conv[1]
            else:
                b.cudnn.allow_tf32 = saved_conv[1]


def peak_flops(device: torch.device, precision: str, allow_tf32: bool) -> float | None:
    """Dense peak FLOP/s of the device for MFU estimates (None when unknown, e.g. on CPU).

    Datasheet numbers without sparsity: H100/H200 SXM 989.4 TFLOP/s bf16/fp16, 494.7 TF32, 67 fp32;
    A100 312 / 156 / 19.5.
    """
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    table = {"H100": (989.4e12, 494.7e12, 67e12), "H200": (989.4e12, 494.7e12, 67e12),
             "A100": (312e12, 156e12, 19.5e12)}
    for key, (half, tf32, fp32) in table.items():
        if key in name:
            if precision in ("fp16", "bf16"):
                return half
            return tf32 if allow_tf32 else fp32
    return None

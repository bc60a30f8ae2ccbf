"""Which backends exist on this machine, and what ``backend="auto"`` resolves to."""

from __future__ import annotations

import importlib
import os
import warnings

import torch

BACKENDS = ("auto", "torch", "triton", "cuda")
# Ops with a compiled CUDA implementation in csrc/ (backend="cuda"); the others use Triton on GPU.
CUDA_OPS = ("valid_attention", "influence", "greedy_order")

# What backend="auto" tries on CUDA tensors, in order; the first available wins, torch if none is.
# - greedy_order: Triton first — measured faster on an H200 at R >= 1024 (B = 256: 3.04 vs 3.45 ms at R = 1024,
#   10.8 vs 11.5 ms at R = 2048; CUDA only at R = 256, 0.57 vs 0.64 ms; bench/RESULTS.md), and the CUDA kernel's
#   rewrite without spills (csrc/greedy_order.cu) has not run on a GPU yet. CUDA where Triton is missing.
# - valid_attention / influence: Triton until GPU benchmarks (bench/bench_attention.py) show the CUDA kernels
#   (csrc/attention_stats.cu) faster. The CUDA kernels also cover only float16/bfloat16 with head dims 64/128,
#   so putting "cuda" in front would need a dtype/head-dim-aware fallback here (resolve sees no tensors).
# - response_attention: no CUDA implementation (its Abar_RR kernel exists in Triton only).
AUTO_PREFERENCE = {
    "valid_attention": ("triton",),
    "influence": ("triton",),
    "response_attention": ("triton",),
    "greedy_order": ("triton", "cuda"),
}

_deterministic = os.environ.get("AGDO_KERNELS_DETERMINISTIC", "1") not in ("", "0")


def set_deterministic(enabled: bool) -> None:
    """Pinned launch configs (default) or autotuning for fp16/bf16.

    The autotuner times every candidate tile and keeps the fastest, which can differ between runs, machines
    and ranks — and the tile decides the summation order, so near-ties in S or I (and the greedy order built
    on them) can flip. Pinned mode launches one fixed config per (kernel, dtype, head dim), the same on every
    process, so two runs or two ranks compute bitwise-identical statistics. The trainers keep the default;
    benchmarks may switch autotuning on. Environment default: ``AGDO_KERNELS_DETERMINISTIC=1``.
    """
    global _deterministic
    _deterministic = bool(enabled)


def deterministic() -> bool:
    """Whether the Triton kernels launch pinned configs (see ``set_deterministic``)."""
    return _deterministic


_warp_specialize = os.environ.get("AGDO_KERNELS_WARP_SPECIALIZE", "0") not in ("", "0")


def set_warp_specialize(enabled: bool) -> None:
    """Hopper warp specialisation for ``influence`` (off by default): on sm_90+ with fp16/bf16 inputs whose
    rows TMA can read, the Triton kernel loads Q and K through TMA descriptors and splits its query loop into
    producer and consumer warps (4 warps become 12), so the tensor-core product overlaps the exponentials.
    Compiled with Triton 3.6 and 3.9 (bench/RESULTS.md) and exact against the float64 oracle on the
    interpreter, but not yet timed or run on a GPU: off until ``bench/bench_attention.py`` shows it faster.
    Environment default: ``AGDO_KERNELS_WARP_SPECIALIZE=0``."""
    global _warp_specialize
    _warp_specialize = bool(enabled)


def warp_specialize() -> bool:
    """Whether ``influence`` may run its warp-specialised Hopper variant (see ``set_warp_specialize``)."""
    return _warp_specialize


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _triton_unavailable_reason(device: torch.device):
    try:
        importlib.import_module("triton")
    except ImportError as err:  # pragma: no cover - triton ships with CUDA torch
        return f"triton is not installed ({err})"
    if device.type == "cuda" or triton_interpreted():
        return None
    return f"tensors are on {device}; Triton runs on CUDA devices, or on CPU only with TRITON_INTERPRET=1"


def triton_tile_refusal(dtype: torch.dtype, head_dim: int) -> str | None:
    """Why the compiled Triton kernels refuse ``dtype`` at ``head_dim``, or None.

    float32 above head dim 128: its tf32x3 dots hold three times the operands, and every tile of every kernel
    spills registers inside its hot loop on sm_90 (0.3-25 KB per thread, ``bench/compile_report.py``), while
    ``influence``'s smallest pinned tile would need 320 KiB of shared memory (an H100 block has 227 KiB) and
    fail to launch. The interpreter (CPU) is not compiled, so it takes every supported shape."""
    if dtype == torch.float32 and head_dim > 128 and not triton_interpreted():
        return (f"float32 attention inputs at head dim {head_dim} (> 128) compile to Triton code that spills "
                "registers in its hot loop; pass bfloat16/float16 inputs, or use backend='torch' (chunked, exact)")
    return None


def _cuda_unavailable_reason(device: torch.device, op: str):
    if op not in CUDA_OPS:
        return f"`{op}` has no CUDA-extension implementation (only {list(CUDA_OPS)}); use 'triton'"
    if device.type != "cuda":
        return f"tensors are on {device}; the CUDA extension runs on CUDA devices only"
    from . import _cuda

    return _cuda.unavailable_reason()


def resolve(backend: str, device: torch.device, op: str, q: torch.Tensor | None = None) -> str:
    """Return the concrete backend for ``op`` on ``device``, or raise naming why it cannot run.

    ``q``: the attention call's queries, whose dtype and head dim Triton may refuse (``triton_tile_refusal``);
    ``"auto"`` then runs the torch backend and says so in a warning."""
    if backend not in BACKENDS:
        raise ValueError(f"`backend` must be one of {list(BACKENDS)}, got {backend!r}")
    refusal = None if q is None else triton_tile_refusal(q.dtype, q.shape[-1])
    if backend == "auto":
        if device.type != "cuda":
            return "torch"
        for candidate in AUTO_PREFERENCE.get(op, ("triton",)):
            if candidate == "cuda":
                reason = _cuda_unavailable_reason(device, op)
            else:
                reason = _triton_unavailable_reason(device) or refusal
            if reason is None:
                return candidate
        if refusal is not None:
            warnings.warn(f'`{op}` with backend="auto" runs the torch backend: {refusal}', stacklevel=3)
        return "torch"
    if backend == "triton":
        reason = _triton_unavailable_reason(device) or refusal
    elif backend == "cuda":
        reason = _cuda_unavailable_reason(device, op)
    else:
        reason = None
    if reason is not None:
        raise ValueError(f"`backend={backend!r}` is not available for `{op}`: {reason}")
    return backend


def module(backend: str):
    """The implementation module of a concrete backend (imported lazily: triton is heavy)."""
    if backend == "torch":
        return importlib.import_module("agdo_kernels.reference")
    if backend == "triton":
        return importlib.import_module("agdo_kernels.triton")
    return importlib.import_module("agdo_kernels._cuda")

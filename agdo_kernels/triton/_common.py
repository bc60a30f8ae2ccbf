"""Pieces shared by the Triton attention kernels: launcher checks, tuning configs and tile helpers.

Conventions of the kernels: logits are kept in base-2 units (``qk_scale = scale * log2(e)``, so
``exp(scale * q.k - lse) == exp2(q.k * qk_scale - lse * log2(e))``), dot products accumulate in fp32,
and every program index is widened to int64 before it multiplies a stride (B*H*N*d can pass 2^31).
"""

from __future__ import annotations

import functools
import math
from contextlib import contextmanager, nullcontext

import torch
import triton
import triton.language as tl

from .._backends import deterministic, triton_interpreted, triton_tile_refusal

LOG2E = math.log2(math.e)
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128, 256)
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_supported(q: torch.Tensor, v: torch.Tensor | None = None) -> None:
    """Raise for what the kernels cannot tile: head dims that are not 16..256 powers of two, float64, and
    compiled float32 above head dim 128 (``triton_tile_refusal``)."""
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"the Triton backend takes float32/float16/bfloat16 attention inputs; `q` has dtype {q.dtype}. "
            'Use backend="torch" for float64.'
        )
    for name, t in (("q", q), ("v", v)):
        if t is not None and t.shape[-1] not in SUPPORTED_HEAD_DIMS:
            raise ValueError(
                f"the Triton backend supports head dims {list(SUPPORTED_HEAD_DIMS)}; `{name}` has head dim "
                f'{t.shape[-1]}. Use backend="torch" for other head dims.'
            )
    refusal = triton_tile_refusal(q.dtype, max(q.shape[-1], 0 if v is None else v.shape[-1]))
    if refusal is not None:
        raise ValueError(f"`q`: {refusal}")


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs: "tf32x3" — three TF32 tensor-core products per dot (hi*hi + hi*lo + lo*hi), close to
    fp32 accuracy (the fp32 path is compared with float64 oracles). Exact fp32 ("ieee") compiles to FMA
    loops that spilled 16-130 KB per thread on sm_90 (bench/compile_report.py); tf32x3 spills at most
    ~1 KB and never in the hot loop with the pinned fp32 tiles. fp16/bf16 run plain tensor-core dots."""
    return "tf32x3" if dtype == torch.float32 else "tf32"


# Multiply-adds fused into FMAs (Triton's default, named so a change of default cannot silently change the
# kernels' rounding): one rounding per multiply-add, as in the CUDA kernels.
FP_FUSION = True

# Interpreter runs (CPU tests) use one small tile: fast, and the autotuner never benchmarks.
_INTERPRETER_CONFIG = (16, 16, 4, 1)
def tuning_configs(gpu_configs):
    """Autotuning candidates ``(BLOCK_M, BLOCK_N, num_warps, num_stages)``; one small tile under the interpreter."""
    configs = [_INTERPRETER_CONFIG] if triton_interpreted() else gpu_configs
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in configs]


def pinned_config(gpu_configs, dtype: torch.dtype, head_dim: int, arch: int = 90,
                  sm80_fp32_config=None) -> tuple:  # fmt: skip
    """The config pinned for a launch: the list's first (preferred) tile for fp16/bf16 up to head dim 128,
    the smallest tile for fp32 and head dim 256, the interpreter's tile under the interpreter. fp32's tf32x3
    dots hold three times the operands, where big tiles spill registers; before sm_90 (``arch`` 80, 86, 89:
    no wgmma, the operands live in registers) fp32 takes the kernel's ``sm80_fp32_config`` where it has one."""
    if triton_interpreted():
        return _INTERPRETER_CONFIG
    if dtype == torch.float32 and arch < 90 and sm80_fp32_config is not None:
        return sm80_fp32_config
    if dtype == torch.float32 or head_dim > 128:
        return min(gpu_configs, key=lambda c: (c[0] * c[1], c[3]))
    return gpu_configs[0]


def device_guard(device: torch.device):
    """Launch context for tensors on ``device``: that CUDA device current (whatever the caller's is); nothing
    on CPU (the interpreter)."""
    return torch.cuda.device(device) if device.type == "cuda" else nullcontext()


@contextmanager
def descriptor_scratch(device: torch.device):
    """Launch context for kernels that build TMA descriptors on the device: Triton asks an allocator for their
    global scratch, and has none unless the user set one; a torch allocation on ``device`` serves the launch,
    and the user's choice (even none) is restored after it."""
    from triton.runtime import _allocation

    if not isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        yield
        return
    token = _allocation._allocator.set(
        lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device=device)
    )
    try:
        yield
    finally:
        _allocation._allocator.reset(token)


def cuda_arch(device: torch.device) -> int:
    """``90`` for an H100, ``80`` for an A100; 90 off CUDA (the launch is not compiled for a GPU there)."""
    if device.type != "cuda":
        return 90
    return _compute_capability(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _compute_capability(index: int) -> int:
    # Cached: launchers ask on every call, and torch's query costs microseconds of host time.
    major, minor = torch.cuda.get_device_capability(index)
    return 10 * major + minor


def launch(kernel, grid, *args, gpu_configs, dtype: torch.dtype, head_dim: int, device: torch.device,
           sm80_fp32_config=None, **constexprs):  # fmt: skip
    """Launch an autotuned kernel on ``device`` (whatever the current CUDA device is), pinned or autotuned.

    fp32 and head dim 256 are always pinned to the smallest tile (fp32 before sm_90: ``sm80_fp32_config``
    where given); fp16/bf16 up to head dim 128 autotune only after ``agdo_kernels.set_deterministic(False)``.
    """
    with device_guard(device):
        if deterministic() or dtype == torch.float32 or head_dim > 128 or triton_interpreted():
            arch = cuda_arch(device) if dtype == torch.float32 else 90  # only fp32's tile depends on it
            m, n, w, s = pinned_config(gpu_configs, dtype, head_dim, arch, sm80_fp32_config)
            kernel.fn[grid](*args, **constexprs, BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s,
                            enable_fp_fusion=FP_FUSION)
        else:
            kernel[grid](*args, **constexprs, enable_fp_fusion=FP_FUSION)


# Host-side integer helpers. triton.cdiv / triton.next_power_of_2 are constexpr-function wrappers that cost
# ~3 us per call from Python (they unwrap constexpr arguments); a launcher calls them several times per call.
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two ``>= n`` (1 for ``n <= 1``)."""
    return 1 << (n - 1).bit_length() if n > 1 else 1


def tuning_bucket(n: int) -> int:
    """Autotuning key for a sequence length: the next power of two, so a new ``N`` retunes rarely."""
    return next_power_of_2(n)


def as_bytes(mask: torch.Tensor | None) -> torch.Tensor | None:
    """A bool ``(B, N)`` mask as contiguous uint8, the form the kernels load (row ``b`` at ``b * N``): a view of
    the same bytes, no copy launched (the public calls hand the backends bool masks)."""
    return None if mask is None else mask.contiguous().view(torch.uint8)


def lse_log2(lse: torch.Tensor) -> torch.Tensor:
    """Natural-log ``lse (B, H, N)`` as contiguous float32 in base-2 units."""
    return (lse.to(torch.float32) * LOG2E).contiguous()


@triton.jit
def load_tile(base, rows, n_rows, stride_row, cols, stride_col, CHECK_ROWS: tl.constexpr):
    """``base[rows, cols]``; rows at or past ``n_rows`` read as 0 when ``CHECK_ROWS``."""
    ptrs = base + rows[:, None] * stride_row + cols[None, :] * stride_col
    if CHECK_ROWS:
        tile = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
    else:
        tile = tl.load(ptrs)
    return tile


@triton.jit
def real_keys(mask_row, offs, n, HAS_MASK: tl.constexpr):
    """True where position ``offs`` exists (``< n``) and, with a mask, is not padding."""
    inside = offs < n
    if HAS_MASK:
        inside = tl.load(mask_row + offs, mask=inside, other=0) != 0
    return inside

"""The CUDA-extension backend: loads ``agdo_kernels._agdo_cuda`` (compiled from ``csrc/`` by setup.py).

The extension takes raw device pointers and the stream as integers (it has no torch dependency), so
this module prepares the inputs on the right device first. Inputs arrive validated.

- ``greedy_order``: contiguous float32 copies.
- ``valid_attention`` / ``influence_sum`` (csrc/attention_stats.cu, tensor cores): float16/bfloat16 inputs with
  head dim 64 or 128 (anything else raises a ``ValueError`` pointing to ``backend='triton'``). ``q``/``k``/``v``
  are read in place through their ``(B, H, N)`` strides — e.g. the ``(B, N, H, d).transpose(1, 2)`` views
  transformers hands over — when ``d`` has unit stride, the other strides are multiples of 8 elements and the
  data is 16-byte aligned (the kernels copy 16-byte chunks); other layouts are copied to contiguous first.
  Masks go over as bytes; the extension builds what the kernels read from them itself (a call is two launches):
  ``valid_attention`` visits each row's keys in a key order, the real keys of ``U`` first, then the other real
  keys, never the padded ones, so ``S`` costs an add per key tile. O and lse are sums in that order: the same
  q, k, v under another ``U`` may round differently in the last bits (deterministically; S is exact either way).
  Each program writes its head's row to a ``(B, H, ·)`` float32 buffer and the head average is one torch mean
  afterwards (deterministic, no atomics).

Without a GPU, tests/test_cuda_emulated.py runs these functions on CPU tensors: it swaps ``_extension`` for the
same sources compiled against a CPU emulator (tests/cuda_emulator) and ``_launch_target`` for a host "stream".
"""

from __future__ import annotations

import functools
import math

import torch

from ._checks import empty_valid_attention
from .reference.ordering import dense_steps, greedy_window

try:
    from . import _agdo_cuda as _extension

    _IMPORT_ERROR = None
except ImportError as err:  # not built (no nvcc at install time), or built for another Python
    _extension = None
    _IMPORT_ERROR = err


@functools.lru_cache(maxsize=None)
def unavailable_reason():
    """``None`` when the extension can run here, else why it cannot."""
    if _extension is None:
        return (
            f"the compiled module agdo_kernels._agdo_cuda is missing ({_IMPORT_ERROR}); reinstall with nvcc "
            "on PATH (AGDO_BUILD_CUDA=1 makes the install fail instead of skipping it)"
        )
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    problem = _extension.runtime_problem()
    if problem:
        return f"the extension's CUDA runtime (version {_extension.CUDART_VERSION}) cannot use the GPU: {problem}"
    oldest = min(torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count()))
    if oldest < (8, 0):
        return f"the extension is built for compute capability 8.0 and newer; a visible GPU has {oldest}"
    return None


def _launch_target(device):
    """``(device guard, device index, stream)`` of a launch on ``device``: the current stream of that device."""
    return torch.cuda.device(device), device.index, torch.cuda.current_stream(device).cuda_stream


def greedy_order(abar_rr, s0, valid, step_size, block_size, block_mode):
    B, R = s0.shape
    if R > _extension.GREEDY_MAX_LENGTH:
        raise ValueError(
            f"`abar_rr` has R={R} positions; the CUDA backend keeps a row in registers and takes "
            f"R <= {_extension.GREEDY_MAX_LENGTH}. Use backend='triton' or 'torch'."
        )
    rank = torch.empty((B, R), dtype=torch.int32, device=s0.device)
    if B > 0 and R > 0:
        guard, device_index, stream = _launch_target(s0.device)
        with guard:
            columns = abar_rr.to(torch.float32).transpose(1, 2).contiguous()  # a picked column is contiguous
            scores = s0.to(torch.float32).contiguous()
            valid_bytes = valid.contiguous().view(torch.uint8)
            _extension.greedy_rank(
                columns.data_ptr(),
                scores.data_ptr(),
                valid_bytes.data_ptr(),
                rank.data_ptr(),
                B,
                R,
                step_size,
                greedy_window(R, block_size, block_mode),
                device_index,
                stream,
            )
    return dense_steps(rank, block_size)


# --- attention statistics (csrc/attention_stats.cu) ---------------------------------------------------------

_ATTENTION_HEAD_DIMS = (64, 128)
_LOG2E = math.log2(math.e)


def _attention_dtype_code(dtype):
    if dtype == torch.float16:
        return _extension.ATTENTION_FLOAT16
    return _extension.ATTENTION_BFLOAT16


def check_attention_supported(op, q, v=None):
    """Raise a ``ValueError`` for what the CUDA attention kernels do not cover (dtype, head dim)."""
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(
            f"backend='cuda' `{op}` runs float16/bfloat16 inputs on tensor cores; `q` has dtype {q.dtype}. "
            "Use backend='triton' (or 'torch') for it."
        )
    if q.shape[-1] not in _ATTENTION_HEAD_DIMS:
        raise ValueError(
            f"backend='cuda' `{op}` supports head dims {list(_ATTENTION_HEAD_DIMS)}; `q` has head dim "
            f"{q.shape[-1]}. Use backend='triton' (or 'torch') for it."
        )
    if v is not None and v.shape[-1] != q.shape[-1]:
        raise ValueError(
            f"backend='cuda' `{op}` needs `v` with the head dim of `q` ({q.shape[-1]}); `v` has head dim "
            f"{v.shape[-1]}. Use backend='triton' for it."
        )


def _kernel_layout(t):
    """``t`` itself when the kernels can read it in place, else a contiguous copy; with its (b, h, n) strides."""
    strides = tuple(s if n > 1 else 0 for s, n in zip(t.stride()[:3], t.shape[:3]))
    if t.stride(-1) != 1 or any(s % 8 for s in strides) or t.data_ptr() % 16:
        t = t.clone(memory_format=torch.contiguous_format)  # a fresh allocation: also fixes a misaligned start
        strides = tuple(s if n > 1 else 0 for s, n in zip(t.stride()[:3], t.shape[:3]))
    return t, strides


def _padded(n):
    tile = _extension.ATTENTION_TILE
    return max(tile, (n + tile - 1) // tile * tile)


def _mask_bytes(mask):
    """A bool ``(B, N)`` mask as contiguous bytes for the kernels (``None`` stays ``None``)."""
    return None if mask is None else mask.contiguous().view(torch.uint8)


def _address(t):
    return 0 if t is None else t.data_ptr()


def valid_attention(q, k, v, unmasked, attention_mask, scale, return_output, return_lse):
    """CUDA twin of ``reference.attention.valid_attention``: ``(s, out, lse)`` from one pass."""
    check_attention_supported("valid_attention", q, v if return_output else None)
    B, H, Nq, d = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    device = q.device
    if B * H * Nq == 0:
        return empty_valid_attention(q, d, return_output, return_lse)
    guard, device_index, stream = _launch_target(device)
    with guard:
        q_in, q_stride = _kernel_layout(q)
        k_in, k_stride = _kernel_layout(k)
        v_in, v_stride = _kernel_layout(v) if return_output else (None, (0, 0, 0))
        masks = _mask_bytes(attention_mask), _mask_bytes(unmasked)
        # The kernels write every element of these (each row once; the key order first, from the masks).
        key_order = torch.empty(B, _padded(N), dtype=torch.int32, device=device)
        key_counts = torch.empty(B, 2, dtype=torch.int32, device=device)
        s_part = torch.empty(B, H, Nq, dtype=torch.float32, device=device)
        out = torch.empty(B, H, Nq, d, dtype=q.dtype, device=device) if return_output else None
        lse = torch.empty(B, H, Nq, dtype=torch.float32, device=device) if return_lse else None
        _extension.valid_attention(
            q_in.data_ptr(), k_in.data_ptr(), _address(v_in), q_stride, k_stride, v_stride, *map(_address, masks),
            key_order.data_ptr(), key_counts.data_ptr(), s_part.data_ptr(), _address(out), _address(lse), B, H, Hkv,
            Nq, N, key_order.shape[1], d, _attention_dtype_code(q.dtype), float(scale) * _LOG2E, device_index, stream,
        )  # fmt: skip
    s = s_part.mean(1)
    return s, out, lse


def influence_sum(q, k, lse, attention_mask, query_mask, scale):
    """CUDA twin of ``reference.attention.influence_sum``: float32 ``(B, N)``, not normalised."""
    check_attention_supported("influence", q)
    B, H, N, d = q.shape
    Hkv = k.shape[1]
    device = q.device
    if B * H * N == 0:
        return torch.zeros(B, N, dtype=torch.float32, device=device)
    guard, device_index, stream = _launch_target(device)
    with guard:
        q_in, q_stride = _kernel_layout(q)
        k_in, k_stride = _kernel_layout(k)
        masks = _mask_bytes(attention_mask), _mask_bytes(query_mask)
        lse_rows = lse.to(torch.float32).contiguous()
        # Written by the extension: the rows' base-2 lse (+inf where a row does not count) and the extent of the
        # counted rows and real keys (the tiles outside are skipped), then every element.
        lse2 = torch.empty(B, H, _padded(N), dtype=torch.float32, device=device)
        extent = torch.empty(B, 4, dtype=torch.int32, device=device)
        part = torch.empty(B, H, N, dtype=torch.float32, device=device)
        _extension.influence_sum(
            q_in.data_ptr(), k_in.data_ptr(), q_stride, k_stride, lse_rows.data_ptr(), *map(_address, masks),
            lse2.data_ptr(), extent.data_ptr(), part.data_ptr(), B, H, Hkv, N, lse2.shape[2], d,
            _attention_dtype_code(q.dtype), float(scale) * _LOG2E, device_index, stream,
        )  # fmt: skip
    return part.mean(1)

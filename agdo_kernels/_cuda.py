"""The CUDA-extension backend: loads ``agdo_kernels._agdo_cuda`` (compiled from ``csrc/`` by setup.py).

The extension takes raw device pointers and the stream as integers (it has no torch dependency), so
this module makes the inputs contiguous float32 on the right device first. Inputs arrive validated.
"""

from __future__ import annotations

import functools

import torch

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


def greedy_order(abar_rr, s0, valid, step_size, block_size, block_mode):
    B, R = s0.shape
    if R > _extension.GREEDY_MAX_LENGTH:
        raise ValueError(
            f"`abar_rr` has R={R} positions; the CUDA backend keeps a row in registers and takes "
            f"R <= {_extension.GREEDY_MAX_LENGTH}. Use backend='triton' or 'torch'."
        )
    rank = torch.empty((B, R), dtype=torch.int32, device=s0.device)
    if B > 0 and R > 0:
        with torch.cuda.device(s0.device):
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
                s0.device.index,
                torch.cuda.current_stream(s0.device).cuda_stream,
            )
    return dense_steps(rank, block_size)

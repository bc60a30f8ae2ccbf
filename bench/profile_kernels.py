"""Where the time of one statistics call goes on a GPU: kernels (device time) vs host overhead.

``python bench/profile_kernels.py`` prints, per op and shape, the wall time of one call (synchronised),
the summed device time of its kernels, and the torch profiler's table of those kernels. Wall time far
above device time means the call is host-bound (Python checks, launches), which a model forward that
keeps the GPU busy can hide but a lone call cannot. GPU only; the package must be installed
(``bench/run_gpu.sh`` installs it and runs this script).

``python bench/profile_kernels.py --host`` runs anywhere (no GPU): the same calls on CPU tensors with every
Triton launch recorded instead of run, so what is timed is this package's own Python per call (checks,
allocations, argument preparation) and what is counted is the launches it asks for. Triton's launcher
and the driver add their own cost per launch on a GPU, not measured by this mode.
"""

from __future__ import annotations

import os
import sys
import time
import timeit
from unittest import mock

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

import agdo_kernels

MODELS = {"dream": (28, 4, 128)}
SHAPES = [(8, 512), (1, 4096)]


def inputs(B, N, model="dream"):
    H, Hkv, d = MODELS[model]
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, h, N, d, device="cuda", dtype=torch.bfloat16, generator=gen) for h in (H, Hkv, Hkv))
    unmasked = torch.rand(B, N, device="cuda", generator=gen) < 0.5
    return q, k, v, unmasked


def wall_ms(fn, repeats=50):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats * 1e3


def report(name, fn, repeats=10):
    wall = wall_ms(fn)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    device_ms = sum(e.self_device_time_total for e in events) / repeats / 1e3
    launches = sum(e.count for e in events) / repeats
    print(f"\n## {name}: wall {wall:.3f} ms/call, device {device_ms:.3f} ms/call, {launches:.0f} kernels/call")
    print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=12, max_name_column_width=60))


def host_report(repeats=7, number=300):
    """Per call: this package's Python time (best of ``repeats`` runs of ``number`` calls) and its launches."""
    os.environ["TRITON_INTERPRET"] = "1"  # CPU tensors reach the Triton launchers (none of them runs)
    import triton.runtime.autotuner
    import triton.runtime.interpreter
    import triton.runtime.jit

    launches = []

    def record(kernel, *args, **kwargs):
        launches.append(kernel)

    print("| call (B=8, N=512, Dream last layer, launches recorded not run) | host us/call | launches/call |")
    print("|---|---|---|")
    with mock.patch.object(triton.runtime.jit.JITFunction, "run", record), \
            mock.patch.object(triton.runtime.interpreter.InterpretedFunction, "run", record), \
            mock.patch.object(triton.runtime.autotuner.Autotuner, "run", record):  # fmt: skip
        for name, fn in host_calls().items():
            fn()
            launches.clear()
            with _TorchKernels() as torch_kernels:
                fn()
            per_call = f"{len(launches)} Triton" + (f" + {len(torch_kernels.ops)} torch" if torch_kernels.ops else "")
            best = min(timeit.repeat(fn, number=number, repeat=repeats)) / number
            print(f"| {name} | {best * 1e6:.1f} | {per_call} |")


class _TorchKernels(TorchDispatchMode):
    """The torch ops of a call that launch a device kernel (everything but allocations and views)."""

    HOST_ONLY = {"aten.empty.memory_format", "aten.view.dtype", "aten.detach.default", "aten.alias.default",
                 "aten.unsqueeze.default", "aten.expand.default", "aten.transpose.int", "aten.slice.Tensor"}

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func) not in self.HOST_ONLY:
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def host_calls():
    H, Hkv, d = MODELS["dream"]
    B, N = 8, 512
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, h, N, d, generator=gen).to(torch.bfloat16) for h in (H, Hkv, Hkv))
    unmasked = torch.rand(B, N, generator=gen) < 0.5
    padded = (torch.arange(N) >= N // 4).expand(B, N).contiguous()
    lse = torch.randn(B, H, N, generator=gen)
    return {
        "valid_attention S+lse (Max-S decoding)": lambda: agdo_kernels.valid_attention(
            q, k, unmasked=unmasked, return_lse=True, backend="triton"),
        "valid_attention S+lse, left-padded": lambda: agdo_kernels.valid_attention(
            q, k, unmasked=unmasked, attention_mask=padded, return_lse=True, backend="triton"),
        "valid_attention S+O+lse": lambda: agdo_kernels.valid_attention(
            q, k, v, unmasked=unmasked, return_output=True, return_lse=True, backend="triton"),
        "influence (lse given)": lambda: agdo_kernels.influence(q, k, lse=lse, backend="triton"),
        "influence (lse given), left-padded": lambda: agdo_kernels.influence(
            q, k, lse=lse, attention_mask=padded, backend="triton"),
    }  # fmt: skip


def main():
    if "--host" in sys.argv[1:]:
        host_report()
        return
    torch.backends.cuda.matmul.allow_tf32 = False
    for B, N in SHAPES:
        q, k, v, unmasked = inputs(B, N)
        lse = agdo_kernels.valid_attention(q, k, v, unmasked=unmasked, return_lse=True, backend="triton").lse
        report(f"valid_attention S+O+lse B={B} N={N}",
               lambda: agdo_kernels.valid_attention(q, k, v, unmasked=unmasked, return_output=True, return_lse=True,
                                                    backend="triton"))
        # A left-padded batch (every row padded by a quarter of N): the key-padding launch and the skipped blocks.
        padded = torch.arange(N, device="cuda") >= N // 4
        padded = padded.expand(B, N).contiguous()
        report(f"valid_attention S+O+lse, left-padded 25%, B={B} N={N}",
               lambda: agdo_kernels.valid_attention(q, k, v, unmasked=unmasked, attention_mask=padded,
                                                    return_output=True, return_lse=True, backend="triton"))
        report(f"influence (lse given) B={B} N={N}", lambda: agdo_kernels.influence(q, k, lse=lse, backend="triton"))
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # the bench's baseline kernel
            report(f"sdpa flash B={B} N={N}",
                   lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True))


if __name__ == "__main__":
    main()

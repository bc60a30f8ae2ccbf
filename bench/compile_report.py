"""Compile-only report of the Triton kernels: registers, spills, shared memory and the hot loop's SASS.

Needs no GPU: every kernel is compiled ahead of time for a target (sm_90 and/or sm_80) with Triton's own
ptxas, and the numbers come from ptxas' ``-v`` report (registers, spill bytes), Triton's metadata (shared
memory) and the SASS of the cubin (``cuobjdump -sass``). The hot loop is the innermost loop (a backward branch's
range) holding the kernel's per-tile marker instruction — ``MUFU.EX2`` for the attention kernels, whose
loop folds one key (or query) tile per iteration — and its instructions are counted, in total and by class.

``valid_attention`` is compiled twice per case: as shipped (S + O + lse) and with ``COMPUTE_S=False``, the
same kernel without the statistic and with keys read in place (no gather through the key order) — the
FlashAttention floor, as a varlen kernel would run it (padding not visited, no mask per key) — so
``S+O / floor`` is the statistic's cost in hot-loop instructions. Its ``per tile`` range runs from a key
block all in U to the one block per row where U ends (a block outside U issues two instructions more than
the first: the test that it is not the block where U ends).

    python bench/compile_report.py --arch 90 80 --out report.md             # pinned configs
    python bench/compile_report.py --arch 90 80 --all-configs --out report.md
    python bench/compile_report.py --arch 90 80 --kv-heads 8 --out report.md   # no GQA (LLaDA's layout)
    python bench/compile_report.py --cuda --arch 90 80 --out report.md      # csrc/attention_stats.cu (nvcc)

``--cuda`` reports the CUDA extension's attention kernels instead: csrc/attention_stats.cu compiled by nvcc
(every dtype, head dim and output variant the launchers instantiate), each beside the same source with S cut
out (its FlashAttention floor: the U load and the one FFMA per logit, and the S store).

Each compile sees the arguments the real launcher passes (captured from a call on small CPU tensors, so
pointer alignment and strides specialise as at run time) with N = 1000 keys: not a multiple of 16, as in
most real batches.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from multiprocessing import get_context
from pathlib import Path
from unittest import mock

import torch

SEQ_LEN = 1000
HEADS, KV_HEADS = 8, 2
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
HEAD_DIMS = (64, 128, 256)
# Shared memory one block may use: H100 227 KiB, A100 163 KiB. Triton compiles bigger tiles; they fail to launch.
SHARED_LIMIT = {90: 232_448, 80: 166_912}
# SASS opcode classes counted in the hot loop: (column, opcode prefixes).
INSTRUCTION_CLASSES = (
    ("MMA", ("HMMA", "HGMMA")),
    ("EX2", ("MUFU.EX2",)),
    ("LDG", ("LDG.",)),
    ("LDGSTS", ("LDGSTS",)),
    ("LDS", ("LDS",)),
    ("cvt", ("I2F", "F2F", "F2I", "I2FP")),
    ("LDL/STL", ("LDL", "STL")),
)


@dataclass(frozen=True)
class Case:
    kernel: str  # a key of KERNELS
    arch: int
    dtype: str
    head_dim: int
    key_mask: bool
    config: tuple  # (BLOCK_M, BLOCK_N, num_warps, num_stages)
    pinned: bool
    floor: bool = False  # valid_attention without S (COMPUTE_S=False)
    max_registers: int | None = None  # ptxas' register cap (the launch option ``maxnreg``); None: none
    kv_heads: int = KV_HEADS  # of HEADS query heads: KV_HEADS is GQA, HEADS none
    warp_specialize: bool = False  # influence's Hopper variant (agdo_kernels.set_warp_specialize)


@dataclass
class Result:
    case: Case
    registers: int
    stack_bytes: int
    spill_store_bytes: int
    spill_load_bytes: int
    shared_bytes: int
    loop_instructions: int  # 0: no loop holding the marker was found
    loop_classes: dict = field(default_factory=dict)
    loop_paths: tuple = (0, 0)  # instructions issued by the shortest and the longest iteration; (0, 0): unknown
    ptxas_log: str = ""
    warps_run: int = 0  # warps per block as compiled: more than the config's when Triton warp-specialised the loop

    @property
    def spills(self) -> bool:
        return self.spill_store_bytes > 0 or self.spill_load_bytes > 0


# ---------------------------------------------------------------------------------------------- kernels


class LaunchCaptured(Exception):
    """Raised instead of a launch: carries the kernel and the exact arguments the launcher passed."""

    def __init__(self, kernel, args, kwargs):
        super().__init__(kernel)
        self.kernel, self.args, self.kwargs = kernel, args, kwargs


def _clean_flags(B, *tensors, flags):
    return flags.zero_()


def _key_order(unmasked, attention_mask, flags):
    B, N = unmasked.shape
    flags.zero_()
    return torch.arange(N, dtype=torch.int32).repeat(B, 1), torch.tensor([[N // 2, N]] * B, dtype=torch.int32)


def _counted_rows(lse, attention_mask, query_mask, flags):
    B, H, N = lse.shape
    flags.zero_()
    return lse.float().contiguous(), torch.tensor([[0, N, 0, N]] * B, dtype=torch.int32)


def _capture_launch(kernel, grid, *args, gpu_configs, dtype, head_dim, device, sm80_fp32_config=None, **constexprs):
    raise LaunchCaptured(kernel.fn, args, constexprs)  # the autotuner's JITFunction


class _CaptureGridLaunch:
    """Stands in for a JITFunction launched as ``kernel[grid](...)``."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        def capture(*args, **kwargs):
            raise LaunchCaptured(self.kernel, args, kwargs)

        return capture


def _attention_inputs(case):
    dtype, head_dim, key_mask = DTYPES[case.dtype], case.head_dim, case.key_mask
    q = torch.zeros(1, HEADS, SEQ_LEN, head_dim, dtype=dtype)
    k = torch.zeros(1, case.kv_heads, SEQ_LEN, head_dim, dtype=dtype)
    mask = torch.ones(1, SEQ_LEN, dtype=torch.bool) if key_mask else None
    lse = torch.zeros(1, HEADS, SEQ_LEN)
    return q, k, mask, lse


def _call_valid_attention(module, case):
    q, k, mask, _ = _attention_inputs(case)
    unmasked = torch.ones(1, SEQ_LEN, dtype=torch.bool)
    module.valid_attention(q, k, k, unmasked, mask, 0.1, return_output=True, return_lse=True, compute_s=not case.floor)


def _call_influence(module, case):
    q, k, mask, lse = _attention_inputs(case)
    module.influence_sum(q, k, lse, mask, None, 0.1)


def _call_response_block(module, case):
    q, k, mask, lse = _attention_inputs(case)
    module.response_block(q, k, lse, SEQ_LEN // 2, mask, 1, 0.1)


def _call_greedy_order(module, case):
    R = SEQ_LEN // 2
    module.greedy_order(torch.zeros(1, R, R), torch.zeros(1, R), torch.ones(1, R, dtype=torch.bool), 1, None, "global")


@dataclass(frozen=True)
class KernelSpec:
    module: str
    call: object  # (module, case) -> None; launches the kernel once
    marker: str  # opcode prefix that marks the hot loop
    tuned: bool = True  # has a _GPU_CONFIGS list, launched through _common.launch


KERNELS = {
    "valid_attention": KernelSpec("agdo_kernels.triton.valid_attention", _call_valid_attention, "MUFU.EX2"),
    "influence": KernelSpec("agdo_kernels.triton.influence", _call_influence, "MUFU.EX2"),
    "response_block": KernelSpec("agdo_kernels.triton.response_attention", _call_response_block, "MUFU.EX2"),
    # One persistent program per row; its hot loop is the pick loop, one column load per pick.
    "greedy_order": KernelSpec("agdo_kernels.triton.greedy_order", _call_greedy_order, "LDG", tuned=False),
}


def _module(kernel):
    # Imported here, not at the top: a module imported under TRITON_INTERPRET=1 holds interpreter functions.
    return importlib.import_module(KERNELS[kernel].module)


def cases(*, arches, dtypes, head_dims, kernels, all_configs, floors, max_registers, kv_heads=KV_HEADS,
          warp_specialize=False) -> list[Case]:  # fmt: skip
    """Every (kernel, arch, dtype, head dim, key mask, config) to compile; fp32 only with its pinned tile, and not
    above head dim 128 (the launchers refuse it: ``triton_tile_refusal``).
    ``floors``: valid_attention's cases also without S. ``warp_specialize``: influence's fp16/bf16 cases also as
    its warp-specialised variant, with that variant's pinned config."""
    from agdo_kernels._backends import triton_tile_refusal
    from agdo_kernels.triton._common import pinned_config

    found = []
    for kernel in kernels:
        if not KERNELS[kernel].tuned:
            found += [Case(kernel, arch, "fp32", 0, False, (), True, max_registers=max_registers) for arch in arches]
            continue
        gpu_configs = _module(kernel)._GPU_CONFIGS
        sm80_fp32 = getattr(_module(kernel), "_SM80_FP32_CONFIG", None)
        for arch in arches:
            for dtype in dtypes:
                for head_dim in head_dims:
                    if triton_tile_refusal(DTYPES[dtype], head_dim):
                        continue  # the launcher refuses it: nothing ships
                    pinned = pinned_config(gpu_configs, DTYPES[dtype], head_dim, arch, sm80_fp32)
                    configs = gpu_configs if all_configs and dtype != "fp32" else [pinned]
                    for config in configs:
                        for key_mask in (False, True):
                            for floor in (False, True) if floors and kernel == "valid_attention" else (False,):
                                found.append(Case(kernel, arch, dtype, head_dim, key_mask, tuple(config),
                                                  config == pinned, floor, max_registers, kv_heads))  # fmt: skip
                    if warp_specialize and kernel == "influence" and dtype != "fp32" and arch >= 90:
                        config = pinned_config(_module(kernel)._WARP_SPECIALIZED_CONFIGS, DTYPES[dtype], head_dim)
                        found += [Case(kernel, arch, dtype, head_dim, key_mask, tuple(config), True,
                                       max_registers=max_registers, kv_heads=kv_heads, warp_specialize=True)
                                  for key_mask in (False, True)]  # fmt: skip
    return found


# ---------------------------------------------------------------------------------------------- compile


def _launch_arguments(case: Case):
    """The JITFunction and the arguments its launcher passes for ``case`` (config and flag applied)."""
    spec = KERNELS[case.kernel]
    module = _module(case.kernel)
    if spec.tuned:
        stand_in = mock.patch.object(module, "launch", _capture_launch)
    else:
        stand_in = mock.patch.object(module, "_greedy_rank_kernel", _CaptureGridLaunch(module._greedy_rank_kernel))
    # The launches before the kernel (non-finite scan, key order, counted rows) get torch stand-ins on these CPU
    # tensors.
    before = contextlib.ExitStack()
    for name, stand_in_for in (("flag_nonfinite_rows", _clean_flags), ("key_order", _key_order),
                               ("counted_rows", _counted_rows)):
        if hasattr(module, name):
            before.enter_context(mock.patch.object(module, name, stand_in_for))
    if hasattr(module, "cuda_arch"):  # launchers that pick a kernel variant by the device's architecture
        before.enter_context(mock.patch.object(module, "cuda_arch", lambda device: case.arch))
    if case.warp_specialize:  # as on an H100 with agdo_kernels.set_warp_specialize(True)
        before.enter_context(mock.patch.object(module, "_warp_specializable", lambda q, k: True))
    try:
        with stand_in, before:
            spec.call(module, case)
    except LaunchCaptured as launched:
        kernel, args, kwargs = launched.kernel, launched.args, dict(launched.kwargs)
    else:
        raise RuntimeError(f"{case.kernel}: the launcher returned without launching")
    if spec.tuned:
        block_m, block_n, kwargs["num_warps"], kwargs["num_stages"] = case.config
        from agdo_kernels.triton._common import FP_FUSION

        kwargs.update(BLOCK_M=block_m, BLOCK_N=block_n, enable_fp_fusion=FP_FUSION)  # as _common.launch
    if case.max_registers:
        kwargs["maxnreg"] = case.max_registers
    return kernel, args, kwargs


def compile_case(case: Case) -> Result:
    """Compile ``case`` for its target and read registers/spills (ptxas -v), shared memory and the SASS."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel, args, kwargs = _launch_arguments(case)
    target = GPUTarget("cuda", case.arch, 32)
    backend = make_backend(target)
    # The runtime's own specialisation: pointer alignment, strides equal to 1 made constants, ints divisible by 16.
    bind = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = bind(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, options, bound, specialization, options)

    knobs.nvidia.dump_ptxas_log = True  # Triton prints ptxas' -v report to stdout
    knobs.compilation.always_compile = True  # a cache hit would skip ptxas and its report
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                                  options=options.__dict__)  # fmt: skip
    usage = ptxas_usage(log.getvalue())
    sass = disassemble(compiled.asm["cubin"])
    loop = hot_loop(sass, KERNELS[case.kernel].marker)
    return Result(case, **usage, shared_bytes=compiled.metadata.shared, loop_instructions=len(loop),
                  loop_paths=loop_paths(sass, KERNELS[case.kernel].marker), loop_classes=instruction_classes(loop),
                  ptxas_log=log.getvalue(), warps_run=compiled.metadata.num_warps)  # fmt: skip


# ---------------------------------------------------------------------------------------------- parsing


def ptxas_usage(log: str) -> dict:
    """Registers, stack frame and spill bytes from a ``ptxas -v`` report (one kernel)."""
    registers = re.search(r"Used (\d+) registers", log)
    frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if registers is None or frame is None:
        raise ValueError(f"no register/spill report in the ptxas output:\n{log}")
    stack, stores, loads = (int(x) for x in frame.groups())
    return {"registers": int(registers.group(1)), "stack_bytes": stack, "spill_store_bytes": stores,
            "spill_load_bytes": loads}  # fmt: skip


def disassemble(cubin: bytes) -> str:
    """SASS text of ``cubin`` by Triton's cuobjdump (branch targets as addresses, which nvdisasm turns into labels)."""
    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        return subprocess.run(
            [knobs.nvidia.cuobjdump.path, "-sass", file.name], check=True, capture_output=True, text=True
        ).stdout


_SASS_LINE = re.compile(r"/\*([0-9a-f]+)\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Za-z0-9_.]*)([^;]*);")


@dataclass(frozen=True)
class Instruction:
    address: int
    opcode: str
    operands: str
    predicated: bool  # guarded by a predicate (``@P0``, ``@!P1``): a branch that may fall through

    def branch_target(self) -> int | None:
        target = re.search(r"0x([0-9a-f]+)", self.operands) if self.opcode.startswith("BRA") else None
        return int(target.group(1), 16) if target else None


def sass_instructions(sass: str) -> list[Instruction]:
    """Every instruction of ``cuobjdump -sass`` text, in address order."""
    return [
        Instruction(int(address, 16), opcode, operands, bool(predicate))
        for address, predicate, opcode, operands in _SASS_LINE.findall(sass)
    ]


def _hot_loop_body(instructions: list[Instruction], marker: str) -> list[Instruction]:
    """The innermost loop holding an instruction starting with ``marker``; [] if there is none.

    A loop is the range from a backward branch's target to the branch.
    """
    loops = []
    for instruction in instructions:
        target = instruction.branch_target()
        if target is not None and target < instruction.address:
            loops.append([i for i in instructions if target <= i.address <= instruction.address])
    marked = [body for body in loops if any(i.opcode.startswith(marker) for i in body)]
    return min(marked, key=len) if marked else []


def hot_loop(sass: str, marker: str) -> list[str]:
    """Opcodes of the innermost loop holding ``marker`` as written; nested loops (barrier spin-waits) once."""
    return [i.opcode for i in _hot_loop_body(sass_instructions(sass), marker)]


def loop_paths(sass: str, marker: str) -> tuple[int, int]:
    """Instructions issued by the hot loop's shortest and longest iteration: every path from the loop's head to
    its backward branch through the branches inside (a key tile that skips work issues fewer than the loop
    holds). Nested loops count once, paths that leave the loop are not iterations. ``(0, 0)``: no loop."""
    body = _hot_loop_body(sass_instructions(sass), marker)
    if not body:
        return 0, 0
    index = {i.address: n for n, i in enumerate(body)}
    # paths[n] = (shortest, longest) instruction count from body[n] to the backward branch; None: leaves the loop
    paths: list[tuple[int, int] | None] = [None] * len(body)
    paths[-1] = (1, 1)
    for n in range(len(body) - 2, -1, -1):
        instruction = body[n]
        successors = []
        target = instruction.branch_target()
        if target is not None and target > instruction.address:  # a forward branch: taken (and maybe not)
            successors.append(index.get(target))  # None when it jumps out of the loop
            if instruction.predicated:
                successors.append(n + 1)
        elif instruction.opcode == "EXIT" and not instruction.predicated:
            successors = []
        else:  # straight-line code; a nested loop's backward branch falls through (its loop counted once)
            successors.append(n + 1)
        reachable = [paths[m] for m in successors if m is not None and paths[m] is not None]
        if reachable:
            paths[n] = (1 + min(p[0] for p in reachable), 1 + max(p[1] for p in reachable))
    return paths[0] or (0, 0)


def instruction_classes(opcodes: list[str]) -> dict:
    counts = Counter()
    for opcode in opcodes:
        for name, prefixes in INSTRUCTION_CLASSES:
            counts[name] += opcode.startswith(prefixes)
    return {name: counts[name] for name, _ in INSTRUCTION_CLASSES}


# ---------------------------------------------------------------------------------------------- table


def _floor_of(result: Result, results: list[Result]) -> Result | None:
    floor_case = replace(result.case, floor=True)
    return next((r for r in results if r.case == floor_case), None)


def _per_tile(result: Result) -> tuple[int, int]:
    """Instructions one iteration issues, shortest and longest path (the whole body when paths are unknown)."""
    return result.loop_paths if result.loop_paths[0] else (result.loop_instructions, result.loop_instructions)


def _span(low, high, form) -> str:
    return form.format(low) if form.format(low) == form.format(high) else form.format(low) + "-" + form.format(high)


def _class_cells(classes: dict | None = None) -> str:
    """The instruction-class cells that end a table row (their names for the header row)."""
    cells = (name if classes is None else classes[name] for name, _ in INSTRUCTION_CLASSES)
    return " | ".join(map(str, cells)) + " |"


def render_table(results: list[Result]) -> str:
    """Markdown: one table per target, a row per compile; ``S+O / floor`` on valid_attention's rows.

    ``loop instr`` is the loop body as written; ``per tile`` what one iteration issues, ``low-high`` when its
    branches skip work on some tiles (``S+O / floor`` compares these)."""
    lines = []
    for arch in sorted({r.case.arch for r in results}, reverse=True):
        lines += [
            f"sm_{arch} (shared memory limit {SHARED_LIMIT[arch] // 1024} KiB per block):",
            "",
            "| kernel | dtype | d | key mask | config (M, N, warps, stages) | regs | spill st/ld B | smem KiB "
            "| loop instr | per tile | S+O / floor | " + _class_cells(),
            "|---" * (11 + len(INSTRUCTION_CLASSES)) + "|",
        ]
        for r in (r for r in results if r.case.arch == arch):
            c = r.case
            name = c.kernel + (" floor (no S)" if c.floor else "") + (" warp-specialised" if c.warp_specialize else "")
            floor = None if c.floor else _floor_of(r, results)
            low, high = _per_tile(r)
            ratio = "—"
            if floor and floor.loop_instructions:
                floor_low, floor_high = _per_tile(floor)
                ratio = _span(low / floor_low, high / floor_high, "{:.2f}") + "x"
            config = ", ".join(map(str, c.config)) + (" (pinned)" if c.pinned else "") if c.config else "launcher's"
            if c.max_registers:
                config += f", ≤ {c.max_registers} regs"
            if c.config and r.warps_run and r.warps_run != c.config[2]:
                config += f"; {r.warps_run} warps run"
            if c.kv_heads != KV_HEADS and c.config:
                name += f" ({HEADS} heads, {c.kv_heads} KV)"
            spills = f"**{r.spill_store_bytes}/{r.spill_load_bytes}**" if r.spills else "0/0"
            shared = f"{r.shared_bytes / 1024:.0f}" + (" (over)" if r.shared_bytes > SHARED_LIMIT[arch] else "")
            loop = str(r.loop_instructions) if r.loop_instructions else "no loop"
            per_tile = _span(low, high, "{}") if r.loop_instructions else "—"
            mask = ("on" if c.key_mask else "off") if c.config else "—"  # greedy_order takes no key mask
            lines.append(
                f"| {name} | {c.dtype} | {c.head_dim or '—'} | {mask} | {config} "
                f"| {r.registers} | {spills} | {shared} | {loop} | {per_tile} | {ratio} | "
                + _class_cells(r.loop_classes)
            )
        lines.append("")
    return "\n".join(lines)


def toolchain() -> str:
    import triton
    from triton.backends.nvidia.compiler import get_ptxas_version

    def release(arch):
        return re.search(r"release ([\d.]+)", get_ptxas_version(arch)).group(1)

    return f"triton {triton.__version__}, ptxas {release(90)} (sm_90) / {release(80)} (sm_80), N = {SEQ_LEN}"


# ---------------------------------------------------------------------------------------------- CUDA kernels

CUDA_SOURCE = Path(__file__).resolve().parent.parent / "csrc" / "attention_stats.cu"
# The lines of csrc/attention_stats.cu that compute S: cut (or replaced) to make its floor. The floor reads the
# keys in place (position i is key i, no key order to load), over the real keys only, as a varlen
# FlashAttention runs a padded batch.
CUDA_S_LINES = (
    ("  int key = order[tile_row];", "  int key = tile_row;"),
    ("  if (n_blocks > 1) key = order[kTile + tile_row];", "  key = kTile + tile_row;"),
    ("    if (block + 2 < n_blocks) key = order[(block + 2) * kTile + tile_row];",
     "    key = (block + 2) * kTile + tile_row;"),
    ("    tile_u_sum(block_u, s, block_sum, n_u - block * kTile, quad_col);  // S\n",
     "    block_u[0] = block_u[1] = 0.0f;\n"),
    ("args.s_part[index] = real_row ? u * inverse : 0.0f;", "args.s_part[index] = 0.0f;"),
)
# The branches only edge tiles take, cut to measure the steady tile: the one last tile masks its positions past
# the real keys, the one tile where U ends sums p over part of it. Every other tile is all in U or all out.
CUDA_EDGE_LINES = (
    ("    if (real_in_tile < kTile) {", "    if (false) {"),
    ("  if (in_u <= 0) return;", "  return;"),
)
_CUDA_KERNEL = re.compile(r"(valid_attention_kernel|influence_kernel)I(6__half|13__nv_bfloat16)Li(\d+)E(?:Lb([01])E)?")


@dataclass(frozen=True)
class CudaResult:
    kernel: str  # "valid_attention S+O", "valid_attention S", "influence"
    dtype: str
    head_dim: int
    arch: int
    registers: int
    stack_bytes: int
    local_bytes: int
    loop_paths: tuple[int, int]  # a steady iteration (one key or query tile), shortest and longest path
    floor_paths: tuple[int, int] | None  # the same kernel without S (valid_attention only)
    edge_paths: tuple[int, int] | None  # the longest iteration with its edge branches: kernel, floor
    loop_classes: dict = field(default_factory=dict)


def nvcc_path() -> str | None:
    import shutil

    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def _substitute(text: str, lines, kind: str, constant: str) -> str:
    for old, new in lines:
        if old not in text:
            raise ValueError(
                f"csrc/attention_stats.cu no longer has the {kind} line {old.strip()!r}: update {constant}"
            )
        text = text.replace(old, new)
    return text


def cuda_floor_source(text: str) -> str:
    return _substitute(text, CUDA_S_LINES, "S", "CUDA_S_LINES")


def cuda_steady_source(text: str) -> str:
    return _substitute(text, CUDA_EDGE_LINES, "edge", "CUDA_EDGE_LINES")


def _cuda_kernels(text: str, arch: int, workdir: Path) -> dict:
    """``{(kernel, dtype, d, output): (resource usage, SASS)}`` of ``text`` compiled by nvcc for ``arch``."""
    from triton import knobs

    source = workdir / f"attention_stats_{arch}_{abs(hash(text))}.cu"
    source.write_text(text)
    cubin = source.with_suffix(".cubin")
    subprocess.run([nvcc_path(), "-cubin", f"-arch=sm_{arch}", "-O3", "-std=c++17", f"-I{CUDA_SOURCE.parent}",
                    str(source), "-o", str(cubin)], check=True, capture_output=True, text=True)  # fmt: skip
    dump = knobs.nvidia.cuobjdump.path
    sass = subprocess.run([dump, "-sass", str(cubin)], check=True, capture_output=True, text=True).stdout
    usage = subprocess.run([dump, "-res-usage", str(cubin)], check=True, capture_output=True, text=True).stdout
    resources = {name: dict(re.findall(r"(REG|STACK|LOCAL):(\d+)", rest))
                 for name, rest in re.findall(r"Function (\S+):\n(.*)", usage)}  # fmt: skip
    parts = re.split(r"\n\s*Function : (\S+)\n", sass)
    kernels = {}
    for name, code in zip(parts[1::2], parts[2::2]):
        match = _CUDA_KERNEL.search(name)
        if match is None:  # the one-thread-per-element preparation kernels: no hot loop to report
            continue
        kind, dtype, d, output = match.groups()
        key = (kind.removesuffix("_kernel"), "fp16" if "half" in dtype else "bf16", int(d), output == "1")
        kernels[key] = ({k: int(v) for k, v in resources[name].items()}, code)
    return kernels


def compile_cuda(arch: int) -> list[CudaResult]:
    """Every kernel of csrc/attention_stats.cu for ``arch``, valid_attention's beside its floor (no S): the steady
    tile (edge branches cut) and the longest iteration with them."""
    text = CUDA_SOURCE.read_text()
    sources = (text, cuda_floor_source(text), cuda_steady_source(text), cuda_steady_source(cuda_floor_source(text)))
    with tempfile.TemporaryDirectory() as workdir, ThreadPoolExecutor(2) as pool:  # two nvcc side by side
        shipped, floor, steady, steady_floor = pool.map(lambda source: _cuda_kernels(source, arch, Path(workdir)),
                                                        sources)  # fmt: skip
    results = []
    for key, (usage, sass) in sorted(shipped.items()):
        kind, dtype, d, output = key
        name = kind if kind == "influence" else f"{kind} {'S+O' if output else 'S'}"
        floors = None
        if kind == "valid_attention":
            edges = loop_paths(sass, "MUFU.EX2")[1], loop_paths(floor[key][1], "MUFU.EX2")[1]
            floors = loop_paths(steady_floor[key][1], "MUFU.EX2"), edges
        results.append(CudaResult(
            name, dtype, d, arch, usage["REG"], usage["STACK"], usage["LOCAL"], loop_paths(steady[key][1], "MUFU.EX2"),
            *(floors or (None, None)), instruction_classes(hot_loop(sass, "MUFU.EX2")),
        ))  # fmt: skip
    return results


def render_cuda_table(results: list[CudaResult]) -> str:
    """Markdown, one table per target. ``per tile`` is what a steady iteration issues (shortest-longest path: the
    last tile issues no loads), ``S / floor`` compares it with the same kernel without S. ``edge tile``: the
    longest iteration with the branches of the two edge tiles (the last one's mask, the one where U ends). The
    instruction classes count the shipped loop body, edge branches included."""
    lines = []
    for arch in sorted({r.arch for r in results}, reverse=True):
        lines += [
            f"csrc/attention_stats.cu, sm_{arch} (64-row tiles, 4 warps):",
            "",
            "| kernel | dtype | d | regs | stack/local B | per tile | floor per tile | S / floor | edge tile / floor "
            "| " + _class_cells(),
            "|---" * (9 + len(INSTRUCTION_CLASSES)) + "|",
        ]
        for r in (r for r in results if r.arch == arch):
            low, high = r.loop_paths
            floor, ratio, edge = "—", "—", "—"
            if r.floor_paths:
                floor = _span(*r.floor_paths, "{}")
                ratio = _span(low / r.floor_paths[0], high / r.floor_paths[1], "{:.2f}") + "x"
                edge = f"{r.edge_paths[0]} / {r.edge_paths[1]} = {r.edge_paths[0] / r.edge_paths[1]:.2f}x"
            local = f"{r.stack_bytes}/{r.local_bytes}"
            lines.append(
                f"| {r.kernel} | {r.dtype} | {r.head_dim} | {r.registers} | "
                f"{local if local == '0/0' else f'**{local}**'} | {_span(low, high, '{}')} | {floor} | {ratio} | "
                f"{edge} | " + _class_cells(r.loop_classes)
            )
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- main


def _parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90], choices=sorted(SHARED_LIMIT))
    parser.add_argument("--dtype", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--head-dim", type=int, nargs="+", default=list(HEAD_DIMS))
    parser.add_argument("--kernel", nargs="+", default=list(KERNELS), choices=list(KERNELS))
    parser.add_argument("--all-configs", action="store_true", help="every config of _GPU_CONFIGS, not only the pinned")
    parser.add_argument("--no-floor", action="store_true", help="skip valid_attention's FlashAttention floor")
    parser.add_argument("--kv-heads", type=int, default=KV_HEADS, choices=(1, 2, 4, HEADS),
                        help=f"key/value heads of the {HEADS} query heads ({HEADS}: no GQA)")
    parser.add_argument("--max-registers", type=int, help="cap ptxas' registers per thread (forces spills)")
    parser.add_argument("--warp-specialize", action="store_true",
                        help="influence also as its warp-specialised Hopper variant (fp16/bf16)")
    parser.add_argument("--cuda", action="store_true", help="report csrc/attention_stats.cu (nvcc) instead")
    parser.add_argument("--jobs", type=int, default=os.cpu_count(), help="compiles in parallel")
    parser.add_argument("--out", help="write the Markdown table to this file")
    parser.add_argument("--json", help="write every result (with ptxas' report) to this file")
    return parser.parse_args()


def _compile_all(todo, jobs):
    """``compile_case`` of every case, in ``jobs`` worker processes, or in this one for a single job."""
    if jobs == 1:
        yield from map(compile_case, todo)
        return
    with ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as pool:
        yield from pool.map(compile_case, todo)


def main():
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        # The interpreter replaces @triton.jit functions by Python ones: there would be nothing to compile.
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        os.execve(sys.executable, [sys.executable, __file__, *sys.argv[1:]], env)
    args = _parse_args()
    if args.cuda:
        results = [r for arch in args.arch for r in compile_cuda(arch)]
        version = subprocess.run([nvcc_path(), "--version"], capture_output=True, text=True).stdout
        release = re.search(r"release ([\d.]+)", version).group(1)
        table = f"nvcc {release}\n\n{render_cuda_table(results)}"
    else:
        todo = cases(arches=args.arch, dtypes=args.dtype, head_dims=args.head_dim, kernels=args.kernel,
                     all_configs=args.all_configs, floors=not args.no_floor, max_registers=args.max_registers,
                     kv_heads=args.kv_heads, warp_specialize=args.warp_specialize)  # fmt: skip
        results = []
        # Every compile is forced (a cache hit has no ptxas report): keep their files out of Triton's cache.
        with tempfile.TemporaryDirectory() as cache:
            os.environ["TRITON_CACHE_DIR"] = cache  # inherited by the workers
            for result in _compile_all(todo, min(args.jobs, len(todo))):
                results.append(result)
                print(f"[{len(results)}/{len(todo)}] {result.case}", file=sys.stderr, flush=True)
        table = f"{toolchain()}\n\n{render_table(results)}"
    print(table)
    if args.out:
        Path(args.out).write_text(table)
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in results], indent=1))

if __name__ == "__main__":
    main()

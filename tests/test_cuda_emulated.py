"""backend="cuda" kernels run on the CPU: csrc/ compiled against tests/cuda_emulator, checked like on a GPU.

The CUDA attention-statistics kernels have to be right before a GPU ever runs them, and CI has no GPU. So this
module compiles csrc/attention_stats.cu, csrc/greedy_order.cu and csrc/bindings.cpp with the host C++ compiler
against the emulator's stand-in headers (tests/cuda_emulator/emulator.h: blocks of fibers, warp-wide
instructions written from the PTX ISA tables, poisoned shared memory, cp.async landing early or late). The .cu
sources are used as they are, after three textual rewrites (``kernel<<<grid, block, smem, stream>>>(args)``
launches and the two ``__shared__`` declaration forms). Then the real Python glue (agdo_kernels/_cuda.py) runs on
CPU tensors with the emulated module in place of the compiled extension, and its results are compared with the
float64 oracles, the way tests/test_cuda_attention.py compares the GPU's.

Every dtype, head dim and output variant of the kernels runs (the 12 attention instantiations and the greedy's
short-row ones), with odd N around the 64-row tiles, GQA, padding, all-padding rows, ``Nq < N``, strided
views, copies landing late, outputs poisoned before the call, inputs with NaN on both sides. Five bugs planted
in the kernel source (a barrier removed, a wait one group short, shared memory one buffer short, no opt-in past
48 KiB, a lane exiting early) must show: the emulator is trusted with those bug classes because it catches
them. What only a GPU shows (speed, register pressure, real instruction timing) is in bench/ and
tests/test_cuda_compile.py. Skipped without a C++ compiler; the build takes ~10 s on 2 cores, once per run.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import importlib.util
import re
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from agdo_kernels import _cuda
from agdo_kernels.reference import ordering as reference_ordering
from conftest import DeviceOpLog, gqa_sdpa, oracle_abar, oracle_influence, oracle_lse, padding_mask, stat_tolerance

ROOT = Path(__file__).resolve().parent.parent
EMULATOR = ROOT / "tests" / "cuda_emulator"
KERNEL_SOURCES = ("attention_stats.cu", "greedy_order.cu")
CXX = shutil.which("c++") or shutil.which("g++")

pytestmark = pytest.mark.skipif(CXX is None, reason="no C++ compiler (c++/g++) to build the CUDA emulator")

# kernel<<<grid, block, shared_bytes, stream>>>(args), possibly split over a macro's continuation lines.
_LAUNCH = re.compile(
    r"(?P<kernel>[A-Za-z_][\w:]*(?:<[^<>;]*>)?)[\s\\]*<<<(?P<config>[^;]*?)>>>[\s\\]*\((?P<args>[^;]*?)\)", re.S
)
_DYNAMIC_SHARED = re.compile(r"extern __shared__ (?:__align__\(\d+\) )?(?P<type>[\w:]+(?: [\w:]+)*) (?P<name>\w+)\[\];")


def translate(source: str) -> str:
    """The .cu text with launches and ``__shared__`` declarations rewritten for the emulator (emulator.h)."""
    source, launches = _LAUNCH.subn(r"::cuda_emulator::launch(\g<kernel>, \g<config>, \g<args>)", source)
    source = _DYNAMIC_SHARED.sub(
        r"\g<type>* \g<name> = reinterpret_cast<\g<type>*>(::cuda_emulator::dynamic_shared());", source
    )
    source = source.replace("__shared__ ", "static ")  # block-wide arrays: one copy, shared by the block's fibers
    assert launches > 0 and "<<<" not in source and "__shared__" not in source, "untranslated CUDA syntax"
    return source


def _compile(source: Path, build: Path, optimise: str) -> Path:
    import pybind11

    obj = build / (source.stem + ".o")
    include = ["-I", str(EMULATOR), "-I", str(ROOT / "csrc"), "-I", pybind11.get_include(),
               "-I", sysconfig.get_paths()["include"]]  # fmt: skip
    command = [CXX, "-std=c++17", optimise, "-fPIC", "-fno-strict-aliasing", *include, "-c", str(source),
               "-o", str(obj)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"compiling {source.name} for the emulator failed:\n{result.stderr[-6000:]}"
    return obj


def _link(objects, build: Path) -> Path:
    library = build / ("_agdo_cuda" + sysconfig.get_config_var("EXT_SUFFIX"))  # the name PyInit__agdo_cuda wants
    result = subprocess.run([CXX, "-shared", *map(str, objects), "-o", str(library)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-6000:]
    return library


def load(library: Path):
    """The emulated module. One per process: Python hands back the first ``_agdo_cuda`` it loaded."""
    spec = importlib.util.spec_from_file_location("_agdo_cuda", library)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _kernel_file(build: Path, name: str, text: str) -> Path:
    path = build / (Path(name).stem + ".cpp")  # not next to csrc/ptx.cuh: "ptx.cuh" resolves to the emulator's
    path.write_text(translate(text))
    return path


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """``(module, objects by stem, build dir)``: the emulated ``_agdo_cuda`` and its object files."""
    build = tmp_path_factory.mktemp("cuda_emulator")
    sources = [_kernel_file(build, name, (ROOT / "csrc" / name).read_text()) for name in KERNEL_SOURCES]
    jobs = [(s, "-O2") for s in sources] + [(EMULATOR / "emulator.cpp", "-O2"), (ROOT / "csrc" / "bindings.cpp", "-O1")]
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        objects = list(pool.map(lambda job: _compile(job[0], build, job[1]), jobs))
    module = load(_link(objects, build))
    if module.CUDART_VERSION != 0:  # the emulator's mark (emulator.h)
        pytest.skip("this process already loaded the real _agdo_cuda; the emulated one cannot load beside it")
    return module, {obj.stem: obj for obj in objects}, build


@pytest.fixture
def emulated(build, monkeypatch):
    """agdo_kernels._cuda running on the emulator: CPU tensors, stream 0."""
    module = build[0]
    monkeypatch.setattr(_cuda, "_extension", module)
    monkeypatch.setattr(_cuda, "_launch_target", lambda device: (contextlib.nullcontext(), 0, 0))
    return module


@contextlib.contextmanager
def poisoned_outputs():
    """Every ``torch.empty`` inside starts as NaN (floats) or -7 (integers): unwritten outputs show."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan") if t.is_floating_point() else -7)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "empty", empty)
        yield


def _fenced(t):
    """``t``'s values in the middle of a NaN-filled buffer (64 elements each side; alignment kept)."""
    flat = torch.full((t.numel() + 128,), float("nan"), dtype=t.dtype)
    inner = flat[64 : 64 + t.numel()].view(t.shape)
    inner.copy_(t)
    return inner


def _qkv(B, H, Hkv, N, d, dtype, *, layout="contiguous", seed=0):
    gen = torch.Generator().manual_seed(seed)
    tensors = []
    for heads in (H, Hkv, Hkv):
        t = torch.randn(B, heads, N, d, generator=gen).to(dtype)
        if layout == "bnhd":  # transformers' (B, N, H, d).transpose(1, 2) view, read in place
            t = _fenced(t.transpose(1, 2).contiguous()).transpose(1, 2)
        elif layout == "odd":  # d-stride 2: the backend copies it first
            t = torch.stack([t, torch.zeros_like(t)], -1).flatten(-2)[..., ::2]
        else:
            t = _fenced(t)
        tensors.append(t)
    return tuple(tensors)


def _unmasked(B, N, kind, seed=1):
    if kind in ("empty", "full"):
        return torch.full((B, N), kind == "full", dtype=torch.bool)
    return torch.rand(B, N, generator=torch.Generator().manual_seed(seed)) < 0.4


HALF = [torch.float16, torch.bfloat16]

# How the emulator interleaves the block's threads and lands cp.async copies (emulator.h): a missing barrier or
# wait shows in at least one of these.
MODES = [("eager", "ascending"), ("eager", "descending"), ("late", "ascending")]


# Every mode in float16; bfloat16 (the same code but for the mma's input type) in the default mode.
DTYPE_MODES = [(torch.float16, mode) for mode in MODES] + [(torch.bfloat16, MODES[0])]


def _dtype_mode_id(case):
    dtype, mode = case
    return f"{str(dtype).removeprefix('torch.')}-{'-'.join(mode)}"


def _set_mode(monkeypatch, mode):
    copies, order = mode
    monkeypatch.setenv("CUDA_EMULATOR_COPIES", copies)
    monkeypatch.setenv("CUDA_EMULATOR_ORDER", order)


# --- valid attention ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,mode", DTYPE_MODES, ids=map(_dtype_mode_id, DTYPE_MODES))
@pytest.mark.parametrize(
    "shape,pattern,u_kind,layout",
    [((2, 4, 2, 19, 64), "both", "random", "bnhd"), ((1, 2, 1, 130, 128), "left", "random", "contiguous"),
     ((2, 2, 2, 77, 64), "empty_row", "full", "odd")],
    ids=["19-gqa2-d64", "130-gqa2-d128", "77-d64-empty-row"],
)  # fmt: skip
def test_valid_attention_matches_oracle(emulated, monkeypatch, mode, dtype, shape, pattern, u_kind, layout):
    _set_mode(monkeypatch, mode)
    B, H, Hkv, N, d = shape
    q, k, v = _qkv(B, H, Hkv, N, d, dtype, layout=layout)
    mask = padding_mask(B, N, pattern).cpu()
    unmasked = _unmasked(B, N, u_kind)

    with poisoned_outputs():
        s, out, lse = _cuda.valid_attention(q, k, v, unmasked, mask, d**-0.5, True, True)

    _assert_matches_oracle(q, k, v, unmasked, mask, (s, out, lse))


def _assert_matches_oracle(q, k, v, unmasked, mask, result):
    """S and lse against the float64 oracles; O within twice torch's own error at the same precision."""
    s, out, lse = result
    dtype = q.dtype
    tol = stat_tolerance(dtype)
    expected_s = (oracle_abar(q, k, mask).cpu() * (unmasked & mask)[:, None, :]).sum(-1) * mask
    torch.testing.assert_close(s.double(), expected_s, atol=tol, rtol=0)
    has_keys = mask.any(-1)
    torch.testing.assert_close(lse[has_keys].double(), oracle_lse(q, k, mask)[has_keys], atol=1e-4, rtol=1e-5)
    assert (lse[~has_keys] == 0).all() and (s[~has_keys] == 0).all() and (out[~has_keys] == 0).all()
    expected_out = gqa_sdpa(q.double(), k.double(), v.double(), mask)[has_keys]
    torch_err = (gqa_sdpa(q, k, v, mask)[has_keys].double() - expected_out).abs().max().item()
    ours_err = (out[has_keys].double() - expected_out).abs().max().item()
    assert out.dtype == dtype and ours_err <= 2 * torch_err + tol, (ours_err, torch_err)


def _first_real(mask, count):
    """U = the first ``count`` real keys of each row (order positions 0..count-1), plus every padded key."""
    return (mask.cumsum(-1) <= count) | ~mask


@pytest.mark.parametrize(
    "u_of",
    [lambda mask: _first_real(mask, 64), lambda mask: _first_real(mask, 150), lambda mask: _first_real(mask, 0),
     lambda mask: torch.ones_like(mask), lambda mask: _unmasked(*mask.shape, "random", seed=9) | ~mask],
    ids=["u-ends-on-a-tile", "u-ends-in-tile-3", "u-only-padded", "u-everything", "u-scattered"],
)  # fmt: skip
def test_valid_attention_visits_keys_in_u_first(emulated, u_of):
    """The kernel visits the real keys of U first, then the other real keys: U ending on a tile boundary or
    inside a tile, U empty or whole, scattered U; padded keys in U (never visited) and holes in the mask. Rows of
    more than 192 real keys: the order entries of each tile are read two tiles ahead of its use."""
    B, H, Hkv, N, d = 2, 2, 1, 300, 64
    q, k, v = _qkv(B, H, Hkv, N, d, torch.float16, seed=8)
    mask = padding_mask(B, N, "both", seed=2).cpu()
    mask[:, 90:97] = False  # a hole inside the row
    unmasked = u_of(mask)
    with poisoned_outputs():
        result = _cuda.valid_attention(q, k, v, unmasked, mask, d**-0.5, True, True)
    _assert_matches_oracle(q, k, v, unmasked, mask, result)


@pytest.mark.parametrize("N", [37, 700])
def test_key_order_puts_u_first_and_leaves_padding_out(emulated, N):
    """The order the preparation kernel writes, against plain lists: the real keys of U ascending, the other
    real keys ascending, then 0s; counts (n_u, n_real). N = 700 gives the 256 threads segments of 3 keys."""
    B, d = 4, 64
    gen = torch.Generator().manual_seed(N)
    mask = torch.rand(B, N, generator=gen) < 0.8
    mask[1] = False  # no real key
    mask[2] = True
    unmasked = torch.rand(B, N, generator=gen) < 0.3
    unmasked[2] = True
    q, k, v = _qkv(B, 1, 1, N, d, torch.float16)
    padded = _cuda._padded(N)
    order = torch.full((B, padded), -7, dtype=torch.int32)
    counts = torch.full((B, 2), -7, dtype=torch.int32)
    s_part = torch.empty(B, 1, 1)  # held here: the module only gets addresses
    emulated.valid_attention(
        q.data_ptr(), k.data_ptr(), 0, (N * d, N * d, d), (N * d, N * d, d), (0, 0, 0),
        mask.view(torch.uint8).data_ptr(), unmasked.view(torch.uint8).data_ptr(), order.data_ptr(), counts.data_ptr(),
        s_part.data_ptr(), 0, 0, B, 1, 1, 1, N, padded, d, emulated.ATTENTION_FLOAT16, 0.125, 0, 0,
    )  # fmt: skip
    for b in range(B):
        real = mask[b].tolist()
        in_u = [key for key in range(N) if real[key] and unmasked[b, key]]
        other = [key for key in range(N) if real[key] and not unmasked[b, key]]
        assert order[b].tolist() == in_u + other + [0] * (padded - len(in_u) - len(other)), b
        assert counts[b].tolist() == [len(in_u), len(in_u) + len(other)], b


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("d", [64, 128])
def test_valid_attention_without_output_and_last_queries(emulated, dtype, d):
    """The kernels without O (S alone, S + lse), and queries that are the last Nq keys."""
    B, H, Hkv, N, Nq = 2, 2, 1, 83, 21
    q, k, v = _qkv(B, H, Hkv, N, d, dtype, seed=3)
    mask = padding_mask(B, N, "left").cpu()
    unmasked = _unmasked(B, N, "random", seed=4)
    abar = oracle_abar(q, k, mask).cpu()
    expected_s = (abar * (unmasked & mask)[:, None, :]).sum(-1) * mask
    with poisoned_outputs():
        s_alone, out, lse = _cuda.valid_attention(q, k, None, unmasked, mask, d**-0.5, False, False)
        s_lse, _, lse = _cuda.valid_attention(q, k, None, unmasked, mask, d**-0.5, False, True)
        s_last, out_last, lse_last = _cuda.valid_attention(q[:, :, N - Nq :], k, v, unmasked, mask, d**-0.5, True, True)
        _, out_full, _ = _cuda.valid_attention(q, k, v, unmasked, mask, d**-0.5, True, False)
    assert out is None
    tol = stat_tolerance(dtype)
    torch.testing.assert_close(s_alone.double(), expected_s, atol=tol, rtol=0)
    assert torch.equal(s_alone, s_lse)  # the same arithmetic with or without the lse store
    torch.testing.assert_close(lse.double(), oracle_lse(q, k, mask), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(s_last.double(), expected_s[:, N - Nq :], atol=tol, rtol=0)
    torch.testing.assert_close(lse_last, lse[:, :, N - Nq :], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out_last.double(), out_full[:, :, N - Nq :].double(), atol=tol, rtol=0)


# --- influence ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,mode", DTYPE_MODES, ids=map(_dtype_mode_id, DTYPE_MODES))
@pytest.mark.parametrize("d", [64, 128])
def test_influence_matches_oracle(emulated, monkeypatch, mode, dtype, d):
    _set_mode(monkeypatch, mode)
    B, H, Hkv, N = 2, 4, 2, 141
    q, k, _ = _qkv(B, H, Hkv, N, d, dtype, layout="bnhd", seed=5)
    mask = padding_mask(B, N, "both").cpu()
    query_mask = torch.rand(B, N, generator=torch.Generator().manual_seed(6)) < 0.6
    lse = oracle_lse(q, k, mask).float()

    with poisoned_outputs():
        total = _cuda.influence_sum(q, k, lse, mask, query_mask, d**-0.5)

    expected = oracle_influence(q, k, mask, query_mask, norm="sum").cpu()
    # Sums over up to N rows of probabilities: the tolerance grows with them.
    torch.testing.assert_close(total.double(), expected, atol=stat_tolerance(dtype) * 4, rtol=1e-3)
    assert (total[~mask] == 0).all()


def test_influence_skips_tiles_outside_the_counted_rows(emulated):
    """Query tiles outside the counted rows and key tiles without a real key are skipped: left padding over
    whole tiles, counted rows only at the end (a response), right padding, a row with no counted row, a row with
    no real key. The extent the preparation kernel writes is checked against plain lists."""
    B, H, Hkv, N, d = 4, 2, 1, 300, 64
    q, k, _ = _qkv(B, H, Hkv, N, d, torch.float16, seed=11)
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[0, :140] = False
    mask[1, 250:] = False
    mask[3] = False
    query_mask = torch.zeros(B, N, dtype=torch.bool)
    query_mask[:, 200:] = True
    query_mask[0, 150] = True  # a counted row alone in its query tile
    query_mask[2] = False
    lse = oracle_lse(q, k, mask).float()

    with poisoned_outputs():
        total = _cuda.influence_sum(q, k, lse, mask, query_mask, d**-0.5)

    expected = oracle_influence(q, k, mask, query_mask, norm="sum").cpu()
    torch.testing.assert_close(total.double(), expected, atol=stat_tolerance(torch.float16) * 4, rtol=1e-3)
    assert (total[~mask] == 0).all() and (total[2:] == 0).all()

    padded = _cuda._padded(N)
    lse2, part = torch.empty(B, H, padded), torch.empty(B, H, N)  # held here: the module only gets addresses
    extent = torch.full((B, 4), -7, dtype=torch.int32)
    emulated.influence_sum(
        q.data_ptr(), k.data_ptr(), (H * N * d, N * d, d), (Hkv * N * d, N * d, d), lse.data_ptr(),
        mask.view(torch.uint8).data_ptr(), query_mask.view(torch.uint8).data_ptr(), lse2.data_ptr(),
        extent.data_ptr(), part.data_ptr(), B, H, Hkv, N, padded, d, emulated.ATTENTION_FLOAT16, 0.125, 0, 0,
    )  # fmt: skip
    for b in range(B):
        counted = [row for row in range(N) if mask[b, row] and query_mask[b, row]]
        real = [key for key in range(N) if mask[b, key]]
        bounds = [counted[0], counted[-1] + 1] if counted else [N, 0]
        bounds += [real[0], real[-1] + 1] if real else [N, 0]
        assert extent[b].tolist() == bounds, b


# --- host work per call -----------------------------------------------------------------------------------


def test_a_call_needs_one_torch_kernel(emulated):
    """Masks go over as bytes and the extension builds its key order and base-2 lse itself: around the
    extension's launches (preparation + attention), a call runs only the head mean."""
    B, H, Hkv, N, d = 2, 4, 2, 70, 64
    q, k, v = _qkv(B, H, Hkv, N, d, torch.float16)
    mask = padding_mask(B, N, "both").cpu()
    unmasked = _unmasked(B, N, "random")
    lse = oracle_lse(q, k, mask).float()
    with DeviceOpLog() as valid:
        _cuda.valid_attention(q, k, v, unmasked, mask, d**-0.5, True, True)
    with DeviceOpLog() as influence:
        _cuda.influence_sum(q, k, lse, mask, unmasked, d**-0.5)
    assert valid.ops == ["aten.mean.dim"] and influence.ops == ["aten.mean.dim"], (valid.ops, influence.ops)


# --- greedy order ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "R,step_size,block_size,block_mode,mode",
    [(37, 1, None, "global", mode) for mode in MODES]
    + [(70, 3, 32, "within", MODES[0]), (300, 2, 64, "global", MODES[0])],
)
def test_greedy_order_matches_reference(emulated, monkeypatch, mode, R, step_size, block_size, block_mode):
    _set_mode(monkeypatch, mode)
    B = 2
    gen = torch.Generator().manual_seed(R)
    abar_rr = torch.rand(B, R, R, generator=gen)
    s0 = torch.rand(B, R, generator=gen)
    s0[0, 5] = float("nan")  # counts as -inf: still picked, last
    s0[1, :4] = 0.5  # ties: lowest position first
    valid = torch.rand(B, R, generator=gen) < 0.8
    with poisoned_outputs():
        steps = _cuda.greedy_order(abar_rr, s0, valid, step_size, block_size, block_mode)
    expected = reference_ordering.greedy_order(abar_rr, s0, valid, step_size, block_size, block_mode)
    assert torch.equal(steps, expected)


# --- the emulator catches what it should ----------------------------------------------------------------------


def _mutant(build, text: str, tag: str) -> Path:
    """The emulated library with attention_stats.cu replaced by ``text`` (the other objects reused)."""
    _, objects, directory = build
    directory = directory / tag
    directory.mkdir()
    obj = _compile(_kernel_file(directory, "attention_stats.cu", text), directory, "-O1")
    return _link([obj, *(o for stem, o in objects.items() if stem != "attention_stats")], directory)


_CHILD = """
import contextlib, sys, torch
sys.path.insert(0, sys.argv[1])
from test_cuda_emulated import load
from agdo_kernels import _cuda
_cuda._extension = load(sys.argv[2])
_cuda._launch_target = lambda device: (contextlib.nullcontext(), 0, 0)
q, k, v, unmasked = torch.load(sys.argv[3])
try:
    s, out, _ = _cuda.valid_attention(q, k, v, unmasked, None, q.shape[-1] ** -0.5, True, False)
except RuntimeError as err:
    print(err)
    sys.exit(3)
torch.save((s, out), sys.argv[4])
"""


def _valid_attention_in_child(library: Path, inputs, tmp_path, env):
    """``(s, out)`` or the error message of valid_attention on ``library``, run in a fresh process (see load)."""
    torch.save(inputs, tmp_path / "inputs.pt")
    result = subprocess.run(
        [sys.executable, "-c", _CHILD, str(ROOT / "tests"), str(library), str(tmp_path / "inputs.pt"),
         str(tmp_path / "outputs.pt")],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    if result.returncode == 3:
        return result.stdout
    assert result.returncode == 0, result.stderr[-4000:]
    return torch.load(tmp_path / "outputs.pt")


# Bugs planted in attention_stats.cu: (text replaced, its replacement, head dim, what must show: an error, or
# None for results that differ from the unplanted kernel's), under the default mode (copies land when issued,
# the lowest warp runs first) unless MUTANT_MODES names another.
MUTANTS = {
    # the first warp loads the next K tile while the others still read this one
    "missing_barrier": ("    __syncthreads();  // every warp is done with this K tile\n", "", 64, None),
    # the loop waits for one copy group too few: this block's K tile may still be in flight when read
    "missing_wait": ("      cp_async_wait<1>();  // K of this block",
                     "      cp_async_wait<2>();  // K of this block", 64, None),
    # one row short: the last row of the V tile lies past the end of the dynamic shared memory
    "shared_one_row_short": ("(OUTPUT ? 3 : 2) * kTile * kLd * static_cast<int>(sizeof(T));",
                             "((OUTPUT ? 3 : 2) * kTile - 1) * kLd * static_cast<int>(sizeof(T));",
                             64, r"cudaErrorIllegalAddress.*outside the \d+ bytes of dynamic shared memory"),
    # 52 KB of shared memory at d = 128 without opting in past 48 KiB
    "no_shared_opt_in": ("cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, shared_bytes)",
                         "cudaSuccess", 128, r"valid_attention kernel launch: cudaErrorInvalidValue"),
    # lane 5 of each warp leaves before the warp-wide instructions
    "lane_exits": ("  const int lane = threadIdx.x & 31;\n",
                   "  const int lane = threadIdx.x & 31;\n  if (lane == 5) return;\n", 64,
                   r"cudaErrorIllegalAddress.*deadlock: 0 threads wait at __syncthreads, 124 at a warp-wide .* "
                   r"4 finished"),
}  # fmt: skip
MUTANT_MODES = {"missing_wait": ("late", "ascending")}  # copies that land at issue hide a missing wait


@pytest.mark.parametrize("mutant", MUTANTS)
def test_emulator_catches_planted_bugs(build, emulated, monkeypatch, tmp_path, mutant):
    old, new, d, error = MUTANTS[mutant]
    original = (ROOT / "csrc" / "attention_stats.cu").read_text()
    assert old in original, "the mutated line moved: update MUTANTS"
    library = _mutant(build, original.replace(old, new, 1), mutant)
    q, k, v = _qkv(1, 2, 1, 150, d, torch.float16, seed=7)
    inputs = (q.contiguous(), k.contiguous(), v.contiguous(), _unmasked(1, 150, "random"))
    _set_mode(monkeypatch, MUTANT_MODES.get(mutant, MODES[0]))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}

    result = _valid_attention_in_child(library, inputs, tmp_path, env)

    if error is None:
        s, out, _ = _cuda.valid_attention(*inputs[:3], inputs[3], None, d**-0.5, True, False)
        assert not isinstance(result, str), result
        assert not (torch.equal(result[0], s) and torch.equal(result[1], out))
    else:
        assert isinstance(result, str) and re.search(error, result), result


@pytest.mark.parametrize("variable,message", [("CUDA_EMULATOR_COPIES", "'eager' or 'late'"),
                                              ("CUDA_EMULATOR_ORDER", "'ascending' or 'descending'")])  # fmt: skip
def test_emulator_modes_are_checked(emulated, monkeypatch, variable, message):
    monkeypatch.setenv(variable, "sometimes")
    q, k, v = _qkv(1, 1, 1, 8, 64, torch.float16)
    with pytest.raises(ValueError, match=f"{variable} must be {message}, not 'sometimes'"):
        _cuda.valid_attention(q, k, v, None, None, 0.125, True, False)


def test_translation_rewrites_every_launch():
    text = (ROOT / "csrc" / "greedy_order.cu").read_text()
    translated = translate(text)
    assert translated.count("::cuda_emulator::launch(") == text.count("<<<")
    with pytest.raises(AssertionError, match="untranslated"):
        translate("__global__ void k() {}\nvoid f() { k<<<1, 32>>>(; }")

"""CI check of ``bench/compile_report.py`` (no GPU): the pinned configs compile for sm_90 without spills, and
Triton's S+O stays within 1.10x of its FlashAttention floor.

The report runs in a subprocess without ``TRITON_INTERPRET`` (the interpreter replaces the kernels by Python
functions, so there would be nothing to compile). Cost: about a dozen ahead-of-time compiles.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import compile_report
import pytest

REPORT = Path(compile_report.__file__)


def _toolchain_missing():
    try:
        from triton import knobs
        from triton.backends.nvidia.compiler import get_ptxas_version

        get_ptxas_version(90)
        subprocess.run([knobs.nvidia.cuobjdump.path, "--version"], check=True, capture_output=True)
    except (ImportError, OSError, RuntimeError, subprocess.CalledProcessError) as err:
        return f"triton's NVIDIA backend (ptxas, cuobjdump) is not usable here: {err!r}"
    return None


TOOLCHAIN_MISSING = _toolchain_missing()
pytestmark = pytest.mark.skipif(TOOLCHAIN_MISSING is not None, reason=str(TOOLCHAIN_MISSING))


def run_report(tmp_path, *args) -> tuple[list[dict], str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    rows, table = tmp_path / "rows.json", tmp_path / "table.md"
    done = subprocess.run([sys.executable, str(REPORT), *args, "--json", str(rows), "--out", str(table)],
                          check=False, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-5000:]
    return json.loads(rows.read_text()), table.read_text()


@pytest.fixture(scope="module")
def pinned_sm90(tmp_path_factory):
    """Every kernel's pinned config for sm_90, bf16, head dim 128, with and without a key mask (valid_attention
    also as its FlashAttention floor, influence also as its warp-specialised variant)."""
    pinned = tmp_path_factory.mktemp("pinned")
    return run_report(pinned, "--arch", "90", "--dtype", "bf16", "--head-dim", "128", "--warp-specialize")


def _spills(row):
    return row["spill_store_bytes"] + row["spill_load_bytes"]


def test_pinned_configs_do_not_spill(pinned_sm90):
    rows, _ = pinned_sm90
    spilling = [row for row in rows if _spills(row)]
    assert not spilling, "register spills in shipped configs:\n" + "\n".join(
        f"{row['case']}:\n{row['ptxas_log']}" for row in spilling
    )
    assert all(row["shared_bytes"] <= compile_report.SHARED_LIMIT[90] for row in rows)


@pytest.fixture(scope="module", params=[("fp32", "128"), ("bf16", "256")], ids=["fp32-d128", "bf16-d256"])
def pinned_sm90_edges(request, tmp_path_factory):
    """The shipped extremes beside bf16 at head dim 128: float32 (tf32x3 dots, the largest head dim it may
    take) and the largest head dim. float32 above 128 is refused by the launchers, so it has nothing to ship."""
    dtype, head_dim = request.param
    rows, table = run_report(tmp_path_factory.mktemp(f"{dtype}-{head_dim}"), "--arch", "90", "--dtype", dtype,
                             "--head-dim", head_dim, "--no-floor",
                             "--kernel", "valid_attention", "influence", "response_block")  # fmt: skip
    return dtype, rows, table


def test_edge_configs_fit_and_keep_spills_out_of_the_hot_loop(pinned_sm90_edges):
    """Every pinned sm_90 config fits a block's shared memory and has no spill code in its hot loop; fp16/bf16
    spill nowhere. float32's tf32x3 at head dim 128 keeps under 1 KiB of spills outside the loop (544 B in
    valid_attention; no tile of the sweep in bench/RESULTS.md spills nothing)."""
    dtype, rows, table = pinned_sm90_edges
    assert len(rows) == 6, table  # 3 kernels x key mask off/on
    assert all(row["shared_bytes"] <= compile_report.SHARED_LIMIT[90] for row in rows), table
    assert all(row["loop_instructions"] > 0 and row["loop_classes"]["LDL/STL"] == 0 for row in rows), table
    allowed = 1024 if dtype == "fp32" else 0
    assert all(row["spill_store_bytes"] <= allowed and row["spill_load_bytes"] <= allowed for row in rows), table


def test_refused_float32_head_dims_have_no_cases(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # compiled, as in the report's subprocess
    found = compile_report.cases(arches=[90], dtypes=["fp32"], head_dims=[128, 256], kernels=["influence"],
                                 all_configs=False, floors=False, max_registers=None)  # fmt: skip
    assert {case.head_dim for case in found} == {128}


def test_influence_is_warp_specialised_on_hopper(pinned_sm90):
    """The opt-in variant (``agdo_kernels.set_warp_specialize``) really is specialised: its 4 warps compile to
    12 (a TMA producer group and two consumer groups); a Triton that stops doing so fails here."""
    rows, table = pinned_sm90
    specialised = [row for row in rows if row["case"]["warp_specialize"]]
    assert len(specialised) == 2, table
    assert all(row["warps_run"] == 3 * row["case"]["config"][2] == 12 for row in specialised), table


def test_valid_attention_meets_the_floor_target(pinned_sm90):
    """Triton's S+O on sm_90: a key block issues at most 1.10x the floor's instructions, except the one block
    per row where U ends (the longest path). The shortest path is a block all in U; a block outside U issues 2
    instructions more (the test that it is not the block where U ends), hence the + 2."""
    rows, table = pinned_sm90
    attention = [row for row in rows if row["case"]["kernel"] == "valid_attention"]
    floors = {row["case"]["key_mask"]: row for row in attention if row["case"]["floor"]}
    shipped = [row for row in attention if not row["case"]["floor"]]
    assert len(shipped) == len(floors) == 2, table
    for row in shipped:
        floor = floors[row["case"]["key_mask"]]["loop_paths"][0]
        assert floor > 0 and row["loop_paths"][0] + 2 <= 1.10 * floor, table


def test_report_table_renders(pinned_sm90):
    rows, table = pinned_sm90
    assert {row["case"]["kernel"] for row in rows} == set(compile_report.KERNELS)
    assert all(row["loop_instructions"] > 0 for row in rows), "a kernel's hot loop was not found in its SASS"
    lines = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(lines) == len(rows) + 1  # the header, then one row per compile


def test_floor_ratio_in_table():
    def result(floor, loop_instructions):
        case = compile_report.Case("valid_attention", 90, "bf16", 128, False, (128, 64, 8, 3), True, floor)
        return compile_report.Result(case, 228, 0, 0, 0, 131072, loop_instructions,
                                     compile_report.instruction_classes([]))  # fmt: skip

    table = compile_report.render_table([result(False, 550), result(True, 500)])
    s_row, floor_row = (line.split(" | ") for line in table.splitlines() if line.startswith("| valid_attention"))
    assert s_row[10] == "1.10x" and floor_row[0] == "| valid_attention floor (no S)" and floor_row[10] == "—"
    assert s_row[9] == "550" and floor_row[9] == "500"  # per tile: no paths known, the whole body

    branchy = replace(result(False, 560), loop_paths=(520, 560))
    s_row = next(line.split(" | ") for line in compile_report.render_table([branchy, result(True, 500)]).splitlines()
                 if line.startswith("| valid_attention |"))  # fmt: skip
    assert s_row[8:11] == ["560", "520-560", "1.04-1.12x"]


def test_spills_are_detected(tmp_path):
    """Capped at 32 registers the greedy kernel (71 unconstrained) must spill: the parser would see it."""
    rows, table = run_report(tmp_path, "--arch", "90", "--kernel", "greedy_order", "--max-registers", "32")
    (row,) = rows
    assert row["registers"] <= 32 and row["spill_store_bytes"] > 0 and row["spill_load_bytes"] > 0, row["ptxas_log"]
    assert row["loop_classes"]["LDL/STL"] > 0
    assert f"**{row['spill_store_bytes']}/{row['spill_load_bytes']}**" in table


def test_ptxas_report_parsing():
    log = (
        "ptxas info    : Function properties for _valid_attention_kernel\n"
        "    10448 bytes stack frame, 34246 bytes spill stores, 38592 bytes spill loads\n"
        "ptxas info    : Used 32 registers, used 1 barriers, 10448 bytes cumulative stack size\n"
    )
    assert compile_report.ptxas_usage(log) == {
        "registers": 32, "stack_bytes": 10448, "spill_store_bytes": 34246, "spill_load_bytes": 38592
    }  # fmt: skip
    with pytest.raises(ValueError):
        compile_report.ptxas_usage("ptxas fatal : Ptx assembly aborted due to errors")


def test_loop_paths_follow_the_branches_inside_the_loop():
    """Shortest and longest iteration: a predicated forward branch skips 0x50-0x60 (or not), a nested spin loop
    counts once, a branch out of the loop (0x90) is not an iteration."""
    sass = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   MUFU.EX2 R3, R2 ;
        /*0020*/                   SYNCS.PHASECHK.TRANS64 P0, [UR4], R5 ;
        /*0030*/              @!P0 BRA 0x20 ;
        /*0040*/               @P1 BRA 0x70 ;
        /*0050*/                   FMUL R4, R3, R3 ;
        /*0060*/                   FADD R4, R4, R3 ;
        /*0070*/               @P2 BRA 0xb0 ;
        /*0080*/                   IADD3 R6, R6, 0x1, RZ ;
        /*0090*/              @!P3 BRA 0x10 ;
        /*00a0*/                   EXIT ;
        /*00b0*/                   BRA 0xb0;
    """
    assert len(compile_report.hot_loop(sass, "MUFU.EX2")) == 9
    assert compile_report.loop_paths(sass, "MUFU.EX2") == (7, 9)
    assert compile_report.loop_paths(sass, "LDL") == (0, 0)
    straight = "\n".join(line for line in sass.splitlines() if "@P1 BRA" not in line)
    assert compile_report.loop_paths(straight, "MUFU.EX2") == (8, 8)


def test_hot_loop_is_the_innermost_loop_with_the_marker():
    sass = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   LDG.E R2, desc[UR4][R4.64] ;
        /*0020*/                   MUFU.EX2 R3, R2 ;
        /*0030*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ ;
        /*0040*/                   SYNCS.PHASECHK.TRANS64 P0, [UR4], R5 ;
        /*0050*/              @!P0 BRA 0x40 ;
        /*0060*/               @P1 BRA 0x10 ;
        /*0070*/                   EXIT ;
        /*0080*/                   BRA 0x80;
    """
    assert compile_report.hot_loop(sass, "MUFU.EX2") == [
        "LDG.E", "MUFU.EX2", "HGMMA.64x64x16.F32.BF16", "SYNCS.PHASECHK.TRANS64", "BRA", "BRA"
    ]  # fmt: skip
    assert compile_report.hot_loop(sass, "LDL") == []
    assert compile_report.instruction_classes(compile_report.hot_loop(sass, "MUFU.EX2"))["MMA"] == 1


@pytest.mark.skipif(compile_report.nvcc_path() is None, reason="nvcc not found (CUDA_HOME, CUDA_PATH, PATH)")
def test_cuda_kernels_meet_the_floor_target():
    """csrc/attention_stats.cu on sm_90: no local memory, and S+O issues at most 1.10x the instructions of the
    same kernel without S (reading the keys in place) on every steady key tile that loads the next one: all but
    the last tile and the one where U ends."""
    results = compile_report.compile_cuda(90)
    assert len(results) == 12  # (fp16, bf16) x (64, 128) x (S, S+O, influence)
    table = compile_report.render_cuda_table(results)
    print("\n" + table)
    assert all(r.stack_bytes == r.local_bytes == 0 and r.loop_classes["LDL/STL"] == 0 for r in results), table
    assert all(r.loop_paths[0] > 0 and r.loop_classes["MMA"] > 0 for r in results), "a hot loop was not found"
    with_output = [r for r in results if r.kernel == "valid_attention S+O"]
    assert len(with_output) == 4 and all(r.loop_paths[1] <= 1.10 * r.floor_paths[1] for r in with_output), table


def test_cuda_floor_source_cuts_every_s_line():
    text = compile_report.CUDA_SOURCE.read_text()
    floor = compile_report.cuda_floor_source(text)
    assert "tile_u_sum(block_u" not in floor and "u * inverse" not in floor and "key = order[" not in floor
    with pytest.raises(ValueError, match="no longer has the S line"):
        compile_report.cuda_floor_source(floor)
    steady = compile_report.cuda_steady_source(text)
    assert "if (real_in_tile < kTile)" not in steady and "if (in_u <= 0)" not in steady
    with pytest.raises(ValueError, match="no longer has the edge line"):
        compile_report.cuda_steady_source(steady)

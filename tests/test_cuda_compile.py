"""Compile-only check of the CUDA extension's kernels (no GPU): ptxas -v for sm_80 and sm_90, no register spills.

One nvcc run per source file builds both architectures (what setup.py ships) and prints ptxas' per-kernel
report; the test parses it per (kernel, arch), fails on any spill store/load, and prints registers, stack and
shared memory (``pytest -s`` shows the table). Skipped without nvcc. Cost on a 2-core CI runner: ~10 s for
attention_stats.cu and ~3 s for greedy_order.cu.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ARCHS = ("sm_80", "sm_90")


def _nvcc():
    import os

    for candidate in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if candidate and (Path(candidate) / "bin" / "nvcc").is_file():
            return str(Path(candidate) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.is_file() else None


NVCC = _nvcc()
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found (CUDA_HOME, CUDA_PATH, PATH, /usr/local/cuda)")

_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


def ptxas_report(log: str) -> dict:
    """``{(kernel, arch): {"registers", "stack", "spill_stores", "spill_loads", "static_smem"}}`` from ptxas -v."""
    report = {}
    current = None
    for line in log.splitlines():
        entry = _ENTRY.search(line)
        if entry:
            current = (entry.group(1), entry.group(2))
            report[current] = {"registers": None, "stack": None, "spill_stores": None, "spill_loads": None,
                               "static_smem": 0}  # fmt: skip
            continue
        if current is None:
            continue
        frame = _FRAME.search(line)
        if frame:
            stack, stores, loads = map(int, frame.groups())
            report[current].update(stack=stack, spill_stores=stores, spill_loads=loads)
        used = _USED.search(line)
        if used:
            report[current]["registers"] = int(used.group(1))
            smem = _SMEM.search(line)
            report[current]["static_smem"] = int(smem.group(1)) if smem else 0
    return report


def _short_name(mangled: str) -> str:
    """``valid_attention_kernel<bf16, 128, out>``-like names from the mangled ones (for the table only)."""
    kernels = "valid_attention_kernel|influence_kernel|greedy_rank_kernel|key_order_kernel|counted_rows_kernel"
    kernel = re.search(rf"({kernels})(?:I|E)", mangled)
    name = kernel.group(1) if kernel else mangled
    args = re.findall(r"(__half|__nv_bfloat16|Li(\d+)E|Lb([01])E)", mangled[mangled.find(name) :] if kernel else "")
    parts = []
    for whole, number, flag in args:
        if whole in ("__half", "__nv_bfloat16"):
            parts.append("fp16" if whole == "__half" else "bf16")
        elif number:
            parts.append(number)
        else:
            labels = ("S-in-smem", "S-in-regs") if name == "greedy_rank_kernel" else ("out", "no-out")
            parts.append(labels[0] if flag == "1" else labels[1])
    return f"{name}<{', '.join(parts)}>" if parts else name


def compile_report(source: str, tmp_path: Path) -> dict:
    command = [NVCC, "-c", source, "-o", str(tmp_path / (Path(source).stem + ".o")), "-O3", "-std=c++17", "-Icsrc",
               "-Xptxas", "-v"] + [f"-gencode=arch=compute_{a[3:]},code={a}" for a in ARCHS]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-5000:]
    return ptxas_report(done.stdout + done.stderr)


def _table(report: dict) -> str:
    rows = [f"{'kernel':<46} {'arch':<6} {'regs':>5} {'stack':>6} {'spill st/ld':>12} {'static smem':>12}"]
    for (kernel, arch), usage in sorted(report.items(), key=lambda item: (_short_name(item[0][0]), item[0][1])):
        rows.append(
            f"{_short_name(kernel):<46} {arch:<6} {usage['registers']:>5} {usage['stack']:>6} "
            f"{usage['spill_stores']:>5}/{usage['spill_loads']:<6} {usage['static_smem']:>12}"
        )
    return "\n".join(rows)


# Every kernel instantiated by the launchers: (dtype x head dim x output) + (dtype x head dim) per arch, and the
# two preparation kernels (key order; base-2 lse and extent).
EXPECTED_KERNELS = {"csrc/attention_stats.cu": 14, "csrc/greedy_order.cu": 7}


@pytest.mark.parametrize("source", sorted(EXPECTED_KERNELS))
def test_kernels_compile_without_spills(source, tmp_path):
    report = compile_report(source, tmp_path)
    print(f"\n{source} (ptxas -v; dynamic shared memory is set at launch)\n{_table(report)}")
    for arch in ARCHS:
        kernels = [key for key in report if key[1] == arch]
        assert len(kernels) == EXPECTED_KERNELS[source], (arch, sorted(report))
    incomplete = [key for key, usage in report.items() if None in usage.values()]
    assert not incomplete, f"ptxas report without register/spill lines for {incomplete}"
    spilling = [f"{_short_name(k)} {a}: {u['spill_stores']} B stores, {u['spill_loads']} B loads"
                for (k, a), u in report.items() if u["spill_stores"] or u["spill_loads"]]  # fmt: skip
    assert not spilling, "register spills:\n" + "\n".join(spilling)


def test_report_parser():
    log = """ptxas info    : Compiling entry function '_Z3fooILi128EEvv' for 'sm_90'
ptxas info    : Function properties for _Z3fooILi128EEvv
    8 bytes stack frame, 12 bytes spill stores, 16 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 8 bytes cumulative stack size, 512 bytes smem
"""
    assert ptxas_report(log) == {("_Z3fooILi128EEvv", "sm_90"): {"registers": 40, "stack": 8, "spill_stores": 12,
                                                                 "spill_loads": 16, "static_smem": 512}}  # fmt: skip

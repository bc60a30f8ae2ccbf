"""Benchmark plumbing: time with pytest-benchmark, record peak memory, print ratios side by side.

Every benchmark calls ``measure(fn, group=..., impl=..., baseline=...)``. At the end of the run a table
per group shows each implementation's median time, its ratio to the group's baseline and its peak
memory (CUDA: the allocator's peak above what was allocated before the call; CPU: not measured — the
resident set hides reuse of freed memory). ``--bench-report FILE`` also writes the table as Markdown,
ready for bench/RESULTS.md; it is rewritten after every measured case, so a run cut short by a time limit
keeps the tables of what finished.
"""

from __future__ import annotations

import platform
from collections import defaultdict

import pytest
import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
_RESULTS: list[dict] = []
_REPORT_PATH: list = [None]  # --bench-report, set at configure time


def pytest_addoption(parser):
    parser.addoption("--bench-report", default=None, help="write the ratio tables as Markdown to this file")


def pytest_configure(config):
    _REPORT_PATH[0] = config.getoption("--bench-report")


def sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _peak_mib(fn):
    """CUDA allocator peak of one call above what was allocated before it; None on CPU, where the
    resident set hides reuse of freed memory and torch keeps no peak counter."""
    if DEVICE.type != "cuda":
        return None
    sync()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    sync()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


@pytest.fixture
def measure(benchmark):
    def run(fn, *, group: str, impl: str, baseline: bool = False, rounds: int = 5, note=None, **info):
        """``note``: a string, or a callable giving one after the timed rounds (shown in the table)."""
        def timed():
            out = fn()
            sync()
            return out

        timed()  # warm-up first: compilation and autotuning are not part of the peak
        peak = _peak_mib(timed)  # a second untimed call: the timed rounds start warm
        benchmark.group = group
        benchmark.extra_info.update(info, impl=impl, baseline=baseline, peak_mib=peak, device=str(DEVICE))
        benchmark.pedantic(timed, rounds=rounds, warmup_rounds=0, iterations=1)
        if benchmark.disabled:  # --benchmark-disable: ran once as a smoke test, nothing timed
            return
        _RESULTS.append(
            dict(group=group, impl=impl, baseline=baseline, median_ms=benchmark.stats.stats.median * 1e3, peak_mib=peak,
                 note=note() if callable(note) else note)
        )
        _write_report()

    return run


def _tables() -> list[str]:
    groups = defaultdict(list)
    for row in _RESULTS:
        groups[row["group"]].append(row)
    device = torch.cuda.get_device_name() if DEVICE.type == "cuda" else platform.processor() or "cpu"
    lines = [f"device: {device}, torch {torch.__version__}", ""]
    for group, rows in groups.items():
        base = next((r for r in rows if r["baseline"]), None)
        noted = any(r["note"] for r in rows)
        header = "| impl | median ms | time / baseline | peak MiB |" + (" note |" if noted else "")
        lines += [f"### {group}", "", header, "|---|---|---|---|" + ("---|" if noted else "")]
        for r in rows:
            ratio = f"{r['median_ms'] / base['median_ms']:.2f}x" if base else "-"
            peak = "not measured" if r["peak_mib"] is None else f"{r['peak_mib']:.1f}"
            mark = " (baseline)" if r["baseline"] else ""
            note = f" {r['note'] or ''} |" if noted else ""
            lines.append(f"| {r['impl']}{mark} | {r['median_ms']:.3f} | {ratio} | {peak} |{note}")
        lines.append("")
    return lines


def _write_report():
    if _REPORT_PATH[0]:
        with open(_REPORT_PATH[0], "w") as handle:
            handle.write("\n".join(_tables()) + "\n")


def pytest_terminal_summary(terminalreporter, config):
    if not _RESULTS:
        return
    terminalreporter.section("agdo: side-by-side ratios")
    for line in _tables():
        terminalreporter.write_line(line)

"""The papers' result tables as commands: ``agdo table --config configs/tables/<name>.yaml models=...``.

Each :class:`PaperTable` fixes what the paper measured — rows (a model and optionally a decoding rule),
columns (benchmark and decoding settings), the shared decoding settings of its evaluation — and the
paper's own numbers. :func:`run_table` evaluates every cell it can with :func:`agdo.eval.evaluate`
(mean over seeds) and prints the table in the paper's shape, ``ours (paper)`` per cell; a cell whose
benchmark is not in ``../shared/data`` (LiveBench, LiveCodeBench, Countdown's test set) or whose row has no
model given shows the paper's number only. Models are trained with the recipes under ``configs/`` (each
table's YAML says which recipe makes which row).

Sources: AGDO ACL version (``papers/000_…``) Tables 1, 2, 3, 4, 6 (App. A); AGDO arXiv version
(``papers/001_…``) Tables 5, 6, 7 (ablations); MDPO (``papers/003_…``) Table 2.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import NamedTuple, Optional

# AGDO §6.1: "a static decoding strategy with a sampling temperature of 0.1, unmasking one token per
# denoising step, and a maximum response length of 1,024 tokens"; "repeated 8 times". Block length: not in
# the paper (32, as configs/eval/math.yaml).
AGDO_DECODING = dict(temperature=0.1, block_length=32, seeds=8, alg="max_prob", candidate_threshold=0.9)
# MDPO Table 2: greedy decoding, LLaDA's linear schedule, low-confidence remasking unless "+ RCR".
MDPO_DECODING = dict(temperature=0.0, seeds=1, alg="max_prob", candidate_threshold=0.9)


class Row(NamedTuple):
    model: str  # key into TableConfig.models
    alg: Optional[str] = None  # decoding rule of this row (None: the table's)


class PaperTable(NamedTuple):
    title: str
    source: str
    rows: dict  # label -> Row
    columns: dict  # label -> eval settings (benchmark, gen_length, steps, block_length, ...)
    paper: dict  # row label -> list of the paper's numbers, one per column
    decoding: dict


def _math(length, **extra):
    return dict(benchmark="math500", gen_length=length, steps=length, **extra)


def _same_model(model: str, algs: dict) -> dict:
    return {label: Row(model, alg) for label, alg in algs.items()}


def _models(*keys: str) -> dict:
    return {key: Row(key) for key in keys}


DREAM_MAIN = dict(GSM8K=dict(benchmark="gsm8k"), MATH500=dict(benchmark="math500"), Minerva=dict(benchmark="minerva"),
                  LiveBench=dict(benchmark=None), **{"LiveCodeBench-v2": dict(benchmark=None)})
MDPO_COLUMNS = {f"block {block}, {steps} steps": dict(benchmark="math500", gen_length=512, steps=steps, block_length=block)
                for block in (128, 512) for steps in (64, 128, 256)}

TABLES = {
    "agdo_table1": PaperTable(
        "Max-Prob vs Max-S on MATH-500 (Dream-v0-Instruct-7B), static decoding", "AGDO Table 1",
        _same_model("model", {"Max-Prob": "max_prob", "Max-S": "max_s"}),
        {str(n): _math(n) for n in (128, 256, 512)},
        {"Max-Prob": [16.8, 13.8, 13.0], "Max-S": [21.2, 16.2, 15.2]}, AGDO_DECODING),
    "agdo_table6_llada": PaperTable(
        "Max-Prob vs pure Max-S (threshold 0) on MATH-500 (LLaDA-8B-Instruct)", "AGDO Table 6 (App. A)",
        _same_model("model", {"Max-Prob": "max_prob", "Max-S": "max_s"}),
        {str(n): _math(n) for n in (128, 256, 512)},
        {"Max-Prob": [19.9, 23.8, 16.1], "Max-S": [28.5, 30.3, 32.7]}, {**AGDO_DECODING, "candidate_threshold": 0.0}),
    "agdo_table2": PaperTable(
        "Main results on Dream-v0-Instruct-7B (1,024 tokens, one token per step)", "AGDO Table 2",
        _models("Dream-v0-Instruct-7B", "SFT", "blockwise SFT", "AGDO-SFT", "Diff-GRPO", "Coupled RL", "TraceRL",
                "AGDO-RL", "AGDO"),
        {label: {**settings, "gen_length": 1024, "steps": 1024} for label, settings in DREAM_MAIN.items()},
        {"Dream-v0-Instruct-7B": [69.4, 38.9, 11.6, 10.7, 10.7], "SFT": [83.5, 48.3, 14.8, 11.3, 11.5],
         "blockwise SFT": [86.0, 51.7, 12.3, 10.2, 11.8], "AGDO-SFT": [85.3, 53.7, 15.3, 12.5, 13.1],
         "Diff-GRPO": [85.0, 45.5, 15.3, 15.2, 13.9], "Coupled RL": [86.1, 48.8, 14.1, 13.8, 11.8],
         "TraceRL": [86.3, 52.8, 16.4, 14.0, 13.0], "AGDO-RL": [87.7, 53.7, 16.1, 18.3, 14.7],
         "AGDO": [86.9, 56.2, 17.0, 18.4, 15.6]}, AGDO_DECODING),
    "agdo_table3": PaperTable(
        "Block sizes on MATH-500 at 512 tokens (Dream-v0-Instruct-7B)", "AGDO Table 3",
        _models("SFT", "Blockwise SFT", "AGDO-SFT", "Diff-GRPO", "Coupled RL", "TraceRL", "AGDO-RL", "AGDO"),
        {str(b): _math(512, block_length=b) for b in (8, 16, 32, 64, 128)},
        {"SFT": [48.4, 48.2, 48.7, 49.9, 50.5], "Blockwise SFT": [43.9, 46.3, 46.3, 45.5, 46.9],
         "AGDO-SFT": [49.1, 48.5, 50.2, 50.5, 49.7], "Diff-GRPO": [43.9, 43.5, 45.5, 46.9, 45.9],
         "Coupled RL": [47.1, 48.4, 49.2, 49.6, 51.5], "TraceRL": [47.5, 50.5, 50.3, 52.9, 51.9],
         "AGDO-RL": [48.0, 50.6, 53.3, 53.7, 52.3], "AGDO": [51.5, 52.8, 53.4, 53.9, 53.6]}, AGDO_DECODING),
    "agdo_table4": PaperTable(
        "Results on LLaDA-8B-Instruct (1,024 tokens, one token per step)", "AGDO Table 4",
        _models("LLaDA", "SFT", "Blockwise SFT", "AGDO-SFT", "d1-LLaDA", "wd1", "LLaDA-1.5", "AGDO"),
        {"GSM8K": dict(benchmark="gsm8k", gen_length=1024, steps=1024),
         "MATH500": dict(benchmark="math500", gen_length=1024, steps=1024)},
        {"LLaDA": [81.5, 38.7], "SFT": [82.1, 38.3], "Blockwise SFT": [82.3, 38.4], "AGDO-SFT": [83.3, 39.6],
         "d1-LLaDA": [82.1, 40.2], "wd1": [82.3, 39.0], "LLaDA-1.5": [83.3, 42.6], "AGDO": [85.3, 42.8]},
        AGDO_DECODING),
    "agdo_arxiv_table5_layers": PaperTable(
        "AGDO-SFT with the attention of different layers, MATH-500 (Dream)", "AGDO arXiv Table 5",
        _models("First Layer", "Middle Layer", "Last Layer (Ours)"),
        {"MATH500": dict(benchmark="math500", gen_length=1024, steps=1024)},
        {"First Layer": [48.8], "Middle Layer": [52.5], "Last Layer (Ours)": [53.7]}, AGDO_DECODING),
    "agdo_arxiv_table6_heads": PaperTable(
        "AGDO-SFT with different head aggregations, MATH-500 (Dream)", "AGDO arXiv Table 6",
        _models("Local-focused heads", "Global-focused heads", "All heads (Ours)"),
        {"MATH500": dict(benchmark="math500", gen_length=1024, steps=1024)},
        {"Local-focused heads": [53.0], "Global-focused heads": [52.2], "All heads (Ours)": [53.7]}, AGDO_DECODING),
    "agdo_arxiv_table7_order_weight": PaperTable(
        "Order vs weighting, MATH-500 (Dream)", "AGDO arXiv Table 7",
        _models("Blockwise SFT (Baseline)", "Order Only", "Weight Only (random order)",
                "Random Weight (random order)", "Order + Weight (Ours)"),
        {"MATH500": dict(benchmark="math500", gen_length=1024, steps=1024)},
        {"Blockwise SFT (Baseline)": [51.7], "Order Only": [52.7], "Weight Only (random order)": [52.4],
         "Random Weight (random order)": [51.9], "Order + Weight (Ours)": [53.7]}, AGDO_DECODING),
    "mdpo_table2": PaperTable(
        "MDPO and RCR on MATH-500 at 512 tokens (LLaDA-8B-Instruct), block size x steps", "MDPO Table 2",
        {"LLaDA-8B-Instruct": Row("LLaDA-8B-Instruct"), "+ SFT": Row("+ SFT"), "+ diffu-GRPO": Row("+ diffu-GRPO"),
         "+ RCR (training-free)": Row("LLaDA-8B-Instruct", "rcr"), "+ MDPO": Row("+ MDPO"),
         "+ MDPO + RCR": Row("+ MDPO", "rcr")},
        MDPO_COLUMNS,
        {"LLaDA-8B-Instruct": [20.0, 36.2, 39.4, 20.0, 22.6, 18.2], "+ SFT": [18.0, 33.8, 41.8, 22.2, 24.6, 25.4],
         "+ diffu-GRPO": [23.8, 34.4, 40.2, 21.2, 26.2, 20.6], "+ RCR (training-free)": [25.4, 37.6, 40.8, 22.6, 22.6, 19.2],
         "+ MDPO": [26.2, 38.6, 42.8, 23.4, 25.2, 26.2], "+ MDPO + RCR": [30.4, 38.4, 44.2, 24.8, 24.0, 26.4]},
        MDPO_DECODING),
}


@dataclasses.dataclass
class TableConfig:
    """What ``agdo table`` runs: one paper table, the model directory of each row's model key."""

    table: str = "agdo_table1"
    models: dict = dataclasses.field(default_factory=dict)  # model key -> local directory
    family: str = "auto"
    data_dir: Optional[str] = None
    limit: Optional[int] = None  # first N problems of each benchmark (a quick look; not the paper's numbers)
    seeds: Optional[list[int]] = None  # None: the table's (AGDO: 8 seeds; MDPO: greedy, 1)
    # Block KV cache of every cell's decoding: none (exact, the papers' setting) | prefix | dual (Fast-dLLM's
    # approximations; agdo.sampling).
    cache: str = "none"
    cache_lookahead: Optional[int] = None  # prefix cache: positions after the block recomputed (None: all)
    batch_size: int = 8
    output_dir: str = "runs/tables"

    def __post_init__(self):
        from .config import coerce_fields

        coerce_fields(self)
        if self.table not in TABLES:
            raise ValueError(f"TableConfig: unknown `table` {self.table!r}; available: {list(TABLES)}")
        if not isinstance(self.models, dict) or not all(isinstance(v, str) for v in self.models.values()):
            raise ValueError("TableConfig: `models` must map model keys to directories, e.g. models={model: path}")
        keys = {row.model for row in TABLES[self.table].rows.values()}
        unknown = sorted(set(self.models) - keys)
        if unknown:
            raise ValueError(f"TableConfig: `models` has keys {unknown} that no row of {self.table} uses; its model "
                             f"keys: {sorted(keys)}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"TableConfig: `limit` must be >= 1 or null, got {self.limit}")
        if self.batch_size < 1:
            raise ValueError(f"TableConfig: `batch_size` must be >= 1, got {self.batch_size}")
        if self.seeds is not None and not self.seeds:
            raise ValueError("TableConfig: `seeds` is empty")
        table = TABLES[self.table]
        for label, row in table.rows.items():  # decoding settings (cache, cache_lookahead) checked per cell
            for column_label, column in table.columns.items():
                try:
                    _sampler(table, row, column, cache=self.cache, cache_lookahead=self.cache_lookahead)
                except ValueError as error:
                    raise ValueError(f"TableConfig (row {label!r}, column {column_label!r}): {error}") from None


def _sampler(table: PaperTable, row: Row, column: dict, *, cache: str = "none",
             cache_lookahead: Optional[int] = None):
    from .sampling import SamplerConfig

    decoding = table.decoding
    settings = {k: v for k, v in column.items() if k != "benchmark"}
    return SamplerConfig(**{"block_length": decoding.get("block_length"), **settings},
                         temperature=decoding["temperature"], alg=row.alg or decoding["alg"],
                         candidate_threshold=decoding["candidate_threshold"], cache=cache,
                         cache_lookahead=cache_lookahead)


def format_paper_table(table: PaperTable, ours: dict) -> str:
    """Markdown in the paper's shape: ``ours ± std (paper)`` per cell, ``— (paper)`` where not measured."""
    columns = list(table.columns)
    lines = [f"**{table.title}** ({table.source}); cells: ours (paper)", "",
             "| | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for label in table.rows:
        cells = []
        for column, paper in zip(columns, table.paper[label]):
            result = ours.get((label, column))
            mine = "—" if result is None else f"{result['mean']:.1f}" + (f" ± {result['std']:.1f}" if result["seeds"] > 1 else "")
            cells.append(f"{mine} ({paper:.1f})")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_table(config: TableConfig, *, adapters: Optional[dict] = None, accelerator=None) -> str:
    """Evaluate every cell that has a model and a benchmark; writes ``results.json`` and ``table.md``.

    With an ``accelerator`` (``accelerate launch``) each process decodes its share of every cell (as
    ``agdo.eval.run_eval`` does) and only the main process writes the files."""
    from .data import load_benchmark
    from .eval import evaluate, summarize
    from .models import load_adapter

    table = TABLES[config.table]
    adapters = dict(adapters or {})
    seeds = config.seeds or list(range(table.decoding["seeds"]))
    data = {}
    for column in table.columns.values():  # every benchmark is read before a model loads: bad data fails fast
        name = column["benchmark"]
        if name is not None and name not in data:
            data[name] = load_benchmark(name, config.data_dir)[: config.limit]
    ours = {}
    for label, row in table.rows.items():
        if row.model not in adapters:
            path = config.models.get(row.model)
            if path is None or not Path(path).is_dir():
                # The shipped configs list where every recipe writes its model; rows not trained yet are skipped.
                print(f"{config.table}: row {label!r}: " + (f"no model given for {row.model!r}" if path is None else
                      f"{path} is not a directory (not trained yet?)") + ": paper numbers only")
                continue
            adapters[row.model] = load_adapter(path, family=config.family)
            if accelerator is not None:
                adapters[row.model].model.to(accelerator.device)
        for column_label, column in table.columns.items():
            if column["benchmark"] is None:
                continue
            sampler = _sampler(table, row, column, cache=config.cache, cache_lookahead=config.cache_lookahead)
            accuracies = [evaluate(adapters[row.model], data[column["benchmark"]], sampler, seed=seed,
                                   batch_size=config.batch_size, desc=f"{label}/{column_label}/seed{seed}",
                                   accelerator=accelerator)["accuracy"]
                          for seed in seeds]
            ours[(label, column_label)] = summarize(accuracies)
    markdown = format_paper_table(table, ours)
    if accelerator is not None and not accelerator.is_main_process:
        return markdown
    output = Path(config.output_dir) / config.table
    output.mkdir(parents=True, exist_ok=True)
    (output / "table.md").write_text(markdown + "\n")
    (output / "results.json").write_text(json.dumps(
        [{"row": r, "column": c, **v, "paper": table.paper[r][list(table.columns).index(c)]} for (r, c), v in ours.items()],
        indent=2))
    return markdown

"""Evaluation: benchmark × decoding settings × seeds → accuracy table (mean ± std over seeds).

A benchmark is a list of records (``agdo.data.load_benchmark`` or generated ones) with the fields its
reward needs; every record carries ``reward``, the registry name that grades it. Prompts go through the
tokenizer's chat template when it has one. Each row of a batch decodes with its own generator seeded
by ``(seed, record index)``, so a problem's result does not depend on the batch it lands in, nor on the
number of processes: under ``accelerate launch`` (pass the ``Accelerator``) each process decodes its share of
the records (:func:`agdo.sampling.decode_across_processes`), the main process scores them and writes the
results, and every process returns the same result.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import statistics
from pathlib import Path
from typing import Optional, Sequence

import torch

from .rewards import get_reward
from .sampling import SamplerConfig, decode_across_processes, generate
from .training.sft_data import chat_token_ids

MATH_INSTRUCTION = "\nPlease reason step by step, and put your final answer within \\boxed{}."


@dataclasses.dataclass
class EvalConfig:
    """What ``agdo eval`` runs: every benchmark × alg × seed.

    Validated on construction (``__post_init__``, so also when built in Python): ``benchmarks``, ``algs``
    and ``seeds`` are non-empty lists without repeats (a single value is an error, not wrapped: write
    ``benchmarks=[gsm8k]``), of known benchmarks, known selection strategies and ints; ``limit`` is null or
    >= 1; the decoding fields must make a valid :class:`SamplerConfig` for every alg.
    """

    model_name_or_path: str = ""
    family: str = "auto"
    benchmarks: list[str] = dataclasses.field(default_factory=lambda: ["gsm8k"])
    data_dir: Optional[str] = None
    limit: Optional[int] = None
    algs: list[str] = dataclasses.field(default_factory=lambda: ["max_prob"])
    seeds: list[int] = dataclasses.field(default_factory=lambda: [0])
    gen_length: int = 256
    steps: int = 256
    block_length: Optional[int] = 32
    temperature: float = 0.0
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    threshold: Optional[float] = None
    candidate_threshold: float = 0.9
    confidence_from: Optional[str] = None  # None: the model family's convention (SPEC §6)
    stop_at_eos: bool = False  # TraceRL's early stop; off = every position decoded (reference samplers)
    schedule: str = "linear"  # static schedule (paper 003 App. B.2: linear, cosine, sqrt, exp, log, ...)
    cache: str = "none"  # block KV cache: none (exact) | prefix | dual (Fast-dLLM's approximations; agdo.sampling)
    cache_lookahead: Optional[int] = None  # prefix cache: positions after the block recomputed (None: all)
    batch_size: int = 8
    output_dir: str = "runs/eval"

    def __post_init__(self):
        from .config import coerce_fields
        from .data import BENCHMARKS

        coerce_fields(self)
        for name in ("benchmarks", "algs", "seeds"):
            values = getattr(self, name)
            if not values:
                raise ValueError(f"EvalConfig: `{name}` is empty; give at least one, e.g. {name}=[...]")
            repeated = sorted({str(v) for v in values if values.count(v) > 1})
            if repeated:
                raise ValueError(f"EvalConfig: `{name}` repeats {repeated}")
        unknown = [b for b in self.benchmarks if b not in BENCHMARKS]
        if unknown:
            raise ValueError(f"EvalConfig: unknown `benchmarks` {unknown}; available: {list(BENCHMARKS)}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"EvalConfig: `limit` must be >= 1 or null (all rows), got {self.limit}")
        if self.batch_size < 1:
            raise ValueError(f"EvalConfig: `batch_size` must be >= 1, got {self.batch_size}")
        for alg in self.algs:
            self.sampler_config(alg)  # raises naming the bad field

    def sampler_config(self, alg: str) -> SamplerConfig:
        """The decoding settings of one ``alg`` (``ValueError`` naming ``algs`` or the bad field)."""
        try:
            return SamplerConfig(
                gen_length=self.gen_length, steps=self.steps, block_length=self.block_length,
                temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, alg=alg,
                threshold=self.threshold, candidate_threshold=self.candidate_threshold, schedule=self.schedule,
                confidence_from=self.confidence_from, stop_at_eos=self.stop_at_eos, cache=self.cache,
                cache_lookahead=self.cache_lookahead,
            )
        except ValueError as error:
            raise ValueError(f"EvalConfig (algs entry {alg!r}): {error}") from None


def prompt_text(record: dict) -> str:
    if record.get("reward") == "math":
        return record["question"] + MATH_INSTRUCTION
    return record["prompt"]


def encode_prompts(tokenizer, texts: Sequence[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``(ids, mask)``; the chat template is applied when the tokenizer has one."""
    if getattr(tokenizer, "chat_template", None):
        encoded = [chat_token_ids(tokenizer, [{"role": "user", "content": t}], add_generation_prompt=True)
                   for t in texts]
    else:
        encoded = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max(len(ids) for ids in encoded)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.bool)
    for row, tokens in enumerate(encoded):
        ids[row, width - len(tokens):] = torch.tensor(tokens, dtype=torch.long)
        mask[row, width - len(tokens):] = True
    return ids.to(device), mask.to(device)


def decode_completion(tokenizer, tokens: torch.Tensor, stop_token_ids) -> str:
    """Text of a response up to its first stop token."""
    tokens = tokens.tolist()
    for i, token in enumerate(tokens):
        if token in stop_token_ids:
            tokens = tokens[:i]
            break
    return tokenizer.decode(tokens, skip_special_tokens=True)


@torch.no_grad()
def evaluate(adapter, records: Sequence[dict], sampler_config: SamplerConfig, *, seed: int, batch_size: int,
             desc: str = "eval", accelerator=None) -> dict:
    """Decode every record once; returns ``{"accuracy", "scores", "completions"}``.

    With an ``accelerator`` every process must call this with the same arguments: each decodes its share
    of the records, the completions are gathered in record order, the main process scores them (once) and
    every process returns the same result.
    """
    if not records:
        raise ValueError("`records` is empty: nothing to evaluate")
    reward_name = records[0]["reward"]
    if any(r["reward"] != reward_name for r in records):
        raise ValueError("all records of one evaluation must share their `reward`")
    reward = get_reward(reward_name)
    tokenizer = adapter.tokenizer
    if tokenizer is None:
        raise ValueError("evaluation needs an adapter with a tokenizer")
    was_training = adapter.model.training
    adapter.model.eval()

    def decode_batch(batch, indices):
        ids, mask = encode_prompts(tokenizer, [prompt_text(r) for r in batch], adapter.device)
        generators = [torch.Generator(device=adapter.device).manual_seed(seed * 1_000_003 + i) for i in indices]
        result = generate(adapter, ids, mask, sampler_config, generator=generators)
        return [decode_completion(tokenizer, row, adapter.stop_token_ids) for row in result.response]

    completions = decode_across_processes(records, batch_size, decode_batch, accelerator=accelerator, desc=desc)
    adapter.model.train(was_training)
    fields = {key: [r.get(key) for r in records] for key in records[0] if key != "reward"}
    # Rewards can be slow (math-verify, the code sandbox): scored on one process, the scores sent to the rest.
    scores = reward(completions, **fields) if accelerator is None or accelerator.is_main_process else None
    if accelerator is not None:
        from accelerate.utils import broadcast_object_list

        scores = broadcast_object_list([scores])[0]
    return {"accuracy": sum(scores) / len(scores), "scores": scores, "completions": completions}


def summarize(accuracies: Sequence[float]) -> dict:
    """Mean and sample standard deviation (0 for a single seed), in percent."""
    values = [100.0 * a for a in accuracies]
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "seeds": len(values)}


def format_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """Markdown table of ``mean ± std`` cells: one line per (row label), one column per column label."""
    labels = list(dict.fromkeys(r["row"] for r in rows))
    cell = {(r["row"], r["column"]): f"{r['mean']:.1f} ± {r['std']:.1f}" for r in rows}
    lines = ["| | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for label in labels:
        lines.append(f"| {label} | " + " | ".join(cell.get((label, c), "-") for c in columns) + " |")
    return "\n".join(lines)


def run_eval(config: EvalConfig, *, adapter=None, accelerator=None) -> str:
    """Evaluate every benchmark × alg × seed; writes ``results.jsonl`` and returns the Markdown table.

    With an ``accelerator`` (``accelerate launch``): the model is moved to ``accelerator.device``, each
    process decodes its share of every evaluation (:func:`evaluate`), only the main process writes
    ``results.jsonl``, and every process returns the same table.
    """
    from .data import load_benchmark
    from .models import load_adapter

    # Every benchmark file is read (and checked) before the model is loaded: bad data fails fast.
    datasets = {benchmark: load_benchmark(benchmark, config.data_dir)[: config.limit] for benchmark in config.benchmarks}
    if adapter is None:
        if not config.model_name_or_path:
            raise ValueError("EvalConfig: `model_name_or_path` is required (a model directory or hub id)")
        adapter = load_adapter(config.model_name_or_path, family=config.family)
    if accelerator is not None:
        adapter.model.to(accelerator.device)
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    writing = accelerator is None or accelerator.is_main_process
    with open(output_dir / "results.jsonl", "a") if writing else contextlib.nullcontext() as log:
        for benchmark in config.benchmarks:
            records = datasets[benchmark]
            for alg in config.algs:
                sampler = config.sampler_config(alg)
                accuracies = []
                for seed in config.seeds:
                    result = evaluate(adapter, records, sampler, seed=seed, batch_size=config.batch_size,
                                      desc=f"{benchmark}/{alg}/seed{seed}", accelerator=accelerator)
                    accuracies.append(result["accuracy"])
                    if writing:
                        log.write(json.dumps({"benchmark": benchmark, "alg": alg, "seed": seed,
                                              "accuracy": result["accuracy"], "n": len(records)}) + "\n")
                rows.append({"row": alg, "column": benchmark, **summarize(accuracies)})
    return format_table(rows, config.benchmarks)

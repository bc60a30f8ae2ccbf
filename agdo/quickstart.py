"""The main job: a small end-to-end AGDO reproduction that runs on a 2-core CPU in minutes.

1. Pre-train a tiny bidirectional masked-diffusion LM from scratch with the LLaDA objective, briefly, so
   that the base is weak but has learnt something: ``task=addition`` (default; multi-digit sums written most
   significant digit first, each digit depends on the carries to its right) or ``task=sudoku`` (4x4, the
   16-digit puzzle with 0 for blanks -> the 16-digit solution; ~8x the compute per sample).
2. Post-train copies with ``agdo`` (attention-guided order, one token per step, no blocks, influence
   weights), ``random`` (LLaDA SFT) and ``blockwise`` for every seed of ``train_seeds``: the same data,
   batch, optimizer steps and training rows per sample (AGDO's one row per trained token; as many random
   masks; blockwise cycles its blocks to the same count, ``order_rows_per_sample``). The rows are measured
   from the metrics logs and printed.
3. RL from each seed's AGDO-SFT model (the paper's "AGDO = SFT + RL" path): AGDO-RL and TraceRL by default
   (``rl_methods`` takes any of ``diffu_grpo``, ``coupled``, ``wd1``, ``mdpo`` too) on the training problems
   with an exact-match reward, same prompts, steps and rollouts, at matched rows per response (the AGDO
   paper's §6.1 matching, :func:`_rl_compute_match`); the measured counts are printed.
4. Evaluate every model with ``max_prob`` and ``max_s`` decoding on every held-out test set (``seeds``; no
   test problem occurs in training): mean ± std over training seeds x test sets, and the paper's direction
   of effect with whether our means agree.
5. Save the attention-analysis plots (Figs. 1, 2, 6) for the base and the first seed's AGDO model.

Everything is written under ``output_dir``: checkpoints (``pretrain/``, ``seed<k>/<method>/``), metrics,
``results.md``, ``results.json`` and the PNGs.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import statistics
import time
from pathlib import Path
from typing import Optional

from . import tasks
from .analysis import analyze_decoding, plot_s_distribution
from .eval import encode_prompts, evaluate, summarize
from .models import load_adapter
from .sampling import SamplerConfig
from .sampling.sampler import CACHE_MODES
from .training.metrics import read_metrics
from .training.rl import RLConfig, train_rl
from .training.sft import SFTConfig, train_sft
from .training.sft_data import SFTDataset


@dataclasses.dataclass
class QuickstartConfig:
    output_dir: str = "runs/quickstart"
    # "sudoku": 4x4 Sudoku, 16-digit puzzle (0 = blank) -> 16-digit solution; "addition": `digits`-digit sums.
    task: str = "addition"
    digits: int = 3
    sudoku_blanks: int = 10
    train_problems: int = 4000
    test_problems: int = 200
    # `seeds`: the held-out test sets (each drawn with its seed, disjoint from the training problems);
    # `train_seeds`: the post-training (SFT and RL) runs, each from the same pre-trained base.
    seeds: list = dataclasses.field(default_factory=lambda: [0, 1, 2])
    train_seeds: list = dataclasses.field(default_factory=lambda: [0, 1, 2])
    pretrain_steps: int = 1000
    pretrain_masks_per_sample: int = 4
    posttrain_steps: int = 120
    batch_size: int = 32
    learning_rate: float = 1e-3
    posttrain_learning_rate: float = 5e-4
    block_size: int = 2  # blockwise SFT only
    gamma: float = 100.0
    # "mean" (sum_k I_k = 1) keeps gamma=100 a moderate weight on these short responses; the package default
    # is SPEC §2's "sum", with which gamma=100 would weight hubs ~100x.
    influence_norm: str = "mean"
    post_num: int = 1
    hidden_size: int = 128
    num_layers: int = 4
    # RL from the AGDO-SFT model of each training seed; [] skips the stage. Any of agdo.training.rl.RL_METHODS.
    rl_methods: list = dataclasses.field(default_factory=lambda: ["agdo", "tracerl"])
    rl_steps: int = 10
    rl_prompts_per_step: int = 16
    rl_num_generations: int = 8
    rl_learning_rate: float = 1e-4
    rl_decoding_alg: str = "max_prob"
    # Every model is evaluated with each of these block KV caches (SamplerConfig.cache): "none" is exact, the
    # others add table columns. With the default single block a cache only keeps the prompt's K/V from the
    # first step; `eval_block_length` (must divide the answer + EOS length) decodes semi-AR in blocks, so the
    # caches also keep finished blocks.
    eval_caches: list = dataclasses.field(default_factory=lambda: ["none"])
    eval_block_length: Optional[int] = None  # None: one block (pure diffusion over the response)

    def __post_init__(self):
        from .training.rl import RL_METHODS

        unknown = [m for m in self.rl_methods if m not in RL_METHODS]
        if unknown or len(set(self.rl_methods)) != len(self.rl_methods):
            raise ValueError(f"QuickstartConfig: `rl_methods` must be distinct names of {list(RL_METHODS)}, got "
                             f"{self.rl_methods}")
        if self.task not in ("sudoku", "addition"):
            raise ValueError(f"QuickstartConfig: `task` must be 'sudoku' or 'addition', got {self.task!r}")
        if (not self.eval_caches or len(set(self.eval_caches)) != len(self.eval_caches)
                or not set(self.eval_caches) <= set(CACHE_MODES)):
            raise ValueError(f"QuickstartConfig: `eval_caches` must be distinct names of {list(CACHE_MODES)}, got "
                             f"{self.eval_caches!r}")
        if self.eval_block_length is not None and (isinstance(self.eval_block_length, bool)
                                                   or not isinstance(self.eval_block_length, int)
                                                   or self.eval_block_length < 1):
            raise ValueError(f"QuickstartConfig: `eval_block_length` must be a positive int or None, got "
                             f"{self.eval_block_length!r}")
        for name in ("seeds", "train_seeds"):
            if not getattr(self, name) or len(set(getattr(self, name))) != len(getattr(self, name)):
                raise ValueError(f"QuickstartConfig: `{name}` must be a non-empty list of distinct seeds")


SFT_LABELS = {"agdo": "AGDO-SFT", "random": "SFT (random masks)", "blockwise": "blockwise SFT"}
# The paper's direction of effect for each row (arXiv Tables 1-3), checked against our means (max_prob column).
# label: (claim, the row it is compared with, +1 if the label's row should be higher, -1 lower).
PAPER_CLAIMS = {
    "AGDO-SFT": ("AGDO-SFT > SFT", "SFT (random masks)", 1),
    "blockwise SFT": ("blockwise < AGDO-SFT", "AGDO-SFT", -1),
    "AGDO-SFT + AGDO-RL": ("AGDO-RL > TraceRL", "AGDO-SFT + TraceRL", 1),
}


def _task_data(config: QuickstartConfig) -> tuple[list, dict, int, str]:
    """``(train, {seed: test set}, answer tokens, title)``; test problems never occur in training."""
    if config.task == "sudoku":
        draw = lambda count, seed, exclude=frozenset(): tasks.sudoku_problems(
            count, blanks=config.sudoku_blanks, seed=seed, exclude=exclude)
        answer_tokens, title = 16, f"4x4 Sudoku ({config.sudoku_blanks} blanks)"
    else:
        draw = lambda count, seed, exclude=frozenset(): tasks.addition_problems(
            count, digits=config.digits, seed=seed, exclude=exclude)
        answer_tokens, title = config.digits + 1, f"{config.digits}-digit addition"
    train = draw(config.train_problems, 10_000)
    seen = {p["prompt"] for p in train}
    test_sets = {seed: [dict(p, reward="exact") for p in draw(config.test_problems, seed, seen)]
                 for seed in config.seeds}
    return train, test_sets, answer_tokens, title


def _posttrain_configs(config: QuickstartConfig, response_tokens: int, output_dir: Path, seed: int) -> dict:
    """``{method: SFTConfig}``: the same data, batch, optimizer steps and training rows per sample for every
    method — AGDO's one row per trained token (step_size 1, no blocks), as many random masks for ``random``,
    and ``blockwise`` cycling its fewer blocks to the same count (``order_rows_per_sample``)."""
    common = dict(post_num=config.post_num, per_device_train_batch_size=config.batch_size,
                  learning_rate=config.posttrain_learning_rate, max_steps=config.posttrain_steps, seed=seed,
                  forward_batch_size=1024, save_steps=10**9)
    rows = response_tokens
    return {
        "agdo": SFTConfig(output_dir=str(output_dir / "agdo"), method="agdo", gamma=config.gamma,
                          influence_norm=config.influence_norm, order_rows_per_sample=rows, **common),
        "random": SFTConfig(output_dir=str(output_dir / "random"), method="random", random_masks_per_sample=rows,
                            **common),
        "blockwise": SFTConfig(output_dir=str(output_dir / "blockwise"), method="blockwise",
                               block_size=config.block_size, order_rows_per_sample=rows, **common),
    }


RL_LABELS = {"agdo": "AGDO-RL", "tracerl": "TraceRL", "diffu_grpo": "diffu-GRPO", "coupled": "coupled GRPO",
             "wd1": "wd1", "mdpo": "MDPO"}


def _rl_compute_match(method: str, gen_length: int) -> dict:
    """Per-method settings that give every RL method about one training row per decoded token (the order
    methods' count with one token per decoding step): masks per response for the mask-based methods (a
    coupled draw is 3 rows), every decoding step for MDPO."""
    if method in ("diffu_grpo", "wd1"):
        return {"masks_per_sample": gen_length}
    if method == "coupled":
        return {"masks_per_sample": math.ceil(gen_length / 3)}
    if method == "mdpo":
        return {"max_steps_per_sample": gen_length}
    return {}


def _measured_rows(run_dir: Path) -> int:
    """Training rows (forward passes) of a run, summed from its metrics log."""
    return sum(int(m["rows"]) for m in read_metrics(run_dir) if "rows" in m)


def _agrees(means: dict, label: str, column: str) -> str:
    _, other, sign = PAPER_CLAIMS[label]
    if label not in means or other not in means:
        return "-"
    return "yes" if sign * (means[label][column] - means[other][column]) > 0 else "no"


def _format_table(rows: list, rows_text: dict, columns=("max_prob", "max_s")) -> str:
    means = {}
    for r in rows:
        means.setdefault(r["row"], {})[r["column"]] = r["mean"]
    cell = {(r["row"], r["column"]): f"{r['mean']:.1f} ± {r['std']:.1f} (n={r['seeds']})" for r in rows}
    lines = ["| | " + " | ".join(columns) + f" | training rows | paper's direction | agrees? ({' / '.join(columns)}) |",
             "|---" * (len(columns) + 4) + "|"]
    for label in dict.fromkeys(r["row"] for r in rows):
        claim = PAPER_CLAIMS[label][0] if label in PAPER_CLAIMS else "-"
        agrees = " / ".join(_agrees(means, label, c) for c in columns) if label in PAPER_CLAIMS else "-"
        lines.append(f"| {label} | " + " | ".join(cell.get((label, c), "-") for c in columns)
                     + f" | {rows_text.get(label, '-')} | {claim} | {agrees} |")
    return "\n".join(lines)


def run_quickstart(config: QuickstartConfig) -> str:
    started = time.monotonic()
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    def stage(text: str) -> None:
        print(f"[{time.monotonic() - started:6.0f}s] {text}", flush=True)

    tokenizer = tasks.build_tokenizer()
    train, test_sets, answer_tokens, title = _task_data(config)
    dataset = SFTDataset.from_records(train, tokenizer, max_prompt_length=64, max_response_length=64)
    gen_length = answer_tokens + 1  # the answer and its EOS
    response_tokens = gen_length + config.post_num  # + the trained pads
    block_length = config.eval_block_length or gen_length
    if gen_length % block_length:  # before any training: the evaluation would fail after it
        raise ValueError(f"QuickstartConfig: `eval_block_length` must divide the decoded length {gen_length} "
                         f"({title}: the answer and its EOS), got {block_length}")

    stage(f"[1/5] {title}: {len(train)} training problems, {len(test_sets)} held-out test sets of "
          f"{config.test_problems}; pre-training a {config.num_layers}-layer bidirectional LM from scratch "
          f"({config.pretrain_steps} steps, LLaDA objective)")
    model = tasks.build_tiny_model(tokenizer, hidden_size=config.hidden_size, num_layers=config.num_layers)
    base = load_adapter(model, tokenizer=tokenizer)
    pretrain = SFTConfig(output_dir=str(output_dir / "pretrain"), method="random", post_num=config.post_num,
                         random_masks_per_sample=config.pretrain_masks_per_sample, max_steps=config.pretrain_steps,
                         per_device_train_batch_size=config.batch_size, learning_rate=config.learning_rate,
                         lr_scheduler_type="cosine", warmup_steps=config.pretrain_steps // 20,
                         forward_batch_size=1024, save_steps=10**9)
    train_sft(pretrain, adapter=base, dataset=dataset)

    models = {"base (pre-trained)": [base]}
    measured = {"base (pre-trained)": "0"}
    sft_rows = {}
    for seed in config.train_seeds:
        for method, sft in _posttrain_configs(config, response_tokens, output_dir / f"seed{seed}", seed).items():
            stage(f"[2/5] training seed {seed}: {method} SFT ({sft.max_steps} steps x {config.batch_size} samples)")
            adapter = load_adapter(copy.deepcopy(base.model), tokenizer=tokenizer)
            train_sft(sft, adapter=adapter, dataset=dataset)
            models.setdefault(SFT_LABELS[method], []).append(adapter)
            sft_rows.setdefault(SFT_LABELS[method], []).append(_measured_rows(Path(sft.output_dir)))
    forward_passes = {"base (pre-trained)": "0 training forward passes (rows)"}
    for label, counts in sft_rows.items():
        shown = str(counts[0]) if len(set(counts)) == 1 else "/".join(map(str, counts))
        measured[label] = f"{shown} per seed"
        forward_passes[label] = (f"{shown} training forward passes (rows) per training seed, measured "
                                 f"({config.posttrain_steps} optimizer steps of {config.batch_size} samples)")

    rl_prompts = [{"prompt": p["prompt"], "answer": p["answer"], "reward": "exact"} for p in train]
    for method in config.rl_methods:
        label = f"AGDO-SFT + {RL_LABELS[method]}"
        logged = []
        for seed, start in zip(config.train_seeds, models["AGDO-SFT"]):
            stage(f"[3/5] training seed {seed}: RL from AGDO-SFT with {method} ({config.rl_steps} steps of "
                  f"{config.rl_prompts_per_step} prompts x {config.rl_num_generations} rollouts)")
            adapter = load_adapter(copy.deepcopy(start.model), tokenizer=tokenizer)
            run_dir = output_dir / f"seed{seed}" / f"rl_{method}"
            rl = RLConfig(output_dir=str(run_dir), method=method, post_num=config.post_num,
                          max_completion_length=gen_length, num_generations=config.rl_num_generations,
                          prompts_per_step=config.rl_prompts_per_step, max_steps=config.rl_steps,
                          learning_rate=config.rl_learning_rate, decoding_alg=config.rl_decoding_alg, beta=0.0,
                          reward_workers=1, forward_batch_size=1024, save_steps=10**9, seed=seed,
                          **_rl_compute_match(method, gen_length))
            train_rl(rl, adapter=adapter, prompts=rl_prompts)
            models.setdefault(label, []).append(adapter)
            logged += read_metrics(run_dir)
        trained = [m for m in logged if m["updates"]]
        per_response = statistics.fmean(m["train_forward_passes_per_response"] for m in trained) if trained else 0
        rl_rows = sum(m["training_forward_passes"] for m in logged)
        measured[label] = f"+{rl_rows // len(config.train_seeds)} RL per seed"
        forward_passes[label] = (
            f"AGDO-SFT + {rl_rows} RL training forward passes ({per_response:.2f} per trained response) + "
            f"{sum(m['rollout_forward_passes'] for m in logged)} rollout forward passes, over "
            f"{len(config.train_seeds)} training seeds")

    columns = {(cache, alg): alg if cache == "none" else f"{alg}, {cache} cache"
               for cache in config.eval_caches for alg in ("max_prob", "max_s")}
    stage(f"[4/5] evaluating {sum(map(len, models.values()))} models x ({', '.join(columns.values())}) x "
          f"{len(config.seeds)} test sets")
    rows = []
    for label, adapters in models.items():
        for (cache, alg), column in columns.items():
            sampler = SamplerConfig(gen_length=gen_length, steps=gen_length, block_length=block_length, alg=alg,
                                    cache=cache)
            accuracies = [evaluate(adapter, test_sets[seed], sampler, seed=seed, batch_size=256,
                                   desc=f"{label}/{column}")["accuracy"]
                          for adapter in adapters for seed in config.seeds]
            rows.append({"row": label, "column": column, "training_seeds": len(adapters), **summarize(accuracies)})
    table = _format_table(rows, measured, columns=tuple(columns.values()))
    passes = "\n".join(f"- {label}: {text}" for label, text in forward_passes.items())

    stage("[5/5] attention analysis plots (base and the first seed's AGDO-SFT)")
    prompts = [p["prompt"] for p in test_sets[config.seeds[0]][:64]]
    s_by_model = {}
    for label, short in (("base (pre-trained)", "base"), ("AGDO-SFT", "agdo")):
        adapter = models[label][0]
        ids, mask = encode_prompts(tokenizer, prompts, adapter.device)
        analysis = analyze_decoding(adapter, ids, mask, SamplerConfig(gen_length=gen_length, steps=gen_length),
                                    output_dir / "plots", label=short)
        s_by_model[label] = analysis["s"]
    plot_s_distribution(s_by_model, output_dir / "plots" / "s_distribution_base_vs_agdo.png")

    n_train = len(config.train_seeds)
    decoding = (f"{gen_length} tokens in {gen_length} steps, "
                + ("one block" if block_length == gen_length else f"blocks of {block_length}"))
    report = (f"# agdo quickstart: {title}, exact-match accuracy % (mean ± std over {n_train} training seeds x "
              f"{len(config.seeds)} held-out test sets of {config.test_problems}; the base: one pre-training x "
              f"the test sets; decoding {decoding})\n\n{table}\n\n{passes}\n\n"
              f"wall clock: {time.monotonic() - started:.0f} s\n")
    (output_dir / "results.md").write_text(report)
    (output_dir / "results.json").write_text(json.dumps(rows, indent=2))
    stage("done")
    print(report)
    print(f"plots: {output_dir / 'plots'}")
    return report


if __name__ == "__main__":  # pragma: no cover
    run_quickstart(QuickstartConfig())

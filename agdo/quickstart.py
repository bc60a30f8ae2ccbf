"""The main job: a small end-to-end AGDO reproduction that runs on a 2-core CPU in minutes.

1. Pre-train a tiny bidirectional masked-diffusion LM from scratch on multi-digit addition
   (:mod:`agdo.tasks`) with the LLaDA objective.
2. Post-train three copies at matched forward passes: ``random`` (LLaDA SFT), ``blockwise`` and
   ``agdo`` (attention-guided order + influence weights).
3. RL from the AGDO-SFT model (the paper's "AGDO = SFT + RL" path): AGDO-RL and TraceRL by default
   (``rl_methods`` takes any of ``diffu_grpo``, ``coupled``, ``wd1``, ``mdpo`` too) on the training problems
   with an exact-match reward, same prompts, steps and rollouts, at matched forward passes: the order
   methods train one row per decoded token, the mask-based ones get as many masks per response (the AGDO
   paper's §6.1 matching); the measured counts are printed.
4. Evaluate the base and every copy with ``max_prob`` and ``max_s`` decoding over several seeds, each
   seed a fresh held-out problem set, and print the table in the shape of the paper's Tables 1-3.
5. Save the attention-analysis plots (Figs. 1, 2, 6) for the base and the AGDO model.

Everything is written under ``output_dir``: checkpoints, metrics, ``results.md`` and the PNGs.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import statistics
from pathlib import Path

from . import tasks
from .analysis import analyze_decoding, plot_s_distribution
from .eval import encode_prompts, evaluate, format_table, summarize
from .models import load_adapter
from .sampling import SamplerConfig
from .training.metrics import read_metrics
from .training.rl import RLConfig, train_rl
from .training.sft import SFTConfig, train_sft
from .training.sft_data import SFTDataset


@dataclasses.dataclass
class QuickstartConfig:
    output_dir: str = "runs/quickstart"
    digits: int = 3
    train_problems: int = 4000
    test_problems: int = 200
    seeds: list = dataclasses.field(default_factory=lambda: [0, 1, 2])
    pretrain_steps: int = 2000
    pretrain_masks_per_sample: int = 4
    posttrain_steps: int = 150
    batch_size: int = 32
    learning_rate: float = 1e-3
    posttrain_learning_rate: float = 1e-4
    block_size: int = 2
    gamma: float = 100.0
    # "mean" (sum_k I_k = 1) keeps gamma=100 a moderate weight on these 6-token responses; the package default
    # is SPEC §2's "sum", with which gamma=100 would weight hubs ~100x. The published table used "mean".
    influence_norm: str = "mean"
    post_num: int = 1
    hidden_size: int = 128
    num_layers: int = 4
    # RL from the AGDO-SFT model; [] skips the stage. Any of agdo.training.rl.RL_METHODS.
    rl_methods: list = dataclasses.field(default_factory=lambda: ["agdo", "tracerl"])
    rl_steps: int = 40
    rl_prompts_per_step: int = 16
    rl_num_generations: int = 8
    rl_learning_rate: float = 1e-4
    rl_decoding_alg: str = "max_prob"

    def __post_init__(self):
        from .training.rl import RL_METHODS

        unknown = [m for m in self.rl_methods if m not in RL_METHODS]
        if unknown or len(set(self.rl_methods)) != len(self.rl_methods):
            raise ValueError(f"QuickstartConfig: `rl_methods` must be distinct names of {list(RL_METHODS)}, got "
                             f"{self.rl_methods}")


def _posttrain_configs(config: QuickstartConfig, response_tokens: int, output_dir: Path) -> dict:
    """``{method: (SFTConfig, rows per sample)}`` with matched forward passes: rows per sample × steps."""
    rows_per_sample = {
        "agdo": response_tokens,  # one step per token (step_size 1)
        "random": response_tokens,  # as many random masks as AGDO has steps (the paper's matching)
        "blockwise": math.ceil(response_tokens / config.block_size),
    }
    budget = rows_per_sample["agdo"] * config.posttrain_steps
    common = dict(post_num=config.post_num, per_device_train_batch_size=config.batch_size,
                  learning_rate=config.posttrain_learning_rate, forward_batch_size=1024, save_steps=10**9)
    return {
        method: (SFTConfig(output_dir=str(output_dir / method), method=method, gamma=config.gamma,
                           influence_norm=config.influence_norm,
                           block_size=config.block_size, random_masks_per_sample=rows,
                           max_steps=round(budget / rows), **common), rows)
        for method, rows in rows_per_sample.items()
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


def run_quickstart(config: QuickstartConfig) -> str:
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = tasks.build_tokenizer()
    train = tasks.addition_problems(config.train_problems, digits=config.digits, seed=10_000)
    seen = {p["prompt"] for p in train}
    test_sets = {seed: [dict(p, reward="exact") for p in
                        tasks.addition_problems(config.test_problems, digits=config.digits, seed=seed, exclude=seen)]
                 for seed in config.seeds}
    dataset = SFTDataset.from_records(train, tokenizer, max_prompt_length=64, max_response_length=64)
    response_tokens = config.digits + 1 + 1 + config.post_num  # digits, EOS, trained pads

    print(f"[1/5] pre-training a {config.num_layers}-layer bidirectional LM from scratch "
          f"({config.pretrain_steps} steps, LLaDA objective)")
    model = tasks.build_tiny_model(tokenizer, hidden_size=config.hidden_size, num_layers=config.num_layers)
    base = load_adapter(model, tokenizer=tokenizer)
    pretrain = SFTConfig(output_dir=str(output_dir / "pretrain"), method="random", post_num=config.post_num,
                         random_masks_per_sample=config.pretrain_masks_per_sample, max_steps=config.pretrain_steps,
                         per_device_train_batch_size=config.batch_size, learning_rate=config.learning_rate,
                         lr_scheduler_type="cosine", warmup_steps=config.pretrain_steps // 20,
                         forward_batch_size=1024, save_steps=10**9)
    train_sft(pretrain, adapter=base, dataset=dataset)

    models = {"base (pre-trained)": base}
    forward_passes = {"base (pre-trained)": "0 training forward passes (rows)"}
    for method, (sft, rows_per_sample) in _posttrain_configs(config, response_tokens, output_dir).items():
        print(f"[2/5] post-training a copy with {method} SFT ({sft.max_steps} steps)")
        adapter = load_adapter(copy.deepcopy(base.model), tokenizer=tokenizer)
        train_sft(sft, adapter=adapter, dataset=dataset)
        label = {"agdo": "AGDO-SFT", "random": "SFT (random masks)", "blockwise": "blockwise SFT"}[method]
        models[label] = adapter
        forward_passes[label] = f"{rows_per_sample * sft.max_steps * config.batch_size} training forward passes (rows)"

    rl_prompts = [{"prompt": p["prompt"], "answer": p["answer"], "reward": "exact"} for p in train]
    for method in config.rl_methods:
        label = f"AGDO-SFT + {RL_LABELS[method]}"
        print(f"[3/5] RL from the AGDO-SFT model with {method} ({config.rl_steps} steps of "
              f"{config.rl_prompts_per_step} prompts x {config.rl_num_generations} rollouts)")
        adapter = load_adapter(copy.deepcopy(models["AGDO-SFT"].model), tokenizer=tokenizer)
        rl = RLConfig(output_dir=str(output_dir / f"rl_{method}"), method=method, post_num=config.post_num,
                      max_completion_length=config.digits + 2, num_generations=config.rl_num_generations,
                      prompts_per_step=config.rl_prompts_per_step, max_steps=config.rl_steps,
                      learning_rate=config.rl_learning_rate, decoding_alg=config.rl_decoding_alg, beta=0.0,
                      reward_workers=1, forward_batch_size=1024, save_steps=10**9,
                      **_rl_compute_match(method, config.digits + 2))
        train_rl(rl, adapter=adapter, prompts=rl_prompts)
        models[label] = adapter
        logged = read_metrics(output_dir / f"rl_{method}")
        trained = [m for m in logged if m["updates"]]
        per_response = statistics.fmean(m["train_forward_passes_per_response"] for m in trained) if trained else 0
        forward_passes[label] = (
            f"AGDO-SFT + {sum(m['training_forward_passes'] for m in logged)} RL training forward passes "
            f"({per_response:.2f} per trained response) + {sum(m['rollout_forward_passes'] for m in logged)} "
            f"rollout forward passes")

    print(f"[4/5] evaluating {len(models)} models x (max_prob, max_s) x {len(config.seeds)} seeds")
    gen_length = config.digits + 2
    rows = []
    for label, adapter in models.items():
        for alg in ("max_prob", "max_s"):
            sampler = SamplerConfig(gen_length=gen_length, steps=gen_length, alg=alg)
            accuracies = [evaluate(adapter, test_sets[seed], sampler, seed=seed, batch_size=256,
                                   desc=f"{label}/{alg}")["accuracy"] for seed in config.seeds]
            rows.append({"row": label, "column": alg, **summarize(accuracies)})
    table = format_table(rows, ["max_prob", "max_s"])
    passes = "\n".join(f"- {label}: {text}" for label, text in forward_passes.items())

    print("[5/5] attention analysis plots")
    prompts = [p["prompt"] for p in test_sets[config.seeds[0]][:64]]
    s_by_model = {}
    for label, short in (("base (pre-trained)", "base"), ("AGDO-SFT", "agdo")):
        adapter = models[label]
        ids, mask = encode_prompts(tokenizer, prompts, adapter.device)
        analysis = analyze_decoding(adapter, ids, mask, SamplerConfig(gen_length=gen_length, steps=gen_length),
                                    output_dir / "plots", label=short)
        s_by_model[label] = analysis["s"]
    plot_s_distribution(s_by_model, output_dir / "plots" / "s_distribution_base_vs_agdo.png")

    report = (f"# agdo quickstart: {config.digits}-digit addition, accuracy % (mean ± std over "
              f"{len(config.seeds)} held-out sets of {config.test_problems})\n\n{table}\n\n{passes}\n")
    (output_dir / "results.md").write_text(report)
    (output_dir / "results.json").write_text(json.dumps(rows, indent=2))
    print(report)
    print(f"plots: {output_dir / 'plots'}")
    return report


if __name__ == "__main__":  # pragma: no cover
    run_quickstart(QuickstartConfig())

"""Tiny SFT and RL runs for tests/test_sft.py and tests/test_rl.py, run as a script so that they can be
launched on several processes::

    python -m accelerate.commands.launch --multi_gpu --num_processes 2 ... tests/train_worker.py sft|rl|eval OUT key=value ...

Builds the same tokenizer, data and model as the in-process tests (``build_tiny_run``,
``build_tiny_rl_run``), applies the ``key=value`` overrides to the trainer's config through
``agdo.config.build_config`` and trains; ``eval`` evaluates instead (:func:`evaluate_tiny`).
"""

from __future__ import annotations

import dataclasses
import sys


def build_tiny_run(num_problems: int = 40, model_seed: int = 0):
    """(adapter, dataset): 2-digit addition (every response the same length), a 2-layer hidden-32 model."""
    from agdo import tasks
    from agdo.models import load_adapter
    from agdo.training.sft_data import SFTDataset

    tokenizer = tasks.build_tokenizer()
    problems = tasks.addition_problems(num_problems, digits=2, seed=1)
    dataset = SFTDataset.from_records(problems, tokenizer, max_prompt_length=64, max_response_length=64)
    model = tasks.build_tiny_model(tokenizer, hidden_size=32, num_layers=2, seed=model_seed)
    return load_adapter(model, tokenizer=tokenizer), dataset


def build_tiny_rl_run(num_problems: int = 8, model_seed: int = 0, pretrain_steps: int = 40):
    """(adapter, prompts): 1-digit addition graded by exact match, on a 2-layer hidden-32 model pre-trained
    for ``pretrain_steps`` plain AdamW steps on LLaDA random masks — deliberately weak (a few % right)."""
    import torch

    from agdo import orders, tasks
    from agdo.models import load_adapter
    from agdo.training.masking import random_rows, weighted_nll
    from agdo.training.sft_data import SFTDataset, collate_sft

    tokenizer = tasks.build_tokenizer()
    problems = tasks.addition_problems(num_problems, digits=1, seed=1)
    model = tasks.build_tiny_model(tokenizer, hidden_size=32, num_layers=2, seed=model_seed)
    adapter = load_adapter(model, tokenizer=tokenizer)
    dataset = SFTDataset.from_records(problems, tokenizer, max_prompt_length=64, max_response_length=64)
    batch = collate_sft([dataset[i] for i in range(len(dataset))], pad_token_id=adapter.pad_token_id, post_num=1)
    P = batch["response_start"]
    trained = orders.trained_positions(batch["input_ids"][:, P:], adapter.stop_token_ids, 1,
                                       pad_token_id=adapter.pad_token_id)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(model_seed)
    for _ in range(pretrain_steps):
        rows = random_rows(batch["input_ids"], batch["attention_mask"], response_start=P, trained=trained,
                           mask_token_id=adapter.mask_token_id, masks_per_sample=4, generator=generator)
        logits = adapter.forward(rows.input_ids, rows.attention_mask).logits
        (weighted_nll(logits, rows.targets, rows.weights) / rows.input_ids.shape[0]).backward()
        optimizer.step()
        optimizer.zero_grad()
    prompts = [dict(prompt=p["prompt"], answer=p["answer"], reward="exact") for p in problems]
    return adapter, prompts


def evaluate_tiny(output_dir, overrides: list[str], accelerator=None) -> dict:
    """What tests/test_distributed_generation.py compares between 1 and 2 processes: ``evaluate`` of every
    alg x seed of an ``EvalConfig`` built from ``overrides``, the over-denoising categories of the same
    records, and ``run_eval``'s table (``results.jsonl`` in ``output_dir``), on 9 one-digit additions
    graded by exact match (standing in for every benchmark) with a model that gets some right."""
    from unittest import mock

    from agdo import data
    from agdo.config import build_config
    from agdo.eval import EvalConfig, evaluate, run_eval
    from agdo.rewards.pool import RewardPool
    from agdo.training.mdpo import classify_trajectories

    adapter, records = build_tiny_rl_run(num_problems=9, pretrain_steps=120)
    config = build_config(EvalConfig, None, [f"output_dir={output_dir}", *overrides])
    evaluations = {f"{alg}/{seed}": evaluate(adapter, records, config.sampler_config(alg), seed=seed,
                                             batch_size=config.batch_size, accelerator=accelerator)
                   for alg in config.algs for seed in config.seeds}
    sampler = dataclasses.replace(config.sampler_config(config.algs[0]), return_predictions=True)
    categories = classify_trajectories(adapter, records, sampler, score=RewardPool(0).score, seed=config.seeds[0],
                                       batch_size=config.batch_size, accelerator=accelerator)
    with mock.patch.object(data, "load_benchmark", lambda name, root=None: list(records)):
        table = run_eval(config, adapter=adapter, accelerator=accelerator)
    return {"evaluations": evaluations, "categories": categories, "table": table}


def main(argv):
    import torch

    from agdo.config import build_config

    torch.set_num_threads(1)  # two processes on a 2-core machine
    kind, output_dir, overrides = argv[0], argv[1], argv[2:]
    if kind == "eval":
        import json
        from pathlib import Path

        from accelerate import Accelerator

        accelerator = Accelerator()
        result = evaluate_tiny(output_dir, overrides, accelerator=accelerator)
        Path(output_dir, f"process{accelerator.process_index}.json").write_text(json.dumps(result))
    elif kind == "sft":
        from agdo.training.sft import SFTConfig, train_sft

        adapter, dataset = build_tiny_run()
        train_sft(build_config(SFTConfig, None, [f"output_dir={output_dir}", *overrides]), adapter=adapter,
                  dataset=dataset)
    else:
        from agdo.training.rl import RLConfig, train_rl

        adapter, prompts = build_tiny_rl_run()
        train_rl(build_config(RLConfig, None, [f"output_dir={output_dir}", *overrides]), adapter=adapter,
                 prompts=prompts)
    from agdo.cli import end_processes

    end_processes()  # as `agdo` does after every command


if __name__ == "__main__":
    main(sys.argv[1:])

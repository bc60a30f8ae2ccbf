"""A tiny SFT run for tests/test_sft.py, run as a script so it can be launched on several processes.

    python -m accelerate.commands.launch --multi_gpu --num_processes 2 ... tests/sft_worker.py OUT key=value ...

Builds the same tokenizer, data and model as the in-process tests (``build_tiny_run``), applies the
``key=value`` overrides to an ``SFTConfig`` through ``agdo.config.build_config`` and trains.
"""

from __future__ import annotations

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


def main(argv):
    import torch

    from agdo.config import build_config
    from agdo.training.sft import SFTConfig, train_sft

    torch.set_num_threads(1)  # two processes on a 2-core machine
    output_dir, overrides = argv[0], argv[1:]
    config = build_config(SFTConfig, None, [f"output_dir={output_dir}", *overrides])
    adapter, dataset = build_tiny_run()
    train_sft(config, adapter=adapter, dataset=dataset)


if __name__ == "__main__":
    main(sys.argv[1:])

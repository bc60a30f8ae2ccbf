"""``agdo`` command line: ``quickstart``, ``sft``, ``eval``, ``analyze``.

Every command takes an optional ``--config FILE`` (YAML) and ``key=value`` overrides of its config
dataclass, e.g. ``agdo sft --config configs/sft/dream_v0_instruct_7b_agdo.yaml learning_rate=2e-6``.
Multi-GPU: ``accelerate launch --config_file configs/accelerate/deepspeed_zero2.yaml -m agdo.cli sft ...``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Optional

from .config import build_config


@dataclasses.dataclass
class AnalyzeConfig:
    model_name_or_path: str = ""
    family: str = "auto"
    benchmark: str = "gsm8k"
    data_dir: Optional[str] = None
    limit: int = 8
    alg: str = "max_prob"
    gen_length: int = 256
    steps: int = 256
    block_length: Optional[int] = 32
    output_dir: str = "runs/analysis"


def _quickstart(config) -> None:
    from .quickstart import run_quickstart

    run_quickstart(config)


def _sft(config) -> None:
    from .training.sft import train_sft

    print(f"done: {train_sft(config)}")


def _eval(config) -> None:
    from .eval import run_eval

    table = run_eval(config)
    print(table)
    Path(config.output_dir, "results.md").write_text(table + "\n")


def _analyze(config: AnalyzeConfig) -> None:
    import torch

    from .analysis import analyze_decoding
    from .data import load_benchmark
    from .eval import encode_prompts, prompt_text
    from .models import load_adapter
    from .sampling import SamplerConfig

    adapter = load_adapter(config.model_name_or_path, family=config.family)
    records = load_benchmark(config.benchmark, config.data_dir)[: config.limit]
    ids, mask = encode_prompts(adapter.tokenizer, [prompt_text(r) for r in records], adapter.device)
    sampler = SamplerConfig(gen_length=config.gen_length, steps=config.steps, block_length=config.block_length,
                            alg=config.alg)
    with torch.no_grad():
        analysis = analyze_decoding(adapter, ids, mask, sampler, config.output_dir, label=config.benchmark)
    s, delta_p = analysis["s"], analysis["delta_p"]
    committed = torch.isfinite(s)
    print(f"{int(committed.sum())} tokens: mean S at commit {s[committed].mean():.3f}, "
          f"mean ΔP {delta_p[committed].mean():.4f}")
    for name, path in analysis["paths"].items():
        print(f"{name}: {path}")


def _commands() -> dict:
    from .eval import EvalConfig
    from .quickstart import QuickstartConfig
    from .training.sft import SFTConfig

    return {
        "quickstart": (QuickstartConfig, _quickstart, "small end-to-end AGDO reproduction on CPU"),
        "sft": (SFTConfig, _sft, "supervised fine-tuning: agdo | random | blockwise | left_to_right"),
        "eval": (EvalConfig, _eval, "benchmarks x decoding settings x seeds -> accuracy table"),
        "analyze": (AnalyzeConfig, _analyze, "attention analysis plots (paper Figs. 1, 2, 6)"),
    }


def main(argv=None) -> None:
    commands = _commands()
    parser = argparse.ArgumentParser(prog="agdo", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (cls, _, help_text) in commands.items():
        fields = ", ".join(f.name for f in dataclasses.fields(cls))
        command = sub.add_parser(name, help=help_text, description=f"{help_text}. Fields: {fields}")
        command.add_argument("--config", default=None, help="YAML file with config fields")
        command.add_argument("overrides", nargs="*", metavar="key=value", help="config field overrides")
    args = parser.parse_args(argv)
    cls, run, _ = commands[args.command]
    try:
        config = build_config(cls, args.config, args.overrides)
    except (TypeError, ValueError) as err:
        parser.error(str(err))
    run(config)


if __name__ == "__main__":
    main(sys.argv[1:])

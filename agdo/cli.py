"""``agdo`` command line: ``quickstart``, ``sft``, ``rl``, ``filter-overdenoising``, ``eval``, ``table``, ``analyze``.

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
    """What ``agdo analyze`` runs; validated on construction (types, a known ``benchmark``, ``limit >= 1``,
    decoding fields that make a valid ``SamplerConfig``)."""

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

    def __post_init__(self):
        from .config import coerce_fields
        from .data import BENCHMARKS

        coerce_fields(self)
        if self.benchmark not in BENCHMARKS:
            raise ValueError(f"AnalyzeConfig: unknown `benchmark` {self.benchmark!r}; available: {list(BENCHMARKS)}")
        if self.limit < 1:
            raise ValueError(f"AnalyzeConfig: `limit` must be >= 1, got {self.limit}")
        self.sampler_config()

    def sampler_config(self):
        from .sampling import SamplerConfig

        try:
            return SamplerConfig(gen_length=self.gen_length, steps=self.steps, block_length=self.block_length,
                                 alg=self.alg)
        except ValueError as error:
            raise ValueError(f"AnalyzeConfig: {error}") from None


def _quickstart(config) -> None:
    from .quickstart import run_quickstart

    run_quickstart(config)


def _sft(config) -> None:
    from .training.sft import train_sft

    print(f"done: {train_sft(config)}")


def _rl(config) -> None:
    from .training.rl import train_rl

    print(f"done: {train_rl(config)}")


def _filter_overdenoising(config) -> None:
    from accelerate import Accelerator

    from .training.mdpo import filter_overdenoising

    accelerator = Accelerator()  # under `accelerate launch`: each process decodes its share of the prompts
    counts = filter_overdenoising(config, accelerator=accelerator)
    total = sum(counts.values())
    accelerator.print(" | ".join(f"{name}: {count} ({100 * count / total:.1f}%)" for name, count in counts.items()))
    accelerator.print(f"wrote {counts['over_denoising']} over-denoising prompts to {config.output_file}")


def _eval(config) -> None:
    from accelerate import Accelerator

    from .eval import run_eval

    accelerator = Accelerator()  # under `accelerate launch`: each process decodes its share of the records
    table = run_eval(config, accelerator=accelerator)
    if accelerator.is_main_process:
        print(table)
        Path(config.output_dir, "results.md").write_text(table + "\n")


def _table(config) -> None:
    from accelerate import Accelerator

    from .tables import run_table

    accelerator = Accelerator()  # under `accelerate launch`: each process decodes its share of every cell
    table = run_table(config, accelerator=accelerator)
    if accelerator.is_main_process:
        print(table)


def _analyze(config: AnalyzeConfig) -> None:
    import torch

    from .analysis import analyze_decoding
    from .data import load_benchmark
    from .eval import encode_prompts, prompt_text
    from .models import load_adapter

    records = load_benchmark(config.benchmark, config.data_dir)[: config.limit]  # bad data fails before the model loads
    if not config.model_name_or_path:
        raise ValueError("AnalyzeConfig: `model_name_or_path` is required (a model directory or hub id)")
    adapter = load_adapter(config.model_name_or_path, family=config.family)
    ids, mask = encode_prompts(adapter.tokenizer, [prompt_text(r) for r in records], adapter.device)
    sampler = config.sampler_config()
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
    from .tables import TableConfig
    from .training.mdpo import OverdenoisingConfig
    from .training.rl import RLConfig
    from .training.sft import SFTConfig

    return {
        "quickstart": (QuickstartConfig, _quickstart, "small end-to-end AGDO reproduction on CPU"),
        "sft": (SFTConfig, _sft, "supervised fine-tuning: agdo | random | blockwise | left_to_right"),
        "rl": (RLConfig, _rl, "reinforcement learning: agdo | tracerl | diffu_grpo | coupled | wd1 | mdpo"),
        "filter-overdenoising": (OverdenoisingConfig, _filter_overdenoising,
                                 "MDPO's data filter: prompts right at some denoising step, wrong at the end"),
        "eval": (EvalConfig, _eval, "benchmarks x decoding settings x seeds -> accuracy table"),
        "table": (TableConfig, _table, "a paper's result table: our numbers beside the paper's"),
        "analyze": (AnalyzeConfig, _analyze, "attention analysis plots (paper Figs. 1, 2, 6)"),
    }


class _ConfigPath(argparse.Action):
    """``--config FILE``, at most once."""

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, self.dest, None) is not None:
            parser.error(f"{option_string} given twice ({getattr(namespace, self.dest)!r} and {values!r})")
        setattr(namespace, self.dest, values)


def main(argv=None) -> None:
    """``agdo COMMAND [--config FILE] [key=value ...]``; ``--config`` may come anywhere after COMMAND."""
    commands = _commands()
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="agdo", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    command_parsers = {}
    for name, (cls, _, help_text) in commands.items():
        fields = ", ".join(f.name for f in dataclasses.fields(cls))
        command = sub.add_parser(name, help=help_text, description=f"{help_text}. Fields: {fields}")
        command.add_argument("--config", default=None, action=_ConfigPath, help="YAML file with config fields")
        command.add_argument("overrides", nargs="*", metavar="key=value", help="config field overrides")
        command_parsers[name] = command
    if not argv or argv[0] not in commands:
        parser.parse_args(argv)  # help, or the error for a missing/unknown command
        parser.error(f"expected a command, one of {list(commands)}")  # pragma: no cover - parse_args exits
    name, command = argv[0], command_parsers[argv[0]]
    # A positional with nargs="*" stops at the first option, so `eval limit=3 --config x.yaml seeds=[0]` fails
    # with plain parse_args; intermixed parsing collects the positionals wherever they are.
    args = command.parse_intermixed_args(argv[1:])
    cls, run, _ = commands[name]
    try:
        config = build_config(cls, args.config, args.overrides)
    except (TypeError, ValueError, FileNotFoundError) as err:
        command.error(str(err))
    run(config)
    end_processes()


def end_processes() -> None:
    """Under ``accelerate launch``: every process waits for the others, then the process group is destroyed, so
    that no process exits while another still talks to it (gloo then aborts the exiting one: "terminate called
    without an active exception"). Nothing in a single process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])

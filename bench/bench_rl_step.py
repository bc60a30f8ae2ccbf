"""One RL step of every method — AGDO-RL vs TraceRL (the baseline), diffu-GRPO, coupled GRPO, wd1, MDPO —
and the share of the attention analysis in AGDO-RL's.

Both go through ``agdo.training.rl.RLTrainer.step`` with a real (single-process) accelerator: rollouts
(static decoding, one token per step) → exact-match rewards in a worker process → rows → one optimizer
update. TraceRL (baseline) trains along the rollout's trace; AGDO-RL adds one no-grad forward per response
with the last layer's statistics captured (``S0``, ``Abar_RR``, ``I``) and the greedy order — the
"attention analysis" whose share of the step the paper reports as 3% with eager attention (Table 8) and
our target is <= 1% on GPU. The share printed in the note column is the analysis phase's wall time over
the step's (CUDA-synchronised at the phase edges), measured in the timed rounds, beside the measured
training forwards per response (the methods' default settings: one mask per response for the d1 family,
so their steps are cheaper than the order methods' unless ``masks_per_sample`` matches them). MDPO's step
also rewards every step's prediction (here a constant-time scripted reward).

Cases: a tiny generic model on CPU; on a GPU (skipped without CUDA) a random-init bf16 model with
Dream-v0-Instruct-7B's trunk shapes (hidden 3584, 28/4 heads, head dim 128, intermediate 18944), 4 of
its 28 layers, bidirectional and shifted like Dream, but the 15-token vocabulary of the package's
character tokenizer (the prompts are text), so the lm-head cost is NOT Dream's. 4 prompts x 4 rollouts of
256 tokens after prompts of ~8 tokens.

Run: ``pytest bench/bench_rl_step.py`` (``--bench-report FILE`` for the Markdown table).
"""

from __future__ import annotations

import statistics

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState

from agdo import tasks
from agdo.models import load_adapter
from agdo.training.rl import RLConfig, RLTrainer

CASES = {
    "cpu-tiny": dict(device="cpu", dtype=torch.float32, hidden=64, layers=2, heads=4, kv_heads=2,
                     intermediate=128, completion=16, prompts=2, generations=4, forward_batch_size=64),
    "cuda-dream-trunk-4l": dict(device="cuda", dtype=torch.bfloat16, hidden=3584, layers=4, heads=28, kv_heads=4,
                                intermediate=18944, completion=256, prompts=4, generations=4, forward_batch_size=8),
}
METHODS = ["tracerl", "agdo", "diffu_grpo", "coupled", "wd1", "mdpo"]


def _adapter(case):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = tasks.build_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=case["hidden"], intermediate_size=case["intermediate"],
        num_hidden_layers=case["layers"], num_attention_heads=case["heads"], num_key_value_heads=case["kv_heads"],
        head_dim=case["hidden"] // case["heads"], max_position_embeddings=4096, is_causal=False,
        diffusion_shift=case["device"] == "cuda", mask_token_id=tokenizer.mask_token_id,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(case["dtype"])
    try:
        torch.manual_seed(0)  # the same random model for every method: same rollouts, same response lengths
        with torch.device(case["device"]):
            model = Qwen2ForCausalLM(config)
    finally:
        torch.set_default_dtype(default_dtype)
    return load_adapter(model, tokenizer=tokenizer)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case_name", list(CASES))
def test_rl_step(measure, tmp_path, case_name, method):
    case = CASES[case_name]
    if case["device"] == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    adapter = _adapter(case)
    problems = tasks.addition_problems(case["prompts"], digits=3, seed=0)
    prompts = [{"prompt": p["prompt"], "answer": p["answer"], "reward": "exact"} for p in problems]
    config = RLConfig(output_dir=str(tmp_path), method=method, post_num=0, prompts_per_step=case["prompts"],
                      num_generations=case["generations"], max_completion_length=case["completion"],
                      forward_batch_size=case["forward_batch_size"], beta=0.0, reward_workers=1,
                      mixed_precision="no", max_steps=10**6)
    trainer = RLTrainer(config, adapter, prompts, accelerator=Accelerator(cpu=case["device"] == "cpu"))
    records = [trainer.dataset[i] for i in range(case["prompts"])]
    # Random weights never answer right, so every group would be skipped: fixed rewards (1, 0, 1, 0, ...)
    # per group make every method train on every response. Rewards are not what this bench times.
    trainer.rewards.score = lambda records, completions: [float(i % 2 == 0) for i in range(len(completions))]
    shares = []

    def step():
        metrics = trainer.step([records], epoch=0)
        shares.append(metrics.get("share_analysis", 0.0))
        return metrics

    try:
        metrics = step()
        assert metrics["updates"] == 1 and metrics["groups_kept"] == case["prompts"], metrics
        measure(step, group=f"rl_step/{case_name}", impl=method, baseline=method == "tracerl",
                rounds=3,
                note=lambda: f"analysis {100 * statistics.median(shares):.2f}% of the step, "
                             f"{metrics['train_forward_passes_per_response']:.1f} training forwards/response")
    finally:
        trainer.rewards.close()

"""MDPO (paper 003): rewards on every denoising step, step advantages, step rows, and the over-denoising filter.

A masked diffusion model predicts a complete sequence at every step (the sampler's ``predictions`` record:
each masked position filled, :class:`agdo.sampling.GenerationResult`), so each step can be rewarded.
Indexing decoding steps forward, ``n = 0 .. L-1`` for a trajectory of ``L`` steps and ``R_n`` the reward of
step ``n``'s prediction (``R_{-1} = 0``: the fully masked start scores nothing), Eq. 6 / Eq. 11 read

    a_n = (R_n - R_{n-1}) + mean(R_{n+1}, ..., R_{L-1})        (n < L - 1)
    a_{L-1} = (R_{L-1} - R_{L-2}) + R_{L-1}                    (the last step: its "later" term is the final reward)

The last step's prediction is the final response, so ``R_{L-1}`` is the final reward (not scored twice).
Scores are normalised per step index over the responses of a group that reached that step
(``(a - mean) / (std + 1e-4)``, population std, like the final-reward advantages of SPEC §5).

Over-denoising (paper 003 §3.3): a trajectory whose prediction was correct at some intermediate step but
whose final response is wrong. :func:`filter_overdenoising` decodes a prompt set once and keeps those
prompts, the data MDPO trains on in the paper.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from .masking import MaskedRows, _assemble

WEIGHTINGS = ("released", "mean")
ScoreFunction = Callable[[Sequence[dict], Sequence[str]], list]


def step_rewards(score: ScoreFunction, records: Sequence[dict], predictions: torch.Tensor, masked: torch.Tensor,
                 final_rewards: torch.Tensor, decode: Callable[[torch.Tensor], str]) -> torch.Tensor:
    """``(B, T)`` float64 reward of every step's prediction, NaN after a row's last step.

    ``predictions``/``masked``: the sampler's ``(T, B, R)`` records (a row's steps are the ones with a masked
    position going in); ``final_rewards`` ``(B,)``: the reward of each final response, used for the last step.
    Each distinct ``(record, text)`` is scored once (MDPO's step predictions repeat a lot), in one call of
    ``score(records, completions)``.
    """
    live = masked.any(-1).transpose(0, 1).cpu()  # (B, T)
    B, T = live.shape
    if len(records) != B or final_rewards.shape != (B,):
        raise ValueError(f"step_rewards: {len(records)} records and {tuple(final_rewards.shape)} final rewards "
                         f"for {B} trajectories")
    lengths = live.sum(1)
    rewards = torch.full((B, T), float("nan"), dtype=torch.float64)
    # Steps to score: every step but each row's last (its prediction is the final response). Identical
    # predictions are decoded once (trajectories repeat a prediction over many steps).
    scored = torch.arange(T)[None, :] < (lengths - 1)[:, None]  # (B, T)
    rows, steps = scored.nonzero(as_tuple=True)
    texts, inverse = [], torch.zeros(0, dtype=torch.long)
    if len(rows):
        unique, inverse = torch.unique(predictions.cpu()[steps, rows], dim=0, return_inverse=True)
        texts = [decode(tokens) for tokens in unique]
    wanted, where = {}, []
    for b, t, u in zip(rows.tolist(), steps.tolist(), inverse.tolist()):
        key = (id(records[b]), texts[u])
        wanted.setdefault(key, (records[b], texts[u]))
        where.append((b, t, key))
    last = lengths > 0
    rewards[last, (lengths - 1)[last]] = final_rewards[last].double().cpu()
    keys = list(wanted)
    scores = dict(zip(keys, score([wanted[k][0] for k in keys], [wanted[k][1] for k in keys]))) if keys else {}
    for b, t, key in where:
        rewards[b, t] = scores[key]
    return rewards


def step_scores(rewards: torch.Tensor) -> torch.Tensor:
    """Eq. 6's ``a_n`` for ``(B, T)`` step rewards (NaN after each row's last step; NaN kept there)."""
    live = ~torch.isnan(rewards)
    lengths = live.sum(1, keepdim=True)
    R = torch.nan_to_num(rewards, nan=0.0)
    previous = torch.nn.functional.pad(R, (1, 0))[:, :-1]
    # Sum and count of R_{n+1 .. L-1}: a reversed cumulative sum, shifted by one.
    later_sum = R.flip(1).cumsum(1).flip(1) - R
    n = torch.arange(R.shape[1]).unsqueeze(0)
    later_count = (lengths - 1 - n).clamp(min=0)
    final = R.gather(1, (lengths - 1).clamp(min=0))
    later_mean = torch.where(later_count > 0, later_sum / later_count.clamp(min=1), final)
    return torch.where(live, R - previous + later_mean, float("nan"))


def step_advantages(scores: torch.Tensor, group_size: int, *, scale_rewards: bool = True) -> torch.Tensor:
    """Per-step group normalisation of ``(B, T)`` scores (B = groups × ``group_size``); 0 where NaN."""
    B, T = scores.shape
    grouped = scores.view(B // group_size, group_size, T)
    live = ~torch.isnan(grouped)
    count = live.sum(1, keepdim=True).clamp(min=1)
    values = torch.nan_to_num(grouped, nan=0.0)
    mean = values.sum(1, keepdim=True) / count
    centred = torch.where(live, values - mean, 0.0)
    if scale_rewards:
        std = (centred.square().sum(1, keepdim=True) / count).sqrt()
        centred = centred / (std + 1e-4)
    return centred.view(B, T)


def top_steps(advantages: torch.Tensor, count: Optional[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sample, step)`` of each row's ``count`` steps with the largest ``|A|`` (paper 003 App. A.3: "sort
    the denoising steps according to their absolute advantage values and pick the largest c"); steps with
    ``A = 0`` carry no signal and are never taken. Ties go to the earlier step. ``count=None``: all."""
    order = advantages.abs().sort(dim=1, descending=True, stable=True)
    take = advantages.shape[1] if count is None else min(count, advantages.shape[1])
    steps, magnitude = order.indices[:, :take], order.values[:, :take]
    sample = torch.arange(advantages.shape[0]).unsqueeze(1).expand_as(steps)
    useful = magnitude > 0
    return sample[useful], steps[useful]


def step_rows(sequences: torch.Tensor, attention_mask: torch.Tensor, *, response_start: int, predictions,
              masked, sample: torch.Tensor, step: torch.Tensor, mask_token_id: int, weighting: str = "released",
              prediction_probs: Optional[torch.Tensor] = None) -> MaskedRows:
    """One row per chosen ``(sample, step)``: input = the state entering that step (its masked positions
    masked), targets = that step's prediction, every masked position supervised (Eq. 4's indicator).

    Token weights (``weighting``): ``"mean"`` — ``1/m`` (``m`` = the step's masked tokens: the mean over the
    row's supervised tokens, SPEC §5); ``"released"`` — the released MDPO code's ``c_k · λ_t / m`` with
    ``λ_t = R / m`` (``R`` = completion length) and ``c_k`` the probability the sampler gave the prediction
    at that step (``prediction_probs``). Paper 003 writes neither weight (Eq. 4 sums over the masked tokens).
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"`weighting` must be one of {WEIGHTINGS}, got {weighting!r}")
    device = sequences.device
    sample, step = sample.to(device), step.to(device)
    state_masked = masked[step, sample]  # (M, R)
    clean = sequences[sample].clone()
    clean[:, response_start:] = predictions[step, sample]
    count = state_masked.sum(-1, keepdim=True).clamp(min=1)
    weights = state_masked / count
    if weighting == "released":
        if prediction_probs is None:
            raise ValueError("weighting='released' needs the sampler's prediction_probs")
        confidence = torch.nan_to_num(prediction_probs[step, sample].float(), nan=0.0)
        weights = weights * confidence * (state_masked.shape[1] / count)
    rows_index = torch.arange(sample.shape[0], device=device)
    rows = _assemble(clean, attention_mask[sample], response_start, rows_index, state_masked, weights,
                     mask_token_id, step)
    return rows._replace(sample_index=sample)


# ------------------------------------------------------------------------------------- the filter


@dataclasses.dataclass
class OverdenoisingConfig:
    """What ``agdo filter-overdenoising`` runs: decode every prompt once, reward every step's prediction,
    write the over-denoising prompts (correct at some step, wrong at the end) as a jsonl of task records."""

    model_name_or_path: str = ""
    family: str = "auto"
    train_file: str = ""
    benchmarks: Optional[list[str]] = None
    data_dir: Optional[str] = None
    limit: Optional[int] = None
    output_file: str = "runs/overdenoising.jsonl"
    gen_length: int = 256
    steps: int = 128
    block_length: Optional[int] = None
    alg: str = "max_prob"
    temperature: float = 0.0
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    schedule: str = "linear"
    stop_at_eos: bool = False
    # Block KV cache of the decoding: none (exact) | prefix | dual (Fast-dLLM's approximations; agdo.sampling).
    cache: str = "none"
    cache_lookahead: Optional[int] = None  # prefix cache: positions after the block recomputed (None: all)
    batch_size: int = 8
    seed: int = 0
    reward_workers: int = 2
    pass_threshold: float = 1.0

    def __post_init__(self):
        from ..config import coerce_fields

        coerce_fields(self)
        if bool(self.train_file) == bool(self.benchmarks):
            raise ValueError("OverdenoisingConfig: give exactly one of `train_file` (jsonl of task records) or "
                             "`benchmarks`")
        for name in ("batch_size",):
            if getattr(self, name) < 1:
                raise ValueError(f"OverdenoisingConfig: `{name}` must be >= 1, got {getattr(self, name)}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"OverdenoisingConfig: `limit` must be >= 1 or null, got {self.limit}")
        if self.reward_workers < 0:
            raise ValueError(f"OverdenoisingConfig: `reward_workers` must be >= 0, got {self.reward_workers}")
        self.sampler_config()

    def sampler_config(self):
        from ..sampling import SamplerConfig

        try:
            return SamplerConfig(gen_length=self.gen_length, steps=self.steps, block_length=self.block_length,
                                 alg=self.alg, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                                 schedule=self.schedule, stop_at_eos=self.stop_at_eos, cache=self.cache,
                                 cache_lookahead=self.cache_lookahead, return_predictions=True)
        except ValueError as error:
            raise ValueError(f"OverdenoisingConfig: {error}") from None


CATEGORIES = ("correct", "over_denoising", "never_correct")


@torch.no_grad()
def classify_trajectories(adapter, records: Sequence[dict], sampler, *, score: ScoreFunction, seed: int,
                          batch_size: int, pass_threshold: float = 1.0, accelerator=None) -> list[str]:
    """The category of each record's trajectory: ``correct`` (final response passes), ``over_denoising``
    (some intermediate prediction passed, the final one does not) or ``never_correct``.

    With an ``accelerator`` each process decodes and scores its share of the records; every process
    returns the categories of all of them, in order."""
    from ..eval import decode_completion, encode_prompts, prompt_text
    from ..sampling import decode_across_processes, generate
    from .masking import sample_generator

    if not sampler.return_predictions:
        raise ValueError("classify_trajectories: the sampler config must have return_predictions=True")
    tokenizer, stop = adapter.tokenizer, adapter.stop_token_ids

    # Scored where decoded: every step's prediction is scored, and only the categories travel.
    def classify_batch(batch, indices):
        batch = list(batch)
        ids, mask = encode_prompts(tokenizer, [prompt_text(r) for r in batch], adapter.device)
        generators = [sample_generator(seed, 0, i, device=adapter.device) for i in indices]
        result = generate(adapter, ids, mask, sampler, generator=generators)
        finals = torch.tensor(score(batch, [decode_completion(tokenizer, r, stop) for r in result.response]),
                              dtype=torch.float64)
        rewards = step_rewards(score, batch, result.predictions, result.masked, finals,
                               lambda tokens: decode_completion(tokenizer, tokens, stop))
        passed = (rewards >= pass_threshold).any(1)  # NaN (after the last step) compares False
        return ["correct" if finals[b] >= pass_threshold else "over_denoising" if passed[b] else "never_correct"
                for b in range(len(batch))]

    return decode_across_processes(records, batch_size, classify_batch, accelerator=accelerator,
                                   desc="over-denoising")


def filter_overdenoising(config: OverdenoisingConfig, *, adapter=None, accelerator=None) -> dict:
    """Run the filter; writes ``config.output_file`` and returns the count of each category.

    With an ``accelerator`` (``accelerate launch``) the model is moved to ``accelerator.device``, each
    process decodes its share of the prompts, the main process writes the file and every process returns
    the counts."""
    from ..data import load_benchmark, read_task_jsonl
    from ..models import load_adapter
    from ..rewards.pool import RewardPool

    if config.benchmarks:
        records = [r for name in config.benchmarks for r in load_benchmark(name, config.data_dir)]
    else:
        records = read_task_jsonl(config.train_file)
    records = records[: config.limit]
    if adapter is None:
        if not config.model_name_or_path:
            raise ValueError("OverdenoisingConfig: `model_name_or_path` is required (a model directory or hub id)")
        adapter = load_adapter(config.model_name_or_path, family=config.family)
    if accelerator is not None:
        adapter.model.to(accelerator.device)
    was_training = adapter.model.training
    adapter.model.eval()
    pool = RewardPool(config.reward_workers)
    try:
        categories = classify_trajectories(adapter, records, config.sampler_config(), score=pool.score,
                                           seed=config.seed, batch_size=config.batch_size,
                                           pass_threshold=config.pass_threshold, accelerator=accelerator)
    finally:
        pool.close()
        adapter.model.train(was_training)
    if accelerator is None or accelerator.is_main_process:
        output = Path(config.output_file)
        output.parent.mkdir(parents=True, exist_ok=True)
        with open(output, "w") as file:
            for record, category in zip(records, categories):
                if category == "over_denoising":
                    file.write(json.dumps({k: v for k, v in record.items() if k != "index"}) + "\n")
    return {name: categories.count(name) for name in CATEGORIES}

"""Reinforcement learning for diffusion LMs (GRPO family): AGDO-RL (paper Alg. 3, Eq. 10-11), the baselines
of the AGDO paper's Tables 2-4 (TraceRL, diffu-GRPO, coupled GRPO, wd1) and MDPO (paper 003), as ``method=``
values of one trainer.

One RL step, top to bottom (SPEC §5), on every process for its share of ``prompts_per_step`` prompts:

1. Rollouts: ``num_generations`` (G) responses per prompt with :func:`agdo.sampling.generate` (left-padded
   batches, one generator per response keyed by ``(seed, epoch, prompt index, g)``, so a response does not
   depend on its batch or on the number of processes), recording the trace (commit step per token) and,
   for mdpo, every step's prediction.
2. Rewards: :class:`agdo.rewards.pool.RewardPool` scores every completion with the reward its record names,
   in parallel worker processes (code only through the sandbox); mdpo also scores every step's prediction
   (:mod:`agdo.training.mdpo`, each distinct prediction once).
3. Advantages per group: ``A = (r - mean_G) / (std_G + 1e-4)`` (population std; ``scale_rewards: false``
   keeps ``r - mean_G``, as d1, wd1 and DiffuCoder's recipe do); groups whose rewards are
   all equal carry no signal and are skipped; ``filter_pass_rate: [low, high]`` also drops groups whose pass
   rate (share of rewards >= ``pass_threshold``) is outside the range (TraceRL: [0.2, 0.8]). A group is never
   split: all G responses of a prompt are rolled out and normalised on one process.
4. Rows, by method:
   - ``agdo``: one extra no-grad forward of the current policy over each finished rollout gives the attention
     order (Alg. 1, :func:`agdo.orders.attention_order`) and, from the same forward, the influence ``I``
     (Eq. 8, ``influence_norm`` "sum" by default); token advantage ``A'_k = A + sign(A)·δ·I_k`` (Eq. 11).
     Each step ``t`` of the order is one row: ``M_sub`` = a random subset of its tokens (``p ~
     U(mask_ratio)``, Alg. 3 line 13), every later step masked.
   - ``tracerl``: the rollout's own trace (:func:`agdo.orders.trace_order`), ``shrink`` consecutive decode
     steps per row; a row masks every token of its step and later and supervises its step's tokens
     (mask ratio 1); token advantage = ``A``.
   - ``diffu_grpo`` (d1): :func:`agdo.training.masking.mean_field_rows` — the completion fully masked, each
     prompt token masked w.p. ``p_mask_prompt``; ``masks_per_sample`` rows per response, drawn afresh for
     every inner iteration (all before the first update, with their ``logp_old``, as d1 does); token
     advantage ``A``.
   - ``coupled`` (DiffuCoder): :func:`agdo.training.masking.coupled_rows` — per draw ``t ~ U(0.2, 0.8)`` the
     fully masked row, a mask and its complement; :func:`coupled_loss` combines their log-probs per token.
   - ``wd1``: d1's rows, no ratio and no clip: :func:`weighted_logp_loss` with the per-response weight
     ``softmax(A)_i - softmax(-A)_i`` over the group and the log-prob summed over the completion.
   - ``mdpo``: a row per trained denoising step (the ``max_steps_per_sample`` steps with the largest
     ``|A_t|``, 8 by default): input = the masked state entering the step, targets = the step's prediction,
     token advantage = the step advantage (:mod:`agdo.training.mdpo`). A group whose final rewards are all
     equal is kept when its steps differ.
   ``post_num`` trained stop tokens per SPEC §4; ``max_steps_per_sample`` caps rows per response.
   Compute matching (AGDO paper §6.1: diffu-GRPO and coupled get 15 masks per response): every step logs
   ``train_forward_passes_per_response`` and ``forward_passes_per_response``, measured.
5. Objective (Eq. 10): ``logp_old`` from one no-grad pass of the pre-update policy over exactly the rows
   trained (skipped when each row is trained once, right after its rollout: then it equals the detached
   ``logp``, as in TRL); per token ``-min(r·A', clip(r, 1-ε, 1+ε_high)·A') + β·k3``, with ``r = exp(logp -
   logp_old)`` and the k3 estimator ``exp(ref - logp) - (ref - logp) - 1`` of the KL to the reference —
   the initial policy (``reference: initial``) or, as TraceRL does, the old policy (``reference: old``).
   Mean over a row's supervised tokens, rows averaged over the optimizer update across all processes
   (:meth:`agdo.training.loop.Trainer.optimizer_update`). ``num_iterations`` (μ) passes over the rows.

Rollout decoding: App. C says "static", one token per step, temperature 1, without naming the selection
rule; ``decoding_alg`` defaults to ``max_prob`` (TraceRL's low-confidence rule). On the package's toy task,
AGDO-RL trained along the attention order of ``max_prob`` rollouts LOWERS the reward while TraceRL raises
it: the rows then condition on contexts the sampler never produced, and the decisions it did make (e.g.
where the EOS goes, decided first) are not the ones trained. With pure Max-S rollouts (``decoding_alg:
max_s``, ``candidate_threshold: 0``), whose trajectories follow the attention, AGDO-RL raises the reward
(tests/test_rl.py). Whether this holds at 7B scale is unmeasured.

Where the papers, the released code and the spec differ (we follow the spec, and the released code where the
spec is silent): d1 and coupled average the loss over all tokens of a micro-batch, we over each row's tokens
then over rows (SPEC §5); DiffuCoder's advantage is leave-one-out (``G/(G-1)`` times ours); d1's config
default ``p_mask_prompt`` is 0.3, its training recipe and SPEC §5 use 0.15; wd1 sums its per-group objective
over a micro-batch that happens to be one group, ours is one group by construction (``x G`` so that the
update's mean over rows is the per-group sum); MDPO's released code uses k2 for the KL, sample std, logits
divided by the temperature, and the ``λ_t``/confidence token weights (our ``mdpo_weighting: released``
default; ``mean`` is SPEC §5's plain token mean) — we use k3, population std and raw logits.
Alg. 3 line 16 writes the old policy as ``π_ref``; SPEC §5 (and
TraceRL, GRPO) use the pre-update policy for the ratio and the reference only for the KL — we follow the
spec. Updates: each process's completions are split, in order, into updates of
``per_device_train_batch_size × gradient_accumulation_steps`` completions (None: all of them), as TRL
splits a generation batch; ``num_iterations`` repeats them.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import time
from pathlib import Path
from typing import NamedTuple, Optional

import torch
from torch.utils.data import Dataset

from .. import orders
from ..sampling import SamplerConfig, generate
from . import mdpo
from .loop import Trainer, TrainingArguments, select_rows
from .masking import (MaskedRows, concat_rows, coupled_rows, mean_field_rows, order_rows, sample_generator,
                      token_logprobs)

RL_METHODS = ("agdo", "tracerl", "diffu_grpo", "coupled", "wd1", "mdpo")
# Methods whose rows are random masks drawn afresh for every inner iteration (d1's estimator and its kin).
FRESH_MASK_METHODS = ("diffu_grpo", "coupled", "wd1")
REFERENCES = ("initial", "old")


@dataclasses.dataclass
class RLConfig(TrainingArguments):
    output_dir: str = "runs/rl"
    method: str = "agdo"
    # Prompts: a jsonl of task records (each with `reward` and the fields it reads), or benchmark names of
    # agdo.data (e.g. [gsm8k_train, math_train]) read from `data_dir`.
    train_file: str = ""
    benchmarks: Optional[list[str]] = None
    data_dir: Optional[str] = None
    max_prompt_length: int = 512
    # Completions per process and update (None: all of this process's completions in one update).
    per_device_train_batch_size: Optional[int] = None
    # Rollouts (paper App. C: 32 prompts x 8 responses, static, one token per step, temperature 1, 1,024).
    num_generations: int = 8
    prompts_per_step: int = 32
    max_completion_length: int = 1024
    diffusion_steps: Optional[int] = None  # None: one token per step
    block_length: Optional[int] = None  # None: the whole completion is one block
    # Several block lengths, one per prompt in turn (prompt index modulo the list): MDPO's "even mixture" of
    # semi-AR (128) and pure-diffusion (= max_completion_length) rollouts (paper 003 §3.4). Overrides
    # block_length.
    block_length_mixture: Optional[list[int]] = None
    temperature: float = 1.0
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    decoding_alg: str = "max_prob"
    candidate_threshold: float = 0.9  # max_s decoding: candidates need p > this (0: pure Max-S)
    # Confidence of the selection rules: None = the model family's (LLaDA "raw", Dream "sampling"; SPEC §6).
    confidence_from: Optional[str] = None
    # TraceRL's early stop (a finished all-pad block ends the row); off = decode every position, as the
    # reference samplers do.
    stop_at_eos: bool = False
    # Block KV cache of the rollouts: none (exact) | prefix | dual (Fast-dLLM's approximations; agdo.sampling).
    cache: str = "none"
    cache_lookahead: Optional[int] = None  # prefix cache: positions after the block recomputed (None: all)
    generation_batch_size: Optional[int] = None  # responses per generate call (None: all local ones)
    # Rewards and groups.
    reward_workers: int = 2
    pass_threshold: float = 1.0
    filter_pass_rate: Optional[list] = None
    # Objective.
    num_iterations: int = 1
    epsilon: float = 0.2
    epsilon_high: Optional[float] = None  # None: = epsilon
    beta: float = 0.01
    reference: str = "initial"
    # Rows.
    delta: float = 1.0
    influence_norm: str = "sum"
    # agdo: the attention that gives the order and I (SPEC §4 ablations; agdo.orders): "last" | "first" |
    # "middle" | int layer index; "all" | [query-head indices] | "local" | "global".
    attention_layer: str | int = "last"
    attention_heads: str | list[int] = "all"
    step_size: int = 1
    block_size: Optional[int] = None
    block_mode: str = "global"
    shrink: int = 1
    # Rows per response: a uniform subset of the order's steps (agdo, tracerl); mdpo: the steps with the
    # largest |A| (paper 003's c; None = 8 for mdpo, all steps otherwise).
    max_steps_per_sample: Optional[int] = None
    # diffu_grpo / wd1: rows per response and iteration; coupled: mask draws per response (2 rows each).
    # AGDO paper §6.1 gives diffu-GRPO and coupled 15 so that forward passes per response match.
    masks_per_sample: int = 1
    p_mask_prompt: float = 0.15  # d1: each prompt token masked with this probability
    scale_rewards: bool = True  # divide group-centred rewards by their std (False: d1, wd1, DiffuCoder recipe)
    # mdpo token weights (training.mdpo.step_rows): "released" (the MDPO code: confidence x lambda_t) | "mean"
    mdpo_weighting: str = "released"
    mask_ratio_min: Optional[float] = None  # None: the method's (agdo 0.1, tracerl 1.0)
    mask_ratio_max: Optional[float] = None  # None: the method's (agdo 0.9, tracerl 1.0)

    def __post_init__(self):
        super().__post_init__()
        if self.method not in RL_METHODS:
            raise ValueError(f"`method` must be one of {list(RL_METHODS)}, got {self.method!r}")
        orders.check_attention_layer(self.attention_layer)
        orders.check_attention_heads(self.attention_heads)
        if self.reference not in REFERENCES:
            raise ValueError(f"`reference` must be one of {list(REFERENCES)}, got {self.reference!r}")
        for name in ("num_generations", "prompts_per_step", "max_completion_length", "num_iterations",
                     "step_size", "shrink", "max_prompt_length", "masks_per_sample"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be >= 1, got {getattr(self, name)}")
        if self.num_generations < 2:
            raise ValueError("`num_generations` must be >= 2: a group of one has no relative advantage")
        for name in ("diffusion_steps", "generation_batch_size", "max_steps_per_sample", "block_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be >= 1 or null, got {getattr(self, name)}")
        if self.reward_workers < 0:
            raise ValueError(f"`reward_workers` must be >= 0, got {self.reward_workers}")
        if not 0 <= self.epsilon < 1 or (self.epsilon_high is not None and self.epsilon_high < 0):
            raise ValueError(f"need 0 <= `epsilon` < 1 and `epsilon_high` >= 0, got {self.epsilon}, {self.epsilon_high}")
        if self.beta < 0 or self.delta < 0:
            raise ValueError(f"`beta` and `delta` must be >= 0, got {self.beta}, {self.delta}")
        low, high = self.mask_ratio
        if not 0 < low <= high <= 1:
            raise ValueError(f"need 0 < `mask_ratio_min` <= `mask_ratio_max` <= 1, got {low}, {high}")
        if self.filter_pass_rate is not None:
            if len(self.filter_pass_rate) != 2 or not 0 <= self.filter_pass_rate[0] <= self.filter_pass_rate[1] <= 1:
                raise ValueError(f"`filter_pass_rate` must be [low, high] with 0 <= low <= high <= 1, got "
                                 f"{self.filter_pass_rate}")
        if self.method == "wd1" and self.beta > 0 and self.reference == "old":
            raise ValueError("wd1 has no old policy (no ratio): its KL needs `reference: initial` (or beta: 0)")
        if self.mdpo_weighting not in mdpo.WEIGHTINGS:
            raise ValueError(f"`mdpo_weighting` must be one of {list(mdpo.WEIGHTINGS)}, got {self.mdpo_weighting!r}")
        if not 0 <= self.p_mask_prompt <= 1:
            raise ValueError(f"`p_mask_prompt` must be in [0, 1], got {self.p_mask_prompt}")
        if self.train_file and self.benchmarks:
            raise ValueError("give either `train_file` or `benchmarks`, not both")
        if self.block_length_mixture is not None and not self.block_length_mixture:
            raise ValueError("`block_length_mixture` is empty: give block lengths, or null")
        for block_length in self.block_length_mixture or [self.block_length]:
            self.sampler_config(block_length)  # decoding settings are checked here, not at the first rollout

    @property
    def steps_per_sample(self) -> Optional[int]:
        """The cap on rows per response (``max_steps_per_sample``, or 8 steps for mdpo)."""
        if self.max_steps_per_sample is None and self.method == "mdpo":
            return 8
        return self.max_steps_per_sample

    @property
    def mask_ratio(self) -> tuple[float, float]:
        default = (0.1, 0.9) if self.method == "agdo" else (1.0, 1.0)
        return (default[0] if self.mask_ratio_min is None else self.mask_ratio_min,
                default[1] if self.mask_ratio_max is None else self.mask_ratio_max)

    def rollout_block_length(self, index: int) -> Optional[int]:
        """The block length of the rollouts of prompt ``index``."""
        if self.block_length_mixture:
            return self.block_length_mixture[index % len(self.block_length_mixture)]
        return self.block_length

    def sampler_config(self, block_length: Optional[int] = None) -> SamplerConfig:
        return SamplerConfig(
            gen_length=self.max_completion_length, steps=self.diffusion_steps or self.max_completion_length,
            block_length=self.block_length if block_length is None else block_length, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
            alg=self.decoding_alg, candidate_threshold=self.candidate_threshold, stop_at_eos=self.stop_at_eos,
            confidence_from=self.confidence_from, cache=self.cache, cache_lookahead=self.cache_lookahead,
            return_predictions=self.method == "mdpo",
        )


class PromptDataset(Dataset):
    """Task records; an item is the record plus its dataset ``index`` (it keys the randomness)."""

    def __init__(self, records: list[dict]):
        for i, record in enumerate(records):
            if not isinstance(record, dict) or "reward" not in record:
                raise ValueError(f"prompt record {i} must be a dict with a `reward` field")
        self.records = list(records)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        return {**self.records[index], "index": index}


class RLRows(NamedTuple):
    """Masked rows of finished rollouts with what the policy loss needs per token (``(M, N)`` each)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    targets: torch.Tensor
    weights: torch.Tensor  # 1/|M_sub| on the supervised tokens, 0 elsewhere
    completion: torch.Tensor  # (M,) the local completion each row comes from
    advantages: torch.Tensor  # A' per token
    old_logp: Optional[torch.Tensor]  # None: the detached current logp (rows trained once)
    ref_logp: Optional[torch.Tensor]  # None: no KL (beta = 0) or KL to the old policy


class Rollouts(NamedTuple):
    sequences: torch.Tensor  # (B, P + R)
    attention_mask: torch.Tensor  # (B, P + R)
    response_start: int
    trace: torch.Tensor  # (B, R)
    completions: list
    forward_passes: int  # sequence forwards run by the sampler
    predictions: Optional[torch.Tensor] = None  # (T, B, R) per-step predictions (mdpo)
    masked: Optional[torch.Tensor] = None  # (T, B, R) masked positions entering each step (mdpo)
    prediction_probs: Optional[torch.Tensor] = None  # (T, B, R) the sampler's p of each prediction (mdpo)


def group_advantages(rewards: torch.Tensor, *, pass_threshold: float = 1.0, filter_pass_rate=None,
                     scale_rewards: bool = True, drop_all_equal: bool = True):
    """``(advantages (n, G), keep (n,), passes (n,))`` for rewards ``(n, G)`` (SPEC §5 step 2).

    ``A = (r - mean) / (std + 1e-4)`` with the population std of the group (``scale_rewards=False``:
    ``r - mean``); ``keep`` is False for groups whose rewards are all equal (unless ``drop_all_equal`` is
    False) and, with ``filter_pass_rate = [low, high]``, for groups whose pass rate lies outside
    ``[low, high]``. Dropped groups get zero advantages.
    """
    rewards = rewards.double()
    mean = rewards.mean(1, keepdim=True)
    advantages = rewards - mean
    if scale_rewards:
        advantages = advantages / (rewards.std(1, unbiased=False, keepdim=True) + 1e-4)
    passes = (rewards >= pass_threshold).sum(1)
    keep = (rewards != rewards[:, :1]).any(1) if drop_all_equal else torch.ones(len(rewards), dtype=torch.bool)
    if filter_pass_rate is not None:
        rate = passes.double() / rewards.shape[1]
        keep &= (rate >= filter_pass_rate[0]) & (rate <= filter_pass_rate[1])
    return (advantages * keep[:, None]).float(), keep, passes


def policy_loss(logits: torch.Tensor, rows: RLRows, *, epsilon: float, epsilon_high: float, beta: float):
    """Sum over the rows of Eq. 10's per-row loss; returns ``(loss_sum, stats)``.

    Per supervised token ``k``: ``-min(r_k A'_k, clip(r_k, 1-ε, 1+ε_high) A'_k) + β k3_k``, weighted by the
    row's ``1/|M_sub|`` (a mean over the row's supervised tokens).
    """
    supervised = rows.weights > 0
    logp = token_logprobs(logits, rows.targets, supervised)
    old = logp.detach() if rows.old_logp is None else rows.old_logp[supervised]
    advantages, weights = rows.advantages[supervised], rows.weights[supervised]
    per_token, clipped = _clipped_surrogate(logp, old, advantages, epsilon, epsilon_high)
    stats = {"supervised_tokens": supervised.sum(), "clipped_tokens": clipped.sum()}
    if beta > 0:
        ref = old if rows.ref_logp is None else rows.ref_logp[supervised]
        log_ratio = ref - logp
        kl = torch.exp(log_ratio) - log_ratio - 1
        per_token = per_token + beta * kl
        stats["kl_row_sum"] = (kl.detach() * weights).sum()
    return (per_token * weights).sum(), stats


def wd1_weights(advantages: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """wd1's per-response weight ``softmax(A)_i - softmax(-A)_i`` over each group (``(n, G)``; 0 for dropped
    groups)."""
    weights = advantages.double().softmax(1) - (-advantages.double()).softmax(1)
    return (weights * keep[:, None]).float()


def _clipped_surrogate(logp, old, advantages, epsilon, epsilon_high):
    ratio = torch.exp(logp - old)
    low, high = 1 - epsilon, 1 + epsilon_high
    per_token = -torch.minimum(ratio * advantages, ratio.clamp(low, high) * advantages)
    clipped = ((ratio < low) & (advantages < 0)) | ((ratio > high) & (advantages > 0))
    return per_token, clipped


def coupled_loss(logits: torch.Tensor, rows: RLRows, *, epsilon: float, epsilon_high: float, beta: float):
    """Coupled-GRPO (DiffuCoder) on rows in triples (:func:`agdo.training.masking.coupled_rows`).

    Per trained token the coupled log-prob ``ℓ = ½ (ℓ_full + ℓ_t / t)`` if the draw's mask hides it, else
    ``½ (ℓ_full + ℓ_{1-t} / (1 - t))`` (the released code's combination); PPO clip on ``exp(ℓ - ℓ_old)`` and
    k3 KL on ``ℓ``, mean over the trained tokens. A triple is one estimate but three rows of the update's
    row count, so its loss is counted three times (the update then averages over triples).
    """
    if rows.input_ids.shape[0] % 3:
        raise ValueError(f"coupled rows come in triples, got {rows.input_ids.shape[0]} rows (a chunk split a triple)")
    supervised = rows.weights > 0
    per_row = torch.zeros(rows.weights.shape, dtype=torch.float32, device=logits.device)
    per_row[supervised] = token_logprobs(logits, rows.targets, supervised)
    weights = rows.weights.view(-1, 3, rows.weights.shape[1])

    def combine(logp):
        logp = logp.view_as(weights)
        return 0.5 * (logp[:, 0] + logp[:, 1] * weights[:, 1] + logp[:, 2] * weights[:, 2])

    tokens = weights[:, 0] > 0
    logp = combine(per_row)[tokens]
    old = logp.detach() if rows.old_logp is None else combine(rows.old_logp)[tokens]
    advantages = rows.advantages.view_as(weights)[:, 0][tokens]
    per_token, clipped = _clipped_surrogate(logp, old, advantages, epsilon, epsilon_high)
    stats = {"supervised_tokens": tokens.sum(), "clipped_tokens": clipped.sum()}
    token_weights = weights[:, 0][tokens]
    if beta > 0:
        ref = old if rows.ref_logp is None else combine(rows.ref_logp)[tokens]
        kl = torch.exp(ref - logp) - (ref - logp) - 1
        per_token = per_token + beta * kl
        stats["kl_row_sum"] = 3 * (kl.detach() * token_weights).sum()
    return 3 * (per_token * token_weights).sum(), stats


def weighted_logp_loss(logits: torch.Tensor, rows: RLRows, *, beta: float):
    """wd1's ratio-free objective (SPEC §5): per supervised token ``-w·logp + β·k3`` (``w`` = the response's
    wd1 weight, in ``rows.advantages``), weighted by the row's ``1/n``; returns ``(loss_sum, stats)``."""
    supervised = rows.weights > 0
    logp = token_logprobs(logits, rows.targets, supervised)
    weights = rows.weights[supervised]
    per_token = -rows.advantages[supervised] * logp
    stats = {"supervised_tokens": supervised.sum(), "clipped_tokens": torch.zeros((), device=logits.device)}
    if beta > 0:
        log_ratio = rows.ref_logp[supervised] - logp
        kl = torch.exp(log_ratio) - log_ratio - 1
        per_token = per_token + beta * kl
        stats["kl_row_sum"] = (kl.detach() * weights).sum()
    return (per_token * weights).sum(), stats


def _concat(per_sample: list, sequences, attention_mask) -> MaskedRows:
    """Rows of every sample as one batch; empty rows of the right shape when no sample has a signal."""
    if per_sample:
        return concat_rows(per_sample)
    index = torch.zeros(0, dtype=torch.long, device=sequences.device)
    return MaskedRows(sequences[:0], attention_mask[:0], sequences[:0], sequences[:0].float(), index, index)


def _overdenoised(step_rewards: torch.Tensor, final: torch.Tensor, pass_threshold: float) -> torch.Tensor:
    """``(B,)``: some step's prediction passed, the final response did not."""
    return (step_rewards >= pass_threshold).any(1) & (final < pass_threshold)


def _pad_steps(record: torch.Tensor, steps: int, fill) -> torch.Tensor:
    """A ``(T, b, R)`` per-step record padded to ``steps`` steps with ``fill`` (a row's final state)."""
    missing = steps - record.shape[0]
    if missing == 0:
        return record
    pad = torch.as_tensor(fill, dtype=record.dtype, device=record.device).expand(missing, *record.shape[1:])
    return torch.cat([record, pad])


class _Clock:
    """Exclusive wall time per phase (the paper's Table 8 split): a phase nested in another is charged to
    itself only. Synchronises CUDA at the edges so kernels are charged to the phase that launched them."""

    def __init__(self):
        self.seconds = {}
        self._inner = [0.0]  # time of the phases nested in the running one

    @contextlib.contextmanager
    def __call__(self, phase: str):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        self._inner.append(0.0)
        try:
            yield
        finally:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - start
            nested = self._inner.pop()
            self._inner[-1] += elapsed
            self.seconds[phase] = self.seconds.get(phase, 0.0) + elapsed - nested


class RLTrainer(Trainer):
    """One step = one batch of ``prompts_per_step`` prompts (this process: its share) → rollouts → rewards
    → rows → ``num_iterations`` x (updates per rollout batch) optimizer updates."""

    name = "rl"

    def __init__(self, config: RLConfig, adapter, prompts: list[dict], **kwargs):
        from ..rewards.pool import RewardPool

        if adapter.tokenizer is None:
            raise ValueError("RL needs an adapter with a tokenizer (prompts are text, rewards read text)")
        self.rewards = RewardPool(config.reward_workers)
        try:
            super().__init__(config, adapter, PromptDataset(prompts), **kwargs)
        except BaseException:
            self.rewards.close()
            raise
        saved = self.state.get("initial_fingerprint")
        if saved is not None and saved != self._initial_fingerprint:
            raise ValueError("resume: the model loaded as the initial policy is not the one this run started from "
                             "(its reference for the KL would differ); load the same `model_name_or_path`")
        self.state["initial_fingerprint"] = self._initial_fingerprint
        self.name = f"rl[{config.method}]"

    @property
    def per_device_batch_size(self) -> int:
        return self.config.prompts_per_step // self.accelerator.num_processes

    def setup(self) -> None:
        config, processes = self.config, self.accelerator.num_processes
        if config.prompts_per_step % processes:
            raise ValueError(f"`prompts_per_step` ({config.prompts_per_step}) must be a multiple of the number of "
                             f"processes ({processes}): a group is never split")
        local = config.prompts_per_step // processes * config.num_generations
        per_update = (config.per_device_train_batch_size or local) * config.gradient_accumulation_steps
        if local % per_update:
            raise ValueError(
                f"each process rolls out {local} completions per step, which must be a multiple of "
                f"per_device_train_batch_size x gradient_accumulation_steps = {per_update}")
        self.completions_per_update = per_update
        self.updates_per_generation = local // per_update
        self.updates_per_step = self.updates_per_generation * config.num_iterations
        # Each row trained once, right after its rollout: logp_old is the detached logp (no extra pass).
        # wd1 has no ratio, hence no logp_old.
        self.needs_old_pass = self.updates_per_step > 1 and config.method != "wd1"
        self.rows_per_unit = 3 if config.method == "coupled" else 1
        model = self.adapter.model
        with torch.no_grad():  # a cheap signature of the initial policy (every 4099th weight), checked on resume
            sample = [p.detach().reshape(-1)[::4099].double() for p in model.parameters()]
            self._initial_fingerprint = float(sum(s.square().sum() + s.sum() for s in sample))
        self.reference = None
        if config.beta > 0 and config.reference == "initial":
            self.reference = copy.deepcopy(model).requires_grad_(False).eval().to(self.accelerator.device)

    def describe(self) -> str:
        c = self.config
        detail = {
            "agdo": f"delta={c.delta} influence_norm={c.influence_norm} step_size={c.step_size} mask_ratio={c.mask_ratio}",
            "tracerl": f"shrink={c.shrink}",
            "diffu_grpo": f"masks_per_sample={c.masks_per_sample} p_mask_prompt={c.p_mask_prompt}",
            "wd1": f"masks_per_sample={c.masks_per_sample} p_mask_prompt={c.p_mask_prompt}",
            "coupled": f"masks_per_sample={c.masks_per_sample} (3 rows each)",
            "mdpo": f"steps trained per response={c.steps_per_sample} weighting={c.mdpo_weighting}",
        }[c.method]
        return (f"method={c.method} {detail} post_num={c.post_num} scale_rewards={c.scale_rewards}; "
                f"{c.prompts_per_step} prompts x {c.num_generations} generations per step, beta={c.beta} "
                f"(reference: {c.reference}), epsilon={c.epsilon}, num_iterations={c.num_iterations}, "
                f"{self.updates_per_step} optimizer update(s) per step")

    def progress(self, metrics: dict) -> dict:
        return {"reward": f"{metrics['reward_mean']:.3f}",
                "fwd/response": f"{metrics['forward_passes_per_response']:.1f}"}

    # ------------------------------------------------------------------------------------------ a step

    def step(self, window: list, epoch: int) -> dict:
        config, G = self.config, self.config.num_generations
        records = window[0]
        self._scored = 0  # completions sent to the reward workers this step
        clock = _Clock()
        self.model.eval()  # rollouts and the attention order from the deterministic policy (no dropout)
        with clock("rollout"):
            rollouts = self._rollout(records, epoch)
        expanded = [record for record in records for _ in range(G)]
        extra = {}
        with clock("reward"):
            rewards = torch.tensor(self.rewards.score(expanded, rollouts.completions), dtype=torch.float64)
            if config.method == "mdpo":
                per_step = mdpo.step_rewards(self._count_scores, expanded, rollouts.predictions, rollouts.masked,
                                             rewards, self._decode)
                extra["step_rewards"] = per_step
        # MDPO scores every step: a group whose final rewards are all equal may still differ step by step.
        advantages, keep, passes = group_advantages(
            rewards.view(-1, G), pass_threshold=config.pass_threshold, filter_pass_rate=config.filter_pass_rate,
            scale_rewards=config.scale_rewards, drop_all_equal=config.method != "mdpo")
        if config.method == "mdpo":
            step_advantages = mdpo.step_advantages(mdpo.step_scores(per_step), G, scale_rewards=config.scale_rewards)
            keep &= (step_advantages.view(len(records), -1) != 0).any(1)
            extra["step_advantages"] = step_advantages * keep.repeat_interleave(G)[:, None]
        with clock("train"):
            row_sets, row_extra = self._training_rows(rollouts, advantages, keep, records, epoch, clock, extra)
            updates = []
            for rows in row_sets:
                for u in range(self.updates_per_generation):
                    part = select_rows(rows, rows.completion // self.completions_per_update == u)
                    updates.append(self.optimizer_update([part], self._loss))
        return self._metrics(rollouts, rewards, advantages, keep, passes, updates, {**extra, **row_extra}, clock)

    def _count_scores(self, records, completions):
        self._scored += len(completions)
        return self.rewards.score(records, completions)

    def _decode(self, tokens: torch.Tensor) -> str:
        from ..eval import decode_completion

        return decode_completion(self.adapter.tokenizer, tokens, self.adapter.stop_token_ids)

    @torch.no_grad()
    def _rollout(self, records: list[dict], epoch: int) -> Rollouts:
        from ..eval import encode_prompts, prompt_text

        config, adapter, G = self.config, self.adapter, self.config.num_generations
        ids, mask = encode_prompts(adapter.tokenizer, [prompt_text(r) for r in records], self.accelerator.device)
        if ids.shape[1] > config.max_prompt_length:
            longest = max(range(len(records)), key=lambda i: int(mask[i].sum()))
            raise ValueError(f"prompt of record {records[longest]['index']} has {int(mask[longest].sum())} tokens "
                             f"> max_prompt_length={config.max_prompt_length}; nothing is truncated")
        ids, mask = ids.repeat_interleave(G, 0), mask.repeat_interleave(G, 0)
        generators = [sample_generator(config.seed, epoch, r["index"], g, 0, device=ids.device)
                      for r in records for g in range(G)]
        size = config.generation_batch_size or ids.shape[0]
        # Responses grouped by their block length (one unless block_length_mixture), in calls of `size`.
        block_lengths = [config.rollout_block_length(r["index"]) for r in records for _ in range(G)]
        calls = []
        for block_length in dict.fromkeys(block_lengths):
            members = [i for i, length in enumerate(block_lengths) if length == block_length]
            for start in range(0, len(members), size):
                part = members[start : start + size]
                calls.append((part, generate(adapter, ids[part], mask[part], config.sampler_config(block_length),
                                             generator=[generators[i] for i in part])))
        order = torch.tensor([i for part, _ in calls for i in part]).argsort().to(ids.device)
        results = [result for _, result in calls]
        sequences = torch.cat([r.sequences for r in results])[order]
        P = ids.shape[1]
        response = sequences[:, P:]
        completions = [self._decode(row) for row in response]
        attention_mask = torch.cat([mask, torch.ones_like(response, dtype=torch.bool)], dim=1)
        forward_passes = sum(r.num_steps * r.sequences.shape[0] for r in results)
        predictions = masked = probs = None
        if results[0].predictions is not None:  # calls may run different numbers of steps: pad to the longest
            T = max(r.num_steps for r in results)
            predictions = torch.cat([_pad_steps(r.predictions, T, r.response) for r in results], dim=1)[:, order]
            masked = torch.cat([_pad_steps(r.masked, T, False) for r in results], dim=1)[:, order]
            probs = torch.cat([_pad_steps(r.prediction_probs, T, float("nan")) for r in results], dim=1)[:, order]
        return Rollouts(sequences, attention_mask, P, torch.cat([r.trace for r in results])[order], completions,
                        forward_passes, predictions, masked, probs)

    def _training_rows(self, rollouts, advantages, keep, records, epoch, clock, extra) -> tuple[list, dict]:
        """The rows of each inner iteration, with ``logp_old``/``logp_ref`` attached.

        Order methods and mdpo train one set of rows ``num_iterations`` times; the d1-style methods draw fresh
        masks for every iteration — all drawn, and their ``logp_old`` computed, before the first update, as d1
        does. Also returns the row and forward-pass counts for the metrics.
        """
        config = self.config
        fresh = config.method in FRESH_MASK_METHODS
        sets, counts = [], {"training_rows": 0, "training_forward_passes": 0, "analysis_forward_passes": 0}
        uses = 1 if fresh else config.num_iterations
        for iteration in range(config.num_iterations if fresh else 1):
            rows, row_extra = self._rows(rollouts, advantages, keep, records, epoch, clock, iteration, extra)
            counts.update({k: v for k, v in row_extra.items() if k not in counts})
            counts["analysis_forward_passes"] += row_extra["analysis_forward_passes"]
            sets.append(self._with_old_and_reference(rows))
            M = rows.input_ids.shape[0]
            counts["training_rows"] += M
            counts["training_forward_passes"] += M * (uses + self.needs_old_pass + (self.reference is not None))
        return (sets if fresh else sets * config.num_iterations), counts

    @torch.no_grad()
    def _rows(self, rollouts: Rollouts, advantages, keep, records, epoch, clock, iteration: int = 0,
              extra: Optional[dict] = None) -> tuple[RLRows, dict]:
        """Training rows of the responses of kept groups (method-specific masks and token advantages); the
        attention analysis (AGDO's extra forward and greedy order) is timed apart as ``analysis``."""
        config, adapter, G = self.config, self.adapter, self.config.num_generations
        device = rollouts.sequences.device
        P, method = rollouts.response_start, config.method
        kept = keep.repeat_interleave(G).nonzero().squeeze(1).to(device)
        sequences, attention_mask = rollouts.sequences[kept], rollouts.attention_mask[kept]
        trained = orders.trained_positions(sequences[:, P:], adapter.stop_token_ids, config.post_num,
                                           pad_token_id=adapter.pad_token_id)
        A = advantages.flatten().to(device)[kept]
        row_extra = {"analysis_forward_passes": 0}
        # One random stream per response (and per inner iteration for fresh masks): rows do not depend on
        # the batch or the number of processes.
        generators = [sample_generator(config.seed, epoch, records[c // G]["index"], c % G, 1,
                                       *((iteration,) if method in FRESH_MASK_METHODS else ()), device=device)
                      for c in kept.tolist()]
        one = [(sequences[b : b + 1], attention_mask[b : b + 1]) for b in range(len(kept))]
        if method == "mdpo":
            step_advantages = extra["step_advantages"][kept.cpu()]
            sample, step = mdpo.top_steps(step_advantages, config.steps_per_sample)
            rows = mdpo.step_rows(sequences, attention_mask, response_start=P, predictions=rollouts.predictions[:, kept],
                                  masked=rollouts.masked[:, kept], sample=sample, step=step,
                                  mask_token_id=adapter.mask_token_id, weighting=config.mdpo_weighting,
                                  prediction_probs=rollouts.prediction_probs[:, kept])
            row_advantages = step_advantages[sample, step].float().to(device)[:, None]
        elif method in ("agdo", "tracerl"):
            if method == "agdo":
                with clock("analysis"):
                    steps, influence = self._attention_orders(sequences, attention_mask, P, trained)
                row_extra["analysis_forward_passes"] = len(kept)
                bonus = config.delta * influence
                token_advantages = A[:, None] + torch.sign(A)[:, None] * bonus
                row_extra["delta_influence"] = bonus[trained]
            else:
                steps = orders.trace_order(rollouts.trace[kept], trained, shrink=config.shrink)
                token_advantages = A[:, None].expand_as(trained)
            rows = _concat([order_rows(
                ids, mask, response_start=P, steps=steps[b : b + 1], mask_token_id=adapter.mask_token_id,
                max_steps_per_sample=config.steps_per_sample, mask_ratio=config.mask_ratio, generator=generators[b])
                for b, (ids, mask) in enumerate(one)], sequences, attention_mask)
            row_advantages = token_advantages[rows.sample_index]
        else:
            build = coupled_rows if method == "coupled" else mean_field_rows
            options = {} if method == "coupled" else dict(p_mask_prompt=config.p_mask_prompt,
                                                            token_mean=method != "wd1")
            rows = _concat([build(ids, mask, response_start=P, trained=trained[b : b + 1],
                                  mask_token_id=adapter.mask_token_id, masks_per_sample=config.masks_per_sample,
                                  generator=generators[b], **options)
                            for b, (ids, mask) in enumerate(one)], sequences, attention_mask)
            per_response = A
            if method == "wd1":  # x G: the update's mean over rows is then wd1's per-group sum, averaged over groups
                per_response = wd1_weights(advantages, keep).flatten().to(device)[kept] * G
            row_advantages = per_response[rows.sample_index][:, None]
        full = torch.zeros(rows.input_ids.shape, dtype=torch.float32, device=device)
        full[:, P:] = row_advantages.float()
        return RLRows(rows.input_ids, rows.attention_mask, rows.targets, rows.weights, kept[rows.sample_index],
                      full, None, None), row_extra

    def _attention_orders(self, sequences, attention_mask, P: int, trained):
        """AGDO's order (Alg. 1) and the influence of the response tokens, in chunks of forward_batch_size."""
        config = self.config
        if sequences.shape[0] == 0:
            return torch.zeros_like(trained, dtype=torch.int32), torch.zeros_like(trained, dtype=torch.float32)
        steps, influence = [], []
        for start in range(0, sequences.shape[0], config.forward_batch_size):
            part = slice(start, start + config.forward_batch_size)
            order = orders.attention_order(
                self.adapter, sequences[part], attention_mask[part], response_start=P, trained=trained[part],
                step_size=config.step_size, block_size=config.block_size, block_mode=config.block_mode,
                influence_norm=config.influence_norm, attention_layer=config.attention_layer,
                attention_heads=config.attention_heads)
            steps.append(order.steps)
            influence.append(order.influence[:, P:])
        return torch.cat(steps), torch.cat(influence)

    @torch.no_grad()
    def _token_logprobs(self, model, rows: RLRows) -> torch.Tensor:
        """``(M, N)`` log-probs of the targets at supervised positions under ``model`` (0 elsewhere)."""
        out = torch.zeros(rows.weights.shape, dtype=torch.float32, device=rows.weights.device)
        for start in range(0, rows.input_ids.shape[0], self.config.forward_batch_size):
            part = slice(start, start + self.config.forward_batch_size)
            with self.accelerator.autocast():
                logits = self.adapter.forward(rows.input_ids[part], rows.attention_mask[part], model=model).logits
            supervised = rows.weights[part] > 0
            out[part][supervised] = token_logprobs(logits, rows.targets[part], supervised)
        return out

    def _with_old_and_reference(self, rows: RLRows) -> RLRows:
        old = self._token_logprobs(self.model, rows) if self.needs_old_pass else None
        reference = self._token_logprobs(self.reference, rows) if self.reference is not None else None
        return rows._replace(old_logp=old, ref_logp=reference)

    def _loss(self, logits, rows: RLRows):
        c = self.config
        if c.method == "wd1":
            return weighted_logp_loss(logits, rows, beta=c.beta)
        loss = coupled_loss if c.method == "coupled" else policy_loss
        return loss(logits, rows, epsilon=c.epsilon, epsilon_high=c.epsilon if c.epsilon_high is None else c.epsilon_high,
                    beta=c.beta)

    # --------------------------------------------------------------------------------------- metrics

    def _metrics(self, rollouts, rewards, advantages, keep, passes, updates, extra, clock) -> dict:
        """Step metrics over all processes (sums and counts all-reduced, maxima gathered)."""
        config, G, accelerator = self.config, self.config.num_generations, self.accelerator
        done = [u for u in updates if u is not None and "skipped_nonfinite" not in u]
        response_tokens = orders.trained_positions(rollouts.sequences[:, rollouts.response_start:],
                                                   self.adapter.stop_token_ids, 0,
                                                   pad_token_id=self.adapter.pad_token_id).sum(1)
        kept_responses = int(keep.sum()) * G
        delta_influence = extra.get("delta_influence", torch.zeros(0))
        sums = {
            "responses": rewards.numel(), "reward_sum": float(rewards.sum()),
            "reward_square_sum": float(rewards.square().sum()), "correct": float((rewards >= config.pass_threshold).sum()),
            "groups": keep.numel(), "groups_kept": int(keep.sum()),
            "groups_all_equal": int((rewards.view(-1, G) == rewards.view(-1, G)[:, :1]).all(1).sum()),
            "kept_responses": kept_responses, "abs_advantage_sum": float(advantages.abs().sum()),
            "response_length_sum": float(response_tokens.sum()),
            "rollout_forward_passes": rollouts.forward_passes,
            "analysis_forward_passes": extra["analysis_forward_passes"],
            "training_rows": extra["training_rows"], "training_forward_passes": extra["training_forward_passes"],
            "step_reward_calls": self._scored,
            "overdenoised": int(_overdenoised(extra["step_rewards"], rewards, config.pass_threshold).sum())
            if "step_rewards" in extra else 0,
            "delta_influence_sum": float(delta_influence.sum()), "delta_influence_count": delta_influence.numel(),
            **{f"pass_hist_{k}": int((passes == k).sum()) for k in range(G + 1)},
        }
        keys = sorted(sums)
        total = dict(zip(keys, accelerator.reduce(torch.tensor([float(sums[k]) for k in keys], dtype=torch.float64,
                                                                device=accelerator.device), "sum").tolist()))
        top = accelerator.gather(torch.tensor([float(delta_influence.max()) if delta_influence.numel() else 0.0],
                                              device=accelerator.device)).max().item()
        n = total["responses"]
        mean = total["reward_sum"] / n
        metrics = {
            "reward_mean": mean, "reward_std": max(total["reward_square_sum"] / n - mean**2, 0.0) ** 0.5,
            "accuracy": total["correct"] / n, "response_length": total["response_length_sum"] / n,
            "groups": int(total["groups"]), "groups_kept": int(total["groups_kept"]),
            "groups_all_equal": int(total["groups_all_equal"]),
            "pass_rate_hist": [int(total[f"pass_hist_{k}"]) for k in range(G + 1)],
            "advantage_abs_mean": total["abs_advantage_sum"] / max(total["kept_responses"], 1),
            "rollout_forward_passes": int(total["rollout_forward_passes"]),
            "analysis_forward_passes": int(total["analysis_forward_passes"]),
            "training_rows": int(total["training_rows"]),
            "training_forward_passes": int(total["training_forward_passes"]),
            "rows_per_response": total["training_rows"] / max(total["kept_responses"], 1),
            # Compute per response (AGDO paper §6.1 matches it across methods): the policy's training forwards
            # (rows x (iterations + logp_old + reference)) per kept response, and every forward of the step
            # (rollout + analysis + training) per rolled-out response.
            "train_forward_passes_per_response": total["training_forward_passes"] / max(total["kept_responses"], 1),
            "forward_passes_per_response": (total["rollout_forward_passes"] + total["analysis_forward_passes"]
                                            + total["training_forward_passes"]) / n,
            "updates": len(done),
        }
        if config.method == "mdpo":  # trajectories right at some step and wrong at the end (paper 003 §3.3)
            metrics["overdenoised_fraction"] = total["overdenoised"] / n
            metrics["step_reward_calls"] = int(total["step_reward_calls"])
        if config.method == "agdo":
            metrics["delta_influence_mean"] = total["delta_influence_sum"] / max(total["delta_influence_count"], 1)
            metrics["delta_influence_max"] = top
        if done:
            metrics["loss"] = sum(u["loss"] for u in done) / len(done)
            tokens = sum(u["supervised_tokens"] for u in done)
            metrics["clip_fraction"] = sum(u["clipped_tokens"] for u in done) / max(tokens, 1)
            metrics["supervised_tokens"] = int(tokens)
            if config.beta > 0:
                metrics["kl"] = sum(u["kl_row_sum"] / u["rows"] for u in done) / len(done)
            norms = [u["grad_norm"] for u in done if "grad_norm" in u]
            if norms:
                metrics["grad_norm"] = sum(norms) / len(norms)
        seconds = clock.seconds
        step_time = sum(seconds.values())
        for phase, value in seconds.items():
            metrics[f"time_{phase}"] = value
            metrics[f"share_{phase}"] = value / step_time if step_time else 0.0
        return metrics

    def train(self) -> Path:
        try:
            return super().train()
        finally:
            self.rewards.close()


def load_prompts(config: RLConfig) -> list[dict]:
    """The prompt records of ``config``: benchmarks of :mod:`agdo.data`, or a jsonl of task records."""
    from ..data import load_benchmark, read_task_jsonl

    if config.benchmarks:
        return [record for name in config.benchmarks for record in load_benchmark(name, config.data_dir)]
    if not config.train_file:
        raise ValueError("RL needs prompts: set `train_file` (jsonl of task records) or `benchmarks`")
    return read_task_jsonl(config.train_file)


def train_rl(config: RLConfig, *, adapter=None, prompts: Optional[list[dict]] = None) -> Path:
    """Run RL; returns the output directory (``final/`` holds the trained policy)."""
    from ..models import load_adapter  # the training layer's only entry into the model adapters

    if adapter is None:
        adapter = load_adapter(config.model_name_or_path, family=config.family)
    if prompts is None:
        prompts = load_prompts(config)
    return RLTrainer(config, adapter, prompts).train()

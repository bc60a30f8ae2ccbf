"""Batched masked-diffusion decoding for dLLMs (LLaDA, Dream) with pluggable selection strategies.

One call, :func:`generate`, runs the reverse process for a batch of left-padded prompts. The response
(``gen_length`` tokens, all masked at the start) is split into semi-autoregressive blocks of
``block_length`` tokens (``block_length = gen_length``: pure diffusion). Each row works on its *active
block*, the first block that still has a masked position. Every step is one forward pass:

1. Draw a token ``x̂`` at every masked position of the active block (argmax at temperature 0, otherwise
   a categorical draw after temperature, top-k, top-p); the mask token is never drawn. ``p(x̂)`` — the
   *confidence* — is the model's untempered probability (LLaDA's convention).
2. Commit some of them:
   - static (``threshold=None``): ``k_t`` tokens, ``k_t`` from the schedule for the block's own step
     counter (:mod:`agdo.sampling.schedules`), the ``k_t`` best by the strategy's score
     (:mod:`agdo.sampling.strategies`); fewer if fewer are masked. A block therefore ends after at most
     ``steps / num_blocks`` steps.
   - dynamic (``threshold=τ``): every masked position of the block with ``p(x̂) >= τ``; if there is none,
     the single best by the strategy's score — at least one token per step per unfinished row.
   - ``rcr`` (static only), Running Confidence Remasking, MDPO (paper 003) Eq. 10. Each position keeps
     ``c_i`` = the highest ``p(x̂_i)`` it ever had at a step where it was masked. A step (a) fills every
     masked position of the active block with its ``x̂`` and raises its ``c_i``; (b) counts
     ``n = max(0, #masked before the step - k_t)``; (c) re-masks the ``n`` positions of the active block
     with the lowest ``c_i`` (ties: the later position is re-masked), whether just filled or committed at
     an earlier step of this block. Committed tokens are never re-predicted, only kept or re-masked; a
     re-masked position is predicted afresh, but its ``c_i`` keeps its maximum (Eq. 10 takes the max over
     all earlier steps). Earlier blocks are final. Positions settled by the EOS rule are never re-masked.
     (MDPO's released code stores the latest rather than the maximum confidence; we follow the paper.)
3. EOS rule (``stop_at_eos=True``): once a row holds a committed EOS (any of ``adapter.eos_token_ids``)
   at response position ``e`` (the first such position), every position after ``e`` becomes
   ``adapter.pad_token_id`` and counts as committed at that step — masked positions and already
   committed tokens alike, so what follows an EOS is always padding and the model sees that padding from
   then on. The row is finished when nothing is masked, usually long before its last block.
4. The loop stops as soon as every row is finished.

The trace holds, per response position, the step whose update gave the position its final token
(for RCR: the last time it was filled; for the EOS rule: the step it was overwritten); ``-1`` = never
committed. Steps are counted from 0 and are the same loop counter for every row.

Randomness (temperature > 0 and the ``random`` strategy): pass ``generator`` as a list of one
``torch.Generator`` per row (on the model's device) and row ``b`` draws only from ``generator[b]``, the
same amount of noise at every step whatever its neighbours do — a row's result then depends only on its
prompt and its generator's seed, not on the batch it is in nor on its left padding. A single generator
(or None, torch's global stream) is shared by the batch, so a row's noise depends on its batch index.
Per step and row the draws are, in order: ``block_length x V`` uniforms for Gumbel-max (temperature
> 0), then ``block_length`` uniforms (``random``).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Optional, Protocol, Sequence, runtime_checkable

import torch

from .categorical import Generators, argmax_excluding, sample_tokens, uniform_noise
from .schedules import SCHEDULES, tokens_per_step
from .strategies import ALIASES, STRATEGIES, select_top_k, selection_scores


@runtime_checkable
class DiffusionAdapter(Protocol):
    """What the sampler needs from a model (``agdo.models`` adapters provide it).

    ``forward`` returns an object with ``logits (B, N, V)`` token-aligned (``logits[:, i]`` predicts
    token ``i``; shifted models are already shifted) and ``s (B, N)`` float32, the valid attention of
    every token for the key set ``unmasked`` (bool ``(B, N)``), or None when ``unmasked`` is None.
    """

    mask_token_id: int
    pad_token_id: Optional[int]
    eos_token_ids: Sequence[int]

    def forward(self, input_ids, attention_mask=None, *, unmasked=None): ...


@dataclass(frozen=True)
class SamplerConfig:
    """Decoding settings; names follow the LLaDA / Dream / Fast-dLLM generate functions.

    Attributes:
        gen_length: response length ``R``.
        steps: total denoising steps of a static schedule, split evenly over the blocks (must divide).
            Unused by dynamic unmasking, which takes as many steps as it needs (at most ``gen_length``).
        block_length: semi-AR block size (must divide ``gen_length``); None = ``gen_length``.
        temperature, top_p, top_k: how ``x̂`` is drawn (temperature 0 = argmax; None = no filter).
        alg: selection strategy, one of ``STRATEGIES`` (aliases: ``low_confidence``/``maskgit_plus`` →
            ``max_prob``, ``topk_margin`` → ``margin``).
        schedule: static schedule, one of ``SCHEDULES``.
        threshold: dynamic unmasking threshold ``τ`` on ``p(x̂)``; None = static.
        candidate_threshold: Max-S candidates need ``p(x̂) >`` this (AGDO: 0.9; 0 = pure Max-S).
        stop_at_eos: apply the EOS rule (module docstring).
        return_confidences / return_predictions / return_s / return_token_probs: per-step records, see
            :class:`GenerationResult`.
    """

    gen_length: int = 128
    steps: int = 128
    block_length: Optional[int] = None
    temperature: float = 0.0
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    alg: str = "max_prob"
    schedule: str = "linear"
    threshold: Optional[float] = None
    candidate_threshold: float = 0.9
    stop_at_eos: bool = True
    return_confidences: bool = False
    return_predictions: bool = False
    return_s: bool = False
    return_token_probs: bool = False

    def __post_init__(self):
        object.__setattr__(self, "alg", ALIASES.get(self.alg, self.alg))
        if self.block_length is None:
            object.__setattr__(self, "block_length", self.gen_length)
        problems = []
        if self.gen_length < 1:
            problems.append(f"gen_length must be >= 1, got {self.gen_length}")
        elif self.block_length < 1 or self.gen_length % self.block_length:
            problems.append(f"block_length must divide gen_length={self.gen_length}, got {self.block_length}")
        elif self.threshold is None and (self.steps < 1 or self.steps % self.num_blocks):
            problems.append(f"steps must be a positive multiple of the {self.num_blocks} blocks, got {self.steps}")
        if self.alg not in STRATEGIES:
            problems.append(f"alg must be one of {STRATEGIES} (or {tuple(ALIASES)}), got {self.alg!r}")
        if self.schedule not in SCHEDULES:
            problems.append(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.temperature < 0:
            problems.append(f"temperature must be >= 0, got {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 1:
            problems.append(f"top_k must be >= 1, got {self.top_k}")
        if self.threshold is not None and not 0 < self.threshold <= 1:
            problems.append(f"threshold must be in (0, 1], got {self.threshold}")
        if self.threshold is not None and self.alg == "rcr":
            problems.append("alg='rcr' re-masks to a static schedule: it cannot be combined with threshold")
        if not 0 <= self.candidate_threshold < 1:
            problems.append(f"candidate_threshold must be in [0, 1), got {self.candidate_threshold}")
        if problems:
            raise ValueError("SamplerConfig: " + "; ".join(problems))

    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.block_length

    @property
    def dynamic(self) -> bool:
        return self.threshold is not None


@dataclass
class GenerationResult:
    """What :func:`generate` returns. ``T`` = ``num_steps``; records are None unless asked for.

    Per-step records hold, for step ``t``, rows still unfinished before step ``t``; finished rows get
    NaN (floats) or their final tokens (predictions), so a row's records do not depend on its batch.

    Attributes:
        sequences: ``(B, P + R)`` the left-padded prompts followed by the responses.
        response_start: ``P``; the response is ``sequences[:, P:]``.
        trace: ``(B, R)`` int64, the step that committed each position's final token, ``-1`` = never.
        num_steps: forward passes run.
        confidences: ``(T, B, R)`` ``p(x̂)`` at the positions that were masked in the active block.
        predictions: ``(T, B, R)`` int64, the sequence with every masked position replaced by the step's
            prediction (the drawn ``x̂`` in the active block, the argmax elsewhere) — MDPO's ``x̂_0``.
        masked: ``(T, B, R)`` bool, the masked positions going into each step (with ``predictions``).
        prediction_probs: ``(T, B, R)`` probability of each masked position's prediction under the step's
            (untempered) softmax, NaN at unmasked positions (with ``predictions``).
        s: ``(T, B, R)`` valid attention of every response token at each step (U = unmasked tokens).
        token_probs: ``(T, B, R)`` probability, under step ``t``'s forward pass, of the token a position
            holds after step ``t`` (NaN while masked) — ``p_t(x_i)`` for ΔP (:mod:`agdo.analysis`).
    """

    sequences: torch.Tensor
    response_start: int
    trace: torch.Tensor
    num_steps: int
    confidences: Optional[torch.Tensor] = None
    predictions: Optional[torch.Tensor] = None
    masked: Optional[torch.Tensor] = None
    prediction_probs: Optional[torch.Tensor] = None
    s: Optional[torch.Tensor] = None
    token_probs: Optional[torch.Tensor] = None

    @property
    def response(self) -> torch.Tensor:
        return self.sequences[:, self.response_start :]


def _check_inputs(adapter, prompt_ids, prompt_mask):
    if prompt_ids.dim() != 2 or prompt_ids.dtype != torch.long:
        raise ValueError(f"prompt_ids: expected int64 (B, P), got {prompt_ids.dtype} {tuple(prompt_ids.shape)}")
    if prompt_mask is None:
        return torch.ones_like(prompt_ids, dtype=torch.bool)
    if prompt_mask.shape != prompt_ids.shape:
        raise ValueError(f"prompt_mask: expected shape {tuple(prompt_ids.shape)}, got {tuple(prompt_mask.shape)}")
    prompt_mask = prompt_mask.bool()
    if (prompt_mask[:, :-1] & ~prompt_mask[:, 1:]).any():
        raise ValueError("prompt_mask: prompts must be left-padded (padding, then the prompt)")
    if adapter.mask_token_id in (adapter.pad_token_id, *adapter.eos_token_ids):
        raise ValueError("adapter: mask_token_id must differ from pad_token_id and eos_token_ids")
    return prompt_mask


def _settle_after_eos(response, settled, eos_ids, pad_id):
    """EOS rule: positions after each row's first committed EOS become padding and are settled."""
    is_eos = torch.isin(response, eos_ids)
    first_eos = torch.where(is_eos.any(1), is_eos.int().argmax(1), response.shape[1]).unsqueeze(1)
    positions = torch.arange(response.shape[1], device=response.device)
    response = torch.where(positions > first_eos, pad_id, response)
    return response, settled | (positions >= first_eos)


@torch.no_grad()
def generate(
    adapter: DiffusionAdapter,
    prompt_ids: torch.Tensor,
    prompt_mask: Optional[torch.Tensor] = None,
    config: Optional[SamplerConfig] = None,
    *,
    generator: Generators = None,
) -> GenerationResult:
    """Decode ``config.gen_length`` tokens after each left-padded prompt (rules: module docstring).

    Args:
        adapter: any object with the :class:`DiffusionAdapter` members.
        prompt_ids: int64 ``(B, P)``, left-padded; prompt_mask: ``(B, P)`` True at real tokens (None: all).
        config: :class:`SamplerConfig` (None: defaults).
        generator: None, one ``torch.Generator``, or one per row (row-independent randomness).
    """
    config = config or SamplerConfig()
    prompt_mask = _check_inputs(adapter, prompt_ids, prompt_mask)
    device = prompt_ids.device
    B, P = prompt_ids.shape
    R, L = config.gen_length, config.block_length
    mask_id = adapter.mask_token_id
    pad_id = adapter.pad_token_id if adapter.pad_token_id is not None else adapter.eos_token_ids[0]
    eos_ids = torch.tensor(tuple(adapter.eos_token_ids), device=device, dtype=torch.long)
    rcr, strategy = config.alg == "rcr", config.alg
    need_s = strategy == "max_s" or config.return_s

    x = torch.cat([prompt_ids, torch.full((B, R), mask_id, dtype=torch.long, device=device)], dim=1)
    real = torch.cat([prompt_mask, torch.ones(B, R, dtype=torch.bool, device=device)], dim=1)
    attention_mask = None if bool(real.all()) else real
    if not config.dynamic:
        per_step = tokens_per_step(config.schedule, L, config.steps // config.num_blocks).to(device)

    rows = torch.arange(B, device=device).unsqueeze(1)
    block_offsets = torch.arange(L, device=device)
    trace = torch.full((B, R), -1, dtype=torch.long, device=device)
    settled = torch.zeros(B, R, dtype=torch.bool, device=device)  # fixed by the EOS rule
    running_confidence = torch.zeros(B, R, device=device)  # RCR's c_i
    active_block = torch.full((B,), -1, dtype=torch.long, device=device)
    block_step = torch.zeros(B, dtype=torch.long, device=device)
    records = defaultdict(list)  # per-step records, stacked to (T, B, R) at the end
    nan = float("nan")

    num_steps = 0
    for step in range(R if config.dynamic else config.steps):
        response = x[:, P:]
        masked = response == mask_id
        unfinished = masked.any(1)
        if not bool(unfinished.any()):
            break
        num_steps += 1
        block = masked.int().argmax(1) // L  # first block with a masked position (0 for finished rows)
        block_step = torch.where(block == active_block, block_step + 1, 0)
        active_block = block
        positions = block.unsqueeze(1) * L + block_offsets  # (B, L) response indices of the active block

        out = adapter.forward(x, attention_mask, unmasked=(real & (x != mask_id)) if need_s else None)
        logits = out.logits[:, P:]
        if logits.shape[:2] != (B, R):
            raise ValueError(f"adapter.forward: expected logits (B={B}, N={P + R}, V), got {tuple(out.logits.shape)}")
        if need_s and out.s is None:
            raise ValueError("adapter.forward returned s=None although unmasked was given")

        block_logits = logits[rows, positions].float()
        log_normalizer = block_logits.logsumexp(dim=-1)
        noise = uniform_noise(generator, B, tuple(block_logits.shape[1:]), device) if config.temperature > 0 else None
        drawn = sample_tokens(block_logits, config.temperature, config.top_k, config.top_p, noise, exclude=mask_id)
        confidence = (block_logits.gather(-1, drawn.unsqueeze(-1)).squeeze(-1) - log_normalizer).exp()
        block_tokens = response.gather(1, positions)
        masked_in_block = masked.gather(1, positions) & unfinished.unsqueeze(1)
        if not config.dynamic:  # k_t of each row's block; finished rows keep counting on block 0, unused
            quota = per_step[block_step.clamp(max=len(per_step) - 1)]

        if rcr:
            seen = torch.where(masked_in_block, confidence, 0.0)
            block_running = torch.maximum(running_confidence.gather(1, positions), seen)
            running_confidence.scatter_(1, positions, block_running)
            pool = unfinished.unsqueeze(1) & ~settled.gather(1, positions)
            left_masked = (masked_in_block.sum(1) - quota).clamp(min=0)
            keep = select_top_k(block_running, pool, pool.sum(1) - left_masked)
            filled = torch.where(masked_in_block, drawn, block_tokens)
            new_block_tokens = torch.where(pool & ~keep, mask_id, filled)
        else:
            scores = selection_scores(
                strategy,
                block_logits,
                log_normalizer,
                confidence,
                s=out.s[:, P:].gather(1, positions) if strategy == "max_s" else None,
                uniform=uniform_noise(generator, B, (L,), device) if strategy == "random" else None,
                candidate_threshold=config.candidate_threshold,
            )
            if config.dynamic:
                confident = masked_in_block & (confidence >= config.threshold)
                best = select_top_k(scores, masked_in_block, torch.ones_like(block))
                commit = torch.where(confident.any(1, keepdim=True), confident, best)
            else:
                commit = select_top_k(scores, masked_in_block, quota)
            new_block_tokens = torch.where(commit, drawn, block_tokens)

        new_response = response.scatter(1, positions, new_block_tokens)
        if config.stop_at_eos:
            new_response, settled = _settle_after_eos(new_response, settled, eos_ids, pad_id)
        now_masked = new_response == mask_id
        trace = torch.where(now_masked, -1, torch.where(new_response != response, step, trace))
        x = torch.cat([x[:, :P], new_response], dim=1)

        live = unfinished.unsqueeze(1)
        if config.return_confidences:
            predicted = torch.where(masked_in_block, confidence, nan)
            records["confidences"].append(torch.full((B, R), nan, device=device).scatter(1, positions, predicted))
        if config.return_predictions:
            best = argmax_excluding(logits, mask_id)
            elsewhere = torch.where(masked, best, response)
            in_block = torch.where(masked_in_block, drawn, block_tokens)
            records["predictions"].append(elsewhere.scatter(1, positions, in_block))
            records["masked"].append(masked & live)
            # p of each masked position's prediction under the step's softmax (MDPO's confidence weight).
            best_prob = (logits.gather(-1, best.unsqueeze(-1)).squeeze(-1).float() - logits.float().logsumexp(-1)).exp()
            probs = best_prob.scatter(1, positions, confidence)
            records["prediction_probs"].append(torch.where(masked & live, probs, nan))
        if config.return_s:
            records["s"].append(torch.where(live, out.s[:, P:].float(), nan))
        if config.return_token_probs:
            held_logit = logits.gather(-1, new_response.unsqueeze(-1)).squeeze(-1).float()
            held_prob = (held_logit - logits.float().logsumexp(dim=-1)).exp()
            records["token_probs"].append(torch.where(live & ~now_masked, held_prob, nan))

    stacked = {name: torch.stack(values) for name, values in records.items()}
    return GenerationResult(sequences=x, response_start=P, trace=trace, num_steps=num_steps, **stacked)

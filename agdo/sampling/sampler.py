"""Batched masked-diffusion decoding for dLLMs (LLaDA, Dream) with pluggable selection strategies.

One call, :func:`generate`, runs the reverse process for a batch of left-padded prompts. The response
(``gen_length`` tokens, all masked at the start) is split into semi-autoregressive blocks of
``block_length`` tokens (``block_length = gen_length``: pure diffusion). Each row works on its *active
block*, the first block that still has a masked position. Every step is one forward pass:

1. Draw a token ``x̂`` at every masked position of the active block (argmax at temperature 0, otherwise
   a categorical draw after temperature, top-k, top-p); the mask token is never drawn. ``p(x̂)`` — the
   *confidence* — and the ``p`` of ``margin`` / ``entropy`` follow the model family's own sampler
   (``SamplerConfig.confidence_from``, SPEC §6):

   - ``"raw"`` (LLaDA's ``generate``): the untempered softmax of the raw logits at the drawn token,
     whatever temperature / filters the token was drawn with.
   - ``"sampling"`` (Dream's ``sample_tokens`` in ``generation_utils.py``): the distribution the token
     is drawn from — ``softmax(logits / temperature)`` after top-p then top-k (Dream's order and top-p
     boundary, :mod:`agdo.sampling.categorical`); at temperature 0 the untempered, filtered softmax and
     its argmax. So at temperature > 0 ``p(x̂)`` is the probability of the *sampled* token, ``margin`` is
     top1 - top2 and ``entropy`` the negative entropy of that distribution. (Dream's draw may return the
     mask token; ours never does, and scores still use the distribution with the mask token in it.)

   ``None`` (default) = the family default: ``adapter.confidence_from`` if the adapter has that
   attribute (``"raw"`` / ``"sampling"``), else ``"sampling"`` when ``adapter.family == "dream"``,
   else ``"raw"``. Every use of ``p(x̂)`` follows the convention: strategy scores, the Max-S candidate
   test, the dynamic threshold, RCR's running confidence and the ``confidences`` record.
2. Commit some of them:
   - static (``threshold=None``): ``k_t`` tokens, ``k_t`` from the schedule for the block's own step
     counter (:mod:`agdo.sampling.schedules`; ``dream`` is Dream's ``int(n (1 - s/t))``), the ``k_t``
     best by the strategy's score (:mod:`agdo.sampling.strategies`); fewer if fewer are masked. A block
     therefore ends after at most ``steps / num_blocks`` steps. With ``alg_temp > 0`` (Dream) the
     ``k_t`` positions are instead drawn without replacement from ``softmax(score / alg_temp)`` over
     the masked positions of the block (as Dream's ``torch.multinomial``; done by Gumbel-top-k).
   - ``origin`` (Dream's ``alg="origin"``): each masked position of the active block is committed
     independently with probability ``1 - s/t``, ``t, s`` = consecutive entries of Dream's
     ``linspace(1, eps, steps_per_block + 1)`` at the block's step counter, and with probability 1 at
     the block's last step; the schedule is not used, and a step may commit nothing (as in Dream).
   - dynamic (``threshold=τ``): every masked position of the block with ``p(x̂) >= τ``; if there is none,
     the single best by the strategy's score — at least one token per step per unfinished row.
   - ``rcr`` (static only), Running Confidence Remasking, MDPO (paper 003) Eq. 10. Each position keeps
     ``c_i`` = the highest ``p(x̂_i)`` it ever had at a step where it was masked. A step (a) fills every
     masked position of the active block with its ``x̂`` and raises its ``c_i``; (b) counts
     ``n = max(0, #masked before the step - k_t)``; (c) re-masks the ``n`` positions of the active block
     with the lowest ``c_i`` (ties: the later position is re-masked), whether just filled or committed at
     an earlier step of this block. Committed tokens are never re-predicted, only kept or re-masked; a
     re-masked position is predicted afresh, but its ``c_i`` keeps its maximum (Eq. 10 takes the max over
     all earlier steps). Earlier blocks are final.
     (MDPO's released code stores the latest rather than the maximum confidence; we follow the paper.)
3. End tokens. By default (``stop_at_eos=False``) nothing is done about them: every position is decoded
   by the model, as LLaDA's and Dream's reference samplers do, so the model never conditions on a token
   it did not write. ``stop_at_eos=True`` is TraceRL's early stop (``_sample`` in
   ``sample/dream_rl_rollout.py`` of Gen-Verse/dLLM-RL): when a row's active block has just been
   completed (no masked position left in it) and every token of it is an end token (``pad_token_id`` or
   one of ``eos_token_ids``), every position after that block — all still masked, blocks go left to
   right — becomes ``pad_token_id`` at that step and the row is finished. Only whole blocks stop a row,
   so it matters only with several blocks; an EOS inside a block stops nothing. Those *settled*
   positions are in ``GenerationResult.settled``, get the settling step in the trace, and are NaN in the
   ``s`` and ``token_probs`` records. (TraceRL tests the whole batch at once and only ``pad_token_id``;
   we test each row alone — the rule keeps rows independent (with a cache, see below) — and count EOS as an
   end token too.)
4. The loop stops as soon as every row is finished.

Logits: a step reads those of the active blocks only, so with an adapter whose ``forward`` takes
``logits_span`` (``agdo.models``) the LM head runs on those rows alone, not on ``N x vocab`` (at Dream-7B's
vocabulary that head is ~8% of a forward's FLOPs and, over the whole sequence, 0.3 GB of bf16 logits per
row); the whole response's when a record (``predictions``, ``prediction_probs``, ``token_probs``) needs
every position. The values are the full forward's to the rounding of that matmul over fewer rows.

Block KV cache (``SamplerConfig.cache``, Fast-dLLM's caches; :mod:`agdo.models._block_cache`). ``"none"``
(default): every step is a forward over the whole sequence, as above. ``"prefix"`` / ``"dual"``: a step whose
fed window is new (below; with a static schedule, each block's first step) is that full forward and also keeps
every layer's K/V; the steps after it run the model on the block and everything after it (``prefix``), the
block and the next ``cache_lookahead`` positions (``prefix`` with a lookahead window) or the block alone
(``dual``), attending to the K/V kept for the other positions (``prefix``: the prompt and finished blocks;
with a window or ``dual``: also the masked positions after what is fed). LLaDA: ``prefix`` without a lookahead
only (``dual`` and a window are refused: its blocks place the fed tokens at the end of the positions). The
block is the batch's: the fed window spans the active blocks of the unfinished rows, so rows on different
blocks (dynamic unmasking, ``origin``) all get fresh logits, and a step whose window differs from the last
step's — every row on the lowest active block leaving it (for its next block, or done, the early stop
included), a row moving past the highest (``dual``, a lookahead window) — is a full forward. The selection
rules above are unchanged. It is an APPROXIMATION, exact on the full forwards only: the kept K/V are those of
the window's full forward (with bidirectional attention, the tokens committed since would change them), and
``dual`` also keeps the masked blocks' K/V. With a static schedule (``threshold=None``, not ``origin``) every
unfinished row enters its next block at the same step — an early stop ends a row only when its block ends,
with the others' — so the window changes there and each block's first step is a full forward, exact. Where
rows move at their own pace (dynamic unmasking; ``origin``, whose random commits can complete a row's block
early), a row can enter a new block while the window stays the same — with ``prefix`` whenever a slower row
holds the lowest block, with ``dual`` (or a lookahead window) when its new block is not past the highest
(three rows or more) — and that block's first step is a CACHED step against K/V kept since the window's full
forward: there not even a block's first step is exact. Records: positions outside the fed window keep the
logits (and ``s``) of the last forward that computed them — the window's full forward — so ``predictions``,
``prediction_probs``, ``token_probs`` and ``s`` there are those of that step; ``s`` of the fed tokens is over
every key (kept and fresh); settled positions are NaN as uncached. Since the window is the batch's, with a
cache and rows moving at their own pace (dynamic unmasking, ``origin``) a row's result can depend on its
batch-mates: they decide when its kept K/V are refreshed, so a batch split otherwise — e.g. over several
processes (:mod:`agdo.sampling.distributed`) — can decode differently. With a static schedule, early stop
included, rows stay independent (to rounding).

The trace holds, per response position, the step whose update gave the position its final token
(for RCR: the last time it was filled; for settled positions: the step they were filled); ``-1`` = never
committed. Steps are counted from 0 and are the same loop counter for every row.

Randomness (temperature > 0, ``random``, ``origin`` and ``alg_temp > 0``): pass ``generator`` as a list
of one ``torch.Generator`` per row (on the model's device) and row ``b`` draws only from
``generator[b]``, the same amount of noise at every step whatever its neighbours do — a row's result then
depends only on its prompt and its generator's seed, not on the batch it is in nor on its left padding
(uncached; see the block KV cache above for the exception).
A single generator (or None, torch's global stream) is shared by the batch, so a row's noise depends on
its batch index. Per step and row the draws are, in order: ``block_length x V`` uniforms for Gumbel-max
(temperature > 0), then ``block_length`` uniforms (``random``, ``origin``, or ``alg_temp > 0``).
"""

from __future__ import annotations

import inspect
from collections import defaultdict
from dataclasses import dataclass
from typing import Optional, Protocol, Sequence, runtime_checkable

import torch

from .categorical import Generators, argmax_excluding, gumbel_draw, sampling_logits, uniform_noise
from .schedules import DREAM_EPS, SCHEDULES, tokens_per_step, transfer_probability
from .strategies import ALIASES, SCORED, STRATEGIES, select_top_k, selection_scores

CONFIDENCE_CONVENTIONS = ("raw", "sampling")
CACHE_MODES = ("none", "prefix", "dual")  # SamplerConfig.cache (module docstring)
# Family default of `confidence_from` by `adapter.family` (agdo.models adapters have that attribute).
FAMILY_CONFIDENCE = {"dream": "sampling", "llada": "raw", "generic": "raw"}


@runtime_checkable
class DiffusionAdapter(Protocol):
    """What the sampler needs from a model (``agdo.models`` adapters provide it).

    ``forward`` returns an object with ``logits (B, N, V)`` token-aligned (``logits[:, i]`` predicts
    token ``i``; shifted models are already shifted) and ``s (B, N)`` float32, the valid attention of
    every token for the key set ``unmasked`` (bool ``(B, N)``), or None when ``unmasked`` is None.

    Optional: a ``forward`` that takes ``logits_span=(first, end)`` and then returns the logits of tokens
    ``first..end-1`` only (``agdo.models`` adapters: the LM head runs on those rows) — the sampler asks for the
    active blocks' span, or the whole response when a record needs every position's logits;
    ``confidence_from`` (``"raw"`` / ``"sampling"``) or ``family`` (``"dream"`` → ``"sampling"``)
    give the confidence convention used when ``SamplerConfig.confidence_from`` is None; ``block_cache(mode,
    attention_mask, lookahead=None)`` (``agdo.models`` adapters) gives the KV cache of ``SamplerConfig.cache``.
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
            ``max_prob``, ``topk_margin`` → ``margin``). ``origin`` is Dream's random-transfer rule.
        schedule: static schedule, one of ``SCHEDULES`` (``dream``: Dream's own counts).
        threshold: dynamic unmasking threshold ``τ`` on ``p(x̂)``; None = static.
        candidate_threshold: Max-S candidates need ``p(x̂) >`` this (AGDO: 0.9; 0 = pure Max-S).
        confidence_from: ``"raw"`` (LLaDA), ``"sampling"`` (Dream) or None = the adapter's family
            default (module docstring, step 1).
        alg_temp: Dream's ``alg_temp``: > 0 draws the committed positions from ``softmax(score / alg_temp)``
            instead of taking the top ``k_t`` (static ``max_prob`` / ``margin`` / ``entropy`` only);
            0 or None = top ``k_t``.
        eps: Dream's ``eps``, the last of its timesteps ``linspace(1, eps, steps_per_block + 1)``
            (``schedule="dream"`` and ``alg="origin"`` only).
        stop_at_eos: TraceRL's early stop (module docstring, step 3). Default False: the reference
            samplers decode every position.
        cache: block KV cache, one of ``CACHE_MODES`` (module docstring): ``"none"`` (exact, default),
            ``"prefix"`` or ``"dual"`` (Fast-dLLM's; exact on full forwards only: each block's first step
            with a static schedule, not always with ``threshold`` or ``origin``). ``"dual"`` not for LLaDA.
        cache_lookahead: with ``cache="prefix"``, how many masked positions after the block are recomputed
            with it at every step (the rest keep the K/V of the window's full forward, as ``dual`` keeps them);
            None (default) = all of them, Fast-dLLM's prefix cache; 0 = ``dual``. Not for LLaDA.
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
    confidence_from: Optional[str] = None
    alg_temp: Optional[float] = 0.0
    eps: float = DREAM_EPS
    stop_at_eos: bool = False
    cache: str = "none"
    cache_lookahead: Optional[int] = None
    return_confidences: bool = False
    return_predictions: bool = False
    return_s: bool = False
    return_token_probs: bool = False

    def __post_init__(self):
        object.__setattr__(self, "alg", ALIASES.get(self.alg, self.alg))
        if self.alg_temp is None:
            object.__setattr__(self, "alg_temp", 0.0)
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
        if self.threshold is not None and self.alg in ("rcr", "origin"):
            problems.append(f"alg={self.alg!r} follows a static schedule: it cannot be combined with threshold")
        if not 0 <= self.candidate_threshold < 1:
            problems.append(f"candidate_threshold must be in [0, 1), got {self.candidate_threshold}")
        if self.confidence_from is not None and self.confidence_from not in CONFIDENCE_CONVENTIONS:
            problems.append(f"confidence_from must be one of {CONFIDENCE_CONVENTIONS} or None, got {self.confidence_from!r}")
        if self.alg_temp < 0:
            problems.append(f"alg_temp must be >= 0, got {self.alg_temp}")
        elif self.alg_temp > 0 and (self.alg not in SCORED or self.threshold is not None):
            problems.append(f"alg_temp > 0 needs a static schedule and alg in {SCORED}, got alg={self.alg!r}, "
                            f"threshold={self.threshold}")
        if not 0 < self.eps < 1:
            problems.append(f"eps must be in (0, 1), got {self.eps}")
        if self.cache not in CACHE_MODES:
            problems.append(f"cache must be one of {CACHE_MODES}, got {self.cache!r}")
        if self.cache_lookahead is not None and (self.cache != "prefix" or isinstance(self.cache_lookahead, bool)
                                                 or not isinstance(self.cache_lookahead, int)
                                                 or self.cache_lookahead < 0):
            problems.append(f"cache_lookahead must be None or an int >= 0, and only with cache='prefix'; got "
                            f"cache_lookahead={self.cache_lookahead!r} with cache={self.cache!r}")
        if problems:
            raise ValueError("SamplerConfig: " + "; ".join(problems))

    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.block_length

    @property
    def dynamic(self) -> bool:
        return self.threshold is not None


def resolve_confidence_from(config: SamplerConfig, adapter) -> str:
    """The confidence convention ``generate`` uses: the config's, else the adapter's, else its family's."""
    if config.confidence_from is not None:
        return config.confidence_from
    declared = getattr(adapter, "confidence_from", None)
    if declared is not None:
        if declared not in CONFIDENCE_CONVENTIONS:
            raise ValueError(f"adapter.confidence_from must be one of {CONFIDENCE_CONVENTIONS}, got {declared!r}")
        return declared
    return FAMILY_CONFIDENCE.get(getattr(adapter, "family", None), "raw")


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
        settled: ``(B, R)`` bool, positions filled with padding by the early stop (``stop_at_eos``), not
            decoded by the model.
        confidences: ``(T, B, R)`` ``p(x̂)`` (the convention's, see ``confidence_from``) at the positions
            that were masked in the active block.
        predictions: ``(T, B, R)`` int64, the sequence with every masked position replaced by the step's
            prediction (the drawn ``x̂`` in the active block, the argmax elsewhere) — MDPO's ``x̂_0``.
        masked: ``(T, B, R)`` bool, the masked positions going into each step (with ``predictions``).
        prediction_probs: ``(T, B, R)`` probability of each masked position's prediction under the step's
            (untempered) softmax, NaN at unmasked positions (with ``predictions``).
        s: ``(T, B, R)`` valid attention of every response token at each step (U = unmasked tokens); NaN
            at settled positions.
        token_probs: ``(T, B, R)`` probability, under step ``t``'s forward pass, of the token a position
            holds after step ``t`` (NaN while masked, and at settled positions) — ``p_t(x_i)`` for ΔP
            (:mod:`agdo.analysis`).
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
    settled: Optional[torch.Tensor] = None

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


def _end_of_row(block_tokens, block, unfinished, end_ids, mask_id, response_length):
    """TraceRL's early stop: ``(B, R)`` bool, the positions after each row's active block where that
    block is complete and holds end tokens only (those positions are then padded and settled)."""
    ends = unfinished & (block_tokens != mask_id).all(1) & torch.isin(block_tokens, end_ids).all(1)
    block_end = (block + 1) * block_tokens.shape[1]
    positions = torch.arange(response_length, device=block_tokens.device)
    return ends.unsqueeze(1) & (positions >= block_end.unsqueeze(1))


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
    end_ids = torch.tensor((pad_id, *adapter.eos_token_ids), device=device, dtype=torch.long)
    rcr, strategy = config.alg == "rcr", config.alg
    origin = strategy == "origin"
    from_sampling = resolve_confidence_from(config, adapter) == "sampling"
    need_s = strategy == "max_s" or config.return_s
    temperature, alg_temp = config.temperature, config.alg_temp

    # The logits each step reads: the active blocks' (the records below need every response position's).
    narrow_logits = "logits_span" in inspect.signature(adapter.forward).parameters
    all_response_logits = config.return_predictions or config.return_token_probs

    x = torch.cat([prompt_ids, torch.full((B, R), mask_id, dtype=torch.long, device=device)], dim=1)
    real = torch.cat([prompt_mask, torch.ones(B, R, dtype=torch.bool, device=device)], dim=1)
    attention_mask = None if bool(real.all()) else real
    block_cache = None
    if config.cache != "none":
        if not callable(getattr(adapter, "block_cache", None)):
            raise ValueError(f"SamplerConfig.cache={config.cache!r} needs an adapter with a block KV cache "
                             "(`block_cache(mode, attention_mask, lookahead=None)`, as agdo.models adapters have)")
        block_cache = adapter.block_cache(config.cache, attention_mask, lookahead=config.cache_lookahead)
    if not config.dynamic:
        block_steps = config.steps // config.num_blocks
        per_step = tokens_per_step(config.schedule, L, block_steps, config.eps).to(device)
        if origin:
            transfer = torch.tensor([transfer_probability(i, block_steps, config.eps) for i in range(block_steps)],
                                    dtype=torch.float32, device=device)

    rows = torch.arange(B, device=device).unsqueeze(1)
    block_offsets = torch.arange(L, device=device)
    trace = torch.full((B, R), -1, dtype=torch.long, device=device)
    settled = torch.zeros(B, R, dtype=torch.bool, device=device)  # padded by the early stop
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
        block = masked.int().argmax(1) // L  # first block with a masked position (0 for finished rows)
        # One host sync per step: whether any row is unfinished, and the lowest / highest active block.
        any_unfinished, lowest, highest = torch.stack(
            [unfinished.any().long(), block.masked_fill(~unfinished, R).min(), block.masked_fill(~unfinished, -1).max()]
        ).tolist()
        if not any_unfinished:
            break
        num_steps += 1
        block_step = torch.where(block == active_block, block_step + 1, 0)
        active_block = block
        positions = block.unsqueeze(1) * L + block_offsets  # (B, L) response indices of the active block

        unmasked = (real & (x != mask_id)) if need_s else None
        # Fresh logits for the active blocks of the unfinished rows, lowest to highest.
        fresh = (P + lowest * L, P + (highest + 1) * L)
        if block_cache is not None:
            span = (0, P + R) if all_response_logits else fresh
            out = block_cache.forward(x, fresh, unmasked=unmasked, logits_fresh_only=not all_response_logits)
        elif narrow_logits:
            span = (P, P + R) if all_response_logits else fresh
            out = adapter.forward(x, attention_mask, unmasked=unmasked, logits_span=span)
        else:
            out, span = adapter.forward(x, attention_mask, unmasked=unmasked), (0, P + R)
        if out.logits.shape[:2] != (B, span[1] - span[0]):
            raise ValueError(f"adapter.forward: expected the logits of tokens {span[0]}..{span[1] - 1}, "
                             f"(B={B}, {span[1] - span[0]}, V), got {tuple(out.logits.shape)}")
        # out.logits[:, j] predicts token span[0] + j; `logits`: every response position's, where the span has them.
        logits = out.logits[:, P - span[0]:] if span[0] <= P else None
        if need_s and out.s is None:
            raise ValueError("adapter.forward returned s=None although unmasked was given")

        # Finished rows sit on block 0, maybe outside the span: clamped, their logits commit nothing.
        block_logits = out.logits[rows, (P - span[0] + positions).clamp(0, span[1] - span[0] - 1)].float()
        log_normalizer = block_logits.logsumexp(dim=-1)
        filtered = None
        if temperature > 0 or from_sampling:  # the distribution tokens are drawn from
            filtered = sampling_logits(block_logits, temperature, config.top_k, config.top_p, dream_order=from_sampling)
        if temperature > 0:
            noise = uniform_noise(generator, B, tuple(block_logits.shape[1:]), device)
            drawn = gumbel_draw(filtered, noise, exclude=mask_id)
        else:
            drawn = argmax_excluding(block_logits, mask_id)
        raw_confidence = (block_logits.gather(-1, drawn.unsqueeze(-1)).squeeze(-1) - log_normalizer).exp()
        if from_sampling:  # Dream: scores on the distribution the token was drawn from
            score_logits, score_normalizer = filtered, filtered.logsumexp(dim=-1)
            confidence = (filtered.gather(-1, drawn.unsqueeze(-1)).squeeze(-1) - score_normalizer).exp()
        else:  # LLaDA: the untempered softmax at the drawn token
            score_logits, score_normalizer, confidence = block_logits, log_normalizer, raw_confidence
        block_tokens = response.gather(1, positions)
        masked_in_block = masked.gather(1, positions) & unfinished.unsqueeze(1)
        if not config.dynamic:  # k_t of each row's block; finished rows keep counting on block 0, unused
            quota = per_step[block_step.clamp(max=len(per_step) - 1)]

        if rcr:
            seen = torch.where(masked_in_block, confidence, 0.0)
            block_running = torch.maximum(running_confidence.gather(1, positions), seen)
            running_confidence.scatter_(1, positions, block_running)
            pool = unfinished.unsqueeze(1).expand(B, L)
            left_masked = (masked_in_block.sum(1) - quota).clamp(min=0)
            keep = select_top_k(block_running, pool, pool.sum(1) - left_masked)
            filled = torch.where(masked_in_block, drawn, block_tokens)
            new_block_tokens = torch.where(pool & ~keep, mask_id, filled)
        elif origin:  # Dream: every masked position independently with probability 1 - s/t
            coin = uniform_noise(generator, B, (L,), device)
            p_transfer = transfer[block_step.clamp(max=len(transfer) - 1)]
            commit = masked_in_block & (coin < p_transfer.unsqueeze(1))
            new_block_tokens = torch.where(commit, drawn, block_tokens)
        else:
            scores = selection_scores(
                strategy,
                score_logits,
                score_normalizer,
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
                if alg_temp > 0:  # Dream: multinomial without replacement ∝ softmax(score / alg_temp)
                    u = uniform_noise(generator, B, (L,), device).clamp_min(torch.finfo(torch.float32).tiny)
                    scores = scores / alg_temp - torch.log(-torch.log(u))
                commit = select_top_k(scores, masked_in_block, quota)
            new_block_tokens = torch.where(commit, drawn, block_tokens)

        new_response = response.scatter(1, positions, new_block_tokens)
        if config.stop_at_eos:
            after = _end_of_row(new_block_tokens, block, unfinished, end_ids, mask_id, R)
            new_response = torch.where(after, pad_id, new_response)
            settled |= after
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
            probs = best_prob.scatter(1, positions, raw_confidence)
            records["prediction_probs"].append(torch.where(masked & live, probs, nan))
        if config.return_s:
            records["s"].append(torch.where(live & ~settled, out.s[:, P:].float(), nan))
        if config.return_token_probs:
            held_logit = logits.gather(-1, new_response.unsqueeze(-1)).squeeze(-1).float()
            held_prob = (held_logit - logits.float().logsumexp(dim=-1)).exp()
            records["token_probs"].append(torch.where(live & ~now_masked & ~settled, held_prob, nan))

    stacked = {name: torch.stack(values) for name, values in records.items()}
    return GenerationResult(sequences=x, response_start=P, trace=trace, num_steps=num_steps, settled=settled, **stacked)

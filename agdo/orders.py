"""Denoising orders: an int step per response token, ``-1`` where the token is not trained.

Every order works on the response region of a left-padded batch (``R = N - response_start`` positions)
and takes ``trained (B, R)``: the response tokens plus the first ``post_num`` pad/EOS tokens after them
(see :func:`trained_positions`). Tokens of one step are denoised together; steps are dense ``0..T_b-1``
per row. Built-ins (SPEC §4): ``attention`` (AGDO, Alg. 1), ``left_to_right``, ``random``,
``blockwise`` and ``trace`` (TraceRL), each grouping tokens into steps the same way.

The attention order and the influence take the ablation choices of the arXiv paper (Tables 5-6) as
arguments: ``attention_layer`` (``"last"`` default, ``"first"``, ``"middle"`` = ``num_layers // 2``, or an
int index, negative from the end) and ``attention_heads`` (``"all"`` default, a list of query-head indices,
or ``"local"`` / ``"global"``: per sequence, the ``H // 2`` heads with the smallest mean attention distance
``mean_i sum_k P[h,i,k]·|i-k|`` / the other ``H - H // 2``); see :mod:`agdo.models`.
:func:`check_attention_layer` / :func:`check_attention_heads` validate them without a model (configs).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

import agdo_kernels

from .models import check_attention_heads, check_attention_layer  # noqa: F401  (re-exported for the configs)

ORDERS = ("attention", "left_to_right", "random", "blockwise", "trace")


class AttentionOrder(NamedTuple):
    steps: torch.Tensor  # (B, R) int32
    influence: torch.Tensor  # (B, N) float32, I of every key from the same forward


def trained_positions(response_ids: torch.Tensor, stop_token_ids, post_num: int, *, pad_token_id: int) -> torch.Tensor:
    """``(B, R)`` bool: the response, its end-of-turn token, and the first ``post_num`` positions after it
    (SPEC §4, dLLM-RL's semantics, which the paper adopts).

    A row's response ends at its first stop token (``stop_token_ids``: end-of-turn ids such as Dream's
    ``<|im_end|>`` and the pad id). An end-of-turn token is an ordinary response token, trained; the
    ``post_num`` positions after it (the pad tokens that teach the model to stop: paper 16 for math, 0 for
    code) are trained too. A row that stops with a pad token (no end-of-turn) counts that pad as the first
    of its ``post_num``. Later positions are never trained.
    """
    if post_num < 0:
        raise ValueError(f"`post_num` must be >= 0, got {post_num}")
    is_stop = torch.isin(response_ids, torch.as_tensor(list(stop_token_ids), device=response_ids.device))
    index = torch.arange(response_ids.shape[1], device=response_ids.device)
    has_stop = is_stop.any(-1)
    first_stop = torch.where(has_stop, is_stop.long().argmax(-1), response_ids.shape[1])
    stop_token = response_ids.gather(-1, first_stop.clamp(max=response_ids.shape[1] - 1)[:, None]).squeeze(-1)
    end_of_turn = has_stop & (stop_token != pad_token_id)  # trained itself, then post_num pads
    last_trained = first_stop + end_of_turn.long() + post_num  # exclusive
    return index < last_trained[:, None]


def _ranked(rank: torch.Tensor, trained: torch.Tensor) -> torch.Tensor:
    return torch.where(trained, rank.long(), -1)


def _grouped(rank: torch.Tensor, trained: torch.Tensor, step_size: int, block_size: Optional[int]) -> torch.Tensor:
    """Group the trained tokens of each row into steps of ``step_size`` by ``rank`` (within blocks)."""
    if step_size < 1:
        raise ValueError(f"`step_size` must be >= 1, got {step_size}")
    # A token's index in the row's denoising sequence, then ``step_size`` consecutive ones per round.
    sequence_index = agdo_kernels.dense_steps(_ranked(rank, trained)).long()
    round_ = torch.where(trained, torch.div(sequence_index, step_size, rounding_mode="floor"), -1)
    return agdo_kernels.dense_steps(round_, block_size=block_size)


def left_to_right_order(trained, *, step_size=1, block_size=None):
    """Semi-autoregressive: position order, ``step_size`` tokens a step."""
    rank = torch.arange(trained.shape[1], device=trained.device).expand_as(trained)
    return _grouped(rank, trained, step_size, block_size)


def random_order(trained, *, step_size=1, block_size=None, generator=None):
    """A uniformly random order (a fresh permutation per row), ``step_size`` tokens a step."""
    rank = torch.rand(trained.shape, generator=generator, device=trained.device).argsort(-1).argsort(-1)
    return _grouped(rank, trained, step_size, block_size)


def blockwise_order(trained, *, block_size):
    """Blockwise (Sun et al.): every block of ``block_size`` positions is one step, left to right."""
    if block_size is None or block_size < 1:
        raise ValueError(f"`block_size` must be an int >= 1 for the blockwise order, got {block_size}")
    return agdo_kernels.dense_steps(_ranked(torch.zeros_like(trained, dtype=torch.long), trained), block_size=block_size)


def trace_order(trace, trained, *, shrink=1):
    """TraceRL: the rollout's commit step per token, ``shrink`` consecutive decode steps merged."""
    if shrink < 1:
        raise ValueError(f"`shrink` must be >= 1, got {shrink}")
    merged = torch.div(trace.long(), shrink, rounding_mode="floor")
    return agdo_kernels.dense_steps(_ranked(merged, trained & (trace >= 0)))


@torch.no_grad()
def attention_order(
    adapter,
    input_ids,
    attention_mask,
    *,
    response_start: int,
    trained,
    step_size: int = 1,
    block_size: Optional[int] = None,
    block_mode: str = "global",
    influence_norm: str = "sum",
    attention_layer="last",
    attention_heads="all",
) -> AttentionOrder:
    """AGDO's order (§5.1, Alg. 1): one no-grad forward of the current model over the clean sequence.

    The chosen layer's (default: the last, as in the paper) attention averaged over the chosen heads
    (default: all) gives ``S0`` (mass on the prompt) and ``Abar_RR`` (the forward stops there: nothing
    after that layer's statistics runs); the greedy starts with ``U`` = the prompt and adds the
    ``step_size`` tokens with the largest valid attention each round. The same forward
    returns the influence ``I`` (Eq. 8) over all real query rows, from the same layer and heads.
    """
    out = adapter.forward(
        input_ids,
        attention_mask,
        response_start=response_start,
        influence_query_mask=attention_mask,
        influence_norm=influence_norm,
        attention_layer=attention_layer,
        attention_heads=attention_heads,
        return_logits=False,  # the forward stops at the chosen layer: its logits would be dropped here
    )
    steps = agdo_kernels.greedy_order(
        out.abar_rr, out.s0, valid=trained, step_size=step_size, block_size=block_size, block_mode=block_mode
    )
    return AttentionOrder(steps, out.influence)


@torch.no_grad()
def attention_influence(
    adapter, input_ids, attention_mask, *, influence_norm: str = "sum", attention_layer="last", attention_heads="all"
) -> torch.Tensor:
    """``I (B, N)`` alone (Eq. 8, every real query row), from one no-grad forward: the same values as
    :func:`attention_order`'s ``influence`` for the same arguments, without the order (SFT ablations that
    keep the weights but not the order)."""
    return adapter.forward(
        input_ids,
        attention_mask,
        influence_query_mask=attention_mask,
        influence_norm=influence_norm,
        attention_layer=attention_layer,
        attention_heads=attention_heads,
        return_logits=False,
    ).influence

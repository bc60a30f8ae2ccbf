"""Masked training rows for SFT and RL: which tokens are hidden in the input, which are supervised.

Every method produces :class:`MaskedRows` — one row per (sample, masking) pair — and every loss is a
weighted sum over the supervised tokens, so the trainers share one forward and one loss:
``loss = sum_rows sum_k weights[k] * term_k / rows`` (SFT: ``term`` = NLL; RL: the clipped surrogate).
Per-row normalisations are folded into ``weights``; the division by the rows of the whole optimizer
update is done by :meth:`agdo.training.loop.Trainer.optimizer_update`.
The prompt is never masked (except by d1's estimator, :func:`mean_field_rows`, which masks a fraction of
it); positions of the response region that are not trained (pads beyond ``post_num``) are always masked in
the input and never supervised.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F


class MaskedRows(NamedTuple):
    input_ids: torch.Tensor  # (M, N) with mask tokens in place
    attention_mask: torch.Tensor  # (M, N)
    targets: torch.Tensor  # (M, N) the clean tokens
    weights: torch.Tensor  # (M, N) float32, 0 where not supervised
    sample_index: torch.Tensor  # (M,) which batch sample each row came from
    step: torch.Tensor  # (M,) the order step a row trains (-1 for random masks)


def sample_generator(seed: int, epoch: int, index: int, *extra: int, device=None) -> torch.Generator:
    """The random stream of one sample, keyed by ``(seed, epoch, dataset index, *extra)`` — the same
    whatever process or batch the sample lands in, and after a resume."""
    key = seed
    for part in (epoch, index, *extra):
        key = (key * 1_000_003 + part) % (2**63)
    return torch.Generator(device=device).manual_seed(key)


def concat_rows(per_sample: list[MaskedRows]) -> MaskedRows:
    """Rows of samples ``0..len-1`` (each with ``sample_index`` 0) as one batch, ``sample_index`` = position."""
    shifted = [rows._replace(sample_index=rows.sample_index + b) for b, rows in enumerate(per_sample)]
    return MaskedRows(*(torch.cat(parts) for parts in zip(*shifted)))


def _assemble(input_ids, attention_mask, response_start, sample_index, masked, weights, mask_token_id, step):
    rows_ids = input_ids[sample_index].clone()
    response = rows_ids[:, response_start:]
    rows_ids[:, response_start:] = torch.where(masked, torch.full_like(response, mask_token_id), response)
    full_weights = torch.zeros(rows_ids.shape, dtype=torch.float32, device=input_ids.device)
    full_weights[:, response_start:] = weights
    return MaskedRows(rows_ids, attention_mask[sample_index], input_ids[sample_index], full_weights, sample_index, step)


def _choose_steps(steps: torch.Tensor, cap: Optional[int], generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(sample, step) pairs: every step of every sample, or a uniform subset of ``cap`` steps per sample."""
    num_steps = steps.max(-1).values.long() + 1  # 0 for rows with nothing trained
    most = int(num_steps.max()) if steps.numel() else 0
    if most == 0:
        empty = torch.zeros(0, dtype=torch.long, device=steps.device)
        return empty, empty
    step_ids = torch.arange(most, device=steps.device)
    exists = step_ids[None, :] < num_steps[:, None]
    take = most if cap is None else min(cap, most)
    scores = torch.rand(exists.shape, generator=generator, device=steps.device).masked_fill(~exists, -1.0)
    chosen = scores.topk(take, dim=-1).indices
    keep = exists.gather(-1, chosen)
    sample = torch.arange(steps.shape[0], device=steps.device)[:, None].expand_as(chosen)
    return sample[keep], chosen[keep]


def _repeat_steps(steps: torch.Tensor, rows: int, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(sample, step) pairs: exactly ``rows`` per sample that has a trained step, its ``S`` steps cycled —
    each step ``rows // S`` times plus a uniform subset of ``rows % S`` steps once more."""
    samples, chosen = [], []
    for b, num in enumerate((steps.max(-1).values.long() + 1).tolist()):
        if num <= 0:
            continue
        subset = torch.rand(num, generator=generator, device=steps.device).argsort()[: rows % num]
        picks = torch.cat([torch.arange(num, device=steps.device).repeat(rows // num), subset.sort().values])
        samples.append(torch.full_like(picks, b))
        chosen.append(picks)
    if not chosen:
        empty = torch.zeros(0, dtype=torch.long, device=steps.device)
        return empty, empty
    return torch.cat(samples), torch.cat(chosen)


def order_rows(
    input_ids,
    attention_mask,
    *,
    response_start: int,
    steps,
    mask_token_id: int,
    token_weights=None,
    max_steps_per_sample: Optional[int] = None,
    rows_per_sample: Optional[int] = None,
    mask_ratio=(0.1, 0.9),
    generator=None,
) -> MaskedRows:
    """Rows for training along a denoising order (AGDO-SFT Alg. 2, also left-to-right and blockwise).

    For each chosen step ``t`` of a sample: ``K_t`` = its tokens; each is masked with probability
    ``p ~ U(mask_ratio)`` drawn per row (at least one) → ``M_sub``; every token of a later step is masked
    too. Supervised: ``M_sub`` with weight ``token_weights[k] / |M_sub|`` (``1 + gamma * I_k`` for AGDO,
    ones otherwise), so each row contributes the mean of Eq. 9 over its ``M_sub``.

    Rows per sample: every step once (default), a uniform subset of at most ``max_steps_per_sample`` steps,
    or exactly ``rows_per_sample`` rows with the steps cycled (:func:`_repeat_steps`; a step drawn twice gets
    two independent ``M_sub``) — how a method with few steps (blockwise) trains as many rows as another.
    """
    if max_steps_per_sample is not None and rows_per_sample is not None:
        raise ValueError("give at most one of `max_steps_per_sample` and `rows_per_sample`")
    if rows_per_sample is not None:
        if rows_per_sample < 1:
            raise ValueError(f"`rows_per_sample` must be >= 1, got {rows_per_sample}")
        sample, step = _repeat_steps(steps, rows_per_sample, generator)
    else:
        sample, step = _choose_steps(steps, max_steps_per_sample, generator)
    row_steps = steps[sample].long()
    current = row_steps == step[:, None]
    later = (row_steps > step[:, None]) | (row_steps < 0)
    low, high = mask_ratio
    p = low + (high - low) * torch.rand(sample.shape[0], 1, generator=generator, device=steps.device)
    coin = torch.rand(row_steps.shape, generator=generator, device=steps.device)
    subset = current & (coin < p)
    # At least one token per row: the current-step token with the smallest coin.
    forced = torch.where(current, coin, 2.0).argmin(-1, keepdim=True)
    subset.scatter_(-1, forced, True)
    subset &= current
    if token_weights is None:
        token_weights = torch.ones(steps.shape, dtype=torch.float32, device=steps.device)
    weights = subset * token_weights[sample].float() / subset.sum(-1, keepdim=True).clamp_min(1)
    return _assemble(input_ids, attention_mask, response_start, sample, later | subset, weights, mask_token_id, step)


def random_rows(
    input_ids,
    attention_mask,
    *,
    response_start: int,
    trained,
    mask_token_id: int,
    masks_per_sample: int,
    eps: float = 1e-3,
    generator=None,
) -> MaskedRows:
    """LLaDA's SFT recipe: ``t ~ U(eps, 1)``, mask each trained token w.p. ``t``, weight ``1 / (t * n)``.

    ``n`` is the number of trained response tokens of the sample, so a row's loss is
    ``sum over masked tokens of CE / t / n``. ``masks_per_sample`` independent masks per sample match the
    compute of order-based methods (the paper uses 35 against AGDO's ~39 steps).
    """
    B = input_ids.shape[0]
    sample = torch.arange(B, device=input_ids.device).repeat_interleave(masks_per_sample)
    row_trained = trained[sample]
    t = eps + (1 - eps) * torch.rand(sample.shape[0], 1, generator=generator, device=input_ids.device)
    hidden = row_trained & (torch.rand(row_trained.shape, generator=generator, device=input_ids.device) < t)
    count = row_trained.sum(-1, keepdim=True).clamp_min(1)
    weights = hidden / (t * count)
    step = torch.full_like(sample, -1)
    return _assemble(input_ids, attention_mask, response_start, sample, hidden | ~row_trained, weights, mask_token_id, step)


def mean_field_rows(
    input_ids,
    attention_mask,
    *,
    response_start: int,
    trained,
    mask_token_id: int,
    masks_per_sample: int,
    p_mask_prompt: float,
    token_mean: bool = True,
    generator=None,
) -> MaskedRows:
    """d1's one-step (mean-field) estimator (diffu-GRPO): the whole completion masked, each real prompt token
    masked with probability ``p_mask_prompt``, every trained completion token supervised with weight
    ``1/n`` (``n`` = the sample's trained tokens, so a row gives the mean over its completion; with
    ``token_mean=False`` weight 1, the sum, as wd1 uses it). ``masks_per_sample`` rows per sample, each with
    its own prompt mask."""
    B, P = input_ids.shape[0], response_start
    sample = torch.arange(B, device=input_ids.device).repeat_interleave(masks_per_sample)
    row_trained = trained[sample]
    weights = row_trained / row_trained.sum(-1, keepdim=True).clamp_min(1) if token_mean else row_trained.float()
    rows = _assemble(input_ids, attention_mask, P, sample, torch.ones_like(row_trained), weights, mask_token_id,
                     torch.full_like(sample, -1))
    real = attention_mask[sample, :P].bool()
    hidden = real & (torch.rand(real.shape, generator=generator, device=input_ids.device) < p_mask_prompt)
    rows.input_ids[:, :P] = torch.where(hidden, mask_token_id, rows.input_ids[:, :P])
    return rows


def coupled_rows(
    input_ids,
    attention_mask,
    *,
    response_start: int,
    trained,
    mask_token_id: int,
    masks_per_sample: int,
    generator=None,
) -> MaskedRows:
    """DiffuCoder's coupled sampling: per draw ``t ~ U(0.2, 0.8)``, three consecutive rows — the completion
    fully masked, each trained token masked w.p. ``t``, and the complement of that mask (the prompt is never
    masked). The weights carry what the coupled log-prob needs (:func:`agdo.training.rl.coupled_loss`):
    row 0 ``1/n`` on the trained tokens (the token mean), row 1 ``1/t`` and row 2 ``1/(1-t)`` on the tokens
    each masks. ``masks_per_sample`` draws per sample."""
    B, device = input_ids.shape[0], input_ids.device
    draws = torch.arange(B, device=device).repeat_interleave(masks_per_sample)
    draw_trained = trained[draws]
    t = 0.2 + 0.6 * torch.rand(draws.shape[0], 1, generator=generator, device=device)
    first = draw_trained & (torch.rand(draw_trained.shape, generator=generator, device=device) < t)
    second = draw_trained & ~first
    hidden = torch.stack([draw_trained, first, second], 1)  # (D, 3, R)
    weights = torch.stack([draw_trained / draw_trained.sum(-1, keepdim=True).clamp_min(1), first / t,
                           second / (1 - t)], 1)
    sample = draws.repeat_interleave(3)
    untrained = ~trained[sample]
    return _assemble(input_ids, attention_mask, response_start, sample, hidden.flatten(0, 1) | untrained,
                     weights.flatten(0, 1).float(), mask_token_id, torch.full_like(sample, -1))


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """``log p(targets[k])`` at the positions ``where`` holds (float32, 1-D in row-major order)."""
    return -F.cross_entropy(logits[where].float(), targets[where], reduction="none")


def weighted_nll(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum_k weights[k] * -log p(targets[k])``, evaluated only where ``weights > 0``."""
    supervised = weights > 0
    return -(token_logprobs(logits, targets, supervised) * weights[supervised]).sum()

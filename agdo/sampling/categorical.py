"""Drawing tokens from logits: temperature, top-k, top-p and Gumbel-max, with per-row random streams.

Two ways of building the sampling distribution, matching the two families' reference samplers:

- default (HF / Fast-dLLM order): temperature, then top-k, then top-p; top-p keeps a token while the
  mass of the more likely tokens before it is ``< top_p``.
- ``dream_order=True`` (Dream's ``sample_tokens`` in its ``generation_utils.py``): temperature, then
  top-p, then top-k; top-p keeps a token while the mass before it is ``<= top_p`` (Dream drops a token
  when the inclusive cumulative mass of the tokens before it exceeds ``top_p``).

Temperature 0 filters the untempered logits (Dream does the same, and its confidence at temperature 0
is the largest probability of that filtered distribution).
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

Generators = Union[None, torch.Generator, Sequence[torch.Generator]]


def uniform_noise(generator: Generators, batch_size: int, shape: tuple, device) -> torch.Tensor:
    """Uniform ``[0, 1)`` noise of shape ``(batch_size, *shape)``.

    With a sequence of generators (one per row) row ``b`` is drawn from ``generator[b]`` alone, so a row's
    noise does not depend on its batch neighbours; with one generator (or None: torch's global stream)
    the batch shares a stream.
    """
    if isinstance(generator, torch.Generator) or generator is None:
        return torch.rand((batch_size, *shape), generator=generator, device=device)
    if len(generator) != batch_size:
        raise ValueError(f"generator: expected one generator per row ({batch_size}), got {len(generator)}")
    return torch.stack([torch.rand(shape, generator=g, device=device) for g in generator])


def _top_k(logits: torch.Tensor, top_k: Optional[int]) -> torch.Tensor:
    if top_k is None or top_k >= logits.shape[-1]:
        return logits
    kth_largest = logits.topk(top_k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth_largest, float("-inf"))


def _top_p(logits: torch.Tensor, top_p: Optional[float], inclusive: bool) -> torch.Tensor:
    if top_p is None or top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    sorted_probs = sorted_logits.softmax(dim=-1)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    sorted_drop = mass_before > top_p if inclusive else mass_before >= top_p
    sorted_drop[..., 0] = False  # the most likely token always stays
    drop = torch.empty_like(order, dtype=torch.bool).scatter_(-1, order, sorted_drop)
    return logits.masked_fill(drop, float("-inf"))


def filter_logits(
    logits: torch.Tensor, top_k: Optional[int] = None, top_p: Optional[float] = None, *, dream_order: bool = False
) -> torch.Tensor:
    """Set to ``-inf`` what top-k and top-p (nucleus) exclude; the most likely token always stays.

    top-k keeps every token whose logit reaches the k-th largest (ties at the boundary stay); top-p keeps
    the smallest set of most likely tokens whose probability mass reaches ``top_p``. Default: top-k
    first, a token whose mass-before equals ``top_p`` is dropped; ``dream_order``: top-p first, such a
    token is kept (module docstring).
    """
    if dream_order:
        return _top_k(_top_p(logits, top_p, inclusive=True), top_k)
    return _top_p(_top_k(logits, top_k), top_p, inclusive=False)


def sampling_logits(
    logits: torch.Tensor,
    temperature: float,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    *,
    dream_order: bool = False,
) -> torch.Tensor:
    """The logits of the distribution tokens are drawn from: ``logits / temperature`` (untempered at
    temperature 0), then the filters; ``-inf`` where filtered out."""
    tempered = logits / temperature if temperature > 0 else logits
    return filter_logits(tempered, top_k, top_p, dream_order=dream_order)


def argmax_excluding(logits: torch.Tensor, token: int) -> torch.Tensor:
    """``argmax`` over the last dim, never ``token`` (the runner-up where ``token`` wins); no copy of logits."""
    top2 = logits.topk(2, dim=-1).indices
    return torch.where(top2[..., 0] == token, top2[..., 1], top2[..., 0])


def gumbel_draw(filtered: torch.Tensor, uniform: torch.Tensor, *, exclude: int) -> torch.Tensor:
    """Exact draw from ``softmax(filtered)`` by Gumbel-max with ``uniform`` noise, never ``exclude``."""
    if uniform is None or uniform.shape != filtered.shape:
        raise ValueError(f"uniform: expected noise of shape {tuple(filtered.shape)} when temperature > 0")
    scores = filtered - torch.log(-torch.log(uniform))
    scores[..., exclude] = float("-inf")  # u = 0 above also gives -inf: never drawn, never NaN
    return scores.argmax(dim=-1)


def sample_tokens(
    logits: torch.Tensor,
    temperature: float,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    uniform: Optional[torch.Tensor] = None,
    *,
    exclude: int,
    dream_order: bool = False,
) -> torch.Tensor:
    """Token per position from ``logits (..., V)``, never ``exclude`` (the mask token is not an output).

    Temperature 0: argmax. Otherwise Gumbel-max over the tempered, filtered logits with ``uniform`` noise
    of the same shape, i.e. an exact draw from ``softmax(filtered logits / temperature)``.
    """
    if temperature == 0:
        return argmax_excluding(logits, exclude)
    return gumbel_draw(sampling_logits(logits, temperature, top_k, top_p, dream_order=dream_order), uniform,
                       exclude=exclude)

"""Drawing tokens from logits: temperature, top-k, top-p and Gumbel-max, with per-row random streams."""

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


def filter_logits(logits: torch.Tensor, top_k: Optional[int] = None, top_p: Optional[float] = None) -> torch.Tensor:
    """Set to ``-inf`` what top-k and then top-p (nucleus) exclude; the most likely token always stays.

    top-k keeps every token whose logit reaches the k-th largest (ties at the boundary stay); top-p keeps
    the smallest set of most likely tokens whose probability mass reaches ``top_p``.
    """
    if top_k is not None and top_k < logits.shape[-1]:
        kth_largest = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        drop = torch.empty_like(order, dtype=torch.bool).scatter_(-1, order, mass_before >= top_p)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def argmax_excluding(logits: torch.Tensor, token: int) -> torch.Tensor:
    """``argmax`` over the last dim, never ``token`` (the runner-up where ``token`` wins); no copy of logits."""
    top2 = logits.topk(2, dim=-1).indices
    return torch.where(top2[..., 0] == token, top2[..., 1], top2[..., 0])


def sample_tokens(
    logits: torch.Tensor,
    temperature: float,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    uniform: Optional[torch.Tensor] = None,
    *,
    exclude: int,
) -> torch.Tensor:
    """Token per position from ``logits (..., V)``, never ``exclude`` (the mask token is not an output).

    Temperature 0: argmax. Otherwise Gumbel-max over the tempered, filtered logits with ``uniform`` noise
    of the same shape, i.e. an exact draw from ``softmax(filtered logits / temperature)``.
    """
    if temperature == 0:
        return argmax_excluding(logits, exclude)
    if uniform is None or uniform.shape != logits.shape:
        raise ValueError(f"uniform: expected noise of shape {tuple(logits.shape)} when temperature > 0")
    scores = filter_logits(logits / temperature, top_k, top_p) - torch.log(-torch.log(uniform))
    scores[..., exclude] = float("-inf")  # u = 0 above also gives -inf: never drawn, never NaN
    return scores.argmax(dim=-1)

"""Selection strategies: which masked positions of the active block are committed at a step.

Every strategy scores the candidate positions; the sampler commits the ``k`` highest scores per row
(:func:`select_top_k`; ties go to the lower position), or, with ``alg_temp > 0`` (Dream), ``k`` positions
drawn without replacement from ``softmax(score / alg_temp)``. ``p`` below is the distribution of the
model family's convention (``SamplerConfig.confidence_from``): ``"raw"`` (LLaDA) the softmax of the raw
logits, whatever the temperature / filters tokens are drawn with; ``"sampling"`` (Dream) the tempered,
top-p/top-k filtered distribution tokens are drawn from (untempered but filtered at temperature 0):

- ``max_prob``  ``p(x̂)``, the probability of the drawn token (LLaDA "low-confidence remasking")
- ``margin``    ``p_top1 - p_top2``
- ``entropy``   ``-H(p)`` (negative entropy)
- ``random``    uniform noise (``k`` positions uniformly at random)
- ``origin``    Dream's ``alg="origin"``: no score and no ``k``; each masked position is committed
                independently with probability ``1 - s/t`` (Dream's timesteps; 1 at the block's last
                step), so the count per step is random — not the ``random`` strategy. Applied by the sampler.
- ``max_s``     AGDO's Max-S: positions with ``p(x̂) > candidate_threshold`` are candidates and rank by
                their valid attention ``S`` (from the same forward pass) above every non-candidate;
                non-candidates rank by ``p(x̂)``. So: no candidate → ``max_prob``; fewer candidates than
                ``k`` → all candidates, then the most probable others; threshold 0 → pure Max-S.
- ``rcr``       Running Confidence Remasking (MDPO): scores are the running maximum of ``p(x̂)``; the
                sampler applies it as a remasking rule, see :func:`agdo.sampling.generate`.
"""

from __future__ import annotations

from typing import Optional

import torch

STRATEGIES = ("max_prob", "margin", "entropy", "random", "max_s", "rcr", "origin")
# Strategies ranking by a score that Dream's alg_temp can soften (Dream: maskgit_plus, topk_margin, entropy).
SCORED = ("max_prob", "margin", "entropy")
# Names used by the LLaDA / Dream / Fast-dLLM generate functions for the same rules.
ALIASES = {"low_confidence": "max_prob", "maskgit_plus": "max_prob", "topk_margin": "margin"}


def selection_scores(
    strategy: str,
    logits: torch.Tensor,
    log_normalizer: torch.Tensor,
    confidence: torch.Tensor,
    *,
    s: Optional[torch.Tensor] = None,
    uniform: Optional[torch.Tensor] = None,
    candidate_threshold: float = 0.9,
) -> torch.Tensor:
    """Score ``(B, L)`` per position, higher = commit first.

    Args:
        logits: ``(B, L, V)`` float32 logits of the convention's ``p`` (raw, or tempered and filtered with
            ``-inf`` where filtered out); log_normalizer: their ``logsumexp`` ``(B, L)``, so
            ``log p = logits - log_normalizer`` without materialising ``p`` unless the strategy needs it.
        confidence: ``(B, L)`` ``p`` of the drawn token.
        s: ``(B, L)`` valid attention (``max_s``); uniform: ``(B, L)`` noise (``random``).
    """
    if strategy == "origin":
        raise ValueError("strategy 'origin' has no score: the sampler commits by coin flips")
    if strategy in ("max_prob", "rcr"):
        return confidence
    if strategy == "margin":
        top2 = (logits.topk(2, dim=-1).values - log_normalizer.unsqueeze(-1)).exp()
        return top2[..., 0] - top2[..., 1]
    if strategy == "entropy":
        probs = (logits - log_normalizer.unsqueeze(-1)).exp()
        return torch.special.xlogy(probs, probs).sum(dim=-1)
    if strategy == "random":
        return uniform
    if strategy == "max_s":
        # Probabilities are <= 1, so 2 + S puts every candidate above every non-candidate.
        return torch.where(confidence > candidate_threshold, 2.0 + s, confidence)
    raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")


def select_top_k(scores: torch.Tensor, pool: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Bool ``(B, L)``: per row the ``k[b]`` highest-scoring positions of ``pool`` (ties: lower position)."""
    ranked = scores.masked_fill(~pool, float("-inf")).argsort(dim=-1, descending=True, stable=True)
    positions = torch.arange(scores.shape[-1], device=scores.device).expand_as(ranked)
    rank = torch.empty_like(ranked).scatter_(-1, ranked, positions)
    return pool & (rank < k.unsqueeze(-1))

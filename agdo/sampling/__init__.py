"""Masked-diffusion decoding: :func:`generate` with a :class:`SamplerConfig` → :class:`GenerationResult`.

Static schedules (``linear``, ``cubic``, ``square``, ``cosine``, ``sqrt``, ``exp``, ``log``, and Dream's
own ``dream``) or dynamic (confidence threshold) unmasking, semi-AR blocks, temperature / top-k / top-p,
and the selection strategies ``max_prob``, ``margin``, ``entropy``, ``random``, ``max_s`` (AGDO), ``rcr``
(MDPO's running confidence remasking) and ``origin`` (Dream's random transfer), with Dream's ``alg_temp``.
Confidence follows each model family's reference sampler (``confidence_from``: LLaDA ``"raw"``, Dream
``"sampling"``). ``cache`` = ``"none"`` (exact: every step runs the whole sequence), ``"prefix"`` or ``"dual"``
(Fast-dLLM's block KV caches: the prompt and finished blocks — dual: also the later blocks — keep the K/V
of each block's first step; an approximation after that step, exact at it). The exact rules (conventions,
RCR, early stop, cache, randomness) are in :mod:`agdo.sampling.sampler`.
"""

from .distributed import decode_across_processes, process_share
from .sampler import (
    CACHE_MODES,
    CONFIDENCE_CONVENTIONS,
    DiffusionAdapter,
    GenerationResult,
    SamplerConfig,
    generate,
    resolve_confidence_from,
)
from .schedules import SCHEDULES, tokens_per_step
from .strategies import STRATEGIES

__all__ = [
    "generate",
    "SamplerConfig",
    "GenerationResult",
    "DiffusionAdapter",
    "resolve_confidence_from",
    "CONFIDENCE_CONVENTIONS",
    "CACHE_MODES",
    "tokens_per_step",
    "SCHEDULES",
    "STRATEGIES",
    "decode_across_processes",
    "process_share",
]

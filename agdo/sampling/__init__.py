"""Masked-diffusion decoding: :func:`generate` with a :class:`SamplerConfig` → :class:`GenerationResult`.

Static schedules (``linear``, ``cubic``, ``square``, ``cosine``, ``sqrt``, ``exp``, ``log``, and Dream's
own ``dream``) or dynamic (confidence threshold) unmasking, semi-AR blocks, temperature / top-k / top-p,
and the selection strategies ``max_prob``, ``margin``, ``entropy``, ``random``, ``max_s`` (AGDO), ``rcr``
(MDPO's running confidence remasking) and ``origin`` (Dream's random transfer), with Dream's ``alg_temp``.
Confidence follows each model family's reference sampler (``confidence_from``: LLaDA ``"raw"``, Dream
``"sampling"``). The exact rules (conventions, RCR, early stop, randomness) are in
:mod:`agdo.sampling.sampler`.
"""

from .sampler import (
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
    "tokens_per_step",
    "SCHEDULES",
    "STRATEGIES",
]

"""Masked-diffusion decoding: :func:`generate` with a :class:`SamplerConfig` → :class:`GenerationResult`.

Static schedules (``linear``, ``cosine``, ``sqrt``, ``exp``, ``log``) or dynamic (confidence threshold)
unmasking, semi-AR blocks, temperature / top-k / top-p, and the selection strategies ``max_prob``,
``margin``, ``entropy``, ``random``, ``max_s`` (AGDO) and ``rcr`` (MDPO's running confidence remasking).
The exact rules (RCR, EOS, randomness) are in :mod:`agdo.sampling.sampler`.
"""

from .sampler import DiffusionAdapter, GenerationResult, SamplerConfig, generate
from .schedules import SCHEDULES, tokens_per_step
from .strategies import STRATEGIES

__all__ = [
    "generate",
    "SamplerConfig",
    "GenerationResult",
    "DiffusionAdapter",
    "tokens_per_step",
    "SCHEDULES",
    "STRATEGIES",
]

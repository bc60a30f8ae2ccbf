"""Static unmasking schedules: how many tokens of a block are committed at each of its steps.

A schedule is a mask-ratio function ``phi(r)``, ``r = t / T``, falling from ``phi(0) = 1`` (all masked)
to ``phi(1) = 0`` (all committed): after step ``t`` of ``T`` a block of ``L`` tokens keeps
``floor(phi(t / T) * L)`` masked (MDPO, paper 003 Eq. 13, App. B.2):

- ``linear``   ``1 - r``; LLaDA's split: ``L // T`` per step, the remainder to the first steps
- ``cubic``    ``1 - r^3``
- ``square``   ``1 - r^2``
- ``cosine``   ``(1 + cos(pi r)) / 2``
- ``sqrt``     ``1 - sqrt(r)`` (square root)
- ``exp``      ``(e - e^r) / (e - 1)`` (exponential)
- ``log``      ``1 - ln(1 + r) / ln 2`` (logarithmic)

Every schedule commits at least one token per step while the block has masked tokens (a step that
commits nothing would be a wasted forward pass), so when ``T > L`` the last ``T - L`` counts are 0 and
the sampler moves on to the next block early.
"""

from __future__ import annotations

import math

import torch

SCHEDULES = ("linear", "cubic", "square", "cosine", "sqrt", "exp", "log")

_MASK_RATIO = {
    "cubic": lambda r: 1 - r**3,
    "square": lambda r: 1 - r**2,
    "cosine": lambda r: (1 + torch.cos(math.pi * r)) / 2,
    "sqrt": lambda r: 1 - torch.sqrt(r),
    "exp": lambda r: (math.e - torch.exp(r)) / (math.e - 1),
    "log": lambda r: 1 - torch.log1p(r) / math.log(2),
}


def tokens_per_step(schedule: str, length: int, steps: int) -> torch.Tensor:
    """Tokens committed at each of ``steps`` steps for a block of ``length`` tokens → int64 ``(steps,)``.

    The counts sum to ``length`` and are ``>= 1`` until the block is complete.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if length < 0 or steps < 1:
        raise ValueError(f"need length >= 0 and steps >= 1, got length={length}, steps={steps}")
    t = torch.arange(1, steps + 1, dtype=torch.int64)
    if schedule == "linear":
        committed = t * (length // steps) + t.clamp(max=length % steps)
    else:
        ratio = _MASK_RATIO[schedule](t.double() / steps).clamp(0.0, 1.0)
        committed = length - torch.floor(ratio * length).to(torch.int64)
        committed[-1] = length  # phi(1) = 0 exactly, whatever the rounding
    # The smallest non-decreasing sequence above `committed` that grows by >= 1 per step (capped at
    # length): committed'_t = min(L, t + max_{s <= t}(committed_s - s)), with committed_0 = 0.
    lead = torch.cummax((committed - t).clamp(min=0), dim=0).values
    committed = (t + lead).clamp(max=length)
    return torch.diff(committed, prepend=committed.new_zeros(1))

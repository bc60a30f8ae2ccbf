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

Every one of these commits at least one token per step while the block has masked tokens (a step that
commits nothing would be a wasted forward pass), so when ``T > L`` the last ``T - L`` counts are 0 and
the sampler moves on to the next block early.

- ``dream``    Dream's own rule (``_sample`` in Dream's ``generation_utils.py``; Fast-dLLM's and TraceRL's
  block versions apply it per block): ``timesteps = linspace(1, eps, T + 1)`` and step ``i`` commits
  ``int(n_i * (1 - s / t))`` of the ``n_i`` tokens still masked, ``t = timesteps[i]``,
  ``s = timesteps[i + 1]``; the last step commits all that are left. Computed in float32 as Dream does.
  Kept exactly, so a step may commit 0 tokens (e.g. the first step when ``T = L``: ``int(L (1 - eps) / L)
  = 0``); Dream runs that forward pass too.
"""

from __future__ import annotations

import math

import torch

SCHEDULES = ("linear", "cubic", "square", "cosine", "sqrt", "exp", "log", "dream")
DREAM_EPS = 1e-3  # Dream's default ``eps``, the last timestep

_MASK_RATIO = {
    "cubic": lambda r: 1 - r**3,
    "square": lambda r: 1 - r**2,
    "cosine": lambda r: (1 + torch.cos(math.pi * r)) / 2,
    "sqrt": lambda r: 1 - torch.sqrt(r),
    "exp": lambda r: (math.e - torch.exp(r)) / (math.e - 1),
    "log": lambda r: 1 - torch.log1p(r) / math.log(2),
}


def dream_timesteps(steps: int, eps: float = DREAM_EPS) -> torch.Tensor:
    """Dream's ``torch.linspace(1, eps, steps + 1)`` (float32): step ``i`` goes from ``t[i]`` to ``t[i + 1]``."""
    return torch.linspace(1.0, eps, steps + 1, dtype=torch.float32)


def transfer_probability(step: int, steps: int, eps: float = DREAM_EPS) -> float:
    """``1 - s / t`` at step ``step`` of ``steps`` (1 at the last step): the chance that Dream's ``origin``
    commits each masked position, and the fraction of the masked tokens the ``dream`` schedule commits."""
    if step >= steps - 1:
        return 1.0
    t = dream_timesteps(steps, eps)
    return float(1 - t[step + 1] / t[step])


def tokens_per_step(schedule: str, length: int, steps: int, eps: float = DREAM_EPS) -> torch.Tensor:
    """Tokens committed at each of ``steps`` steps for a block of ``length`` tokens → int64 ``(steps,)``.

    The counts sum to ``length``; they are ``>= 1`` until the block is complete, except for ``dream``
    (Dream's counts exactly, zeros included). ``eps`` is used by ``dream`` only.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if length < 0 or steps < 1:
        raise ValueError(f"need length >= 0 and steps >= 1, got length={length}, steps={steps}")
    if schedule == "dream":
        return _dream_counts(length, steps, eps)
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


def _dream_counts(length: int, steps: int, eps: float) -> torch.Tensor:
    # Dream: num_mask_token (a float32 tensor) * (1 - s / t) (float32), truncated by int(); all at the end.
    timesteps = dream_timesteps(steps, eps)
    counts, masked = [], length
    for i in range(steps):
        if i < steps - 1:
            n = torch.tensor(float(masked), dtype=torch.float32)
            k = int(n * (1 - timesteps[i + 1] / timesteps[i]))
        else:
            k = masked
        counts.append(k)
        masked -= k
    return torch.tensor(counts, dtype=torch.int64)

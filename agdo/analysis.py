"""Attention analysis of decoding (AGDO §4): per-token S and ΔP, and the paper's figures as PNG files.

Inputs are the sampler's records (:class:`agdo.sampling.GenerationResult` with ``return_s`` and
``return_token_probs``): ``step_s`` / ``token_probs`` are ``(T, B, R)``, ``trace`` is ``(B, R)``.

- :func:`commit_s` — ``S_i`` at the step that committed token ``i`` (Eq. 6; U = the tokens unmasked
  before that step).
- :func:`probability_change` — ``ΔP_i = min_{t >= t_i} p_t(x_i) - p_{t_i}(x_i)`` (Eq. 7).
- :func:`plot_attention_dynamics` (Fig. 1), :func:`plot_s_vs_delta_p` (Fig. 2),
  :func:`plot_s_distribution` (Fig. 6). Attention maps come from the caller as ``(R, R)`` arrays per
  step — e.g. ``agdo_kernels.response_attention(q, k, ...).abar_rr[b]`` — so nothing here depends on
  how a model exposes its attention.

Plots use matplotlib's Agg canvas directly (no pyplot, no global backend change).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np
import torch


def _at_commit_step(per_step: torch.Tensor, trace: torch.Tensor) -> torch.Tensor:
    """``per_step[trace[b, i], b, i]`` as float32 ``(B, R)``; NaN where ``trace < 0``."""
    picked = per_step.float().gather(0, trace.clamp(min=0).unsqueeze(0)).squeeze(0)
    return torch.where(trace >= 0, picked, float("nan"))


def commit_s(step_s: torch.Tensor, trace: torch.Tensor) -> torch.Tensor:
    """Valid attention of every response token at its commit step → ``(B, R)``, NaN if never committed."""
    return _at_commit_step(step_s, trace)


def probability_change(token_probs: torch.Tensor, trace: torch.Tensor) -> torch.Tensor:
    """ΔP (AGDO Eq. 7) → ``(B, R)``, ``<= 0``; NaN if never committed.

    ``token_probs[t, b, i]`` = ``p_t(x_i)``, the probability of the token position ``i`` holds after step
    ``t`` under step ``t``'s forward pass (NaN while masked or after the row finished). For ``t >= t_i``
    that token is the final one, so the minimum over those steps is ``P_i^min``.
    """
    steps = torch.arange(token_probs.shape[0], device=trace.device).view(-1, 1, 1)
    later = (steps >= trace.unsqueeze(0)) & ~token_probs.isnan()
    p_min = torch.where(later, token_probs.float(), float("inf")).amin(dim=0)
    return torch.where(trace >= 0, p_min - _at_commit_step(token_probs, trace), float("nan"))


def binned_mean(x, y, bins: int = 10, value_range: tuple = (0.0, 1.0)):
    """Mean of ``y`` in equal-width bins of ``x`` (NaN pairs dropped) → ``(centers, means, counts)``;
    empty bins have mean NaN. Fig. 2 plots these for ``x = S``, ``y = ΔP``."""
    x, y = _finite_pairs(x, y)
    edges = np.linspace(*value_range, bins + 1)
    which = np.clip(np.digitize(x, edges) - 1, 0, bins - 1)
    counts = np.bincount(which, minlength=bins)
    sums = np.bincount(which, weights=y, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = sums / counts
    return (edges[:-1] + edges[1:]) / 2, means, counts


def _numpy(values) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().float().cpu().numpy()
    return np.asarray(values, dtype=np.float64)


def _finite_pairs(x, y):
    x, y = _numpy(x).ravel(), _numpy(y).ravel()
    keep = np.isfinite(x) & np.isfinite(y)
    return x[keep], y[keep]


def _save(figure, path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure)
    figure.savefig(path, dpi=120)
    return path


def _evenly_spaced(count: int, available: int) -> list:
    return sorted({int(round(i)) for i in np.linspace(0, available - 1, min(count, available))})


def plot_attention_dynamics(
    maps,
    path,
    *,
    steps: Optional[Sequence[int]] = None,
    show_steps: Optional[Sequence[int]] = None,
    queries: Optional[Sequence[int]] = None,
    commit_steps=None,
) -> Path:
    """AGDO Fig. 1 as a PNG: last-layer head-averaged attention across decoding steps.

    Top row: the ``(R, R)`` maps at a few steps (query rows, key columns). Bottom row: for a few query
    tokens, their attention to every key at every step (steps down, keys across), with a red dashed
    line at the step that committed the query token.

    Args:
        maps: ``(T, R, R)`` array/tensor (or a sequence of ``(R, R)``), one map per recorded step.
        steps: the decoding step of each map (default ``0..T-1``).
        show_steps: indices into ``maps`` for the top row (default: 4 evenly spaced).
        queries: response positions for the bottom row (default: 4 evenly spaced).
        commit_steps: ``(R,)`` commit step per position (a row of ``GenerationResult.trace``).
    """
    from matplotlib.figure import Figure

    maps = np.stack([_numpy(m) for m in maps])
    T, R = maps.shape[0], maps.shape[1]
    steps = np.arange(T) if steps is None else np.asarray(steps)
    show_steps = _evenly_spaced(4, T) if show_steps is None else list(show_steps)
    queries = _evenly_spaced(4, R) if queries is None else list(queries)
    columns = max(len(show_steps), len(queries))
    figure = Figure(figsize=(3.4 * columns, 6.4), layout="constrained")
    axes = figure.subplots(2, columns, squeeze=False)
    for ax, index in zip(axes[0], show_steps):
        image = ax.imshow(maps[index], cmap="viridis", aspect="auto")
        ax.set_title(f"step {steps[index]}")
        ax.set_xlabel("key")
        ax.set_ylabel("query")
        figure.colorbar(image, ax=ax, fraction=0.046)
    half_gap = (steps[-1] - steps[0]) / max(T - 1, 1) / 2 if T > 1 else 0.5  # rows centred on their step
    for ax, query in zip(axes[1], queries):
        image = ax.imshow(maps[:, query, :], cmap="viridis", aspect="auto",
                          extent=(-0.5, R - 0.5, steps[-1] + half_gap, steps[0] - half_gap))
        if commit_steps is not None and int(commit_steps[query]) >= 0:
            ax.axhline(int(commit_steps[query]), color="red", linestyle="--", linewidth=1.2)
        ax.set_title(f"token {query}")
        ax.set_xlabel("key")
        ax.set_ylabel("step")
        figure.colorbar(image, ax=ax, fraction=0.046)
    for ax in list(axes[0][len(show_steps):]) + list(axes[1][len(queries):]):
        ax.axis("off")
    return _save(figure, path)


def plot_s_vs_delta_p(s, delta_p, path, *, bins: int = 10) -> Path:
    """AGDO Fig. 2 as a PNG: every token's (S, ΔP) and the mean ΔP per S bin."""
    from matplotlib.figure import Figure

    x, y = _finite_pairs(s, delta_p)
    centers, means, counts = binned_mean(x, y, bins)
    figure = Figure(figsize=(5, 4), layout="constrained")
    ax = figure.subplots()
    ax.scatter(x, y, s=4, alpha=0.2, color="tab:blue", label="tokens")
    filled = counts > 0
    ax.plot(centers[filled], means[filled], "o-", color="tab:red", label="mean ΔP per S bin")
    ax.set_xlabel("valid attention S at commit step")
    ax.set_ylabel("ΔP")
    ax.set_xlim(0, 1)
    ax.legend(loc="lower right")
    return _save(figure, path)


def plot_s_distribution(s_by_label: Mapping[str, object], path, *, bins: int = 40) -> Path:
    """AGDO Fig. 6 as a PNG: the distribution of S per model (e.g. ``{"Dream": s, "AGDO": s}``),
    normalised histograms with each mean marked."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5, 4), layout="constrained")
    ax = figure.subplots()
    edges = np.linspace(0.0, 1.0, bins + 1)
    for index, (label, values) in enumerate(s_by_label.items()):
        color = f"C{index}"
        values = _numpy(values).ravel()
        values = values[np.isfinite(values)]
        ax.hist(values, bins=edges, density=True, alpha=0.45, color=color, label=f"{label} (mean {values.mean():.3f})")
        ax.axvline(values.mean(), color=color, linestyle="--")
    ax.set_xlabel("valid attention S at commit step")
    ax.set_ylabel("density")
    ax.legend()
    return _save(figure, path)


@torch.no_grad()
def attention_maps(adapter, result, prompt_mask: torch.Tensor, row: int) -> torch.Tensor:
    """``(T, R, R)`` last-layer ``Abar_RR`` of one row at every decoding step (Fig. 1's input).

    Step ``t``'s input is rebuilt from the sampler's records (``return_predictions=True``): the response
    with ``masked[t]`` positions set to the mask token and the rest as they stood before the step. One
    extra forward per step, for analysis only.
    """
    if result.masked is None or result.predictions is None:
        raise ValueError("attention_maps needs a GenerationResult made with return_predictions=True")
    P = result.response_start
    prompt = result.sequences[row : row + 1, :P]
    states = torch.where(result.masked[:, row], adapter.mask_token_id, result.predictions[:, row])
    attention_mask = torch.cat([prompt_mask[row : row + 1], torch.ones_like(states[:1], dtype=torch.bool)], dim=1)
    maps = []
    for state in states:
        out = adapter.forward(torch.cat([prompt, state[None]], dim=1), attention_mask, response_start=P)
        maps.append(out.abar_rr[0].cpu())
    return torch.stack(maps)


def analyze_decoding(adapter, prompt_ids, prompt_mask, sampler_config, output_dir, *, label: str = "model",
                     map_row: int = 0) -> dict:
    """Decode, then save Fig. 1 (maps of row ``map_row``), Fig. 2 and Fig. 6 under ``output_dir``.

    Returns the per-token ``s`` and ``delta_p`` (``(B, R)``, NaN where never committed) and the paths.
    """
    import dataclasses

    from .sampling import generate

    config = dataclasses.replace(sampler_config, return_s=True, return_token_probs=True, return_predictions=True)
    result = generate(adapter, prompt_ids, prompt_mask, config)
    s = commit_s(result.s, result.trace)
    delta_p = probability_change(result.token_probs, result.trace)
    output_dir = Path(output_dir)
    maps = attention_maps(adapter, result, prompt_mask, map_row)
    paths = {
        "attention_dynamics": plot_attention_dynamics(maps, output_dir / f"{label}_attention_dynamics.png",
                                                      commit_steps=result.trace[map_row].cpu()),
        "s_vs_delta_p": plot_s_vs_delta_p(s, delta_p, output_dir / f"{label}_s_vs_delta_p.png"),
        "s_distribution": plot_s_distribution({label: s}, output_dir / f"{label}_s_distribution.png"),
    }
    return {"s": s, "delta_p": delta_p, "paths": paths, "result": result}

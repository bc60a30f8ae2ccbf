"""S at the commit step, ΔP (AGDO Eq. 7) on hand-made records and on a sampler run; the figures as PNGs."""

import math

import numpy as np
import pytest
import torch

from agdo.analysis import (
    binned_mean,
    commit_s,
    plot_attention_dynamics,
    plot_s_distribution,
    plot_s_vs_delta_p,
    probability_change,
)
from agdo.sampling import SamplerConfig, generate

from test_sampling import FakeAdapter, random_model

nan = math.nan
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_commit_s_picks_the_commit_step():
    step_s = torch.tensor([[[0.1, 0.2, 0.3]], [[0.4, 0.5, 0.6]], [[0.7, 0.8, 0.9]]])  # (T=3, B=1, R=3)
    s = commit_s(step_s, torch.tensor([[2, 0, -1]]))
    assert torch.allclose(s[0, :2], torch.tensor([0.7, 0.2])) and s[0, 2].isnan()


def test_probability_change_is_the_later_minimum_minus_the_commit_probability():
    # Position 0 committed at step 1 with p .8, later .6 and .7 → ΔP = -.2. Position 1 committed at step 0
    # with .9 and only rising until its row finished (NaN after) → 0. Position 2 never committed → NaN.
    token_probs = torch.tensor(
        [
            [[nan, 0.9, nan]],
            [[0.8, 0.95, nan]],
            [[0.6, nan, nan]],
            [[0.7, nan, nan]],
        ]
    )
    delta = probability_change(token_probs, torch.tensor([[1, 0, -1]]))
    assert torch.allclose(delta[0, :2], torch.tensor([-0.2, 0.0])) and delta[0, 2].isnan()


def test_statistics_from_a_sampler_run():
    config = SamplerConfig(gen_length=8, steps=8, block_length=4, temperature=1.0, alg="max_s",
                           stop_at_eos=False, return_s=True, return_token_probs=True)
    adapter = FakeAdapter(8, random_model)
    prompts = torch.tensor([[2, 3, 4], [5, 6, 2]])
    result = generate(adapter, prompts, None, config, generator=torch.Generator().manual_seed(0))
    s, delta = commit_s(result.s, result.trace), probability_change(result.token_probs, result.trace)
    assert s.shape == delta.shape == (2, 8)
    assert ((s >= 0) & (s <= 1)).all() and (delta <= 0).all()
    first = result.trace[0, 0]
    assert s[0, 0] == result.s[first, 0, 0]
    assert delta[0, 0] == result.token_probs[first:, 0, 0].min() - result.token_probs[first, 0, 0]


def test_binned_mean():
    centers, means, counts = binned_mean([0.05, 0.15, 0.12, nan, 0.95], [-1.0, -0.5, -0.3, 9.0, 0.0], bins=10)
    assert np.allclose(centers[:2], [0.05, 0.15])
    assert counts.tolist() == [1, 2, 0, 0, 0, 0, 0, 0, 0, 1]
    assert np.allclose(means[[0, 1, 9]], [-1.0, -0.4, 0.0]) and np.isnan(means[2])


def test_figures_are_written_as_png(tmp_path):
    pytest.importorskip("matplotlib")
    gen = torch.Generator().manual_seed(0)
    maps = torch.rand(6, 16, 16, generator=gen).softmax(-1)
    s = torch.rand(200, generator=gen)
    written = [
        plot_attention_dynamics(maps, tmp_path / "fig1.png", steps=range(0, 12, 2), commit_steps=torch.arange(16) % 6),
        plot_s_vs_delta_p(s, -(1 - s) * torch.rand(200, generator=gen), tmp_path / "fig2.png"),
        plot_s_distribution({"base": s * 0.8, "agdo": s}, tmp_path / "sub" / "fig6.png"),
    ]
    for path in written:
        assert path.read_bytes()[:8] == PNG_MAGIC

"""The RL trainer: advantages and the policy loss against hand computations, the rows of AGDO-RL and TraceRL
against independent calls, and end-to-end runs of every method on a tiny model — resume, 2 processes, and
the reward rising from a weak start. The baselines' own rows and losses: tests/test_rl_methods.py.

The tiny run (``train_worker.build_tiny_rl_run``): 8 one-digit additions graded by exact match; responses
are 2 digits + EOS (``max_completion_length=3``), so every rollout fits one static schedule of 3 steps.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from agdo import orders
from agdo.cli import main
from agdo.config import build_config
from agdo.models import load_adapter
from agdo.training.masking import token_logprobs
from agdo.training.metrics import MetricsLogger
from agdo.training.rl import RL_METHODS, RLConfig, RLRows, RLTrainer, group_advantages, policy_loss, train_rl

sys.path.insert(0, str(Path(__file__).parent))
from train_worker import build_tiny_rl_run  # noqa: E402
from training_helpers import (  # noqa: E402,F401  (fresh_accelerate, one_thread: autouse fixtures)
    assert_same_weights, fresh_accelerate, launch_two_processes, launch_unavailable, metrics, one_thread, params,
    reset_accelerate, script_forward,
)

BASE = dict(post_num=1, max_completion_length=3, num_generations=4, prompts_per_step=4, learning_rate=1e-3,
            max_steps=2, save_steps=100, reward_workers=1, forward_batch_size=64, beta=0.0)


def _run(output_dir, *, adapter_and_prompts=None, **overrides):
    reset_accelerate()
    adapter, prompts = adapter_and_prompts or build_tiny_rl_run()
    train_rl(RLConfig(output_dir=str(output_dir), **{**BASE, **overrides}), adapter=adapter, prompts=prompts)
    return adapter


# --------------------------------------------------------------------------------------- advantages


def test_group_advantages_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.5, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0]])
    advantages, keep, passes = group_advantages(rewards)
    for g, row in enumerate(rewards.tolist()):
        mean, std = statistics.fmean(row), statistics.pstdev(row)  # population std (SPEC §5)
        expected = [(r - mean) / (std + 1e-4) for r in row] if std > 0 else [0.0] * 4
        assert advantages[g].tolist() == pytest.approx(expected, rel=1e-6)
    assert keep.tolist() == [True, False, True, True]  # all-equal groups carry no signal
    assert passes.tolist() == [2, 4, 0, 3]

    advantages, keep, _ = group_advantages(rewards, filter_pass_rate=[0.2, 0.6])  # TraceRL-style filter
    assert keep.tolist() == [True, False, False, False]
    assert (advantages[~keep] == 0).all() and (advantages[0] != 0).all()


# ------------------------------------------------------------------------------------- policy loss


def _naive_loss(logits, rows, epsilon, epsilon_high, beta):
    """Eq. 10 token by token in float64: -min(r A, clip(r) A) + beta * k3, weighted by 1/|M_sub|."""
    total = 0.0
    M, N, _ = logits.shape
    for m in range(M):
        for k in range(N):
            w = float(rows.weights[m, k])
            if w == 0:
                continue
            logp = torch.log_softmax(logits[m, k].double(), -1)[rows.targets[m, k]]
            old = float(rows.old_logp[m, k]) if rows.old_logp is not None else logp.detach()
            ratio = torch.exp(logp - old)
            a = float(rows.advantages[m, k])
            clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high)
            term = -torch.minimum(ratio * a, clipped * a)
            if beta:
                ref = float(rows.ref_logp[m, k])
                term = term + beta * (math.exp(ref - logp.item()) * torch.exp(logp.detach() - logp)
                                      - (ref - logp) - 1)
            total = total + w * term
    return total


def _scripted_rows(seed=0, M=3, N=6, V=5):
    gen = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, V, (M, N), generator=gen)
    supervised = torch.rand(M, N, generator=gen) < 0.6
    supervised[:, 0] = True  # every row supervises something
    weights = supervised / supervised.sum(1, keepdim=True)
    advantages = torch.randn(M, N, generator=gen) * 2
    # Old log-probs far enough from the current ones that some ratios leave [0.8, 1.2] both ways.
    old = torch.log(torch.rand(M, N, generator=gen) * 0.6 + 0.05)
    ref = torch.log(torch.rand(M, N, generator=gen) * 0.6 + 0.05)
    rows = RLRows(torch.zeros(M, N, dtype=torch.long), torch.ones(M, N, dtype=torch.bool), targets, weights.float(),
                  torch.arange(M), advantages, old * supervised, ref * supervised)
    logits = torch.randn(M, N, V, generator=gen, dtype=torch.float64).float()
    return logits, rows


@pytest.mark.parametrize("beta", [0.0, 0.05])
@pytest.mark.parametrize("epsilon_high", [0.2, 0.28])
def test_policy_loss_and_gradient_match_a_hand_computation(beta, epsilon_high):
    logits, rows = _scripted_rows()
    ours_logits = logits.clone().requires_grad_(True)
    loss, stats = policy_loss(ours_logits, rows, epsilon=0.2, epsilon_high=epsilon_high, beta=beta)
    loss.backward()
    naive_logits = logits.double().clone().requires_grad_(True)
    expected = _naive_loss(naive_logits, rows, 0.2, epsilon_high, beta)
    expected.backward()
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours_logits.grad.double(), naive_logits.grad, rtol=1e-4, atol=1e-6)

    supervised = rows.weights > 0
    logp = token_logprobs(logits, rows.targets, supervised)
    ratio = torch.exp(logp - rows.old_logp[supervised])
    a = rows.advantages[supervised]
    clipped = ((ratio < 0.8) & (a < 0)) | ((ratio > 1 + epsilon_high) & (a > 0))
    assert int(stats["supervised_tokens"]) == int(supervised.sum())
    assert int(stats["clipped_tokens"]) == int(clipped.sum()) > 0  # the clip is really exercised
    if not beta:  # a clipped token has no surrogate gradient (with beta > 0 its KL term still has one)
        assert (ours_logits.grad.abs().sum(-1)[supervised][clipped] == 0).all()
    else:
        log_ratio = rows.ref_logp[supervised] - logp
        k3 = torch.exp(log_ratio) - log_ratio - 1
        assert float(stats["kl_row_sum"]) == pytest.approx(float((k3 * rows.weights[supervised]).sum()), rel=1e-5)


def test_policy_loss_without_old_logp_is_the_plain_policy_gradient():
    """Rows trained once right after the rollout: ratio 1, loss = -sum w A, gradient -w A grad(logp)."""
    logits, rows = _scripted_rows(seed=3)
    rows = rows._replace(old_logp=None, ref_logp=None)
    ours = logits.clone().requires_grad_(True)
    loss, stats = policy_loss(ours, rows, epsilon=0.2, epsilon_high=0.2, beta=0.0)
    loss.backward()
    supervised = rows.weights > 0
    assert loss.item() == pytest.approx(-float((rows.weights * rows.advantages)[supervised].sum()), rel=1e-6)
    assert int(stats["clipped_tokens"]) == 0
    plain = logits.clone().requires_grad_(True)
    (-(token_logprobs(plain, rows.targets, supervised) * (rows.weights * rows.advantages)[supervised]).sum()).backward()
    torch.testing.assert_close(ours.grad, plain.grad)


# -------------------------------------------------------------------------------------------- rows


def _one_step_trainer(tmp_path, method, **overrides):
    reset_accelerate()
    adapter, prompts = build_tiny_rl_run()
    config = RLConfig(output_dir=str(tmp_path), method=method, **{**BASE, **overrides})
    return RLTrainer(config, adapter, prompts)


@pytest.mark.parametrize("method", ["agdo", "tracerl"])
def test_rows_follow_the_method_order_and_token_advantages(tmp_path, method):
    trainer = _one_step_trainer(tmp_path, method, delta=2.0, shrink=2 if method == "tracerl" else 1)
    try:
        records = [trainer.dataset[i] for i in range(4)]
        rollouts = trainer._rollout(records, epoch=0)
        P, adapter = rollouts.response_start, trainer.adapter
        rewards = torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 0], [1, 1, 0, 0], [0, 1, 0, 1]])
        advantages, keep, _ = group_advantages(rewards)
        clock = __import__("agdo.training.rl", fromlist=["_Clock"])._Clock()
        rows, extra = trainer._rows(rollouts, advantages, keep, records, 0, clock)
    finally:
        trainer.rewards.close()
    kept = [c for c in range(16) if keep[c // 4]]
    assert sorted(set(rows.completion.tolist())) == kept  # the all-wrong group (1) has no rows

    trained = orders.trained_positions(rollouts.sequences[:, P:], adapter.stop_token_ids, 1,
                                       pad_token_id=adapter.pad_token_id)
    if method == "agdo":
        steps = orders.attention_order(adapter, rollouts.sequences, rollouts.attention_mask, response_start=P,
                                       trained=trained, influence_norm="sum").steps
        influence = adapter.forward(rollouts.sequences, rollouts.attention_mask,
                                    influence_query_mask=rollouts.attention_mask, influence_norm="sum").influence[:, P:]
        A = advantages.flatten()
        expected_advantage = A[:, None] + torch.sign(A)[:, None] * 2.0 * influence
        assert extra["analysis_forward_passes"] == len(kept)
    else:
        steps = orders.trace_order(rollouts.trace, trained, shrink=2)
        expected_advantage = advantages.flatten()[:, None].expand(16, trained.shape[1])
        assert extra["analysis_forward_passes"] == 0
    for c in kept:
        mine = rows.completion == c
        assert int(mine.sum()) == int(steps[c].max()) + 1  # one row per step of the order
        for r in mine.nonzero().squeeze(1).tolist():
            response_in, weights = rows.input_ids[r, P:], rows.weights[r, P:]
            supervised = weights > 0
            step = int(steps[c][supervised][0])
            assert (steps[c][supervised] == step).all()
            if method == "tracerl":  # mask ratio 1: the whole step is supervised
                assert supervised.tolist() == (steps[c] == step).tolist()
            assert torch.allclose(weights[supervised], torch.tensor(1.0 / int(supervised.sum())))
            hidden = response_in == adapter.mask_token_id
            assert hidden.tolist() == ((steps[c] > step) | (steps[c] < 0) | supervised).tolist()
            assert torch.equal(rows.input_ids[r, :P], rollouts.sequences[c, :P])  # the prompt is never masked
            torch.testing.assert_close(rows.advantages[r, P:][supervised], expected_advantage[c][supervised].float(),
                                       rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("method", RL_METHODS)
def test_smoke_metrics_checkpoint_and_final_model(tmp_path, method):
    initial = params(build_tiny_rl_run()[0])
    adapter = _run(tmp_path, method=method, beta=0.05, num_iterations=2)
    logged = metrics(tmp_path)
    assert [m["step"] for m in logged] == [1, 2]
    for m in logged:
        assert m["groups"] == 4 and len(m["pass_rate_hist"]) == 5 and sum(m["pass_rate_hist"]) == 4
        assert 0 <= m["reward_mean"] <= 1 and m["rollout_forward_passes"] > 0
        assert m["share_rollout"] + m["share_reward"] + m["share_train"] + m.get("share_analysis", 0) == pytest.approx(1)
        kept = m["groups_kept"] * 4
        assert m["training_rows"] == pytest.approx(m["rows_per_response"] * kept)
        if m["updates"]:
            assert m["updates"] == 2 and math.isfinite(m["loss"]) and m["kl"] >= 0 and 0 <= m["clip_fraction"] <= 1
            assert m["training_forward_passes"] == PASSES_PER_ROW[method] * m["training_rows"]
            assert m["train_forward_passes_per_response"] == pytest.approx(m["training_forward_passes"] / kept)
        assert m["analysis_forward_passes"] == (kept if method == "agdo" else 0)
        assert m["forward_passes_per_response"] == pytest.approx(
            (m["rollout_forward_passes"] + m["analysis_forward_passes"] + m["training_forward_passes"]) / 16)
    assert sum(m["updates"] for m in logged) > 0
    trained = params(adapter)
    assert any(not torch.equal(initial[k], trained[k]) for k in initial)
    assert (tmp_path / "checkpoint-2" / "trainer_state.json").is_file()
    assert_same_weights(params(load_adapter(tmp_path / "final")), trained)
    assert json.loads((tmp_path / "config.json").read_text())["method"] == method


# Forward passes per training row with num_iterations=2 and a reference: order methods and mdpo train one set
# of rows twice (+ logp_old + reference); the d1 family draws a fresh set per iteration (1 + logp_old +
# reference each); wd1 has no ratio (1 + reference).
PASSES_PER_ROW = {"agdo": 4, "tracerl": 4, "mdpo": 4, "diffu_grpo": 3, "coupled": 3, "wd1": 2}


class _Crash(RuntimeError):
    pass


@pytest.mark.parametrize("method", RL_METHODS)
def test_resume_after_crash_matches_uninterrupted_run(tmp_path, monkeypatch, method):
    config = dict(method=method, max_steps=5, save_steps=2, beta=0.05, num_iterations=2,
                  lr_scheduler_type="linear", warmup_steps=1)
    reference = params(_run(tmp_path / "reference", **config))
    reference_log = metrics(tmp_path / "reference")

    run = tmp_path / "run"
    original_log = MetricsLogger.log

    def crash_at_step_3(self, step, values):
        original_log(self, step, values)  # step 3 is logged, then the process dies before checkpoint-4
        if step == 3:
            raise _Crash("killed after step 3")

    with monkeypatch.context() as patch:
        patch.setattr(MetricsLogger, "log", crash_at_step_3)
        with pytest.raises(_Crash):
            _run(run, **config)
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2"]
    resumed = params(_run(run, resume_from_checkpoint="latest", **config))

    assert_same_weights(resumed, reference)
    log = metrics(run)
    assert [m["step"] for m in log] == [1, 2, 3, 4, 5]  # step 3 of the killed run is not kept twice
    for a, b in zip(log, reference_log, strict=True):
        for key in ("reward_mean", "lr", "loss", "kl", "training_rows", "pass_rate_hist"):
            assert a.get(key) == b.get(key), f"step {a['step']}: {key}"


def test_resume_refuses_another_initial_model(tmp_path):
    _run(tmp_path, max_steps=2, save_steps=1)
    other = build_tiny_rl_run(model_seed=5)
    with pytest.raises(ValueError, match="not the one this run started from"):
        _run(tmp_path, adapter_and_prompts=other, max_steps=3, resume_from_checkpoint="latest")


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without torch.distributed")
@pytest.mark.parametrize("method", ["agdo", "coupled", "mdpo"])
def test_two_processes_equal_one_process(tmp_path, method):
    """2 processes x 2 prompts == 1 process x 4 prompts for 3 steps, rollouts and rewards included (AGDO-RL;
    coupled GRPO: rows in triples, fresh masks per iteration; MDPO: step rewards and step rows).

    Responses are generated one group per call (``generation_batch_size`` = G) with per-response generators,
    so both runs sample the same tokens; rewards are therefore identical. The attention order and the
    training chunks batch different rows together, whose float rounding may differ in the last bit:
    weights are compared with a tolerance far below one step's change.
    """
    common = [f"method={method}", "max_steps=3", "save_steps=2", "post_num=1", "max_completion_length=3",
              "num_generations=4", "prompts_per_step=4", "learning_rate=1e-3", "reward_workers=1",
              "forward_batch_size=64", "generation_batch_size=4", "beta=0.05", "num_iterations=2"]
    result = launch_two_processes("rl", tmp_path / "ddp", common)
    if result.returncode != 0 and launch_unavailable(result):
        pytest.skip(f"could not start 2 gloo processes here:\n{result.stderr[-2000:]}")
    assert result.returncode == 0, result.stderr[-4000:]

    reset_accelerate()
    single = build_tiny_rl_run()[0]
    train_rl(build_config(RLConfig, None, [*common, f"output_dir={tmp_path / 'single'}"]), adapter=single,
             prompts=build_tiny_rl_run(pretrain_steps=0)[1])
    ddp = load_file(tmp_path / "ddp" / "final" / "model.safetensors")
    reference = params(single)
    initial = params(build_tiny_rl_run()[0])
    moved = 0
    for name, value in ddp.items():
        torch.testing.assert_close(value, reference[name], rtol=0, atol=1e-6, msg=lambda m: f"{name}: {m}")
        moved += bool((reference[name] - initial[name]).abs().max() > 1e-4)
    assert moved > len(ddp) // 2  # the tolerance is far below what training moved

    for a, b in zip(metrics(tmp_path / "ddp"), metrics(tmp_path / "single"), strict=True):
        for key in ("reward_mean", "pass_rate_hist", "groups_kept", "training_rows", "rollout_forward_passes"):
            assert a[key] == b[key], key
        if b["updates"]:
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-7)
    assert (tmp_path / "ddp" / "checkpoint-2" / "random_states_1.pkl").is_file()


# ------------------------------------------------------------------------------- block KV cache


def _cache_rollouts(tmp_path, method, cache, block_length):
    """Rollouts of the first 4 prompts (epoch 0) with the 60-step model, 3 denoising steps."""
    reset_accelerate()
    config = RLConfig(output_dir=str(tmp_path), method=method, block_length=block_length, diffusion_steps=3,
                      cache=cache, **BASE)
    trainer = RLTrainer(config, *build_tiny_rl_run(pretrain_steps=60))
    try:
        return trainer._rollout([trainer.dataset[i] for i in range(4)], epoch=0)
    finally:
        trainer.rewards.close()


@pytest.mark.parametrize("method", ["agdo", "mdpo"])  # TraceRL's rollouts are AGDO-RL's (same sampler call)
def test_prefix_cache_rl_steps_exact_with_one_step_per_block_and_trained_with_several(tmp_path, method):
    """RL steps whose rollouts use the block KV cache (``cache=prefix``), on the tiny run (2 steps).

    One denoising step per block (``block_length=1``): every step is a block's first, the full forward where
    the prefix cache is exact, so the rollouts (MDPO: also the per-step predictions, masks and probabilities),
    the logged metrics and the trained weights equal ``cache=none``'s bit for bit.

    One block of 3 tokens in 3 steps: the 2nd and 3rd steps attend to the prompt K/V kept from the 1st (an
    approximation). The 1st step is still exact (MDPO's step-0 records equal the uncached ones bit for bit);
    the trainer consumes the cached rollouts and records: finite loss, updates run, the weights move, and
    differently from ``cache=none`` (the cached steps did run).
    """
    common = dict(adapter_and_prompts=None, method=method, diffusion_steps=3, beta=0.05, num_iterations=2)
    initial = params(build_tiny_rl_run(pretrain_steps=60)[0])
    weights, logs, rollouts = {}, {}, {}
    for block_length in (1, 3):
        for cache in ("none", "prefix"):
            key = (block_length, cache)
            run = tmp_path / f"block{block_length}_{cache}"
            rollouts[key] = _cache_rollouts(run / "rollouts", method, cache, block_length)
            common["adapter_and_prompts"] = build_tiny_rl_run(pretrain_steps=60)
            weights[key] = params(_run(run, block_length=block_length, cache=cache, **common))
            logs[key] = metrics(run)
            assert json.loads((run / "config.json").read_text())["cache"] == cache

    records = ("sequences", "trace", "predictions", "masked", "prediction_probs")
    exact, uncached = rollouts[(1, "prefix")], rollouts[(1, "none")]
    for name in records:
        if method == "mdpo" or name in ("sequences", "trace"):
            assert torch.equal(getattr(exact, name).nan_to_num(-1.0), getattr(uncached, name).nan_to_num(-1.0)), name
    assert exact.completions == uncached.completions
    assert_same_weights(weights[(1, "prefix")], weights[(1, "none")])
    for a, b in zip(logs[(1, "prefix")], logs[(1, "none")], strict=True):
        for key in ("reward_mean", "pass_rate_hist", "training_rows", "rollout_forward_passes", "loss", "kl"):
            assert a.get(key) == b.get(key), f"step {a['step']}: {key}"

    cached, uncached = rollouts[(3, "prefix")], rollouts[(3, "none")]
    if method == "mdpo":
        assert cached.predictions.shape[0] == 3  # one block, 3 steps: records of every step
        for name in ("predictions", "masked", "prediction_probs"):
            assert torch.equal(getattr(cached, name)[0].nan_to_num(-1.0), getattr(uncached, name)[0].nan_to_num(-1.0))
        later = torch.isfinite(cached.prediction_probs[1:]) & torch.isfinite(uncached.prediction_probs[1:])
        assert (cached.prediction_probs[1:] != uncached.prediction_probs[1:])[later].any()  # the kept K/V are stale
    logged = logs[(3, "prefix")]
    assert sum(m["updates"] for m in logged) > 0
    for m in logged:
        if m["updates"]:
            assert math.isfinite(m["loss"]) and math.isfinite(m["kl"]) and m["training_rows"] > 0
    assert any(not torch.equal(initial[k], weights[(3, "prefix")][k]) for k in initial)  # gradients flowed
    assert any(not torch.equal(weights[(3, "none")][k], weights[(3, "prefix")][k]) for k in initial)


# ------------------------------------------------------------------------------------ learning


@pytest.mark.parametrize("method", RL_METHODS)
def test_reward_rises_from_a_weak_start(tmp_path, method):
    """From a model pre-trained just enough to be right now and then, RL raises the training reward.

    Fixed seeds: the mean reward of the last 10 steps must beat that of the first 10 by a margin
    four times the noise of the difference (standard error ~0.03: 10-step means of 64 rollouts each).
    AGDO-RL rolls out with pure Max-S (candidate_threshold 0), so that the trajectories follow the
    attention order its rows are built on; with Max-Prob rollouts the toy shows it lowering the reward
    (README, Status). It also trains the positions after the EOS (post_num=2): the sampler decodes them
    (stop_at_eos off, as the reference samplers), and masking them in the rows while the rollout saw them
    takes the rise below the margin on this toy (+0.07 with post_num=1, seed 1).
    """
    overrides = RISE[method]
    _run(tmp_path, adapter_and_prompts=build_tiny_rl_run(pretrain_steps=60, model_seed=RISE_SEED[method]),
         method=method, num_generations=8, prompts_per_step=8, **overrides)
    rewards = [m["reward_mean"] for m in metrics(tmp_path)]
    first, last = statistics.fmean(rewards[:10]), statistics.fmean(rewards[-10:])
    assert first < 0.6, f"the start is not weak: {first:.3f}"
    assert last >= first + 0.12, f"reward did not rise: first 10 steps {first:.3f}, last 10 {last:.3f}"


RISE = {
    "tracerl": dict(max_steps=60, learning_rate=1e-3),
    "agdo": dict(max_steps=60, learning_rate=1e-3, decoding_alg="max_s", candidate_threshold=0.0, post_num=2),
    "diffu_grpo": dict(max_steps=60, learning_rate=1e-3),
    "coupled": dict(max_steps=60, learning_rate=1e-3),
    "wd1": dict(max_steps=60, learning_rate=1e-3),
    "mdpo": dict(max_steps=60, learning_rate=1e-3),
}
RISE_SEED = dict.fromkeys(RL_METHODS, 1)


# ------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(method="grpo"), "`method` must be one of"),
        (dict(reference="ref"), "`reference` must be one of"),
        (dict(num_generations=1), "num_generations"),
        (dict(prompts_per_step=0), "prompts_per_step"),
        (dict(num_iterations=0), "num_iterations"),
        (dict(epsilon=1.5), "epsilon"),
        (dict(beta=-0.1), "beta"),
        (dict(delta=-1.0), "delta"),
        (dict(mask_ratio_min=0.0), "mask_ratio_min"),
        (dict(filter_pass_rate=[0.8, 0.2]), "filter_pass_rate"),
        (dict(filter_pass_rate=[0.2]), "filter_pass_rate"),
        (dict(train_file="a.jsonl", benchmarks=["gsm8k_train"]), "either `train_file` or `benchmarks`"),
        (dict(max_completion_length=6, block_length=4), "block_length must divide"),
        (dict(cache="full"), "cache must be one of"),
        (dict(cache_lookahead=2), "cache_lookahead must be None"),
        (dict(save_steps=0), "save_steps"),
        (dict(logging_steps=0), "logging_steps"),
        (dict(warmup_steps=-1), "warmup_steps"),
        (dict(post_num=-1), "post_num"),
        (dict(max_steps=0), "max_steps"),
        (dict(reward_workers=-1), "reward_workers"),
    ],
)
def test_rl_config_rejects(overrides, message):
    with pytest.raises(ValueError, match=message):
        RLConfig(**overrides)


def test_trainer_checks_the_step_shape(tmp_path):
    with pytest.raises(ValueError, match="multiple of per_device_train_batch_size"):
        _one_step_trainer(tmp_path, "agdo", per_device_train_batch_size=3)
    with pytest.raises(ValueError, match="the training data is empty"):
        reset_accelerate()
        RLTrainer(RLConfig(output_dir=str(tmp_path), **BASE), build_tiny_rl_run(pretrain_steps=0)[0], [])


def test_cli_rl_from_a_model_directory_and_a_prompt_file(tmp_path):
    adapter, prompts = build_tiny_rl_run(pretrain_steps=60)  # right now and then: groups with a signal
    adapter.model.save_pretrained(tmp_path / "model")
    adapter.tokenizer.save_pretrained(tmp_path / "model")
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    (tmp_path / "rl.yaml").write_text("method: tracerl\nmax_steps: 2\nnum_generations: 8\nprompts_per_step: 4\n"
                                      "max_completion_length: 3\npost_num: 1\nreward_workers: 1\n")
    reset_accelerate()
    main(["rl", f"model_name_or_path={tmp_path / 'model'}", f"train_file={tmp_path / 'prompts.jsonl'}",
          "--config", str(tmp_path / "rl.yaml"), f"output_dir={tmp_path / 'run'}"])
    assert [m["step"] for m in metrics(tmp_path / "run")] == [1, 2]
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
    (tmp_path / "bad.jsonl").write_text('{"prompt": "1+1="}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: expected an object with a string `reward` field"):
        main(["rl", f"model_name_or_path={tmp_path / 'model'}", f"train_file={tmp_path / 'bad.jsonl'}"])


def test_a_rollout_batch_split_into_several_updates(tmp_path):
    """16 completions per step, 8 per update (4 x 2 accumulation): 2 optimizer updates per step, each after
    the logp_old pass (the second update's ratio is no longer 1)."""
    _run(tmp_path, method="tracerl", per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=3,
         adapter_and_prompts=build_tiny_rl_run(pretrain_steps=60))
    logged = metrics(tmp_path)
    assert any(m["updates"] == 2 for m in logged) and all(m["updates"] in (0, 1, 2) for m in logged)
    for m in logged:
        if m["updates"]:
            assert m["training_forward_passes"] == 2 * m["training_rows"]  # training + the logp_old pass


@pytest.mark.parametrize("forward_batch_size", [1, 2, 64])
def test_update_loss_is_the_mean_over_rows_of_each_rows_token_mean(tmp_path, forward_batch_size):
    """A scripted model (fixed logits per row, whatever the input) through Trainer.optimizer_update: the
    logged loss is sum_rows(row loss) / rows, the same for every chunking of the rows."""
    logits, rows = _scripted_rows(seed=7, M=5, N=6, V=5)
    rows = rows._replace(input_ids=torch.arange(5)[:, None].expand(5, 6).contiguous())  # row id in the ids
    trainer = _one_step_trainer(tmp_path, "tracerl", forward_batch_size=forward_batch_size, beta=0.05)
    script_forward(trainer, logits)
    try:
        result = trainer.optimizer_update([rows], trainer._loss)
    finally:
        trainer.rewards.close()
    expected = _naive_loss(logits.double(), rows, 0.2, 0.2, 0.05).item() / 5
    assert result["rows"] == 5 and result["loss"] == pytest.approx(expected, rel=1e-5)
    assert result["supervised_tokens"] == int((rows.weights > 0).sum())

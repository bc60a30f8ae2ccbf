"""The SFT trainer end to end on a tiny model: every method, gradient accumulation, resume, 2 processes.

Every equality here compares two independent runs of ``train_sft`` (never a run against stored numbers).
The data are 2-digit additions: every prompt has 6 tokens and every response 3 digits + EOS, so batches
never need left padding and every sample yields the same number of rows — the condition under which
splitting a batch (over micro-batches or processes) can be exact, see ``test_gradient_accumulation``.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from agdo.models import load_adapter
from agdo.training import checkpoint as checkpoint_module
from agdo.training.checkpoint import latest_checkpoint
from agdo.training.metrics import MetricsLogger
from agdo.training.sft import SFT_METHODS, SFTConfig, train_sft

sys.path.insert(0, str(Path(__file__).parent))
from train_worker import build_tiny_run  # noqa: E402
from training_helpers import (  # noqa: E402,F401  (fresh_accelerate, one_thread: autouse fixtures)
    assert_same_weights, fresh_accelerate, launch_two_processes, launch_unavailable, metrics, one_thread, params,
    reset_accelerate,
)


# Small and fast: post_num=1 trains the EOS only (4 trained tokens a sample), 2 random masks per sample.
BASE = dict(post_num=1, learning_rate=1e-3, random_masks_per_sample=2, per_device_train_batch_size=4,
            forward_batch_size=4, max_steps=2, save_steps=100)


def _train(output_dir, *, model_seed=0, **overrides):
    """One in-process run on a fresh model; returns its adapter (model trained in place)."""
    reset_accelerate()
    adapter, dataset = build_tiny_run(model_seed=model_seed)
    train_sft(SFTConfig(output_dir=str(output_dir), **{**BASE, **overrides}), adapter=adapter, dataset=dataset)
    return adapter


# ------------------------------------------------------------------------------------------- smoke


@pytest.mark.parametrize("method", SFT_METHODS)
def test_smoke_every_method(tmp_path, method):
    initial = params(build_tiny_run()[0])
    adapter = _train(tmp_path, method=method, block_size=2 if method == "blockwise" else None)
    trained = params(adapter)

    logged = metrics(tmp_path)
    assert [m["step"] for m in logged] == [1, 2]
    for m in logged:
        assert math.isfinite(m["loss"]) and m["loss"] > 0
        assert math.isfinite(m["grad_norm"]) and m["grad_norm"] > 0
        assert m["rows"] > 0 and m["supervised_tokens"] > 0 and m["lr"] == pytest.approx(1e-3)
    # 3 answer digits + the end token (an ordinary response token, SPEC §4) + post_num=1 pad: 5 trained
    # tokens, one step each; blockwise: 3 blocks of 2.
    rows_per_sample = {"agdo": 5, "left_to_right": 5, "blockwise": 3, "random": 2}[method]
    assert all(m["rows"] == 4 * rows_per_sample for m in logged)

    changed = [name for name in initial if not torch.equal(initial[name], trained[name])]
    assert "model.embed_tokens.weight" in changed and any("layers.1." in name for name in changed)

    final = tmp_path / "final"
    assert json.loads((final / "trainer_state.json").read_text())["global_step"] == 2
    assert (tmp_path / "checkpoint-2" / "trainer_state.json").is_file()  # the last step is always saved
    reloaded = load_adapter(final)
    assert reloaded.mask_token_id == adapter.mask_token_id and reloaded.tokenizer is not None
    assert_same_weights(params(reloaded), trained)  # tied lm_head included
    assert json.loads((tmp_path / "config.json").read_text())["method"] == method


# --------------------------------------------------------------------------- gradient accumulation


@pytest.mark.parametrize("method", ["random", "agdo"])
def test_gradient_accumulation_equals_larger_batch(tmp_path, method):
    """2 samples x 2 accumulation steps == 4 samples x 1, exactly, for 3 optimizer steps.

    The trainer divides every row's loss by the rows of the whole optimizer step (all micro-batches), so
    the two runs compute the same sum. Bitwise equality also needs the same float operations:
    ``forward_batch_size`` = the rows of one micro-batch, so the large batch runs as two forward chunks
    identical to the two micro-batches. AdamW is nearly invariant to the scale of the gradient, so the
    logged pre-clipping ``grad_norm`` and loss are compared too.
    """
    rows = {"random": 2, "agdo": 5}[method]  # agdo: 3 digits + end token + 1 post_num pad, a step each
    # A moving schedule: a scheduler stepped per micro-batch instead of per optimizer step shows in lr.
    common = dict(method=method, max_steps=3, random_masks_per_sample=2, forward_batch_size=2 * rows,
                  lr_scheduler_type="cosine", warmup_steps=1)
    large = _train(tmp_path / "large", per_device_train_batch_size=4, gradient_accumulation_steps=1, **common)
    accumulated = _train(tmp_path / "accum", per_device_train_batch_size=2, gradient_accumulation_steps=2, **common)

    assert_same_weights(params(large), params(accumulated))
    for a, b in zip(metrics(tmp_path / "large"), metrics(tmp_path / "accum"), strict=True):
        assert a["step"] == b["step"] and a["rows"] == b["rows"] == 4 * rows
        assert a["supervised_tokens"] == b["supervised_tokens"]
        assert a["grad_norm"] == b["grad_norm"] and a["lr"] == b["lr"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)  # summed in a different order


def test_gradient_accumulation_with_unequal_rows_per_micro_batch(tmp_path):
    """Micro-batches with different row counts still match the large batch. Every third response ends
    one token early (``d d EOS EOS``): the same length, so batches pad identically, but 3 trained tokens
    instead of 4, so with ``left_to_right`` the micro-batches of a step differ in rows. A trainer that
    normalised each micro-batch by its own rows would be off by ~0.3% in the step-2 gradient norm."""
    logs = []
    for name, batch, accumulation in (("large", 4, 1), ("accum", 2, 2)):
        reset_accelerate()
        adapter, dataset = build_tiny_run()
        eos = adapter.tokenizer.eos_token_id
        dataset.pairs = [(p, r[:-2] + [eos, eos]) if i % 3 == 0 else (p, r) for i, (p, r) in enumerate(dataset.pairs)]
        config = SFTConfig(output_dir=str(tmp_path / name), **{**BASE, "method": "left_to_right", "max_steps": 3,
                           "per_device_train_batch_size": batch, "gradient_accumulation_steps": accumulation})
        train_sft(config, adapter=adapter, dataset=dataset)
        logs.append(metrics(tmp_path / name))
    assert len({m["rows"] % 2 for m in logs[0]}) == 2  # an odd number of rows: the halves differ
    for a, b in zip(*logs, strict=True):
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)


# ----------------------------------------------------------------------------------------- resume


class _Crash(RuntimeError):
    pass


def test_resume_after_crash_matches_uninterrupted_run(tmp_path, monkeypatch):
    # 40 samples / batch 4 = 10 batches an epoch; a linear schedule with warmup makes the lr differ per
    # step, so a scheduler that was not restored shows in the logged lr.
    config = dict(method="agdo", max_steps=6, save_steps=2, lr_scheduler_type="linear", warmup_steps=2)
    reference = params(_train(tmp_path / "reference", **config))
    reference_log = metrics(tmp_path / "reference")

    run = tmp_path / "run"
    original_log = MetricsLogger.log

    def crash_at_step_3(self, step, metrics):
        if step == 3:
            raise _Crash("killed after the optimizer step 3, before its log and the step-4 checkpoint")
        return original_log(self, step, metrics)

    with monkeypatch.context() as patch:
        patch.setattr(MetricsLogger, "log", crash_at_step_3)
        with pytest.raises(_Crash):
            _train(run, **config)
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2"]
    assert not (run / "final").exists()
    # A checkpoint that was being written when the process died: never "latest".
    partial = run / "checkpoint-4.tmp"
    partial.mkdir()
    (partial / "trainer_state.json").write_text(json.dumps({"global_step": 4, "epoch": 0, "batches_done": 4}))
    assert latest_checkpoint(run) == run / "checkpoint-2"

    # The restarted process builds a DIFFERENT model: the weights must come from the checkpoint.
    resumed = params(_train(run, model_seed=123, resume_from_checkpoint="latest", **config))

    assert_same_weights(resumed, reference)
    log = metrics(run)
    assert [m["step"] for m in log] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(log, reference_log, strict=True):
        assert a["lr"] == b["lr"], f"step {a['step']}: scheduler not restored"
        assert a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"], f"step {a['step']}"
    assert len({m["lr"] for m in log}) > 3  # the schedule really moves
    assert json.loads((run / "final" / "trainer_state.json").read_text())["global_step"] == 6


def test_resume_really_depends_on_the_checkpoint(tmp_path, monkeypatch):
    """Guard for the test above: resuming from a checkpoint whose optimizer state is lost is NOT exact."""
    config = dict(method="random", max_steps=4, save_steps=2)
    reference = params(_train(tmp_path / "reference", **config))
    run = tmp_path / "run"
    _train(run, **{**config, "max_steps": 2})  # stops (and saves) at step 2; max_steps only sets the schedule
    (run / "checkpoint-2" / "optimizer.bin").unlink()
    fresh_optimizer = torch.optim.AdamW(build_tiny_run()[0].model.parameters()).state_dict()
    torch.save(fresh_optimizer, run / "checkpoint-2" / "optimizer.bin")
    resumed = params(_train(run, resume_from_checkpoint="latest", **config))
    assert any(not torch.equal(resumed[k], reference[k]) for k in reference)


def test_latest_checkpoint_ignores_partial_and_foreign_entries(tmp_path):
    assert latest_checkpoint(tmp_path / "missing") is None
    assert latest_checkpoint(tmp_path) is None
    for name in ("checkpoint-9", "checkpoint-10", "checkpoint-12.tmp", "checkpoint-x", "final"):
        (tmp_path / name).mkdir()
    (tmp_path / "checkpoint-15").write_text("a file, not a checkpoint directory")
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-10"  # numeric, not lexicographic
    with pytest.raises(FileNotFoundError, match="trainer_state.json"):
        checkpoint_module.load_trainer_state(tmp_path / "checkpoint-10")


# ------------------------------------------------------------------------------------ distributed


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without torch.distributed")
def test_two_processes_equal_one_process_with_double_batch(tmp_path):
    """2 processes x 2 samples == 1 process x 4 samples, for 3 optimizer steps (method agdo).

    Each process normalises by the rows of the whole step (all-reduced) and scales by the process count
    that DDP's averaging divides out; randomness is keyed by dataset index, and accelerate's sharding
    gives process p the batches p, p+2, ... of the same permutation, i.e. exactly the 4 samples of the
    single process's batch. ``forward_batch_size`` = one process's rows, so the single process runs the
    same forward chunks. The attention order, though, comes from a no-grad forward over 2 vs 4 samples,
    whose float rounding may differ in the last bit, and the influence I is a loss weight: weights are
    compared with a tolerance far below one step's change (lr 1e-3).
    """
    common = ["method=agdo", "max_steps=3", "save_steps=2", "post_num=1", "learning_rate=1e-3",
              "forward_batch_size=8", "lr_scheduler_type=linear"]
    result = launch_two_processes("sft", tmp_path / "ddp", [*common, "per_device_train_batch_size=2"])
    if result.returncode != 0 and launch_unavailable(result):
        pytest.skip(f"could not start 2 gloo processes here:\n{result.stderr[-2000:]}")
    assert result.returncode == 0, result.stderr[-4000:]

    single = _train(tmp_path / "single", method="agdo", max_steps=3, save_steps=2, post_num=1,
                    forward_batch_size=8, lr_scheduler_type="linear", per_device_train_batch_size=4)
    ddp = load_file(tmp_path / "ddp" / "final" / "model.safetensors")
    reference = params(single)
    assert set(ddp) <= set(reference) and "model.embed_tokens.weight" in ddp
    initial = params(build_tiny_run()[0])
    for name, value in ddp.items():
        step = (reference[name] - initial[name]).abs().max()
        torch.testing.assert_close(value, reference[name], rtol=0, atol=1e-6, msg=lambda m: f"{name}: {m}")
        assert name.endswith("norm.weight") or step > 1e-4  # the tolerance is far below what training moved

    ddp_log, single_log = metrics(tmp_path / "ddp"), metrics(tmp_path / "single")
    assert [m["step"] for m in ddp_log] == [1, 2, 3]  # only the main process logs
    for a, b in zip(ddp_log, single_log, strict=True):
        assert a["rows"] == b["rows"] == 20 and a["supervised_tokens"] == b["supervised_tokens"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["lr"] == b["lr"]
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    assert (tmp_path / "ddp" / "checkpoint-2" / "random_states_1.pkl").is_file()  # both ranks saved RNG


# ------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(method="bogus"), "`method` must be one of"),
        (dict(method="blockwise"), "`block_size` is required"),
        (dict(method="blockwise", block_size=0), "`block_size` is required"),
        (dict(mask_ratio_min=0.0), "mask_ratio_min"),
        (dict(mask_ratio_min=0.6, mask_ratio_max=0.5), "mask_ratio_min"),
        (dict(mask_ratio_max=1.5), "mask_ratio_max"),
        (dict(per_device_train_batch_size=0), "per_device_train_batch_size"),
        (dict(gradient_accumulation_steps=0), "gradient_accumulation_steps"),
        (dict(forward_batch_size=0), "forward_batch_size"),
        (dict(step_size=0), "step_size"),
        (dict(save_steps=0), "save_steps"),
        (dict(logging_steps=0), "logging_steps"),
        (dict(random_masks_per_sample=0), "random_masks_per_sample"),
        (dict(max_steps_per_sample=0), "max_steps_per_sample"),
        (dict(order_rows_per_sample=0), "order_rows_per_sample"),
        (dict(order_rows_per_sample=4, max_steps_per_sample=2), "at most one"),
        (dict(num_train_epochs=0), "num_train_epochs"),
        (dict(warmup_steps=-1), "warmup_steps"),
        (dict(post_num=-1), "post_num"),
        (dict(gamma=-1.0), "allow_negative_gamma"),
        (dict(max_steps=0), "max_steps"),
        (dict(learning_rate=0.0), "learning_rate"),
        (dict(max_nonfinite_steps=-1), "max_nonfinite_steps"),
    ],
)
def test_sft_config_rejects(overrides, message):
    with pytest.raises(ValueError, match=message):
        SFTConfig(**overrides)


def test_sft_config_accepts_the_edges():
    SFTConfig(method="blockwise", block_size=1)
    SFTConfig(gamma=-1.0, allow_negative_gamma=True)
    SFTConfig(mask_ratio_min=1.0, mask_ratio_max=1.0)
    for method in SFT_METHODS:
        SFTConfig(method=method, block_size=4)


# ------------------------------------------------------------------------------------- reliability


def _poison(adapter):
    with torch.no_grad():
        adapter.model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")


def test_non_finite_loss_stops_the_run_naming_the_step_and_saves_nothing(tmp_path):
    reset_accelerate()
    adapter, dataset = build_tiny_run()
    _poison(adapter)
    with pytest.raises(FloatingPointError, match=r"step 1: non-finite loss .* nothing was saved"):
        train_sft(SFTConfig(output_dir=str(tmp_path), **{**BASE, "method": "random"}), adapter=adapter, dataset=dataset)
    assert not (tmp_path / "final").exists() and not list(tmp_path.glob("checkpoint-*"))


def test_skipped_non_finite_steps_are_counted_and_a_non_finite_model_is_never_saved(tmp_path):
    reset_accelerate()
    adapter, dataset = build_tiny_run()
    _poison(adapter)  # every step is non-finite: skipped twice, then the NaN weights refuse to be saved
    config = SFTConfig(output_dir=str(tmp_path), **{**BASE, "method": "random", "max_nonfinite_steps": 5})
    with pytest.raises(FloatingPointError, match="non-finite weights in .*up_proj.*the checkpoint was not saved"):
        train_sft(config, adapter=adapter, dataset=dataset)
    logged = metrics(tmp_path)
    assert [m["nonfinite_steps"] for m in logged] == [1, 2] and all(m["skipped_nonfinite"] for m in logged)
    assert not (tmp_path / "final").exists() and not list(tmp_path.glob("checkpoint-*"))


def test_empty_or_blank_train_file_is_an_error(tmp_path):
    adapter, _ = build_tiny_run()
    for text in ("", "\n  \n\n"):
        path = tmp_path / "train.jsonl"
        path.write_text(text)
        reset_accelerate()
        with pytest.raises(ValueError, match="train.jsonl"):
            train_sft(SFTConfig(output_dir=str(tmp_path / "run"), train_file=str(path), **BASE), adapter=adapter)
    reset_accelerate()
    with pytest.raises(ValueError, match="the training data is empty"):
        train_sft(SFTConfig(output_dir=str(tmp_path / "run"), **BASE), adapter=adapter,
                  dataset=type(build_tiny_run()[1])([]))


def test_a_step_that_supervises_nothing_is_an_error(tmp_path):
    reset_accelerate()
    adapter, dataset = build_tiny_run()
    pad = adapter.pad_token_id
    dataset.pairs = [(p, [pad] * len(r)) for p, r in dataset.pairs]  # every response is padding: post_num=0
    config = SFTConfig(output_dir=str(tmp_path), **{**BASE, "method": "left_to_right", "post_num": 0})
    with pytest.raises(ValueError, match="step 1: the batch produced no training row"):
        train_sft(config, adapter=adapter, dataset=dataset)
    reset_accelerate()
    config = SFTConfig(output_dir=str(tmp_path), **{**BASE, "method": "random", "post_num": 0})
    with pytest.raises(ValueError, match="step 1: the update supervises zero tokens"):
        train_sft(config, adapter=adapter, dataset=dataset)


def test_resume_warnings(tmp_path):
    with pytest.warns(UserWarning, match="no checkpoint in .* starting from scratch"):
        _train(tmp_path / "fresh", resume_from_checkpoint="latest")
    _train(tmp_path / "done", max_steps=2, save_steps=1)
    with pytest.warns(UserWarning, match="at step 2, not before the last step \\(2\\): nothing is left"):
        _train(tmp_path / "done", max_steps=2, resume_from_checkpoint="latest")
    with pytest.raises(FileNotFoundError, match="resume_from_checkpoint"):
        _train(tmp_path / "x", resume_from_checkpoint=str(tmp_path / "missing"))


def test_resume_past_the_end_of_the_data_warns_and_goes_on(tmp_path):
    _train(tmp_path, max_steps=4, save_steps=2)
    state_file = tmp_path / "checkpoint-2" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state_file.write_text(json.dumps({**state, "batches_done": 999}))  # e.g. a checkpoint of a larger data set
    with pytest.warns(UserWarning, match="resumed at batch 999 of epoch 0, past the end of the data"):
        _train(tmp_path, max_steps=4, resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert [m["step"] for m in metrics(tmp_path)] == [1, 2, 3, 4]

"""The training loop SFT and RL share: accelerate, optimizer, schedule, accumulation, checkpoints, logs.

A trainer (:class:`agdo.training.sft.SFTTrainer`, :class:`agdo.training.rl.RLTrainer`) says only how one
step turns its window of batches into masked rows and what the loss of a chunk of rows is; everything else
lives here, read top to bottom in :meth:`Trainer.train`:

    dataset → per-epoch permutation → batches (sharded over processes) → windows of ``batches_per_step``
    → ``trainer.step(window, epoch)`` → one or more :meth:`Trainer.optimizer_update` → log → checkpoint

:meth:`Trainer.optimizer_update` normalises every row's loss by the rows of the whole update — every chunk,
every micro-batch, every process — so gradient accumulation and N processes give exactly the gradient of
one big batch. A non-finite loss or gradient never reaches the weights: the update is dropped and the run
stops with an error naming the step (``max_nonfinite_steps`` lets a run skip a few); a non-finite model is
never saved. Randomness is keyed by ``(seed, epoch, dataset index)`` in the trainers, so a run gives the same
result whatever the number of processes, and a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import warnings
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

from ..config import save_config
from .checkpoint import latest_checkpoint, load_trainer_state, save_checkpoint
from .metrics import MetricsLogger


@dataclasses.dataclass
class TrainingArguments:
    """Fields every trainer has (names as in transformers/TRL)."""

    model_name_or_path: str = ""
    family: str = "auto"
    output_dir: str = "runs/train"
    # Trained stop tokens after the response (SPEC §4; paper App. C: 16 for math, 0 for code).
    post_num: int = 16
    per_device_train_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    # Masked rows per forward/backward: a memory knob, it never changes the gradient.
    forward_batch_size: int = 8
    learning_rate: float = 1e-6
    weight_decay: float = 0.0
    lr_scheduler_type: str = "constant"
    warmup_steps: int = 0
    num_train_epochs: int = 1
    max_steps: int = -1
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"
    seed: int = 42
    logging_steps: int = 1
    save_steps: int = 100
    resume_from_checkpoint: Optional[str] = None
    report_to: str = "jsonl"
    # Optimizer steps with a non-finite loss or gradient that may be skipped (counted in the logs) before
    # the run stops with an error; 0 = the first one stops it.
    max_nonfinite_steps: int = 0

    def __post_init__(self):
        at_least_one = ("per_device_train_batch_size", "gradient_accumulation_steps", "forward_batch_size",
                        "num_train_epochs", "logging_steps", "save_steps")
        for name in at_least_one:
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "post_num", "max_nonfinite_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"`{name}` must be >= 0, got {getattr(self, name)}")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(f"`max_steps` must be >= 1, or -1 for whole epochs; got {self.max_steps}")
        if not self.learning_rate > 0 or not math.isfinite(self.learning_rate):
            raise ValueError(f"`learning_rate` must be a positive number, got {self.learning_rate}")
        if self.max_grad_norm < 0:
            raise ValueError(f"`max_grad_norm` must be >= 0 (0 = no clipping), got {self.max_grad_norm}")


def chunks(rows: NamedTuple, size: int):
    """Consecutive slices of ``size`` rows of a NamedTuple of row-aligned tensors (None fields stay None)."""
    for start in range(0, rows[0].shape[0], size):
        yield type(rows)(*(None if t is None else t[start : start + size] for t in rows))


def select_rows(rows: NamedTuple, keep: torch.Tensor) -> NamedTuple:
    """The rows where ``keep`` (a row mask or index) holds, every field alike."""
    return type(rows)(*(None if t is None else t[keep] for t in rows))


def _windows(loader, size: int):
    """Consecutive groups of ``size`` batches: the batches of one step (the last may be short)."""
    window = []
    for batch in loader:
        window.append(batch)
        if len(window) == size:
            yield window
            window = []
    if window:
        yield window


@contextlib.contextmanager
def _accumulate_only(accelerator: Accelerator, model):
    """Backward of a chunk that is not the update's last: gradients only accumulate locally (no all-reduce,
    and under DeepSpeed no engine step), so chunking rows never changes what an optimizer step sees."""
    sync = accelerator.sync_gradients
    accelerator.gradient_state._set_sync_gradients(False)
    try:
        with accelerator.no_sync(model):
            yield
    finally:
        accelerator.gradient_state._set_sync_gradients(sync)


LossFunction = Callable[[torch.Tensor, NamedTuple], tuple[torch.Tensor, dict]]


class Trainer:
    """The shared loop. Subclasses set ``name``, ``batches_per_step``, ``per_device_batch_size`` and
    ``updates_per_step`` and implement :meth:`step` (and :meth:`collate`)."""

    name = "train"

    def __init__(self, config: TrainingArguments, adapter, dataset, *, accelerator: Optional[Accelerator] = None):
        # Gradient accumulation is done by optimizer_update (it normalises over the whole update), and the
        # schedule is stepped once per optimizer update — accelerate would step it once per process.
        # DDP must not broadcast buffers at every forward: processes run different numbers of forward chunks
        # (RL rows vary per process), and a collective per forward would then deadlock. Buffers here are
        # constants (RoPE frequencies) that every process computes identically.
        self.accelerator = accelerator or Accelerator(
            mixed_precision=config.mixed_precision, step_scheduler_with_optimizer=False,
            kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)])
        set_seed(config.seed)
        if len(dataset) == 0:
            raise ValueError("the training data is empty: nothing to train on")
        self.config, self.adapter, self.dataset = config, adapter, dataset
        self.output_dir = Path(config.output_dir)
        self.state = {"global_step": 0, "epoch": 0, "batches_done": 0, "updates": 0, "nonfinite_steps": 0}
        self.setup()  # before prepare: e.g. RL sizes its updates and copies the initial policy

        self.batches_per_epoch = math.ceil(len(dataset) / (self.per_device_batch_size * self.accelerator.num_processes))
        steps_per_epoch = math.ceil(self.batches_per_epoch / self.batches_per_step)
        self.total_steps = config.max_steps if config.max_steps > 0 else steps_per_epoch * config.num_train_epochs
        model = adapter.model
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
        scheduler = get_scheduler(config.lr_scheduler_type, optimizer, num_warmup_steps=config.warmup_steps,
                                  num_training_steps=self.total_steps * self.updates_per_step)
        if self.accelerator.state.deepspeed_plugin is not None:  # DeepSpeed needs it, and sees no DataLoader here
            self.accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = (
                config.per_device_train_batch_size or 1  # RL's null: all completions of a process in one update
            )
        self.model, self.optimizer, self.scheduler = self.accelerator.prepare(model, optimizer, scheduler)
        self._resume()

    # ------------------------------------------------------------------------------- what a trainer says

    batches_per_step = 1  # batches of the DataLoader per step (SFT: the accumulation window)
    updates_per_step = 1  # optimizer updates per step (RL: num_iterations x updates per rollout batch)
    rows_per_unit = 1  # consecutive rows one loss term reads together (coupled GRPO: 3)

    @property
    def per_device_batch_size(self) -> int:
        return self.config.per_device_train_batch_size

    def collate(self, items: list):
        return items

    def step(self, window: list, epoch: int) -> dict:
        """Train on one window of batches (calls :meth:`optimizer_update`); returns the step's metrics."""
        raise NotImplementedError

    def describe(self) -> str:
        return ""

    def progress(self, metrics: dict) -> dict:
        """What the progress bar shows after a step."""
        return {"loss": f"{metrics['loss']:.4f}"} if "loss" in metrics else {}

    def setup(self) -> None:
        """Called once the accelerator exists, before the optimizer, schedule and model are prepared."""

    # ------------------------------------------------------------------------------------- the loop

    def train(self) -> Path:
        config, accelerator, state = self.config, self.accelerator, self.state
        if accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            save_config(config, self.output_dir / "config.json")
        accelerator.print(f"{self.name}: {self.describe()}; {accelerator.num_processes} process(es), "
                          f"{self.total_steps} steps, {self.total_steps * self.updates_per_step} optimizer updates")
        logger = MetricsLogger(self.output_dir, enabled=accelerator.is_main_process, report_to=config.report_to,
                               resume_step=state["global_step"])
        progress = tqdm(total=self.total_steps, initial=state["global_step"],
                        disable=not accelerator.is_local_main_process, desc=self.name)
        while state["global_step"] < self.total_steps:
            epoch = state["epoch"]
            stepped = False
            for window in _windows(self._loader(epoch, state["batches_done"]), self.batches_per_step):
                stepped = True
                metrics = self.step(window, epoch)
                state["batches_done"] += len(window)
                state["global_step"] += 1
                progress.update(1)
                progress.set_postfix(self.progress(metrics), refresh=False)
                if state["global_step"] % config.logging_steps == 0:
                    logger.log(state["global_step"], {**metrics, "lr": self.scheduler.get_last_lr()[0],
                                                      "epoch": epoch})
                if state["global_step"] % config.save_steps == 0 or state["global_step"] == self.total_steps:
                    self._check_finite_weights("checkpoint")
                    save_checkpoint(accelerator, self.output_dir, state)
                if state["global_step"] >= self.total_steps:
                    break
            else:
                if not stepped and state["batches_done"] == 0:
                    raise RuntimeError(f"epoch {epoch} produced no batch: the data loader is empty")
                if not stepped and state["batches_done"] > self.batches_per_epoch:
                    warnings.warn(f"resumed at batch {state['batches_done']} of epoch {epoch}, past the end of the "
                                  f"data ({len(self.dataset)} samples): continuing with epoch {epoch + 1}")
                state["epoch"] += 1
                state["batches_done"] = 0
        progress.close()
        if state["updates"] == 0:
            raise RuntimeError(f"{self.name}: {self.total_steps} steps ran but no optimizer update did: nothing was "
                               f"trained (every step had no training signal)")
        self._save_final()
        logger.close()
        return self.output_dir

    def _loader(self, epoch: int, skip_batches: int):
        # A fixed permutation per epoch: the data position is just a batch count, and resumes exactly.
        permutation = torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(self.config.seed + epoch))
        loader = DataLoader(self.dataset, batch_size=self.per_device_batch_size, sampler=permutation.tolist(),
                            collate_fn=self.collate)
        return self.accelerator.skip_first_batches(self.accelerator.prepare_data_loader(loader), skip_batches)

    def _resume(self) -> None:
        config = self.config
        if config.resume_from_checkpoint == "latest":
            resume = latest_checkpoint(self.output_dir)
            if resume is None:
                warnings.warn(f"resume_from_checkpoint=latest: no checkpoint in {self.output_dir}; starting from "
                              f"scratch")
        else:
            resume = config.resume_from_checkpoint
        if not resume:
            return
        if not Path(resume).is_dir():
            raise FileNotFoundError(f"`resume_from_checkpoint`: {resume} is not a checkpoint directory")
        self.accelerator.load_state(str(resume))
        self.state.update(load_trainer_state(resume))
        if self.state["global_step"] >= self.total_steps:
            warnings.warn(f"the checkpoint {resume} is at step {self.state['global_step']}, not before the last step "
                          f"({self.total_steps}): nothing is left to train")
        self.accelerator.print(f"resumed from {resume} at step {self.state['global_step']}")

    # ----------------------------------------------------------------------------- one optimizer update

    def optimizer_update(self, rows: list, loss_fn: LossFunction) -> Optional[dict]:
        """Forward/backward over ``rows`` (this process's share) in chunks, then one optimizer step.

        ``loss_fn(logits, chunk) -> (loss_sum, stats)``: the SUM of the chunk's per-row losses, and counts
        to add up (0-dim tensors, so that nothing syncs with the host per chunk). Each row's loss is divided by the rows of the whole update over all processes. Returns
        ``{"loss" (per row), "rows", "grad_norm", **summed stats}``, or None when no process has a row (no
        update is made). Raises when the update would train on zero supervised tokens, or is non-finite
        more often than ``max_nonfinite_steps``.
        """
        accelerator = self.accelerator
        local = torch.tensor([sum(r[0].shape[0] for r in rows)], device=accelerator.device)
        total_rows = int(accelerator.reduce(local, reduction="sum").item())
        if total_rows == 0:
            return None
        scale = accelerator.num_processes  # DDP averages gradients over processes
        unit = self.rows_per_unit  # rows a loss needs together (coupled triples): chunks never split them
        size = max(unit, self.config.forward_batch_size // unit * unit)
        pieces = [piece for part in rows for piece in chunks(part, size)]
        self.model.train()
        # Sums stay on the device: one host sync for the whole update, not one per chunk.
        loss_sum = torch.zeros((), dtype=torch.float64, device=accelerator.device)
        stats = {}
        if not pieces:  # other processes have rows: this one must still join the gradient all-reduce, and
            self._idle_backward()  # report the same statistics (zeros) so the reductions below line up
            empty = rows[0]
            no_logits = torch.zeros(*empty[0].shape, self.adapter.vocab_size, device=accelerator.device)
            stats = {k: torch.as_tensor(v, dtype=torch.float64, device=accelerator.device)
                     for k, v in loss_fn(no_logits, empty)[1].items()}
        for i, piece in enumerate(pieces):
            with contextlib.nullcontext() if i == len(pieces) - 1 else _accumulate_only(accelerator, self.model):
                logits = self.adapter.forward(piece.input_ids, piece.attention_mask, model=self.model).logits
                piece_loss, piece_stats = loss_fn(logits, piece)
                accelerator.backward(piece_loss / total_rows * scale)
            loss_sum = loss_sum + piece_loss.detach().double()
            for k, v in piece_stats.items():
                stats[k] = stats.get(k, 0) + torch.as_tensor(v, dtype=torch.float64, device=accelerator.device)
        keys = sorted(stats)
        summed = accelerator.reduce(torch.stack([loss_sum, *(stats[k] for k in keys)]), reduction="sum").tolist()
        metrics = {"loss": summed[0] / total_rows, "rows": total_rows, **dict(zip(keys, summed[1:]))}
        if metrics.get("supervised_tokens", 1) == 0:
            raise ValueError(f"step {self.state['global_step'] + 1}: the update supervises zero tokens "
                             f"({total_rows} rows, none with a trained token): check post_num and the data")
        grad_norm = self._clip_gradients()
        if not (math.isfinite(metrics["loss"]) and (grad_norm is None or math.isfinite(grad_norm))):
            self.optimizer.zero_grad()
            self.state["nonfinite_steps"] += 1
            if self.state["nonfinite_steps"] > self.config.max_nonfinite_steps:
                raise FloatingPointError(
                    f"step {self.state['global_step'] + 1}: non-finite loss ({metrics['loss']}) or gradient norm "
                    f"({grad_norm}); the weights were not updated and nothing was saved. "
                    f"{self.state['nonfinite_steps']} non-finite update(s) so far, max_nonfinite_steps="
                    f"{self.config.max_nonfinite_steps}")
            return {**metrics, "nonfinite_steps": self.state["nonfinite_steps"], "skipped_nonfinite": 1}
        if grad_norm is not None:
            metrics["grad_norm"] = grad_norm
        self.optimizer.step()
        if not self.optimizer.step_was_skipped:
            self.scheduler.step()
        self.optimizer.zero_grad()
        self.state["updates"] += 1
        return metrics

    def _clip_gradients(self) -> Optional[float]:
        """Global gradient norm (after DDP's all-reduce, so every process sees the same), clipped when asked."""
        max_norm = self.config.max_grad_norm if self.config.max_grad_norm > 0 else float("inf")
        norm = self.accelerator.clip_grad_norm_(self.model.parameters(), max_norm)
        return None if norm is None else float(norm)  # DeepSpeed clips inside its step and may not report it

    def _idle_backward(self) -> None:
        """A zero-weighted forward/backward through the wrapped model, so DDP's all-reduce sees every process."""
        pad = torch.full((1, 1), self.adapter.pad_token_id, dtype=torch.long, device=self.accelerator.device)
        logits = self.adapter.forward(pad, model=self.model).logits
        self.accelerator.backward(logits.sum() * 0.0)

    # ------------------------------------------------------------------------------------------ saving

    def _check_finite_weights(self, what: str) -> None:
        bad = [name for name, p in self.accelerator.unwrap_model(self.model).named_parameters()
               if p.numel() and not bool(torch.isfinite(p).all())]
        if bad:
            raise FloatingPointError(f"step {self.state['global_step']}: non-finite weights in {bad[:5]}"
                                     f"{' ...' if len(bad) > 5 else ''}; the {what} was not saved")

    def _save_final(self) -> None:
        accelerator = self.accelerator
        accelerator.wait_for_everyone()
        self._check_finite_weights("final model")
        state_dict = accelerator.get_state_dict(self.model)  # every process: ZeRO-3 gathers the shards here
        if accelerator.is_main_process:
            final = self.output_dir / "final"
            accelerator.unwrap_model(self.model).save_pretrained(final, state_dict=state_dict)
            if self.adapter.tokenizer is not None:
                self.adapter.tokenizer.save_pretrained(final)
            (final / "trainer_state.json").write_text(json.dumps(self.state))
        accelerator.wait_for_everyone()

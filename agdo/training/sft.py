"""Supervised fine-tuning of a diffusion LM: AGDO-SFT (Alg. 2, Eq. 9) and the baselines, on accelerate.

Methods (``SFTConfig.method``):
- ``agdo``: attention-guided order from the current model (one no-grad forward per batch, last layer,
  through agdo_kernels), loss weights ``1 + gamma * I_k``.
- ``left_to_right`` / ``blockwise``: the same step loss along the position order / one block per step.
- ``random``: LLaDA's recipe, ``random_masks_per_sample`` independent masks per sample.

One optimizer step, top to bottom: batch → (agdo: adapter forward with capture → greedy order + I) →
masked rows → forward in chunks of ``forward_batch_size`` rows → weighted NLL → backward → clip → step.

Randomness (shuffling, orders, masks) is keyed by ``(seed, epoch, dataset index)``, so a run gives the
same result whatever the number of processes, and a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from pathlib import Path
from typing import Optional

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

from .. import orders
from ..config import save_config
from .checkpoint import latest_checkpoint, load_trainer_state, save_checkpoint
from .masking import MaskedRows, order_rows, random_rows, weighted_nll
from .metrics import MetricsLogger
from .sft_data import SFTDataset, collate_sft

SFT_METHODS = ("agdo", "left_to_right", "blockwise", "random")


@dataclasses.dataclass
class SFTConfig:
    model_name_or_path: str = ""
    family: str = "auto"
    train_file: str = ""
    output_dir: str = "runs/sft"
    method: str = "agdo"
    # AGDO: loss weight 1 + gamma * I (paper: gamma = 100), I normalised by `influence_norm` (SPEC §2).
    gamma: float = 100.0
    influence_norm: str = "mean"
    step_size: int = 1
    block_size: Optional[int] = None
    block_mode: str = "global"
    post_num: int = 16
    # Compute matching across methods: order steps per sample (uniform subset) vs random masks per sample.
    max_steps_per_sample: Optional[int] = None
    random_masks_per_sample: int = 35
    mask_ratio_min: float = 0.1
    mask_ratio_max: float = 0.9
    max_prompt_length: int = 512
    max_response_length: int = 1024
    per_device_train_batch_size: int = 1
    gradient_accumulation_steps: int = 1
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

    def __post_init__(self):
        if self.method not in SFT_METHODS:
            raise ValueError(f"`method` must be one of {list(SFT_METHODS)}, got {self.method!r}")
        if self.method == "blockwise" and not self.block_size:
            raise ValueError("`block_size` is required for method='blockwise'")
        if not 0 < self.mask_ratio_min <= self.mask_ratio_max <= 1:
            raise ValueError("need 0 < `mask_ratio_min` <= `mask_ratio_max` <= 1")
        for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "forward_batch_size", "step_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be >= 1, got {getattr(self, name)}")


def _sample_generator(seed: int, epoch: int, index: int, device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + epoch) * 1_000_003 + index)


def _batch_order(config: SFTConfig, adapter, batch: dict, trained):
    """``(steps, token_weights)`` of the whole batch for the order-based methods (weights None: all 1)."""
    input_ids, P = batch["input_ids"], batch["response_start"]
    if config.method == "agdo":
        order = orders.attention_order(
            adapter, input_ids, batch["attention_mask"], response_start=P, trained=trained,
            step_size=config.step_size, block_size=config.block_size, block_mode=config.block_mode,
            influence_norm=config.influence_norm,
        )
        return order.steps, 1 + config.gamma * order.influence[:, P:]
    if config.method == "left_to_right":
        return orders.left_to_right_order(trained, step_size=config.step_size, block_size=config.block_size), None
    return orders.blockwise_order(trained, block_size=config.block_size), None


def build_rows(config: SFTConfig, adapter, batch: dict, epoch: int) -> MaskedRows:
    """The masked rows of one batch; every sample's randomness comes from its own generator."""
    input_ids, attention_mask, P = batch["input_ids"], batch["attention_mask"], batch["response_start"]
    trained = orders.trained_positions(input_ids[:, P:], adapter.stop_token_ids, config.post_num)
    if config.method != "random":
        steps, token_weights = _batch_order(config, adapter, batch, trained)
    per_sample = []
    for b, index in enumerate(batch["index"].tolist()):
        gen = _sample_generator(config.seed, epoch, index, input_ids.device)
        one = slice(b, b + 1)
        if config.method == "random":
            rows = random_rows(input_ids[one], attention_mask[one], response_start=P, trained=trained[one],
                               mask_token_id=adapter.mask_token_id, masks_per_sample=config.random_masks_per_sample,
                               generator=gen)
        else:
            rows = order_rows(input_ids[one], attention_mask[one], response_start=P, steps=steps[one],
                              mask_token_id=adapter.mask_token_id,
                              token_weights=None if token_weights is None else token_weights[one],
                              max_steps_per_sample=config.max_steps_per_sample,
                              mask_ratio=(config.mask_ratio_min, config.mask_ratio_max), generator=gen)
        per_sample.append(rows._replace(sample_index=rows.sample_index + b))
    return MaskedRows(*(torch.cat(parts) for parts in zip(*per_sample)))


def _chunks(rows: MaskedRows, size: int):
    for start in range(0, rows.input_ids.shape[0], size):
        yield MaskedRows(*(t[start : start + size] for t in rows))


@contextlib.contextmanager
def _accumulate_only(accelerator: Accelerator, model):
    """Backward of a chunk that is not the step's last: gradients only accumulate locally (no all-reduce,
    and under DeepSpeed no engine step), so chunking rows never changes what an optimizer step sees."""
    sync = accelerator.sync_gradients
    accelerator.gradient_state._set_sync_gradients(False)
    try:
        with accelerator.no_sync(model):
            yield
    finally:
        accelerator.gradient_state._set_sync_gradients(sync)


def sft_step(config: SFTConfig, accelerator: Accelerator, adapter, model, batches: list, epoch: int) -> dict:
    """Forward + backward of one optimizer step over its micro-batches; the caller steps the optimizer.

    The loss is the mean over every row of the step — all micro-batches, all processes — so gradient
    accumulation and N processes give exactly the gradient of one large batch.
    """
    model.eval()  # the order comes from the deterministic model (no dropout)
    rows = [build_rows(config, adapter, batch, epoch) for batch in batches]
    model.train()
    local = torch.tensor([sum(r.input_ids.shape[0] for r in rows)], device=accelerator.device)
    total_rows = int(accelerator.reduce(local, reduction="sum").item())
    scale = accelerator.num_processes  # DDP averages gradients over processes
    chunks = [chunk for micro in rows for chunk in _chunks(micro, config.forward_batch_size)]
    loss_sum = 0.0
    for i, chunk in enumerate(chunks):
        last = i == len(chunks) - 1
        with contextlib.nullcontext() if last else _accumulate_only(accelerator, model):
            logits = adapter.forward(chunk.input_ids, chunk.attention_mask, model=model).logits
            loss = weighted_nll(logits, chunk.targets, chunk.weights, num_rows=total_rows) * scale
            accelerator.backward(loss)
        loss_sum += loss.item() / scale
    # Every process holds its share of the step's loss: log the whole (sum over processes).
    supervised = float(sum(int((r.weights > 0).sum()) for r in rows))
    local = torch.tensor([loss_sum, supervised], dtype=torch.float64, device=accelerator.device)
    loss_total, tokens = accelerator.reduce(local, reduction="sum").tolist()
    return {"loss": loss_total, "rows": total_rows, "supervised_tokens": int(tokens)}


def _windows(loader, size: int):
    """Consecutive groups of ``size`` batches: the micro-batches of one optimizer step (the last may be short)."""
    window = []
    for batch in loader:
        window.append(batch)
        if len(window) == size:
            yield window
            window = []
    if window:
        yield window


def train_sft(config: SFTConfig, *, adapter=None, dataset=None) -> Path:
    """Run SFT; returns the output directory (``final/`` holds the trained model)."""
    from ..models import load_adapter  # the training layer's only entry into the model adapters

    # Gradient accumulation is done here (sft_step normalises over the whole window), and the schedule is
    # stepped once per optimizer step — accelerate would step it once per process.
    accelerator = Accelerator(mixed_precision=config.mixed_precision, step_scheduler_with_optimizer=False)
    set_seed(config.seed)
    output_dir = Path(config.output_dir)
    if adapter is None:
        adapter = load_adapter(config.model_name_or_path, family=config.family)
    if dataset is None:
        dataset = SFTDataset.from_jsonl(config.train_file, adapter.tokenizer, config.max_prompt_length,
                                        config.max_response_length)
    model = adapter.model
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    effective_batch = config.per_device_train_batch_size * config.gradient_accumulation_steps * accelerator.num_processes
    batches_per_epoch = math.ceil(len(dataset) / (config.per_device_train_batch_size * accelerator.num_processes))
    steps_per_epoch = math.ceil(batches_per_epoch / config.gradient_accumulation_steps)
    total_steps = config.max_steps if config.max_steps > 0 else steps_per_epoch * config.num_train_epochs
    scheduler = get_scheduler(config.lr_scheduler_type, optimizer, num_warmup_steps=config.warmup_steps,
                              num_training_steps=total_steps)
    if accelerator.state.deepspeed_plugin is not None:  # DeepSpeed needs it, and sees no DataLoader here
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = (
            config.per_device_train_batch_size
        )
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    state = {"global_step": 0, "epoch": 0, "batches_done": 0}
    resume = latest_checkpoint(output_dir) if config.resume_from_checkpoint == "latest" else config.resume_from_checkpoint
    if resume:
        accelerator.load_state(str(resume))
        state = load_trainer_state(resume)
        accelerator.print(f"resumed from {resume} at step {state['global_step']}")
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, output_dir / "config.json")
    accelerator.print(
        f"sft: method={config.method} gamma={config.gamma} influence_norm={config.influence_norm} "
        f"step_size={config.step_size} block_size={config.block_size} post_num={config.post_num}; "
        f"{accelerator.num_processes} process(es) x {config.per_device_train_batch_size} samples x "
        f"{config.gradient_accumulation_steps} accumulation = {effective_batch} samples per step, {total_steps} steps"
    )
    logger = MetricsLogger(output_dir, enabled=accelerator.is_main_process, report_to=config.report_to)
    collate = lambda items: collate_sft(items, pad_token_id=adapter.pad_token_id, post_num=config.post_num)  # noqa: E731

    progress = tqdm(total=total_steps, initial=state["global_step"], disable=not accelerator.is_local_main_process,
                    desc=f"sft[{config.method}]")
    while state["global_step"] < total_steps:
        epoch = state["epoch"]
        # A fixed permutation per epoch: the data position is just a batch count, and resumes exactly.
        permutation = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(config.seed + epoch))
        loader = DataLoader(dataset, batch_size=config.per_device_train_batch_size, sampler=permutation.tolist(),
                            collate_fn=collate)
        loader = accelerator.skip_first_batches(accelerator.prepare_data_loader(loader), state["batches_done"])
        for window in _windows(loader, config.gradient_accumulation_steps):
            metrics = sft_step(config, accelerator, adapter, model, window, epoch)
            if config.max_grad_norm > 0:
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                if grad_norm is not None:  # DeepSpeed clips inside its step and may not report a norm
                    metrics["grad_norm"] = float(grad_norm)
            optimizer.step()
            if not optimizer.step_was_skipped:
                scheduler.step()
            optimizer.zero_grad()
            state["batches_done"] += len(window)
            state["global_step"] += 1
            progress.update(1)
            if state["global_step"] % config.logging_steps == 0:
                logger.log(state["global_step"], {**metrics, "lr": scheduler.get_last_lr()[0], "epoch": epoch})
            if state["global_step"] % config.save_steps == 0 or state["global_step"] == total_steps:
                save_checkpoint(accelerator, output_dir, state)
            if state["global_step"] >= total_steps:
                break
        else:
            state["epoch"] += 1
            state["batches_done"] = 0
    progress.close()
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(model)  # every process: ZeRO-3 gathers the shards here
    if accelerator.is_main_process:
        final = output_dir / "final"
        accelerator.unwrap_model(model).save_pretrained(final, state_dict=state_dict)
        if adapter.tokenizer is not None:
            adapter.tokenizer.save_pretrained(final)
        (final / "trainer_state.json").write_text(json.dumps(state))
    accelerator.wait_for_everyone()
    logger.close()
    return output_dir

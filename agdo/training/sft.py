"""Supervised fine-tuning of a diffusion LM: AGDO-SFT (Alg. 2, Eq. 9) and the baselines, on accelerate.

Methods (``SFTConfig.method``):
- ``agdo``: attention-guided order from the current model (one no-grad forward per batch, the chosen layer,
  through agdo_kernels), loss weights ``1 + gamma * I_k``.
- ``left_to_right`` / ``blockwise``: the same step loss along the position order / one block per step.
- ``random``: LLaDA's recipe, ``random_masks_per_sample`` independent masks per sample.

Ablations of AGDO-SFT (arXiv paper Tables 5-7; SPEC §4), all configuration of ``method: agdo``:

- which attention: ``attention_layer`` (``"last"`` default, ``"first"``, ``"middle"`` = ``num_layers // 2``,
  or an int index, negative from the end) and ``attention_heads`` (``"all"`` default, a list of query-head
  indices, or ``"local"`` / ``"global"``: per sequence the ``H // 2`` heads with the smallest mean attention
  distance / the others, see :mod:`agdo.models`); both the order and ``I`` come from that choice;
- order only: ``gamma: 0`` (weights exactly 1; the attention order is unchanged);
- ``ablation: weight_only``: a random order (:func:`agdo.orders.random_order`, same ``step_size`` /
  ``block_size``, per-sample stream ``(seed, epoch, index, 1)``) with the weights ``1 + gamma * I``;
- ``ablation: random_weights``: the same random order, and weights ``1 + w`` with ``w`` drawn i.i.d. per
  trained token from a log-normal whose mean and standard deviation are those of ``gamma * I`` over the
  trained tokens of the batch (population std); per-sample stream ``(seed, epoch, index, 2)``. Log-normal,
  not Gaussian, so that ``w`` keeps the sign of ``gamma * I`` (a Gaussian with std ≫ mean, as for hub-heavy
  ``I``, would give negative loss weights) and its heavy right tail. A batch whose ``gamma * I`` has mean 0
  gets ``w = 0``; std 0 gives ``w`` = the mean. Exactly:
  ``sigma^2 = log(1 + std^2 / mean^2)``, ``mu = log|mean| - sigma^2 / 2``,
  ``w = sign(mean) * exp(mu + sigma * z)``, ``z ~ N(0, 1)`` (``torch.randn`` on the stream, shape ``(1, R)``).

One optimizer step, top to bottom: batch → (agdo: adapter forward with capture → greedy order + I) →
masked rows → forward in chunks of ``forward_batch_size`` rows → weighted NLL → backward → clip → step.
The loop (accumulation, checkpoints, resume, logs) is :mod:`agdo.training.loop`, shared with RL.

Randomness (shuffling, orders, masks) is keyed by ``(seed, epoch, dataset index)``, so a run gives the
same result whatever the number of processes, and a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Optional

import torch

from .. import orders
from ..orders import check_attention_heads, check_attention_layer
from .loop import Trainer, TrainingArguments
from .masking import MaskedRows, concat_rows, order_rows, random_rows, sample_generator, weighted_nll

SFT_METHODS = ("agdo", "left_to_right", "blockwise", "random")
SFT_ABLATIONS = ("none", "weight_only", "random_weights")
# Extra keys of the per-sample random streams (sample_generator(seed, epoch, index, key)); the masks use none.
ORDER_STREAM, WEIGHT_STREAM = 1, 2


@dataclasses.dataclass
class SFTConfig(TrainingArguments):
    output_dir: str = "runs/sft"
    train_file: str = ""
    method: str = "agdo"
    # AGDO: loss weight 1 + gamma * I (paper: gamma = 100), I normalised by `influence_norm` (SPEC §2).
    gamma: float = 100.0
    allow_negative_gamma: bool = False
    influence_norm: str = "sum"
    # Which attention gives the order and I (paper Tables 5-6): "last" | "first" | "middle" | int index;
    # "all" | [query-head indices] | "local" | "global" (module docstring).
    attention_layer: str | int = "last"
    attention_heads: str | list[int] = "all"
    # Order-vs-weight ablations (paper Table 7): "none" | "weight_only" | "random_weights"; order only = gamma 0.
    ablation: str = "none"
    step_size: int = 1
    block_size: Optional[int] = None
    block_mode: str = "global"
    # Compute matching across methods: order steps per sample (uniform subset) vs random masks per sample.
    max_steps_per_sample: Optional[int] = None
    # Order-based methods: exactly this many rows per sample, the steps cycled (e.g. blockwise with fewer
    # blocks than another method's rows); excludes `max_steps_per_sample`.
    order_rows_per_sample: Optional[int] = None
    random_masks_per_sample: int = 35
    mask_ratio_min: float = 0.1
    mask_ratio_max: float = 0.9
    max_prompt_length: int = 512
    max_response_length: int = 1024

    def __post_init__(self):
        super().__post_init__()
        if self.method not in SFT_METHODS:
            raise ValueError(f"`method` must be one of {list(SFT_METHODS)}, got {self.method!r}")
        if self.method == "blockwise" and not self.block_size:
            raise ValueError("`block_size` is required for method='blockwise'")
        if not 0 < self.mask_ratio_min <= self.mask_ratio_max <= 1:
            raise ValueError("need 0 < `mask_ratio_min` <= `mask_ratio_max` <= 1")
        for name in ("step_size", "random_masks_per_sample"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be >= 1, got {getattr(self, name)}")
        if self.max_steps_per_sample is not None and self.max_steps_per_sample < 1:
            raise ValueError(f"`max_steps_per_sample` must be >= 1 or null, got {self.max_steps_per_sample}")
        if self.order_rows_per_sample is not None:
            if self.order_rows_per_sample < 1:
                raise ValueError(f"`order_rows_per_sample` must be >= 1 or null, got {self.order_rows_per_sample}")
            if self.max_steps_per_sample is not None:
                raise ValueError("give at most one of `max_steps_per_sample` and `order_rows_per_sample`")
        check_attention_layer(self.attention_layer)
        check_attention_heads(self.attention_heads)
        if self.ablation not in SFT_ABLATIONS:
            raise ValueError(f"`ablation` must be one of {list(SFT_ABLATIONS)}, got {self.ablation!r}")
        if self.ablation != "none" and self.method != "agdo":
            raise ValueError(f"`ablation` = {self.ablation!r} is an ablation of method 'agdo', not {self.method!r}")
        if self.gamma < 0 and not self.allow_negative_gamma:
            raise ValueError(f"`gamma` = {self.gamma} < 0 would down-weight the attention hubs; set "
                             f"allow_negative_gamma=true if that is what you want")


def lognormal_like(mean: float, std: float, z: torch.Tensor) -> torch.Tensor:
    """``sign(mean) * exp(mu + sigma * z)``: for ``z ~ N(0, 1)`` a log-normal with this mean and std (0 when
    ``mean`` is 0)."""
    if mean == 0:
        return torch.zeros_like(z, dtype=torch.float32)
    sigma2 = math.log1p((std / abs(mean)) ** 2)
    mu = math.log(abs(mean)) - sigma2 / 2
    return (math.copysign(1.0, mean) * torch.exp(mu + math.sqrt(sigma2) * z.double())).float()


def _batch_order(config: SFTConfig, adapter, batch: dict, trained, epoch: int):
    """``(steps, token_weights)`` of the whole batch for the order-based methods (weights None: all 1)."""
    input_ids, P = batch["input_ids"], batch["response_start"]
    attention = dict(attention_layer=config.attention_layer, attention_heads=config.attention_heads,
                     influence_norm=config.influence_norm)
    if config.method == "agdo" and config.ablation == "none":
        order = orders.attention_order(
            adapter, input_ids, batch["attention_mask"], response_start=P, trained=trained,
            step_size=config.step_size, block_size=config.block_size, block_mode=config.block_mode, **attention,
        )
        return order.steps, 1 + config.gamma * order.influence[:, P:]
    if config.method == "agdo":  # weight_only / random_weights: a random order, weights from I
        device = input_ids.device
        indices = batch["index"].tolist()
        steps = torch.cat([
            orders.random_order(trained[b : b + 1], step_size=config.step_size, block_size=config.block_size,
                                generator=sample_generator(config.seed, epoch, index, ORDER_STREAM, device=device))
            for b, index in enumerate(indices)])
        weighted = config.gamma * orders.attention_influence(adapter, input_ids, batch["attention_mask"],
                                                             **attention)[:, P:]
        if config.ablation == "weight_only":
            return steps, 1 + weighted
        values = weighted[trained].double()
        mean = float(values.mean()) if values.numel() else 0.0
        std = float(values.std(unbiased=False)) if values.numel() else 0.0
        z = torch.cat([torch.randn(1, trained.shape[1], dtype=torch.float32, device=device,
                                   generator=sample_generator(config.seed, epoch, index, WEIGHT_STREAM, device=device))
                       for index in indices])
        return steps, 1 + lognormal_like(mean, std, z)
    if config.method == "left_to_right":
        return orders.left_to_right_order(trained, step_size=config.step_size, block_size=config.block_size), None
    return orders.blockwise_order(trained, block_size=config.block_size), None


def build_rows(config: SFTConfig, adapter, batch: dict, epoch: int) -> MaskedRows:
    """The masked rows of one batch; every sample's randomness comes from its own generator."""
    input_ids, attention_mask, P = batch["input_ids"], batch["attention_mask"], batch["response_start"]
    trained = orders.trained_positions(input_ids[:, P:], adapter.stop_token_ids, config.post_num,
                                       pad_token_id=adapter.pad_token_id)
    if config.method != "random":
        steps, token_weights = _batch_order(config, adapter, batch, trained, epoch)
    per_sample = []
    for b, index in enumerate(batch["index"].tolist()):
        gen = sample_generator(config.seed, epoch, index, device=input_ids.device)
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
                              rows_per_sample=config.order_rows_per_sample,
                              mask_ratio=(config.mask_ratio_min, config.mask_ratio_max), generator=gen)
        per_sample.append(rows)
    return concat_rows(per_sample)


def sft_loss(logits: torch.Tensor, rows: MaskedRows) -> tuple[torch.Tensor, dict]:
    """Sum over the rows of Eq. 9 (weights ``(1 + gamma * I_k) / |M_sub|``, or LLaDA's ``1 / (t n)``)."""
    return weighted_nll(logits, rows.targets, rows.weights), {"supervised_tokens": (rows.weights > 0).sum()}


class SFTTrainer(Trainer):
    """One step = ``gradient_accumulation_steps`` micro-batches of ``per_device_train_batch_size`` samples,
    one optimizer update over all their rows."""

    name = "sft"

    def __init__(self, config: SFTConfig, adapter, dataset, **kwargs):
        self.batches_per_step = config.gradient_accumulation_steps
        super().__init__(config, adapter, dataset, **kwargs)

    def collate(self, items):
        from .sft_data import collate_sft

        return collate_sft(items, pad_token_id=self.adapter.pad_token_id, post_num=self.config.post_num)

    def describe(self) -> str:
        c = self.config
        return (f"method={c.method} gamma={c.gamma} influence_norm={c.influence_norm} ablation={c.ablation} "
                f"attention_layer={c.attention_layer} attention_heads={c.attention_heads} step_size={c.step_size} "
                f"block_size={c.block_size} post_num={c.post_num}; {c.per_device_train_batch_size} samples x "
                f"{c.gradient_accumulation_steps} accumulation per process")

    def step(self, window: list, epoch: int) -> dict:
        self.model.eval()  # the order comes from the deterministic model (no dropout)
        rows = [build_rows(self.config, self.adapter, batch, epoch) for batch in window]
        metrics = self.optimizer_update(rows, sft_loss)
        if metrics is None:
            raise ValueError(f"step {self.state['global_step'] + 1}: the batch produced no training row")
        return metrics


def train_sft(config: SFTConfig, *, adapter=None, dataset=None) -> Path:
    """Run SFT; returns the output directory (``final/`` holds the trained model)."""
    from ..models import load_adapter  # the training layer's only entry into the model adapters
    from .sft_data import SFTDataset

    if adapter is None:
        adapter = load_adapter(config.model_name_or_path, family=config.family)
    if dataset is None:
        dataset = SFTDataset.from_jsonl(config.train_file, adapter.tokenizer, config.max_prompt_length,
                                        config.max_response_length)
    return SFTTrainer(config, adapter, dataset).train()

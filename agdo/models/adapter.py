"""``DiffusionLMAdapter``: one forward → token-aligned logits and, on request, AGDO statistics of one layer."""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from typing import NamedTuple, Optional

import torch
from torch import nn

from . import _compat, _families
from ._capture import ForwardStopped, LayerCapture, StatisticsRequest, resolve_heads, resolve_layer
from ._padded_attention import check_padded_attention, padded_attention_route

INFLUENCE_NORMS = ("sum", "mean", "max")


class AdapterOutput(NamedTuple):
    """Per-TOKEN outputs; ``None`` for what was not asked.

    logits ``(B, N, V)``: ``logits[:, i]`` predicts token ``i`` (``None`` from a ``return_logits=False``
    forward; ``(B, end - first, V)`` for tokens ``first..end-1`` from a ``logits_span`` forward).
    s ``(B, N)``: valid attention of each token's predictor row. s0 ``(B, R)``, abar_rr
    ``(B, R, R)``: response block. influence ``(B, N)``: per key.
    """

    logits: Optional[torch.Tensor]
    s: Optional[torch.Tensor] = None
    s0: Optional[torch.Tensor] = None
    abar_rr: Optional[torch.Tensor] = None
    influence: Optional[torch.Tensor] = None


class DiffusionLMAdapter:
    """A masked diffusion LM with its ids, its shift, and a forward that can capture one layer's statistics.

    Attributes: ``model``, ``tokenizer`` (or None), ``family``, ``mask_token_id``, ``pad_token_id``,
    ``eos_token_ids`` (tuple), ``shift`` (True: position ``i-1`` predicts token ``i``), ``num_heads``,
    ``num_kv_heads``, ``head_dim`` (every layer), ``num_layers``, ``device``, ``vocab_size``,
    ``stop_token_ids`` (EOS + pad),
    ``kernel_backend`` (the ``agdo_kernels`` backend for the statistics, default ``"auto"``) and
    ``padded_attention`` (how every layer attends in a padded batch, default ``"mask"``; see
    ``agdo.models._padded_attention``).
    ``token_logits(raw)`` aligns the logits of a direct ``model(...)`` call; prefer ``forward``, which also
    builds the bidirectional padding mask and the position ids.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        family: str,
        mask_token_id: int,
        pad_token_id: int,
        eos_token_ids: tuple,
        shift: bool,
        tokenizer=None,
        kernel_backend: str = "auto",
        padded_attention: str = "mask",
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.family = family
        self._family = _families.FAMILIES[family]
        self.mask_token_id = int(mask_token_id)
        self.pad_token_id = int(pad_token_id)
        self.eos_token_ids = tuple(int(i) for i in eos_token_ids)
        self.shift = bool(shift)
        self.kernel_backend = kernel_backend
        self.padded_attention = check_padded_attention(padded_attention)
        self._target = self._family.last_attention(model)  # fails early, with the reason, if not hookable
        self._targets = {}  # resolved layer index -> hooked module (the last one checked above)
        self.num_layers = int(self._family.num_layers(model))
        self.num_heads, self.num_kv_heads, self.head_dim = self._family.attention_shape(model.config)
        self.vocab_size = int(model.config.vocab_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def __call__(self, *args, **kwargs) -> AdapterOutput:
        return self.forward(*args, **kwargs)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        *,
        unmasked: Optional[torch.Tensor] = None,
        response_start: Optional[int] = None,
        influence_query_mask: Optional[torch.Tensor] = None,
        influence_norm: str = "sum",
        attention_layer="last",
        attention_heads="all",
        model: Optional[nn.Module] = None,
        return_logits: bool = True,
        logits_span: Optional[tuple[int, int]] = None,
    ) -> AdapterOutput:
        """One model forward over ``input_ids (B, N)``; statistics of one layer for what is asked.

        Args:
            attention_mask: ``(B, N)`` bool/0-1, False at padding.
            unmasked: ``(B, N)`` bool key set ``U`` → ``s``, the valid attention of each token's predictor row.
            response_start: ``P`` → ``s0, abar_rr`` (``agdo_kernels.response_attention`` with this model's shift).
            influence_query_mask: ``(B, N)`` bool, the tokens whose predictor rows are the valid query rows of
                the influence ``I`` (per key); ``influence_norm`` in ``("sum", "mean", "max")``.
            attention_layer: the layer whose attention gives the statistics: ``"last"`` (default, the paper),
                ``"first"``, ``"middle"`` (``num_layers // 2``) or an int index (negative counts from the end).
            attention_heads: the query heads averaged into ``Abar``: ``"all"`` (default), a list of indices, or
                ``"local"`` / ``"global"`` (the ``H // 2`` heads with the smallest mean attention distance per
                sequence / the others; see ``agdo.models._capture``).

            model: the module to run, default ``self.model``; pass the wrapper that accelerate prepared
                (DDP/FSDP) so its gradient hooks run. It must wrap ``self.model``, whose layers are hooked.
            return_logits: False for the statistics alone (``logits`` is None): the forward stops once the chosen
                layer's statistics are computed, so that layer's own attention, the layers after it, the final
                norm and the LM head (``N x vocab`` logits) never run. Statistics are the same values either
                way. A whole forward still runs (and its logits are dropped) when ``model`` is given or the
                model is sharded by FSDP or DeepSpeed ZeRO-3 or dispatched by accelerate's device map, whose
                hooks must see every forward to its end.
            logits_span: ``(first, end)``: the logits of tokens ``first <= i < end`` only, ``(B, end - first, V)``
                (a decoding step reads one block, not ``N x vocab`` logits). The LM head then runs on those
                tokens' predictor rows alone — equal to the slice of the full logits up to the rounding of the
                head's matmul over fewer rows (which can differ in the last bits, on CPU too). A model whose
                output head is its input embedding (LLaDA with ``weight_tying``) computes every row and is sliced.

        Under grad the logits carry gradient as usual; statistics never do. The logits are bitwise the same
        whatever statistics are asked (the model's own attention always produces every layer's output).
        """
        input_ids = _check_ids(input_ids)
        B, N = input_ids.shape
        device = input_ids.device
        attention_mask = _check_mask(attention_mask, "attention_mask", B, N, device)
        unmasked = _check_mask(unmasked, "unmasked", B, N, device)
        influence_query_mask = _check_mask(influence_query_mask, "influence_query_mask", B, N, device)
        if influence_norm not in INFLUENCE_NORMS:
            raise ValueError(f"`influence_norm` must be one of {INFLUENCE_NORMS}, got {influence_norm!r}")
        if response_start is not None and not isinstance(response_start, int):
            raise TypeError(f"`response_start` must be an int, got {type(response_start).__name__}")
        layer = resolve_layer(attention_layer, self.num_layers)
        heads = resolve_heads(attention_heads, self.num_heads)
        if logits_span is not None:
            _check_span(logits_span, N)
            if not return_logits:
                raise ValueError("`logits_span` asks for logits: it cannot go with return_logits=False")
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None  # no padding: let the model take its fastest path

        runner = self.model if model is None else model
        inputs = self._family.model_inputs(self.model, input_ids, attention_mask)
        # Entered before the statistics hook, so that the hooked layer's own output is padding-free too.
        padded_route = padded_attention_route(self.family, self.model, attention_mask, self.padded_attention)
        if unmasked is None and response_start is None and influence_query_mask is None:
            if not return_logits:
                raise ValueError("return_logits=False needs a statistic: pass `unmasked`, `response_start` or "
                                 "`influence_query_mask`")
            with padded_route, self._logits_of(logits_span, N, model=runner) as token_logits:
                return AdapterOutput(token_logits(runner(**inputs).logits))

        request = StatisticsRequest(
            attention_mask=attention_mask,
            unmasked=unmasked,
            response_start=response_start,
            influence_rows=None if influence_query_mask is None else self._predictor_rows(influence_query_mask),
            influence_norm=influence_norm,
            shift=self.shift,
            num_heads=self.num_heads,
            backend=self.kernel_backend,
            heads=heads,
            layer=layer,
            stop_forward=not return_logits and model is None and not _forward_must_finish(self.model),
        )
        capture = LayerCapture(request, where=f"{type(self.model).__name__} ({self.family} adapter, layer {layer})")
        logits = None
        try:
            with padded_route, self._family.hook(self._layer_target(layer), capture), \
                    self._logits_of(logits_span, N, model=runner) as token_logits:  # fmt: skip
                logits = token_logits(runner(**inputs).logits)
        except ForwardStopped:  # raised only when stop_forward: the statistics are in, the rest was not needed
            pass
        statistics = capture.result()
        s = None
        if statistics.s_rows is not None:
            s = self._row_to_token(statistics.s_rows)
            if attention_mask is not None:
                s = s * attention_mask
        return AdapterOutput(
            logits=logits if return_logits else None,  # a forward that had to run whole computed them anyway
            s=s,
            s0=statistics.s0,
            abar_rr=statistics.abar_rr,
            influence=statistics.influence,
        )

    def block_cache(self, mode: str, attention_mask: Optional[torch.Tensor] = None, lookahead: Optional[int] = None):
        """A semi-AR block KV cache (``mode`` ``"prefix"`` / ``"dual"``; ``prefix`` with a ``lookahead`` window)
        over this model for one batch padded as ``attention_mask (B, N)``: its ``forward(input_ids, fresh,
        unmasked=None)`` stands in for :meth:`forward` in a sampler (``agdo.models._block_cache``)."""
        from ._block_cache import BlockCache  # that module builds on this one

        return BlockCache(self, mode, attention_mask, lookahead)

    def _layer_target(self, layer: int) -> nn.Module:
        """The hooked module of layer ``0 <= layer < num_layers`` (the last one is ``self._target``)."""
        if layer == self.num_layers - 1:
            return self._target
        if layer not in self._targets:
            self._targets[layer] = self._family.layer_attention(self.model, layer)
        return self._targets[layer]

    @property
    def stop_token_ids(self) -> tuple:
        """EOS ids and the pad id: the tokens that end a response (SPEC §4 ``post_num``)."""
        return tuple(dict.fromkeys(self.eos_token_ids + (self.pad_token_id,)))

    def token_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Raw ``model(...).logits`` → token-aligned: for shifted models token ``i`` takes row ``i-1``; token 0
        has no predictor row and keeps row 0 (as Dream's own ``generate`` does)."""
        if not self.shift:
            return logits
        return torch.cat([logits[:, :1], logits[:, :-1]], dim=1)

    def _row_to_token(self, per_row: torch.Tensor) -> torch.Tensor:
        """Row statistic → token statistic; tokens without a predictor row (token 0 when shifted) get 0."""
        if not self.shift:
            return per_row
        return torch.cat([torch.zeros_like(per_row[:, :1]), per_row[:, :-1]], dim=1)

    @contextmanager
    def _logits_of(self, logits_span: Optional[tuple[int, int]], rows_in: int, first_row: int = 0,
                   model: Optional[nn.Module] = None):
        """Within it, the LM head of ``model`` (default ``self.model``; a DDP/FSDP/DeepSpeed wrapper is looked
        through) runs on the predictor rows of the tokens in ``logits_span`` only (all rows when None); yields
        the function that turns the model's raw logits into token-aligned ones. The head gets ``rows_in`` rows,
        those of positions ``first_row..`` (a cached step feeds a window)."""
        if logits_span is None:
            yield self.token_logits
            return
        first, end = logits_span
        if self.shift and first == 0:  # token 0 has no predictor row and takes row 0 (token_logits)
            rows = torch.cat([torch.zeros(1, dtype=torch.long), torch.arange(end - 1)]).to(self.device)
        else:
            rows = slice(first - self.shift - first_row, end - self.shift - first_row)
        head = _output_head(_unwrapped(self.model if model is None else model))
        narrowed = []

        def narrow(module, args):
            hidden = args[0]
            if not isinstance(hidden, torch.Tensor) or hidden.ndim != 3 or hidden.shape[1] != rows_in:
                return None  # not the (B, rows, hidden) layout this expects: left whole, sliced below
            narrowed.append(True)
            return (hidden[:, rows], *args[1:])

        # A model without a head module of its own (or one that calls it otherwise) computes every row: sliced.
        handle = None if head is None else head.register_forward_pre_hook(narrow)
        try:
            yield lambda raw: raw if narrowed else raw[:, rows]
        finally:
            if handle is not None:
                handle.remove()

    def _predictor_rows(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token mask → mask of their predictor rows."""
        if not self.shift:
            return tokens
        return torch.cat([tokens[:, 1:], torch.zeros_like(tokens[:, :1])], dim=1)


def _forward_must_finish(model: nn.Module) -> bool:
    """Parameters sharded by FSDP (1 or 2) or DeepSpeed ZeRO-3, or placed by accelerate's device-map hooks
    (offloading loads a module's weights before its forward and frees them after): their hooks must see every
    forward end, so such a model's forward is never cut short."""
    if any(hasattr(p, "ds_id") for p in model.parameters()):  # DeepSpeed ZeRO-3 marks its parameters
        return True
    if any(hasattr(m, "_hf_hook") for m in model.modules()):  # accelerate's dispatch / offload hooks
        return True
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # torch built without distributed
        return False
    fsdp2 = getattr(torch.distributed.fsdp, "FSDPModule", ())
    return any(isinstance(m, (FullyShardedDataParallel, fsdp2)) for m in model.modules())


def _output_head(model: nn.Module) -> Optional[nn.Linear]:
    """The model's LM head when it is a Linear module (called once per forward, on the last hidden states), else
    None: no such method, or a head that is the input embedding (weight-tied LLaDA returns its ``wte``)."""
    try:
        head = model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    return head if isinstance(head, nn.Linear) else None


def _unwrapped(model: nn.Module) -> nn.Module:
    """The model inside DDP / FSDP (1) / DeepSpeed wrappers (each keeps it as ``.module``)."""
    while isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


def _check_span(span, N: int) -> None:
    if (not isinstance(span, tuple) or len(span) != 2 or not all(isinstance(i, int) and not isinstance(i, bool)
                                                                  for i in span)):
        raise TypeError(f"`logits_span` must be a tuple (first, end) of ints, got {span!r}")
    if not 0 <= span[0] < span[1] <= N:
        raise ValueError(f"`logits_span` must satisfy 0 <= first < end <= N={N}, got {span}")


def _check_ids(input_ids) -> torch.Tensor:
    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2 or input_ids.dtype not in (torch.long, torch.int):
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"`input_ids` must be an integer tensor of shape (B, N), got {shape}")
    return input_ids.long()


def _check_mask(mask, name: str, B: int, N: int, device) -> Optional[torch.Tensor]:
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"`{name}` must be a bool tensor of shape (B={B}, N={N}), got {type(mask).__name__}")
    if tuple(mask.shape) != (B, N):
        raise ValueError(f"`{name}` must have shape (B={B}, N={N}) like `input_ids`, got {tuple(mask.shape)}")
    if mask.dtype.is_floating_point or mask.dtype.is_complex:
        raise TypeError(f"`{name}` must be bool (or 0/1 integers), got dtype {mask.dtype}")
    if mask.device != device:
        raise ValueError(f"`{name}` is on {mask.device} but `input_ids` is on {device}")
    return mask if mask.dtype == torch.bool else mask != 0


# ---------------------------------------------------------------------------------------------- loading


def load_adapter(
    model_or_path, *, family: str = "auto", tokenizer=None, padded_attention: str = "mask", **from_pretrained_kwargs
) -> DiffusionLMAdapter:
    """Wrap a built ``PreTrainedModel`` or load one from a LOCAL directory (never the hub).

    ``family`` in ``("auto", "generic", "dream", "llada")``; ``"auto"`` reads ``config.model_type`` /
    ``architectures``. Dream and LLaDA run the code in the directory (``trust_remote_code``), loaded by
    path (never another checkpoint's classes from transformers' Auto registry) and repaired where the
    published files fail on this transformers version; a built model gets the same repairs and checks
    (``agdo.models._compat``), and a LLaDA whose code ignores the padding mask refuses padded batches.
    Ids come from the config, then the generation config, then the tokenizer, then the family defaults (see ``_families.FAMILY_DEFAULTS``). ``shift`` comes from ``config.diffusion_shift``
    when present, otherwise from the family (Dream shifted; LLaDA and generic not).
    """
    choices = ("auto",) + tuple(_families.FAMILIES)
    if family not in choices:
        raise ValueError(f"`family` must be one of {choices}, got {family!r}")
    if isinstance(model_or_path, (str, os.PathLike)):
        path = os.fspath(model_or_path)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"load_adapter takes a local model directory (the hub is not used): {path!r}")
        if family == "auto":
            family = _families.detect_family(_RawConfig(path))
        model, tokenizer = _load_from_directory(path, family, tokenizer, from_pretrained_kwargs)
        directory = path
    elif isinstance(model_or_path, nn.Module) and hasattr(model_or_path, "config"):
        if from_pretrained_kwargs:
            raise TypeError(f"from_pretrained kwargs {sorted(from_pretrained_kwargs)} need a path, not a built model")
        model = model_or_path
        directory = None
        if family == "auto":
            family = _families.detect_family(model.config)
    else:
        raise TypeError(
            f"`model_or_path` must be a PreTrainedModel or a local directory, got {type(model_or_path).__name__}"
        )

    _compat.repair_model(model, family, directory)
    defaults = _families.FAMILY_DEFAULTS[family]
    eos_token_ids = _eos_token_ids(model, tokenizer, defaults)
    mask_token_id = _first_id(model, tokenizer, "mask_token_id", defaults)
    if mask_token_id is None:
        raise ValueError(
            f"no mask token id for this {family} model: set `config.mask_token_id` or pass a tokenizer "
            "with a mask token"
        )
    pad_token_id = _first_id(model, tokenizer, "pad_token_id", defaults)
    if pad_token_id is None:
        if not eos_token_ids:
            raise ValueError("no pad token id and no EOS id to pad with: set `config.pad_token_id`")
        pad_token_id = eos_token_ids[0]
    shift = getattr(model.config, "diffusion_shift", None)
    adapter = DiffusionLMAdapter(
        model,
        family=family,
        tokenizer=tokenizer,
        mask_token_id=mask_token_id,
        pad_token_id=pad_token_id,
        eos_token_ids=eos_token_ids,
        shift=defaults["shift"] if shift is None else shift,
        padded_attention=padded_attention,
    )
    if family == "llada":  # the LLaDA files from before October 2025 ignore the padding mask
        _compat.probe_padding_mask(
            model, _families.LLaDAFamily.blocks(model), adapter.num_heads, adapter.num_kv_heads, adapter.head_dim
        )
    return adapter


class _RawConfig:
    """``model_type`` / ``architectures`` of a directory's config.json, read without running its code."""

    def __init__(self, path: str):
        config_file = os.path.join(path, "config.json")
        if not os.path.isfile(config_file):
            raise FileNotFoundError(f"no config.json in {path!r}")
        with open(config_file) as f:
            raw = json.load(f)
        self.model_type = raw.get("model_type")
        self.architectures = raw.get("architectures")


def _load_from_directory(path: str, family: str, tokenizer, kwargs: dict):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs.setdefault("local_files_only", True)
    if family == "generic":
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        trust_remote_code = kwargs.get("trust_remote_code", False)
    else:  # Dream / LLaDA: the modeling code ships in the directory; built by it, repaired for this transformers
        model = _compat.load_remote_model(path, kwargs)
        trust_remote_code = True
    has_tokenizer = any(
        os.path.isfile(os.path.join(path, name)) for name in ("tokenizer.json", "tokenizer_config.json")
    )
    if tokenizer is None and has_tokenizer:
        tokenizer = AutoTokenizer.from_pretrained(
            path, local_files_only=True, trust_remote_code=trust_remote_code
        )
    return model, tokenizer


def _sources(model, tokenizer):
    """Where ids are looked up, in order of authority."""
    yield model.config
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        yield generation_config
    if tokenizer is not None:
        yield tokenizer


def _first_id(model, tokenizer, field: str, defaults: dict) -> Optional[int]:
    for source in _sources(model, tokenizer):
        value = getattr(source, field, None)
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return defaults.get(field)


def _eos_token_ids(model, tokenizer, defaults: dict) -> tuple:
    """Every EOS id the sources name, plus the family's end-of-turn token (by string via the tokenizer)."""
    ids = []
    for source in _sources(model, tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, (list, tuple)):
            ids += value
        elif value is not None:
            ids.append(value)
    if not ids:
        ids = list(defaults.get("eos_token_ids", ()))
    if "end_of_turn" in defaults:
        token, default_id = defaults["end_of_turn"]
        eot = tokenizer.convert_tokens_to_ids(token) if tokenizer is not None else default_id
        if eot is not None and eot != getattr(tokenizer, "unk_token_id", None) and eot < model.config.vocab_size:
            ids.append(eot)
    return tuple(dict.fromkeys(int(i) for i in ids))

"""Block-wise KV cache for semi-autoregressive decoding (Fast-dLLM's prefix and dual caches).

A semi-AR sampler works on one block at a time and, uncached, runs the whole sequence through the model
at every step. With a :class:`BlockCache` (``adapter.block_cache(mode, attention_mask)``; the sampler's
``SamplerConfig.cache``):

- every step whose fed window differs from the last one (a block's first step where the rows move through
  their blocks in step; not always otherwise, see below) is a full forward over the sequence — the
  uncached forward (generic models get an explicit all-real key mask where uncached they get none: equal
  to rounding) — that also keeps every layer's K/V of the positions OUTSIDE the fed window;
- the other steps of the block run the model on the fed window only, attending to those kept K/V and to
  the window's fresh ones:

  - ``"prefix"``: fed = the block and everything after it (the suffix is recomputed at every step); kept =
    the prompt and the finished blocks;
  - ``"prefix"`` with ``lookahead = w``: fed = the block and the next ``w`` positions; kept = the prompt, the
    finished blocks and the masked positions past that window (stale like ``dual``'s). ``w = 0`` is ``dual``;
    no ``lookahead`` is Fast-dLLM's prefix cache. The fed tokens per step then stop growing with the
    response length (the prefix cache's cost per step is the block plus the whole masked suffix);
  - ``"dual"``: fed = the block only; kept = the prompt, the finished blocks AND the masked blocks after it.

  Shifted models (Dream) predict token ``i`` from row ``i - 1``: the fed window starts one position before
  the block, so the block's first token has its own predictor row.

Approximation (as in Fast-dLLM): a kept K/V is the one computed at the last full forward, i.e. when the
fed window last changed. With bidirectional attention every position's K/V in layers >= 1 depends on the
whole sequence, so once tokens have been committed since, the kept K/V are stale: the full forwards are
exact, the cached steps approximate; ``dual`` also keeps the masked suffix's stale K/V (whose logits are not
recomputed either). "Exact at each block's first step" holds where a block's first step opens a new window:
a sampler moving all its rows through their blocks in step (the sampler's static schedules). Where rows move
at their own pace (its dynamic unmasking or ``origin``) the window is the batch's and a row can enter a new
block inside an unchanged window (``prefix``: while a slower row holds the lowest block); that block's first
step is then a cached one, against stale kept K/V. Fed again in the SAME state, a cached forward reproduces
the uncached logits to rounding (``tests/test_block_cache.py``).

Key layout. Attention over keys does not depend on their order once RoPE has placed them, so the cache
holds the kept positions in order and the fed window is appended AFTER them with its true position ids:
keys = [prefix; fed] (prefix) or [prefix; suffix; fed block] (dual). The fed rows are thus the last keys,
the layout ``agdo_kernels.valid_attention`` takes for queries fewer than keys: ``S`` of the fed tokens is
computed over the FULL key set (kept + fresh), with ``unmasked`` and the padding mask mapped onto it.
Left padding: the key padding mask covers kept and fresh keys, and position ids are those of the uncached
forward (counted over real tokens).

Outputs are full-length and token-aligned like ``DiffusionLMAdapter.forward``: a cached step overwrites
the logits (and ``S``) of the block and what follows it in the fed window; every other position keeps the
value of the last forward that computed it (the window's full forward). With ``logits_fresh_only`` (what
the sampler asks unless a record needs every position) the logits are those of the fresh positions alone,
the LM head run on their rows only, full forwards included.

Per family, through the model's own cache:

- generic (transformers) and Dream (its remote code, Qwen2-derived): a transformers ``DynamicCache``
  (post-RoPE K/V per layer) passed to the model's forward with ``use_cache=True`` (keyword
  ``past_key_values``, or ``cache`` where transformers renamed it), positions as ``position_ids``, a
  ``(B, 1, n, Nk)`` additive key mask; the fed K/V are cropped off after each step (``crop(-n)``, which
  transformers 4.56 and 5.x read alike). Generic models always get an explicit mask: transformers builds a
  CAUSAL mask for a cached forward given none.
- LLaDA: its model forward refuses a cache, its blocks take one — ``block.attention(q, k, v, bias,
  layer_past=(k, v), use_cache)`` concatenates the pre-RoPE ``layer_past`` before applying RoPE, placing
  the new tokens at the END of the positions (``key_len - query_len``). Each block's ``attention`` is
  wrapped for the forward to record (first step) or to be given (later steps) its ``layer_past`` and the
  key mask. Hence ``prefix`` without ``lookahead`` only: ``dual`` and a lookahead window are refused (the
  fed tokens would not be at the end of the positions).
  A modeling file whose blocks ignore ``layer_past`` is detected (one token through the first block) when
  the cache is created, and refused.

The padding-free routes of ``padded_attention`` apply to the full forwards only; cached steps (fewer
queries than keys) use the model's own masked attention. Statistics: only ``S`` (``unmasked``), of the
last layer, all heads — what the sampler asks.
"""

from __future__ import annotations

import inspect
from contextlib import ExitStack, nullcontext
from typing import Optional

import torch

from ._capture import LayerCapture, StatisticsRequest
from ._families import LLaDAFamily, patched_attribute, position_ids_for
from ._padded_attention import padded_attention_route
from .adapter import AdapterOutput

BLOCK_CACHE_MODES = ("prefix", "dual")

LLADA_IGNORES_LAYER_PAST = (
    "this LLaDA modeling_llada.py's blocks ignore `layer_past` (the published file's `attention()` concatenates it "
    "before RoPE): the block KV cache cannot run on it; decode with cache='none'"
)


class BlockCache:
    """The K/V kept outside the fed window of one batch, for one adapter (module docstring).

    ``forward(input_ids, fresh, unmasked=None)`` is a drop-in for ``adapter.forward`` in a semi-AR
    sampler: ``fresh = (first, end)`` are the positions whose logits the step needs fresh (the blocks being
    decoded). A fed window different from the last call's — or asking for ``S`` where the last call did
    not — starts a new block: a full forward. ``lookahead`` (``prefix`` only): how many positions after the
    fresh ones are fed too (None: all of them).
    """

    def __init__(self, adapter, mode: str, attention_mask: Optional[torch.Tensor] = None,
                 lookahead: Optional[int] = None):
        if mode not in BLOCK_CACHE_MODES:
            raise ValueError(f"`cache` must be one of {BLOCK_CACHE_MODES}, got {mode!r}")
        if lookahead is not None and (mode != "prefix" or isinstance(lookahead, bool) or not isinstance(lookahead, int)
                                      or lookahead < 0):
            raise ValueError(f"`lookahead` must be None or an int >= 0 with cache='prefix', got {lookahead!r} "
                             f"with cache={mode!r}")
        family_cache = _FAMILY_CACHES[adapter.family]
        if (mode == "dual" or lookahead is not None) and not family_cache.supports_dual:
            what = "cache='dual'" if mode == "dual" else "a prefix-cache lookahead window"
            raise ValueError(
                f"{what} is not supported for {adapter.family}: its blocks place the fed tokens at the end of "
                "the positions (RoPE at key_len - query_len), but this cache feeds the block before cached "
                "positions; use cache='prefix' without a lookahead"
            )
        self.lookahead = 0 if mode == "dual" else lookahead
        self.runner = family_cache(adapter)
        self.adapter = adapter
        self.mode = mode
        self.attention_mask = None if attention_mask is None or bool(attention_mask.all()) else attention_mask.bool()
        self.fed: Optional[tuple[int, int]] = None  # the fed window [start, end); K/V outside it are kept
        self.key_order: Optional[torch.Tensor] = None  # (Nk,) the position of every key: kept, then fed
        self.position_ids: Optional[torch.Tensor] = None
        self.logits: Optional[torch.Tensor] = None  # (B, N, V) token-aligned, the last computed values
        self.s: Optional[torch.Tensor] = None  # (B, N) likewise, when S is asked

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, fresh: tuple[int, int], *, unmasked: Optional[torch.Tensor] = None,
                logits_fresh_only: bool = False) -> AdapterOutput:
        """Token-aligned ``logits (B, N, V)`` and, with ``unmasked (B, N)``, ``s (B, N)`` for ``input_ids (B, N)``;
        fresh at least at positions ``fresh[0] <= i < fresh[1]`` (module docstring for the others).
        ``logits_fresh_only``: the logits of the fresh positions alone, ``(B, fresh[1] - fresh[0], V)``, the LM
        head run on their rows only (``adapter.forward``'s ``logits_span``); no full-length logits kept."""
        first, end = fresh
        N = input_ids.shape[1]
        if not 0 <= first < end <= N:
            raise ValueError(f"`fresh` must be positions 0 <= first < end <= {N}, got {fresh}")
        fed = (max(first - int(self.adapter.shift), 0), N if self.lookahead is None else min(end + self.lookahead, N))
        span = fresh if logits_fresh_only else None
        if fed != self.fed or (unmasked is None) != (self.s is None) or (span is None and self.logits is None):
            logits = self._full_forward(input_ids, fed, unmasked, span)
        else:
            logits = self._cached_forward(input_ids, first, unmasked, span)
        return AdapterOutput(logits=logits, s=self.s)

    def _full_forward(self, input_ids, fed, unmasked, span):
        with self.adapter._logits_of(span, input_ids.shape[1]) as token_logits:
            raw, s_rows = self.runner.prefill(input_ids, self.attention_mask, unmasked)
        logits = token_logits(raw)
        self.logits = logits if span is None else None  # the full-length logits the cached steps update
        self.s = None if s_rows is None else self._token_s(s_rows)
        start, end = fed
        self.runner.keep_outside(start, end)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        self.key_order = torch.cat([positions[:start], positions[end:], positions[start:end]])
        self.position_ids = positions[None] if self.attention_mask is None else position_ids_for(self.attention_mask)
        self.fed = fed
        return logits

    def _cached_forward(self, input_ids, first, unmasked, span):
        start, end = self.fed
        mask = self.attention_mask
        with self.adapter._logits_of(span, end - start, first_row=start) as fresh_logits:
            raw, s_rows = self.runner.step(
                input_ids[:, start:end],
                self.position_ids[:, start:end],
                None if mask is None else mask[:, self.key_order],
                None if unmasked is None else unmasked[:, self.key_order],
            )
        if s_rows is not None:
            self.s[:, first:end] = self._token_s(s_rows, start)[:, first - start:]
        if span is not None:
            return fresh_logits(raw)
        # Fed row i is position start + i; with a shift the row before `first` predicts it (fed for that reason).
        self.logits[:, first:end] = self.adapter.token_logits(raw)[:, first - start:]
        return self.logits

    def _token_s(self, s_rows, start: int = 0):
        """Per-row S of rows ``start..`` → per token; padded tokens get 0, as ``adapter.forward`` gives."""
        s = self.adapter._row_to_token(s_rows)
        if self.attention_mask is not None:
            s = s * self.attention_mask[:, start:start + s.shape[1]]
        return s


# ------------------------------------------------------------------------------ one forward, S beside it


def _run(adapter, inputs: dict, key_mask, unmasked, route):
    """``adapter.model(**inputs)`` → ``(raw logits of the fed rows, S of the fed rows or None)``; ``S`` from the
    last layer's attention with ``key_mask``/``unmasked`` over its keys (kept, then fed)."""
    if unmasked is None:
        with route:
            return adapter.model(**inputs).logits, None
    layer = adapter.num_layers - 1
    request = StatisticsRequest(
        attention_mask=key_mask, unmasked=unmasked, response_start=None, influence_rows=None, influence_norm="sum",
        shift=adapter.shift, num_heads=adapter.num_heads, backend=adapter.kernel_backend, layer=layer,
    )
    capture = LayerCapture(request, where=f"{type(adapter.model).__name__} ({adapter.family} adapter, layer {layer}, "
                                          "block cache)")
    with route, adapter._family.hook(adapter._layer_target(layer), capture):
        logits = adapter.model(**inputs).logits
    return logits, capture.result().s_rows


def _key_bias(key_mask: Optional[torch.Tensor], rows: int, keys: int, dtype, device) -> torch.Tensor:
    """``(B or 1, 1, rows, keys)`` additive mask (a broadcast view): ``-big`` at padded keys, 0 elsewhere."""
    if key_mask is None:
        return torch.zeros(1, 1, 1, keys, dtype=dtype, device=device).expand(1, 1, rows, keys)
    bias = torch.zeros(key_mask.shape[0], 1, 1, keys, dtype=dtype, device=device)
    bias = bias.masked_fill(~key_mask[:, None, None, :], torch.finfo(dtype).min)
    return bias.expand(-1, 1, rows, keys)


def _outside(tensor: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """The positions (dim -2) before ``start`` and from ``end`` on."""
    return torch.cat([tensor[..., :start, :], tensor[..., end:, :]], dim=-2)


# ------------------------------------------------------------------------------------------ per family


class _TransformersCache:
    """Generic and Dream: a transformers ``DynamicCache`` handed to the model's own forward."""

    supports_dual = True

    def __init__(self, adapter):
        self.adapter = adapter
        parameters = inspect.signature(adapter.model.forward).parameters
        self.keyword = "cache" if "cache" in parameters else "past_key_values"  # transformers 5.x renamed it
        # Given no mask, transformers builds a causal one for a cached forward; Dream's own code never does.
        self.explicit_mask = adapter.family == "generic"
        self.cache = None

    def prefill(self, input_ids, attention_mask, unmasked):
        from transformers.cache_utils import DynamicCache

        adapter, model = self.adapter, self.adapter.model
        self.cache = DynamicCache()
        inputs = adapter._family.model_inputs(model, input_ids, attention_mask)
        if self.explicit_mask and inputs["attention_mask"] is None:
            N = input_ids.shape[1]
            inputs["attention_mask"] = _key_bias(None, N, N, model.dtype, input_ids.device)
        inputs.update(use_cache=True, **{self.keyword: self.cache})
        route = padded_attention_route(adapter.family, model, attention_mask, adapter.padded_attention)
        return _run(adapter, inputs, attention_mask, unmasked, route)

    def keep_outside(self, start: int, end: int) -> None:
        from transformers.cache_utils import DynamicCache

        layers = [(layer.keys, layer.values) for layer in self.cache.layers]
        self.cache = DynamicCache()
        for index, (keys, values) in enumerate(layers):
            self.cache.update(_outside(keys, start, end), _outside(values, start, end), index)

    def step(self, input_ids, position_ids, key_mask, unmasked):
        model = self.adapter.model
        n = input_ids.shape[1]
        keys = self.cache.get_seq_length() + n
        bias = None
        if key_mask is not None or self.explicit_mask:
            bias = _key_bias(key_mask, n, keys, model.dtype, input_ids.device)
        inputs = {"input_ids": input_ids, "attention_mask": bias, "position_ids": position_ids, "use_cache": True,
                  self.keyword: self.cache}
        try:
            return _run(self.adapter, inputs, key_mask, unmasked, nullcontext())
        finally:
            self.cache.crop(-n)  # back to the kept K/V


class _LLaDABlockCache:
    """LLaDA: each block's own ``layer_past`` (pre-RoPE ``(k, v)``), given through a wrapped ``block.attention``."""

    supports_dual = False

    def __init__(self, adapter):
        self.adapter = adapter
        self.blocks = LLaDAFamily.blocks(adapter.model)
        self.past: Optional[list] = None
        self._check_layer_past()

    def _check_layer_past(self) -> None:
        """One token through the first block's ``attention`` against one cached token: the K/V it returns must
        hold both (files whose blocks drop ``layer_past`` would attend to the fed tokens only)."""
        adapter = self.adapter
        parameter = next(adapter.model.parameters())

        def zeros(*shape):
            return torch.zeros(*shape, dtype=parameter.dtype, device=parameter.device)

        width, kv_width = adapter.num_heads * adapter.head_dim, adapter.num_kv_heads * adapter.head_dim
        past = (zeros(1, adapter.num_kv_heads, 1, adapter.head_dim),) * 2
        with torch.no_grad():
            _, present = self.blocks[0].attention(zeros(1, 1, width), zeros(1, 1, kv_width), zeros(1, 1, kv_width),
                                                  None, layer_past=past, use_cache=True)
        if present is None or present[0].shape[-2] != 2:
            raise NotImplementedError(LLADA_IGNORES_LAYER_PAST)

    def _wrapped_attention(self, wrapper):
        """Every block's ``attention`` replaced by ``wrapper(index, original)`` for the duration."""
        stack = ExitStack()
        for index, block in enumerate(self.blocks):
            stack.enter_context(patched_attribute(block, "attention", wrapper(index, block.attention)))
        return stack

    def prefill(self, input_ids, attention_mask, unmasked):
        adapter = self.adapter
        presents = [None] * len(self.blocks)

        def recording(index, attention):
            def attention_recording(q, k, v, attention_bias=None, layer_past=None, use_cache=False):
                out, presents[index] = attention(q, k, v, attention_bias, layer_past=layer_past, use_cache=True)
                return out, presents[index] if use_cache else None

            return attention_recording

        inputs = adapter._family.model_inputs(adapter.model, input_ids, attention_mask)
        route = padded_attention_route(adapter.family, adapter.model, attention_mask, adapter.padded_attention)
        with self._wrapped_attention(recording):
            out = _run(adapter, inputs, attention_mask, unmasked, route)
        self.past = presents
        return out

    def keep_outside(self, start: int, end: int) -> None:
        self.past = [(_outside(k, start, end), _outside(v, start, end)) for k, v in self.past]

    def step(self, input_ids, position_ids, key_mask, unmasked):
        adapter, model = self.adapter, self.adapter.model
        n = input_ids.shape[1]
        keys = self.past[0][0].shape[-2] + n
        # The blocks take the rows [key_len - query_len, key_len) of a square bias.
        bias = None if key_mask is None else _key_bias(key_mask, keys, keys, model.dtype, input_ids.device)

        def against_cache(index, attention):
            past = self.past[index]

            def attention_against_cache(q, k, v, attention_bias=None, layer_past=None, use_cache=False):
                return attention(q, k, v, bias, layer_past=past, use_cache=use_cache)

            return attention_against_cache

        inputs = adapter._family.model_inputs(model, input_ids, None)  # positions come from layer_past's length
        with self._wrapped_attention(against_cache):
            return _run(adapter, inputs, key_mask, unmasked, nullcontext())


_FAMILY_CACHES = {"generic": _TransformersCache, "dream": _TransformersCache, "llada": _LLaDABlockCache}

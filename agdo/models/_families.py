"""Per-family knowledge: defaults the config may lack, attention shape, inputs, the layers and their hook.

A family answers these questions for the adapter:

- ``attention_shape(config)`` → ``(H, Hkv, d)`` from the config's own field names;
- ``num_layers(model)`` → how many attention layers the model has;
- ``layer_attention(model, index)`` → the module of layer ``index`` (Python-style, ``-1`` = last) whose
  attention call is hooked (clear error when absent); ``last_attention(model)`` = ``layer_attention(model, -1)``;
- ``model_inputs(input_ids, attention_mask)`` → the keyword arguments of one model forward;
- ``hook(target, capture)`` → a context manager routing the target's attention call through the capture;
- ``DEFAULTS`` → ids and shift to fall back on when neither config nor tokenizer has them.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Optional

import torch
import transformers
from torch import nn

from . import _compat
from ._capture import LayerCapture

_TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])

# Used ONLY where the config / generation config / tokenizer lack the field. These are the values the
# public checkpoints contain (Dream-v0-*-7B, LLaDA-8B-*), so a stripped config still works.
FAMILY_DEFAULTS = {
    "generic": {"shift": False},
    "dream": {
        "shift": True,
        "mask_token_id": 151666,
        "pad_token_id": 151643,
        "eos_token_ids": (151643,),
        "end_of_turn": ("<|im_end|>", 151645),
    },
    "llada": {
        "shift": False,
        "mask_token_id": 126336,
        "pad_token_id": 126081,
        "eos_token_ids": (126081,),
        "end_of_turn": ("<|eot_id|>", 126348),
    },
}


@contextmanager
def patched_attribute(owner, name: str, value):
    """Set ``owner.name = value`` for the duration and put back exactly what was there before."""
    own = name in vars(owner)
    saved = vars(owner).get(name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        if own:
            setattr(owner, name, saved)
        else:
            delattr(owner, name)


def position_ids_for(attention_mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Positions counted over real tokens (left padding does not shift RoPE), as ``generate`` does."""
    if attention_mask is None:
        return None
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(~attention_mask, 1)


def additive_key_mask(attention_mask: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """``(B, 1, N, N)`` additive mask, ``-big`` at padded keys: bidirectional, works for SDPA and eager."""
    if attention_mask is None:
        return None
    B, N = attention_mask.shape
    bias = torch.zeros(B, 1, 1, N, dtype=dtype, device=attention_mask.device)
    bias = bias.masked_fill(~attention_mask[:, None, None, :], torch.finfo(dtype).min)
    return bias.expand(B, 1, N, N)


def key_padding_inputs(model, input_ids, attention_mask) -> dict:
    """Forward inputs of a bidirectional model: a 4D key-padding mask and positions over real tokens."""
    return dict(
        input_ids=input_ids,
        attention_mask=additive_key_mask(attention_mask, model.dtype),
        position_ids=position_ids_for(attention_mask),
    )


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder's layer list of a transformers-style model (``model.model.layers`` and friends)."""
    candidates = []
    if hasattr(model, "get_decoder"):
        candidates.append(model.get_decoder())
    candidates += [getattr(model, "model", None), getattr(model, "base_model", None), model]
    for candidate in candidates:
        layers = getattr(candidate, "layers", None)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return layers
    raise ValueError(
        f"cannot find the decoder layers of {type(model).__name__}: expected a non-empty `model.layers` "
        "ModuleList (transformers decoder layout)"
    )


def layer_self_attention(model: nn.Module, index: int) -> nn.Module:
    """``self_attn`` of decoder layer ``index`` (Python-style index)."""
    layers = decoder_layers(model)
    layer = layers[index]
    attention = getattr(layer, "self_attn", None)
    if not isinstance(attention, nn.Module):
        raise ValueError(
            f"decoder layer {index % len(layers)} ({type(layer).__name__}) has no `self_attn` attention module"
        )
    return attention


def last_self_attention(model: nn.Module) -> nn.Module:
    return layer_self_attention(model, -1)


def _count_decoder_layers(model: nn.Module) -> int:
    return len(decoder_layers(model))


class GenericFamily:
    """transformers decoder models (Llama, Qwen2, ...) made bidirectional, hooked through the attention registry.

    During a capture the target's config switches ``_attn_implementation`` to ``"agdo_<original>"``, a
    registered attention function that delegates every layer to the original function (``sdpa`` or the
    model's ``eager``); the chosen layer's call also goes through the capture (statistics beside the same
    call). Restored afterwards.
    """

    name = "generic"
    SUPPORTED_ATTENTION = ("sdpa", "eager")

    @staticmethod
    def attention_shape(config):
        H = config.num_attention_heads
        Hkv = getattr(config, "num_key_value_heads", None) or H
        d = getattr(config, "head_dim", None) or config.hidden_size // H
        return H, Hkv, d

    num_layers = staticmethod(_count_decoder_layers)

    @staticmethod
    def layer_attention(model, index: int):
        target = layer_self_attention(model, index)
        _require_bidirectional(model)
        return target

    @classmethod
    def last_attention(cls, model):
        return cls.layer_attention(model, -1)

    @staticmethod
    def model_inputs(model, input_ids, attention_mask):
        # A 4D mask is used as given by every transformers >= 4.56: bidirectional whatever the version.
        # Without padding, transformers 4.x builds a CAUSAL mask whatever `config.is_causal` says, so there
        # every batch gets an explicit all-visible 4D mask; 5.x honours the flag (and keeps SDPA's flash path).
        inputs = key_padding_inputs(model, input_ids, attention_mask)
        if attention_mask is None and _TRANSFORMERS_MAJOR < 5:
            B, N = input_ids.shape
            inputs["attention_mask"] = torch.zeros(B, 1, N, N, dtype=model.dtype, device=input_ids.device)
        return {**inputs, "use_cache": False}

    @classmethod
    @contextmanager
    def hook(cls, target, capture: LayerCapture):
        config = target.config
        original = config._attn_implementation
        if original not in cls.SUPPORTED_ATTENTION:
            raise ValueError(
                f"capture supports attn_implementation in {cls.SUPPORTED_ATTENTION}, the model uses {original!r}"
            )
        config._attn_implementation = _register_attention_function(original)
        try:
            with patched_attribute(target, "_agdo_capture", capture):
                yield
        finally:
            config._attn_implementation = original


def _require_bidirectional(model) -> None:
    """Generic models must declare bidirectional attention; make every transformers version honour it."""
    modules = [layer.self_attn for layer in decoder_layers(model)]
    if getattr(model.config, "is_causal", None) is False:
        for module in modules:  # transformers < 5 reads only the module flag when no mask is given
            module.is_causal = False
    elif any(getattr(module, "is_causal", True) for module in modules):
        raise ValueError(
            f"{type(model).__name__} attends causally; the generic adapter needs a bidirectional model: set "
            "`config.is_causal = False` (or `is_causal = False` on every attention module) before loading"
        )


def _register_attention_function(original: str) -> str:
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name = f"agdo_{original}"
    if name in ALL_ATTENTION_FUNCTIONS:
        return name

    def delegate_for(module):
        if original == "eager":  # every transformers model file defines its own eager function
            return sys.modules[type(module).__module__].eager_attention_forward
        return ALL_ATTENTION_FUNCTIONS[original]

    def agdo_attention(module, query, key, value, attention_mask, **kwargs):
        delegate = delegate_for(module)
        capture = getattr(module, "_agdo_capture", None)
        if capture is None:
            return delegate(module, query, key, value, attention_mask, **kwargs)
        if kwargs.get("sliding_window") or kwargs.get("softcap"):
            raise ValueError(f"{capture.where}: sliding-window / softcap attention is not supported by the capture")
        is_causal = kwargs.get("is_causal")
        out = capture.attend(
            query, key, value,
            attn_mask=attention_mask,
            is_causal=getattr(module, "is_causal", True) if is_causal is None else is_causal,
            dropout_p=kwargs.get("dropout", 0.0),
            scale=kwargs.get("scaling"),
            delegate=lambda: delegate(module, query, key, value, attention_mask, **kwargs)[0],
        )
        return out, None

    AttentionInterface.register(name, agdo_attention)
    return name


class DreamFamily:
    """Dream (remote code): every ``model.model.layers[i].self_attn`` calls ``F.scaled_dot_product_attention``.

    During a capture the chosen layer's ``self_attn.forward`` is wrapped so that, only while it runs, that
    function is the capture (delegating to the real SDPA). Dream repeats k/v to H heads before SDPA, so the kernels see
    ``Hkv = H`` (same statistics). Inputs follow Dream's own ``generate``: a 4D mask and positions
    counted over real tokens.
    """

    name = "dream"

    attention_shape = GenericFamily.attention_shape

    num_layers = staticmethod(_count_decoder_layers)
    layer_attention = staticmethod(layer_self_attention)
    last_attention = staticmethod(last_self_attention)

    @staticmethod
    def model_inputs(model, input_ids, attention_mask):
        # Dream's published config enables a KV cache, which its forward would build and fill every call.
        return {**key_padding_inputs(model, input_ids, attention_mask), "use_cache": False}

    @staticmethod
    @contextmanager
    def hook(target, capture: LayerCapture):
        functional = torch.nn.functional
        sdpa = functional.scaled_dot_product_attention
        forward = target.forward

        def intercepted_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
            return capture.attend(
                query, key, value,
                attn_mask=attn_mask, is_causal=is_causal, dropout_p=dropout_p, scale=scale,
                delegate=lambda: sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                      is_causal=is_causal, scale=scale, **kwargs),
            )

        def forward_with_capture(*args, **kwargs):
            with patched_attribute(functional, "scaled_dot_product_attention", intercepted_sdpa):
                return forward(*args, **kwargs)

        with patched_attribute(target, "forward", forward_with_capture):
            yield


class LLaDAFamily:
    """LLaDA (remote code): the chosen block's ``_scaled_dot_product_attention(q, k, v, attn_mask, ...)`` method.

    The blocks live in ``model.model.transformer.blocks`` (or ``block_groups``); RoPE is applied in
    ``block.attention`` before that call and GQA is expanded inside it, so the capture sees post-RoPE
    ``q (B, H, N, d)`` and un-repeated ``k (B, Hkv, N, d)``. The method is replaced on the instance for
    the duration of the forward. LLaDA takes the 2D padding mask itself and has no position ids.
    """

    name = "llada"

    @staticmethod
    def attention_shape(config):
        H = config.n_heads
        Hkv = getattr(config, "n_kv_heads", None)
        if Hkv is None:
            Hkv = 1 if getattr(config, "multi_query_attention", None) else H
        return H, Hkv, config.d_model // H

    @staticmethod
    def blocks(model) -> list:
        core = getattr(model, "model", model)
        transformer = getattr(core, "transformer", None)
        blocks = None
        if transformer is not None and "blocks" in transformer:
            blocks = list(transformer["blocks"])
        elif transformer is not None and "block_groups" in transformer:
            blocks = [block for group in transformer["block_groups"] for block in group]
        if not blocks:
            raise ValueError(
                f"cannot find the LLaDA blocks of {type(model).__name__}: expected `model.transformer.blocks` "
                "or `model.transformer.block_groups`"
            )
        return blocks

    @classmethod
    def num_layers(cls, model) -> int:
        return len(cls.blocks(model))

    @classmethod
    def layer_attention(cls, model, index: int):
        blocks = cls.blocks(model)
        block = blocks[index]
        if not callable(getattr(block, "_scaled_dot_product_attention", None)):
            raise ValueError(
                f"LLaDA block {index % len(blocks)} ({type(block).__name__}) has no `_scaled_dot_product_attention` "
                "method to hook; this modeling_llada.py version is not supported"
            )
        return block

    @classmethod
    def last_attention(cls, model):
        return cls.layer_attention(model, -1)

    @staticmethod
    def model_inputs(model, input_ids, attention_mask):
        if attention_mask is not None:  # padded: refused where the model's code would attend to the pads
            _compat.require_padding_mask(model)
        # Every published LLaDAModelLM.forward takes use_cache (None: read from the config, where
        # transformers 5 may have dropped it); LLaDA has no KV cache.
        return dict(
            input_ids=input_ids,
            attention_mask=None if attention_mask is None else attention_mask.long(),
            use_cache=False,
        )

    @staticmethod
    @contextmanager
    def hook(target, capture: LayerCapture):
        attention = target._scaled_dot_product_attention

        def attention_with_capture(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False):
            return capture.attend(
                q, k, v,
                attn_mask=attn_mask, is_causal=is_causal, dropout_p=dropout_p, scale=None,
                delegate=lambda: attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal),
            )

        with patched_attribute(target, "_scaled_dot_product_attention", attention_with_capture):
            yield


FAMILIES = {family.name: family for family in (GenericFamily, DreamFamily, LLaDAFamily)}


def detect_family(config) -> str:
    """``"dream"`` / ``"llada"`` from ``model_type`` or ``architectures``, otherwise ``"generic"``."""
    names = [str(getattr(config, "model_type", "") or "")] + list(getattr(config, "architectures", None) or [])
    lowered = " ".join(names).lower()
    for family in ("dream", "llada"):
        if family in lowered:
            return family
    return "generic"

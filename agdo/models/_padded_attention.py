"""Padding-free attention for padded batches: every layer attends over each sequence's real tokens only.

With padding the adapter gives the model a 4D key-padding mask, and SDPA with a mask cannot use its flash
kernel, in every layer. ``padded_attention`` (an adapter setting) picks another route for such batches:

- ``"mask"``: the model's own masked attention (default; exactly the behaviour without this module);
- ``"varlen"``: the batch's real tokens packed into one ``(T, H, d)`` sequence for a varlen flash kernel:
  flash-attn's (``flash_attn.cute`` = flash-attn-4, ``pip install agdo[flash]``; else flash-attn 2), GQA
  native; without flash-attn, torch's own ``torch.nn.attention.varlen.varlen_attn`` (CUDA, torch >= 2.11;
  k/v heads repeated for GQA);
- ``"nested"``: torch SDPA on jagged nested tensors of the same packed tokens, without a mask (k/v heads
  repeated: jagged SDPA has no GQA);
- ``"auto"``: ``"varlen"`` on CUDA in fp16/bf16 with flash-attn installed, else ``"mask"``.

Measured (``bench/bench_capture.py``, 2026-11-26): on a 16-core CPU ``"nested"`` is 5.5-10.7x slower than the
mask (torch runs jagged SDPA on a math path); on an H200 (torch 2.11, Dream-shaped bf16 layers, N = 1024, 19% padding)
``"nested"`` is 1.1-1.5x slower (jagged-tensor overhead, ~4 ms a call) and ``"varlen"`` with torch's kernel
1.01-1.02x slower: packing q/k/v and unpacking the output in every layer costs what the unmasked kernel saves.
flash-attn itself was not measured; "auto" picks it because installing it is asking for it.

A batch without padding always takes the model's own path. Each family's attention call is replaced for
the duration of one forward, in EVERY layer (generic: transformers' ``sdpa`` / ``eager`` attention
function; Dream: ``torch.nn.functional.scaled_dot_product_attention``; LLaDA: each block's
``_scaled_dot_product_attention``). The replacement is entered before the statistics hook, so the hook's
``delegate`` (the chosen layer's output) is the padding-free call too; the statistics themselves still come
from the padded ``q``/``k`` the layer receives. Like the hooks: not thread-safe, not for ``torch.compile``.
"""

from __future__ import annotations

import functools
import inspect
import sys
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ._families import LLaDAFamily, decoder_layers, patched_attribute

PADDED_ATTENTION = ("mask", "varlen", "nested", "auto")

_sdpa = F.scaled_dot_product_attention  # the real one: the Dream route replaces the module attribute


def check_padded_attention(value) -> str:
    if value not in PADDED_ATTENTION:
        raise ValueError(f"`padded_attention` must be one of {list(PADDED_ATTENTION)}, got {value!r}")
    return value


def _without_dropout(kernel: str, dropout_p: float) -> None:
    if dropout_p:
        raise ValueError(f"{kernel} has no attention dropout: train with padded_attention='nested' or 'mask'")


def _flash_attn_4() -> Optional[Callable]:
    try:
        from flash_attn.cute import flash_attn_varlen_func
    except ImportError:
        return None

    def varlen(q, k, v, cu_seqlens, max_seqlen, scale, dropout_p):
        _without_dropout("flash-attn-4", dropout_p)
        out, _ = flash_attn_varlen_func(q, k, v, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens,
                                        max_seqlen_q=max_seqlen, max_seqlen_k=max_seqlen, softmax_scale=scale,
                                        causal=False)
        return out

    return varlen


def _flash_attn_2() -> Optional[Callable]:
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None

    def varlen(q, k, v, cu_seqlens, max_seqlen, scale, dropout_p):
        return flash_attn_varlen_func(q, k, v, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens,
                                      max_seqlen_q=max_seqlen, max_seqlen_k=max_seqlen, dropout_p=dropout_p,
                                      softmax_scale=scale, causal=False)

    return varlen


@functools.lru_cache(maxsize=None)
def flash_varlen_function() -> Optional[Callable]:
    """flash-attn's varlen kernel (flash-attn-4, else flash-attn 2) as ``f(q, k, v, cu_seqlens, max_seqlen,
    scale, dropout_p) -> (T, H, d)`` (packed ``q (T, H, d)``, ``k, v (T, Hkv, d)``, bidirectional), or None."""
    return _flash_attn_4() or _flash_attn_2()


@functools.lru_cache(maxsize=None)
def torch_varlen_function() -> Optional[Callable]:
    """torch's own flash varlen kernel (CUDA only; ``torch.nn.attention.varlen.varlen_attn`` with ``scale``,
    torch >= 2.11) as the same ``f``, or None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    if "scale" not in inspect.signature(varlen_attn).parameters:
        return None

    def varlen(q, k, v, cu_seqlens, max_seqlen, scale, dropout_p):
        _without_dropout("torch's varlen_attn", dropout_p)
        k, v = repeat_kv_heads(k, v, q.shape[1])  # its `enable_gqa` only exists from torch 2.12
        return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, scale=scale)

    return varlen


def repeat_kv_heads(k, v, num_heads: int):
    """``(T, Hkv, d)`` k, v → ``(T, H, d)``: query head ``h`` reads kv head ``h // (H / Hkv)``."""
    groups = num_heads // k.shape[1]
    return k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)


def resolve_padded_attention(value, device: torch.device, dtype: torch.dtype) -> str:
    """The route that ``padded_attention = value`` takes for a model on ``device`` in ``dtype``."""
    if check_padded_attention(value) != "auto":
        return value
    # flash computes in half precision only; torch's own varlen kernel and "nested" measured slower than the mask
    flash_runs = device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
    return "varlen" if flash_runs and flash_varlen_function() is not None else "mask"


@dataclass(frozen=True)
class Unpadding:
    """Where the real tokens of a ``(B, N)`` mask go when packed into one sequence of ``T`` tokens.

    Any mask works (left, right, holes): attention is bidirectional and positions are already in q/k (RoPE),
    so only the key SET of each sequence matters. Rows without a real token get no sequence.
    """

    batch: int
    length: int
    indices: torch.Tensor  # (T,) flat positions b * N + i of the real tokens, row-major
    offsets: torch.Tensor  # (S + 1,) int64: sequence s is packed[offsets[s]:offsets[s + 1]]
    cu_seqlens: torch.Tensor  # the same offsets in int32, as flash-attn takes them
    min_seqlen: int
    max_seqlen: int

    @classmethod
    def from_mask(cls, attention_mask: torch.Tensor) -> "Unpadding":
        B, N = attention_mask.shape
        lengths = [n for n in attention_mask.sum(-1).tolist() if n > 0]  # one host sync per forward, not per layer
        offsets = torch.tensor([0] + lengths, device=attention_mask.device).cumsum(0)
        return cls(
            batch=B, length=N, indices=attention_mask.flatten().nonzero().squeeze(-1), offsets=offsets,
            cu_seqlens=offsets.int(), min_seqlen=min(lengths), max_seqlen=max(lengths),
        )

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, h, N, d)`` → ``(T, h, d)``: the real tokens, sequence after sequence."""
        return x.transpose(1, 2).flatten(0, 1).index_select(0, self.indices)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """``(T, h, d)`` → ``(B, N, h, d)``, zeros at padding. Pad rows are never read by real rows: every
        layer masks pad keys and the rest of the model is per token, so a pad row's value only reaches that
        pad row's own outputs, which the adapter ignores (logits and statistics are read at real rows)."""
        padded = x.new_zeros(self.batch * self.length, *x.shape[1:]).index_copy(0, self.indices, x)
        return padded.view(self.batch, self.length, *x.shape[1:])


def _varlen_attention(q, k, v, unpadding: Unpadding, scale, dropout_p):
    varlen = flash_varlen_function() or torch_varlen_function()
    if varlen is None:
        raise ImportError("padded_attention='varlen' needs a varlen flash kernel: `pip install agdo[flash]` "
                          "(flash-attn-4, Hopper/Blackwell), flash-attn 2, or torch >= 2.11 (CUDA)")
    return varlen(q, k, v, unpadding.cu_seqlens, unpadding.max_seqlen, scale, dropout_p)


def _nested_attention(q, k, v, unpadding: Unpadding, scale, dropout_p):
    def jagged(x):  # (T, h, d) → (S, h, j, d); the same offsets tensor makes q, k, v share one ragged size
        return torch.nested.nested_tensor_from_jagged(
            x, unpadding.offsets, min_seqlen=unpadding.min_seqlen, max_seqlen=unpadding.max_seqlen
        ).transpose(1, 2)

    k, v = repeat_kv_heads(k, v, q.shape[1])  # jagged SDPA has no enable_gqa
    out = _sdpa(jagged(q), jagged(k), jagged(v), dropout_p=dropout_p, scale=scale)
    return out.transpose(1, 2).values()


_KERNELS = {"varlen": _varlen_attention, "nested": _nested_attention}


@dataclass(frozen=True)
class PaddingFreeAttention:
    """``attend(q (B, H, N, d), k, v (B, Hkv, N, d)) -> (B, N, H, d)``: bidirectional attention over the real
    keys of each sequence; zeros at pad query rows (see :meth:`Unpadding.unpack`)."""

    route: str
    unpadding: Unpadding

    def __call__(self, q, k, v, *, scale=None, dropout_p=0.0, is_causal=False) -> torch.Tensor:
        if is_causal:
            raise ValueError("padding-free attention is bidirectional; this layer asks for causal attention "
                             "(use padded_attention='mask')")
        pack = self.unpadding.pack
        out = _KERNELS[self.route](pack(q), pack(k), pack(v), self.unpadding, scale, dropout_p)
        return self.unpadding.unpack(out)


# ------------------------------------------------------------------------------ per family: every layer


@contextmanager
def _generic_route(model, attend: PaddingFreeAttention):
    """transformers models call ``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]`` (``sdpa``) or their
    modeling file's ``eager_attention_forward``: that function is replaced for this model's layers."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    modules = {layer.self_attn for layer in decoder_layers(model)}
    implementation = model.config._attn_implementation
    modeling_file = sys.modules[type(next(iter(modules))).__module__]
    if implementation == "sdpa":
        own = ALL_ATTENTION_FUNCTIONS["sdpa"]
    elif implementation == "eager":
        own = modeling_file.eager_attention_forward
    else:
        raise ValueError(f"padded_attention supports attn_implementation 'sdpa' or 'eager', the model uses "
                         f"{implementation!r}")

    def padding_free_attention_function(module, query, key, value, attention_mask, **kwargs):
        if module not in modules:  # the replacement is process-wide: other models keep their own attention
            return own(module, query, key, value, attention_mask, **kwargs)
        if kwargs.get("sliding_window") or kwargs.get("softcap"):
            raise ValueError("padded_attention: sliding-window / softcap attention is not supported (use 'mask')")
        return attend(query, key, value, scale=kwargs.get("scaling"), dropout_p=kwargs.get("dropout", 0.0)), None

    if implementation == "sdpa":  # an instance-local entry overrides the global one; the old dict comes back
        local = {**ALL_ATTENTION_FUNCTIONS._local_mapping, "sdpa": padding_free_attention_function}
        replaced = patched_attribute(ALL_ATTENTION_FUNCTIONS, "_local_mapping", local)
    else:
        replaced = patched_attribute(modeling_file, "eager_attention_forward", padding_free_attention_function)
    with replaced:
        yield


def _sdpa_like(attend: PaddingFreeAttention):
    """An SDPA-signature function (Dream's SDPA call, LLaDA's block method) → ``(B, H, N, d)`` like SDPA."""

    def padding_free_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                          enable_gqa=False):  # the mask is the adapter's key padding; GQA is always handled
        return attend(query, key, value, scale=scale, dropout_p=dropout_p, is_causal=is_causal).transpose(1, 2)

    return padding_free_sdpa


@contextmanager
def _dream_route(model, attend: PaddingFreeAttention):
    """Dream's layers call ``torch.nn.functional.scaled_dot_product_attention``: replaced for the forward
    (Dream makes no other SDPA call)."""
    with patched_attribute(F, "scaled_dot_product_attention", _sdpa_like(attend)):
        yield


@contextmanager
def _llada_route(model, attend: PaddingFreeAttention):
    """Each LLaDA block calls its own ``_scaled_dot_product_attention``: replaced on every block instance."""
    padding_free_sdpa = _sdpa_like(attend)
    with ExitStack() as stack:
        for block in LLaDAFamily.blocks(model):
            stack.enter_context(patched_attribute(block, "_scaled_dot_product_attention", padding_free_sdpa))
        yield


_FAMILY_ROUTES = {"generic": _generic_route, "dream": _dream_route, "llada": _llada_route}


def padded_attention_route(family: str, model, attention_mask: Optional[torch.Tensor], setting: str):
    """A context manager routing every layer of ``model`` padding-free for one forward over a batch with
    ``attention_mask`` (None = no padding: nothing changes), as ``setting`` resolves on the model's device."""
    parameter = next(model.parameters())
    route = resolve_padded_attention(setting, parameter.device, parameter.dtype)
    if attention_mask is None or route == "mask":
        return nullcontext()
    return _FAMILY_ROUTES[family](model, PaddingFreeAttention(route, Unpadding.from_mask(attention_mask)))

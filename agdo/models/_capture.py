"""The capture: statistics from the q/k that the chosen layer's own attention call receives.

Each family hook (see ``agdo.models._families``) routes the chosen layer's attention call — an SDPA-like
``(q, k, v, mask) -> O`` — through :meth:`LayerCapture.attend`. The layer's OUTPUT is always the model's
own attention (``delegate()``: SDPA, eager, flash...), called exactly as without the hook, so the logits
of a forward are bitwise the same whether statistics are asked for or not (Max-S and Max-Prob decoding
see identical logits; gradients and dropout are untouched). The statistics are computed beside it, on
detached ``q``/``k`` and without gradient, with the public ``agdo_kernels`` calls (an S-only
``valid_attention`` pass, ``response_attention``, ``influence``), which never materialise ``H×N×N``.

Why not the fused ``valid_attention(return_output=True)`` for the output (what this module did before):
its output differs from SDPA's in the last bits, so the decoding arms that ask for ``S`` (Max-S) and those
that do not (Max-Prob) saw different logits; and routing every forward through the fused kernel instead
(to make them agree) would slow the normal forward, which on a GPU runs FlashAttention/cuDNN SDPA, faster
than the fused kernel, and would lose the backward. The S-only pass costs about half an attention forward
(no ``P·V``), on one layer, only in forwards that ask for statistics. A forward that wants the statistics
alone (``return_logits=False``: the order build) stops right after them (:class:`ForwardStopped`): the
layer's own attention and everything after it never run.

Head selection (``attention_heads``, resolved by :func:`resolve_heads`):

- ``"all"``: every query head (the paper; SPEC §1 ``Abar``);
- a list of query-head indices ``0 <= h < H``: ``Abar`` = mean over those heads only (GQA: head ``h`` reads
  kv head ``h // g``);
- ``"local"`` / ``"global"``: per sequence, each head's mean attention distance
  ``D_h = mean_{i real} sum_k P[h,i,k] * |i - k|`` (positions are indices; padded keys have ``P = 0``; real
  query rows only) is computed on the same forward (:func:`mean_attention_distance`, chunked over query
  rows, float32). Heads are sorted by ``(D_h, h)`` (stable: ties go to the lower index); ``"local"`` = the
  first ``H // 2``, ``"global"`` = the other ``H - H // 2`` (with odd ``H`` the extra head is global).
  The split is per sequence (batch row), so a sample's statistics never depend on its batch-mates.

Statistics are indexed by query ROW; the adapter maps rows to tokens (shift).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch

import agdo_kernels

ATTENTION_LAYERS = ("last", "first", "middle")
HEAD_SPLITS = ("all", "local", "global")


# ------------------------------------------------------------------------------ layer and head choice


def check_attention_layer(value) -> Union[str, int]:
    """``"last"`` | ``"first"`` | ``"middle"`` | an int layer index (negative counts from the end, as in
    Python). The range of an int is checked against the model by :func:`resolve_layer`."""
    if isinstance(value, bool) or not isinstance(value, (str, int)) or (isinstance(value, str)
                                                                         and value not in ATTENTION_LAYERS):
        raise ValueError(
            f"`attention_layer` must be one of {list(ATTENTION_LAYERS)} or an int layer index (negative counts "
            f"from the end), got {value!r}"
        )
    return value


def resolve_layer(value, num_layers: int) -> int:
    """The layer index ``0 <= i < num_layers`` that ``attention_layer`` names (``"middle"`` = ``L // 2``)."""
    check_attention_layer(value)
    if isinstance(value, str):
        return {"last": num_layers - 1, "first": 0, "middle": num_layers // 2}[value]
    if not -num_layers <= value < num_layers:
        raise ValueError(
            f"`attention_layer` = {value} is out of range for a model with {num_layers} layers "
            f"(valid: {-num_layers} .. {num_layers - 1})"
        )
    return value % num_layers


def check_attention_heads(value) -> Union[str, tuple]:
    """``"all"`` | ``"local"`` | ``"global"`` | a non-empty list of distinct query-head indices ``>= 0``
    (returned as a tuple). The range of the indices is checked against the model by :func:`resolve_heads`."""
    if isinstance(value, str):
        if value not in HEAD_SPLITS:
            raise ValueError(f"`attention_heads` must be one of {list(HEAD_SPLITS)} or a list of query-head "
                             f"indices, got {value!r}")
        return value
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"`attention_heads` must be one of {list(HEAD_SPLITS)} or a non-empty list of query-head "
                         f"indices, got {value!r}")
    if any(isinstance(h, bool) or not isinstance(h, int) or h < 0 for h in value):
        raise ValueError(f"`attention_heads` indices must be ints >= 0, got {list(value)}")
    if len(set(value)) != len(value):
        raise ValueError(f"`attention_heads` indices must be distinct, got {list(value)}")
    return tuple(value)


def resolve_heads(value, num_heads: int) -> Union[str, tuple]:
    """``attention_heads`` checked against ``H`` query heads: the split name or a tuple of indices."""
    value = check_attention_heads(value)
    if isinstance(value, tuple) and max(value) >= num_heads:
        raise ValueError(f"`attention_heads` {list(value)} has an index >= H = {num_heads} (the query heads)")
    if value in ("local", "global") and num_heads < 2:
        raise ValueError(f"`attention_heads` = {value!r} needs at least 2 query heads, the model has {num_heads}")
    return value


def mean_attention_distance(q, k, attention_mask=None, scale=None, max_elements: int = 1 << 24) -> torch.Tensor:
    """``D (B, H)`` float32: per head, ``mean over real query rows i of sum_k P[h,i,k] * |i - k|``.

    ``q (B, H, N, d)``, ``k (B, Hkv, N, d)`` (GQA: head ``h`` reads kv head ``h // g``). Computed in chunks of
    query rows so that at most ``max_elements`` probabilities exist at once (never ``H×N×N`` for long
    sequences). Rows without a real key, and batch rows without a real query, give 0.
    """
    B, H, N, d = q.shape
    Hkv = k.shape[1]
    g = H // Hkv
    scale = d**-0.5 if scale is None else scale
    qf = q.float().reshape(B, Hkv, g, N, d)
    kf = k.float()
    position = torch.arange(N, device=q.device)
    total = torch.zeros(B, Hkv, g, dtype=torch.float32, device=q.device)
    chunk = max(1, max_elements // max(1, B * H * N))
    for start in range(0, N, chunk):
        rows = slice(start, min(N, start + chunk))
        logits = torch.einsum("bjgcd,bjnd->bjgcn", qf[:, :, :, rows], kf) * scale
        if attention_mask is not None:
            logits = logits.masked_fill(~attention_mask[:, None, None, None, :], float("-inf"))
        probs = torch.nan_to_num(torch.softmax(logits, dim=-1), nan=0.0)
        distance = (position[rows, None] - position[None, :]).abs().float()
        per_row = (probs * distance).sum(-1)  # (B, Hkv, g, C)
        if attention_mask is not None:
            per_row = per_row * attention_mask[:, None, None, rows]
        total += per_row.sum(-1)
    count = N if attention_mask is None else attention_mask.sum(-1).clamp_min(1).float()[:, None]
    return total.reshape(B, H) / count


def head_split(distance: torch.Tensor, which: str) -> torch.Tensor:
    """``(B, H')`` indices of the ``"local"`` (first ``H // 2`` by ``(D, h)``) or ``"global"`` (the rest) heads."""
    order = torch.sort(distance, dim=-1, stable=True).indices
    half = distance.shape[-1] // 2
    return order[:, :half] if which == "local" else order[:, half:]


def select_heads(q, k, heads, *, attention_mask=None, scale=None):
    """``(q', k')`` with ``H'`` query heads and the kv head of each (``k'`` has ``H'`` heads, GQA group 1),
    or ``(q, k)`` unchanged for ``"all"``; the kernels' head mean is then the mean over the chosen heads."""
    if heads == "all":
        return q, k
    _, H, N, d = q.shape
    g = H // k.shape[1]
    if isinstance(heads, tuple):
        index = torch.tensor(heads, dtype=torch.long, device=q.device)
        return q[:, index], k[:, torch.div(index, g, rounding_mode="floor")]
    index = head_split(mean_attention_distance(q, k, attention_mask, scale), heads)  # (B, H')
    expand = (-1, -1, N, d)
    return (q.gather(1, index[:, :, None, None].expand(*expand)),
            k.gather(1, torch.div(index, g, rounding_mode="floor")[:, :, None, None].expand(*expand)))


# ------------------------------------------------------------------------------------------ capture


@dataclass(frozen=True)
class StatisticsRequest:
    """What to compute on the chosen layer. Masks are bool ``(B, N)``; rows/keys are positions."""

    attention_mask: Optional[torch.Tensor]  # False at padding; None = no padding
    unmasked: Optional[torch.Tensor]  # key set U for S; None = S not asked
    response_start: Optional[int]  # P for (S0, Abar_RR); None = not asked
    influence_rows: Optional[torch.Tensor]  # valid query ROWS for I; None = I not asked
    influence_norm: str
    shift: bool
    num_heads: int  # expected H, to catch a hook on the wrong tensor
    backend: str
    heads: Union[str, tuple] = "all"  # resolved `attention_heads` (see resolve_heads)
    layer: int = -1  # resolved layer index, for messages
    stop_forward: bool = False  # raise ForwardStopped once the statistics are in: nothing after them is needed


class ForwardStopped(Exception):
    """Raised by the capture of a statistics-only forward (``AdapterOutput.logits`` not asked) right after the
    chosen layer's statistics: the layer's own attention, the layers after it and the LM head never run. The
    adapter catches it; the hooks are context managers that undo themselves on the way out."""


@dataclass
class LayerStatistics:
    s_rows: Optional[torch.Tensor] = None  # (B, N) S of every query row
    s0: Optional[torch.Tensor] = None
    abar_rr: Optional[torch.Tensor] = None
    influence: Optional[torch.Tensor] = None  # (B, N) per key


LastLayerStatistics = LayerStatistics  # the name before the layer became a choice


def _allowed_keys(attn_mask: torch.Tensor) -> torch.Tensor:
    """Boolean "may attend" view of a boolean or additive float attention mask."""
    if attn_mask.dtype == torch.bool:
        return attn_mask
    return attn_mask > torch.finfo(attn_mask.dtype).min / 2


def check_key_padding_only(attn_mask, is_causal, attention_mask, where: str) -> None:
    """The statistics assume bidirectional attention masked only at padded keys: check the layer agrees."""
    if attn_mask is None:
        if is_causal:
            raise ValueError(
                f"{where}: the hooked layer attends causally (is_causal=True); AGDO statistics need a bidirectional "
                "model (set `config.is_causal = False`, or `is_causal = False` on the attention modules)"
            )
        return
    # The first and last query rows are enough to catch a causal or sliding-window mask, and keep the check
    # O(B * N) instead of materialising (B, N, N) booleans.
    rows = attn_mask.shape[-2]
    edges = [0, rows - 1] if rows > 1 else [0]
    allowed = _allowed_keys(attn_mask[..., edges, :])
    B, N = allowed.shape[0], allowed.shape[-1]
    keys = torch.ones(B, N, dtype=torch.bool, device=allowed.device) if attention_mask is None else attention_mask
    # Rows of padded queries are not compared: models differ there (key-only vs row-and-column masks).
    # A single mask row is broadcast to every query, so it is always compared. With a KV cache the query
    # rows are the last `rows` keys (agdo.models._block_cache).
    query_positions = [N - rows + edge for edge in edges]
    query_real = keys[:, query_positions] if rows > 1 else torch.ones(B, 1, dtype=torch.bool, device=keys.device)
    wrong = (allowed != keys[:, None, None, :]) & query_real[:, None, :, None]
    if bool(wrong.any()):
        raise ValueError(
            f"{where}: the hooked layer's attention mask is not bidirectional key padding (causal, sliding-window "
            "or packed masks are not supported by the capture)"
        )


def _check_cached_request(request: StatisticsRequest, where: str) -> None:
    """With a KV cache the layer's queries are only the last keys: ``S`` (``valid_attention`` takes fewer
    queries than keys) is all that can be computed; the other statistics need every query row."""
    unsupported = []
    if request.response_start is not None:
        unsupported.append("response_start")
    if request.influence_rows is not None:
        unsupported.append("influence_query_mask")
    if request.heads in ("local", "global"):  # the head split measures distances between query and key rows
        unsupported.append(f"attention_heads={request.heads!r}")
    if unsupported:
        raise ValueError(f"{where}: {', '.join(unsupported)} not supported with a KV cache (fewer query rows than "
                         "keys); only `unmasked` (S) is")


class LayerCapture:
    """Computes the requested statistics during the (single) attention call of the chosen layer in one forward."""

    def __init__(self, request: StatisticsRequest, where: str):
        self.request = request
        self.where = where
        self.statistics: Optional[LayerStatistics] = None

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        attn_mask: Optional[torch.Tensor],
        is_causal: bool,
        dropout_p: float,
        scale: Optional[float],
        delegate: Callable[[], torch.Tensor],
        to_output: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    ) -> torch.Tensor:
        """Statistics for ``q (B, H, N, d)``, ``k, v (B, Hkv, N, d)`` (post-RoPE); returns ``delegate()``.
        With a KV cache ``q`` holds only the last ``Nq < N`` key positions (then only ``S`` can be asked).

        ``delegate()`` runs the model's own attention and returns its output as the model expects it; it is
        the layer's output whatever is asked (``to_output`` is accepted for older hooks and unused).
        """
        request = self.request
        if self.statistics is not None:
            raise RuntimeError(f"{self.where}: the hooked attention of layer {request.layer} ran twice in one forward")
        if q.shape[1] != request.num_heads:
            raise RuntimeError(
                f"{self.where}: captured q has {q.shape[1]} heads, the config says {request.num_heads}; "
                "the hook is on the wrong tensor"
            )
        check_key_padding_only(attn_mask, is_causal, request.attention_mask, self.where)
        if q.shape[-2] < k.shape[-2]:  # fed rows against cached keys: the kernels below take a key-long S only
            _check_cached_request(request, self.where)

        statistics = LayerStatistics()
        with torch.no_grad():
            common = dict(attention_mask=request.attention_mask, scale=scale, backend=request.backend)
            q, k = select_heads(q.detach(), k.detach(), request.heads, attention_mask=request.attention_mask,
                                scale=scale)
            lse = None
            if request.unmasked is not None:
                statistics.s_rows, _, lse = agdo_kernels.valid_attention(
                    q, k, unmasked=request.unmasked, return_lse=True, **common
                )
            if request.response_start is not None:
                response = agdo_kernels.response_attention(
                    q, k, response_start=request.response_start, shift=request.shift, **common
                )
                statistics.s0, statistics.abar_rr = response.s0, response.abar_rr
                lse = response.lse  # the same rows' lse: influence below needs no pass of its own
            if request.influence_rows is not None:
                statistics.influence = agdo_kernels.influence(
                    q, k, lse=lse, query_mask=request.influence_rows, norm=request.influence_norm, **common
                )
        self.statistics = statistics
        if request.stop_forward:
            raise ForwardStopped
        return delegate()

    def result(self) -> LayerStatistics:
        if self.statistics is None:
            raise RuntimeError(
                f"{self.where}: the forward finished without calling the hooked attention of layer "
                f"{self.request.layer}; this model's attention code is not the one the adapter hooks (see "
                "agdo.models for what each family expects)"
            )
        return self.statistics


LastLayerCapture = LayerCapture  # the name before the layer became a choice

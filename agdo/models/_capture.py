"""The last-layer capture: statistics from the q/k that the model's own attention call receives.

Each family hook (see ``agdo.models._families``) routes the last layer's attention call — an SDPA-like
``(q, k, v, mask) -> O`` — through :meth:`LastLayerCapture.attend`, which computes the statistics asked
for with the public ``agdo_kernels`` calls and returns the layer's output ``O``:

- only ``S`` asked, no gradient needed, no dropout: ``valid_attention(..., return_output=True)`` gives
  ``O`` and ``S`` from one pass and its ``O`` replaces the model's;
- otherwise the model's own attention computes ``O`` (so it carries gradient / dropout as usual) and the
  statistics are computed beside it on detached ``q``/``k``.

Statistics are always computed without gradient. They are indexed by query ROW; the adapter maps rows
to tokens (shift).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

import agdo_kernels


@dataclass(frozen=True)
class StatisticsRequest:
    """What to compute on the last layer. Masks are bool ``(B, N)``; rows/keys are positions."""

    attention_mask: Optional[torch.Tensor]  # False at padding; None = no padding
    unmasked: Optional[torch.Tensor]  # key set U for S; None = S not asked
    response_start: Optional[int]  # P for (S0, Abar_RR); None = not asked
    influence_rows: Optional[torch.Tensor]  # valid query ROWS for I; None = I not asked
    influence_norm: str
    shift: bool
    num_heads: int  # expected H, to catch a hook on the wrong tensor
    backend: str


@dataclass
class LastLayerStatistics:
    s_rows: Optional[torch.Tensor] = None  # (B, N) S of every query row
    s0: Optional[torch.Tensor] = None
    abar_rr: Optional[torch.Tensor] = None
    influence: Optional[torch.Tensor] = None  # (B, N) per key


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
                f"{where}: the last layer attends causally (is_causal=True); AGDO statistics need a bidirectional "
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
    # A single mask row is broadcast to every query, so it is always compared.
    query_real = keys[:, edges] if rows > 1 else torch.ones(B, 1, dtype=torch.bool, device=keys.device)
    wrong = (allowed != keys[:, None, None, :]) & query_real[:, None, :, None]
    if bool(wrong.any()):
        raise ValueError(
            f"{where}: the last layer's attention mask is not bidirectional key padding (causal, sliding-window "
            "or packed masks are not supported by the capture)"
        )


class LastLayerCapture:
    """Computes the requested statistics during the (single) last-layer attention call of one forward."""

    def __init__(self, request: StatisticsRequest, where: str):
        self.request = request
        self.where = where
        self.statistics: Optional[LastLayerStatistics] = None

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
        to_output: Callable[[torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """Statistics for ``q (B, H, N, d)``, ``k, v (B, Hkv, N, d)`` (post-RoPE); returns the layer's output.

        ``delegate()`` runs the model's own attention and returns its output as the model expects it;
        ``to_output(O)`` converts a ``(B, H, N, d)`` output to that same form.
        """
        request = self.request
        if self.statistics is not None:
            raise RuntimeError(f"{self.where}: the last layer's attention ran twice in one forward")
        if q.shape[1] != request.num_heads:
            raise RuntimeError(
                f"{self.where}: captured q has {q.shape[1]} heads, the config says {request.num_heads}; "
                "the hook is on the wrong tensor"
            )
        check_key_padding_only(attn_mask, is_causal, request.attention_mask, self.where)

        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        fused = request.unmasked is not None and not needs_grad and not dropout_p
        statistics = LastLayerStatistics()
        out = None
        with torch.no_grad():
            q, k = q.detach(), k.detach()
            common = dict(attention_mask=request.attention_mask, scale=scale, backend=request.backend)
            lse = None
            if request.unmasked is not None:
                statistics.s_rows, out, lse = agdo_kernels.valid_attention(
                    q, k, v if fused else None, unmasked=request.unmasked,
                    return_output=fused, return_lse=True, **common,
                )
            if request.response_start is not None:
                statistics.s0, statistics.abar_rr = agdo_kernels.response_attention(
                    q, k, response_start=request.response_start, shift=request.shift, **common
                )
            if request.influence_rows is not None:
                statistics.influence = agdo_kernels.influence(
                    q, k, lse=lse, query_mask=request.influence_rows, norm=request.influence_norm, **common
                )
        self.statistics = statistics
        return to_output(out) if fused else delegate()

    def result(self) -> LastLayerStatistics:
        if self.statistics is None:
            raise RuntimeError(
                f"{self.where}: the forward finished without calling the hooked last-layer attention; this model's "
                "attention code is not the one the adapter hooks (see agdo.models for what each family expects)"
            )
        return self.statistics

"""agdo_kernels: head-averaged attention statistics for diffusion LMs, without materialising H x N x N.

Public calls (tensors in, tensors out; nothing here knows about models or training):

- :func:`valid_attention` — valid attention ``S`` (and optionally SDPA's output ``O`` and ``lse``)
- :func:`influence` — influence ``I`` of every key
- :func:`response_attention` — ``S0`` and ``Abar_RR`` for the response block
- :func:`greedy_order` — batched greedy attention-guided denoising order (Algorithm 1)
- :func:`dense_steps` — the step numbering of any order: ``(block, rank)`` pairs → dense steps

Every call takes ``backend="auto" | "torch" | "triton" | "cuda"``; see :func:`available_backends`.
Triton launches use one pinned config per (kernel, dtype, head dim) unless :func:`set_deterministic`
``(False)`` lets fp16/bf16 autotune (faster tiles, but the summation order may then differ between runs).
:func:`set_warp_specialize` ``(True)`` opts ``influence`` into its Hopper warp-specialised variant (untimed yet).

Non-finite values (the same rule on every backend, applied here after the backend ran):

- ``valid_attention``/``influence``/``response_attention``: a batch row ``b`` whose inputs hold a NaN or an
  infinity anywhere (``q[b]``, ``k[b]``, ``v[b]`` when the output is returned, a given ``lse[b]``; padded
  positions included), or whose statistics overflow, comes back as NaN in EVERY output of that row
  (``s``/``out``/``lse``, ``I``, ``s0``/``abar_rr``); other rows are unaffected. Never finite on one
  backend and NaN on another. No host synchronisation is needed for this. A backend module whose
  ``POISONS_NONFINITE_ROWS`` is True applies the rule inside its ``valid_attention``/``influence_sum``
  (Triton: fused into its launches); for the others it is applied here.
- ``greedy_order``: a NaN score counts as ``-inf`` when picking; tokens whose score is ``-inf`` (or NaN)
  are picked after every token with a larger score, lowest position first. Every valid token still gets
  exactly one step (dense steps), ``-1`` exactly where not ``valid``.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from . import _backends, _checks
from ._backends import deterministic, set_deterministic, set_warp_specialize, warp_specialize

__all__ = [
    "valid_attention",
    "influence",
    "response_attention",
    "greedy_order",
    "dense_steps",
    "available_backends",
    "set_deterministic",
    "deterministic",
    "set_warp_specialize",
    "warp_specialize",
    "ValidAttention",
    "ResponseAttention",
]


class ValidAttention(NamedTuple):
    s: torch.Tensor
    out: Optional[torch.Tensor]
    lse: Optional[torch.Tensor]


class ResponseAttention(NamedTuple):
    s0: torch.Tensor
    abar_rr: torch.Tensor
    lse: torch.Tensor


def _poisons_nonfinite_rows(impl) -> bool:
    return getattr(impl, "POISONS_NONFINITE_ROWS", False)


def available_backends(device="cuda") -> dict:
    """``{backend: None if usable on ``device`` else the reason it is not}`` for every op."""
    device = torch.device(device)
    report = {}
    for op in ("valid_attention", "influence", "response_attention", "greedy_order"):
        report[op] = {}
        for backend in _backends.BACKENDS[1:]:
            try:
                _backends.resolve(backend, device, op)
                report[op][backend] = None
            except ValueError as err:
                report[op][backend] = str(err)
    return report


def valid_attention(
    q,
    k,
    v=None,
    *,
    unmasked,
    attention_mask=None,
    scale=None,
    return_output=False,
    return_lse=False,
    backend="auto",
):
    """Valid attention ``S_i = sum_{k in U} Abar[i, k]`` (AGDO Eq. 6), head-averaged, float32.

    Args:
        q: ``(B, H, Nq, d)``; k, v: ``(B, Hkv, N, d)`` with ``H % Hkv == 0`` (GQA) and ``Nq <= N``: the query
            rows are the LAST ``Nq`` key positions (``Nq = N`` is ordinary self-attention; ``Nq < N`` is a
            block decoded against cached keys, query row ``i`` being key ``N - Nq + i``).
        unmasked: bool ``(B, N)``, True where the key is in ``U``.
        attention_mask: bool ``(B, N)``, False at padding (keys get ``-inf``; padded rows get ``S = 0``).
        scale: softmax scale, default ``1/sqrt(d)``.
        return_output / return_lse: also return SDPA's output ``O (B, H, N, d)`` (dtype of ``q``) and the
            natural-log row ``lse (B, H, N)`` from the same pass.

    Returns:
        ``S (B, Nq)`` alone, or ``ValidAttention(s, out, lse)`` with ``None`` for what was not asked (``out``
        ``(B, H, Nq, dv)``, ``lse (B, H, Nq)``).
        Rows without any real key give zeros (``lse = 0``), never NaN. A batch row with a NaN/inf input
        (or an overflow) is NaN in every output (module docstring).
    """
    B, H, Hkv, N, d = _checks.check_qk(q, k, v, fewer_queries=True)
    if return_output and v is None:
        raise ValueError("`v` is required when `return_output=True`")
    unmasked = _checks.check_mask(unmasked, "unmasked", B, N, q.device, required=True)
    attention_mask = _checks.check_mask(attention_mask, "attention_mask", B, N, q.device)
    scale = _checks.check_scale(scale, d)
    impl = _backends.module(_backends.resolve(backend, q.device, "valid_attention", q))
    s, out, lse = impl.valid_attention(
        q, k, v if return_output else None, unmasked, attention_mask, scale, bool(return_output), bool(return_lse)
    )
    if not _poisons_nonfinite_rows(impl):
        # O is not scanned: from finite inputs it is a convex mix of V rows, and an overflow of the logits
        # already makes S non-finite.
        bad = _checks.nonfinite_rows(B, q, k, v if return_output else None, s, lse)
        s, out, lse = _checks.poison_rows(bad, s, out, lse)
    if not (return_output or return_lse):
        return s
    return ValidAttention(s, out, lse)


def influence(q, k, *, lse=None, attention_mask=None, query_mask=None, norm="sum", scale=None, backend="auto"):
    """Influence ``I_k = sum_{i valid} Abar[i, k]`` (AGDO Eq. 8), float32 ``(B, N)``.

    Valid rows are those with ``attention_mask`` and ``query_mask`` both True. ``lse (B, H, N)`` from
    :func:`valid_attention` saves a pass. ``norm``: ``"sum"`` (Eq. 8 literally; the default, SPEC §2),
    ``"mean"`` (divide by the number of valid rows, so ``sum_k I_k = 1``), ``"max"`` (divide by the largest
    ``I`` over valid keys). A batch row with a NaN/inf in ``q``, ``k`` or ``lse`` (or an overflow)
    is all NaN (module docstring).
    """
    B, H, Hkv, N, d = _checks.check_qk(q, k)
    attention_mask = _checks.check_mask(attention_mask, "attention_mask", B, N, q.device)
    query_mask = _checks.check_mask(query_mask, "query_mask", B, N, q.device)
    lse = _checks.check_lse(lse, B, H, N, q.device)
    _checks.check_choice(norm, "norm", _checks.INFLUENCE_NORMS)
    scale = _checks.check_scale(scale, d)
    impl = _backends.module(_backends.resolve(backend, q.device, "influence", q))
    poisons = _poisons_nonfinite_rows(impl)
    bad = None if poisons else _checks.nonfinite_rows(B, q, k, lse)
    if lse is None:
        no_keys = torch.zeros(B, N, dtype=torch.bool, device=q.device)
        lse = impl.valid_attention(q, k, None, no_keys, attention_mask, scale, False, True)[2]
    total = impl.influence_sum(q, k, lse, attention_mask, query_mask, scale)
    if not poisons:
        bad = bad | _checks.nonfinite_rows(B, lse, total)
    if norm == "mean":
        rows = torch.ones(B, N, dtype=torch.bool, device=q.device)
        for mask in (attention_mask, query_mask):
            if mask is not None:
                rows = rows & mask
        total = total / rows.sum(-1, keepdim=True).clamp_min(1).to(total.dtype)
    elif norm == "max":
        total = total / total.amax(-1, keepdim=True).clamp_min(torch.finfo(total.dtype).tiny)
    # A row poisoned by the backend stays NaN through either norm (NaN / x, x / NaN).
    return total if poisons else _checks.poison_rows(bad, total)[0]


def response_attention(q, k, *, response_start, attention_mask=None, shift=False, scale=None, backend="auto"):
    """Response-block statistics for the greedy order (AGDO Alg. 1 inputs), float32.

    With ``P = response_start`` and ``R = N - P``, the predictor row of token ``P + i`` is ``P + i - 1``
    when ``shift`` (Dream) and ``P + i`` otherwise (LLaDA). Returns ``ResponseAttention(s0, abar_rr, lse)``:
    ``s0 (B, R)`` = mass of each predictor row on the prompt keys, ``abar_rr (B, R, R)`` =
    head-averaged probabilities of predictor rows on response keys, ``lse (B, H, N)`` = every row's
    log-sum-exp from the same pass (pass it to :func:`influence` to save that pass). Rows whose token or
    predictor row is padding are zeros. Memory ``O(B * R^2)``. On the Triton backend ``abar_rr`` is a
    transposed view of a column-major buffer (what :func:`greedy_order` reads without a copy): use
    ``reshape``, not ``view``. A batch row with a NaN/inf in ``q`` or ``k`` (or an overflow) is all NaN in
    every output (module docstring).
    """
    B, H, Hkv, N, d = _checks.check_qk(q, k)
    attention_mask = _checks.check_mask(attention_mask, "attention_mask", B, N, q.device)
    P = _checks.check_response_start(response_start, N, bool(shift))
    scale = _checks.check_scale(scale, d)
    impl = _backends.module(_backends.resolve(backend, q.device, "response_attention", q))
    prompt = (torch.arange(N, device=q.device) < P).expand(B, N)
    s, _, lse = impl.valid_attention(q, k, None, prompt, attention_mask, scale, False, True)
    abar_rr = impl.response_block(q, k, lse, P, attention_mask, bool(shift), scale)
    pred = torch.arange(P, N, device=q.device) - int(bool(shift))
    s0 = s[:, pred]
    if attention_mask is not None:
        rows_valid = attention_mask[:, P:] & attention_mask[:, pred]
        s0 = s0 * rows_valid
        abar_rr.mul_(rows_valid[:, :, None])  # in place: keeps the backend's layout
    # A backend that poisons rows already turned non-finite q/k into NaN rows of s and lse.
    bad = _checks.nonfinite_rows(B, *(() if _poisons_nonfinite_rows(impl) else (q, k)), s, lse, abar_rr)
    return ResponseAttention(*_checks.poison_rows(bad, s0, abar_rr, lse))


def greedy_order(abar_rr, s0, *, valid, step_size, block_size=None, block_mode="global", backend="auto"):
    """Batched greedy attention-guided order (AGDO Algorithm 1) → ``step (B, R)`` int32.

    ``S = s0``; each round picks the ``step_size`` valid, unpicked tokens with the largest ``S`` (ties:
    lower position first), gives them the round's rank and adds their columns ``abar_rr[:, :, j]`` to ``S``.
    Tokens are then ordered by ``(position // block_size, rank)`` and the distinct pairs numbered densely
    ``0..T_b-1``; ``-1`` where not ``valid``. ``block_mode="within"`` runs the greedy block by block
    (earlier blocks already in ``U``), an extension beyond the paper.

    Non-finite scores: a NaN in ``S`` (from ``s0`` or ``abar_rr``) counts as ``-inf`` when picking, and
    ``-inf`` tokens are picked after every larger score, lowest position first; so every valid token is
    ordered exactly once, whatever the values, and every backend gives the same steps.
    """
    B, R, valid = _checks.check_greedy(abar_rr, s0, valid)
    step_size = _checks.check_positive_int(step_size, "step_size")
    block_size = _checks.check_positive_int(block_size, "block_size", allow_none=True)
    _checks.check_choice(block_mode, "block_mode", _checks.BLOCK_MODES)
    impl = _backends.module(_backends.resolve(backend, abar_rr.device, "greedy_order"))
    return impl.greedy_order(abar_rr, s0, valid, step_size, block_size, block_mode)


def dense_steps(rank, *, block_size=None):
    """Number each row's ``(position // block_size, rank)`` pairs densely in increasing order → int32.

    The step numbering of Algorithm 1 (lines 11-15) that :func:`greedy_order` ends with, for any order:
    ``rank (B, R)`` integers, ``-1`` where the token is not ordered (it stays ``-1``). Equal ranks in one
    block share a step. Runs on the tensors' device with plain torch ops.
    """
    _checks.check_tensor(rank, "rank", 2, "(B, R)", dtypes=(torch.int16, torch.int32, torch.int64))
    block_size = _checks.check_positive_int(block_size, "block_size", allow_none=True)
    return _backends.module("torch").dense_steps(rank, block_size)

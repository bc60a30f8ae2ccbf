"""Argument validation shared by every backend: one place for the error messages.

Every public call validates here first, so the backends receive tensors of known rank, dtype and
device, boolean masks (or ``None``) and a float ``scale``.
"""

from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INFLUENCE_NORMS = ("sum", "mean", "max")
BLOCK_MODES = ("global", "within")


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def check_tensor(t, name: str, ndim: int, layout: str, dtypes=FLOAT_DTYPES) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor of shape {layout}, got {type(t).__name__}")
    if t.ndim != ndim:
        raise ValueError(f"`{name}` must have shape {layout} ({ndim} dims), got {_describe(t)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"`{name}` must have dtype in ({names}), got {_describe(t)}")
    return t


def check_qk(q, k, v=None, *, fewer_queries: bool = False):
    """Validate attention inputs; returns ``(B, H, Hkv, N, d)`` with ``N`` the number of KEYS.

    ``fewer_queries``: ``q`` may hold only the last ``Nq <= N`` positions (a block decoded against cached keys).
    """
    check_tensor(q, "q", 4, "(B, H, N, d)")
    check_tensor(k, "k", 4, "(B, Hkv, N, d)")
    B, H, Nq, d = q.shape
    N = k.shape[2] if fewer_queries else Nq
    if H == 0:
        raise ValueError(f"`q` must have at least one head, shape (B, H >= 1, N, d); got {tuple(q.shape)}")
    if fewer_queries and k.shape[2] < Nq:
        raise ValueError(
            f"`k` must have shape (B, Hkv, N >= {Nq}, d): `q`'s {Nq} rows are the last keys (queries must be the "
            f"last keys), got {tuple(k.shape)}"
        )
    if k.shape[0] != B or k.shape[2] != N or k.shape[3] != d:
        raise ValueError(
            f"`k` must have shape (B={B}, Hkv, N={N}, d={d}) to match `q` {tuple(q.shape)}, "
            f"got {tuple(k.shape)}"
        )
    Hkv = k.shape[1]
    if Hkv == 0:
        raise ValueError(f"`k` must have at least one head, shape (B, Hkv >= 1, N, d); got {tuple(k.shape)}")
    if H % Hkv != 0:
        raise ValueError(f"`q` heads H={H} must be a multiple of `k` heads Hkv={Hkv} (GQA)")
    if k.dtype != q.dtype:
        raise TypeError(f"`k` dtype {k.dtype} must equal `q` dtype {q.dtype}")
    if k.device != q.device:
        raise ValueError(f"`k` is on {k.device} but `q` is on {q.device}")
    if v is not None:
        check_tensor(v, "v", 4, "(B, Hkv, N, d)")
        if tuple(v.shape[:3]) != (B, Hkv, N):
            raise ValueError(f"`v` must have shape (B={B}, Hkv={Hkv}, N={N}, d), got {tuple(v.shape)}")
        if v.dtype != q.dtype:
            raise TypeError(f"`v` dtype {v.dtype} must equal `q` dtype {q.dtype}")
        if v.device != q.device:
            raise ValueError(f"`v` is on {v.device} but `q` is on {q.device}")
    return B, H, Hkv, N, d


def check_mask(mask, name: str, B: int, N: int, device, required: bool = False):
    """A ``(B, N)`` boolean (or 0/1 integer) mask; returns a bool tensor, or None when absent."""
    if mask is None:
        if required:
            raise ValueError(f"`{name}` is required: a boolean tensor of shape (B={B}, N={N})")
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"`{name}` must be a boolean torch.Tensor of shape (B={B}, N={N}), got {type(mask).__name__}")
    if mask.dtype.is_floating_point or mask.dtype.is_complex:
        raise TypeError(f"`{name}` must be boolean (or 0/1 integers), got {_describe(mask)}")
    if tuple(mask.shape) != (B, N):
        raise ValueError(f"`{name}` must have shape (B={B}, N={N}), got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"`{name}` is on {mask.device} but the attention inputs are on {device}")
    return mask if mask.dtype == torch.bool else mask != 0


def check_scale(scale, d: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(d) if d > 0 else 1.0
    if isinstance(scale, torch.Tensor) or not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise TypeError(f"`scale` must be a Python float or None, got {type(scale).__name__}")
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"`scale` must be a finite positive float, got {scale}")
    return float(scale)


def check_lse(lse, B: int, H: int, N: int, device):
    if lse is None:
        return None
    check_tensor(lse, "lse", 3, f"(B={B}, H={H}, N={N})", dtypes=(torch.float32, torch.float64))
    if tuple(lse.shape) != (B, H, N):
        raise ValueError(f"`lse` must have shape (B={B}, H={H}, N={N}), got {tuple(lse.shape)}")
    if lse.device != device:
        raise ValueError(f"`lse` is on {lse.device} but `q` is on {device}")
    return lse


def check_choice(value, name: str, choices) -> str:
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {list(choices)}, got {value!r}")
    return value


def check_positive_int(value, name: str, allow_none: bool = False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` must be an int >= 1, got {value!r}")
    if value < 1:
        raise ValueError(f"`{name}` must be >= 1, got {value}")
    return value


def check_response_start(response_start, N: int, shift: bool) -> int:
    if isinstance(response_start, bool) or not isinstance(response_start, int):
        raise TypeError(
            f"`response_start` must be a Python int (prompts are left-padded, so the response starts "
            f"at the same index in every row), got {type(response_start).__name__}"
        )
    low = 1 if shift else 0
    if not low <= response_start <= N:
        need = "1 <= response_start <= N (shift=True: token P is predicted by row P-1)" if shift else "0 <= response_start <= N"
        raise ValueError(f"`response_start` must satisfy {need} with N={N}, got {response_start}")
    return response_start


def check_greedy(abar_rr, s0, valid):
    """Validate greedy-order inputs; returns ``(B, R)`` and the bool ``valid``."""
    check_tensor(abar_rr, "abar_rr", 3, "(B, R, R)", dtypes=(torch.float32, torch.float64))
    B, R, R2 = abar_rr.shape
    if R != R2:
        raise ValueError(f"`abar_rr` must be square in its last two dims, shape (B, R, R); got {tuple(abar_rr.shape)}")
    check_tensor(s0, "s0", 2, f"(B={B}, R={R})", dtypes=(torch.float32, torch.float64))
    if tuple(s0.shape) != (B, R):
        raise ValueError(f"`s0` must have shape (B={B}, R={R}), got {tuple(s0.shape)}")
    if s0.device != abar_rr.device:
        raise ValueError(f"`s0` is on {s0.device} but `abar_rr` is on {abar_rr.device}")
    valid = check_mask(valid, "valid", B, R, abar_rr.device, required=True)
    return B, R, valid


def empty_valid_attention(q: torch.Tensor, dv: int, return_output: bool, return_lse: bool):
    """``(s, out, lse)`` of a call with no query row (``B * H * Nq == 0``): zeros of the right shapes."""
    B, H, Nq = q.shape[:3]
    s = torch.zeros(B, Nq, dtype=torch.float32, device=q.device)
    out = torch.zeros(B, H, Nq, dv, dtype=q.dtype, device=q.device) if return_output else None
    lse = torch.zeros(B, H, Nq, dtype=torch.float32, device=q.device) if return_lse else None
    return s, out, lse


def nonfinite_rows(B: int, *tensors) -> torch.Tensor:
    """``(B,)`` bool: True for a batch row where any of ``tensors`` (leading dim ``B``; ``None`` skipped)
    holds a NaN or an infinity. Runs on the tensors' device, no host sync.

    One min/max pass per tensor (NaN propagates through both, an infinity shows in one of them), then one
    finiteness test over all of them: no copy of a tensor, few launches (this runs on every call)."""
    extremes = []
    for t in tensors:
        if t is not None and t.numel():
            extremes += [e.double() for e in torch.aminmax(t.reshape(B, -1), dim=1)]
    if not extremes:
        device = next((t.device for t in tensors if t is not None), None)
        return torch.zeros(B, dtype=torch.bool, device=device)
    return ~torch.isfinite(torch.stack(extremes)).all(dim=0)


def poison_rows(bad: torch.Tensor, *outputs):
    """``outputs`` with every element of the ``bad`` batch rows set to NaN (``None`` passes through).

    In place on the fresh outputs of a backend (no copy of a large ``O``), out of place under autograd."""
    result = []
    for t in outputs:
        if t is not None:
            row = bad.reshape((-1,) + (1,) * (t.ndim - 1))
            t = t.masked_fill(row, float("nan")) if t.requires_grad else t.masked_fill_(row, float("nan"))
        result.append(t)
    return result

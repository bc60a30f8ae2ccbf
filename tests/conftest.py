"""Shared test helpers: which backends run here, and a naive float64 oracle for the attention statistics.

The oracle materialises the full ``(B, H, N, N)`` probabilities in float64 — the opposite of what the
kernels and the chunked reference do — so it is an independent judge.
"""

import os

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _triton_runs_here() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return DEVICE.type == "cuda" or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


BACKENDS = ["torch"] + (["triton"] if _triton_runs_here() else [])
# The Triton interpreter mis-computes tl.dot on bf16: bf16 only on a GPU.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE.type == "cuda" else [])


def random_qkv(B, H, Hkv, N, d, dtype=torch.float32, magnitude=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, N, d, generator=gen) for h in (H, Hkv, Hkv))
    q = q * magnitude
    return q.to(DEVICE, dtype), k.to(DEVICE, dtype), v.to(DEVICE, dtype)


def padding_mask(B, N, pattern, seed=0):
    """A ``(B, N)`` attention mask: 'none', 'left', 'right', 'both' (different per row), 'empty_row'."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, N, dtype=torch.bool)
    for b in range(B):
        left = int(torch.randint(0, max(N // 3, 1), (1,), generator=gen)) if pattern in ("left", "both") else 0
        right = int(torch.randint(0, max(N // 3, 1), (1,), generator=gen)) if pattern in ("right", "both") else 0
        mask[b, :left] = False
        mask[b, N - right :] = False
    if pattern == "empty_row":
        mask[-1] = False
    return mask.to(DEVICE)


def oracle_abar(q, k, attention_mask=None, scale=None):
    """Head-averaged probabilities ``Abar (B, N, N)`` in float64; rows without real keys are 0."""
    B, H, N, d = q.shape
    g = H // k.shape[1]
    q64, k64 = q.double(), k.double().repeat_interleave(g, dim=1)
    scale = d**-0.5 if scale is None else scale
    logits = torch.einsum("bhid,bhkd->bhik", q64, k64) * scale
    if attention_mask is not None:
        logits = logits.masked_fill(~attention_mask[:, None, None, :], float("-inf"))
    probs = torch.nan_to_num(torch.softmax(logits, dim=-1), nan=0.0)
    return probs.mean(1)


class DeviceOpLog(TorchDispatchMode):
    """The torch ops run inside that launch a device kernel: ``ops``, by name, in order. Allocations and views
    (``HOST_ONLY``) launch nothing and are left out."""

    HOST_ONLY = {"aten.empty.memory_format", "aten.view.dtype", "aten.detach.default", "aten.alias.default",
                 "aten.unsqueeze.default"}  # fmt: skip

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func) not in self.HOST_ONLY:
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def oracle_lse(q, k, attention_mask):
    """Natural-log logsumexp of every row's logits over its real keys ``(B, H, N)``, float64 (-inf without any)."""
    g = q.shape[1] // k.shape[1]
    logits = torch.einsum("bhid,bhkd->bhik", q.double(), k.double().repeat_interleave(g, 1)) * q.shape[-1] ** -0.5
    return torch.logsumexp(logits.masked_fill(~attention_mask[:, None, None, :], float("-inf")), -1)


def gqa_sdpa(q, k, v, attention_mask):
    """torch SDPA with the kv heads repeated for GQA and a ``(B, N)`` key mask, in the inputs' precision."""
    g = q.shape[1] // k.shape[1]
    mask = None if attention_mask is None else attention_mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), attn_mask=mask)


def oracle_influence(q, k, attention_mask, query_mask, norm):
    """Influence ``I (B, N)`` in float64 from :func:`oracle_abar`: the valid rows' column sums, normalised."""
    rows = attention_mask & query_mask
    total = (oracle_abar(q, k, attention_mask) * rows[:, :, None]).sum(1)
    if norm == "mean":
        return total / rows.sum(-1, keepdim=True).clamp_min(1)
    if norm == "max":
        return total / total.amax(-1, keepdim=True).clamp_min(1e-300)
    return total


def stat_tolerance(dtype):
    """Absolute tolerance for float32 statistics computed from inputs of ``dtype``.

    Inputs are rounded to ``dtype`` before the oracle sees them, so what remains is the kernels' own
    arithmetic: half-precision products are exact in fp32, so only fp32 accumulation and exp remain.
    """
    return {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 1e-3, torch.bfloat16: 1e-3}[dtype]


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param

"""S (+O) and I side by side with what a user would otherwise run.

Groups (one per op, shape and, for ``valid_attention``, pattern of ``U``: see ``_inputs``), each with its
baseline:
- ``valid_attention``: the SDPA forward alone (flash backend on GPU) is the time baseline; beside it
  (a) eager attention that materialises P and reduces it (what ``output_attentions=True`` costs),
  (b) stock SDPA with the mask appended to V as an extra column (S per head from any fused kernel),
  (c) the chunked torch reference, (d) the Triton kernel and (e) the CUDA kernel of csrc/ (GPU only; the
  CUDA one where the extension is built), (f) flash-attn's ``flash_attn_func`` forward (flash-attn-4, else
  flash-attn 2; where installed) as a second attention-only baseline, (g) the Triton kernel without S
  (its FlashAttention floor): Triton / floor is what S costs on the device.
- ``influence``: the same SDPA forward as time baseline; eager column sums, the torch reference, Triton,
  Triton's warp-specialised Hopper variant (``set_warp_specialize(True)``; sm_90+ only), CUDA.
Shapes: the last layer of Dream (H=28, Hkv=4, d=128) and LLaDA (H=Hkv=32, d=128). GPU: bf16, N up to
8192, B 1 and 8; CPU: float32 at small N only (the interpreter is not a performance backend).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import agdo_kernels

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
MODELS = {"dream": (28, 4, 128), "llada": (32, 32, 128)}
SIZES = [(b, n) for b in (1, 8) for n in (512, 1024, 2048, 4096, 8192)] if ON_GPU else [(1, 128), (1, 256)]
# The kernels whose time depends on U (the baseline is timed beside them); random U at these lengths only.
U_SENSITIVE = ("sdpa_forward", "triton", "cuda")
RANDOM_U_LENGTHS = (1024, 4096) if ON_GPU else (128,)
# Eager materialises B*H*N*N probabilities (fp32 softmax + bf16 copy); skip it where that cannot fit.
EAGER_BUDGET_BYTES = 40 * 2**30 if ON_GPU else 2 * 2**30


def _inputs(model, B, N, u_pattern="decoding"):
    """Random q/k/v and ``U``: ``decoding`` as semi-AR decoding leaves it (the first half — prompt and
    decoded blocks — in U, half of the current 32-token block, nothing after), ``random`` half of all keys
    (as pure diffusion leaves it). The Triton and CUDA kernels visit U's keys first either way, gathering K/V
    rows through each row's key order (in the first case nearly the identity: only the current block moves)."""
    H, Hkv, d = MODELS[model]
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    q = torch.randn(B, H, N, d, device=DEVICE, dtype=DTYPE, generator=gen)
    k = torch.randn(B, Hkv, N, d, device=DEVICE, dtype=DTYPE, generator=gen)
    v = torch.randn(B, Hkv, N, d, device=DEVICE, dtype=DTYPE, generator=gen)
    unmasked = torch.rand(B, N, device=DEVICE, generator=gen) < 0.5
    if u_pattern == "decoding":
        block = unmasked[:, N // 2 : N // 2 + 32].clone()
        unmasked.zero_()
        unmasked[:, : N // 2] = True
        unmasked[:, N // 2 : N // 2 + 32] = block
    return q, k, v, unmasked


def _sdpa(q, k, v):
    """SDPA pinned to its flash kernel on a GPU: the baseline is the attention the model runs anyway."""
    if ON_GPU:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)


def _flash_attn_func():
    """flash-attn's dense forward ``f(q, k, v) -> O`` on ``(B, N, H, d)`` views (GQA native), or None."""
    try:
        from flash_attn.cute import flash_attn_func as fa4

        return lambda q, k, v: fa4(q, k, v, causal=False)[0]
    except ImportError:
        pass
    try:
        from flash_attn import flash_attn_func as fa2

        return lambda q, k, v: fa2(q, k, v, causal=False)
    except ImportError:
        return None


def triton_floor(*args, **kwargs):
    """The Triton backend's launcher (imported here: Triton may be missing where the GPU cases skip)."""
    from agdo_kernels.triton.valid_attention import valid_attention

    return valid_attention(*args, **kwargs)


def _eager_probs(q, k):
    g = q.shape[1] // k.shape[1]
    logits = torch.matmul(q, k.repeat_interleave(g, 1).transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return torch.softmax(logits.float(), dim=-1)


def eager_s_and_o(q, k, v, unmasked):
    probs = _eager_probs(q, k)
    s = (probs * unmasked[:, None, None, :]).sum(-1).mean(1)
    out = torch.matmul(probs.to(v.dtype), v.repeat_interleave(q.shape[1] // k.shape[1], 1))
    return s, out


def sdpa_with_mask_column(q, k, v, unmasked):
    """S per head as an extra output column: V' = [V | u | 0-pad] (head dim kept a multiple of 8)."""
    B, Hkv, N, d = v.shape
    extra = torch.zeros(B, Hkv, N, 8, device=v.device, dtype=v.dtype)
    extra[..., 0] = unmasked[:, None, :].to(v.dtype)
    # Flash needs equal q/k/v head dims, so SDPA picks its next kernel (memory-efficient or cuDNN) here.
    out = F.scaled_dot_product_attention(q, k, torch.cat([v, extra], dim=-1), enable_gqa=True)
    return out[..., d].float().mean(1), out[..., :d]


def eager_influence(q, k):
    return _eager_probs(q, k).mean(1).sum(1)


def _skip_unavailable(impl, op):
    if impl in ("triton", "triton_floor") and not ON_GPU:
        pytest.skip("Triton is timed on a GPU only (the CPU interpreter is a correctness tool)")
    if impl == "cuda":
        reason = agdo_kernels.available_backends(DEVICE)[op]["cuda"]
        if reason is not None:
            pytest.skip(reason)


def _eager_fits(model, B, N):
    H = MODELS[model][0]
    return B * H * N * N * 6 <= EAGER_BUDGET_BYTES


@pytest.mark.parametrize("u_pattern", ["decoding", "random"])
@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("B,N", SIZES)
@pytest.mark.parametrize("impl", ["sdpa_forward", "flash_attn", "eager", "sdpa_mask_column", "torch_reference", "triton",
                                  "triton_floor", "cuda"])
def test_valid_attention(measure, model, B, N, impl, u_pattern):
    """S+O beside the attention alone. ``triton_floor`` is the Triton kernel without S and without its gather
    (the compile report's floor; the backend's launcher directly, without the public API's argument checks),
    so ``triton / triton_floor`` is what S costs on the device (at the two random-U lengths: GPU time is short)."""
    if u_pattern == "random" and (impl not in U_SENSITIVE or N not in RANDOM_U_LENGTHS):
        pytest.skip("U only changes the fused kernels' time: random U is timed for them (and SDPA) at two lengths")
    if impl == "triton_floor" and (u_pattern == "random" or N not in RANDOM_U_LENGTHS):
        pytest.skip("the floor does not read U; timed at the two random-U lengths")
    q, k, v, unmasked = _inputs(model, B, N, u_pattern)
    flash = _flash_attn_func() if impl == "flash_attn" and ON_GPU else None
    if impl == "flash_attn" and flash is None:
        pytest.skip("flash-attn is not installed (pip install agdo[flash]) or there is no GPU")
    fns = {
        "flash_attn": lambda: flash(*(t.transpose(1, 2) for t in (q, k, v))),
        "sdpa_forward": lambda: _sdpa(q, k, v),
        "eager": lambda: eager_s_and_o(q, k, v, unmasked),
        "sdpa_mask_column": lambda: sdpa_with_mask_column(q, k, v, unmasked),
        "torch_reference": lambda: agdo_kernels.valid_attention(q, k, v, unmasked=unmasked, return_output=True, backend="torch"),
        "triton": lambda: agdo_kernels.valid_attention(q, k, v, unmasked=unmasked, return_output=True, backend="triton"),
        "triton_floor": lambda: triton_floor(q, k, v, unmasked, None, q.shape[-1] ** -0.5, True, False, compute_s=False),
        "cuda": lambda: agdo_kernels.valid_attention(q, k, v, unmasked=unmasked, return_output=True, backend="cuda"),
    }
    _skip_unavailable(impl, "valid_attention")
    if impl == "eager" and not _eager_fits(model, B, N):
        pytest.skip("eager attention probabilities would not fit in memory")
    measure(fns[impl], group=f"valid_attention S+O {model} B={B} N={N} U={u_pattern} {DTYPE}", impl=impl,
            baseline=impl == "sdpa_forward", model=model, B=B, N=N)


@pytest.fixture
def warp_specialized(request):
    """``set_warp_specialize(True)`` for the ``triton_warp_specialized`` cases only."""
    agdo_kernels.set_warp_specialize(request.node.callspec.params["impl"] == "triton_warp_specialized")
    yield
    agdo_kernels.set_warp_specialize(False)


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("B,N", SIZES)
@pytest.mark.parametrize("impl", ["sdpa_forward", "eager", "torch_reference", "triton", "triton_warp_specialized", "cuda"])
def test_influence(measure, warp_specialized, model, B, N, impl):
    if impl == "triton_warp_specialized" and not (ON_GPU and torch.cuda.get_device_capability()[0] >= 9):
        pytest.skip("the warp-specialised variant runs on sm_90 or later")
    q, k, v, _ = _inputs(model, B, N)
    # The row lse comes out of the forward pass the model runs anyway; I is the extra pass.
    lse = agdo_kernels.valid_attention(q, k, unmasked=torch.zeros(B, N, dtype=torch.bool, device=DEVICE),
                                       return_lse=True, backend="torch").lse
    fns = {
        "sdpa_forward": lambda: _sdpa(q, k, v),
        "eager": lambda: eager_influence(q, k),
        "torch_reference": lambda: agdo_kernels.influence(q, k, lse=lse, backend="torch"),
        "triton": lambda: agdo_kernels.influence(q, k, lse=lse, backend="triton"),
        "triton_warp_specialized": lambda: agdo_kernels.influence(q, k, lse=lse, backend="triton"),
        "cuda": lambda: agdo_kernels.influence(q, k, lse=lse, backend="cuda"),
    }
    _skip_unavailable(impl.removesuffix("_warp_specialized"), "influence")
    if impl == "eager" and not _eager_fits(model, B, N):
        pytest.skip("eager attention probabilities would not fit in memory")
    measure(fns[impl], group=f"influence {model} B={B} N={N} {DTYPE}", impl=impl,
            baseline=impl == "sdpa_forward", model=model, B=B, N=N)

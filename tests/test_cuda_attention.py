"""backend="cuda" attention statistics (csrc/attention_stats.cu): S, O, lse and I against the float64 oracle.

The GPU tests mirror tests/test_valid_attention.py and tests/test_influence.py for the CUDA extension's
tensor-core kernels (float16/bfloat16, head dims 64 and 128): odd N around the 64-row tiles, Nq < N, GQA,
padding (all-padding rows included), U empty/full/random, O against float64 SDPA with an error budget taken
from SDPA at the same precision, lse, influence with and without a given lse, every norm, and the strided
``(B, N, H, d).transpose(1, 2)`` views transformers hands over. They are skipped (with the reason) without a
GPU or without the compiled extension. The rest runs anywhere: argument errors and the layout helpers.
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch

import agdo_kernels
from agdo_kernels import _backends, _cuda
from conftest import gqa_sdpa, oracle_abar, oracle_influence, oracle_lse, padding_mask, stat_tolerance

HAS_GPU = torch.cuda.is_available()


def _unavailable():
    if not HAS_GPU:
        return "needs a CUDA device (backend='cuda' attention kernels)"
    return _cuda.unavailable_reason()


UNAVAILABLE = _unavailable()


def needs_cuda_backend(test):
    """GPU test of backend='cuda': skipped with the reason when there is no GPU or no usable extension."""
    return pytest.mark.gpu(pytest.mark.skipif(UNAVAILABLE is not None, reason=str(UNAVAILABLE))(test))


HALF_DTYPES = [torch.float16, torch.bfloat16]

# (B, H, Hkv, N, d): N = 19 (one ragged tile), 77 and 130 (ragged tails), 200 (several whole + ragged
# tiles, exercises the cp.async pipeline); GQA ratios 1, 4, 7; both head dims.
SHAPES = [
    (2, 4, 1, 19, 64),
    (1, 28, 4, 77, 128),
    (2, 2, 2, 130, 64),
    (1, 7, 1, 130, 128),
    (2, 8, 2, 200, 64),
    (1, 4, 4, 64, 128),
]


def _qkv(B, H, Hkv, N, d, dtype, *, magnitude=1.0, seed=0, layout="contiguous"):
    """q, k, v on the GPU; ``layout="bnhd"`` gives transformers' ``(B, N, H, d).transpose(1, 2)`` views."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(B, h, N, d) for h in (H, Hkv, Hkv)]
    tensors = []
    for shape in shapes:
        t = torch.randn(*shape, generator=gen)
        if shape[1] == H:
            t = t * magnitude
        t = t.to("cuda", dtype)
        if layout == "bnhd":
            t = t.transpose(1, 2).contiguous().transpose(1, 2)
        elif layout == "odd":  # a d-stride of 2: not readable in place, the backend copies it
            t = torch.stack([t, torch.zeros_like(t)], -1).flatten(-2)[..., ::2]
        tensors.append(t)
    return tuple(tensors)


def _unmasked(B, N, kind, seed=1):
    if kind == "empty":
        return torch.zeros(B, N, dtype=torch.bool, device="cuda")
    if kind == "full":
        return torch.ones(B, N, dtype=torch.bool, device="cuda")
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(B, N, generator=gen) < 0.4).to("cuda")


def _mask(B, N, pattern):
    return padding_mask(B, N, pattern).to("cuda")


# --- GPU: valid_attention ------------------------------------------------------------------------------


@needs_cuda_backend
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize(
    "pattern,u_kind,layout",
    [("none", "random", "contiguous"), ("both", "random", "bnhd"), ("left", "full", "contiguous"),
     ("right", "empty", "bnhd"), ("empty_row", "random", "odd")],
)  # fmt: skip
def test_valid_attention_matches_oracle(shape, dtype, pattern, u_kind, layout):
    B, H, Hkv, N, d = shape
    q, k, v = _qkv(B, H, Hkv, N, d, dtype, layout=layout)
    mask = _mask(B, N, pattern)
    unmasked = _unmasked(B, N, u_kind)

    res = agdo_kernels.valid_attention(
        q, k, v, unmasked=unmasked, attention_mask=mask, return_output=True, return_lse=True, backend="cuda"
    )

    expected_s = (oracle_abar(q, k, mask) * (unmasked & mask)[:, None, :]).sum(-1) * mask
    assert res.s.dtype == torch.float32 and res.s.shape == (B, N)
    torch.testing.assert_close(res.s.double(), expected_s, atol=stat_tolerance(dtype), rtol=0)

    has_keys = mask.any(-1)
    assert res.lse.dtype == torch.float32 and res.lse.shape == (B, H, N)
    torch.testing.assert_close(res.lse[has_keys].double(), oracle_lse(q, k, mask)[has_keys], atol=1e-4, rtol=1e-5)
    assert (res.lse[~has_keys] == 0).all() and (res.s[~has_keys] == 0).all() and (res.out[~has_keys] == 0).all()

    # O: the kernel's error against float64 must be comparable to SDPA's own error at the same precision.
    assert res.out.dtype == dtype and res.out.shape == (B, H, N, d)
    expected_out = gqa_sdpa(q.double(), k.double(), v.double(), mask)[has_keys]
    sdpa_err = (gqa_sdpa(q, k, v, mask)[has_keys].double() - expected_out).abs().max().item()
    ours_err = (res.out[has_keys].double() - expected_out).abs().max().item()
    assert ours_err <= 2 * sdpa_err + stat_tolerance(dtype), (ours_err, sdpa_err)

    # The same numbers as the Triton backend (both float32 statistics from the same rounded inputs).
    triton = agdo_kernels.valid_attention(
        q, k, v, unmasked=unmasked, attention_mask=mask, return_output=True, return_lse=True, backend="triton"
    )
    torch.testing.assert_close(res.s, triton.s, atol=stat_tolerance(dtype), rtol=0)


@needs_cuda_backend
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("u_kind", ["first-300", "scattered", "padded-only", "everything"])
def test_valid_attention_visits_keys_in_u_first(dtype, d, u_kind):
    """The kernel gathers K/V through each row's key order (the real keys of U, then the others; padding never):
    rows of ~1,000 real keys (16 tiles), 200 keys of left padding, a hole, U ending inside a tile or scattered,
    U only on padded keys and U everything. Against the float64 oracle and the Triton backend."""
    B, H, Hkv, N = 2, 4, 2, 1111
    q, k, v = _qkv(B, H, Hkv, N, d, dtype)
    mask = torch.ones(B, N, dtype=torch.bool, device="cuda")
    mask[0, :200] = False
    mask[:, 500:517] = False
    unmasked = {
        "first-300": (mask.cumsum(-1) <= 300) | ~mask,
        "scattered": _unmasked(B, N, "random") | ~mask,
        "padded-only": ~mask,
        "everything": torch.ones_like(mask),
    }[u_kind]
    res = agdo_kernels.valid_attention(
        q, k, v, unmasked=unmasked, attention_mask=mask, return_output=True, return_lse=True, backend="cuda"
    )
    expected_s = (oracle_abar(q, k, mask) * (unmasked & mask)[:, None, :]).sum(-1) * mask
    torch.testing.assert_close(res.s.double(), expected_s, atol=stat_tolerance(dtype), rtol=0)
    torch.testing.assert_close(res.lse.double(), oracle_lse(q, k, mask), atol=1e-4, rtol=1e-5)
    expected_out = gqa_sdpa(q.double(), k.double(), v.double(), mask)
    sdpa_err = (gqa_sdpa(q, k, v, mask).double() - expected_out).abs().max().item()
    ours_err = (res.out.double() - expected_out).abs().max().item()
    assert ours_err <= 2 * sdpa_err + stat_tolerance(dtype), (ours_err, sdpa_err)
    triton = agdo_kernels.valid_attention(q, k, unmasked=unmasked, attention_mask=mask, backend="triton")
    torch.testing.assert_close(res.s, triton.s, atol=stat_tolerance(dtype), rtol=0)


@needs_cuda_backend
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("N,Nq", [(37, 13), (130, 70), (200, 1), (77, 77)])
def test_queries_that_are_the_last_keys(dtype, d, N, Nq):
    B, H, Hkv = 2, 8, 2
    q, k, v = _qkv(B, H, Hkv, N, d, dtype, seed=3, layout="bnhd")
    mask = _mask(B, N, "left")
    unmasked = _unmasked(B, N, "random", seed=4)

    res = agdo_kernels.valid_attention(
        q[:, :, N - Nq :], k, v, unmasked=unmasked, attention_mask=mask, return_output=True, return_lse=True,
        backend="cuda",
    )  # fmt: skip

    abar = oracle_abar(q, k, mask)[:, N - Nq :]
    expected_s = (abar * (unmasked & mask)[:, None, :]).sum(-1) * mask[:, N - Nq :]
    assert res.s.shape == (B, Nq) and res.lse.shape == (B, H, Nq) and res.out.shape == (B, H, Nq, d)
    torch.testing.assert_close(res.s.double(), expected_s, atol=stat_tolerance(dtype), rtol=0)
    full = agdo_kernels.valid_attention(
        q, k, v, unmasked=unmasked, attention_mask=mask, return_output=True, return_lse=True, backend="cuda"
    )
    torch.testing.assert_close(res.lse, full.lse[:, :, N - Nq :], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(res.out.double(), full.out[:, :, N - Nq :].double(), atol=stat_tolerance(dtype), rtol=0)


@needs_cuda_backend
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("d", [64, 128])
def test_valid_attention_properties_and_forms(dtype, d):
    B, H, Hkv, N = 3, 8, 2, 141
    q, k, v = _qkv(B, H, Hkv, N, d, dtype)
    mask = _mask(B, N, "both")
    tol = stat_tolerance(dtype)
    s = agdo_kernels.valid_attention(q, k, unmasked=_unmasked(B, N, "random"), attention_mask=mask, backend="cuda")
    assert isinstance(s, torch.Tensor) and torch.isfinite(s).all()
    assert (s >= -tol).all() and (s <= 1 + tol).all() and (s[~mask] == 0).all()
    everything = agdo_kernels.valid_attention(q, k, unmasked=_unmasked(B, N, "full"), attention_mask=mask, backend="cuda")
    torch.testing.assert_close(everything, mask.float(), atol=tol, rtol=0)
    none = agdo_kernels.valid_attention(q, k, unmasked=_unmasked(B, N, "empty"), attention_mask=mask, backend="cuda")
    assert (none == 0).all()
    # No attention_mask at all; S alone equals S with the extras; lse alone (v=None, what influence uses).
    u = _unmasked(B, N, "random")
    alone = agdo_kernels.valid_attention(q, k, unmasked=u, backend="cuda")
    with_extras = agdo_kernels.valid_attention(q, k, v, unmasked=u, return_output=True, return_lse=True, backend="cuda")
    # (two kernel instantiations, with and without O: the same arithmetic for S and lse)
    torch.testing.assert_close(alone, with_extras.s, atol=1e-6, rtol=0)
    only_lse = agdo_kernels.valid_attention(q, k, unmasked=u, return_lse=True, backend="cuda")
    assert only_lse.out is None
    torch.testing.assert_close(only_lse.lse, with_extras.lse, atol=1e-6, rtol=1e-6)
    expected = (oracle_abar(q, k) * u[:, None, :]).sum(-1)
    torch.testing.assert_close(alone.double(), expected, atol=tol, rtol=0)
    # Deterministic: no atomics, a fixed summation order.
    assert torch.equal(agdo_kernels.valid_attention(q, k, unmasked=u, backend="cuda"), alone)


@needs_cuda_backend
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_large_logits_and_nonfinite_rows(dtype):
    B, H, Hkv, N, d = 3, 4, 4, 99, 64
    q, k, v = _qkv(B, H, Hkv, N, d, dtype, magnitude=30.0)
    mask = _mask(B, N, "left")
    u = _unmasked(B, N, "random")
    res = agdo_kernels.valid_attention(q, k, v, unmasked=u, attention_mask=mask, return_output=True, backend="cuda")
    assert torch.isfinite(res.s).all() and torch.isfinite(res.out).all()
    expected = (oracle_abar(q, k, mask) * (u & mask)[:, None, :]).sum(-1) * mask
    torch.testing.assert_close(res.s.double(), expected, atol=stat_tolerance(dtype), rtol=0)
    # A NaN in one batch row: that row is NaN in every output, the others unchanged (module docstring rule).
    q_bad = q.clone()
    q_bad[1, 2, 5, 7] = float("nan")
    bad = agdo_kernels.valid_attention(q_bad, k, v, unmasked=u, attention_mask=mask, return_output=True,
                                       return_lse=True, backend="cuda")  # fmt: skip
    assert bad.s[1].isnan().all() and bad.lse[1].isnan().all() and bad.out[1].isnan().all()
    assert torch.equal(bad.s[[0, 2]], res.s[[0, 2]])


@needs_cuda_backend
def test_empty_inputs_on_gpu():
    q, k, v = _qkv(2, 4, 2, 0, 64, torch.float16)
    res = agdo_kernels.valid_attention(q, k, v, unmasked=_unmasked(2, 0, "full"), return_output=True,
                                       return_lse=True, backend="cuda")  # fmt: skip
    assert res.s.shape == (2, 0) and res.out.shape == (2, 4, 0, 64) and res.lse.shape == (2, 4, 0)
    assert agdo_kernels.influence(q, k, backend="cuda").shape == (2, 0)


@needs_cuda_backend
@pytest.mark.parametrize("dtype,d,problem", [(torch.float32, 64, "dtype"), (torch.float16, 32, "head dim")])
def test_unsupported_inputs_point_to_triton(dtype, d, problem):
    q, k, v = _qkv(1, 2, 2, 9, d, dtype)
    u = _unmasked(1, 9, "full")
    with pytest.raises(ValueError, match=rf"`q` has {problem}.*backend='triton'"):
        agdo_kernels.valid_attention(q, k, v, unmasked=u, backend="cuda")
    with pytest.raises(ValueError, match=rf"`q` has {problem}.*backend='triton'"):
        agdo_kernels.influence(q, k, backend="cuda")


# --- GPU: influence ------------------------------------------------------------------------------------


@needs_cuda_backend
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("norm", ["sum", "mean", "max"])
@pytest.mark.parametrize("given_lse", [False, True], ids=["lse-pass", "lse-given"])
def test_influence_matches_oracle(shape, dtype, norm, given_lse):
    B, H, Hkv, N, d = shape
    q, k, _ = _qkv(B, H, Hkv, N, d, dtype, layout="bnhd" if given_lse else "contiguous")
    mask = _mask(B, N, "both")
    query_mask = (torch.rand(B, N, generator=torch.Generator().manual_seed(3)) < 0.6).to("cuda")
    lse = None
    if given_lse:
        no_keys = torch.zeros(B, N, dtype=torch.bool, device="cuda")
        lse = agdo_kernels.valid_attention(q, k, unmasked=no_keys, attention_mask=mask, return_lse=True,
                                           backend="cuda").lse  # fmt: skip
    got = agdo_kernels.influence(q, k, lse=lse, attention_mask=mask, query_mask=query_mask, norm=norm, backend="cuda")
    assert got.dtype == torch.float32 and got.shape == (B, N) and torch.isfinite(got).all()
    tol = stat_tolerance(dtype) * (N if norm == "sum" else 1)
    torch.testing.assert_close(got.double(), oracle_influence(q, k, mask, query_mask, norm), atol=tol, rtol=1e-4)
    assert (got[~mask] == 0).all()


@needs_cuda_backend
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("d", [64, 128])
def test_influence_properties(dtype, d):
    B, H, Hkv, N = 3, 8, 2, 153
    q, k, _ = _qkv(B, H, Hkv, N, d, dtype)
    mask = _mask(B, N, "both")
    n_rows = mask.sum(-1).double()
    total = agdo_kernels.influence(q, k, attention_mask=mask, backend="cuda")
    torch.testing.assert_close(total.double().sum(-1), n_rows, atol=N * stat_tolerance(dtype), rtol=0)
    assert (total[~mask] == 0).all() and (total >= 0).all()
    mean = agdo_kernels.influence(q, k, attention_mask=mask, norm="mean", backend="cuda")
    torch.testing.assert_close(mean.double().sum(-1), torch.ones_like(n_rows), atol=10 * stat_tolerance(dtype), rtol=0)
    largest = agdo_kernels.influence(q, k, attention_mask=mask, norm="max", backend="cuda").amax(-1)
    torch.testing.assert_close(largest, torch.ones_like(largest))
    # Deterministic, and the same as the Triton backend within the statistics' tolerance.
    assert torch.equal(agdo_kernels.influence(q, k, attention_mask=mask, backend="cuda"), total)
    triton = agdo_kernels.influence(q, k, attention_mask=mask, backend="triton")
    torch.testing.assert_close(total, triton, atol=N * stat_tolerance(dtype), rtol=1e-4)


@needs_cuda_backend
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("d", [64, 128])
def test_influence_skips_tiles_outside_the_counted_rows(dtype, d):
    """Query tiles outside the counted rows and key tiles without a real key are skipped: 300 keys of left
    padding, counted rows only in the last 256 (a response) plus one alone, right padding, a row without a
    counted row."""
    B, H, Hkv, N = 3, 4, 2, 1000
    q, k, _ = _qkv(B, H, Hkv, N, d, dtype)
    mask = torch.ones(B, N, dtype=torch.bool, device="cuda")
    mask[0, :300] = False
    mask[1, 900:] = False
    query_mask = torch.zeros(B, N, dtype=torch.bool, device="cuda")
    query_mask[:, N - 256 :] = True
    query_mask[0, 320] = True
    query_mask[2] = False
    got = agdo_kernels.influence(q, k, attention_mask=mask, query_mask=query_mask, backend="cuda")
    tol = stat_tolerance(dtype) * N
    torch.testing.assert_close(got.double(), oracle_influence(q, k, mask, query_mask, "sum"), atol=tol, rtol=1e-4)
    assert (got[~mask] == 0).all() and (got[2] == 0).all()


@needs_cuda_backend
def test_influence_empty_rows_and_no_valid_queries():
    q, k, _ = _qkv(2, 4, 1, 29, 64, torch.float16, magnitude=30.0)
    mask = _mask(2, 29, "empty_row")
    got = agdo_kernels.influence(q, k, attention_mask=mask, backend="cuda")
    assert torch.isfinite(got).all() and (got[1] == 0).all()
    torch.testing.assert_close(got.double(), oracle_influence(q, k, mask, mask, "sum"), atol=29 * 1e-3, rtol=1e-4)
    none = torch.zeros(2, 29, dtype=torch.bool, device="cuda")
    for norm in ("sum", "mean", "max"):
        got = agdo_kernels.influence(q, k, query_mask=none, norm=norm, backend="cuda")
        assert torch.isfinite(got).all() and (got == 0).all()


# --- anywhere: argument errors, backend choice, layout helpers -----------------------------------------


def _cpu_inputs(d=64):
    q = torch.randn(1, 2, 9, d, dtype=torch.float16)
    k = torch.randn(1, 2, 9, d, dtype=torch.float16)
    return q, k, torch.ones(1, 9, dtype=torch.bool)


@pytest.mark.skipif(HAS_GPU, reason="checks the messages given without a GPU")
def test_cuda_backend_on_cpu_names_the_op():
    q, k, u = _cpu_inputs()
    with pytest.raises(ValueError, match=r"`backend='cuda'` is not available for `valid_attention`: tensors are on cpu"):
        agdo_kernels.valid_attention(q, k, unmasked=u, backend="cuda")
    with pytest.raises(ValueError, match=r"`backend='cuda'` is not available for `influence`: tensors are on cpu"):
        agdo_kernels.influence(q, k, backend="cuda")
    with pytest.raises(ValueError, match=r"`backend='cuda'` is not available for `influence`"):
        agdo_kernels.influence(q, k, lse=torch.zeros(1, 2, 9), backend="cuda")
    with pytest.raises(ValueError, match=r"`response_attention` has no CUDA-extension implementation"):
        agdo_kernels.response_attention(q, k, response_start=3, backend="cuda")


def test_cuda_ops_and_auto_preference():
    assert {"valid_attention", "influence", "greedy_order"} <= set(_backends.CUDA_OPS)
    cuda = torch.device("cuda", 0)
    # Triton stays first for the attention statistics until GPU benchmarks say otherwise (_backends.AUTO_PREFERENCE).
    for op in ("valid_attention", "influence", "response_attention"):
        assert _backends.resolve("auto", cuda, op) == "triton"
    # greedy_order: Triton first too (faster where measured), the CUDA kernel where Triton is missing.
    assert _backends.resolve("auto", cuda, "greedy_order") == "triton"
    with mock.patch.object(_backends, "_triton_unavailable_reason", lambda device: "no triton"), \
            mock.patch.object(_backends, "_cuda_unavailable_reason", lambda device, op: None):
        assert _backends.resolve("auto", cuda, "greedy_order") == "cuda"
    assert _backends.resolve("auto", torch.device("cpu"), "valid_attention") == "torch"


@pytest.mark.parametrize(
    "dtype,d,dv,match",
    [(torch.float32, 64, 64, r"`q` has dtype torch.float32.*backend='triton'"),
     (torch.float64, 64, 64, r"`q` has dtype torch.float64.*backend='triton'"),
     (torch.float16, 32, 32, r"`q` has head dim 32.*backend='triton'"),
     (torch.bfloat16, 256, 256, r"`q` has head dim 256.*backend='triton'"),
     (torch.float16, 64, 128, r"`v` has head dim 128.*backend='triton'")],
)  # fmt: skip
def test_unsupported_dtype_or_head_dim_messages(dtype, d, dv, match):
    q = torch.zeros(1, 2, 3, d, dtype=dtype)
    v = torch.zeros(1, 2, 3, dv, dtype=dtype)
    with pytest.raises(ValueError, match=match):
        _cuda.check_attention_supported("valid_attention", q, v)


def test_supported_inputs_pass_the_check():
    for dtype in (torch.float16, torch.bfloat16):
        for d in (64, 128):
            q = torch.zeros(1, 2, 3, d, dtype=dtype)
            _cuda.check_attention_supported("influence", q)
            _cuda.check_attention_supported("valid_attention", q, q)


def test_kernel_layout_reads_transformers_views_in_place():
    base = torch.zeros(2, 11, 4, 64, dtype=torch.float16)  # (B, N, H, d)
    view = base.transpose(1, 2)
    same, strides = _cuda._kernel_layout(view)
    assert same.data_ptr() == view.data_ptr() and strides == (11 * 4 * 64, 64, 4 * 64)
    # Size-1 dims pass stride 0 (their stride is never used).
    one, strides = _cuda._kernel_layout(torch.zeros(1, 1, 5, 64, dtype=torch.float16))
    assert strides == (0, 0, 64)
    # A non-unit d stride, or (b, h, n) strides that are not multiples of 8 elements: copied to contiguous.
    odd = torch.zeros(2, 3, 5, 128, dtype=torch.float16)[..., ::2]
    copied, strides = _cuda._kernel_layout(odd)
    assert copied.is_contiguous() and strides == (3 * 5 * 64, 5 * 64, 64)
    ragged = torch.zeros(2, 3, 5, 68, dtype=torch.float16)[..., :64]
    copied, strides = _cuda._kernel_layout(ragged)
    assert copied.is_contiguous() and copied.data_ptr() != ragged.data_ptr()
    # Contiguous but starting 8 bytes past an aligned address: copied too (16-byte cp.async needs alignment).
    shifted = torch.zeros(4 + 2 * 3 * 64, dtype=torch.float16)[4:].view(1, 2, 3, 64)
    assert shifted.is_contiguous() and shifted.data_ptr() % 16 == 8
    copied, _ = _cuda._kernel_layout(shifted)
    assert copied.data_ptr() % 16 == 0 and torch.equal(copied, shifted)


class _RecordingExtension:
    """Stands in for the compiled module: records what agdo_kernels._cuda passes to each kernel."""

    ATTENTION_TILE = 64
    ATTENTION_FLOAT16 = 0
    ATTENTION_BFLOAT16 = 1

    def __init__(self):
        self.calls = []

    def valid_attention(self, *args):
        self.calls.append(("valid_attention", args))

    def influence_sum(self, *args):
        self.calls.append(("influence_sum", args))


@pytest.fixture
def recorded_launches(monkeypatch):
    """Run ``_cuda``'s launchers on CPU tensors against the recorder (no device, no stream)."""
    from contextlib import nullcontext
    from types import SimpleNamespace

    recorder = _RecordingExtension()
    monkeypatch.setattr(_cuda, "_extension", recorder)
    monkeypatch.setattr(torch.cuda, "device", lambda device: nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: SimpleNamespace(cuda_stream=7))
    return recorder


def test_launch_arguments_read_strided_views_in_place(recorded_launches):
    B, H, Hkv, N, Nq, d = 2, 4, 2, 70, 13, 64
    q = torch.zeros(B, N, H, d, dtype=torch.bfloat16).transpose(1, 2)[:, :, N - Nq :]
    k, v = (torch.zeros(B, N, Hkv, d, dtype=torch.bfloat16).transpose(1, 2) for _ in range(2))
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[0, :5] = False
    unmasked = torch.zeros(B, N, dtype=torch.bool)
    unmasked[:, :9] = True
    s, out, lse = _cuda.valid_attention(q, k, v, unmasked, mask, 0.125, True, True)
    assert s.shape == (B, Nq) and out.shape == (B, H, Nq, d) and out.dtype == torch.bfloat16 and lse.shape == (B, H, Nq)
    ((name, args),) = recorded_launches.calls
    assert name == "valid_attention"
    (q_ptr, k_ptr, v_ptr, q_stride, k_stride, v_stride, mask_ptr, unmasked_ptr, order_ptr, counts_ptr, s_ptr,
     out_ptr, lse_ptr, *sizes, scale, device, stream) = args  # fmt: skip
    assert (q_ptr, k_ptr, v_ptr) == (q.data_ptr(), k.data_ptr(), v.data_ptr())  # no copies
    assert q_stride == (N * H * d, d, H * d) and k_stride == v_stride == (N * Hkv * d, d, Hkv * d)
    assert (mask_ptr, unmasked_ptr) == (mask.data_ptr(), unmasked.data_ptr())  # bool masks read as bytes in place
    assert sizes == [B, H, Hkv, Nq, N, 128, d, 1]
    assert out_ptr == out.data_ptr() and lse_ptr == lse.data_ptr() and 0 not in (order_ptr, counts_ptr, s_ptr)
    assert scale == pytest.approx(0.125 * 1.4426950408889634) and stream == 7

    recorded_launches.calls.clear()
    s, out, lse = _cuda.valid_attention(q, k, None, unmasked, None, 0.125, False, False)
    ((_, args),) = recorded_launches.calls
    assert args[2] == 0 and args[5] == (0, 0, 0) and args[6] == 0 and args[11] == 0 and args[12] == 0
    assert out is None and lse is None

    recorded_launches.calls.clear()
    full_q = torch.zeros(B, N, H, d, dtype=torch.float16).transpose(1, 2)
    k16 = k.to(torch.float16)
    total = _cuda.influence_sum(full_q, k16, torch.zeros(B, H, N), mask, None, 0.125)
    assert total.shape == (B, N)
    ((name, args),) = recorded_launches.calls
    assert name == "influence_sum"
    assert args[0] == full_q.data_ptr() and args[2] == (N * H * d, d, H * d)
    assert args[5] == mask.data_ptr() and args[6] == 0  # no query mask
    assert list(args[10:17]) == [B, H, Hkv, N, 128, d, 0]


@pytest.mark.skipif(HAS_GPU or _cuda._extension is None, reason="calls the compiled module where it cannot launch")
def test_compiled_signatures_match_the_launchers(recorded_launches):
    """The arguments _cuda.py passes are accepted by the compiled functions (which then fail: no device)."""
    import importlib

    extension = importlib.import_module("agdo_kernels._agdo_cuda")
    q = torch.zeros(1, 2, 9, 64, dtype=torch.float16)
    _cuda.valid_attention(q, q, q, torch.ones(1, 9, dtype=torch.bool), None, 0.125, True, True)
    _cuda.influence_sum(q, q, torch.zeros(1, 2, 9), None, None, 0.125)
    for name, args in recorded_launches.calls:
        args = list(args)
        args[-2] = 0  # device index (None for CPU tensors)
        with pytest.raises(RuntimeError, match="cudaSetDevice"):
            getattr(extension, name)(*args)

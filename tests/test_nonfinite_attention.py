"""NaN/inf in the attention inputs: the same answer on every backend (agdo_kernels module docstring).

Rule: a batch row whose inputs hold a NaN or an infinity (or whose statistics overflow) is NaN in every
output of that row; the other rows are exactly what clean inputs give (checked against the float64 oracle
of conftest). Each test runs every backend here and compares the backends with each other as well.
Odd sizes (N = 19, R = 11) so the Triton tiles have ragged edges.
"""

from __future__ import annotations

import pytest
import torch
from conftest import BACKENDS, DEVICE, DTYPES, oracle_abar, random_qkv, stat_tolerance

import agdo_kernels

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy under the Triton interpreter

B, H, HKV, N, D = 4, 4, 2, 19, 16
NAN, INF = float("nan"), float("inf")


def _poisoned(dtype):
    """Row 0: NaN in q; row 1: +inf in k; row 2: -inf in q at a padded position; row 3 clean."""
    q, k, v = random_qkv(B, H, HKV, N, D, dtype=dtype, seed=3)
    attention_mask = torch.ones(B, N, dtype=torch.bool, device=DEVICE)
    attention_mask[2, :3] = False
    clean = (q.clone(), k.clone(), v.clone())
    q[0, 3, 7, 5] = NAN
    k[1, 1, 18, 0] = INF
    q[2, 0, 1, 2] = -INF
    return (q, k, v), clean, attention_mask


def _unmasked():
    gen = torch.Generator().manual_seed(1)
    return (torch.rand(B, N, generator=gen) > 0.5).to(DEVICE)


def _assert_rows(t, bad_rows, expected_good=None, atol=0.0):
    """Rows in ``bad_rows`` all NaN, the others all finite (and close to ``expected_good`` when given)."""
    for b in range(t.shape[0]):
        if b in bad_rows:
            assert torch.isnan(t[b]).all(), f"row {b} should be all NaN"
        else:
            assert torch.isfinite(t[b]).all(), f"row {b} should be finite"
            if expected_good is not None:
                torch.testing.assert_close(t[b].double(), expected_good[b].double(), atol=atol, rtol=0)


def _same_everywhere(results):
    """Every backend gives the same NaN pattern and (to tolerance) the same finite values."""
    first, *others = results
    for other in others:
        for a, b in zip(first, other):
            if a is None:
                assert b is None
                continue
            assert torch.equal(torch.isnan(a), torch.isnan(b))
            torch.testing.assert_close(a.float().nan_to_num(0.0), b.float().nan_to_num(0.0), atol=2e-3, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_valid_attention_poisons_exactly_the_bad_rows(dtype):
    (q, k, v), (cq, ck, _), attention_mask = _poisoned(dtype)
    unmasked = _unmasked()
    abar = oracle_abar(cq, ck, attention_mask)
    expected_s = (abar * (unmasked & attention_mask)[:, None, :]).sum(-1) * attention_mask
    results = []
    for backend in BACKENDS:
        res = agdo_kernels.valid_attention(q, k, v, unmasked=unmasked, attention_mask=attention_mask,
                                           return_output=True, return_lse=True, backend=backend)
        _assert_rows(res.s, {0, 1, 2}, expected_s, atol=stat_tolerance(dtype))
        _assert_rows(res.out, {0, 1, 2})
        _assert_rows(res.lse, {0, 1, 2})
        results.append(tuple(res))
    _same_everywhere(results)


def test_nan_in_v_poisons_the_row_only_when_the_output_is_returned():
    q, k, v = random_qkv(2, H, HKV, N, D, seed=4)
    v[1, 0, 5, 3] = NAN
    unmasked = _unmasked()[:2]
    results = []
    for backend in BACKENDS:
        res = agdo_kernels.valid_attention(q, k, v, unmasked=unmasked, return_output=True, backend=backend)
        _assert_rows(res.s, {1})
        _assert_rows(res.out, {1})
        s_only = agdo_kernels.valid_attention(q, k, v, unmasked=unmasked, backend=backend)  # v unused
        assert torch.isfinite(s_only).all()
        results.append((res.s, res.out))
    _same_everywhere(results)


@pytest.mark.parametrize("norm", ["sum", "max"])
def test_influence_poisons_exactly_the_bad_rows(norm):
    (q, k, _), (cq, ck, _), attention_mask = _poisoned(torch.float32)
    total = oracle_abar(cq, ck, attention_mask).mul(attention_mask[:, :, None]).sum(1) * attention_mask
    expected = total if norm == "sum" else total / total.amax(-1, keepdim=True)
    results = []
    for backend in BACKENDS:
        got = agdo_kernels.influence(q, k, attention_mask=attention_mask, norm=norm, backend=backend)
        _assert_rows(got, {0, 1, 2}, expected, atol=1e-4)
        results.append((got,))
    _same_everywhere(results)


def test_influence_with_a_nonfinite_given_lse():
    q, k, _ = random_qkv(3, H, HKV, N, D, seed=5)
    unmasked = torch.zeros(3, N, dtype=torch.bool, device=DEVICE)
    results = []
    for backend in BACKENDS:
        lse = agdo_kernels.valid_attention(q, k, unmasked=unmasked, return_lse=True, backend=backend).lse.clone()
        lse[0, 2, 4] = INF
        lse[2, 0, 0] = NAN
        got = agdo_kernels.influence(q, k, lse=lse, norm="sum", backend=backend)
        _assert_rows(got, {0, 2})
        results.append((got,))
    _same_everywhere(results)


@pytest.mark.parametrize("shift", [False, True])
def test_response_attention_poisons_exactly_the_bad_rows(shift):
    (q, k, _), (cq, ck, _), attention_mask = _poisoned(torch.float32)
    P = N - 11
    abar = oracle_abar(cq, ck, attention_mask)
    pred = torch.arange(P, N, device=DEVICE) - int(shift)
    expected_s0 = abar[:, pred, :P].sum(-1)
    expected_rr = abar[:, pred][:, :, P:]
    results = []
    for backend in BACKENDS:
        got = agdo_kernels.response_attention(q, k, response_start=P, attention_mask=attention_mask, shift=shift,
                                              backend=backend)
        _assert_rows(got.s0, {0, 1, 2}, expected_s0, atol=1e-4)
        _assert_rows(got.abar_rr, {0, 1, 2}, expected_rr, atol=1e-4)
        results.append(tuple(got))
    _same_everywhere(results)


def test_overflowing_logits_are_nan_on_every_backend():
    # Finite inputs whose logits overflow float32 (q.k ~ 16 * 1e38 on the diagonal): the row cannot be computed.
    q, k, _ = random_qkv(2, 2, 1, N, D, seed=6)
    q[1] = q[1].sign() * 1e38
    k[1] = q[1, :1].sign()
    unmasked = _unmasked()[:2]
    results = []
    for backend in BACKENDS:
        res = agdo_kernels.valid_attention(q, k, unmasked=unmasked, return_lse=True, backend=backend)
        _assert_rows(res.s, {1})
        _assert_rows(res.lse, {1})
        inf_ = agdo_kernels.influence(q, k, norm="sum", backend=backend)
        _assert_rows(inf_, {1})
        results.append((res.s, res.lse, inf_))
    _same_everywhere(results)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_zero_heads_is_an_error_naming_q(backend_name):
    q = torch.zeros(1, 0, 5, D, device=DEVICE)
    for k in (torch.zeros(1, 0, 5, D, device=DEVICE), torch.zeros(1, 1, 5, D, device=DEVICE)):
        unmasked = torch.ones(1, 5, dtype=torch.bool, device=DEVICE)
        with pytest.raises(ValueError, match=r"`q` must have at least one head"):
            agdo_kernels.valid_attention(q, k, unmasked=unmasked, backend=backend_name)
        with pytest.raises(ValueError, match=r"`q` must have at least one head"):
            agdo_kernels.influence(q, k, backend=backend_name)
        with pytest.raises(ValueError, match=r"`q` must have at least one head"):
            agdo_kernels.response_attention(q, k, response_start=2, backend=backend_name)


def test_zero_kv_heads_is_an_error_naming_k():
    q, k = torch.zeros(1, 2, 5, D), torch.zeros(1, 0, 5, D)
    with pytest.raises(ValueError, match=r"`k` must have at least one head"):
        agdo_kernels.influence(q, k)


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton runs on a GPU, or on CPU under TRITON_INTERPRET=1")
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_row_flags_and_finish_against_torch(dtype):
    """The Triton backend's device-side rule: flags from strided tensors of rank 2-4 (one poisoned element
    per tensor, padded positions included) and the head average + poisoning, against plain torch."""
    from agdo_kernels.triton.nonfinite import finish_rows, flag_nonfinite_rows

    gen = torch.Generator().manual_seed(7)
    Bn, Hn, Nn, Dn = 5, 3, 37, 24  # D not a power of two: the scan tile masks its columns
    q = torch.randn(Bn, Nn, Hn, Dn, generator=gen).to(DEVICE, dtype).transpose(1, 2)  # a strided view
    lse = torch.randn(Bn, Hn, Nn, generator=gen).to(DEVICE)
    mask_like = torch.randn(Bn, Nn, generator=gen).to(DEVICE)
    q[1, 2, 36, 23] = NAN
    lse[3, 0, 0] = -INF
    mask_like[4, 11] = INF
    flags = flag_nonfinite_rows(Bn, q, lse, mask_like, flags=torch.zeros(Bn, dtype=torch.int32, device=DEVICE))
    assert flags.dtype == torch.int32
    assert (flags != 0).tolist() == [False, True, False, True, True]
    assert not flag_nonfinite_rows(Bn, None, flags=torch.zeros(Bn, dtype=torch.int32, device=DEVICE)).any()

    part = torch.rand(Bn, Hn, Nn, generator=gen).to(DEVICE)
    out = torch.randn(Bn, Hn, Nn, Dn, generator=gen).to(DEVICE, dtype)
    lse_out, clean_out = lse.clone(), out.clone()
    got = finish_rows(part, flags, lse_out, out)
    bad = flags != 0
    torch.testing.assert_close(got[~bad], part.mean(1)[~bad], atol=1e-6, rtol=1e-6)
    assert torch.isnan(got[bad]).all() and torch.isnan(lse_out[bad]).all() and torch.isnan(out[bad]).all()
    assert torch.equal(lse_out[~bad], lse[~bad]) and torch.equal(out[~bad], clean_out[~bad])

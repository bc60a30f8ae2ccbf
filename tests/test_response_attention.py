"""response_attention: S0 and Abar_RR against slices of the float64 oracle, shifted and unshifted."""

import pytest
import torch

import agdo_kernels
from conftest import DEVICE, DTYPES, oracle_abar, padding_mask, random_qkv, stat_tolerance

# (B, H, Hkv, N, d, response_start)
CASES = [(1, 1, 1, 2, 16, 1), (2, 4, 1, 17, 32, 5), (2, 7, 1, 50, 64, 13), (1, 8, 8, 130, 16, 40), (2, 28, 4, 24, 128, 9)]


def _oracle(q, k, mask, P, shift):
    B, _, N, _ = q.shape
    abar = oracle_abar(q, k, mask)
    pred = torch.arange(P, N, device=q.device) - int(shift)
    rows_valid = (mask[:, P:] & mask[:, pred]).double()
    s0 = (abar[:, pred, :P] * mask[:, None, :P]).sum(-1) * rows_valid
    abar_rr = abar[:, pred, P:] * rows_valid[:, :, None]
    return s0, abar_rr


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shift", [False, True], ids=["unshifted", "shifted"])
def test_matches_oracle(backend, case, dtype, shift):
    B, H, Hkv, N, d, P = case
    q, k, _ = random_qkv(B, H, Hkv, N, d, dtype)
    # Left padding inside the prompt region, right padding inside the response: the real layout.
    mask = torch.ones(B, N, dtype=torch.bool, device=DEVICE)
    mask[-1, : P // 2] = False
    mask[0, N - (N - P) // 3 :] = False
    got = agdo_kernels.response_attention(q, k, response_start=P, attention_mask=mask, shift=shift, backend=backend)
    s0, abar_rr = _oracle(q, k, mask, P, shift)
    assert got.s0.dtype == torch.float32 and got.s0.shape == (B, N - P)
    assert got.abar_rr.dtype == torch.float32 and got.abar_rr.shape == (B, N - P, N - P)
    tol = stat_tolerance(dtype)
    torch.testing.assert_close(got.s0.double(), s0, atol=tol, rtol=0)
    torch.testing.assert_close(got.abar_rr.double(), abar_rr, atol=tol, rtol=0)
    # The lse of the same pass, as valid_attention reports it (what influence may reuse).
    expected_lse = agdo_kernels.valid_attention(
        q, k, unmasked=mask, attention_mask=mask, return_lse=True, backend=backend
    ).lse
    torch.testing.assert_close(got.lse, expected_lse, atol=1e-5, rtol=1e-5)
    if backend == "triton":  # written column-major: the greedy order's column read needs no copy
        assert got.abar_rr.transpose(1, 2).is_contiguous()


def test_rows_sum_to_one(backend):
    """A real predictor row's mass splits between the prompt (S0) and the response (Abar_RR)."""
    B, N, P = 3, 47, 11
    q, k, _ = random_qkv(B, 8, 2, N, 32)
    mask = padding_mask(B, N, "none")
    got = agdo_kernels.response_attention(q, k, response_start=P, attention_mask=mask, shift=True, backend=backend)
    torch.testing.assert_close(got.s0 + got.abar_rr.sum(-1), torch.ones(B, N - P, device=DEVICE), atol=1e-5, rtol=0)


def test_large_logits(backend):
    q, k, _ = random_qkv(2, 4, 2, 33, 32, magnitude=30.0)
    mask = padding_mask(2, 33, "none")
    got = agdo_kernels.response_attention(q, k, response_start=9, attention_mask=mask, backend=backend)
    s0, abar_rr = _oracle(q, k, mask, 9, False)
    assert torch.isfinite(got.abar_rr).all()
    torch.testing.assert_close(got.abar_rr.double(), abar_rr, atol=2e-5, rtol=0)
    torch.testing.assert_close(got.s0.double(), s0, atol=2e-5, rtol=0)


def test_empty_response_and_empty_prompt(backend):
    q, k, _ = random_qkv(2, 4, 2, 12, 16)
    none = agdo_kernels.response_attention(q, k, response_start=12, backend=backend)
    assert none.s0.shape == (2, 0) and none.abar_rr.shape == (2, 0, 0)
    no_prompt = agdo_kernels.response_attention(q, k, response_start=0, backend=backend)
    assert (no_prompt.s0 == 0).all()
    torch.testing.assert_close(no_prompt.abar_rr.sum(-1), torch.ones(2, 12, device=DEVICE), atol=1e-5, rtol=0)

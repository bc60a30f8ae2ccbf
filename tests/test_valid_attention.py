"""valid_attention: S, O and lse against the float64 oracle and SDPA, on every backend that runs here."""

import pytest
import torch

import agdo_kernels
from conftest import (DEVICE, DTYPES, gqa_sdpa, oracle_abar, oracle_lse, padding_mask, random_qkv,
                      stat_tolerance)

# (B, H, Hkv, N, d): odd N around the tile sizes, GQA ratios 1, 4, 7, 8, head dims 16..128.
SHAPES = [
    (1, 1, 1, 1, 16),
    (2, 4, 1, 17, 32),
    (2, 7, 1, 33, 64),
    (1, 8, 1, 130, 16),
    (2, 2, 2, 70, 128),
    (1, 28, 4, 19, 64),
]


def _unmasked(B, N, kind, seed=1):
    if kind == "empty":
        return torch.zeros(B, N, dtype=torch.bool, device=DEVICE)
    if kind == "full":
        return torch.ones(B, N, dtype=torch.bool, device=DEVICE)
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(B, N, generator=gen) < 0.4).to(DEVICE)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("pattern,u_kind", [("none", "random"), ("both", "random"), ("left", "full"), ("right", "empty")])
def test_matches_oracle(backend, shape, dtype, pattern, u_kind):
    B, H, Hkv, N, d = shape
    q, k, v = random_qkv(B, H, Hkv, N, d, dtype)
    mask = padding_mask(B, N, pattern)
    unmasked = _unmasked(B, N, u_kind)

    res = agdo_kernels.valid_attention(
        q, k, v, unmasked=unmasked, attention_mask=mask, return_output=True, return_lse=True, backend=backend
    )

    abar = oracle_abar(q, k, mask)
    expected_s = (abar * (unmasked & mask)[:, None, :]).sum(-1) * mask
    assert res.s.dtype == torch.float32 and res.s.shape == (B, N)
    torch.testing.assert_close(res.s.double(), expected_s, atol=stat_tolerance(dtype), rtol=0)

    expected_lse = oracle_lse(q, k, mask)
    has_keys = mask.any(-1)
    assert res.lse.dtype == torch.float32 and res.lse.shape == (B, H, N)
    torch.testing.assert_close(res.lse[has_keys].double(), expected_lse[has_keys], atol=1e-4, rtol=1e-5)

    # O: the kernel's error against float64 must be comparable to SDPA's own error at the same precision.
    assert res.out.dtype == dtype and res.out.shape == (B, H, N, d)
    expected_out = gqa_sdpa(q.double(), k.double(), v.double(), mask)[has_keys]
    sdpa_err = (gqa_sdpa(q, k, v, mask)[has_keys].double() - expected_out).abs().max().item()
    ours_err = (res.out[has_keys].double() - expected_out).abs().max().item()
    assert ours_err <= 2 * sdpa_err + stat_tolerance(dtype), (ours_err, sdpa_err)


@pytest.mark.parametrize("shape,Nq", [((2, 4, 1, 37, 32), 13), ((1, 7, 1, 70, 64), 70), ((2, 2, 2, 33, 16), 1)],
                         ids=["gqa-13of37", "all-rows", "one-row"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_queries_that_are_the_last_keys_match_the_full_pass(backend, shape, Nq, dtype):
    """``q`` with the last ``Nq`` rows only (a block against cached keys) = those rows of the full pass."""
    B, H, Hkv, N, d = shape
    q, k, v = random_qkv(B, H, Hkv, N, d, dtype, seed=3)
    mask = padding_mask(B, N, "left")
    unmasked = _unmasked(B, N, "random", seed=4)

    res = agdo_kernels.valid_attention(
        q[:, :, N - Nq :], k, v, unmasked=unmasked, attention_mask=mask, return_output=True, return_lse=True,
        backend=backend,
    )

    abar = oracle_abar(q, k, mask)[:, N - Nq :]
    expected_s = (abar * (unmasked & mask)[:, None, :]).sum(-1) * mask[:, N - Nq :]
    assert res.s.shape == (B, Nq) and res.lse.shape == (B, H, Nq) and res.out.shape == (B, H, Nq, d)
    torch.testing.assert_close(res.s.double(), expected_s, atol=stat_tolerance(dtype), rtol=0)
    full = agdo_kernels.valid_attention(q, k, v, unmasked=unmasked, attention_mask=mask, return_output=True,
                                        return_lse=True, backend=backend)
    rows = mask[:, N - Nq :]
    torch.testing.assert_close(res.lse[rows[:, None, :].expand_as(res.lse)],
                               full.lse[:, :, N - Nq :][rows[:, None, :].expand_as(res.lse)], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(res.out.double(), full.out[:, :, N - Nq :].double(), atol=stat_tolerance(dtype), rtol=0)


def test_more_queries_than_keys_is_refused():
    q, k, v = random_qkv(1, 2, 2, 9, 16)
    with pytest.raises(ValueError, match="queries must be the last keys"):
        agdo_kernels.valid_attention(q, k[:, :, :5], unmasked=torch.ones(1, 5, dtype=torch.bool, device=DEVICE))


def test_float64_reference_is_exact():
    q, k, v = random_qkv(2, 4, 2, 45, 16, torch.float64)
    mask = padding_mask(2, 45, "both")
    unmasked = _unmasked(2, 45, "random")
    res = agdo_kernels.valid_attention(q, k, v, unmasked=unmasked, attention_mask=mask, return_output=True, backend="torch")
    expected = (oracle_abar(q, k, mask) * (unmasked & mask)[:, None, :]).sum(-1) * mask
    torch.testing.assert_close(res.s, expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(res.out, gqa_sdpa(q, k, v, mask), atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_properties(backend, dtype):
    B, H, Hkv, N, d = 3, 8, 2, 41, 32
    q, k, _ = random_qkv(B, H, Hkv, N, d, dtype)
    mask = padding_mask(B, N, "both")
    tol = stat_tolerance(dtype)

    s = agdo_kernels.valid_attention(q, k, unmasked=_unmasked(B, N, "random"), attention_mask=mask, backend=backend)
    assert isinstance(s, torch.Tensor) and torch.isfinite(s).all()
    assert (s >= -tol).all() and (s <= 1 + tol).all()
    assert (s[~mask] == 0).all()

    # U = every key: S is exactly the row's probability mass, 1 on every real row.
    everything = agdo_kernels.valid_attention(q, k, unmasked=_unmasked(B, N, "full"), attention_mask=mask, backend=backend)
    torch.testing.assert_close(everything, mask.float(), atol=tol, rtol=0)
    assert (agdo_kernels.valid_attention(q, k, unmasked=_unmasked(B, N, "empty"), attention_mask=mask, backend=backend) == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_large_logits_stay_finite(backend, dtype):
    B, H, Hkv, N, d = 2, 4, 4, 37, 32
    q, k, v = random_qkv(B, H, Hkv, N, d, dtype, magnitude=30.0)
    mask = padding_mask(B, N, "left")
    unmasked = _unmasked(B, N, "random")
    res = agdo_kernels.valid_attention(q, k, v, unmasked=unmasked, attention_mask=mask, return_output=True, backend=backend)
    assert torch.isfinite(res.s).all() and torch.isfinite(res.out).all()
    expected = (oracle_abar(q, k, mask) * (unmasked & mask)[:, None, :]).sum(-1) * mask
    torch.testing.assert_close(res.s.double(), expected, atol=stat_tolerance(dtype), rtol=0)


def test_all_padding_row_gives_zeros(backend):
    q, k, v = random_qkv(2, 4, 1, 20, 16)
    mask = padding_mask(2, 20, "empty_row")
    res = agdo_kernels.valid_attention(
        q, k, v, unmasked=_unmasked(2, 20, "full"), attention_mask=mask, return_output=True, return_lse=True, backend=backend
    )
    for t in res:
        assert torch.isfinite(t).all()
        assert (t[1] == 0).all()


def test_return_forms(backend):
    q, k, v = random_qkv(1, 2, 1, 9, 16)
    u = _unmasked(1, 9, "random")
    only_lse = agdo_kernels.valid_attention(q, k, unmasked=u, return_lse=True, backend=backend)
    assert isinstance(only_lse, agdo_kernels.ValidAttention) and only_lse.out is None and only_lse.lse.shape == (1, 2, 9)
    s = agdo_kernels.valid_attention(q, k, v, unmasked=u, backend=backend)
    torch.testing.assert_close(s, only_lse.s)


def test_integer_masks_follow_transformers_convention(backend):
    q, k, _ = random_qkv(2, 2, 2, 12, 16)
    mask = padding_mask(2, 12, "left")
    u = _unmasked(2, 12, "random")
    as_bool = agdo_kernels.valid_attention(q, k, unmasked=u, attention_mask=mask, backend=backend)
    as_long = agdo_kernels.valid_attention(q, k, unmasked=u.long(), attention_mask=mask.long(), backend=backend)
    torch.testing.assert_close(as_bool, as_long)


def test_empty_sequence(backend):
    q, k, v = random_qkv(2, 4, 2, 0, 16)
    res = agdo_kernels.valid_attention(
        q, k, v, unmasked=_unmasked(2, 0, "full"), return_output=True, return_lse=True, backend=backend
    )
    assert res.s.shape == (2, 0) and res.out.shape == (2, 4, 0, 16) and res.lse.shape == (2, 4, 0)


def test_batch_rows_are_independent(backend):
    """A row's statistics do not depend on the other rows of the batch (different prompt lengths)."""
    q, k, v = random_qkv(3, 4, 2, 23, 16)
    mask = padding_mask(3, 23, "both")
    u = _unmasked(3, 23, "random")
    batched = agdo_kernels.valid_attention(q, k, unmasked=u, attention_mask=mask, backend=backend)
    for b in range(3):
        alone = agdo_kernels.valid_attention(
            q[b : b + 1], k[b : b + 1], unmasked=u[b : b + 1], attention_mask=mask[b : b + 1], backend=backend
        )
        torch.testing.assert_close(batched[b : b + 1], alone, atol=1e-6, rtol=0)

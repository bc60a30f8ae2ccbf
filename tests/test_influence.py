"""influence: I against the float64 oracle for every norm, and its defining properties."""

from unittest import mock

import pytest
import torch

import agdo_kernels
from conftest import BACKENDS, DEVICE, DTYPES, oracle_influence, padding_mask, random_qkv, stat_tolerance

SHAPES = [(1, 1, 1, 1, 16), (2, 4, 1, 17, 32), (2, 7, 1, 45, 64), (1, 8, 8, 130, 16), (1, 28, 4, 21, 128)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("norm", ["sum", "mean", "max"])
def test_matches_oracle(backend, shape, dtype, norm):
    B, H, Hkv, N, d = shape
    q, k, _ = random_qkv(B, H, Hkv, N, d, dtype)
    mask = padding_mask(B, N, "both")
    query_mask = (torch.rand(B, N, generator=torch.Generator().manual_seed(3)) < 0.6).to(DEVICE)
    got = agdo_kernels.influence(q, k, attention_mask=mask, query_mask=query_mask, norm=norm, backend=backend)
    assert got.dtype == torch.float32 and got.shape == (B, N) and torch.isfinite(got).all()
    # I sums up to N rows' mass (norm="sum"): scale the tolerance with the number of rows.
    tol = stat_tolerance(dtype) * (N if norm == "sum" else 1)
    torch.testing.assert_close(got.double(), oracle_influence(q, k, mask, query_mask, norm), atol=tol, rtol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_properties(backend, dtype):
    B, H, Hkv, N, d = 3, 4, 2, 53, 32
    q, k, _ = random_qkv(B, H, Hkv, N, d, dtype)
    mask = padding_mask(B, N, "both")
    n_rows = mask.sum(-1).double()

    total = agdo_kernels.influence(q, k, attention_mask=mask, backend=backend)  # default norm="sum" (SPEC §2)
    torch.testing.assert_close(total.double().sum(-1), n_rows, atol=N * stat_tolerance(dtype), rtol=0)
    assert (total[~mask] == 0).all() and (total >= 0).all()

    mean = agdo_kernels.influence(q, k, attention_mask=mask, norm="mean", backend=backend)
    torch.testing.assert_close(mean.double().sum(-1), torch.ones_like(n_rows), atol=10 * stat_tolerance(dtype), rtol=0)

    largest = agdo_kernels.influence(q, k, attention_mask=mask, norm="max", backend=backend).amax(-1)
    torch.testing.assert_close(largest, torch.ones_like(largest))


def test_given_lse_saves_the_pass_and_agrees(backend):
    q, k, _ = random_qkv(2, 4, 2, 31, 16)
    mask = padding_mask(2, 31, "left")
    no_keys = torch.zeros(2, 31, dtype=torch.bool, device=DEVICE)
    lse = agdo_kernels.valid_attention(q, k, unmasked=no_keys, attention_mask=mask, return_lse=True, backend=backend).lse
    with_lse = agdo_kernels.influence(q, k, lse=lse, attention_mask=mask, backend=backend)
    without = agdo_kernels.influence(q, k, attention_mask=mask, backend=backend)
    torch.testing.assert_close(with_lse, without, atol=1e-6, rtol=0)


def test_large_logits_and_empty_rows(backend):
    q, k, _ = random_qkv(2, 4, 1, 29, 32, magnitude=30.0)
    mask = padding_mask(2, 29, "empty_row")
    got = agdo_kernels.influence(q, k, attention_mask=mask, norm="sum", backend=backend)
    assert torch.isfinite(got).all() and (got[1] == 0).all()
    torch.testing.assert_close(got.double(), oracle_influence(q, k, mask, mask, "sum"), atol=29 * 2e-5, rtol=1e-4)
    empty = agdo_kernels.influence(q[:, :, :0], k[:, :, :0], backend=backend)
    assert empty.shape == (2, 0)


def test_no_valid_query_rows_gives_zeros(backend):
    q, k, _ = random_qkv(1, 2, 2, 10, 16)
    none = torch.zeros(1, 10, dtype=torch.bool, device=DEVICE)
    for norm in ("sum", "mean", "max"):
        got = agdo_kernels.influence(q, k, query_mask=none, norm=norm, backend=backend)
        assert torch.isfinite(got).all() and (got == 0).all()


@pytest.fixture
def warp_specialized():
    agdo_kernels.set_warp_specialize(True)
    yield
    agdo_kernels.set_warp_specialize(False)


@pytest.mark.parametrize("shape", [(2, 4, 2, 37, 16), (1, 6, 2, 70, 64)],
                         ids=lambda s: "x".join(map(str, s)))  # fmt: skip
@pytest.mark.parametrize("dtype", [d for d in DTYPES if d != torch.float32], ids=str)
def test_warp_specialized_variant_matches_oracle(warp_specialized, shape, dtype):
    """The Hopper variant (Q and K through TMA descriptors, one query loop with no ragged tail): the same I as
    the float64 oracle with left padding, a query mask and a ragged last tile; rows TMA cannot address (a
    head-dim stride other than 1) take the pointer variant. Which variant ran is read from the launch."""
    if "triton" not in BACKENDS:
        pytest.skip("Triton needs a CUDA device, or TRITON_INTERPRET=1 on CPU")
    if DEVICE.type == "cuda" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the warp-specialised variant needs sm_90 or later")
    from agdo_kernels.triton import influence as module

    B, H, Hkv, N, d = shape
    q, k, _ = random_qkv(B, H, Hkv, N, d, dtype)
    mask = padding_mask(B, N, "left")
    query_mask = (torch.rand(B, N, generator=torch.Generator().manual_seed(5)) < 0.6).to(DEVICE)
    variants, launch = [], module.launch

    def spy(*args, **kwargs):
        variants.append(kwargs["WARP_SPECIALIZE"])
        return launch(*args, **kwargs)

    strided_q = q.transpose(2, 3).contiguous().transpose(2, 3)  # same values, head-dim stride N
    with mock.patch.object(module, "launch", spy):
        got = agdo_kernels.influence(q, k, attention_mask=mask, query_mask=query_mask, backend="triton")
        fallback = agdo_kernels.influence(strided_q, k, attention_mask=mask, query_mask=query_mask, backend="triton")
        unmasked = agdo_kernels.influence(q, k, backend="triton")
    assert variants == [True, False, True]
    tol = stat_tolerance(dtype) * N
    torch.testing.assert_close(got.double(), oracle_influence(q, k, mask, query_mask, "sum"), atol=tol, rtol=1e-4)
    torch.testing.assert_close(fallback, got, atol=tol, rtol=1e-4)
    no_mask = torch.ones(B, N, dtype=torch.bool, device=DEVICE)
    torch.testing.assert_close(unmasked.double(), oracle_influence(q, k, no_mask, no_mask, "sum"), atol=tol, rtol=1e-4)

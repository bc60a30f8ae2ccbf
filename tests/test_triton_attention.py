"""The Triton launchers against a naive float64 oracle that materialises every head's ``P``.

Runs on a GPU, or on CPU under ``TRITON_INTERPRET=1`` (where the kernels use 16x16 tiles, so the odd
sizes below cross tile boundaries). The oracle is written here, independent of ``reference/``.
Launchers allocate with ``torch.empty``; an autouse fixture makes that NaN-filled, so an element a
kernel forgets to write shows up as NaN.
"""

import math
import os

import pytest
import torch

pytest.importorskip("triton")
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
if not (INTERPRETED or torch.cuda.is_available()):
    pytest.skip("Triton needs a CUDA device, or TRITON_INTERPRET=1 on CPU", allow_module_level=True)

from agdo_kernels.triton.influence import influence_sum  # noqa: E402
from agdo_kernels.triton.response_attention import response_block  # noqa: E402
from agdo_kernels.triton.valid_attention import valid_attention  # noqa: E402

DEVICE = torch.device("cpu" if INTERPRETED else "cuda")
# The interpreter mis-computes tl.dot on bf16: bf16 only on a GPU.
DTYPES = [torch.float32, torch.float16] + ([] if INTERPRETED else [torch.bfloat16])
# fp16/bf16 products are exact in fp32, so fp32-accumulated statistics are as accurate as for fp32 inputs.
STAT_ATOL = 2e-5
OUT_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

# (B, H, Hkv, N, d): N = 1, N around the 16-row interpreter tiles, GQA ratios 1, 4, 7.
SHAPES = [
    (1, 1, 1, 1, 16),
    (2, 4, 1, 17, 32),
    (2, 2, 2, 33, 64),
    (1, 7, 1, 130, 16),
]
PADDINGS = ["none", "left", "right", "mixed", "empty_row"]


@pytest.fixture(autouse=True)
def nan_filled_empty(monkeypatch):
    real_empty = torch.empty

    def poisoned_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", poisoned_empty)


def make_inputs(shape, dtype, magnitude=1.0, seed=0):
    B, H, Hkv, N, d = shape
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, N, d, generator=gen) * magnitude
    k, v = (torch.randn(B, Hkv, N, d, generator=gen) for _ in range(2))
    return q.to(DEVICE, dtype), k.to(DEVICE, dtype), v.to(DEVICE, dtype)


def make_padding(B, N, kind, seed=0):
    """(B, N) attention mask: real tokens True. 'mixed' pads each row differently on both sides."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, N, dtype=torch.bool)
    for b in range(B):
        cut = lambda: int(torch.randint(1, max(N // 2, 2), (1,), generator=gen))  # noqa: E731
        if kind in ("left", "mixed"):
            mask[b, : cut() if N > 1 else 0] = False
        if kind in ("right", "mixed"):
            mask[b, N - (cut() if N > 1 else 0) :] = False
    if kind == "empty_row":
        mask[-1] = False
    return mask.to(DEVICE)


def random_mask(B, N, p, seed):
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(B, N, generator=gen) < p).to(DEVICE)


def naive_probs(q, k, attention_mask, scale):
    """float64 ``P (B, H, N, N)`` and natural-log ``lse (B, H, N)``; rows without real keys: P = lse = 0."""
    g = q.shape[1] // k.shape[1]
    logits = q.double() @ k.double().repeat_interleave(g, 1).transpose(-1, -2) * scale
    if attention_mask is not None:
        logits = logits.masked_fill(~attention_mask[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(logits, -1)
    probs = torch.nan_to_num(torch.exp(logits - lse[..., None]), nan=0.0)
    return probs, torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))


def padded_case_ids(case):
    shape, kind = case
    return "x".join(map(str, shape)) + "-" + kind


VALID_CASES = [(SHAPES[0], "none"), (SHAPES[0], "empty_row"), (SHAPES[1], "mixed"), (SHAPES[2], "left")]
VALID_CASES += [(SHAPES[3], "right")]


@pytest.mark.parametrize("case", VALID_CASES, ids=padded_case_ids)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_valid_attention_matches_naive(case, dtype):
    shape, kind = case
    B, H, Hkv, N, d = shape
    q, k, v = make_inputs(shape, dtype)
    mask = make_padding(B, N, kind)
    unmasked = random_mask(B, N, 0.5, seed=1)
    scale = 0.7 / math.sqrt(d)

    s, out, lse = valid_attention(q, k, v, unmasked, mask, scale, True, True)

    probs, expected_lse = naive_probs(q, k, mask, scale)
    expected_s = (probs * unmasked[:, None, None, :]).sum(-1).mean(1) * mask
    g = H // Hkv
    expected_out = probs @ v.double().repeat_interleave(g, 1)
    assert s.shape == (B, N) and s.dtype == torch.float32
    assert out.shape == (B, H, N, d) and out.dtype == dtype
    assert lse.shape == (B, H, N) and lse.dtype == torch.float32
    torch.testing.assert_close(s.double(), expected_s, atol=STAT_ATOL, rtol=0)
    torch.testing.assert_close(lse.double(), expected_lse, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.double(), expected_out, atol=OUT_TOL[dtype], rtol=OUT_TOL[dtype])


def test_valid_attention_partial_returns_match_full_pass():
    shape = SHAPES[1]
    q, k, v = make_inputs(shape, torch.float32)
    mask = make_padding(shape[0], shape[3], "mixed")
    unmasked = random_mask(shape[0], shape[3], 0.3, seed=2)
    full_s, _, full_lse = valid_attention(q, k, v, unmasked, mask, 0.25, True, True)

    s, out, lse = valid_attention(q, k, None, unmasked, mask, 0.25, False, False)
    assert out is None and lse is None
    torch.testing.assert_close(s, full_s, atol=1e-6, rtol=0)
    s, out, lse = valid_attention(q, k, None, unmasked, None, 0.25, False, True)
    probs, expected_lse = naive_probs(q, k, None, 0.25)
    torch.testing.assert_close(lse.double(), expected_lse, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s.double(), (probs * unmasked[:, None, None, :]).sum(-1).mean(1), atol=STAT_ATOL, rtol=0)


def test_value_head_dim_may_differ_from_query_head_dim():
    q, k, _ = make_inputs((2, 4, 2, 17, 16), torch.float32, seed=8)
    v = torch.randn(2, 2, 17, 64, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    mask = make_padding(2, 17, "mixed", seed=8)
    unmasked = random_mask(2, 17, 0.5, seed=8)
    _, out, _ = valid_attention(q, k, v, unmasked, mask, 0.25, True, False)
    probs, _ = naive_probs(q, k, mask, 0.25)
    assert out.shape == (2, 4, 17, 64)
    torch.testing.assert_close(out.double(), probs @ v.double().repeat_interleave(2, 1), atol=1e-5, rtol=1e-5)


# Padded keys' p may overflow to inf before the kernels zero those columns; only the results must be finite.
@pytest.mark.filterwarnings("ignore:overflow encountered in exp2:RuntimeWarning")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_large_logits_stay_finite_and_exact(dtype):
    """Inputs x30 make softmax nearly one-hot with logits in the thousands: the running max must cope."""
    shape = (1, 4, 1, 40, 32)
    q, k, v = make_inputs(shape, dtype, magnitude=30.0, seed=3)
    k = k * 30
    mask = make_padding(1, 40, "mixed", seed=3)
    unmasked = random_mask(1, 40, 0.5, seed=3)
    scale = 1 / math.sqrt(32)

    s, out, lse = valid_attention(q, k, v, unmasked, mask, scale, True, True)
    total = influence_sum(q, k, lse, mask, None, scale)
    abar = response_block(q, k, lse, 10, mask, True, scale)

    for t in (s, out, lse, total, abar):
        assert torch.isfinite(t).all()
    probs, expected_lse = naive_probs(q, k, mask, scale)
    torch.testing.assert_close(lse.double(), expected_lse, atol=1e-3, rtol=1e-6)
    # Near-one-hot p is exp of a difference of ~1e3-sized fp32 numbers: allow their rounding.
    expected_s = (probs * unmasked[:, None, None, :]).sum(-1).mean(1) * mask
    torch.testing.assert_close(s.double(), expected_s, atol=1e-3, rtol=0)
    expected_out = probs @ v.double().repeat_interleave(4, 1)
    torch.testing.assert_close(out.double(), expected_out, atol=1e-2, rtol=OUT_TOL[dtype])
    expected_total = (probs * mask[:, None, :, None]).sum(2).mean(1)
    torch.testing.assert_close(total.double(), expected_total, atol=1e-2, rtol=1e-3)
    torch.testing.assert_close(abar.double(), probs.mean(1)[:, 9:39, 10:], atol=1e-3, rtol=0)


INFLUENCE_CASES = [(SHAPES[0], "none"), (SHAPES[1], "mixed"), (SHAPES[2], "empty_row"), (SHAPES[3], "left")]


@pytest.mark.parametrize("case", INFLUENCE_CASES, ids=padded_case_ids)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_influence_sum_matches_naive(case, dtype):
    shape, kind = case
    B, H, Hkv, N, d = shape
    q, k, _ = make_inputs(shape, dtype, seed=4)
    mask = make_padding(B, N, kind, seed=4)
    query_mask = random_mask(B, N, 0.6, seed=5)
    scale = 1 / math.sqrt(d)
    probs, lse = naive_probs(q, k, mask, scale)

    total = influence_sum(q, k, lse.float(), mask, query_mask, scale)

    rows = mask & query_mask
    expected = (probs * rows[:, None, :, None]).sum(2).mean(1)
    assert total.shape == (B, N) and total.dtype == torch.float32
    torch.testing.assert_close(total.double(), expected, atol=STAT_ATOL * N, rtol=1e-5)
    assert (total[~mask] == 0).all()


def test_influence_sum_without_masks_counts_every_row():
    shape = (2, 8, 2, 21, 16)
    q, k, _ = make_inputs(shape, torch.float32, seed=6)
    probs, lse = naive_probs(q, k, None, 0.3)
    total = influence_sum(q, k, lse.float(), None, None, 0.3)
    torch.testing.assert_close(total.double(), probs.sum(2).mean(1), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(total.sum(-1).double().cpu(), torch.full((2,), 21.0, dtype=torch.float64), atol=1e-4, rtol=0)


# (shape, padding, response_start, shift): R = 1, R crossing tiles, Dream-like GQA 7 with shift.
RESPONSE_CASES = [
    ((1, 4, 1, 17, 32), "none", 16, False),
    ((2, 4, 1, 17, 32), "mixed", 1, True),
    ((2, 2, 2, 40, 64), "right", 5, False),
    ((1, 7, 1, 50, 16), "left", 13, True),
    ((2, 2, 1, 20, 16), "empty_row", 4, True),
]


def response_case_id(case):
    shape, kind, start, shift = case
    return f"{'x'.join(map(str, shape))}-{kind}-P{start}-shift{int(shift)}"


@pytest.mark.parametrize("case", RESPONSE_CASES, ids=response_case_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_response_block_matches_naive(case, dtype):
    shape, kind, start, shift = case
    B, H, Hkv, N, d = shape
    q, k, _ = make_inputs(shape, dtype, seed=7)
    mask = make_padding(B, N, kind, seed=7)
    scale = 1 / math.sqrt(d)
    probs, lse = naive_probs(q, k, mask, scale)

    abar = response_block(q, k, lse.float(), start, mask, shift, scale)

    pred = torch.arange(start, N, device=DEVICE) - int(shift)
    expected = probs.mean(1)[:, pred, start:]
    assert abar.shape == (B, N - start, N - start) and abar.dtype == torch.float32
    torch.testing.assert_close(abar.double(), expected, atol=STAT_ATOL, rtol=0)


@pytest.mark.parametrize("arch", [80, 90], ids=["sm80-key-tile-per-group", "sm90-next-key-tile-prefetched"])
def test_response_block_walks_every_key_head_group(arch, monkeypatch):
    """Three key heads of two query heads each, so the GQA loop moves on to new key tiles: on sm_90 the next
    group's tile is loaded during this group's heads, before sm_90 at the top of each group; both variants run
    here (the launcher picks by the device's architecture)."""
    from agdo_kernels.triton import response_attention

    monkeypatch.setattr(response_attention, "cuda_arch", lambda device: arch)
    shape, start = (2, 6, 3, 37, 16), 5
    q, k, _ = make_inputs(shape, torch.float32, seed=11)
    mask = make_padding(2, 37, "mixed", seed=11)
    probs, lse = naive_probs(q, k, mask, 0.25)

    abar = response_block(q, k, lse.float(), start, mask, True, 0.25)

    expected = probs.mean(1)[:, torch.arange(start, 37, device=DEVICE) - 1, start:]
    torch.testing.assert_close(abar.double(), expected, atol=STAT_ATOL, rtol=0)


def test_empty_sequences_give_zeros():
    q, k, v = make_inputs((2, 4, 2, 0, 16), torch.float32)
    no_tokens = torch.zeros(2, 0, dtype=torch.bool, device=DEVICE)
    s, out, lse = valid_attention(q, k, v, no_tokens, no_tokens, 0.25, True, True)
    assert s.shape == (2, 0) and out.shape == (2, 4, 0, 16) and lse.shape == (2, 4, 0)
    assert influence_sum(q, k, lse, None, None, 0.25).shape == (2, 0)

    q, k, _ = make_inputs((2, 4, 2, 6, 16), torch.float32)
    _, _, lse = valid_attention(q, k, None, torch.ones(2, 6, dtype=torch.bool, device=DEVICE), None, 0.25, False, True)
    abar = response_block(q, k, lse, 6, None, True, 0.25)
    assert abar.shape == (2, 0, 0)


def test_unsupported_head_dims_and_dtype_are_rejected():
    q, k, v = make_inputs((1, 2, 1, 4, 24), torch.float32)
    unmasked = torch.ones(1, 4, dtype=torch.bool, device=DEVICE)
    with pytest.raises(ValueError, match=r'`q` has head dim 24.*backend="torch"'):
        valid_attention(q, k, v, unmasked, None, 0.2, True, False)
    lse = torch.zeros(1, 2, 4, device=DEVICE)
    with pytest.raises(ValueError, match="`q` has head dim 24"):
        influence_sum(q, k, lse, None, None, 0.2)
    with pytest.raises(ValueError, match="`q` has head dim 24"):
        response_block(q, k, lse, 1, None, False, 0.2)

    q, k, _ = make_inputs((1, 2, 1, 4, 32), torch.float32)
    v48 = torch.zeros(1, 1, 4, 48, device=DEVICE)
    with pytest.raises(ValueError, match="`v` has head dim 48"):
        valid_attention(q, k, v48, unmasked, None, 0.2, True, False)
    with pytest.raises(TypeError, match='float64.*backend="torch"'):
        valid_attention(q.double(), k.double(), None, unmasked, None, 0.2, False, False)


def test_strided_inputs_match_contiguous():
    """transformers hands over q/k/v as (B, N, H, d) buffers viewed as (B, H, N, d): strides, not copies."""
    B, H, Hkv, N, d = 2, 4, 2, 19, 32
    gen = torch.Generator().manual_seed(10)
    q = torch.randn(B, N, H, d, generator=gen).to(DEVICE).transpose(1, 2)
    k, v = (torch.randn(B, N, Hkv, d, generator=gen).to(DEVICE).transpose(1, 2) for _ in range(2))
    mask = make_padding(B, N, "mixed", seed=10)
    unmasked = random_mask(B, N, 0.5, seed=10)
    strided = valid_attention(q, k, v, unmasked, mask, 0.2, True, True)
    contiguous = valid_attention(q.contiguous(), k.contiguous(), v.contiguous(), unmasked, mask, 0.2, True, True)
    for got, want in zip(strided, contiguous):
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    lse = strided[2]
    torch.testing.assert_close(
        influence_sum(q, k, lse, mask, None, 0.2), influence_sum(q.contiguous(), k.contiguous(), lse, mask, None, 0.2)
    )
    torch.testing.assert_close(
        response_block(q, k, lse, 7, mask, True, 0.2),
        response_block(q.contiguous(), k.contiguous(), lse, 7, mask, True, 0.2),
    )


@pytest.mark.parametrize("with_mask", [True, False], ids=["mask", "no_mask"])
def test_key_order_puts_u_first_and_leaves_padding_out(with_mask):
    """The launcher's one-launch key order: per row the real keys of U ascending, then the other real keys
    ascending (padding nowhere, also not a padded key of U), with the counts [keys of U, real keys]; rows
    longer than one 1024-key chunk of the kernel, a row without real keys; the non-finite flags zeroed."""
    from agdo_kernels.triton.valid_attention import key_order

    gen = torch.Generator().manual_seed(5)
    mask = torch.rand(5, 1500, generator=gen) < 0.7
    mask[1, :700] = False
    mask[2, 1100:] = False
    mask[3] = False
    mask[4] = True
    unmasked = torch.rand(5, 1500, generator=gen) < 0.4
    unmasked[0] = True
    unmasked[1, 300:1200] = False
    flags = torch.full((5,), 7, dtype=torch.int32, device=DEVICE)
    order, counts = key_order(unmasked.to(DEVICE), mask.to(DEVICE) if with_mask else None, flags)
    assert torch.equal(flags.cpu(), torch.zeros(5, dtype=torch.int32))  # the non-finite flags, zeroed
    assert order.dtype == counts.dtype == torch.int32 and order.shape == (5, 1500) and counts.shape == (5, 2)
    for b in range(5):
        real = [j for j in range(1500) if not with_mask or mask[b, j]]
        in_u = [j for j in real if unmasked[b, j]]
        expected = in_u + [j for j in real if not unmasked[b, j]]
        assert counts[b].tolist() == [len(in_u), len(real)], b
        assert order[b, : len(real)].tolist() == expected, b


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_valid_attention_visits_keys_in_u_first(dtype):
    """The kernel visits each row's real keys of U first, then the rest, and skips whole blocks' per-key work
    except where U ends. With the interpreter's 16-key blocks, rows whose order puts U's end on a block
    boundary, U scattered as pure diffusion leaves it, every real key in U (the ragged last block in U), and
    no key in U; with left padding, and padded keys in U (callers pass the prompt's padding in U)."""
    B, H, Hkv, N, d = 4, 4, 2, 86, 32
    q, k, v = make_inputs((B, H, Hkv, N, d), dtype, seed=11)
    mask = torch.ones(B, N, dtype=torch.bool)
    for b, padding in enumerate((6, 0, 5, 9)):
        mask[b, :padding] = False
    unmasked = torch.zeros(B, N, dtype=torch.bool)
    unmasked[0, :38] = True  # 32 real keys of U: U ends on a block boundary
    unmasked[1] = torch.rand(N, generator=torch.Generator().manual_seed(1)) < 0.5
    unmasked[2] = True
    unmasked = unmasked.to(DEVICE)
    mask = mask.to(DEVICE)
    scale = 1 / math.sqrt(d)

    s, out, _ = valid_attention(q, k, v, unmasked, mask, scale, True, False)

    probs, _ = naive_probs(q, k, mask, scale)
    expected_s = (probs * unmasked[:, None, None, :]).sum(-1).mean(1) * mask
    torch.testing.assert_close(s.double(), expected_s, atol=STAT_ATOL, rtol=0)
    expected_out = probs @ v.double().repeat_interleave(H // Hkv, 1)
    torch.testing.assert_close(out.double(), expected_out, atol=OUT_TOL[dtype], rtol=OUT_TOL[dtype])


def test_floor_without_s_is_plain_attention():
    """bench/'s FlashAttention floor (``compute_s=False``: no S, keys read in place) must be real attention, or
    timing the shipped kernel against it says nothing: O and lse as the naive softmax, on odd N and GQA."""
    B, H, Hkv, N, d = 2, 4, 2, 37, 32
    q, k, v = make_inputs((B, H, Hkv, N, d), torch.float32, seed=12)
    scale = 1 / math.sqrt(d)
    unmasked = torch.ones(B, N, dtype=torch.bool, device=DEVICE)
    _, out, lse = valid_attention(q, k, v, unmasked, None, scale, True, True, compute_s=False)
    probs, expected_lse = naive_probs(q, k, None, scale)
    expected_out = probs @ v.double().repeat_interleave(H // Hkv, 1)
    torch.testing.assert_close(out.double(), expected_out, atol=OUT_TOL[torch.float32], rtol=OUT_TOL[torch.float32])
    torch.testing.assert_close(lse.double(), expected_lse, atol=1e-4, rtol=0)


@pytest.mark.parametrize("with_masks", [True, False], ids=["masks", "no_masks"])
def test_counted_rows_lse_extents_and_flags(with_masks):
    """influence's one-launch preparation: base-2 lse of counted rows (+inf elsewhere) from a strided lse,
    per row [first counted row, last + 1, first real key, last + 1), and the non-finite flags zeroed."""
    from agdo_kernels.triton.influence import counted_rows

    gen = torch.Generator().manual_seed(6)
    B, H, N = 4, 3, 1100
    lse = torch.randn(B, N, H, generator=gen).to(DEVICE).transpose(1, 2)  # strided (B, H, N)
    attention_mask = torch.rand(B, N, generator=gen) < 0.8
    attention_mask[1, :500] = False
    attention_mask[3] = False
    query_mask = torch.rand(B, N, generator=gen) < 0.5
    query_mask[2, 900:] = False
    if not with_masks:
        attention_mask = query_mask = torch.ones(B, N, dtype=torch.bool)
    flags = torch.full((B,), 7, dtype=torch.int32, device=DEVICE)
    masks = (attention_mask.to(DEVICE), query_mask.to(DEVICE)) if with_masks else (None, None)
    lse2, extent = counted_rows(lse, *masks, flags)
    assert torch.equal(flags.cpu(), torch.zeros(B, dtype=torch.int32))
    counted = attention_mask & query_mask
    expected = torch.where(counted[:, None, :], lse.cpu().float() * math.log2(math.e), float("inf"))
    torch.testing.assert_close(lse2.cpu(), expected, rtol=1e-6, atol=0)
    for b in range(B):
        rows, keys = counted[b].nonzero().flatten().tolist(), attention_mask[b].nonzero().flatten().tolist()
        want = (rows[0], rows[-1] + 1) if rows else (N, 0)
        want += (keys[0], keys[-1] + 1) if keys else (N, 0)
        assert tuple(extent[b].tolist()) == want, b

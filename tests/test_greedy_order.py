"""greedy_order (AGDO Algorithm 1) on every backend against a naive oracle written here.

The oracle shares nothing with the backends: one sequence at a time, float64, ``S`` recomputed from
scratch every round from the whole picked set, picks by sorting on ``(-S, position)``, steps numbered
from a sorted set of ``(block, rank)`` pairs. Inputs for it sit on a grid of multiples of 1/16, so every
float sum is exact in float32 too and ties are real: the backends must match it exactly, ties included.
On continuous data, where rounding matters, every float32 backend must match the torch reference bit
for bit (they share one summation order).
"""

from __future__ import annotations

import math

import pytest
import torch

import agdo_kernels
from agdo_kernels import _backends

HAS_GPU = torch.cuda.is_available()
NEEDS_GPU = [pytest.mark.gpu, pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device")]


def _cuda_extension_reason():
    if not HAS_GPU:
        return "needs a CUDA device"
    from agdo_kernels import _cuda

    return _cuda.unavailable_reason()


BACKEND_DEVICES = [
    pytest.param("torch", "cpu", id="torch-cpu"),
    pytest.param(
        "triton",
        "cpu",
        id="triton-interpreter",
        marks=pytest.mark.skipif(not _backends.triton_interpreted(), reason="Triton on CPU needs TRITON_INTERPRET=1"),
    ),
    pytest.param("torch", "cuda", id="torch-cuda", marks=NEEDS_GPU),
    pytest.param("triton", "cuda", id="triton-cuda", marks=NEEDS_GPU),
    pytest.param(
        "cuda",
        "cuda",
        id="cuda-extension",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(_cuda_extension_reason() is not None, reason=str(_cuda_extension_reason())),
        ],
    ),
]
FLOAT32_BACKENDS_ON_GPU = [pytest.param("triton", id="triton"), pytest.param("cuda", id="cuda")]


def oracle_steps(abar, s0, valid, step_size, block_size, block_mode):
    abar, s0, valid = abar.double().cpu(), s0.double().cpu(), valid.cpu()
    B, R = s0.shape
    steps = torch.full((B, R), -1, dtype=torch.int32)
    if block_mode == "within" and block_size is not None:
        windows = [range(start, min(start + block_size, R)) for start in range(0, R, block_size)]
    else:
        windows = [range(R)]
    for b in range(B):
        picked, rank, round_number = [], {}, 0
        for window in windows:
            left = [i for i in window if valid[b, i]]
            while left:
                score = s0[b] + abar[b][:, picked].sum(dim=1)
                # Largest score first, ties to the lower position; NaN sorts as -inf (the documented rule).
                chosen = sorted(left, key=lambda i: (math.inf if math.isnan(float(score[i])) else -float(score[i]),
                                                     i))[:step_size]
                for i in chosen:
                    rank[i] = round_number
                picked += chosen
                left = [i for i in left if i not in chosen]
                round_number += 1
        block_of = {i: (i // block_size if block_size is not None else 0) for i in rank}
        numbering = {pair: n for n, pair in enumerate(sorted({(block_of[i], rank[i]) for i in rank}))}
        for i in rank:
            steps[b, i] = numbering[(block_of[i], rank[i])]
    return steps


def grid_inputs(B, R, seed, dtype=torch.float32):
    """Abar and s0 in {0, 1/16, 2/16, 3/16} (many exact ties); valid lengths differ per row: row 0 full,
    row 1 with scattered holes, row 2 holes and an invalid tail, row 3 (if any) all invalid."""
    gen = torch.Generator().manual_seed(seed)
    abar = torch.randint(0, 4, (B, R, R), generator=gen).to(dtype) / 16
    s0 = torch.randint(0, 4, (B, R), generator=gen).to(dtype) / 16
    valid = torch.rand(B, R, generator=gen) > 0.25
    valid[0] = True
    if B > 2:
        valid[2, R - R // 3 :] = False
    if B > 3:
        valid[3] = False
    return abar, s0, valid


def continuous_inputs(B, R, seed, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    abar = torch.softmax(torch.randn(B, R, R, generator=gen) * 3, dim=-1)
    s0 = torch.rand(B, R, generator=gen)
    valid = torch.rand(B, R, generator=gen) > 0.1
    valid[-1, R - R // 4 :] = False
    return abar.to(device), s0.to(device), valid.to(device)


def run(backend, device, abar, s0, valid, **options):
    out = agdo_kernels.greedy_order(abar.to(device), s0.to(device), valid=valid.to(device), backend=backend, **options)
    assert out.dtype == torch.int32 and out.device.type == torch.device(device).type
    return out.cpu()


BLOCKINGS = [
    pytest.param(37, None, id="R37-one-block"),
    pytest.param(37, 5, id="R37-block5-not-dividing"),
    pytest.param(40, 8, id="R40-block8-dividing"),
    pytest.param(37, 1, id="R37-block1"),
]


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
@pytest.mark.parametrize("R, block_size", BLOCKINGS)
@pytest.mark.parametrize("block_mode", ["global", "within"])
@pytest.mark.parametrize("step_size", [1, 3, 16])
def test_matches_oracle_with_ties(backend, device, R, block_size, block_mode, step_size):
    abar, s0, valid = grid_inputs(4, R, seed=R + step_size)
    options = dict(step_size=step_size, block_size=block_size, block_mode=block_mode)
    expected = oracle_steps(abar, s0, valid, **options)
    assert torch.equal(run(backend, device, abar, s0, valid, **options), expected)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_float64_inputs(backend, device):
    abar, s0, valid = grid_inputs(3, 29, seed=5, dtype=torch.float64)
    options = dict(step_size=2, block_size=7, block_mode="within")
    assert torch.equal(run(backend, device, abar, s0, valid, **options), oracle_steps(abar, s0, valid, **options))


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_hand_computed_example(backend, device):
    # S0 = [.5, 0, .25, 0]; picking token 0 gives token 3 +1, picking token 3 gives token 1 +.5.
    abar = torch.zeros(1, 4, 4)
    abar[0, 3, 0] = 1.0
    abar[0, 1, 3] = 0.5
    s0 = torch.tensor([[0.5, 0.0, 0.25, 0.0]])
    valid = torch.ones(1, 4, dtype=torch.bool)
    order = lambda **options: run(backend, device, abar, s0, valid, **options).tolist()  # noqa: E731
    assert order(step_size=1) == [[0, 2, 3, 1]]  # picks 0, 3, 1, 2
    assert order(step_size=1, block_size=2) == [[0, 1, 3, 2]]  # (block, rank): (0,0) (0,2) (1,3) (1,1)
    assert order(step_size=2) == [[0, 1, 0, 1]]  # round 0: {0, 2}; then S3 = 1 > S1 = 0
    assert order(step_size=4) == [[0, 0, 0, 0]]


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_all_ties_go_left_to_right(backend, device):
    R = 11
    valid = torch.ones(2, R, dtype=torch.bool)
    valid[1, 4] = False
    steps = run(backend, device, torch.zeros(2, R, R), torch.zeros(2, R), valid, step_size=3)
    assert steps[0].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3]
    assert steps[1].tolist() == [0, 0, 0, 1, -1, 1, 1, 2, 2, 2, 3]


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
@pytest.mark.parametrize("block_size, block_mode", [(None, "global"), (6, "global"), (6, "within")])
def test_dense_steps_and_invalid_positions(backend, device, block_size, block_mode):
    abar, s0, valid = continuous_inputs(3, 45, seed=1)
    valid[1] = False
    steps = run(backend, device, abar, s0, valid, step_size=4, block_size=block_size, block_mode=block_mode)
    assert steps.shape == (3, 45)
    assert torch.equal(steps < 0, ~valid)
    assert (steps[~valid] == -1).all()
    for b in range(3):
        used = steps[b][valid[b]].unique()
        assert torch.equal(used, torch.arange(used.numel(), dtype=torch.int32))
    if block_size is None:  # one block: ceil(T / step_size) rounds
        assert int(steps[0].max()) + 1 == -(-int(valid[0].sum()) // 4)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_empty_inputs(backend, device):
    for B, R in [(2, 0), (0, 5)]:
        no_tokens = torch.zeros(B, R, dtype=torch.bool)
        assert run(backend, device, torch.zeros(B, R, R), torch.zeros(B, R), no_tokens, step_size=2).shape == (B, R)
    nothing_valid = torch.zeros(2, 6, dtype=torch.bool)
    steps = run(backend, device, torch.rand(2, 6, 6), torch.rand(2, 6), nothing_valid, step_size=2, block_size=4)
    assert (steps == -1).all()


@pytest.mark.parametrize("backend, device", [p for p in BACKEND_DEVICES if p.values[0] != "torch"])
@pytest.mark.parametrize("step_size, block_size, block_mode", [(1, None, "global"), (4, 16, "within")])
def test_float32_backends_agree_with_reference_bit_for_bit(backend, device, step_size, block_size, block_mode):
    abar, s0, valid = continuous_inputs(3, 67, seed=2)
    options = dict(step_size=step_size, block_size=block_size, block_mode=block_mode)
    expected = run("torch", "cpu", abar, s0, valid, **options)
    assert torch.equal(run(backend, device, abar, s0, valid, **options), expected)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device")
@pytest.mark.parametrize("backend", FLOAT32_BACKENDS_ON_GPU)
@pytest.mark.parametrize("R", [256, 1000, 2048, 5000])
@pytest.mark.parametrize("step_size", [1, 16])
def test_long_rows_on_gpu_match_reference(backend, R, step_size):
    if backend == "cuda" and _cuda_extension_reason() is not None:
        pytest.skip(_cuda_extension_reason())
    abar, s0, valid = continuous_inputs(3, R, seed=R, device="cuda")
    options = dict(step_size=step_size, block_size=32, block_mode="global")
    expected = agdo_kernels.greedy_order(abar, s0, valid=valid, backend="torch", **options)
    assert torch.equal(agdo_kernels.greedy_order(abar, s0, valid=valid, backend=backend, **options), expected)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device")
@pytest.mark.parametrize("R", [8193, 16384])  # the CUDA kernel's longest-row variant (S in shared memory)
@pytest.mark.parametrize("step_size, block_size, block_mode", [(64, 32, "global"), (1, 4096, "within")])
def test_longest_rows_on_gpu_match_reference(R, step_size, block_size, block_mode):
    if _cuda_extension_reason() is not None:
        pytest.skip(_cuda_extension_reason())
    gen = torch.Generator(device="cuda").manual_seed(R)
    abar = torch.softmax(torch.randn(1, R, R, generator=gen, device="cuda") * 3, dim=-1)
    s0 = torch.rand(1, R, generator=gen, device="cuda")
    valid = torch.rand(1, R, generator=gen, device="cuda") > 0.1
    options = dict(step_size=step_size, block_size=block_size, block_mode=block_mode)
    expected = agdo_kernels.greedy_order(abar, s0, valid=valid, backend="torch", **options)
    assert torch.equal(agdo_kernels.greedy_order(abar, s0, valid=valid, backend="cuda", **options), expected)


# --- bad input through the public API -------------------------------------------------------------


def _good():
    return dict(abar_rr=torch.rand(2, 5, 5), s0=torch.rand(2, 5), valid=torch.ones(2, 5, dtype=torch.bool), step_size=1)


@pytest.mark.parametrize(
    "change, error, names",
    [
        (dict(abar_rr=torch.rand(5, 5)), ValueError, "abar_rr"),
        (dict(abar_rr=torch.rand(2, 5, 4)), ValueError, "abar_rr"),
        (dict(abar_rr=torch.rand(2, 5, 5).half()), TypeError, "abar_rr"),
        (dict(abar_rr=[[0.0]]), TypeError, "abar_rr"),
        (dict(s0=torch.rand(2, 4)), ValueError, "s0"),
        (dict(s0=torch.rand(3, 5)), ValueError, "s0"),
        (dict(s0=torch.rand(2, 5, device="meta")), ValueError, "s0"),
        (dict(valid=torch.ones(2, 4, dtype=torch.bool)), ValueError, "valid"),
        (dict(valid=torch.ones(2, 5)), TypeError, "valid"),
        (dict(valid=None), ValueError, "valid"),
        (dict(valid=torch.ones(2, 5, dtype=torch.bool, device="meta")), ValueError, "valid"),
        (dict(step_size=0), ValueError, "step_size"),
        (dict(step_size=1.5), TypeError, "step_size"),
        (dict(block_size=0), ValueError, "block_size"),
        (dict(block_size=-3), ValueError, "block_size"),
        (dict(block_mode="blocks"), ValueError, "block_mode"),
        (dict(backend="fastest"), ValueError, "backend"),
        (dict(backend="cuda"), ValueError, "cuda"),
    ],
)
def test_bad_input_names_the_argument(change, error, names):
    arguments = {**_good(), **change}
    abar_rr, s0 = arguments.pop("abar_rr"), arguments.pop("s0")
    with pytest.raises(error, match=names):
        agdo_kernels.greedy_order(abar_rr, s0, **arguments)


@pytest.mark.skipif(_backends.triton_interpreted(), reason="the interpreter runs Triton on CPU")
def test_triton_on_cpu_without_interpreter_says_how():
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        agdo_kernels.greedy_order(**_good(), backend="triton")


@pytest.mark.skipif(HAS_GPU, reason="checks the message given without a GPU")
def test_cuda_extension_explains_why_it_is_unavailable():
    from agdo_kernels import _cuda

    reason = _cuda.unavailable_reason()
    assert isinstance(reason, str) and reason


# --- non-finite scores: NaN counts as -inf, every valid token still ordered exactly once -------------




def nonfinite_inputs(B, R, seed):
    """Grid inputs (exact sums) with -inf, +inf and NaN sprinkled into ``s0`` and a few ``abar`` columns,
    one row whose ``s0`` is all -inf and (B > 3) one row all NaN."""
    abar, s0, valid = grid_inputs(B, R, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    specials = torch.tensor([float("-inf"), float("inf"), float("nan")])
    where = torch.rand(B, R, generator=gen) < 0.3
    s0 = torch.where(where, specials[torch.randint(0, 3, (B, R), generator=gen)], s0)
    column_hit = torch.rand(B, R, R, generator=gen) < 0.02
    abar = torch.where(column_hit, specials[torch.randint(0, 3, (B, R, R), generator=gen)], abar)
    s0[1] = float("-inf")
    valid[1] = True
    if B > 3:
        s0[3] = float("nan")
        valid[3] = torch.rand(R, generator=gen) > 0.3
    return abar, s0, valid


def assert_dense_and_complete(steps, valid):
    assert torch.equal(steps == -1, ~valid)  # -1 exactly where not valid
    for b in range(steps.shape[0]):
        used = steps[b][valid[b]].unique()
        assert torch.equal(used, torch.arange(used.numel(), dtype=torch.int32))  # dense 0..T-1


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
@pytest.mark.parametrize(
    "R, step_size, block_size, block_mode",
    [(13, 1, None, "global"), (37, 3, 5, "global"), (37, 2, 6, "within"), (29, 16, None, "global")],
)
def test_nonfinite_scores_match_the_nan_as_minus_inf_oracle(backend, device, R, step_size, block_size, block_mode):
    abar, s0, valid = nonfinite_inputs(5, R, seed=R + step_size)
    options = dict(step_size=step_size, block_size=block_size, block_mode=block_mode)
    expected = oracle_steps(abar, s0, valid, **options)
    steps = run(backend, device, abar, s0, valid, **options)
    assert_dense_and_complete(steps, valid)
    assert torch.equal(steps, expected)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_nonfinite_hand_example(backend, device):
    # +inf first, then the finite scores by size, then NaN (= -inf) and -inf by position.
    s0 = torch.tensor([[float("nan"), 0.1, float("-inf"), 0.3, float("inf"), 0.2, float("-inf")]])
    valid = torch.ones(1, 7, dtype=torch.bool)
    valid[0, 6] = False
    steps = run(backend, device, torch.zeros(1, 7, 7), s0, valid, step_size=1)
    assert steps.tolist() == [[4, 3, 5, 1, 0, 2, -1]]
    # Two per round: {4, 3}, {5, 1}, {0, 2}.
    assert run(backend, device, torch.zeros(1, 7, 7), s0, valid, step_size=2).tolist() == [[2, 1, 2, 0, 0, 1, -1]]


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
@pytest.mark.parametrize("fill", [float("-inf"), float("nan")])
def test_all_minus_inf_or_nan_row_goes_left_to_right(backend, device, fill):
    R = 9
    valid = torch.ones(2, R, dtype=torch.bool)
    valid[1, [0, 4]] = False
    s0 = torch.full((2, R), fill)
    abar = torch.rand(2, R, R)  # finite columns cannot lift -inf/NaN scores
    steps = run(backend, device, abar, s0, valid, step_size=2)
    assert steps[0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4]
    assert steps[1].tolist() == [-1, 0, 0, 1, -1, 1, 2, 2, 3]
    steps = run(backend, device, abar, s0, valid, step_size=1, block_size=4, block_mode="within")
    assert steps[1].tolist() == [-1, 0, 1, 2, -1, 3, 4, 5, 6]


@pytest.mark.parametrize("backend, device", [p for p in BACKEND_DEVICES if p.values[0] != "torch"])
def test_nonfinite_continuous_inputs_agree_with_reference_bit_for_bit(backend, device):
    abar, s0, valid = continuous_inputs(3, 51, seed=7)
    s0[0, ::4] = float("nan")
    s0[1, 1::3] = float("-inf")
    abar[2, :, 10] = float("nan")  # picking token 10 poisons every score of row 2
    options = dict(step_size=3, block_size=8, block_mode="global")
    expected = run("torch", "cpu", abar, s0, valid, **options)
    assert_dense_and_complete(expected, valid)
    assert torch.equal(run(backend, device, abar, s0, valid, **options), expected)

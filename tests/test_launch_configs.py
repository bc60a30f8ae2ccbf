"""Triton launches: configs pinned by default (same summation order on every run and rank), autotuned only on
request and only for fp16/bf16 up to head dim 128 (checked with a stand-in kernel: no GPU needed); and how
many launches one per-step call costs (launches recorded, not run)."""

from unittest import mock

import pytest
import torch

pytest.importorskip("triton")

import agdo_kernels  # noqa: E402
from agdo_kernels.triton import _common  # noqa: E402

CONFIGS = [(128, 64, 8, 3), (64, 64, 4, 2), (64, 32, 4, 1)]


class RecordingKernel:
    """Stands in for a ``triton.autotune``-wrapped kernel: records which path a launch took."""

    def __init__(self):
        self.calls = []
        outer = self

        class JitFunction:
            def __getitem__(self, grid):
                return lambda *args, **kwargs: outer.calls.append(("pinned", kwargs))

        self.fn = JitFunction()

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append(("autotuned", kwargs))


@pytest.fixture
def compiled(monkeypatch):
    """As on a GPU: the interpreter's single tile is not what is checked here."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    yield
    agdo_kernels.set_deterministic(True)


def _launch(dtype, head_dim):
    kernel = RecordingKernel()
    _common.launch(kernel, None, gpu_configs=CONFIGS, dtype=dtype, head_dim=head_dim, device=torch.device("cpu"),
                   HEAD_DIM=head_dim)
    (path, kwargs), = kernel.calls
    return path, kwargs


def test_pinned_by_default_with_the_first_config(compiled):
    assert agdo_kernels.deterministic()
    path, kwargs = _launch(torch.bfloat16, 128)
    assert path == "pinned"
    assert (kwargs["BLOCK_M"], kwargs["BLOCK_N"], kwargs["num_warps"], kwargs["num_stages"]) == CONFIGS[0]
    assert kwargs["HEAD_DIM"] == 128
    assert kwargs["enable_fp_fusion"] is True  # named, so a change of Triton's default cannot change rounding


def test_launch_makes_the_tensors_device_current(compiled, monkeypatch):
    """A tensor on cuda:1 launches on cuda:1 whatever the current device is: the launch happens inside
    ``torch.cuda.device(that device)`` (recorded here: no GPU needed)."""
    entered, kernel = [], RecordingKernel()

    class RecordingDevice:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append((self.device, len(kernel.calls)))

        def __exit__(self, *exc):
            entered.append(("exit", len(kernel.calls)))

    monkeypatch.setattr(torch.cuda, "device", RecordingDevice)
    _common.launch(kernel, None, gpu_configs=CONFIGS, dtype=torch.float16, head_dim=64,
                   device=torch.device("cuda", 1), HEAD_DIM=64)  # fmt: skip
    assert entered == [(torch.device("cuda", 1), 0), ("exit", 1)]


def test_float32_above_head_dim_128_is_refused_when_compiled(compiled):
    """Every compiled tile spills in its hot loop there (bench/compile_report.py); the interpreter is exempt."""
    q = torch.zeros(1, 2, 3, 256)
    with pytest.raises(ValueError, match="`q`: float32 attention inputs at head dim 256"):
        _common.check_supported(q)
    with pytest.raises(ValueError, match="head dim 256"):
        _common.check_supported(torch.zeros(1, 2, 3, 64), torch.zeros(1, 2, 3, 256))  # v's head dim too
    _common.check_supported(q.bfloat16())
    _common.check_supported(torch.zeros(1, 2, 3, 128))


def test_interpreter_takes_float32_at_head_dim_256(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    _common.check_supported(torch.zeros(1, 2, 3, 256))


def test_auto_runs_torch_for_what_triton_refuses(compiled):
    """On a CUDA device (no tensor is touched, so no GPU is needed) ``auto`` picks Triton unless it refuses the
    queries; then the torch backend runs with a warning; ``backend="triton"`` raises naming the reason."""
    from agdo_kernels import _backends

    cuda = torch.device("cuda")
    refused = torch.zeros(1, 2, 3, 256)
    for op in ("valid_attention", "influence", "response_attention"):
        assert _backends.resolve("auto", cuda, op, refused.bfloat16()) == "triton"
        with pytest.warns(UserWarning, match=f'`{op}` with backend="auto" runs the torch backend: float32'):
            assert _backends.resolve("auto", cuda, op, refused) == "torch"
        with pytest.raises(ValueError, match="backend='triton'.*float32 attention inputs at head dim 256"):
            _backends.resolve("triton", cuda, op, refused)


def test_autotuning_only_on_request_and_never_for_fp32_or_head_dim_256(compiled):
    agdo_kernels.set_deterministic(False)
    assert _launch(torch.float16, 64)[0] == "autotuned"
    for dtype, head_dim in ((torch.float32, 64), (torch.bfloat16, 256)):
        path, kwargs = _launch(dtype, head_dim)
        assert path == "pinned" and (kwargs["BLOCK_M"], kwargs["BLOCK_N"]) == (64, 32)  # the smallest tile


def test_interpreter_runs_its_own_small_tile(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _common.pinned_config(CONFIGS, torch.float16, 64) == _common._INTERPRETER_CONFIG


def test_fp32_before_sm90_takes_the_kernels_own_tile(compiled):
    """An A100 (no wgmma: tf32x3 operands in registers) pins fp32 to the kernel's sm_80 tile where it has one;
    bf16 and an H100 keep the list's choice."""
    sm80 = (32, 32, 4, 1)
    assert _common.pinned_config(CONFIGS, torch.float32, 128, 80, sm80) == sm80
    assert _common.pinned_config(CONFIGS, torch.float32, 128, 86, sm80) == sm80
    assert _common.pinned_config(CONFIGS, torch.float32, 128, 90, sm80) == (64, 32, 4, 1)
    assert _common.pinned_config(CONFIGS, torch.float32, 128, 80, None) == (64, 32, 4, 1)
    assert _common.pinned_config(CONFIGS, torch.bfloat16, 128, 80, sm80) == CONFIGS[0]


def _per_step_calls(device):
    gen = torch.Generator().manual_seed(0)
    B, H, Hkv, N, d = 2, 4, 2, 40, 16
    q, k, v = (torch.randn(B, h, N, d, generator=gen).to(device) for h in (H, Hkv, Hkv))
    unmasked = (torch.rand(B, N, generator=gen) < 0.5).to(device)
    mask = torch.ones(B, N, dtype=torch.bool, device=device)
    mask[0, :5] = False
    lse = torch.randn(B, H, N, generator=gen).to(device)
    return {
        "S": lambda: agdo_kernels.valid_attention(q, k, unmasked=unmasked, backend="triton"),
        "S+lse, padded": lambda: agdo_kernels.valid_attention(
            q, k, unmasked=unmasked, attention_mask=mask, return_lse=True, backend="triton"),
        "S+O+lse, padded": lambda: agdo_kernels.valid_attention(
            q, k, v, unmasked=unmasked, attention_mask=mask, return_output=True, return_lse=True, backend="triton"),
        "I": lambda: agdo_kernels.influence(q, k, lse=lse, backend="triton"),
        "I, padded and counted rows": lambda: agdo_kernels.influence(
            q, k, lse=lse, attention_mask=mask, query_mask=unmasked, backend="triton"),
    }  # fmt: skip


@pytest.mark.parametrize("call", ["S", "S+lse, padded", "S+O+lse, padded", "I", "I, padded and counted rows"])
def test_per_step_calls_are_four_launches_and_no_torch_kernels(call):
    """What Max-S decoding and the influence pass cost the host per call: exactly four Triton launches (prepare
    the key order or counted rows and zero the flags, scan the inputs, the statistics, average over heads) and no
    torch op that launches a kernel (a mask cast, a memset, an lse rescale would each be one more launch)."""
    from conftest import BACKENDS, DEVICE, DeviceOpLog

    if "triton" not in BACKENDS:
        pytest.skip("Triton needs a CUDA device, or TRITON_INTERPRET=1 on CPU")
    import triton.runtime.autotuner
    import triton.runtime.interpreter
    import triton.runtime.jit

    launches = []

    def record(kernel, *args, **kwargs):  # stands in for every launch: nothing runs
        launches.append(kernel.fn.__name__)

    with mock.patch.object(triton.runtime.jit.JITFunction, "run", record), \
            mock.patch.object(triton.runtime.interpreter.InterpretedFunction, "run", record), \
            mock.patch.object(triton.runtime.autotuner.Autotuner, "run", record):  # fmt: skip
        calls = _per_step_calls(DEVICE)
        with DeviceOpLog() as log:
            calls[call]()
    assert len(launches) == 4, launches
    assert log.ops == [], log.ops

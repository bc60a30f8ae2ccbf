"""Bad input to the attention statistics: a clear ValueError/TypeError that names the argument."""

import pytest
import torch

import agdo_kernels

B, H, HKV, N, D = 2, 4, 2, 9, 16


def _inputs(dtype=torch.float32):
    q = torch.randn(B, H, N, D, dtype=dtype)
    k = torch.randn(B, HKV, N, D, dtype=dtype)
    v = torch.randn(B, HKV, N, D, dtype=dtype)
    return q, k, v, torch.ones(B, N, dtype=torch.bool)


def _call(op, q, k, v=None, **kw):
    if op == "valid_attention":
        kw.setdefault("unmasked", torch.ones(q.shape[0], q.shape[2], dtype=torch.bool))
        return agdo_kernels.valid_attention(q, k, v, **kw)
    if op == "influence":
        return agdo_kernels.influence(q, k, **kw)
    kw.setdefault("response_start", 3)
    return agdo_kernels.response_attention(q, k, **kw)


OPS = ["valid_attention", "influence", "response_attention"]


@pytest.mark.parametrize("op", OPS)
def test_shape_errors_name_the_argument(op):
    q, k, _, _ = _inputs()
    with pytest.raises(ValueError, match=r"`q` must have shape \(B, H, N, d\)"):
        _call(op, q[0], k)
    with pytest.raises(ValueError, match=r"`k` must have shape"):
        _call(op, q, k[..., :8])  # mismatched d
    with pytest.raises(ValueError, match=r"`k` must have shape"):
        _call(op, q, k[:, :, :5])  # mismatched N
    with pytest.raises(ValueError, match=r"`k` must have shape"):
        _call(op, q, k[:1])  # mismatched batch
    with pytest.raises(ValueError, match=r"multiple of `k` heads"):
        _call(op, q[:, :3], k)
    with pytest.raises(TypeError, match=r"`q` must be a torch.Tensor"):
        _call(op, q.numpy(), k)


@pytest.mark.parametrize("op", OPS)
def test_dtype_and_device_errors(op):
    q, k, _, _ = _inputs()
    with pytest.raises(TypeError, match=r"`q` must have dtype"):
        _call(op, q.long(), k.long())
    with pytest.raises(TypeError, match=r"`k` dtype .* must equal `q` dtype"):
        _call(op, q, k.half())
    with pytest.raises(ValueError, match=r"`k` is on meta"):
        _call(op, q, k.to("meta"))


@pytest.mark.parametrize("op", OPS)
def test_mask_errors(op):
    q, k, _, mask = _inputs()
    with pytest.raises(ValueError, match=r"`attention_mask` must have shape \(B=2, N=9\)"):
        _call(op, q, k, attention_mask=mask[:, :-1])
    with pytest.raises(TypeError, match=r"`attention_mask` must be boolean"):
        _call(op, q, k, attention_mask=mask.float())
    with pytest.raises(ValueError, match=r"`attention_mask` is on meta"):
        _call(op, q, k, attention_mask=mask.to("meta"))


def test_argument_specific_errors():
    q, k, v, mask = _inputs()
    with pytest.raises(ValueError, match=r"`unmasked` must have shape"):
        agdo_kernels.valid_attention(q, k, unmasked=mask[:1])
    with pytest.raises(ValueError, match=r"`unmasked` is required"):
        agdo_kernels.valid_attention(q, k, unmasked=None)
    with pytest.raises(ValueError, match=r"`v` is required"):
        agdo_kernels.valid_attention(q, k, unmasked=mask, return_output=True)
    with pytest.raises(ValueError, match=r"`v` must have shape"):
        agdo_kernels.valid_attention(q, k, v[:, :1], unmasked=mask, return_output=True)
    with pytest.raises(ValueError, match=r"`scale` must be a finite positive float"):
        agdo_kernels.valid_attention(q, k, unmasked=mask, scale=-1.0)
    with pytest.raises(ValueError, match=r"`norm` must be one of"):
        agdo_kernels.influence(q, k, norm="l2")
    with pytest.raises(ValueError, match=r"`lse` must have shape"):
        agdo_kernels.influence(q, k, lse=torch.zeros(B, H, N + 1))
    with pytest.raises(ValueError, match=r"`query_mask` must have shape"):
        agdo_kernels.influence(q, k, query_mask=mask[:, :3])
    with pytest.raises(ValueError, match=r"`response_start` must satisfy 1 <= response_start <= N"):
        agdo_kernels.response_attention(q, k, response_start=0, shift=True)
    with pytest.raises(ValueError, match=r"`response_start` must satisfy 0 <= response_start <= N"):
        agdo_kernels.response_attention(q, k, response_start=N + 1)
    with pytest.raises(TypeError, match=r"`response_start` must be a Python int"):
        agdo_kernels.response_attention(q, k, response_start=torch.tensor(3))


@pytest.mark.parametrize("op", OPS)
def test_backend_errors(op, monkeypatch):
    q, k, _, _ = _inputs()
    with pytest.raises(ValueError, match=r"`backend` must be one of"):
        _call(op, q, k, backend="jax")
    with pytest.raises(ValueError, match=r"`backend='cuda'` is not available"):
        _call(op, q, k, backend="cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=r"`backend='triton'` is not available .* TRITON_INTERPRET=1"):
        _call(op, q, k, backend="triton")


def test_available_backends_reports_reasons():
    report = agdo_kernels.available_backends("cpu")
    assert report["valid_attention"]["torch"] is None
    assert "CUDA" in report["valid_attention"]["cuda"]

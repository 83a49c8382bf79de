"""cross_stream_attention: eager reference vs the definition, Triton kernels vs the reference.

Without CUDA the Triton cases run in the interpreter (conftest sets TRITON_INTERPRET=1), so
the sizes stay small; they still cross every tile edge of the interpreter blocks (32).
"""
import math

import pytest
import torch

from ccs_fast.kernels import cross_attention as xa
from ccs_fast.kernels.cross_attention import cross_stream_attention, cross_stream_attention_ref

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def make_inputs(B, N_f, N_o, d, e, dtype=torch.float32, device=DEV, noncontiguous=False, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(n, f):
        if noncontiguous:  # feature-major storage and every other feature: no unit strides
            return torch.randn(B, 2 * f, n, generator=g).transpose(1, 2)[:, :, ::2].to(device, dtype)
        return torch.randn(B, n, f, generator=g).to(device, dtype)

    return [t.requires_grad_() for t in (rand(N_f, d), rand(N_o, d), rand(N_f, e), rand(N_o, e))]


def reference_fp64(inputs, scale, grads):
    ins = [t.detach().double().requires_grad_() for t in inputs]
    y_f, y_o = cross_stream_attention_ref(*ins, scale)
    return (y_f, y_o) + torch.autograd.grad((y_f, y_o), ins, [g.double() for g in grads])


def rel_err(a, b, floor=0.0):
    """max |a − b| over max(max |b|, floor)."""
    return ((a.double() - b).abs().max() / max(b.abs().max().item(), floor, 1e-30)).item()


def magnitudes(inputs, grads, scale):
    """Size of one term of each result before cancellation. Where the exact result is ~0
    (N_o = 1, or a saturated softmax with a large scale) an fp32 kernel leaves rounding
    residue of about eps × this, so errors are measured against at least 1 % of it."""
    q, k, v_f, v_o = (t.detach().abs().max().item() for t in inputs)
    g_f, g_o = (g.abs().max().item() for g in grads)
    scale = inputs[0].shape[-1] ** -0.5 if scale is None else abs(scale)
    ds = g_f * v_o + g_o * v_f
    return (v_o, v_f, scale * k * ds, scale * q * ds, g_o, g_f)


def loop_definition(q, k, v_f, v_o, scale):
    """SPEC §2.1 written out element by element (fp64, tiny sizes only)."""
    B, N_f, _ = q.shape
    N_o = k.shape[1]
    y_f = torch.zeros(B, N_f, v_o.shape[2], dtype=torch.float64)
    y_o = torch.zeros(B, N_o, v_f.shape[2], dtype=torch.float64)
    for b in range(B):
        s = [[scale * float(q[b, i] @ k[b, j]) for j in range(N_o)] for i in range(N_f)]
        for i in range(N_f):
            z = sum(math.exp(s[i][j]) for j in range(N_o))
            for j in range(N_o):
                y_f[b, i] += math.exp(s[i][j]) / z * v_o[b, j]
        for j in range(N_o):
            z = sum(math.exp(s[i][j]) for i in range(N_f))
            for i in range(N_f):
                y_o[b, j] += math.exp(s[i][j]) / z * v_f[b, i]
    return y_f, y_o


@pytest.mark.parametrize("scale", [None, 1.0, 0.3])
def test_reference_matches_loop_definition(scale):
    q, k, v_f, v_o = (t.detach().double() for t in make_inputs(2, 4, 3, 5, 6, device="cpu"))
    y_f, y_o = cross_stream_attention_ref(q, k, v_f, v_o, scale)
    want_f, want_o = loop_definition(q, k, v_f, v_o, 5 ** -0.5 if scale is None else scale)
    torch.testing.assert_close(y_f, want_f, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y_o, want_o, rtol=1e-12, atol=1e-12)


def test_reference_keeps_dtype_and_large_scale_is_finite():
    q, k, v_f, v_o = (t.detach() for t in make_inputs(1, 5, 4, 8, 8, torch.bfloat16, device="cpu"))
    y_f, y_o = cross_stream_attention_ref(q, k, v_f, v_o, scale=1e4)
    assert y_f.dtype == y_o.dtype == torch.bfloat16
    want_f, want_o = cross_stream_attention_ref(q.float(), k.float(), v_f.float(), v_o.float(), scale=1e4)
    torch.testing.assert_close(y_f.float(), want_f, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(y_o.float(), want_o, rtol=2e-2, atol=2e-2)


# (B, N_f, N_o, d, e, scale): odd sizes, N_f ≠ N_o, d ≠ e, one tile and many, big feature dims.
SHAPES = [
    (2, 1, 1, 8, 8, None),
    (2, 7, 5, 8, 12, None),
    (2, 1, 33, 40, 9, None),
    (3, 47, 33, 40, 24, None),
    (1, 147, 200, 16, 8, None),
    (1, 200, 147, 8, 16, 0.7),
    (2, 47, 33, 40, 24, 50.0),
    (1, 33, 40, 24, 16, 500.0),
    (1, 3, 2, 1024, 1000, None),
]


def poison_outputs(monkeypatch):
    """Make every buffer the forward allocates start as NaN, so unwritten elements show."""
    monkeypatch.setattr(xa, "_empty_output",
                        lambda shape, device, dtype: torch.full(shape, float("nan"), device=device, dtype=dtype))


def check_against_reference(inputs, scale, tol, monkeypatch):
    poison_outputs(monkeypatch)
    y_f, y_o = cross_stream_attention(*inputs, scale=scale, impl="triton")
    grads = (torch.randn_like(y_f) * 3 + 0.5, torch.randn_like(y_o) * 0.2 - 1.0)
    got = (y_f, y_o) + torch.autograd.grad((y_f, y_o), inputs, grads)
    want = reference_fp64(inputs, scale, grads)
    names = ("y_f", "y_o", "dq", "dk", "dv_f", "dv_o")
    for name, a, b, size in zip(names, got, want, magnitudes(inputs, grads, scale)):
        assert a.shape == b.shape and a.dtype == inputs[0].dtype, name
        assert torch.isfinite(a).all(), f"{name} has non-finite elements"
        err = rel_err(a, b, 0.01 * size)
        assert err <= tol, f"{name}: relative error {err:.2e} > {tol}"


@pytest.mark.parametrize("B,N_f,N_o,d,e,scale", SHAPES)
def test_triton_matches_reference_fp32(B, N_f, N_o, d, e, scale, monkeypatch):
    check_against_reference(make_inputs(B, N_f, N_o, d, e), scale, 1e-3, monkeypatch)


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 1e-2), (torch.bfloat16, 3e-2)])
def test_triton_matches_reference_half(dtype, tol, monkeypatch):
    check_against_reference(make_inputs(2, 47, 33, 40, 24, dtype), None, tol, monkeypatch)


def test_triton_noncontiguous_inputs(monkeypatch):
    inputs = make_inputs(2, 37, 45, 24, 40, noncontiguous=True)
    assert not any(t.is_contiguous() for t in inputs)
    check_against_reference(inputs, 0.9, 1e-3, monkeypatch)


def test_triton_one_output_used():
    inputs = make_inputs(2, 9, 6, 8, 8)
    y_f, _ = cross_stream_attention(*inputs, impl="triton")
    got = torch.autograd.grad(y_f.square().sum(), inputs, allow_unused=True)
    ins = [t.detach().double().requires_grad_() for t in inputs]
    want = torch.autograd.grad(cross_stream_attention_ref(*ins)[0].square().sum(), ins, allow_unused=True)
    assert want[2] is None  # y_f does not depend on v_f: the kernel must give exact zeros
    assert torch.equal(got[2], torch.zeros_like(got[2]))
    for a, b in zip(got[:2] + got[3:], want[:2] + want[3:]):
        assert rel_err(a, b) <= 1e-3


def test_dispatch():
    q, k, v_f, v_o = make_inputs(1, 4, 3, 8, 8, device="cpu")
    with pytest.raises(ValueError, match="impl"):
        cross_stream_attention(q, k, v_f, v_o, impl="cuda")
    with pytest.raises(ValueError, match="v_o"):
        cross_stream_attention(q, k, v_f, v_o[:, :2])
    with pytest.raises(ValueError, match="k "):
        cross_stream_attention(q, k[..., :4], v_f, v_o)
    with pytest.raises(ValueError, match="scale"):
        cross_stream_attention(q, k, v_f, v_o, scale=float("inf"))
    # fp64 always runs the reference, even when Triton is asked for
    ins = [t.detach().double() for t in (q, k, v_f, v_o)]
    for got, want in zip(cross_stream_attention(*ins, impl="triton"), cross_stream_attention_ref(*ins)):
        assert torch.equal(got, want)
    y_f, y_o = cross_stream_attention(q[:, :0], k, v_f[:, :0], v_o, impl="triton")  # N_f = 0
    assert y_f.shape == (1, 0, 8) and torch.equal(y_o, torch.zeros(1, 3, 8))
    if not torch.cuda.is_available():  # auto on CPU = the reference
        for got, want in zip(cross_stream_attention(q, k, v_f, v_o), cross_stream_attention_ref(q, k, v_f, v_o)):
            assert torch.equal(got, want)


@requires_cuda
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-3), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("B,N_f,N_o,d,e", [(4, 147, 588, 256, 256), (2, 300, 77, 1024, 512)])
def test_cuda_autotuned(B, N_f, N_o, d, e, dtype, tol, monkeypatch):
    check_against_reference(make_inputs(B, N_f, N_o, d, e, dtype), None, tol, monkeypatch)


@requires_cuda
def test_cuda_autocast():
    """Under bf16 autocast the op runs on bf16 tiles and matches the fp64 definition to bf16 accuracy."""
    inputs = make_inputs(2, 50, 70, 64, 64, torch.float32)
    grads = (torch.randn(2, 50, 64, device="cuda"), torch.randn(2, 70, 64, device="cuda"))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y_f, y_o = cross_stream_attention(*[t.bfloat16() for t in inputs])
        assert y_f.dtype == torch.bfloat16
    got = (y_f, y_o) + torch.autograd.grad((y_f, y_o), inputs, [g.bfloat16() for g in grads])
    want = reference_fp64([t.bfloat16().float() for t in inputs], None, grads)
    for name, a, b, size in zip(("y_f", "y_o", "dq", "dk", "dv_f", "dv_o"), got, want, magnitudes(inputs, grads, None)):
        assert rel_err(a, b, 0.01 * size) <= 3e-2, name


def test_cuda_candidate_configs_are_valid():
    # the autotuned path cannot run here; at least the candidates must be legal tl.dot tiles
    for row in xa.FWD_CONFIGS + xa.BWD_CONFIGS:
        blocks = row[:3] if len(row) == 5 else row[:4]
        assert all(b >= 16 and b & (b - 1) == 0 for b in blocks), row
    for D, E in ((8, 8), (40, 24), (512, 512), (1024, 1000)):
        for configs in (xa.fwd_configs(), xa.bwd_configs()):
            kept = xa.prune_configs(configs, D, E)
            assert kept and all(c.kwargs["BLOCK_D"] <= max(64, 2 * D) for c in kept)

"""resolve_impl, the one decision of which implementation runs an op call, and the rule every
op follows from it: fp64 and empty inputs run the eager reference, whatever ``impl`` asks."""
import pytest
import torch

from ccs_fast.kernels import (batch_hard_triplet_loss, cross_modal_triplet_loss, cross_stream_attention,
                              discriminative_embedding_loss)
from ccs_fast.kernels._dispatch import Impl, interpreting, resolve_impl
from ccs_fast.kernels.center import discriminative_embedding_loss_ref
from ccs_fast.kernels.cross_attention import cross_stream_attention_ref
from ccs_fast.kernels.triplet import batch_hard_triplet_loss_ref, cross_modal_triplet_loss_ref


def _generator():
    return torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))


def test_resolve_impl_on_cpu():
    x = torch.randn(4, 3)
    assert resolve_impl("eager", x) is Impl.EAGER
    assert resolve_impl("auto", x) is Impl.EAGER  # not on CUDA
    if interpreting():
        assert resolve_impl("triton", x) is Impl.TRITON_INTERPRETED
    for odd in (x.double(), torch.empty(0, 3)):
        assert resolve_impl("triton", x, odd) is Impl.EAGER
    with pytest.raises(ValueError, match="impl must be one of"):
        resolve_impl("cuda", x)


def test_fp64_inputs_run_the_reference_with_any_impl():
    g = _generator()
    B, D = 12, 8
    labels = torch.randint(0, 3, (B,), generator=g)
    z_f = torch.randn(B, D, generator=g, dtype=torch.float64, requires_grad=True)
    z_o = torch.randn(B, D, generator=g, dtype=torch.float64, requires_grad=True)
    cases = [
        (lambda impl: cross_modal_triplet_loss(z_f, z_o, labels, impl=impl),
         lambda: cross_modal_triplet_loss_ref(z_f, z_o, labels)),
        (lambda impl: batch_hard_triplet_loss(z_f, labels, impl=impl), lambda: batch_hard_triplet_loss_ref(z_f, labels)),
        (lambda impl: discriminative_embedding_loss(z_f, labels, impl=impl),
         lambda: discriminative_embedding_loss_ref(z_f, labels)),
    ]
    for op, ref in cases:
        want = ref()
        want_grads = torch.autograd.grad(want, (z_f, z_o), allow_unused=True)
        for impl in ("auto", "triton", "eager"):
            got = op(impl)
            assert torch.equal(got, want)
            grads = torch.autograd.grad(got, (z_f, z_o), allow_unused=True)
            assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(grads, want_grads))

    q, k = (torch.randn(2, 5, 4, generator=g, dtype=torch.float64) for _ in range(2))
    v_f, v_o = (torch.randn(2, 5, 6, generator=g, dtype=torch.float64) for _ in range(2))
    want = cross_stream_attention_ref(q, k, v_f, v_o)
    for impl in ("auto", "triton", "eager"):
        got = cross_stream_attention(q, k, v_f, v_o, impl=impl)
        assert all(torch.equal(a, b) for a, b in zip(got, want))

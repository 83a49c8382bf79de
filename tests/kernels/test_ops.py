"""The registered operators (``ccs_fast::*``) and the layers under torch.compile and torch.export.

``torch.library.opcheck`` checks each op's schema, fake implementation, autograd registration
and AOT dispatch (with dynamic shapes), on CPU both where the Triton kernels run (the
interpreter, as conftest sets it) and where they do not (``TRITON_INTERPRET=0``: the ops'
torch implementation). A small model built from the three drop-in layers then compiles with
``fullgraph=True`` in one graph and matches eager in its loss and every gradient; the same
test runs on CUDA in the GPU suite. ``torch.export`` of a module with the connection block
keeps the attention as one ``ccs_fast::cross_stream_attention`` node.
"""
import copy

import pytest
import torch
from torch import nn
from torch.library import opcheck

from ccs_fast import CrossModalTripletLoss, CrossStreamAttention, DiscriminativeEmbeddingLoss
from ccs_fast.kernels import cross_attention as xa
from ccs_fast.kernels import center, normalize, triplet

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
PATHS = ["kernels", "torch"]  # what the op implementations run on CPU: interpreted Triton, torch ops


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    if request.param == "torch":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    return request.param


def attention_args(dtype=torch.float32, requires_grad=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = ((2, 7, 12), (2, 5, 12), (2, 7, 9), (2, 5, 9))  # N_f ≠ N_o, d ≠ e, odd sizes
    return [torch.randn(s, generator=g).to(dtype).requires_grad_(requires_grad) for s in shapes]


def embeddings(B=10, D=7, n=2, seed=1, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    zs = [torch.randn(B, D, generator=g).requires_grad_(requires_grad) for _ in range(n)]
    return zs, torch.tensor([3, 3, -1, -1, 8, 8, 8, 0, 0, 3][:B])


def loss_op_cases(requires_grad):
    (z_f, z_o), y = embeddings(requires_grad=requires_grad)
    return [
        (triplet.cross_modal_triplet_loss_op, (z_f, z_o, y, 0.3, True, False, requires_grad)),
        (triplet.cross_modal_triplet_loss_op, (z_f, z_o, y, 0.3, False, True, requires_grad)),
        (triplet.batch_hard_triplet_loss_op, (z_f, y, 0.3, True, True, requires_grad)),
        (center.discriminative_embedding_loss_op, (z_o, y, 0.3, 0.8, True, requires_grad)),
        (center.discriminative_embedding_loss_op, (z_o, y, 0.1, 0.9, False, requires_grad)),
    ]


# ----------------------------------------------------------------------------- opcheck


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_attention(path, dtype):
    args = attention_args(dtype)
    opcheck(xa.cross_stream_attention_op, (*args, 0.4))
    y_f, y_o, lse_row, lse_col = xa.cross_stream_attention_op(*args, 0.4)
    grads = [torch.randn_like(y_f), torch.randn_like(y_o)]
    saved = [t.detach() for t in (*args, y_f, y_o, lse_row, lse_col)]
    opcheck(xa.cross_stream_attention_backward_op, (*saved, *grads, 0.4))


@pytest.mark.parametrize("requires_grad", [True, False])
def test_opcheck_losses(path, requires_grad):
    for op, args in loss_op_cases(requires_grad):
        opcheck(op, args)


def test_opcheck_finish_grad(path):
    (z,), _ = embeddings(n=1, requires_grad=False)
    z[3] = 0.0  # a row whose norm is clamped to eps
    r = normalize.row_factors_ref(z, True)
    g = torch.randn(z.shape)
    for norm in (True, False):
        opcheck(normalize.finish_grad_op, (z.bfloat16(), r, g, torch.tensor(1.7), norm))


# ----------------------------------------------------------------------------- the two implementations


def test_torch_implementation_matches_kernels(monkeypatch):
    """An op gives the same outputs whether its implementation launches the kernels or not."""
    cases = [(xa.cross_stream_attention_op, (*attention_args(requires_grad=False), 0.4))]
    cases += loss_op_cases(requires_grad=True)
    for op, args in cases:
        with torch.no_grad():
            kernels = op(*args)
            monkeypatch.setenv("TRITON_INTERPRET", "0")
            plain = op(*args)
            monkeypatch.setenv("TRITON_INTERPRET", "1")
        for a, b in zip(kernels, plain):
            assert a.shape == b.shape and a.dtype == b.dtype
            torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def attention_and_losses(ops):
    """A small graph through every op (``ops``: the registered ops or the references)."""
    attention, cross_modal, center_loss, batch_hard = ops

    def fn(q, k, v_f, v_o, z, y):
        y_f, y_o = attention(q, k, v_f, v_o)
        z_f, z_o = y_f.mean(1) + z, y_o.mean(1) - z
        return cross_modal(z_f, z_o, y) + center_loss(z_f, y) + batch_hard(z_o, y)
    return fn


OPS = (lambda *a: xa.cross_stream_attention_op(*a, 0.3)[:2],
       lambda f, o, y: triplet.cross_modal_triplet_loss_op(f, o, y, 0.3, True, False, True)[0],
       lambda z, y: center.discriminative_embedding_loss_op(z, y, 0.3, 0.8, True, True)[0],
       lambda z, y: triplet.batch_hard_triplet_loss_op(z, y, 0.3, True, True, True)[0])
REFERENCES = (lambda *a: xa.cross_stream_attention_ref(*a, 0.3),
              lambda f, o, y: triplet.cross_modal_triplet_loss_ref(f, o, y, 0.3),
              lambda z, y: center.discriminative_embedding_loss_ref(z, y, 0.3, 0.8),
              lambda z, y: triplet.batch_hard_triplet_loss_ref(z, y, 0.3))


def test_torch_implementation_takes_the_references_gradients(monkeypatch):
    """Where the kernels do not run, every op's gradient is its reference's by autograd, in
    eager mode and compiled."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    g = torch.Generator().manual_seed(5)
    shapes = ((6, 5, 8), (6, 7, 8), (6, 5, 8), (6, 7, 8), (6, 8))
    inputs = [torch.randn(s, generator=g).requires_grad_() for s in shapes] + [torch.tensor([0, 0, 1, 1, 2, 2])]
    ops = attention_and_losses(OPS)
    want = loss_and_grads_of(attention_and_losses(REFERENCES), inputs)
    for fn in (ops, torch.compile(ops, fullgraph=True, backend="aot_eager")):
        for got, expected in zip(loss_and_grads_of(fn, inputs), want):
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def loss_and_grads_of(fn, inputs):
    loss = fn(*inputs)
    return (loss.detach(), *torch.autograd.grad(loss * 1.3, inputs[:5]))


def test_loss_without_kept_gradient_refuses_backward():
    (z,), y = embeddings(n=1)
    loss, r, g = center.discriminative_embedding_loss_op(z, y, 0.3, 0.8, True, False)
    assert r.shape == (0,) and g.shape == (0, z.shape[1])
    with pytest.raises(RuntimeError, match="compute_grad=False"):
        loss.backward()


def test_dispatchers_keep_no_gradient_under_no_grad(monkeypatch):
    seen = []
    original = center.center_forward
    monkeypatch.setattr(center, "center_forward", lambda *a, **k: seen.append(k["compute_grad"]) or original(*a, **k))
    (z,), y = embeddings(n=1)
    with torch.no_grad():
        center.discriminative_embedding_loss(z, y, impl="triton")
    center.discriminative_embedding_loss(z, y, impl="triton")
    center.discriminative_embedding_loss(z.detach(), y, impl="triton")
    assert seen == [False, True, False]


# ----------------------------------------------------------------------------- compile and export


class TwoStreamHead(nn.Module):
    """The three drop-in layers as a user's model would hold them."""

    def __init__(self, impl):
        super().__init__()
        self.block = CrossStreamAttention(channels=16, reduction=2, impl=impl, gamma_init=0.5)
        self.triplet = CrossModalTripletLoss(margin=0.3, impl=impl)
        self.center = DiscriminativeEmbeddingLoss(0.3, 0.8, impl=impl)

    def forward(self, x_f, x_o, labels):
        x_f, x_o = self.block(x_f, x_o)
        z_f, z_o = x_f.mean(1), x_o.mean(1)
        return self.triplet(z_f, z_o, labels) + self.center(z_f, labels) + self.center(z_o, labels)


def head_inputs(device):
    g = torch.Generator().manual_seed(2)
    x_f = torch.randn(6, 5, 16, generator=g).to(device).requires_grad_()
    x_o = torch.randn(6, 7, 16, generator=g).to(device).requires_grad_()
    return x_f, x_o, torch.tensor([0, 0, 1, 1, 2, 2], device=device)


def loss_and_grads(model, inputs):
    loss = model(*inputs)
    leaves = [inputs[0], inputs[1], *model.parameters()]
    return loss.detach(), torch.autograd.grad(loss * 1.3, leaves)


def test_explain_finds_one_graph_without_breaks():
    model = TwoStreamHead("triton")
    report = torch._dynamo.explain(model)(*head_inputs("cpu"))
    assert report.graph_count == 1 and report.graph_break_count == 0, report.break_reasons


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
def test_fullgraph_compile_matches_eager(device):
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = TwoStreamHead("triton").to(device)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    want_loss, want_grads = loss_and_grads(eager, head_inputs(device))
    got_loss, got_grads = loss_and_grads(compiled, head_inputs(device))
    torch.testing.assert_close(got_loss, want_loss, atol=1e-5, rtol=1e-5)
    for got, want in zip(got_grads, want_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert any(g.abs().sum() > 0 for g in got_grads[:2])


def test_export_keeps_the_attention_op(monkeypatch):
    torch.manual_seed(0)
    block = CrossStreamAttention(channels=16, reduction=2, impl="triton", gamma_init=0.5).eval()
    x_f, x_o, _ = (t.detach() for t in head_inputs("cpu"))
    exported = torch.export.export(block, (x_f, x_o))
    targets = [str(node.target) for node in exported.graph.nodes if node.op == "call_function"]
    assert targets.count("ccs_fast.cross_stream_attention.default") == 1, targets
    want = block(x_f, x_o)
    for got, expected in zip(exported.module()(x_f, x_o), want):
        torch.testing.assert_close(got, expected)
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the exported graph on a CPU without the kernels
    for got, expected in zip(exported.module()(x_f, x_o), want):
        torch.testing.assert_close(got, expected)

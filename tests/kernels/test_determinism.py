"""Deterministic mode (SPEC §3): bit-identical gradients run to run, whatever order the
programs of a launch run in.

The interpreter runs a grid's programs one after another in index order; here that order is
shuffled (a fresh permutation of every grid axis for every launch), which is what a GPU does
to floating-point atomics. Attention and the center loss have no floating-point atomics on
any path; the triplet loss has none with ``deterministic=True`` (or under
``torch.use_deterministic_algorithms``).
"""
import random

import pytest
import torch

import triton.runtime.interpreter as interpreter
from ccs_fast.kernels import cross_stream_attention, cross_modal_triplet_loss, discriminative_embedding_loss
from ccs_fast.kernels import batch_hard_triplet_loss
from ccs_fast.kernels.triplet import cross_modal_triplet_loss_ref

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture
def shuffled_programs(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("shuffles the interpreter's program order")
    """Run each launch's programs in a random order (per-axis permutations)."""
    builder = interpreter.interpreter_builder
    set_dim, set_idx = builder.set_grid_dim, builder.set_grid_idx
    rng = random.Random()
    perms = {}

    def grid_dim(x, y, z):
        perms["p"] = [rng.sample(range(n), n) for n in (x, y, z)]
        return set_dim(x, y, z)

    def grid_idx(x, y, z):
        px, py, pz = perms["p"]
        return set_idx(px[x], py[y], pz[z])

    monkeypatch.setattr(builder, "set_grid_dim", grid_dim)
    monkeypatch.setattr(builder, "set_grid_idx", grid_idx)
    return rng


def grads(fn, inputs):
    out = fn(*inputs)
    outs = out if isinstance(out, tuple) else (out,)
    weights = [torch.linspace(-1, 2, o.numel(), device=o.device).reshape(o.shape).to(o.dtype) for o in outs]
    return torch.autograd.grad(outs, [t for t in inputs if t.requires_grad], weights)


def assert_bit_identical(fn, inputs, runs=2):
    first = grads(fn, inputs)
    for _ in range(runs - 1):
        for a, b in zip(first, grads(fn, inputs)):
            assert torch.equal(a, b)
    return first


def labels_with_ties(B, classes, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, classes, (B,), generator=g)


def test_shuffling_changes_the_order(shuffled_programs):
    seen = []
    original = interpreter.interpreter_builder.set_grid_idx

    def spy(x, y, z):
        seen.append(x)
        return original(x, y, z)

    interpreter.interpreter_builder.set_grid_idx = spy
    try:
        z = torch.randn(100, 16)
        batch_hard_triplet_loss(z, labels_with_ties(100, 5, 0), impl="triton")
    finally:
        interpreter.interpreter_builder.set_grid_idx = original
    assert seen and seen != sorted(seen)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_gradients_bit_identical(shuffled_programs, dtype):
    g = torch.Generator().manual_seed(1)
    inputs = [torch.randn(2, n, f, generator=g).to(dtype).requires_grad_() for n, f in ((40, 16), (35, 16), (40, 24), (35, 24))]
    assert_bit_identical(lambda *t: cross_stream_attention(*t, impl="triton"), inputs)


@pytest.mark.parametrize("single", [False, True])
def test_triplet_deterministic_gradients_bit_identical(shuffled_programs, single):
    g = torch.Generator().manual_seed(2)
    B, D = 70, 24
    labels = labels_with_ties(B, 6, 3)
    if single:
        z = torch.randn(B, D, generator=g).requires_grad_()
        got = assert_bit_identical(lambda z: batch_hard_triplet_loss(z, labels, impl="triton", deterministic=True), [z])
        want = grads(lambda z: batch_hard_triplet_loss(z, labels, impl="eager"), [z])
    else:
        zs = [torch.randn(B, D, generator=g).requires_grad_() for _ in range(2)]
        got = assert_bit_identical(
            lambda a, b: cross_modal_triplet_loss(a, b, labels, impl="triton", deterministic=True), zs)
        want = grads(lambda a, b: cross_modal_triplet_loss_ref(a, b, labels), zs)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_triplet_follows_torch_deterministic_flag(shuffled_programs, monkeypatch):
    from ccs_fast.kernels import triplet

    seen = []
    original = triplet.triplet_forward
    monkeypatch.setattr(triplet, "triplet_forward", lambda *a, **k: seen.append(k["deterministic"]) or original(*a, **k))
    z = torch.randn(40, 8, requires_grad=True)
    labels = labels_with_ties(40, 4, 0)
    previous = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        triplet.batch_hard_triplet_loss(z, labels, impl="triton")
    finally:
        torch.use_deterministic_algorithms(previous)
    triplet.batch_hard_triplet_loss(z, labels, impl="triton")
    assert seen == [True, previous]


def test_center_gradients_bit_identical(shuffled_programs):
    g = torch.Generator().manual_seed(4)
    z = torch.randn(90, 24, generator=g).requires_grad_()
    labels = labels_with_ties(90, 7, 5)
    assert_bit_identical(lambda z: discriminative_embedding_loss(z, labels, impl="triton"), [z])


@requires_cuda
def test_cuda_gradients_bit_identical():
    """On the GPU the scheduler, not a fixture, varies the program order."""
    g = torch.Generator(device="cuda").manual_seed(6)
    attn = [torch.randn(4, n, 256, device="cuda", generator=g).bfloat16().requires_grad_() for n in (588, 300, 588, 300)]
    assert_bit_identical(lambda *t: cross_stream_attention(*t, impl="triton"), attn, runs=5)
    z = [torch.randn(4096, 512, device="cuda", generator=g).requires_grad_() for _ in range(2)]
    labels = torch.randint(0, 64, (4096,), device="cuda", generator=g)
    assert_bit_identical(lambda a, b: cross_modal_triplet_loss(a, b, labels, impl="triton", deterministic=True), z, runs=5)
    assert_bit_identical(lambda a: discriminative_embedding_loss(a, labels, impl="triton"), z[:1], runs=5)

"""cross_modal_triplet_loss / batch_hard_triplet_loss: Triton (interpreted on CPU) and eager vs
an fp64 brute-force oracle, forward and gradients, label edge cases, ties, dtypes, PML parity."""
import pytest
import torch

from ccs_fast.kernels.triplet import (
    batch_hard_triplet_loss,
    batch_hard_triplet_loss_ref,
    cross_modal_triplet_loss,
    cross_modal_triplet_loss_ref,
)
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

IMPLS = ["eager", "triton"]
GRAD_OUT = 1.7  # not 1: backward must scale the saved gradient


def _oracle_direction(a, b, labels, margin, single):
    """fp64, loop per anchor: mean of hinges over anchors with a (non-self) positive and a negative."""
    d = (a[:, None, :] - b[None, :, :]).pow(2).sum(-1)
    y = labels.tolist()
    hinges = []
    for i in range(len(y)):
        pos = [j for j in range(len(y)) if y[j] == y[i] and not (single and j == i)]
        neg = [j for j in range(len(y)) if y[j] != y[i]]
        if not pos or not neg:
            continue
        p = max(pos, key=lambda j: (d[i, j].item(), -j))  # hardest, lowest index on ties
        n = min(neg, key=lambda j: (d[i, j].item(), j))
        hinges.append((d[i, p] - d[i, n] + margin).clamp_min(0))
    return torch.stack(hinges).mean() if hinges else a.sum() * 0


def _embed64(z, normalize):
    z = z.double()
    return z / z.norm(dim=1, keepdim=True).clamp_min(1e-12) if normalize else z


def oracle_cross(z_f, z_o, labels, margin=0.3, normalize=True):
    f, o = _embed64(z_f, normalize), _embed64(z_o, normalize)
    return _oracle_direction(f, o, labels, margin, False) + _oracle_direction(o, f, labels, margin, False)


def oracle_single(z, labels, margin=0.3, normalize=True):
    e = _embed64(z, normalize)
    return _oracle_direction(e, e, labels, margin, True)


LABELS = {
    "one_class": lambda B: torch.zeros(B, dtype=torch.long),
    "all_distinct": lambda B: torch.randperm(B) * 3 - 5,
    "singletons_and_pairs": lambda B: torch.tensor([i // 2 if i < B // 2 else 100 + i for i in range(B)]),
    "random": lambda B: torch.randint(0, 4, (B,)) * 97 - 11,
}


def _grads(fn, *zs):
    zs = [z.detach().clone().requires_grad_(True) for z in zs]
    loss = fn(*zs)
    grads = torch.autograd.grad(loss, zs, grad_outputs=torch.tensor(GRAD_OUT, dtype=loss.dtype))
    return loss.detach(), grads


def _assert_close(loss, grads, ref_loss, ref_grads, atol, rtol):
    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss.double(), ref_loss.double(), atol=atol, rtol=rtol)
    for g, r in zip(grads, ref_grads):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g.double(), r.double(), atol=atol, rtol=rtol)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("B,D,pattern", [
    (1, 5, "one_class"), (6, 8, "one_class"), (7, 9, "all_distinct"), (11, 16, "singletons_and_pairs"),
    (37, 17, "random"), (20, 33, "random"),
])
@pytest.mark.parametrize("normalize", [True, False])
def test_cross_modal_matches_oracle(impl, B, D, pattern, normalize):
    torch.manual_seed(B * 100 + D)
    z_f, z_o, y = torch.randn(B, D), torch.randn(B, D), LABELS[pattern](B)
    loss, grads = _grads(lambda f, o: cross_modal_triplet_loss(f, o, y, 0.3, normalize, impl=impl), z_f, z_o)
    ref_loss, ref_grads = _grads(lambda f, o: oracle_cross(f, o, y, 0.3, normalize), z_f, z_o)
    _assert_close(loss, grads, ref_loss, ref_grads, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("B,D,pattern", [
    (1, 3, "one_class"), (5, 8, "one_class"), (8, 7, "all_distinct"), (13, 16, "singletons_and_pairs"),
    (37, 17, "random"),
])
@pytest.mark.parametrize("normalize", [True, False])
def test_batch_hard_matches_oracle(impl, B, D, pattern, normalize):
    torch.manual_seed(B * 100 + D + 1)
    z, y = torch.randn(B, D), LABELS[pattern](B)
    loss, grads = _grads(lambda e: batch_hard_triplet_loss(e, y, 0.3, normalize, impl=impl), z)
    ref_loss, ref_grads = _grads(lambda e: oracle_single(e, y, 0.3, normalize), z)
    _assert_close(loss, grads, ref_loss, ref_grads, atol=2e-5, rtol=1e-4)


def test_non_contiguous_labels_and_strided_rows():
    torch.manual_seed(3)
    y = torch.tensor([7, -3, 7, 1000, -3, 7])
    big_f, big_o = torch.randn(6, 40), torch.randn(6, 40)
    z_f, z_o = big_f[:, 3:22], big_o[:, 1:20]  # row stride 40, D = 19
    ref = oracle_cross(z_f, z_o, y)
    for impl in IMPLS:
        torch.testing.assert_close(cross_modal_triplet_loss(z_f, z_o, y, impl=impl).double(), ref, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(batch_hard_triplet_loss(z_f, y, impl=impl).double(), oracle_single(z_f, y),
                                   atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype,atol", [(torch.float16, 3e-3), (torch.bfloat16, 2e-2)])
def test_half_inputs(impl, dtype, atol):
    torch.manual_seed(5)
    B, D = 24, 33
    z_f, z_o, y = torch.randn(B, D).to(dtype), torch.randn(B, D).to(dtype), torch.randint(0, 5, (B,))
    loss, (g_f, g_o) = _grads(lambda f, o: cross_modal_triplet_loss(f, o, y, impl=impl), z_f, z_o)
    ref_loss, ref_grads = _grads(lambda f, o: oracle_cross(f, o, y), z_f, z_o)
    assert g_f.dtype == dtype and g_o.dtype == dtype
    _assert_close(loss, (g_f, g_o), ref_loss, ref_grads, atol=atol, rtol=atol)
    loss, grads = _grads(lambda e: batch_hard_triplet_loss(e, y, impl=impl), z_f)
    ref_loss, ref_grads = _grads(lambda e: oracle_single(e, y), z_f)
    _assert_close(loss, grads, ref_loss, ref_grads, atol=atol, rtol=atol)


@pytest.mark.parametrize("impl", IMPLS)
def test_ties_go_to_lowest_index(impl):
    # Within each class all rows but the first are identical, in both modalities, so every hardest
    # positive and negative is a tie; with B = 20 the tied rows span two tiles of 16, so the
    # column direction's cross-program merge must also keep the lowest index.
    torch.manual_seed(7)
    B, D = 20, 8
    y = torch.tensor([0] * 10 + [1] * 10)
    z_f, z_o = torch.randn(B, D), torch.randn(B, D)
    for z in (z_f, z_o):
        z[1:10] = z[1]
        z[11:] = z[11]
    loss, grads = _grads(lambda f, o: cross_modal_triplet_loss(f, o, y, impl=impl), z_f, z_o)
    ref_loss, ref_grads = _grads(lambda f, o: oracle_cross(f, o, y), z_f, z_o)
    _assert_close(loss, grads, ref_loss, ref_grads, atol=2e-5, rtol=1e-4)
    z = z_o.clone()
    loss, grads = _grads(lambda e: batch_hard_triplet_loss(e, y, impl=impl), z)
    ref_loss, ref_grads = _grads(lambda e: oracle_single(e, y), z)
    _assert_close(loss, grads, ref_loss, ref_grads, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("impl", IMPLS)
def test_no_valid_anchor_is_zero_with_zero_grads(impl):
    z_f, z_o = torch.randn(5, 6, requires_grad=True), torch.randn(5, 6, requires_grad=True)
    y = torch.full((5,), 42)
    loss = cross_modal_triplet_loss(z_f, z_o, y, impl=impl)
    (loss * GRAD_OUT).backward()
    assert loss.item() == 0.0 and not z_f.grad.any() and not z_o.grad.any()
    z = torch.randn(4, 6, requires_grad=True)
    loss = batch_hard_triplet_loss(z, torch.arange(4), impl=impl)  # no anchor has another positive
    loss.backward()
    assert loss.item() == 0.0 and not z.grad.any()


def test_forward_without_grad_and_reference_agree():
    torch.manual_seed(9)
    z_f, z_o, y = torch.randn(19, 10), torch.randn(19, 10), torch.randint(0, 3, (19,))
    torch.testing.assert_close(cross_modal_triplet_loss(z_f, z_o, y, impl="triton"),
                               cross_modal_triplet_loss_ref(z_f, z_o, y), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batch_hard_triplet_loss(z_f, y, impl="triton"),
                               batch_hard_triplet_loss_ref(z_f, y), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_matches_pytorch_metric_learning(impl):
    pml = pytest.importorskip("pytorch_metric_learning")
    from pytorch_metric_learning.distances import LpDistance
    from pytorch_metric_learning.losses import TripletMarginLoss
    from pytorch_metric_learning.miners import BatchHardMiner
    from pytorch_metric_learning.reducers import MeanReducer

    assert pml  # PML: squared L2 on normalised embeddings, relu(d_ap − d_an + margin), mean over mined anchors
    torch.manual_seed(11)
    z, y = torch.randn(30, 12, dtype=torch.float64), torch.randint(0, 4, (30,))
    y[-1] = 99  # a class with a single sample: no positive, left out by both
    distance = LpDistance(normalize_embeddings=True, power=2)
    loss_fn = TripletMarginLoss(margin=0.3, distance=distance, reducer=MeanReducer())
    miner = BatchHardMiner(distance=distance)
    z_ref = z.clone().requires_grad_(True)
    expected = loss_fn(z_ref, y, miner(z_ref, y))
    expected.backward()
    z_ours = z.float().requires_grad_(True)
    got = batch_hard_triplet_loss(z_ours, y, margin=0.3, impl=impl)
    got.backward()
    torch.testing.assert_close(got.double(), expected.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(z_ours.grad.double(), z_ref.grad, atol=1e-5, rtol=1e-4)


def test_bad_shapes_raise():
    with pytest.raises(ValueError):
        cross_modal_triplet_loss(torch.randn(4, 3), torch.randn(5, 3), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError):
        batch_hard_triplet_loss(torch.randn(4, 3), torch.zeros(3, dtype=torch.long))


@requires_cuda
@pytest.mark.parametrize("B,D", [(1, 7), (300, 257), (1025, 512)])
def test_cuda_triton_matches_eager_under_autocast(B, D):
    torch.manual_seed(13)
    z_f = torch.randn(B, D, device="cuda", requires_grad=True)
    z_o = torch.randn(B, D, device="cuda", requires_grad=True)
    y = torch.randint(0, 16, (B,), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = cross_modal_triplet_loss(z_f, z_o, y, impl="triton")
    ref = cross_modal_triplet_loss_ref(z_f, z_o, y)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)

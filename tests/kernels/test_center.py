"""discriminative_embedding_loss: Triton (interpreted on CPU) and eager vs an fp64 per-class loop
oracle, forward and gradients (through the class means), label edge cases and dtypes."""
import pytest
import torch

from ccs_fast.kernels.center import class_ids, discriminative_embedding_loss, discriminative_embedding_loss_ref
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

IMPLS = ["eager", "triton"]
GRAD_OUT = 0.6  # not 1: backward must scale the saved gradient


def oracle(z, labels, alpha_intra=0.3, alpha_inter=0.8, normalize=True):
    e = z.double()
    if normalize:
        e = e / e.norm(dim=1, keepdim=True).clamp_min(1e-12)
    classes = sorted(set(labels.tolist()))
    mu = {c: e[labels == c].mean(0) for c in classes}
    intra = torch.stack([((e[i] - mu[int(c)]).pow(2).sum() - alpha_intra).clamp_min(0)
                         for i, c in enumerate(labels)]).mean()
    inter = [(alpha_inter - (mu[a] - mu[b]).pow(2).sum()).clamp_min(0) for a in classes for b in classes if a != b]
    return intra + (torch.stack(inter).mean() if inter else 0.0)


LABELS = {
    "one_class": lambda B: torch.full((B,), 5),
    "all_distinct": lambda B: torch.randperm(B) * 2 - 7,
    "singletons_and_groups": lambda B: torch.tensor([i // 3 if i < B // 2 else 50 + i for i in range(B)]),
    "random": lambda B: torch.randint(0, 5, (B,)) * 1000 - 2000,
}


def _grad(fn, z):
    z = z.detach().clone().requires_grad_(True)
    loss = fn(z)
    (g,) = torch.autograd.grad(loss, z, grad_outputs=torch.tensor(GRAD_OUT, dtype=loss.dtype))
    return loss.detach(), g


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("B,D,pattern", [
    (1, 5, "one_class"), (6, 8, "one_class"), (7, 9, "all_distinct"), (13, 16, "singletons_and_groups"),
    (37, 17, "random"), (20, 33, "random"),
])
@pytest.mark.parametrize("normalize", [True, False])
def test_matches_oracle(impl, B, D, pattern, normalize):
    torch.manual_seed(B * 10 + D)
    z, y = torch.randn(B, D), LABELS[pattern](B)
    # unnormalised inputs get small values so both hinges stay active somewhere
    z = z if normalize else z * 0.3
    loss, g = _grad(lambda t: discriminative_embedding_loss(t, y, 0.3, 0.8, normalize, impl=impl), z)
    ref_loss, ref_g = _grad(lambda t: oracle(t, y, 0.3, 0.8, normalize), z)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss.double(), ref_loss.double(), atol=2e-5, rtol=1e-4)
    assert torch.isfinite(g).all()
    torch.testing.assert_close(g.double(), ref_g.double(), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("impl", IMPLS)
def test_inter_term_and_mean_gradient_are_exercised(impl):
    # close class means (inter hinge active for every pair) and spread members (intra active)
    torch.manual_seed(1)
    y = torch.tensor([7, -3, 7, 1000, -3, 7, 1000, 1000, -3])
    z = torch.randn(9, 11) * 0.1 + torch.ones(11)
    loss, g = _grad(lambda t: discriminative_embedding_loss(t, y, 0.0001, 0.8, impl=impl), z)
    ref_loss, ref_g = _grad(lambda t: oracle(t, y, 0.0001, 0.8), z)
    assert ref_loss > 0.5
    torch.testing.assert_close(loss.double(), ref_loss.double(), atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(g.double(), ref_g.double(), atol=2e-5, rtol=1e-4)


def test_strided_rows():
    torch.manual_seed(2)
    big, y = torch.randn(10, 30), torch.randint(0, 3, (10,))
    z = big[:, 5:24]  # D = 19, row stride 30
    for impl in IMPLS:
        torch.testing.assert_close(discriminative_embedding_loss(z, y, impl=impl).double(), oracle(z, y),
                                   atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype,atol", [(torch.float16, 3e-3), (torch.bfloat16, 2e-2)])
def test_half_inputs(impl, dtype, atol):
    torch.manual_seed(3)
    z, y = torch.randn(24, 33).to(dtype), torch.randint(0, 5, (24,))
    loss, g = _grad(lambda t: discriminative_embedding_loss(t, y, impl=impl), z)
    ref_loss, ref_g = _grad(lambda t: oracle(t, y), z)
    assert loss.dtype == torch.float32 and g.dtype == dtype
    torch.testing.assert_close(loss.double(), ref_loss.double(), atol=atol, rtol=atol)
    torch.testing.assert_close(g.double(), ref_g.double(), atol=atol, rtol=atol)


def test_class_ids_are_dense_and_sorted():
    y = torch.tensor([7, -3, 7, 1000, -3])
    cls, num_classes, counts, order, starts = class_ids(y)
    assert cls.tolist() == [1, 0, 1, 2, 0]
    assert int(num_classes) == 3 and counts.tolist() == [2, 2, 1, 0, 0] and starts[:3].tolist() == [0, 2, 4]
    assert [int(cls[i]) for i in order] == [0, 0, 1, 1, 2]


def test_forward_without_grad_matches_reference():
    torch.manual_seed(4)
    z, y = torch.randn(21, 10), torch.randint(0, 4, (21,))
    torch.testing.assert_close(discriminative_embedding_loss(z, y, impl="triton"),
                               discriminative_embedding_loss_ref(z, y), atol=1e-5, rtol=1e-5)


@requires_cuda
@pytest.mark.parametrize("B,D", [(1, 7), (300, 257), (1025, 512)])
def test_cuda_triton_matches_eager_under_autocast(B, D):
    torch.manual_seed(5)
    z = torch.randn(B, D, device="cuda", requires_grad=True)
    y = torch.randint(0, 16, (B,), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = discriminative_embedding_loss(z, y, impl="triton")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, discriminative_embedding_loss_ref(z, y), atol=1e-4, rtol=1e-4)

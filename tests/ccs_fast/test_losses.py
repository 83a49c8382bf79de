"""ccs_fast.losses: the modules wrap the ops, and CCSObjective combines them as SPEC §2.2 says."""
import pytest
import torch
import torch.nn.functional as F

from ccs_fast.kernels.center import discriminative_embedding_loss_ref
from ccs_fast.kernels.triplet import batch_hard_triplet_loss_ref, cross_modal_triplet_loss_ref
from ccs_fast.losses import BatchHardTripletLoss, CCSObjective, CrossModalTripletLoss, DiscriminativeEmbeddingLoss

IMPLS = ["eager", "triton"]


def _batch(B=12, D=10, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    z_f = torch.randn(B, D, generator=g, requires_grad=True)
    z_o = torch.randn(B, D, generator=g, requires_grad=True)
    logits_f = torch.randn(B, classes, generator=g, requires_grad=True)
    logits_o = torch.randn(B, classes, generator=g, requires_grad=True)
    labels = torch.randint(0, classes, (B,), generator=g)
    return z_f, z_o, logits_f, logits_o, labels


@pytest.mark.parametrize("impl", IMPLS)
def test_modules_match_references(impl):
    z_f, z_o, _, _, y = _batch()
    torch.testing.assert_close(CrossModalTripletLoss(margin=0.2, impl=impl)(z_f, z_o, y),
                               cross_modal_triplet_loss_ref(z_f, z_o, y, margin=0.2), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(BatchHardTripletLoss(margin=0.2, impl=impl)(z_f, y),
                               batch_hard_triplet_loss_ref(z_f, y, margin=0.2), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(DiscriminativeEmbeddingLoss(0.1, 0.9, impl=impl)(z_o, y),
                               discriminative_embedding_loss_ref(z_o, y, 0.1, 0.9), atol=1e-5, rtol=1e-5)
    assert "margin=0.2" in repr(CrossModalTripletLoss(margin=0.2))


@pytest.mark.parametrize("impl", IMPLS)
def test_objective_is_the_weighted_sum_and_gradients_flow(impl):
    z_f, z_o, logits_f, logits_o, y = _batch()
    out = CCSObjective(lambda1=0.7, lambda2=0.2, alpha1=0.3, alpha2=0.1, alpha3=0.9, impl=impl)(
        z_f, z_o, logits_f, logits_o, y)
    assert set(out) == {"loss", "ce", "triplet", "center"}
    assert all(v.dtype == torch.float32 and v.dim() == 0 for v in out.values())
    ce = F.cross_entropy(logits_f, y) + F.cross_entropy(logits_o, y)
    triplet = cross_modal_triplet_loss_ref(z_f, z_o, y, 0.3)
    center = discriminative_embedding_loss_ref(z_f, y, 0.1, 0.9) + discriminative_embedding_loss_ref(z_o, y, 0.1, 0.9)
    torch.testing.assert_close(out["ce"], ce)
    torch.testing.assert_close(out["triplet"], triplet, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["center"], center, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["loss"], ce + 0.7 * triplet + 0.2 * center, atol=1e-5, rtol=1e-5)
    assert out["triplet"] > 0 and out["center"] > 0
    out["loss"].backward()
    for t in (z_f, z_o, logits_f, logits_o):
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0


def test_ranking_scale_multiplies_the_ranking_terms_only():
    """The ranking warm-up (loss.ranking_warmup_epochs): loss = CE + s·(λ1·L1 + λ2·L2) with the
    unweighted terms reported as they are, and the ramp 0 -> 1 over the warm-up iterations."""
    from ccs_fast.losses import ranking_ramp

    z_f, z_o, logits_f, logits_o, y = _batch()
    objective = CCSObjective(lambda1=0.7, lambda2=0.2, impl="eager")
    full = objective(z_f, z_o, logits_f, logits_o, y)
    scale = float(torch.rand(()))
    objective.ranking_scale = scale
    ramped = objective(z_f, z_o, logits_f, logits_o, y)
    for key in ("ce", "triplet", "center"):
        torch.testing.assert_close(ramped[key], full[key])
    expected = full["ce"] + scale * (0.7 * full["triplet"] + 0.2 * full["center"])
    torch.testing.assert_close(ramped["loss"], expected)
    warmup = int(torch.randint(2, 50, ()))
    assert ranking_ramp(0, warmup) == 0.0 and ranking_ramp(warmup // 2, warmup) == (warmup // 2) / warmup
    assert ranking_ramp(warmup, warmup) == 1.0 == ranking_ramp(warmup + 7, warmup) == ranking_ramp(0, 0)


def test_objective_without_ranking_is_ce_only():
    z_f, z_o, logits_f, logits_o, y = _batch()
    out = CCSObjective(ranking=False)(z_f, z_o, logits_f, logits_o, y)
    torch.testing.assert_close(out["loss"], F.cross_entropy(logits_f, y) + F.cross_entropy(logits_o, y))
    assert out["triplet"].item() == 0.0 and out["center"].item() == 0.0
    assert out["triplet"].dtype == torch.float32
    out["loss"].backward()
    assert z_f.grad is None and z_o.grad is None  # the embeddings take no part without ranking
    assert logits_f.grad is not None and logits_o.grad is not None


def test_objective_with_half_logits_and_embeddings_matches_fp32():
    z_f, z_o, logits_f, logits_o, y = _batch()
    halves = [t.detach().bfloat16().requires_grad_() for t in (z_f, z_o, logits_f, logits_o)]
    out = CCSObjective(impl="eager")(*halves, y)
    assert all(v.dtype == torch.float32 for v in out.values())
    out["loss"].backward()
    # the fp32 reference on the same (bf16-rounded) values: the losses compute in fp32
    singles = [t.detach().float().requires_grad_() for t in halves]
    ref = CCSObjective(impl="eager")(*singles, y)
    ref["loss"].backward()
    for key in ref:
        torch.testing.assert_close(out[key], ref[key], rtol=1e-3, atol=1e-4)
    for half, single in zip(halves, singles):
        assert half.grad.dtype == torch.bfloat16
        torch.testing.assert_close(half.grad.float(), single.grad, rtol=2e-2, atol=1e-3)


def test_training_steps_fused_match_eager():
    # a few SGD steps of a shared projection + classifier with the Triton ops and with the eager ones
    def train(impl):
        torch.manual_seed(0)
        proj, head = torch.nn.Linear(16, 8), torch.nn.Linear(8, 4)
        objective = CCSObjective(impl=impl)
        opt = torch.optim.SGD([*proj.parameters(), *head.parameters()], lr=0.1)
        g = torch.Generator().manual_seed(1)
        x_f, x_o, y = torch.randn(20, 16, generator=g), torch.randn(20, 16, generator=g), torch.arange(20) % 4
        losses = []
        for _ in range(4):
            z_f, z_o = proj(x_f), proj(x_o)
            out = objective(z_f, z_o, head(z_f), head(z_o), y)
            opt.zero_grad()
            out["loss"].backward()
            opt.step()
            losses.append(out["loss"].detach())
        return torch.stack(losses), [p.detach() for p in (*proj.parameters(), *head.parameters())]

    fused_losses, fused_params = train("triton")
    eager_losses, eager_params = train("eager")
    torch.testing.assert_close(fused_losses, eager_losses, atol=1e-5, rtol=1e-5)
    for a, b in zip(fused_params, eager_params):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert fused_losses[-1] < fused_losses[0]

"""CrossStreamAttention (the connection block, SPEC §2.1)."""
import copy

import pytest
import torch
from torch import nn

from ccs_fast.connection import CrossStreamAttention
from ccs_fast.kernels.cross_attention import cross_stream_attention_ref


def streams(B=2, N_f=7, N_o=5, C=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, N_f, C, generator=g), torch.randn(B, N_o, C, generator=g)


@pytest.mark.parametrize("heads", [1, 2, 4])
def test_shapes_and_identity_at_init(heads):
    block = CrossStreamAttention(16, reduction=2, heads=heads, impl="eager")
    x_f, x_o = streams()
    for mode in (block.train, block.eval):
        mode()
        y_f, y_o = block(x_f, x_o)
        assert y_f.shape == x_f.shape and y_o.shape == x_o.shape
        torch.testing.assert_close(y_f, x_f, rtol=0, atol=0)  # BN γ = 0: the block is the identity
        torch.testing.assert_close(y_o, x_o, rtol=0, atol=0)


def test_gamma_init_opens_the_exchange():
    """gamma_init > 0: each stream's output depends on the other stream from the first step,
    and the block's projections get gradients (with γ = 0 they get none)."""
    x_f, x_o = streams()
    for gamma, exchanges in ((0.0, False), (1.0, True)):
        block = CrossStreamAttention(16, reduction=2, impl="eager", gamma_init=gamma)
        y_f, _ = block(x_f, x_o)
        y_f_other, _ = block(x_f, x_o + torch.randn_like(x_o))
        assert bool((y_f - y_f_other).abs().max() > 1e-4) == exchanges
        (y_f * torch.randn_like(y_f)).sum().backward()
        assert bool(block.g_o.weight.grad.abs().sum() > 0) == exchanges


def test_bad_configuration():
    with pytest.raises(ValueError, match="heads"):
        CrossStreamAttention(16, reduction=2, heads=3)
    with pytest.raises(ValueError, match="divisible"):
        CrossStreamAttention(15, reduction=2)
    block = CrossStreamAttention(16)
    with pytest.raises(ValueError, match="channels"):
        block(torch.randn(2, 3, 8), torch.randn(2, 3, 8))


def test_matches_written_out_block_with_heads():
    torch.manual_seed(0)
    block = CrossStreamAttention(16, reduction=2, heads=2, impl="eager").eval()
    for bn in (block.bn_f, block.bn_o):
        nn.init.normal_(bn.weight)
        nn.init.normal_(bn.running_mean)
    x_f, x_o = streams()
    y_f, y_o = block(x_f, x_o)
    q, k, vf, vo = block.phi(x_f), block.kappa(x_o), block.g_f(x_f), block.g_o(x_o)
    outs_f, outs_o = [], []
    for h in range(2):  # each head: 4 of the 8 embedding channels, scale 4 ** -0.5
        sl = slice(4 * h, 4 * h + 4)
        a, b = cross_stream_attention_ref(q[..., sl], k[..., sl], vf[..., sl], vo[..., sl], 4 ** -0.5)
        outs_f.append(a)
        outs_o.append(b)
    want_f = x_f + block.bn_f(block.w_f(torch.cat(outs_f, -1)).transpose(1, 2)).transpose(1, 2)
    want_o = x_o + block.bn_o(block.w_o(torch.cat(outs_o, -1)).transpose(1, 2)).transpose(1, 2)
    torch.testing.assert_close(y_f, want_f)
    torch.testing.assert_close(y_o, want_o)


def test_gradient_flows():
    block = CrossStreamAttention(16, heads=2, impl="eager")
    x_f, x_o = (x.requires_grad_() for x in streams())
    y_f, y_o = block(x_f, x_o)
    (y_f.square().sum() + y_o.sum()).backward()
    # at init only γ, β and the inputs see a gradient (γ = 0 cuts the attention branch) ...
    assert block.bn_f.weight.grad.abs().sum() > 0 and block.bn_o.weight.grad.abs().sum() > 0
    assert x_f.grad is not None and x_o.grad is not None
    # ... and once γ ≠ 0 every parameter does
    block.zero_grad()
    nn.init.constant_(block.bn_f.weight, 0.5)
    nn.init.constant_(block.bn_o.weight, 0.5)
    y_f, y_o = block(x_f, x_o)
    (y_f.square().sum() + y_o.square().sum()).backward()
    for name, p in block.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


class TinyModel(nn.Module):
    """Two streams → connection block → pooled logits."""

    def __init__(self, channels=16, classes=3, impl="eager"):
        super().__init__()
        self.block = CrossStreamAttention(channels, heads=2, impl=impl)
        nn.init.constant_(self.block.bn_f.weight, 0.5)
        nn.init.constant_(self.block.bn_o.weight, 0.5)
        self.head = nn.Linear(2 * channels, classes)

    def forward(self, x_f, x_o):
        y_f, y_o = self.block(x_f, x_o)
        return self.head(torch.cat([y_f.mean(1), y_o.mean(1)], -1))


def test_triton_and_eager_train_alike():
    torch.manual_seed(0)
    eager = TinyModel(impl="eager")
    fused = copy.deepcopy(eager)
    fused.block.impl = "triton"
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (eager, fused)]
    g = torch.Generator().manual_seed(1)
    losses = {id(eager): [], id(fused): []}
    x_f, x_o = torch.randn(4, 11, 16, generator=g), torch.randn(4, 9, 16, generator=g)
    labels = torch.randint(0, 3, (4,), generator=g)
    for _ in range(4):  # one fixed batch: the loss must go down
        for model, opt in zip((eager, fused), opts):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x_f, x_o), labels)
            loss.backward()
            opt.step()
            losses[id(model)].append(loss.item())
    torch.testing.assert_close(torch.tensor(losses[id(fused)]), torch.tensor(losses[id(eager)]), rtol=1e-4, atol=1e-5)
    assert losses[id(eager)][-1] < losses[id(eager)][0]
    for (name, a), (_, b) in zip(fused.named_parameters(), eager.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)

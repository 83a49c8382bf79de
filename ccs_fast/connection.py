"""The connection block of CCS (SPEC §2.1, paper Eq. 1–3): cross-stream correlation.

Both streams' features, flattened to (B, N, C), are embedded to C_e = C / reduction channels
(φ, κ, g_f, g_o are 1×1 convolutions, i.e. linear maps on the channel dimension), correlated
through one score matrix S = scale · φ(x_f) κ(x_o)ᵀ, and each stream receives the other's
values through its own softmax of S (rows for appearance, columns for motion). The result goes
back to C channels (W_f, W_o) and is added residually after a BatchNorm whose γ starts at 0, so
a freshly built block is the identity and does not disturb pretrained backbones.
"""
import torch
from torch import nn

from ccs_fast.kernels.cross_attention import cross_stream_attention


class CrossStreamAttention(nn.Module):
    """``forward(x_f, x_o) -> (x_f', x_o')`` with x_f (B, N_f, C), x_o (B, N_o, C).

    ``heads`` splits C_e into equal heads, each with its own score matrix; ``scale`` defaults
    to (C_e / heads) ** -0.5 (C_e ** -0.5 with one head, SPEC §2.1). ``impl`` ("auto",
    "triton", "eager") picks the attention op and may be changed after construction.
    """

    def __init__(self, channels: int, reduction: int = 2, heads: int = 1, scale=None, impl: str = "auto",
                 gamma_init: float = 0.0):
        super().__init__()
        if channels % reduction:
            raise ValueError(f"channels={channels} is not divisible by reduction={reduction}")
        embed = channels // reduction
        if heads < 1 or embed % heads:
            raise ValueError(f"embedding channels {embed} (= {channels} / {reduction}) do not split into {heads} heads")
        self.channels, self.embed, self.heads = channels, embed, heads
        self.scale = scale
        self.impl = impl
        self.phi = nn.Linear(channels, embed)
        self.kappa = nn.Linear(channels, embed)
        self.g_f = nn.Linear(channels, embed)
        self.g_o = nn.Linear(channels, embed)
        self.w_f = nn.Linear(embed, channels)
        self.w_o = nn.Linear(embed, channels)
        self.bn_f = nn.BatchNorm1d(channels)
        self.bn_o = nn.BatchNorm1d(channels)
        # γ = 0 (default): the block starts as the identity (paper, following non-local
        # networks), right for pretrained backbones. From scratch a zero gate scales every
        # gradient into the block by γ and the exchange is slow to start; gamma_init > 0 opens it.
        nn.init.constant_(self.bn_f.weight, gamma_init)
        nn.init.constant_(self.bn_o.weight, gamma_init)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        # (B, N, C_e) -> (B·heads, N, C_e / heads): heads fold into the batch of the op.
        B, N, _ = x.shape
        return x.view(B, N, self.heads, -1).transpose(1, 2).reshape(B * self.heads, N, -1)

    def _merge_heads(self, y: torch.Tensor, B: int) -> torch.Tensor:
        _, N, c = y.shape
        return y.view(B, self.heads, N, c).transpose(1, 2).reshape(B, N, self.heads * c)

    @staticmethod
    def _residual(x, y, proj, bn):
        # x + BN(W y), BatchNorm per channel over all B·N positions: the same statistics as
        # BatchNorm1d on (B, C, N), taken on the contiguous (B·N, C) rows. (The transposed
        # form also made aot_autograd's traced backward view a gradient whose strides differ
        # from what it traced.)
        out = proj(y)
        return x + bn(out.reshape(-1, out.shape[-1])).view_as(out)

    def forward(self, x_f: torch.Tensor, x_o: torch.Tensor):
        if x_f.dim() != 3 or x_o.dim() != 3:
            raise ValueError(f"expected (B, N, C) inputs, got {tuple(x_f.shape)} and {tuple(x_o.shape)}")
        if x_f.shape[0] != x_o.shape[0] or x_f.shape[2] != self.channels or x_o.shape[2] != self.channels:
            raise ValueError(
                f"inputs {tuple(x_f.shape)} and {tuple(x_o.shape)} must share B and have C={self.channels} channels"
            )
        B = x_f.shape[0]
        q = self._split_heads(self.phi(x_f))
        k = self._split_heads(self.kappa(x_o))
        v_f = self._split_heads(self.g_f(x_f))
        v_o = self._split_heads(self.g_o(x_o))
        y_f, y_o = cross_stream_attention(q, k, v_f, v_o, scale=self.scale, impl=self.impl)
        x_f = self._residual(x_f, self._merge_heads(y_f, B), self.w_f, self.bn_f)
        x_o = self._residual(x_o, self._merge_heads(y_o, B), self.w_o, self.bn_o)
        return x_f, x_o

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, embed={self.embed}, heads={self.heads}, "
                f"scale={self.scale}, impl={self.impl!r}")

"""Multi-scale temporal relation consensus (TRN, Zhou et al. 2018, "Temporal Relational
Reasoning in Videos"), the consensus of the CCS paper's Table 2 setting.

``TemporalRelationConsensus(num_segments, in_features, num_outputs, bottleneck=256,
max_relations=3, dropout=0.0)`` maps (B, K, C) segment features to (B, num_outputs): class
scores when ``num_outputs`` is the number of classes (TRN's own head), or a video feature that
a later head classifies (``out_features`` says its size).

For each scale d = K, K−1, …, 2 the d-frame relations are the ordered tuples of d segment
indices (i_1 < … < i_d, itertools.combinations). Each scale has its own MLP
g_d = ReLU → Linear(d·C, bottleneck) → ReLU → Dropout → Linear(bottleneck, num_outputs)
applied to the concatenated features of a tuple, and
``T(V) = Σ_d Σ_{tuple ∈ S_d} g_d(f_{i_1}, …, f_{i_d})``,
where S_K is the single all-segment tuple and S_d (d < K) holds ``max_relations`` tuples of that
scale (all of them when there are fewer). Concatenation keeps the order, so the output depends
on the order of the segments, unlike average consensus.

Which tuples: while training, drawn at random without replacement for each forward pass from
torch's global generator (TRN draws from numpy's); in eval mode, ``max_relations`` tuples at
evenly spaced positions of the lexicographic list, so evaluation is deterministic (TRN draws at
random at test time too).

A clip of K ≠ K_train segments (e.g. 25 test segments after training on 8): the K features are
first averaged within K_train equal temporal sections (segment i → section ⌊i·K_train/K⌋), as the
model's ``concat`` and ``mul`` consensus do; K < K_train is an error. Cost: with K = 8 and
``max_relations`` = 3 there are 1 + 3·6 = 19 MLP evaluations per video, each on d·C inputs.
"""
from __future__ import annotations

import itertools

import torch
from torch import nn


def pool_to_segments(x: torch.Tensor, num_segments: int) -> torch.Tensor:
    """(B, K, C) → (B, num_segments, C): mean of the segments in each of ``num_segments`` equal
    temporal sections (segment i goes to section ⌊i·num_segments/K⌋); unchanged when K matches."""
    B, K, C = x.shape
    if K == num_segments:
        return x
    if K < num_segments:
        raise ValueError(f"TRN consensus needs at least {num_segments} segments per clip, got {K}")
    section = torch.arange(K, device=x.device) * num_segments // K
    weights = nn.functional.one_hot(section, num_segments).to(x.dtype).t()
    weights = weights / weights.sum(dim=1, keepdim=True)
    return torch.einsum("sk,bkc->bsc", weights, x)


class TemporalRelationConsensus(nn.Module):
    """TRN multi-scale relation module: (B, K, C) → (B, num_outputs) (see the module docstring)."""

    def __init__(self, num_segments: int, in_features: int, num_outputs: int, bottleneck: int = 256,
                 max_relations: int = 3, dropout: float = 0.0):
        super().__init__()
        if num_segments < 2:
            raise ValueError(f"TRN consensus relates at least 2 segments, got num_segments={num_segments}")
        if max_relations < 1:
            raise ValueError(f"max_relations must be ≥ 1, got {max_relations}")
        self.num_segments, self.in_features, self.num_outputs = num_segments, in_features, num_outputs
        self.max_relations = max_relations
        self.scales = list(range(num_segments, 1, -1))
        relations = {d: torch.tensor(list(itertools.combinations(range(num_segments), d))) for d in self.scales}
        for d, tuples in relations.items():
            self.register_buffer(f"relations_{d}", tuples, persistent=False)
        self.mlps = nn.ModuleList(
            nn.Sequential(nn.ReLU(), nn.Linear(d * in_features, bottleneck), nn.ReLU(), nn.Dropout(dropout),
                          nn.Linear(bottleneck, num_outputs))
            for d in self.scales
        )

    def out_features(self, channels: int) -> int:
        del channels  # the output size is fixed by num_outputs
        return self.num_outputs

    def relations(self, scale: int) -> torch.Tensor:
        """All ordered ``scale``-tuples of segment indices, (n, scale) int64."""
        return getattr(self, f"relations_{scale}")

    def _chosen(self, scale: int) -> torch.Tensor:
        tuples = self.relations(scale)
        n = tuples.shape[0]
        if scale == self.num_segments or n <= self.max_relations:
            return tuples
        if self.training:
            pick = torch.randperm(n)[: self.max_relations]
        else:
            pick = torch.linspace(0, n - 1, self.max_relations).round().long()
        return tuples[pick.to(tuples.device)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.in_features:
            raise ValueError(f"expected (B, K, {self.in_features}) segment features, got {tuple(x.shape)}")
        x = pool_to_segments(x, self.num_segments)
        B = x.shape[0]
        out = None
        for scale, mlp in zip(self.scales, self.mlps):
            tuples = self._chosen(scale)  # (n, d)
            # (B, n, d, C) → (B, n, d·C): each row is one ordered tuple's features, concatenated
            gathered = x[:, tuples].reshape(B, tuples.shape[0], scale * self.in_features)
            scores = mlp(gathered).sum(dim=1)
            out = scores if out is None else out + scores
        return out

    def extra_repr(self) -> str:
        return (f"num_segments={self.num_segments}, in_features={self.in_features}, "
                f"num_outputs={self.num_outputs}, max_relations={self.max_relations}")

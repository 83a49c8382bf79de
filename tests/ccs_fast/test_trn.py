"""TRN consensus: shapes, relation counts, gradient flow, order sensitivity, test-time pooling."""
import itertools

import pytest
import torch

from ccs_fast.trn import TemporalRelationConsensus, pool_to_segments


def test_shape_and_relations_per_scale():
    trn = TemporalRelationConsensus(num_segments=5, in_features=12, num_outputs=7, bottleneck=16).eval()
    assert trn.scales == [5, 4, 3, 2] and trn.out_features(12) == 7
    for d in trn.scales:
        assert trn.relations(d).tolist() == [list(t) for t in itertools.combinations(range(5), d)]
    x = torch.randn(3, 5, 12)
    assert trn(x).shape == (3, 7)
    assert [trn._chosen(d).shape[0] for d in trn.scales] == [1, 3, 3, 3]


def test_output_is_sum_of_scale_mlps_over_chosen_tuples():
    trn = TemporalRelationConsensus(num_segments=4, in_features=6, num_outputs=5, bottleneck=8).eval()
    x = torch.randn(2, 4, 6)
    expected = torch.zeros(2, 5)
    for d, mlp in zip(trn.scales, trn.mlps):
        for t in trn._chosen(d).tolist():
            expected += mlp(torch.cat([x[:, i] for i in t], dim=1))
    torch.testing.assert_close(trn(x), expected)


def test_gradients_reach_every_scale_and_input():
    trn = TemporalRelationConsensus(num_segments=4, in_features=8, num_outputs=3, bottleneck=16).train()
    x = torch.randn(5, 4, 8, requires_grad=True)
    trn(x).pow(2).sum().backward()
    assert x.grad is not None and (x.grad.abs().sum(dim=(0, 2)) > 0).all()
    for mlp in trn.mlps:
        assert mlp[1].weight.grad is not None and mlp[1].weight.grad.abs().sum() > 0


def test_depends_on_frame_order_unlike_average():
    trn = TemporalRelationConsensus(num_segments=3, in_features=8, num_outputs=4, bottleneck=16).eval()
    x = torch.randn(2, 3, 8)
    reversed_x = x.flip(1)
    torch.testing.assert_close(x.mean(1), reversed_x.mean(1))
    assert not torch.allclose(trn(x), trn(reversed_x), atol=1e-4)


def test_eval_is_deterministic_and_train_draws_change():
    trn = TemporalRelationConsensus(num_segments=6, in_features=4, num_outputs=3, bottleneck=8)
    x = torch.randn(2, 6, 4)
    trn.eval()
    torch.testing.assert_close(trn(x), trn(x))
    trn.train()
    outs = torch.stack([trn(x) for _ in range(8)])
    assert not torch.allclose(outs[0], outs[1:], atol=1e-6)  # different tuples drawn


def test_more_test_segments_are_pooled_to_training_sections():
    trn = TemporalRelationConsensus(num_segments=3, in_features=4, num_outputs=2, bottleneck=8).eval()
    x = torch.randn(2, 9, 4)
    pooled = torch.stack([x[:, 0:3].mean(1), x[:, 3:6].mean(1), x[:, 6:9].mean(1)], dim=1)
    torch.testing.assert_close(pool_to_segments(x, 3), pooled)
    torch.testing.assert_close(trn(x), trn(pooled))
    with pytest.raises(ValueError, match="at least 3 segments"):
        trn(torch.randn(2, 2, 4))

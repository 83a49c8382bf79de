from collections import Counter

import numpy as np
import pytest

from ccs_fast.dataloader.batch_samplers import BalancedBatchSampler, ShardedSampler

LABELS = np.repeat(np.arange(6), 12)  # 6 classes × 12 videos


def test_balanced_batches_are_n_classes_by_m_videos():
    sampler = BalancedBatchSampler(LABELS, classes_per_batch=3, videos_per_class=2, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 72 // 6
    for batch in batches:
        counts = Counter(int(LABELS[i]) for i in batch)
        assert len(batch) == 6 and len(counts) == 3 and set(counts.values()) == {2}
        assert len(set(batch)) == 6


def test_balanced_is_deterministic_per_seed_and_epoch():
    def epoch(seed, e):
        sampler = BalancedBatchSampler(LABELS, 3, 2, seed=seed)
        sampler.set_epoch(e)
        return list(sampler)

    assert epoch(0, 0) == epoch(0, 0)
    assert epoch(0, 0) != epoch(0, 1)
    assert epoch(0, 0) != epoch(1, 0)


def test_balanced_rank_shards_are_disjoint_and_equal():
    shards = []
    for rank in range(2):
        sampler = BalancedBatchSampler(LABELS, 2, 3, seed=5, rank=rank, world_size=2)
        sampler.set_epoch(3)
        shards.append(list(sampler))
    assert len(shards[0]) == len(shards[1]) == 72 // (6 * 2)
    plan = BalancedBatchSampler(LABELS, 2, 3, seed=5, world_size=2).epoch_batches(3)
    assert shards[0] == plan[0::2] and shards[1] == plan[1::2]
    videos = [{i for b in shard for i in b} for shard in shards]
    assert not videos[0] & videos[1]  # 4 groups of 3 per class: one pass, no refill
    assert len(videos[0] | videos[1]) == 72


def test_balanced_small_classes_sample_with_replacement():
    labels = np.array([0, 0, 0, 0, 1, 2, 2])
    sampler = BalancedBatchSampler(labels, classes_per_batch=2, videos_per_class=3, seed=0)
    for batch in sampler:
        counts = Counter(int(labels[i]) for i in batch)
        assert sorted(counts.values()) == [3, 3]
    with pytest.raises(ValueError, match="only 3 classes"):
        BalancedBatchSampler(labels, classes_per_batch=4, videos_per_class=1)


def test_sharded_training_is_a_permutation_split_over_ranks():
    samplers = [ShardedSampler(23, 4, shuffle=True, seed=2, rank=r, world_size=2) for r in range(2)]
    shards = [[i for b in s for i in b] for s in samplers]
    assert len(samplers[0]) == len(samplers[1]) == 11 // 4
    assert all(len(b) == 4 for s in samplers for b in s)
    assert not set(shards[0]) & set(shards[1])
    samplers[0].set_epoch(1)
    assert [i for b in samplers[0] for i in b] != shards[0]


@pytest.mark.parametrize("num_items,world_size,batch", [(11, 2, 3), (7, 3, 4), (2, 4, 8)])
def test_sharded_eval_covers_every_item_once(num_items, world_size, batch):
    seen = []
    for rank in range(world_size):
        sampler = ShardedSampler(num_items, batch, shuffle=False, rank=rank,
                                 world_size=world_size)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        seen += [i for b in batches for i in b]
    assert sorted(seen) == list(range(num_items))

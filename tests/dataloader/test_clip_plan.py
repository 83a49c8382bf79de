import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ccs_fast.dataloader.clip_plan import SCALE_PAIRS, clip_rng, plan_clip


def plan(num_frames=12, width=40, height=32, *, K=3, L=5, train=True, seed=0, epoch=0, index=0):
    return plan_clip(num_frames, width, height, num_segments=K, flow_length=L, train=train,
                     seed=seed, epoch=epoch, index=index)


@pytest.mark.parametrize("num_frames,K", [(6, 3), (12, 3), (13, 5), (100, 3), (7, 8)])
def test_train_indices_fall_in_their_segments(num_frames, K):
    num_flow = num_frames - 1
    bounds = (np.arange(K + 1) * num_flow) // K
    for index in range(20):
        p = plan(num_frames, K=K, index=index)
        assert p.frame_indices.dtype == np.int64 and p.frame_indices.shape == (K,)
        for k, t in enumerate(p.frame_indices):
            assert bounds[k] <= t < max(bounds[k + 1], bounds[k] + 1)
            assert t <= num_flow - 1


@pytest.mark.parametrize("num_frames", [6, 12, 251])
def test_test_indices_are_evenly_spaced(num_frames):
    num_flow = num_frames - 1
    p = plan(num_frames, K=25, train=False)
    k = np.arange(25)
    np.testing.assert_array_equal(p.frame_indices, (num_flow * (2 * k + 1)) // 50)
    assert p.flip is False


def test_flow_stack_starts_at_frame_and_clamps_at_the_end():
    p = plan(12, K=25, L=5, train=False)
    assert p.flow_indices.shape == (25, 5) and p.flow_indices.dtype == np.int64
    expected = np.minimum(p.frame_indices[:, None] + np.arange(5), 10)
    np.testing.assert_array_equal(p.flow_indices, expected)
    assert p.flow_indices[-1, -1] == 10 and (p.flow_indices[-1] == 10).sum() > 1


def test_draw_order_is_offsets_scale_position_flip():
    num_frames, width, height, K = 30, 50, 40, 3
    p = plan(num_frames, width, height, K=K, seed=7, epoch=2, index=11)
    rng = clip_rng(7, 2, 11)
    num_flow = num_frames - 1
    b = (np.arange(K + 1) * num_flow) // K
    offsets = [rng.integers(b[k], max(b[k + 1], b[k] + 1)) for k in range(K)]
    i, j = SCALE_PAIRS[rng.integers(len(SCALE_PAIRS))]
    sizes = [int(40 * s) for s in (1, .875, .75, .66)]
    w, h = sizes[i], sizes[j]
    ws, hs = (width - w) // 4, (height - h) // 4
    x0, y0 = [(0, 0), (4 * ws, 0), (0, 4 * hs), (4 * ws, 4 * hs), (2 * ws, 2 * hs)][rng.integers(5)]
    flip = rng.random() < 0.5
    np.testing.assert_array_equal(p.frame_indices, offsets)
    assert p.crop == (x0, y0, w, h) and p.flip == flip


def test_train_crops_stay_inside_the_frame_and_use_tsn_scales():
    seen_flip = set()
    for index in range(200):
        p = plan(12, 41, 29, index=index)
        x0, y0, w, h = p.crop
        assert 0 <= x0 and 0 <= y0 and x0 + w <= 41 and y0 + h <= 29
        assert w in {29, 25, 21, 19} and h in {29, 25, 21, 19}
        seen_flip.add(p.flip)
    assert seen_flip == {True, False}


def test_test_crop_is_a_centred_square():
    assert plan(12, 40, 32, train=False).crop == (6, 2, 28, 28)
    assert plan(12, 32, 40, train=False).crop == (2, 6, 28, 28)


def key(p):
    return (tuple(p.frame_indices), p.crop, p.flip)


def test_deterministic_per_seed_epoch_index():
    a, b = plan(50, seed=3, epoch=4, index=5), plan(50, seed=3, epoch=4, index=5)
    np.testing.assert_array_equal(a.frame_indices, b.frame_indices)
    np.testing.assert_array_equal(a.flow_indices, b.flow_indices)
    assert (a.crop, a.flip) == (b.crop, b.flip)


@pytest.mark.parametrize("changed", ["seed", "epoch", "index"])
def test_other_seed_epoch_or_index_draws_other_clips(changed):
    def clips(shift):
        args = dict(seed=3, epoch=4, index=0)
        args[changed] += shift
        first = args.pop("index")
        return [key(plan(50, index=first + i, **args)) for i in range(10)]

    assert clips(0) != clips(20)


def test_too_short_video_is_rejected():
    with pytest.raises(ValueError, match="fewer than the flow stack of 5"):
        plan(5, L=5)
    plan(6, L=5)  # exactly enough flow frames


# Properties of every plan, over random videos, segment counts and (seed, epoch, index).

@settings(max_examples=200, deadline=None)
@given(num_frames=st.integers(2, 400), num_segments=st.integers(1, 25), flow_length=st.integers(1, 10),
       width=st.integers(16, 400), height=st.integers(16, 400), train=st.booleans(),
       seed=st.integers(0, 2**31 - 1), epoch=st.integers(0, 100), index=st.integers(0, 10**6))
def test_every_plan_stays_inside_the_video_and_the_frame(num_frames, num_segments, flow_length, width,
                                                         height, train, seed, epoch, index):
    if num_frames - 1 < flow_length:
        return  # a video too short for the flow stack is bad input, tested above
    plan = plan_clip(num_frames, width, height, num_segments=num_segments, flow_length=flow_length,
                     train=train, seed=seed, epoch=epoch, index=index)
    num_flow = num_frames - 1
    assert plan.frame_indices.shape == (num_segments,) and plan.flow_indices.shape == (num_segments, flow_length)
    assert (plan.frame_indices >= 0).all() and (plan.frame_indices < num_flow).all()
    assert (plan.flow_indices >= 0).all() and (plan.flow_indices < num_flow).all()
    assert (plan.flow_indices[:, 0] == plan.frame_indices).all()  # the stack starts at the sampled frame
    assert (np.diff(plan.frame_indices) >= 0).all()  # segments in temporal order
    assert (np.diff(plan.flow_indices, axis=1) >= 0).all() and (np.diff(plan.flow_indices, axis=1) <= 1).all()
    x0, y0, w, h = plan.crop
    assert 0 <= x0 and 0 <= y0 and 0 < w and 0 < h and x0 + w <= width and y0 + h <= height
    assert train or (not plan.flip and w == h)
    again = plan_clip(num_frames, width, height, num_segments=num_segments, flow_length=flow_length,
                      train=train, seed=seed, epoch=epoch, index=index)
    assert np.array_equal(again.frame_indices, plan.frame_indices)
    assert np.array_equal(again.flow_indices, plan.flow_indices)
    assert again.crop == plan.crop and again.flip == plan.flip


def test_3d_plan_is_sample_frames_over_the_flow_frames():
    """A 3-D plan: N clips of T frames from sample_frames (offsets drawn before the crop),
    one flow pair per frame, the RGB frame of each position the first of its pair."""
    from ccs_fast.dataloader.sample_frames import flow_clip_indices
    from ccs_fast.dataloader.clip_plan import train_crop

    for index in range(5):
        p = plan_clip(40, 40, 32, num_segments=2, flow_length=1, train=True, seed=3,
                      epoch=1, index=index, clip_len=4, frame_interval=3)
        rng = clip_rng(3, 1, index)
        expected = flow_clip_indices(40, 4, 3, 2, train=True, rng=rng)
        assert (p.frame_indices == expected.reshape(-1)).all() and p.flow_indices.shape == (8, 1)
        assert (p.flow_indices[:, 0] == p.frame_indices).all()
        assert (p.crop, p.flip) == train_crop(40, 32, rng)  # the same generator, after the offsets
    test = plan_clip(40, 40, 32, num_segments=3, flow_length=1, train=False, seed=0,
                     epoch=0, index=0, clip_len=4, frame_interval=3)
    assert (test.frame_indices == flow_clip_indices(40, 4, 3, 3, train=False).reshape(-1)).all()
    assert not test.flip
    with pytest.raises(ValueError, match="one flow pair per frame"):
        plan_clip(40, 40, 32, num_segments=1, flow_length=5, train=False, seed=0,
                  epoch=0, index=0, clip_len=4)


@pytest.mark.parametrize("crops", [1, 3, 10])
def test_view_plans_are_the_multicrop_views(crops):
    from ccs_fast.dataloader.multicrop import crop_views
    from ccs_fast.dataloader.clip_plan import view_plans

    base = plan(train=False)
    views = view_plans(base, 40, 32, crops)
    assert [(v.crop, v.flip) for v in views] == [(c.box, c.flip) for c in crop_views(40, 32, crops)]
    assert all((v.frame_indices == base.frame_indices).all() for v in views)
    if crops == 1:
        assert views == [base]

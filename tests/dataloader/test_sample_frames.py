"""3-D clip frame indices (sample_frames): MMAction2 SampleFrames semantics, train and test,
out-of-bound handling."""
import numpy as np
import pytest

from ccs_fast.dataloader.sample_frames import (clip_frame_indices, flow_clip_indices, eval_clip_offsets,
                                               train_clip_offsets)


def test_eval_offsets_evenly_spaced_from_start_to_last_full_clip():
    # span = 7·2 + 1 = 15 frames, max_offset = 85, offsets round(0, 42.5, 85) (half to even)
    np.testing.assert_array_equal(eval_clip_offsets(100, 8, 2, 3), [0, 42, 85])
    indices = clip_frame_indices(100, 8, 2, 3, train=False)
    assert indices.shape == (3, 8) and indices.dtype == np.int64
    np.testing.assert_array_equal(indices[2], 85 + 2 * np.arange(8))
    assert indices.max() == 99


def test_single_test_clip_is_centred():
    assert eval_clip_offsets(100, 8, 2, 1).tolist() == [42]
    assert eval_clip_offsets(64, 32, 1, 1).tolist() == [16]


@pytest.mark.parametrize("out_of_bound, expected", [("loop", [0, 1, 2, 3, 4, 0, 1, 2]),
                                                    ("repeat_last", [0, 1, 2, 3, 4, 4, 4, 4])])
def test_short_video_out_of_bound(out_of_bound, expected):
    indices = clip_frame_indices(5, 8, 1, 1, train=False, out_of_bound=out_of_bound)
    assert indices.tolist() == [expected]


def test_train_offsets_one_per_section():
    # span = 16, avg_interval = (100 - 16 + 1) // 4 = 21: clip i starts in [21 i, 21 i + 21)
    rng = np.random.default_rng(np.random.SeedSequence().entropy)
    draws = np.stack([train_clip_offsets(100, 8, 2, 4, rng) for _ in range(400)])
    sections = np.arange(4) * 21
    assert (draws >= sections).all() and (draws < sections + 21).all()
    assert all(len(np.unique(draws[:, i])) == 21 for i in range(4))  # every offset reachable


def test_train_sorted_draws_when_sections_are_empty():
    # avg_interval = (20 - 16 + 1) // 8 = 0 and 20 > max(8, 16): sorted draws from [0, 4]
    rng = np.random.default_rng(np.random.SeedSequence().entropy)
    for _ in range(50):
        offsets = train_clip_offsets(20, 4, 4, 8, rng)
        assert (np.diff(offsets) >= 0).all() and offsets.min() >= 0 and offsets.max() <= 4


def test_train_deterministic_branches():
    rng = np.random.default_rng(0)
    # avg_interval == 0 and num_frames ≤ max(num_clips, span): round(i · 1/12)
    np.testing.assert_array_equal(train_clip_offsets(10, 10, 1, 12, rng), np.around(np.arange(12) / 12))
    # shorter than one clip: all zeros
    assert train_clip_offsets(5, 8, 1, 2, rng).tolist() == [0, 0]


def test_train_indices_reproducible_per_generator_and_in_range():
    seed = int(np.random.SeedSequence().entropy % 2**32)
    a = clip_frame_indices(50, 8, 4, 2, train=True, rng=np.random.default_rng(seed), temporal_jitter=True)
    b = clip_frame_indices(50, 8, 4, 2, train=True, rng=np.random.default_rng(seed), temporal_jitter=True)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (2, 8) and a.min() >= 0 and a.max() < 50


def test_test_sampling_ignores_rng_and_train_needs_it():
    np.testing.assert_array_equal(clip_frame_indices(40, 4, 2, 5, train=False, rng=np.random.default_rng(1)),
                                  clip_frame_indices(40, 4, 2, 5, train=False))
    with pytest.raises(ValueError, match="Generator"):
        clip_frame_indices(40, 4, 2, 5, train=True)
    with pytest.raises(ValueError, match="out_of_bound"):
        clip_frame_indices(40, 4, 2, 5, train=False, out_of_bound="wrap")


def test_flow_clip_stays_within_flow_frames():
    indices = flow_clip_indices(33, 16, 2, 3, train=False)
    assert indices.max() <= 31
    np.testing.assert_array_equal(indices, clip_frame_indices(32, 16, 2, 3, train=False))

"""What is read of one video (frames, crop, flip): ``plan_clip``, the clip plan every backend shares.

Beside it, ``batch_samplers`` decides which videos form a batch and ``sample_frames`` holds
the 3-D clip offsets a plan calls for ``clip_len`` > 0.

A plan depends only on (num_frames, width, height, options, seed, epoch, index), so the
torch and DALI backends, every worker and every rank draw exactly the same clip for the same
video in the same epoch. The random draws come from ``clip_rng(seed, epoch, index)`` in a
fixed order: K segment offsets, then the scale pair, then the crop position, then the flip.

3-D base models (``clip_len`` > 0): the K segments become K clips of ``clip_len`` frames
``frame_interval`` apart, MMAction2's ``SampleFrames`` over the flow frames
(``sample_frames.flow_clip_indices``: random offsets in training, evenly spaced at test),
drawn before the crop; the RGB frame of each position is the first frame of its flow pair,
and each position has a flow stack of one pair (``flow_length`` must be 1). ``frame_indices``
then holds the K·T positions clip after clip.

Multi-crop testing: ``view_plans(plan, width, height, num_crops)`` gives the plan once per
view of ``multicrop.crop_views`` (same frames; the view's box and flip).

Frames follow denseflow: a video of ``num_frames`` RGB frames has ``num_frames - 1`` flow
frames (one per consecutive pair). Indices are 0-based; files are 1-based
(``img_{i+1:05d}.jpg``, ``flow_x_{i+1:05d}.jpg``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

# TSN multi-scale crop (Wang et al. 2016): scales of the shorter side, and the scale pairs
# (width, height) whose scale indices differ by at most one.
CROP_SCALES = (1.0, 0.875, 0.75, 0.66)
SCALE_PAIRS = tuple(
    (i, j) for i in range(len(CROP_SCALES)) for j in range(len(CROP_SCALES)) if abs(i - j) <= 1
)
NUM_CROP_POSITIONS = 5  # four corners and the centre
TEST_CROP_SCALE = 0.875


def clip_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of one video's clip in one epoch."""
    return np.random.default_rng([seed, epoch, index])


@dataclass(frozen=True)
class ClipPlan:
    frame_indices: np.ndarray  # (K,) int64, 0-based RGB frame indices
    flow_indices: np.ndarray  # (K, L) int64, 0-based flow frame indices
    crop: tuple[int, int, int, int]  # x0, y0, w, h in source pixels
    flip: bool


def num_flow_frames(num_frames: int) -> int:
    """Flow frames of a video of ``num_frames`` RGB frames (denseflow: one per pair)."""
    return num_frames - 1


def segment_starts(num_flow: int, num_segments: int, rng: np.random.Generator | None):
    """t_k per segment: random within each of K equal segments (rng given) or centred."""
    k = np.arange(num_segments)
    if rng is None:
        return (num_flow * (2 * k + 1)) // (2 * num_segments)
    bounds = (np.arange(num_segments + 1) * num_flow) // num_segments
    starts = [
        int(rng.integers(bounds[s], max(bounds[s + 1], bounds[s] + 1)))
        for s in range(num_segments)
    ]
    return np.minimum(np.asarray(starts, dtype=np.int64), num_flow - 1)


def train_crop(width: int, height: int, rng: np.random.Generator):
    """TSN multi-scale crop (x0, y0, w, h) and flip; draws scale pair, position, flip."""
    base = min(width, height)
    sizes = [int(base * s) for s in CROP_SCALES]
    i, j = SCALE_PAIRS[int(rng.integers(len(SCALE_PAIRS)))]
    crop_w, crop_h = sizes[i], sizes[j]
    ws, hs = (width - crop_w) // 4, (height - crop_h) // 4
    positions = ((0, 0), (4 * ws, 0), (0, 4 * hs), (4 * ws, 4 * hs), (2 * ws, 2 * hs))
    x0, y0 = positions[int(rng.integers(NUM_CROP_POSITIONS))]
    flip = bool(rng.random() < 0.5)
    return (x0, y0, crop_w, crop_h), flip


def centre_crop(width: int, height: int):
    """Centred square of side round(0.875 · shorter side)."""
    side = round(TEST_CROP_SCALE * min(width, height))
    return ((width - side) // 2, (height - side) // 2, side, side)


def plan_clip(num_frames, width, height, *, num_segments, flow_length, train, seed, epoch, index,
              clip_len: int = 0, frame_interval: int = 1) -> ClipPlan:
    """The clip of video ``index`` in ``epoch``: frame and flow indices, crop and flip (the
    backend resizes the crop to its input size).

    Raises ValueError when the video has fewer flow frames than ``flow_length``; callers turn
    that into a CCSError naming the video (or skip it with skip_bad).
    """
    num_flow = num_flow_frames(num_frames)
    if num_flow < flow_length:
        raise ValueError(
            f"{num_frames} frames give {max(num_flow, 0)} flow frames, "
            f"fewer than the flow stack of {flow_length}"
        )
    if clip_len:
        return _plan_3d(num_frames, width, height, num_clips=num_segments, clip_len=clip_len,
                        frame_interval=frame_interval, flow_length=flow_length, train=train,
                        rng=clip_rng(seed, epoch, index) if train else None)
    if train:
        rng = clip_rng(seed, epoch, index)
        starts = segment_starts(num_flow, num_segments, rng)
        crop, flip = train_crop(width, height, rng)
    else:
        starts = segment_starts(num_flow, num_segments, None)
        crop, flip = centre_crop(width, height), False
    starts = np.asarray(starts, dtype=np.int64)
    flow = np.minimum(starts[:, None] + np.arange(flow_length, dtype=np.int64), num_flow - 1)
    return ClipPlan(frame_indices=starts, flow_indices=flow, crop=tuple(int(c) for c in crop),
                    flip=flip)


def _plan_3d(num_frames, width, height, *, num_clips, clip_len, frame_interval, flow_length, train, rng):
    from .sample_frames import flow_clip_indices

    if flow_length != 1:
        raise ValueError(f"3-D clips take one flow pair per frame (flow_length 1), got {flow_length}")
    indices = flow_clip_indices(num_frames, clip_len, frame_interval, num_clips, train=train, rng=rng)
    crop, flip = train_crop(width, height, rng) if train else (centre_crop(width, height), False)
    positions = indices.reshape(-1).astype(np.int64)
    return ClipPlan(frame_indices=positions, flow_indices=positions[:, None].copy(),
                    crop=tuple(int(c) for c in crop), flip=flip)


def view_plans(plan: ClipPlan, width: int, height: int, num_crops: int) -> list[ClipPlan]:
    """``plan`` once per test view (``multicrop.crop_views``): 1 view is ``plan`` itself
    (the centre crop of ``centre_crop``)."""
    if num_crops == 1:
        return [plan]
    from .multicrop import crop_views

    return [dataclasses.replace(plan, crop=view.box, flip=view.flip)
            for view in crop_views(width, height, num_crops)]

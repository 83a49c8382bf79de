"""3-D clip frame indices: MMAction2's ``SampleFrames(clip_len, frame_interval, num_clips)``, used by ``clip_plan``.

Pure index functions (no I/O). A clip is ``clip_len`` frames ``frame_interval`` apart starting at
a clip offset; ``num_clips`` clips per video. Indices are 0-based (add the data set's
``start_index`` for file names, as MMAction2 does after sampling).

Train (``train_clip_offsets``), with ``span = clip_len · frame_interval`` and
``avg = (num_frames − span + 1) // num_clips``:

- ``avg > 0``: clip i starts at ``i·avg + u_i``, u_i uniform in ``[0, avg)``: one random offset in
  each of ``num_clips`` equal sections, as TSN does with single frames;
- else, if ``num_frames > max(num_clips, span)``: ``num_clips`` sorted uniform draws from
  ``[0, num_frames − span]``;
- else, if ``avg == 0``: the deterministic offsets ``round(i · (num_frames − span + 1) / num_clips)``;
- else (the video is shorter than one clip): every clip starts at 0.

Evaluation (``eval_clip_offsets``), deterministic, with ``span = (clip_len − 1) · frame_interval + 1``
(the frames one clip actually covers) and ``max_offset = max(num_frames − span, 0)``:
``num_clips > 1`` spreads the offsets evenly from 0 to ``max_offset`` inclusive
(``round(i · max_offset / (num_clips − 1))``); one clip sits at ``max_offset // 2``.

``clip_frame_indices`` adds ``arange(clip_len) · frame_interval`` to each offset, then handles
indices past the end: ``"loop"`` (MMAction2's default) wraps modulo ``num_frames``,
``"repeat_last"`` repeats each clip's last valid index. Optional temporal jitter adds a uniform
``[0, frame_interval)`` shift per frame (train only in practice).

These follow MMAction2 1.x (``mmaction/datasets/transforms/loading.py``, ``keep_tail_frames=False``,
``twice_sample=False``). Random draws come from the ``numpy.random.Generator`` the caller passes
(e.g. ``clip_plan.clip_rng(seed, epoch, index)``), so both loader backends and every worker draw
the same clip for the same video and epoch, where MMAction2 uses numpy's global state.
"""
from __future__ import annotations

import numpy as np

OUT_OF_BOUND_OPTIONS = ("loop", "repeat_last")


def _check(num_frames: int, clip_len: int, frame_interval: int, num_clips: int) -> None:
    if num_frames < 1:
        raise ValueError(f"a video needs at least one frame, got num_frames={num_frames}")
    if clip_len < 1 or frame_interval < 1 or num_clips < 1:
        raise ValueError(
            f"clip_len, frame_interval and num_clips must be ≥ 1, got {clip_len}, {frame_interval}, {num_clips}"
        )


def train_clip_offsets(num_frames: int, clip_len: int, frame_interval: int, num_clips: int,
                       rng: np.random.Generator) -> np.ndarray:
    """Random clip start indices (num_clips,) int64 for training (see the module docstring)."""
    _check(num_frames, clip_len, frame_interval, num_clips)
    span = clip_len * frame_interval
    avg_interval = (num_frames - span + 1) // num_clips
    if avg_interval > 0:
        offsets = np.arange(num_clips) * avg_interval + rng.integers(avg_interval, size=num_clips)
    elif num_frames > max(num_clips, span):
        offsets = np.sort(rng.integers(num_frames - span + 1, size=num_clips))
    elif avg_interval == 0:
        ratio = (num_frames - span + 1.0) / num_clips
        offsets = np.around(np.arange(num_clips) * ratio)
    else:
        offsets = np.zeros(num_clips)
    return offsets.astype(np.int64)


def eval_clip_offsets(num_frames: int, clip_len: int, frame_interval: int, num_clips: int) -> np.ndarray:
    """Evenly spaced clip start indices (num_clips,) int64 for testing (deterministic)."""
    _check(num_frames, clip_len, frame_interval, num_clips)
    span = (clip_len - 1) * frame_interval + 1
    max_offset = max(num_frames - span, 0)
    if num_clips == 1:
        return np.array([max_offset // 2], dtype=np.int64)
    return np.round(np.arange(num_clips) * (max_offset / (num_clips - 1))).astype(np.int64)


def clip_frame_indices(num_frames: int, clip_len: int, frame_interval: int = 1, num_clips: int = 1, *,
                       train: bool, rng: np.random.Generator | None = None, out_of_bound: str = "loop",
                       temporal_jitter: bool = False) -> np.ndarray:
    """0-based frame indices (num_clips, clip_len) int64 of MMAction2's ``SampleFrames``.

    ``train`` needs ``rng`` (clip offsets and jitter are drawn from it); test sampling is
    deterministic and ignores it. Every index lies in ``[0, num_frames)``.
    """
    if out_of_bound not in OUT_OF_BOUND_OPTIONS:
        raise ValueError(f"out_of_bound must be one of {', '.join(OUT_OF_BOUND_OPTIONS)}, got {out_of_bound!r}")
    if train and rng is None:
        raise ValueError("train sampling needs a numpy Generator (rng)")
    if train:
        offsets = train_clip_offsets(num_frames, clip_len, frame_interval, num_clips, rng)
    else:
        offsets = eval_clip_offsets(num_frames, clip_len, frame_interval, num_clips)
    indices = offsets[:, None] + np.arange(clip_len, dtype=np.int64)[None, :] * frame_interval
    if temporal_jitter:
        if rng is None:
            raise ValueError("temporal_jitter needs a numpy Generator (rng)")
        indices = indices + rng.integers(frame_interval, size=indices.shape)
    if out_of_bound == "loop":
        return np.mod(indices, num_frames)
    valid = indices < num_frames
    last_valid = np.max(np.where(valid, indices, 0), axis=1, keepdims=True)
    return np.where(valid, indices, last_valid)


def flow_clip_indices(num_frames: int, clip_len: int, frame_interval: int = 1, num_clips: int = 1, **kwargs):
    """Flow frame indices (num_clips, clip_len) for a video of ``num_frames`` RGB frames.

    denseflow writes ``num_frames − 1`` flow frames (one per consecutive pair), so the clip is
    sampled over those; the RGB clip of the same video and draw is ``clip_frame_indices`` over
    ``num_frames``. With one generator per (seed, epoch, index), sample the flow clip and use
    its indices for the RGB frames too when both streams must see the same instants.
    """
    if num_frames < 2:
        raise ValueError(f"{num_frames} frames give no flow frame")
    return clip_frame_indices(num_frames - 1, clip_len, frame_interval, num_clips, **kwargs)

"""The video-file backend: clips of video files decoded on the fly, for ``ccs-fast predict``.

Each video is decoded with PyAV and resized as ``prepare`` resizes (short side
``short_side``, 256 by default), its flow is computed with the chosen estimator and
quantised as stored rawframes are (denseflow's uint8 mapping, bound 20; only the JPEG
compression of stored flow is left out), and the clip is planned with the TSN test protocol
(``spec.num_segments`` evenly spaced segments, centre crop, ``spec.flow_length`` flow pairs
per segment; ``clip_plan.plan_clip``), cut and normalised as the torch backend cuts and
normalises rawframes. Only the flow pairs the clip needs are computed.

One batch per video (B = 1) in the order given: the loader contract's ``rgb``, ``flow``,
``label`` (−1: video files carry none) and ``index`` (the video's position in the list).
A bad video (missing, a folder, undecodable, too short) is a CCSError naming it, or with
``spec.skip_bad`` no batch and an entry in ``skipped_errors``. ``short`` collects
``prepare``'s line for each video that decodes to fewer frames than its container declares
(it is predicted from the frames it has). ``progress``: the flow pairs of each video on
stderr (``progress.Progress``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from ccs_fast.base.errors import CCSError, bad_file

from .flow import FLOW_BOUND, flow_to_uint8, make_flow_estimator
from .prepare_videos import decode_resized, short_decode_line
from .progress import Progress
from .clip_plan import plan_clip
from .spec import LoaderSpec
from .torch_loader import cut_clip, normalize_on_device

DEFAULT_SHORT_SIDE = 256  # prepare's default: 320x240 -> 340x256


def video_file_clip(path, spec: LoaderSpec, estimator: Callable, short_side: int = DEFAULT_SHORT_SIDE,
                    progress: bool = False, notes: Optional[list] = None) -> tuple[np.ndarray, np.ndarray]:
    """The TSN test clip of a video file: uint8 RGB (K, S, S, 3) and flow (K, S, S, 2L),
    K = ``spec.num_segments``; CCSError naming the file for a missing, undecodable or too
    short video, or a folder. ``notes`` receives ``prepare``'s short-decode line."""
    import av

    path = Path(path)
    if path.is_dir():
        raise bad_file(path, "is a folder, not a video file (rawframe folders are predicted with --list)")
    if not path.is_file():
        raise bad_file(path, "video not found")
    info: dict = {}
    try:
        frames = list(decode_resized(path, short_side, info))
    except (av.FFmpegError, IndexError) as exc:
        raise bad_file(path, f"cannot decode video ({exc.__class__.__name__})") from None
    if not frames:
        raise bad_file(path, "no frames decoded")
    short = short_decode_line(path, len(frames), info.get("declared", 0))
    if short and notes is not None:
        notes.append(short)
    height, width = frames[0].shape[:2]
    try:
        plan = plan_clip(len(frames), width, height, num_segments=spec.num_segments,
                         flow_length=spec.flow_length, train=False, seed=spec.seed, epoch=0, index=0)
    except ValueError as exc:
        raise bad_file(path, f"video too short: {exc}") from None
    with Progress(len(np.unique(plan.flow_indices)), f"flow of {path.name}", unit="pairs",
                  enabled=progress) as bar:
        flow_pair = _FlowPairs(path, frames, estimator, bar)
        rgb_frames = [(path, frames[int(i)]) for i in plan.frame_indices]
        return cut_clip(plan, width, height, spec.input_size, rgb_frames, flow_pair)


class _FlowPairs:
    """``flow_pair(i)`` of ``cut_clip``: the uint8 flow of frames i → i + 1, each pair and
    each grey frame computed once."""

    def __init__(self, path: Path, frames: list, estimator: Callable, bar: Progress):
        self.path, self.frames, self.estimator, self.bar = path, frames, estimator, bar
        self.grey: dict[int, np.ndarray] = {}
        self.flows: dict[int, tuple] = {}

    def grey_frame(self, i: int) -> np.ndarray:
        import cv2

        if i not in self.grey:
            self.grey[i] = cv2.cvtColor(self.frames[i], cv2.COLOR_RGB2GRAY)
        return self.grey[i]

    def __call__(self, i: int):
        if i not in self.flows:
            fx, fy = flow_to_uint8(self.estimator(self.grey_frame(i), self.grey_frame(i + 1)), FLOW_BOUND)
            self.flows[i] = ((f"{self.path} flow_x {i}", fx), (f"{self.path} flow_y {i}", fy))
            self.bar.update()
        return self.flows[i]


class VideoFileLoader:
    """One batch per video file (module docstring); the ``Loader`` protocol of the other
    backends, with one epoch = every video once."""

    def __init__(self, videos: Sequence, spec: LoaderSpec, estimator: Callable, *,
                 short_side: int = DEFAULT_SHORT_SIDE, progress: bool = False):
        self.videos = list(videos)
        self.spec = spec
        self.estimator = estimator
        self.short_side = short_side
        self.progress = progress
        self.device = torch.device(spec.device)
        self.num_videos = len(self.videos)
        self.num_classes = spec.num_classes
        self.frame_count = None  # no annotation list
        self.short: list[str] = []
        self.skipped_errors: dict[int, str] = {}
        self.num_skipped = 0
        self.batches_done = 0

    def set_epoch(self, epoch: int, first_batch: int = 0) -> None:
        """Test clips do not depend on the epoch; ``first_batch`` videos are left out."""
        self.batches_done = first_batch

    def __len__(self) -> int:
        return self.num_videos

    def close(self) -> None:
        """Nothing to stop: videos are decoded in this process."""

    def __iter__(self):
        first, self.batches_done = self.batches_done, 0
        for index in range(first, self.num_videos):
            self.batches_done = index + 1
            try:
                rgb, flow = video_file_clip(self.videos[index], self.spec, self.estimator, self.short_side,
                                            progress=self.progress, notes=self.short)
            except CCSError as exc:
                if not self.spec.skip_bad:
                    raise
                self.skipped_errors[index] = str(exc)
                self.num_skipped += 1
                continue
            rgb_t, flow_t = normalize_on_device(torch.from_numpy(rgb[None]).to(self.device),
                                                torch.from_numpy(flow[None]).to(self.device), self.spec.dtype)
            yield {"rgb": rgb_t, "flow": flow_t,
                   "label": torch.full((1,), -1, dtype=torch.int64, device=self.device),
                   "index": torch.full((1,), index, dtype=torch.int64, device=self.device)}


def build_video_file_loader(videos: Sequence, spec: LoaderSpec, *, flow: str = "tvl1",
                            flow_params: Optional[dict] = None, short_side: Optional[int] = None,
                            progress: bool = False) -> VideoFileLoader:
    """The video-file loader of ``videos`` with ``spec``'s test clips (num_segments,
    flow_length, input_size, seed, device, dtype, skip_bad, num_classes; the annotation and
    data root are not read), the ``flow`` estimator (``flow.make_flow_estimator``) and frames
    resized to ``short_side`` (None: ``DEFAULT_SHORT_SIDE``)."""
    return VideoFileLoader(videos, spec, make_flow_estimator(flow, **(flow_params or {})),
                           short_side=short_side or DEFAULT_SHORT_SIDE, progress=progress)

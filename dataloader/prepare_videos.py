"""One video of ``ccs-fast prepare``: decode, resize, flow, write its rawframes folder.

``decode_resized`` gives a video's RGB frames with the short side ``short_side``
(``resized_shape``: the long side rounded down to even, 320×240 → 340×256); a ``VideoTask``
names one video and where its frames go, and its ``VideoResult`` says what became of it
(frames written, or one line, with ``disk_full`` when a full disk is why). Two ways to run
tasks: ``prepare_video`` per task (OpenCV's ``tvl1`` and ``farneback``, in a process pool
whose workers start with ``pool_worker_init``), or ``prepare_batched`` (``tvl1-torch``:
threads decode ahead and write, flow runs on batches of pairs of one frame size drawn
across videos). ``prepare.py`` plans the tasks and keeps the data set's books.
"""
from __future__ import annotations

import errno
import shutil
import signal
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np

from ccs_fast.base.signals import end_with_parent

from .flow import write_rawframes
from .rawframes import FrameNaming
from .transforms import video_frame_rgb


def resized_shape(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(width, height) with the short side ``short_side``, the long side rounded down to even."""
    if width <= height:
        return short_side, max(2, int(height * short_side / width) // 2 * 2)
    return max(2, int(width * short_side / height) // 2 * 2), short_side


def decode_resized(path, short_side: int, info: dict | None = None):
    """RGB uint8 frames of a video, resized so the short side is ``short_side`` (generator).
    ``info["declared"]`` receives the frame count the container declares (0: unknown)."""
    import av
    import cv2

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        if info is not None:
            info["declared"] = int(stream.frames or 0)
        size = None
        for frame in container.decode(stream):
            rgb = video_frame_rgb(frame)
            if size is None:
                size = resized_shape(rgb.shape[1], rgb.shape[0], short_side)
            if (rgb.shape[1], rgb.shape[0]) != size:
                rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_LINEAR)
            yield rgb


FULL_DISK_FREE = 2**20  # a failed JPEG write (OpenCV gives no errno) with less free is a full disk

DEFAULT_SHORT_SIDE = 256  # 320x240 -> 340x256, MMAction2's size


class VideoTask(NamedTuple):
    """One video to prepare, as a worker receives it (pickles into the pool)."""
    video: str  # its path in the split files, e.g. Class/v_X.avi
    source: Path  # the video file
    target: Path  # its rawframes folder
    flow: str
    short_side: int
    overwrite: bool
    naming: FrameNaming


class VideoResult(NamedTuple):
    """What became of one video: ``frames`` written (and ``short``, the short-decode line, or
    None), or ``problem``, one line, with ``disk_full`` when that is why."""
    video: str
    frames: Optional[int]
    problem: Optional[str]
    short: Optional[str]
    disk_full: bool


def _is_disk_full(exc: BaseException, folder: Path) -> bool:
    code = getattr(exc, "errno", None)
    if code in (errno.ENOSPC, errno.EDQUOT):
        return True
    if isinstance(exc, OSError) and code is None and "could not write" in str(exc):
        try:
            return shutil.disk_usage(folder).free < FULL_DISK_FREE
        except OSError:
            return False
    return False


def _failed(task: VideoTask, exc: BaseException) -> VideoResult:
    """The result of a video that failed; a full disk is marked as such."""
    folder = Path(task.target).parent
    if _is_disk_full(exc, folder):
        return VideoResult(task.video, None, f"{folder}: disk full (no space left on device)", None, True)
    return VideoResult(task.video, None, _problem(task.source, exc), None, False)


def _problem(source, exc: BaseException) -> str:
    # an OSError's (or PyAV error's) text repeats the path after "[Errno N]": the reason
    # alone, the path once
    reason = getattr(exc, "strerror", None) or str(exc)
    return f"{source}: {reason.splitlines()[0] if reason else exc.__class__.__name__}"


def short_decode_line(source, n: int, declared: int) -> str | None:
    """The summary line of a video that decoded to fewer frames than its container declares."""
    if declared and n < declared:
        return f"{source}: decoded {n} of the {declared} frames its container declares (truncated?)"
    return None


def prepare_video(task: VideoTask) -> VideoResult:
    """Worker: decode, flow and write one video."""
    try:
        if not task.source.is_file():
            raise FileNotFoundError("video not found")
        info = {}
        n = write_rawframes(decode_resized(task.source, task.short_side, info), task.target, method=task.flow,
                            overwrite=task.overwrite, naming=task.naming)
        return VideoResult(task.video, n, None, short_decode_line(task.source, n, info.get("declared", 0)), False)
    except Exception as exc:  # one bad video must not stop the run; it is reported and counted
        return _failed(task, exc)


class _Precomputed:
    """A flow 'estimator' that hands out flows computed beforehand, in pair order."""

    def __init__(self, flows):
        self._flows = iter(flows)

    def __call__(self, gray0, gray1):
        return next(self._flows)


class _Video:
    """One video of the batched path: its frames, grey frames and flows as they arrive."""

    def __init__(self, task: VideoTask, frames, declared):
        import cv2

        self.task, self.frames, self.declared = task, frames, declared
        self.grey = [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames]
        self.flows = [None] * max(0, len(frames) - 1)
        self.remaining = len(self.flows)
        self.failed = False


def _decode_task(task: VideoTask) -> tuple[Optional[_Video], Optional[VideoResult]]:
    try:
        if not task.source.is_file():
            raise FileNotFoundError("video not found")
        info = {}
        frames = list(decode_resized(task.source, task.short_side, info))
        if not frames:
            raise ValueError("no frames decoded")
        return _Video(task, frames, info.get("declared", 0)), None
    except Exception as exc:  # reported per video, like prepare_video
        return None, _failed(task, exc)


def _write_task(video: _Video) -> VideoResult:
    task = video.task
    try:
        n = write_rawframes(video.frames, task.target, method=_Precomputed(video.flows),
                            overwrite=task.overwrite, naming=task.naming)
        return VideoResult(task.video, n, None, short_decode_line(task.source, n, video.declared), False)
    except Exception as exc:
        return _failed(task, exc)


def _flow_of_batch(batch, estimator, pool, writing: list) -> list[VideoResult]:
    """Flow for one batch of (video, pair index); a video whose last pair this was goes to
    ``writing``. Returns the failures: every video with a pair in a batch that fails, named."""
    try:
        g0 = np.stack([v.grey[i] for v, i in batch])
        g1 = np.stack([v.grey[i + 1] for v, i in batch])
        flows = estimator.batch(g0, g1).cpu().numpy()
    except Exception as exc:
        failed = {id(v): v for v, _ in batch if not v.failed}
        for v in failed.values():
            v.failed = True
        return [VideoResult(v.task.video, None, _problem(v.task.source, exc), None, False) for v in failed.values()]
    for (video, i), flow in zip(batch, flows):
        if video.failed:
            continue
        video.flows[i] = flow
        video.remaining -= 1
        if video.remaining == 0:
            writing.append(pool.submit(_write_task, video))
    return []


def _too_small(video: _Video) -> Optional[VideoResult]:
    """The failure of a video with pairs whose frames TV-L1's pyramid cannot take."""
    from .tvl1 import MIN_SIDE

    h, w = video.grey[0].shape
    if video.remaining and (h < MIN_SIDE or w < MIN_SIDE):
        return VideoResult(video.task.video, None, f"{video.task.source}: frames of {w}x{h} are too small "
                           f"for TV-L1's pyramid (each side needs at least {MIN_SIDE} pixels)", None, False)
    return None


def prepare_batched(tasks, estimator, batch_pairs: int, threads: int):
    """Results like ``prepare_video``'s for ``tvl1-torch``: threads decode up to ``2 × threads``
    videos ahead and write finished ones; flow runs here on batches of ``batch_pairs`` pairs of
    one frame size, pairs of several videos together."""
    groups: dict = {}  # (H, W) -> [(video, pair index)]
    with ThreadPoolExecutor(threads) as pool:
        decoding, writing = deque(), []
        todo = iter(tasks)

        def refill():
            for task in todo:
                decoding.append(pool.submit(_decode_task, task))
                if len(decoding) >= 2 * threads:
                    break

        refill()
        while decoding:
            video, failure = decoding.popleft().result()
            refill()
            failure = failure or _too_small(video)
            if failure is not None:
                yield failure
                continue
            if not video.remaining:
                writing.append(pool.submit(_write_task, video))
            size = video.grey[0].shape
            for i in range(video.remaining):
                groups.setdefault(size, []).append((video, i))
                if len(groups[size]) >= batch_pairs:
                    yield from _flow_of_batch(groups.pop(size), estimator, pool, writing)
            while writing and writing[0].done():
                yield writing.pop(0).result()
        for size in list(groups):
            yield from _flow_of_batch(groups.pop(size), estimator, pool, writing)
        for future in writing:
            yield future.result()


def pool_worker_init(parent_pid=None):
    import cv2

    cv2.setNumThreads(1)  # the pool already uses every core
    # Ctrl-C reaches the whole process group: the main process stops the pool (SIGTERM, which
    # a worker keeps: Pool.terminate relies on it)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    end_with_parent(parent_pid)

"""``ccs-fast prepare``: a UCF-101 / HMDB-51 video tree → rawframes, TV-L1 flow, annotation lists.

Input: ``videos_dir/<Class>/<video>.avi`` (decoded with PyAV) and the official split files
(UCF-101: ``classInd.txt`` + ``trainlist0N.txt``/``testlist0N.txt``; HMDB-51:
``<class>_test_split<N>.txt``). Output under ``out_dir``:

- ``rawframes/<Class>/<video>/img_00001.jpg … flow_x_/flow_y_00001.jpg …``: frames resized
  so the short side is ``short_side`` (the long side rounded down to an even number, so
  320×240 → 340×256, MMAction2's size), flow by ``flow.write_rawframes`` (TV-L1, bound 20);
- ``train_rawframes_split{N}.txt`` / ``val_rawframes_split{N}.txt`` (``frame_dir
  num_frames label``), the lists ``build_loader(annotation, out_dir/"rawframes")`` reads.

Flow: ``tvl1`` (OpenCV, CPU), ``tvl1-torch`` (``dataloader.tvl1``: the same algorithm in
torch, on ``flow_device`` cpu or cuda) or ``farneback``; by default ``tvl1-torch`` on CUDA
where a GPU is present and ``tvl1`` otherwise. The summary names the one that ran.

With ``tvl1`` and ``farneback`` videos are processed by a process pool, one video per task.
With ``tvl1-torch`` threads decode videos ahead and write finished ones while the main thread
computes flow on batches of ``batch_pairs`` frame pairs of one size, drawn across videos, so
a GPU is fed whole batches rather than one short video at a time. Either way each folder is
written to a temporary name and renamed when complete, so a rerun skips finished videos and
redoes interrupted ones. A video that fails is reported on one line, counted and left out of
the lists; the run goes on. A video that decodes to fewer frames than its container declares
(a truncated file) is prepared with the frames it has and listed in the summary as short.
"""
from __future__ import annotations

import os
import re
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from ccs_fast.errors import CCSError, bad_file

from .flow import (FLOW_METHODS, default_flow_method, make_flow_estimator, resolve_flow_device,
                   write_rawframes)
from .rawframes import FrameNaming, add_naming_arguments, naming_from_arguments
from .progress import VideoProgress
from .formats import VideoRecord, read_hmdb51_split, read_ucf101_split, write_rawframe_list
from .transforms import video_frame_rgb

_UCF_TRAIN = re.compile(r"^trainlist(\d+)\.txt$")
_HMDB_SPLIT = re.compile(r"_test_split(\d+)\.txt$")


def read_splits(splits_dir) -> dict[int, tuple[list[VideoRecord], list[VideoRecord]]]:
    """{split number: (train records, val records)} from UCF-101 or HMDB-51 split files."""
    splits_dir = Path(splits_dir)
    if not splits_dir.is_dir():
        raise bad_file(splits_dir, "split folder not found")
    names = os.listdir(splits_dir)
    ucf = sorted(int(m[1]) for m in map(_UCF_TRAIN.match, names) if m)
    if ucf:
        class_ind = splits_dir / "classInd.txt"
        if not class_ind.is_file():
            raise bad_file(class_ind, "UCF-101 class list not found")
        splits = {}
        for n in ucf:
            train = read_ucf101_split(splits_dir / f"trainlist{n:02d}.txt", class_ind)
            test_file = splits_dir / f"testlist{n:02d}.txt"
            val = read_ucf101_split(test_file, class_ind) if test_file.exists() else []
            splits[n] = (train, val)
        return splits
    hmdb = sorted({int(m[1]) for m in map(_HMDB_SPLIT.search, names) if m})
    if hmdb:
        return {n: (read_hmdb51_split(splits_dir, n, train=True),
                    read_hmdb51_split(splits_dir, n, train=False)) for n in hmdb}
    raise bad_file(splits_dir, "no UCF-101 (trainlist01.txt, classInd.txt) or HMDB-51 "
                               "(<class>_test_split1.txt) split files")


def frames_dir_name(video_path: str) -> str:
    """``Class/v_X.avi`` → ``Class/v_X`` (the rawframes folder and list entry)."""
    return str(Path(video_path).with_suffix("")).replace(os.sep, "/")


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


def count_frames(frames_dir: Path, naming: FrameNaming = FrameNaming()) -> int:
    pattern = naming.rgb_pattern()
    return sum(1 for name in os.listdir(frames_dir) if pattern.match(name))


def _problem(source, exc: BaseException) -> str:
    # an OSError's (or PyAV error's) text repeats the path after "[Errno N]": the reason
    # alone, the path once
    reason = getattr(exc, "strerror", None) or str(exc)
    return f"{source}: {reason.splitlines()[0] if reason else exc.__class__.__name__}"


def _short(source, n: int, declared: int) -> str | None:
    """The summary line of a video that decoded to fewer frames than its container declares."""
    if declared and n < declared:
        return f"{source}: decoded {n} of the {declared} frames its container declares (truncated?)"
    return None


def _prepare_one(task):
    """Worker: (video path, frames, None, short line or None) when done, (video path, None,
    message, None) on failure."""
    video_path, source, target, flow, short_side, overwrite, naming = task
    try:
        if not source.is_file():
            raise FileNotFoundError("video not found")
        info = {}
        n = write_rawframes(decode_resized(source, short_side, info), target, method=flow,
                            overwrite=overwrite, naming=naming)
        return video_path, n, None, _short(source, n, info.get("declared", 0))
    except Exception as exc:  # one bad video must not stop the run; it is reported and counted
        return video_path, None, _problem(source, exc), None


class _Precomputed:
    """A flow 'estimator' that hands out flows computed beforehand, in pair order."""

    def __init__(self, flows):
        self._flows = iter(flows)

    def __call__(self, gray0, gray1):
        return next(self._flows)


class _Video:
    """One video of the batched path: its frames, grey frames and flows as they arrive."""

    def __init__(self, task, frames, declared):
        import cv2

        self.task, self.frames, self.declared = task, frames, declared
        self.grey = [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames]
        self.flows = [None] * max(0, len(frames) - 1)
        self.remaining = len(self.flows)
        self.failed = False


def _decode_task(task):
    video_path, source, target, flow, short_side, overwrite, naming = task
    try:
        if not source.is_file():
            raise FileNotFoundError("video not found")
        info = {}
        frames = list(decode_resized(source, short_side, info))
        if not frames:
            raise ValueError("no frames decoded")
        return _Video(task, frames, info.get("declared", 0)), None
    except Exception as exc:  # reported per video, like _prepare_one
        return None, (video_path, None, _problem(source, exc), None)


def _write_task(video: _Video):
    video_path, source, target, flow, short_side, overwrite, naming = video.task
    try:
        n = write_rawframes(video.frames, target, method=_Precomputed(video.flows),
                            overwrite=overwrite, naming=naming)
        return video_path, n, None, _short(source, n, video.declared)
    except Exception as exc:
        return video_path, None, _problem(source, exc), None


def _prepare_batched(tasks, estimator, batch_pairs: int, threads: int):
    """Results like ``_prepare_one``'s for ``tvl1-torch``: threads decode up to ``2 × threads``
    videos ahead and write finished ones; flow runs here on batches of ``batch_pairs`` pairs of
    one frame size, pairs of several videos together."""
    from .tvl1 import MIN_SIDE

    groups: dict = {}  # (H, W) -> [(video, pair index)]
    with ThreadPoolExecutor(threads) as pool:
        decoding, writing = deque(), []
        todo = iter(tasks)

        def refill():
            for task in todo:
                decoding.append(pool.submit(_decode_task, task))
                if len(decoding) >= 2 * threads:
                    break

        def run(size):
            batch = groups.pop(size)
            try:
                g0 = np.stack([v.grey[i] for v, i in batch])
                g1 = np.stack([v.grey[i + 1] for v, i in batch])
                flows = estimator.batch(g0, g1).cpu().numpy()
            except Exception as exc:  # every video with a pair in the batch fails, named
                failed = {id(v): v for v, _ in batch if not v.failed}
                for v in failed.values():
                    v.failed = True
                return [(v.task[0], None, _problem(v.task[1], exc), None) for v in failed.values()]
            for (video, i), flow in zip(batch, flows):
                if video.failed:
                    continue
                video.flows[i] = flow
                video.remaining -= 1
                if video.remaining == 0:
                    writing.append(pool.submit(_write_task, video))
            return []

        refill()
        while decoding:
            video, failure = decoding.popleft().result()
            refill()
            if failure is not None:
                yield failure
                continue
            h, w = video.grey[0].shape
            if video.remaining and (h < MIN_SIDE or w < MIN_SIDE):
                yield (video.task[0], None, f"{video.task[1]}: frames of {w}x{h} are too small "
                       f"for TV-L1's pyramid (each side needs at least {MIN_SIDE} pixels)", None)
                continue
            if not video.remaining:
                writing.append(pool.submit(_write_task, video))
            for i in range(video.remaining):
                groups.setdefault((h, w), []).append((video, i))
                if len(groups[(h, w)]) >= batch_pairs:
                    yield from run((h, w))
            while writing and writing[0].done():
                yield writing.pop(0).result()
        for size in list(groups):
            yield from run(size)
        for future in writing:
            yield future.result()


def _worker_init():
    import cv2

    cv2.setNumThreads(1)  # the pool already uses every core


def prepare_dataset(videos_dir, splits_dir, out_dir, *, workers=None, flow=None,
                    flow_device=None, batch_pairs=None, short_side=256, skip_existing=True,
                    progress=True, naming: FrameNaming | None = None) -> dict:
    """Decode every video of the splits, write rawframes + flow and the split lists.
    ``flow``: ``tvl1``, ``tvl1-torch`` or ``farneback`` (None: ``tvl1-torch`` where CUDA is
    present, else ``tvl1``); ``flow_device``: ``tvl1-torch``'s device (None: CUDA when present);
    ``batch_pairs``: its pairs per batch (default 64 on CUDA, 8 on CPU).
    ``naming``: the frames' file names (MMAction2's filename_tmpl, flow_tmpl, start_index;
    default img_00001.jpg, flow_x_00001.jpg).

    Returns a summary: ``videos`` (in the splits), ``done`` (written now), ``existing``
    (skipped, already complete), ``failed`` and ``failures`` (one line each), ``short`` (one
    line per video that decoded to fewer frames than its container declares), ``flow`` (the
    estimator that ran, with its device), ``lists`` (paths written) and ``seconds``.
    """
    flow = flow or default_flow_method()
    if flow not in FLOW_METHODS:
        raise CCSError(f"unknown flow method {flow!r}; expected one of {', '.join(FLOW_METHODS)}")
    if flow == "tvl1-torch":
        flow_device = resolve_flow_device(flow_device)
        estimator = make_flow_estimator(flow, device=flow_device)
        batch_pairs = batch_pairs or (64 if flow_device.startswith("cuda") else 8)
        flow_label = f"tvl1-torch on {flow_device}"
    else:
        if flow_device not in (None, "cpu"):
            raise CCSError(f"--flow-device {flow_device} needs --flow tvl1-torch ({flow} runs "
                           f"on the CPU)")
        flow_label = f"{flow} (OpenCV, CPU)"
    start = time.perf_counter()
    videos_dir, out_dir = Path(videos_dir), Path(out_dir)
    if not videos_dir.is_dir():
        raise bad_file(videos_dir, "video folder not found")
    splits = read_splits(splits_dir)
    frames_root = out_dir / "rawframes"
    videos = sorted({r.path for train, val in splits.values() for r in train + val})
    naming = naming or FrameNaming()

    num_frames, tasks = {}, []
    for video in videos:
        target = frames_root / frames_dir_name(video)
        if skip_existing and target.is_dir():
            num_frames[video] = count_frames(target, naming)
        else:
            tasks.append((video, videos_dir / video, target, flow, short_side, not skip_existing,
                          naming))
    existing = len(num_frames)

    failures, short = [], []
    workers = min(workers or os.cpu_count() or 1, max(1, len(tasks)))
    bar = VideoProgress(len(tasks), "prepare", enabled=progress)
    try:
        if flow == "tvl1-torch":
            results = _prepare_batched(tasks, estimator, batch_pairs, min(workers, 8))
            _consume(results, num_frames, failures, short, bar)
        elif workers == 1:
            _consume(map(_prepare_one, tasks), num_frames, failures, short, bar)
        else:
            with get_context("spawn").Pool(workers, initializer=_worker_init) as pool:
                _consume(pool.imap_unordered(_prepare_one, tasks), num_frames, failures, short,
                         bar)
    finally:
        bar.close()

    lists = []
    for n, (train, val) in sorted(splits.items()):
        for kind, records in (("train", train), ("val", val)):
            if not records:
                continue
            path = out_dir / f"{kind}_rawframes_split{n}.txt"
            write_rawframe_list(
                [VideoRecord(frames_dir_name(r.path), num_frames[r.path], r.label, r.line)
                 for r in records if r.path in num_frames],
                path,
            )
            lists.append(str(path))
    return {
        "videos": len(videos), "done": len(num_frames) - existing, "existing": existing,
        "failed": len(failures), "failures": failures, "short": sorted(short), "flow": flow_label,
        "lists": lists, "seconds": round(time.perf_counter() - start, 2),
    }


def _consume(results, num_frames, failures, short, bar):
    for video, n, problem, short_line in results:
        if problem is None:
            num_frames[video] = n
            if short_line:
                short.append(short_line)
        else:
            failures.append(problem)
            bar.write(f"failed: {problem}")
        bar.update()


def add_prepare_arguments(parser) -> None:
    parser.add_argument("--videos", required=True, help="folder of class folders of videos")
    parser.add_argument("--splits", required=True,
                        help="UCF-101 (classInd.txt, trainlist0N.txt) or HMDB-51 split files")
    parser.add_argument("--out", required=True, help="output folder (rawframes/ and lists)")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    parser.add_argument("--flow", choices=FLOW_METHODS, default=None,
                        help="optical flow: tvl1 (OpenCV's, denseflow's), tvl1-torch (the same "
                             "algorithm in torch, batched; GPU or CPU), farneback (fast, for "
                             "tests); default tvl1-torch on CUDA when a GPU is present, else tvl1")
    parser.add_argument("--flow-device", choices=("cuda", "cpu"), default=None,
                        help="tvl1-torch's device (default cuda when present)")
    parser.add_argument("--flow-batch", type=int, default=None,
                        help="tvl1-torch: frame pairs per batch, across videos (default 64 on "
                             "CUDA, 8 on CPU)")
    parser.add_argument("--short-side", type=int, default=256,
                        help="resize frames so the short side is this (default 256: 340x256)")
    parser.add_argument("--redo", action="store_true",
                        help="rewrite videos whose frames exist (default: skip them)")
    add_naming_arguments(parser)


def run_prepare(args) -> int:
    """CLI body: 0 when every video is prepared, 1 when some failed (listed above)."""
    summary = prepare_dataset(args.videos, args.splits, args.out, workers=args.workers,
                              flow=args.flow, flow_device=args.flow_device,
                              batch_pairs=args.flow_batch, short_side=args.short_side,
                              skip_existing=not args.redo,
                              naming=naming_from_arguments(args))
    print(f"prepared {summary['done']} videos, {summary['existing']} already done, "
          f"{summary['failed']} failed of {summary['videos']} in {summary['seconds']} s "
          f"(flow: {summary['flow']})")
    if summary["short"]:
        print(f"{len(summary['short'])} videos decoded short (fewer frames than their container "
              f"declares; prepared with the frames decoded):")
        for line in summary["short"][:10]:
            print(f"  {line}")
    for path in summary["lists"]:
        print(f"wrote {path}")
    return 1 if summary["failed"] else 0

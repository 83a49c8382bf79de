"""``ccs-fast prepare``: a UCF-101 / HMDB-51 video tree → rawframes, TV-L1 flow, annotation lists.

Input: ``videos_dir/<Class>/<video>.avi`` (decoded with PyAV) and the official split files
(UCF-101: ``classInd.txt`` + ``trainlist0N.txt``/``testlist0N.txt``; HMDB-51:
``<class>_test_split<N>.txt``). Output under ``out_dir``:

- ``rawframes/<Class>/<video>/img_00001.jpg … flow_x_/flow_y_00001.jpg …``: frames resized
  so the short side is ``short_side`` (the long side rounded down to an even number, so
  320×240 → 340×256, MMAction2's size), flow by ``flow.write_rawframes`` (TV-L1, bound 20);
- ``train_rawframes_split{N}.txt`` / ``val_rawframes_split{N}.txt`` (``frame_dir
  num_frames label``), the lists ``build_loader(annotation, out_dir/"rawframes")`` reads.

Videos are processed by a process pool; each folder is written to a temporary name and
renamed when complete, so a rerun skips finished videos and redoes interrupted ones. A video
that fails is reported on one line, counted and left out of the lists; the run goes on.
"""
from __future__ import annotations

import os
import re
import time
from multiprocessing import get_context
from pathlib import Path

from ccs_fast.errors import CCSError, bad_file

from .flow import FLOW_METHODS, write_rawframes
from .frames import FrameNaming, add_naming_arguments, naming_from_arguments
from .progress import VideoProgress
from .formats import VideoRecord, read_hmdb51_split, read_ucf101_split, write_rawframe_list

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


def decode_resized(path, short_side: int):
    """RGB uint8 frames of a video, resized so the short side is ``short_side`` (generator)."""
    import av
    import cv2

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        size = None
        for frame in container.decode(stream):
            rgb = frame.to_ndarray(format="rgb24")
            if size is None:
                size = resized_shape(rgb.shape[1], rgb.shape[0], short_side)
            if (rgb.shape[1], rgb.shape[0]) != size:
                rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_LINEAR)
            yield rgb


def count_frames(frames_dir: Path, naming: FrameNaming = FrameNaming()) -> int:
    pattern = naming.rgb_pattern()
    return sum(1 for name in os.listdir(frames_dir) if pattern.match(name))


def _prepare_one(task):
    """Worker: (video path, frames, None) when done, (video path, None, message) on failure."""
    video_path, source, target, flow, short_side, overwrite, naming = task
    try:
        if not source.is_file():
            raise FileNotFoundError("video not found")
        n = write_rawframes(decode_resized(source, short_side), target, method=flow,
                            overwrite=overwrite, naming=naming)
        return video_path, n, None
    except Exception as exc:  # one bad video must not stop the run; it is reported and counted
        # an OSError's (or PyAV error's) text repeats the path after "[Errno N]": the reason
        # alone, the path once
        reason = getattr(exc, "strerror", None) or str(exc)
        problem = reason.splitlines()[0] if reason else exc.__class__.__name__
        return video_path, None, f"{source}: {problem}"


def _worker_init():
    import cv2

    cv2.setNumThreads(1)  # the pool already uses every core


def prepare_dataset(videos_dir, splits_dir, out_dir, *, workers=None, flow="tvl1",
                    short_side=256, skip_existing=True, progress=True,
                    naming: FrameNaming | None = None) -> dict:
    """Decode every video of the splits, write rawframes + flow and the split lists.
    ``naming``: the frames' file names (MMAction2's filename_tmpl, flow_tmpl, start_index;
    default img_00001.jpg, flow_x_00001.jpg).

    Returns a summary: ``videos`` (in the splits), ``done`` (written now), ``existing``
    (skipped, already complete), ``failed`` and ``failures`` (one line each), ``lists``
    (paths written) and ``seconds``.
    """
    if flow not in FLOW_METHODS:
        raise CCSError(f"unknown flow method {flow!r}; expected one of {', '.join(FLOW_METHODS)}")
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

    failures = []
    workers = min(workers or os.cpu_count() or 1, max(1, len(tasks)))
    bar = VideoProgress(len(tasks), "prepare", enabled=progress)
    try:
        if workers == 1:
            results = map(_prepare_one, tasks)
            _consume(results, num_frames, failures, bar)
        else:
            with get_context("spawn").Pool(workers, initializer=_worker_init) as pool:
                _consume(pool.imap_unordered(_prepare_one, tasks), num_frames, failures, bar)
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
        "failed": len(failures), "failures": failures, "lists": lists,
        "seconds": round(time.perf_counter() - start, 2),
    }


def _consume(results, num_frames, failures, bar):
    for video, n, problem in results:
        if problem is None:
            num_frames[video] = n
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
    parser.add_argument("--flow", choices=FLOW_METHODS, default="tvl1",
                        help="optical flow (tvl1: denseflow's; farneback: fast, for tests)")
    parser.add_argument("--short-side", type=int, default=256,
                        help="resize frames so the short side is this (default 256: 340x256)")
    parser.add_argument("--redo", action="store_true",
                        help="rewrite videos whose frames exist (default: skip them)")
    add_naming_arguments(parser)


def run_prepare(args) -> int:
    """CLI body: 0 when every video is prepared, 1 when some failed (listed above)."""
    summary = prepare_dataset(args.videos, args.splits, args.out, workers=args.workers,
                              flow=args.flow, short_side=args.short_side,
                              skip_existing=not args.redo,
                              naming=naming_from_arguments(args))
    print(f"prepared {summary['done']} videos, {summary['existing']} already done, "
          f"{summary['failed']} failed of {summary['videos']} in {summary['seconds']} s")
    for path in summary["lists"]:
        print(f"wrote {path}")
    return 1 if summary["failed"] else 0

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
a GPU is fed whole batches rather than one short video at a time (``prepare_videos.py``: the
work on one video; this module plans it and keeps the books). Either way each folder is
written to a temporary name and renamed when complete, so a rerun skips finished videos and
redoes interrupted ones. A video that fails is reported on one line, counted and left out of
the lists; the run goes on. A video that decodes to fewer frames than its container declares
(a truncated file) is prepared with the frames it has and listed in the summary as short.

Faults. A full disk (ENOSPC or EDQUOT, or a JPEG write that fails with under 1 MiB free)
stops the run at the first video it hits: one CCSError line naming the folder, no annotation
list written (finished videos stay and a rerun goes on from them). The hidden temporary
folders (``.<video>.<pid>.<random>.tmp``, ``atomic.atomic_dir``) of a killed run are removed
at the next start; one prepare per output folder at a time. Pool workers ignore SIGINT (the
main process stops them) and end with the main process (``signals.end_with_parent``), so a
killed prepare leaves no workers behind.

Flow manifest. ``flow_manifest.jsonl`` in the output folder gets one line per finished video:
the estimator that made its flow and the settings its frames depend on (``flow_settings``).
A rerun compares each existing video with the settings asked for: a video made by another
estimator family (TV-L1 — ``tvl1`` and ``tvl1-torch`` are the same algorithm — or
Farnebäck) or with another short side, bound or file naming is refused in one line naming
both and ``--redo`` (which recomputes every video); a folder with no line (the run was killed
between its rename and its line) is redone. Output written before manifests existed (folders,
no manifest) is kept as it is, with a note that its estimator is unknown.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from multiprocessing import get_context
from pathlib import Path
from typing import NamedTuple, Optional

from ccs_fast.base.atomic import is_temporary
from ccs_fast.base.errors import CCSError, bad_file

from .flow import FLOW_BOUND, FLOW_METHODS, default_flow_method, make_flow_estimator, resolve_flow_device
from .formats import VideoRecord, read_hmdb51_split, read_ucf101_split, write_rawframe_list
from .prepare_videos import DEFAULT_SHORT_SIDE, VideoTask, pool_worker_init, prepare_batched, prepare_video
from .progress import VideoProgress
from .rawframes import RAWFRAMES_FOLDER, FrameNaming, add_naming_arguments, frames_dir_name, naming_from_arguments

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


def count_frames(frames_dir: Path, naming: FrameNaming = FrameNaming()) -> int:
    pattern = naming.rgb_pattern()
    return sum(1 for name in os.listdir(frames_dir) if pattern.match(name))


FLOW_MANIFEST = "flow_manifest.jsonl"
_FLOW_FAMILY = {"tvl1": "TV-L1", "tvl1-torch": "TV-L1", "farneback": "Farneback"}


def flow_settings(flow: str, short_side: int, naming: FrameNaming) -> dict:
    """What a video's flow and frames were made with, as the manifest records it."""
    return {"flow": flow, "family": _FLOW_FAMILY[flow], "bound": FLOW_BOUND, "short_side": short_side,
            "filename_tmpl": naming.filename_tmpl, "flow_tmpl": naming.flow_tmpl,
            "start_index": naming.start_index}


_COMPARED = ("family", "bound", "short_side", "filename_tmpl", "flow_tmpl", "start_index")


def _describe_settings(settings: dict) -> str:
    return f"{settings['flow']}, short side {settings['short_side']}, bound {settings['bound']:g}"


def read_flow_manifest(out_dir) -> dict | None:
    """{frames folder: settings} from ``flow_manifest.jsonl`` (the last line of a video
    wins; a half-written last line is ignored); None when there is no manifest."""
    path = Path(out_dir) / FLOW_MANIFEST
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise bad_file(path, f"cannot read the flow manifest ({getattr(exc, 'strerror', None) or exc})") from None
    manifest = {}
    for line in text.splitlines():
        try:
            entry = json.loads(line)
            manifest[entry["video"]] = entry
        except (ValueError, KeyError, TypeError):
            continue
    return manifest


def remove_hidden_temporaries(folders) -> list[Path]:
    """Remove the hidden temporary folders an interrupted run left in ``folders`` (the parents
    of the frames folders); returns what was removed."""
    removed = []
    for folder in sorted(set(folders)):
        try:
            entries = list(os.scandir(folder))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for entry in entries:
            if is_temporary(entry.name) and entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
                removed.append(Path(entry.path))
    return removed


class DiskFull(CCSError):
    """No space left where prepare writes: the run stops (see the module docstring)."""


def prepare_dataset(videos_dir, splits_dir, out_dir, *, workers=None, flow=None,
                    flow_device=None, batch_pairs=None, short_side=DEFAULT_SHORT_SIDE, skip_existing=True,
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
    estimator that ran, with its device), ``lists`` (paths written), ``removed_temporaries``
    (hidden folders of an interrupted run removed), ``unrecorded`` (existing videos whose
    estimator is unknown: prepared before flow manifests) and ``seconds``.

    CCSError before anything is written for a short side below 1 and for existing videos
    made with other flow settings (unless ``skip_existing`` is False: ``--redo``); a full
    disk stops the run with ``DiskFull``, no list written.
    """
    if not isinstance(short_side, int) or short_side < 1:
        raise CCSError(f"--short-side {short_side}: must be a positive number of pixels "
                       f"(the frames' short side after resizing; default {DEFAULT_SHORT_SIDE})")
    run = _flow_run(flow, flow_device, batch_pairs)
    start = time.perf_counter()
    videos_dir, out_dir = Path(videos_dir), Path(out_dir)
    if not videos_dir.is_dir():
        raise bad_file(videos_dir, "video folder not found")
    splits = read_splits(splits_dir)
    frames_root = out_dir / RAWFRAMES_FOLDER
    videos = sorted({r.path for train, val in splits.values() for r in train + val})
    naming = naming or FrameNaming()

    class_folders = {(frames_root / frames_dir_name(v)).parent for v in videos}
    removed = remove_hidden_temporaries(class_folders)
    settings = flow_settings(run.method, short_side, naming)
    manifest = read_flow_manifest(out_dir)
    plan = _plan_videos(videos, videos_dir, out_dir, run.method, short_side, skip_existing, naming, settings,
                        manifest)
    num_frames, existing = plan.num_frames, len(plan.num_frames)
    out_dir.mkdir(parents=True, exist_ok=True)
    record = _ManifestWriter(out_dir / FLOW_MANIFEST, settings)
    if manifest is None:
        for video in plan.unrecorded:  # so that a later run keeps them too
            record.add(video, unrecorded=True)
    failures, short = _prepare_planned(plan.tasks, run, workers, num_frames, record, class_folders, progress)
    return {
        "videos": len(videos), "done": len(num_frames) - existing, "existing": existing,
        "failed": len(failures), "failures": failures, "short": sorted(short), "flow": run.label,
        "lists": _write_split_lists(splits, num_frames, out_dir), "removed_temporaries": [str(p) for p in removed],
        "unrecorded": len(plan.unrecorded), "seconds": round(time.perf_counter() - start, 2),
    }


def _prepare_planned(tasks: list, run: "_FlowRun", workers: Optional[int], num_frames: dict,
                     record: "_ManifestWriter", class_folders, progress: bool) -> tuple[list, list]:
    """Run ``tasks``, adding each video done to ``num_frames`` and the manifest: (failure
    lines, short-decode lines). On a full disk the hidden folders the stopped workers were
    writing are removed from ``class_folders`` before ``DiskFull`` goes up."""
    failures, short = [], []
    bar = VideoProgress(len(tasks), "prepare", enabled=progress)
    results = _run_tasks(tasks, run, workers)
    try:
        _consume(results, num_frames, failures, short, bar, record, len(tasks))
    except DiskFull:
        remove_hidden_temporaries(class_folders)
        raise
    finally:
        results.close()  # stops the pool on any exception (Ctrl-C included)
        record.close()
        bar.close()
    return failures, short


class _FlowRun(NamedTuple):
    """The flow estimator a prepare runs: ``method``, the summary's ``label`` and, for
    ``tvl1-torch``, the batched ``estimator`` and its ``batch_pairs``."""
    method: str
    label: str
    estimator: object = None
    batch_pairs: Optional[int] = None


def _flow_run(flow: Optional[str], flow_device: Optional[str], batch_pairs: Optional[int]) -> _FlowRun:
    flow = flow or default_flow_method()
    if flow not in FLOW_METHODS:
        raise CCSError(f"unknown flow method {flow!r}; expected one of {', '.join(FLOW_METHODS)}")
    if flow == "tvl1-torch":
        flow_device = resolve_flow_device(flow_device)
        return _FlowRun(flow, f"tvl1-torch on {flow_device}", make_flow_estimator(flow, device=flow_device),
                        batch_pairs or (64 if flow_device.startswith("cuda") else 8))
    if flow_device not in (None, "cpu"):
        raise CCSError(f"--flow-device {flow_device} needs --flow tvl1-torch ({flow} runs "
                       f"on the CPU)")
    return _FlowRun(flow, f"{flow} (OpenCV, CPU)")


class _Plan(NamedTuple):
    """What a prepare does: ``tasks`` to run, ``num_frames`` of the videos kept as they are,
    ``unrecorded`` (kept, prepared before flow manifests)."""
    tasks: list
    num_frames: dict
    unrecorded: list


def _plan_videos(videos, videos_dir: Path, out_dir: Path, flow: str, short_side: int, skip_existing: bool,
                 naming: FrameNaming, settings: dict, manifest: Optional[dict]) -> _Plan:
    """Which videos to (re)do and which to keep; CCSError, nothing written, when a kept video
    was made with other flow settings (the module docstring's flow manifest)."""
    frames_root = out_dir / RAWFRAMES_FOLDER
    num_frames, tasks, unrecorded, mismatched = {}, [], [], []
    for video in videos:
        target = frames_root / frames_dir_name(video)
        task = VideoTask(video, videos_dir / video, target, flow, short_side, not skip_existing, naming)
        if skip_existing and target.is_dir():
            entry = (manifest or {}).get(frames_dir_name(video))
            if manifest is None or (entry or {}).get("unrecorded"):
                unrecorded.append(video)  # prepared before flow manifests: kept as it is
            elif entry is None:  # finished just before a kill wrote its manifest line: redone
                tasks.append(task._replace(overwrite=True))
                continue
            elif any(entry.get(key) != settings[key] for key in _COMPARED):
                mismatched.append((video, entry))
                continue
            num_frames[video] = count_frames(target, naming)
        else:
            tasks.append(task)
    if mismatched:
        video, entry = mismatched[0]
        raise bad_file(out_dir, f"{len(mismatched)} prepared video(s) (e.g. {frames_dir_name(video)}) have flow and "
                                f"frames made with {_describe_settings(entry)}, this run asks for "
                                f"{_describe_settings(settings)}; pass --redo to recompute every video with "
                                f"{flow}, or --flow {entry.get('flow')} --short-side {entry.get('short_side')} "
                                "to go on as before; nothing was written")
    return _Plan(tasks, num_frames, unrecorded)


def _run_tasks(tasks: list, run: _FlowRun, workers: Optional[int]):
    """The ``VideoResult`` of every task, as they finish: batched on this process's device
    for ``tvl1-torch``, else one video per task here (one worker) or in a process pool."""
    workers = min(workers or os.cpu_count() or 1, max(1, len(tasks)))
    if run.method == "tvl1-torch":
        yield from prepare_batched(tasks, run.estimator, run.batch_pairs, min(workers, 8))
    elif workers == 1:
        yield from map(prepare_video, tasks)
    else:
        with get_context("spawn").Pool(workers, initializer=pool_worker_init, initargs=(os.getpid(),)) as pool:
            yield from pool.imap_unordered(prepare_video, tasks)


def _write_split_lists(splits: dict, num_frames: dict, out_dir: Path) -> list[str]:
    """``{train,val}_rawframes_split{N}.txt`` of the prepared videos; their paths."""
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
    return lists


class _ManifestWriter:
    """Appends one ``flow_manifest.jsonl`` line per finished video (flushed at once)."""

    def __init__(self, path: Path, settings: dict):
        self.path, self.settings, self._file = path, settings, None
        self.done = 0

    def add(self, video: str, unrecorded: bool = False) -> None:
        """A finished video's line; ``unrecorded``: one found prepared, made by an unknown estimator."""
        if self._file is None:
            self._file = open(self.path, "a", encoding="utf-8")
        entry = {"video": frames_dir_name(video), "unrecorded": True} if unrecorded else \
            {"video": frames_dir_name(video), **self.settings}
        self._file.write(json.dumps(entry) + "\n")
        self._file.flush()
        self.done += not unrecorded

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _consume(results, num_frames, failures, short, bar, record, total):
    for result in results:
        if result.disk_full:
            results.close()  # the pool (or the batched path's threads) finishes what it holds
            raise DiskFull(f"{result.problem} while writing the frames of {result.video}; prepare stopped after "
                           f"{record.done} of {total} videos, no annotation list written (the finished videos "
                           "are kept: free some space and run the same command again)")
        if result.problem is None:
            num_frames[result.video] = result.frames
            record.add(result.video)
            if result.short:
                short.append(result.short)
        else:
            failures.append(result.problem)
            bar.write(f"failed: {result.problem}")
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
    parser.add_argument("--short-side", type=int, default=DEFAULT_SHORT_SIDE,
                        help=f"resize frames so the short side is this (default {DEFAULT_SHORT_SIDE}: 340x256)")
    parser.add_argument("--redo", action="store_true",
                        help="recompute every video, also those already prepared (default: skip them; "
                             "needed to change --flow or --short-side of a prepared folder)")
    add_naming_arguments(parser)


def run_prepare(args) -> int:
    """CLI body: 0 when every video is prepared, 1 when some failed (listed above)."""
    summary = prepare_dataset(args.videos, args.splits, args.out, workers=args.workers,
                              flow=args.flow, flow_device=args.flow_device,
                              batch_pairs=args.flow_batch, short_side=args.short_side,
                              skip_existing=not args.redo,
                              naming=naming_from_arguments(args))
    if summary["removed_temporaries"]:
        print(f"removed {len(summary['removed_temporaries'])} unfinished folder(s) of an interrupted prepare, e.g. "
              f"{summary['removed_temporaries'][0]}")
    if summary["unrecorded"]:
        print(f"{summary['unrecorded']} videos already in {args.out} were prepared before flow manifests: their "
              f"flow estimator is unknown and they are kept as they are (--redo recomputes every video)")
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

"""Loader throughput: clips/s and CPU seconds per clip of each backend on the same rawframes.

Backends: ``dali-gpu`` (DALI, nvJPEG ``mixed`` decoding; only with CUDA), ``dali-cpu`` (DALI
CPU pipeline) and ``torch`` (DataLoader, one worker per core). Every backend loads training
clips (K segments, L flow frames, multi-scale crop resized to S) from the same tree of
340×256 rawframes, given (``--data DIR --annotation FILE``) or generated (``--make N``).
The first ``--warmup`` batches (worker start-up, decoder allocation) are not timed.

CPU time is that of this process and of all its worker processes (``getrusage`` for self
and reaped children, ``/proc`` for workers still alive), divided by the clips timed.

    python -m bench.bench_loader --make 16 --batch-size 8 --batches 20
"""
from __future__ import annotations

import multiprocessing
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import append_rows, bench_parser, env_info, print_table, result_path
from ccs_fast.dataloader import LoaderSpec, build_loader, dali_available
from ccs_fast.dataloader.flow import write_rawframes

BACKENDS = ("dali-gpu", "dali-cpu", "torch")
COLUMNS = ("backend", "clips_per_s", "cpu_s_per_clip", "batch_size", "workers", "device")


def make_rawframes(root: Path, videos: int, frames: int, width=340, height=256, workers: int | None = None) -> Path:
    """``videos`` rawframe folders of smooth moving textures (Farneback flow); the list file.

    Video folders already under ``root`` are kept. The videos are written by ``workers``
    processes (default: one per core); the files do not depend on how many.
    """
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    params = [(rng.uniform(0, 2 * np.pi, 3), rng.uniform(8, 30, 3)) for _ in range(videos)]
    jobs = [(root / f"video{v:04d}", frames, width, height, *params[v])
            for v in range(videos) if not (root / f"video{v:04d}").exists()]
    workers = min(workers or os.cpu_count() or 1, len(jobs))
    if workers > 1:
        # fork: the workers start without re-importing torch; they run numpy and OpenCV, never CUDA
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            pool.starmap(_write_video, jobs)
    else:
        for job in jobs:
            _write_video(*job)
    annotation = root / "train_list.txt"
    annotation.write_text("".join(f"video{v:04d} {frames} {v % 4}\n" for v in range(videos)))
    return annotation


def _write_video(folder: Path, frames: int, width: int, height: int, phase, period) -> None:
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    clip = [np.clip(np.stack([127 + 110 * np.sin((x + 3 * t) / period[c] + phase[c])
                              * np.cos((y - t) / (period[c] + 5)) for c in range(3)], -1),
                    0, 255).astype(np.uint8) for t in range(frames)]
    write_rawframes(clip, folder, method="farneback")


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and every descendant, alive or reaped."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    tick = os.sysconf("SC_CLK_TCK")
    for pid in _live_descendants(os.getpid()):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
        except (OSError, IndexError, ValueError):
            continue
    return total


def _live_descendants(pid: int) -> list[int]:
    found, stack = [], [pid]
    while stack:
        parent = stack.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                children = Path(f"/proc/{parent}/task/{tid}/children").read_text().split()
            except OSError:
                continue
            for child in map(int, children):
                found.append(child)
                stack.append(child)
    return found


def measure(backend: str, annotation: Path, data_root: Path, *, batch_size: int, batches: int,
            warmup: int, workers: int, input_size: int, num_segments: int, flow_length: int):
    device = "cuda" if backend == "dali-gpu" or (backend == "torch" and torch.cuda.is_available()) \
        else "cpu"
    loader = build_loader(LoaderSpec(
        annotation, data_root, backend=backend.split("-")[0], train=True,
        batch_size=batch_size, num_segments=num_segments, flow_length=flow_length,
        input_size=input_size, device=device, num_workers=workers))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    clips, seen, epoch = 0, 0, 0
    start_wall = start_cpu = None
    while seen < warmup + batches:
        loader.set_epoch(epoch)
        for batch in loader:
            seen += 1
            if seen == warmup + 1:
                sync()
                start_wall, start_cpu = time.perf_counter(), cpu_seconds()
            if seen > warmup:
                clips += len(batch["index"])
            if seen == warmup + batches:
                break
        epoch += 1
    sync()
    wall, cpu = time.perf_counter() - start_wall, cpu_seconds() - start_cpu
    if hasattr(loader, "close"):
        loader.close()
    del loader
    return {"backend": backend, "clips_per_s": clips / wall, "cpu_s_per_clip": cpu / clips,
            "batch_size": batch_size, "workers": workers, "clips": clips, "device": device}


def main(argv=None):
    parser = bench_parser(__doc__)
    parser.add_argument("--data", type=Path, help="rawframes root (with --annotation)")
    parser.add_argument("--annotation", type=Path, help="rawframe list under --data")
    parser.add_argument("--make", type=int, default=16, help="videos to generate without --data")
    parser.add_argument("--make-into", type=Path, default=None,
                        help="write the generated videos to this folder and keep them (videos already there are reused)")
    parser.add_argument("--frames", type=int, default=24, help="frames per generated video")
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=20, help="timed batches per backend")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--segments", type=int, default=3)
    parser.add_argument("--flow-length", type=int, default=5)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench_loader_") as scratch:
        if args.data is not None:
            data_root, annotation = args.data, args.annotation or args.data / "train_list.txt"
        else:
            data_root = args.make_into or Path(scratch) / "rawframes"
            annotation = make_rawframes(data_root, args.make, args.frames)
        path = result_path("loader", "cuda" if torch.cuda.is_available() else "cpu", args.out)
        rows = []
        for backend in filter(None, args.backends.split(",")):
            if backend.startswith("dali") and not dali_available():
                print(f"skip {backend}: nvidia-dali is not installed")
                continue
            if backend == "dali-gpu" and not torch.cuda.is_available():
                print("skip dali-gpu: no CUDA device")
                continue
            row = measure(backend, annotation, data_root, batch_size=args.batch_size,
                          batches=args.batches, warmup=args.warmup, workers=args.workers,
                          input_size=args.input_size, num_segments=args.segments,
                          flow_length=args.flow_length)
            row.update(env_info(row["device"]), dali=_dali_version(),
                       input_size=args.input_size, segments=args.segments,
                       flow_length=args.flow_length, batches=args.batches, warmup=args.warmup)
            append_rows(path, [row])  # backend by backend: a run stopped by a time limit keeps what it measured
            rows.append(row)
    if not rows:
        return
    print_table(rows, COLUMNS)
    print(f"appended {len(rows)} rows to {path}")


def _dali_version():
    try:
        import nvidia.dali

        return nvidia.dali.__version__
    except ImportError:
        return None


if __name__ == "__main__":
    main()

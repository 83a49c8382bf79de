"""The pure-PyTorch backend: cv2/PyAV decoding in DataLoader workers.

Workers check (``rawframes.py``: the same checks and messages as the DALI backend, so a
truncated JPEG is an error, not a part-grey image) and decode JPEG rawframes with cv2 (or RGB from the video with PyAV), crop, resize and
flip per ``plan_clip`` and return uint8 HWC arrays; the main process moves the uint8 batch to
the device (pinned, non_blocking) and normalises there, which moves a quarter of the bytes
of float32 through worker shared memory and PCIe.

The epoch travels with every sampled row as an ``(epoch, row)`` pair, so persistent workers
never need a mutated attribute to draw the right clip.

RNG. Clips are seeded by (seed, epoch, row) alone, and the DataLoader has its own generator
(seeded from the loader's seed, rank and split) for the base seed it draws when it starts
workers: without one it draws from the global torch RNG, once per fresh iterator, so the
model's dropout stream would depend on when workers were (re)started, e.g. on a resume.

Bad input. A worker never raises a ``CCSError``: it returns the one-line message with the
sample, because DataLoader re-wraps worker exceptions in a multi-line traceback. The main
process raises it unchanged (after stopping the workers), or, with ``skip_bad``, drops the
sample: the batch comes out smaller (a balanced batch is then no longer exactly N × M), a batch
with no good sample is skipped, and ``num_skipped`` / ``skipped_errors`` say what was dropped.
Videos the annotation already shows too short are dropped when the list is read.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ccs_fast.base.errors import CCSError, bad_file

from ccs_fast.base.distributed import default_loader_workers
from ccs_fast.base.signals import end_with_parent, ignore_stop_signals

from .formats import VideoRecord, default_num_classes
from .rawframes import decode_jpeg, frame_size, frames_folder, load_records
from .clip_plan import plan_clip, view_plans
from .batch_samplers import batch_sampler_for
from .transforms import (FLOW_MEAN, FLOW_STD, IMAGENET_MEAN, IMAGENET_STD, crop_resize,
                         invert_flow_x, stack_flow, video_frame_rgb)


def read_video_clip(path, make_plan):
    """Open the video once: ``plan = make_plan(width, height)``, then decode in order up to
    the last frame the plan needs. Returns (plan, {index: RGB uint8 frame}, frames decoded,
    (width, height))."""
    import av

    if not os.path.exists(path):
        raise bad_file(path, "video not found")
    frames, count = {}, 0
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise bad_file(path, "no video stream")
            stream = container.streams.video[0]
            size = stream.codec_context.width, stream.codec_context.height
            plan = make_plan(*size)
            wanted = set(int(i) for i in plan.frame_indices)
            for count, frame in enumerate(container.decode(stream), start=1):
                if count - 1 in wanted:
                    frames[count - 1] = video_frame_rgb(frame)
                if count > max(wanted):
                    break
    except av.FFmpegError as exc:
        raise bad_file(path, f"cannot decode video ({exc.__class__.__name__})") from None
    return plan, frames, count, size


def resize_to(rgb: np.ndarray, width: int, height: int) -> np.ndarray:
    """A decoded frame at the flow's size (bilinear, as ``prepare`` resized the frames it
    computed the flow on); unchanged when the sizes agree."""
    if rgb.shape[1] == width and rgb.shape[0] == height:
        return rgb
    return cv2.resize(rgb, (width, height), interpolation=cv2.INTER_LINEAR)


class ClipDataset(Dataset):
    """Map-style dataset indexed by ``(epoch, position)``; returns a sample dict of uint8
    arrays ``rgb`` (V·P, S, S, 3), ``flow`` (V·P, S, S, 2L) (P = ``spec.positions``: K
    segments or N·T clip frames; V = ``spec.views`` test crops, view after view), ints ``label``, ``index`` (the
    annotation row, which also seeds the clip) and ``error`` (None, or the one-line CCSError
    message of a bad sample)."""

    def __init__(self, records, rows, spec, flow_root):
        self.records = records
        self.rows = list(rows)
        self.data_root = Path(spec.data_root)
        self.flow_root = Path(flow_root)
        self.spec = spec

    def __len__(self):
        return len(self.records)

    def __getitem__(self, key):
        epoch, position = key
        record, row = self.records[position], self.rows[position]
        try:
            rgb, flow = self.load_clip(record, epoch, row)
        except CCSError as exc:
            return {"error": str(exc), "index": row}
        label = -1 if record.label is None else record.label
        return {"rgb": rgb, "flow": flow, "label": label, "index": row, "error": None}

    def flow_dir(self, record: VideoRecord) -> Path:
        return frames_folder(record.path, modality=self.spec.modality, data_root=self.data_root,
                             flow_root=self.flow_root)

    def plan(self, record, width, height, epoch, row, name):
        o = self.spec
        try:
            return plan_clip(record.num_frames, width, height, num_segments=o.num_segments,
                             flow_length=o.flow_length, train=o.train,
                             seed=o.seed, epoch=epoch, index=row, clip_len=o.clip_len,
                             frame_interval=o.frame_interval)
        except ValueError as exc:
            raise bad_file(name, f"video too short: {exc}") from None

    def load_clip(self, record, epoch, row):
        size = self.spec.input_size
        frame_dir = self.flow_dir(record)
        if self.spec.modality == "video":
            video = self.data_root / record.path
            # the flow's size: prepare resizes frames before computing flow (320x240 -> 340x256)
            width, height = frame_size(self.spec.naming.flow(frame_dir, 0)[0])
            plan, decoded, count, _ = read_video_clip(
                video, lambda w, h: self.plan(record, width, height, epoch, row, video))
            missing = [int(i) for i in plan.frame_indices if int(i) not in decoded]
            if missing:
                raise bad_file(video, f"video too short: {count} frames decoded, the clip needs "
                                      f"frame {missing[0] + 1} "
                                      f"({record.num_frames - 1} flow frames)")
            frames = [(video, resize_to(decoded[int(i)], width, height))
                      for i in plan.frame_indices]
        else:
            naming, first = self.spec.naming, record.offset
            width, height = frame_size(naming.rgb(frame_dir, first))
            plan = self.plan(record, width, height, epoch, row, frame_dir)
            paths = [naming.rgb(frame_dir, first + int(i)) for i in plan.frame_indices]
            frames = [(path, decode_jpeg(path, grey=False)) for path in paths]

        naming, offset = self.spec.naming, record.offset
        decoded_flow = {}  # each flow frame decoded once, whatever the number of views

        def flow_pair(i):
            if i not in decoded_flow:
                decoded_flow[i] = tuple((path, decode_jpeg(path, grey=True))
                                        for path in naming.flow(frame_dir, offset + i))
            return decoded_flow[i]

        views = [cut_clip(view, width, height, size, frames, flow_pair)
                 for view in view_plans(plan, width, height, self.spec.views)]
        if len(views) == 1:
            return views[0]
        return np.concatenate([rgb for rgb, _ in views]), np.concatenate([flow for _, flow in views])


def cut_clip(plan, width: int, height: int, size: int, rgb_frames, flow_pair):
    """The uint8 arrays of one planned clip: RGB (K, S, S, 3) and flow (K, S, S, 2L).

    ``rgb_frames``: ``(name, HxWx3 frame)`` of each segment; ``flow_pair(i)``: ``((name,
    flow_x), (name, flow_y))`` uint8 frames of flow index ``i``. Every frame must be
    ``width``×``height`` (CCSError naming it otherwise); each is cut to ``plan.crop``,
    resized to ``size`` and flipped per the plan, flow_x inverted on a flip."""
    def crop(name, img):
        if img.shape[1] != width or img.shape[0] != height:
            raise bad_file(name, f"frame is {img.shape[1]}x{img.shape[0]}, "
                                 f"the video's frames are {width}x{height}")
        return crop_resize(img, plan.crop, size, plan.flip)

    rgb = np.stack([crop(name, img) for name, img in rgb_frames])
    stacks = []
    for segment in plan.flow_indices:
        fx, fy = [], []
        for i in segment:
            (name_x, x), (name_y, y) = flow_pair(int(i))
            x = crop(name_x, x)
            fx.append(invert_flow_x(x) if plan.flip else x)
            fy.append(crop(name_y, y))
        stacks.append(stack_flow(fx, fy))
    return rgb, np.stack(stacks)


def collate_clips(samples):
    """Good samples stacked into uint8/int64 tensors; bad ones as (row, message) pairs."""
    good = [s for s in samples if s["error"] is None]
    errors = [(s["index"], s["error"]) for s in samples if s["error"] is not None]
    if not good:
        return {"errors": errors}
    return {
        "rgb": torch.from_numpy(np.stack([s["rgb"] for s in good])),
        "flow": torch.from_numpy(np.stack([s["flow"] for s in good])),
        "label": torch.tensor([s["label"] for s in good], dtype=torch.int64),
        "index": torch.tensor([s["index"] for s in good], dtype=torch.int64),
        "errors": errors,
    }


def normalize_on_device(rgb_u8, flow_u8, dtype):
    """uint8 (B, K, S, S, C) → dtype (B, K, C, S, S) normalised, channels_last per clip.

    The same float32 operations as transforms.normalize_rgb/normalize_flow, then the cast.
    """
    mean = torch.as_tensor(IMAGENET_MEAN, device=rgb_u8.device)
    std = torch.as_tensor(IMAGENET_STD, device=rgb_u8.device)
    rgb = ((rgb_u8.float() / 255.0 - mean) / std).to(dtype)
    flow = ((flow_u8.float() - FLOW_MEAN) / FLOW_STD).to(dtype)
    return rgb.permute(0, 1, 4, 2, 3), flow.permute(0, 1, 4, 2, 3)


class _EpochTaggedBatches:
    """Turns a batch sampler's rows into ``(epoch, row)`` keys for the dataset, leaving out
    the epoch's first ``first_batch`` batches (a run resumed mid-epoch)."""

    def __init__(self, batch_sampler):
        self.batch_sampler = batch_sampler
        self.first_batch = 0

    def __len__(self):
        return len(self.batch_sampler)

    def __iter__(self):
        epoch = self.batch_sampler.epoch
        for i, batch in enumerate(self.batch_sampler):
            if i >= self.first_batch:
                yield [(epoch, row) for row in batch]


def _worker_init(_worker_id, parent_pid=None):
    cv2.setNumThreads(1)  # one decode thread per worker: the workers already use every core
    # a signal to the process group is the trainer's to handle (it stops the workers in
    # order); a trainer killed outright takes its workers with it
    ignore_stop_signals(parent_pid)
    end_with_parent(parent_pid)


class TorchClipLoader:
    """One epoch of batch dicts per ``iter``; see the loader contract in docs/loader.md."""

    def __init__(self, dataset, batch_sampler, *, device, dtype, num_workers, skip_bad,
                 num_classes, skipped=None, generator=None, views: int = 1, frame_count=None):
        self.dataset = dataset
        self.views = views
        self.batches_done = 0
        self.batch_sampler = batch_sampler
        self.device = torch.device(device)
        self.dtype = dtype
        self.skip_bad = skip_bad
        self.num_videos = len(dataset)
        self.num_classes = num_classes
        # skip_bad: videos dropped when the list was read, plus bad samples dropped from
        # batches (a bad video counts each time it is drawn); the last message per row.
        self.skipped_errors: dict[int, str] = dict(skipped or {})
        self.num_skipped = len(self.skipped_errors)
        self.frame_count = frame_count  # rawframes.FrameCount of the list
        self.loader = DataLoader(
            dataset,
            batch_sampler=_EpochTaggedBatches(batch_sampler),
            num_workers=num_workers,
            collate_fn=collate_clips,
            pin_memory=self.device.type == "cuda",
            persistent_workers=num_workers > 0,
            worker_init_fn=functools.partial(_worker_init, parent_pid=os.getpid()) if num_workers > 0 else None,
            generator=generator,
        )

    def set_epoch(self, epoch: int, first_batch: int = 0) -> None:
        """Draw epoch ``epoch``'s batches, from its batch ``first_batch`` on (the earlier
        ones are not loaded: a run resumed mid-epoch)."""
        self.batch_sampler.set_epoch(epoch)
        self.loader.batch_sampler.first_batch = first_batch
        self.batches_done = first_batch

    def __len__(self):
        return len(self.batch_sampler)

    def close(self) -> None:
        """Stop the persistent workers now (the next epoch starts fresh ones)."""
        iterator = getattr(self.loader, "_iterator", None)
        if iterator is not None:
            # DataLoader has no public close(): without this the workers live until the
            # iterator is garbage collected, which a traceback's reference cycle can delay.
            iterator._shutdown_workers()
            self.loader._iterator = None

    def _batches(self):
        """The DataLoader's iterator. Starting it forks the workers from this process, and
        OpenCV's thread pool must not be running here then: a forked worker that reconfigures
        it (``_worker_init``) waits forever on threads it did not inherit. So the pool is
        brought down to one thread for the fork and restored afterwards."""
        if self.loader.num_workers == 0 or getattr(self.loader, "_iterator", None) is not None:
            return iter(self.loader)  # no workers, or persistent ones already running
        threads = cv2.getNumThreads()
        cv2.setNumThreads(1)
        try:
            return iter(self.loader)
        finally:
            cv2.setNumThreads(threads)

    def __iter__(self):
        """The epoch's batches; ``batches_done`` counts the sampler's batches consumed so far
        (those skipped as wholly bad included), the position a mid-epoch checkpoint keeps."""
        self.batches_done = self.loader.batch_sampler.first_batch
        for batch in self._batches():
            self.batches_done += 1
            if batch["errors"]:
                if not self.skip_bad:
                    self.close()
                    raise CCSError(batch["errors"][0][1])
                self.num_skipped += len(batch["errors"])
                self.skipped_errors.update(batch["errors"])
            if "rgb" not in batch:
                continue
            rgb = batch["rgb"].to(self.device, non_blocking=True)
            flow = batch["flow"].to(self.device, non_blocking=True)
            if self.views > 1:  # (B, V·P, ...) -> (B·V, P, ...): the views of a video contiguous
                rgb, flow = (x.view(x.shape[0] * self.views, -1, *x.shape[2:]) for x in (rgb, flow))
            rgb, flow = normalize_on_device(rgb, flow, self.dtype)
            out = {
                "rgb": rgb,
                "flow": flow,
                "label": batch["label"].to(self.device, non_blocking=True),
                "index": batch["index"].to(self.device, non_blocking=True),
            }
            if self.views > 1:
                out["views"] = self.views
            yield out


def loader_generator(seed: int, rank: int, train: bool) -> torch.Generator:
    """The DataLoader's own generator (see the module docstring), one per (seed, rank, split)."""
    state = np.random.SeedSequence([seed, rank, int(train)]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def build_torch_loader(spec) -> TorchClipLoader:
    """``build_loader(spec)`` for ``spec.backend == "torch"``."""
    records, rows, skipped, flow_root, count = load_records(spec)
    labels = [r.label for r in records]
    return TorchClipLoader(
        ClipDataset(records, rows, spec, flow_root), batch_sampler_for(spec, labels),
        device=spec.device, dtype=spec.dtype,
        num_workers=default_loader_workers(spec.device) if spec.num_workers is None else spec.num_workers,
        skip_bad=spec.skip_bad,
        num_classes=spec.num_classes if spec.num_classes is not None
        else default_num_classes(labels),
        skipped=skipped,
        generator=loader_generator(spec.seed, spec.rank, spec.train),
        views=spec.views,
        frame_count=count,
    )

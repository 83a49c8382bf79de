"""The loader contract: ``LoaderSpec`` (every setting of a clip loader, in one frozen value)
goes in, a ``Loader`` comes out.

A spec is made once (from the config by ``LoaderSpec.from_config``, or directly) and passed
whole to ``build_loader`` and from there to the backend, which reads the fields it needs;
the DALI source and the torch dataset carry the same spec into their worker processes (it
pickles: plain values, a ``FrameNaming`` and a torch dtype). Every backend's loader has all
of ``Loader``'s members, so consumers read them without defaults.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterator, Optional, Protocol, runtime_checkable

import torch

from ccs_fast.base.errors import CCSError

from .rawframes import FrameCount, FrameNaming


@dataclass(frozen=True)
class LoaderSpec:
    """What to load and how. ``annotation``: the list file (None: the synthetic backend
    makes ``synthetic_batches`` batches); ``data_root``: the folder its paths are relative to.

    ``train``: random crops and flips, shuffled (balanced with ``classes_per_batch``), last
    partial batch dropped; otherwise centre crops, every video once. ``naming``: the frames'
    file names (MMAction2's filename_tmpl, flow_tmpl, start_index). ``flow_count``: whether
    a rawframe list's total_frames counts flow frames (None: detected from the files).
    ``labels=False``: label-less list lines are read, with label −1. ``num_workers=None``:
    this machine's cores shared among the local ranks.

    3-D clips (``clip_len`` > 0): ``num_segments`` clips of ``clip_len`` frames
    ``frame_interval`` apart (MMAction2 SampleFrames, ``sample_frames``) with one flow pair
    per frame (``flow_length`` = 1); a batch carries each clip's frames on the segment axis,
    ``rgb`` (B, N·T, 3, S, S) and ``flow`` (B, N·T, 2, S, S), which the model views as N clips
    (C, T, S, S). ``test_crops`` (1, 3, 10; evaluation only): every clip is cut into that
    many views (``multicrop.crop_views``); the batch's ``rgb``/``flow`` then hold B·V clips,
    the V views of a video contiguous, ``label``/``index`` stay (B,) and ``views`` = V.
    """
    annotation: Optional[str]
    data_root: Optional[str]
    backend: str = "torch"
    train: bool = False
    batch_size: int = 8
    num_segments: int = 3
    flow_length: int = 5
    input_size: int = 224
    device: str = "cuda"
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    modality: str = "rawframes"
    num_workers: Optional[int] = None
    classes_per_batch: Optional[int] = None
    num_classes: Optional[int] = None
    skip_bad: bool = False
    flow_root: Optional[str] = None
    dtype: torch.dtype = torch.float32
    synthetic_batches: int = 50
    naming: FrameNaming = FrameNaming()
    flow_count: Optional[bool] = None
    labels: bool = True
    clip_len: int = 0
    frame_interval: int = 1
    test_crops: int = 1

    @property
    def views(self) -> int:
        """Views per video: ``test_crops`` when evaluating, 1 when training."""
        return 1 if self.train else self.test_crops

    @property
    def positions(self) -> int:
        """Frames per view on the segment axis: K segments, or N clips × T frames."""
        return self.num_segments * self.clip_len if self.clip_len else self.num_segments

    @property
    def samples_per_video(self) -> int:
        """RGB frames (each with its flow stack) read per video: views × positions."""
        return self.views * self.positions

    def replace(self, **changes) -> "LoaderSpec":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_config(cls, cfg, *, train: bool, device, rank: int = 0, world_size: int = 1,
                    annotation: Optional[str] = None, segments: Optional[int] = None,
                    labels: bool = True) -> "LoaderSpec":
        """The training split (K = model.num_segments) or the evaluation split (K =
        ``segments`` or data.test_segments, data.eval_batch_size, data.test_crops views) of a
        validated Config; with a 3-D backbone K counts clips (data.test_clips at test) of
        model.clip_len frames.
        ``annotation`` replaces data.train_list / data.val_list."""
        data = cfg.data
        which = "train_list" if train else "val_list"
        annotation = annotation or getattr(data, which) or None
        if annotation is None and data.backend != "synthetic":
            raise CCSError(f"config: data.{which} is empty; set it to an annotation list "
                           "(or use data.backend=synthetic)")
        video = cfg.model.video
        num_segments = cfg.model.num_segments if train else \
            segments or (data.test_clips if video else data.test_segments)
        clip_len, flow_length = (cfg.model.clip_len, 1) if video else (0, cfg.model.flow_length)
        if video and data.backend == "synthetic":  # random tensors: the positions are all it needs
            num_segments, clip_len = num_segments * clip_len, 0
        return cls(
            annotation=annotation, data_root=data.root, backend=data.backend, train=train,
            batch_size=data.batch_size if train else data.eval_batch_size or data.batch_size,
            num_segments=num_segments, clip_len=clip_len, frame_interval=cfg.model.frame_interval,
            test_crops=data.test_crops if data.backend != "synthetic" else 1,
            flow_length=flow_length, input_size=data.input_size, device=str(device),
            seed=cfg.train.seed, rank=rank, world_size=world_size, modality=data.modality,
            num_workers=data.num_workers,
            classes_per_batch=data.classes_per_batch if train else None,
            num_classes=cfg.model.num_classes, skip_bad=data.skip_bad,
            flow_root=data.flow_root, synthetic_batches=data.synthetic_batches,
            naming=FrameNaming(data.filename_tmpl, data.flow_tmpl, data.start_index),
            flow_count=data.flow_count, labels=labels or train,
        )


@runtime_checkable
class Loader(Protocol):
    """What every backend's ``build_loader`` result provides (docs/loader.md, "Contract").

    ``num_videos``: the usable videos (bad ones dropped with skip_bad); ``num_classes``: the
    spec's, else the labels' count (None only for label-less video files); ``batches_done``:
    the sampler batches consumed so far this epoch (a mid-epoch checkpoint's position);
    ``num_skipped`` / ``skipped_errors``: clips dropped as bad input and {annotation row:
    message} of those videos; ``frame_count``: what the list's total_frames counts (None
    without a list). ``close()`` stops worker processes or pipelines (a no-op without any).
    """
    num_videos: int
    num_classes: Optional[int]
    batches_done: int
    num_skipped: int
    skipped_errors: dict[int, str]
    frame_count: Optional[FrameCount]

    def __iter__(self) -> Iterator[dict]: ...

    def __len__(self) -> int: ...

    def set_epoch(self, epoch: int, first_batch: int = 0) -> None: ...

    def close(self) -> None: ...


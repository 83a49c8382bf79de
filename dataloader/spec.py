"""``LoaderSpec``: every setting of a clip loader, in one frozen value.

A spec is made once (from the config by ``LoaderSpec.from_config``, or directly) and passed
whole to ``build_loader`` and from there to the backend, which reads the fields it needs;
the DALI source and the torch dataset carry the same spec into their worker processes (it
pickles: plain values, a ``FrameNaming`` and a torch dtype).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch

from ccs_fast.errors import CCSError

from .rawframes import FrameNaming


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

    def replace(self, **changes) -> "LoaderSpec":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_config(cls, cfg, *, train: bool, device, rank: int = 0, world_size: int = 1,
                    annotation: Optional[str] = None, segments: Optional[int] = None,
                    labels: bool = True) -> "LoaderSpec":
        """The training split (K = model.num_segments) or the evaluation split (K =
        ``segments`` or data.test_segments, data.eval_batch_size) of a validated Config.
        ``annotation`` replaces data.train_list / data.val_list."""
        data = cfg.data
        which = "train_list" if train else "val_list"
        annotation = annotation or getattr(data, which) or None
        if annotation is None and data.backend != "synthetic":
            raise CCSError(f"config: data.{which} is empty; set it to an annotation list "
                           "(or use data.backend=synthetic)")
        return cls(
            annotation=annotation, data_root=data.root, backend=data.backend, train=train,
            batch_size=data.batch_size if train else data.eval_batch_size or data.batch_size,
            num_segments=cfg.model.num_segments if train else segments or data.test_segments,
            flow_length=cfg.model.flow_length, input_size=data.input_size, device=str(device),
            seed=cfg.train.seed, rank=rank, world_size=world_size, modality=data.modality,
            num_workers=data.num_workers,
            classes_per_batch=data.classes_per_batch if train else None,
            num_classes=cfg.model.num_classes, skip_bad=data.skip_bad,
            flow_root=data.flow_root, synthetic_batches=data.synthetic_batches,
            naming=FrameNaming(data.filename_tmpl, data.flow_tmpl, data.start_index),
            flow_count=data.flow_count, labels=labels or train,
        )

"""Video clip loaders behind one factory (SPEC §4).

``build_loader(annotation, data_root, backend=...)`` returns a loader whose epochs yield the
same batch dict whichever backend built it: ``rgb`` (B, K, 3, S, S), ``flow`` (B, K, 2L, S, S)
channels_last-strided on the device, ``label`` and ``index`` (B,) int64. Backends:
``torch`` (DataLoader with workers), ``synthetic`` (random device tensors, no I/O) and
``dali`` (GPU decode), advertised only when nvidia-dali is importable.
"""
from __future__ import annotations

import importlib.util

import torch

from ccs_fast.errors import CCSError


def dali_available() -> bool:
    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except (ImportError, ValueError):
        return False


def available_backends() -> list[str]:
    return ["torch", "synthetic"] + (["dali"] if dali_available() else [])


def build_loader(annotation, data_root, *, backend, train, batch_size, num_segments=3,
                 flow_length=5, input_size=224, device="cuda", seed=0, rank=0, world_size=1,
                 modality="rawframes", num_workers=None, classes_per_batch=None,
                 num_classes=None, skip_bad=False, flow_root=None, dtype=torch.float32,
                 synthetic_batches=50, naming=None, flow_count=None, labels=True):
    """A loader of clip batches: ``__iter__`` (one epoch), ``__len__``, ``set_epoch``,
    ``num_videos``, ``num_classes``. See docs/loader.md.

    ``naming``: a ``frames.FrameNaming`` (MMAction2's filename_tmpl, flow_tmpl, start_index;
    default img_{:05d}.jpg, flow_{}_{:05d}.jpg, 1). ``flow_count``: whether total_frames
    of a rawframe list counts flow frames (None: detected from the files; the loader's
    ``frame_count`` says which). ``labels=False``: label-less lines are read (label −1).
    """
    options = dict(
        train=train, batch_size=batch_size, num_segments=num_segments,
        flow_length=flow_length, input_size=input_size, device=device, seed=seed, rank=rank,
        world_size=world_size, modality=modality, num_workers=num_workers,
        classes_per_batch=classes_per_batch, num_classes=num_classes, skip_bad=skip_bad,
        flow_root=flow_root, dtype=dtype, synthetic_batches=synthetic_batches,
        naming=naming, flow_count=flow_count, labels=labels,
    )
    if backend == "torch":
        from .torch_loader import build_torch_loader
        return build_torch_loader(annotation, data_root, **options)
    if backend == "synthetic":
        from .synthetic import build_synthetic_loader
        return build_synthetic_loader(annotation, data_root, **options)
    if backend == "dali":
        if not dali_available():
            raise CCSError("backend 'dali' needs nvidia-dali: pip install 'ccs_fast[dali]'")
        from .dali import build_dali_loader
        return build_dali_loader(annotation, data_root, **options)
    raise ValueError(
        f"unknown loader backend {backend!r}; available: {', '.join(available_backends())}"
    )


__all__ = ["available_backends", "build_loader", "dali_available"]

"""Video clip loaders behind one factory (SPEC §4).

``build_loader(LoaderSpec(annotation, data_root, backend=...))`` returns a loader whose
epochs yield the same batch dict whichever backend built it: ``rgb`` (B, K, 3, S, S), ``flow`` (B, K, 2L, S, S)
channels_last-strided on the device, ``label`` and ``index`` (B,) int64. Backends:
``torch`` (DataLoader with workers), ``synthetic`` (random device tensors, no I/O) and
``dali`` (GPU decode), advertised only when nvidia-dali is importable. Every loader is a
``Loader`` (``spec.py``). ``build_video_file_loader(videos, spec)`` gives the same batches
from video files decoded on the fly (prediction).

``LoaderSpec`` and ``Loader`` are imported on first use, so that reading a constant of a
torch-free module (``formats.MODALITIES``, ``multicrop.CROP_COUNTS``, ``BACKENDS``) does not
import torch.
"""
from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

from ccs_fast.base.errors import CCSError

if TYPE_CHECKING:
    from .spec import Loader, LoaderSpec

BACKENDS = ("torch", "dali", "synthetic")  # data.backend's values
OPTIONAL_BACKENDS = ("dali",)  # advertised only where importable


def __getattr__(name: str):
    if name in ("Loader", "LoaderSpec"):
        from . import spec
        return getattr(spec, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def dali_available() -> bool:
    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except (ImportError, ValueError):
        return False


def available_backends() -> list[str]:
    return [b for b in BACKENDS if b not in OPTIONAL_BACKENDS] + (["dali"] if dali_available() else [])


def build_loader(spec: LoaderSpec) -> Loader:
    """A loader of clip batches for ``spec`` with every member of ``Loader``: ``__iter__``
    (one epoch), ``__len__``, ``set_epoch``, ``close``, ``num_videos``, ``num_classes``,
    ``batches_done``, ``num_skipped``, ``skipped_errors``, ``frame_count``. See docs/loader.md."""
    if spec.backend == "torch":
        from .torch_loader import build_torch_loader
        return build_torch_loader(spec)
    if spec.backend == "synthetic":
        from .random_batches import build_synthetic_loader
        return build_synthetic_loader(spec)
    if spec.backend == "dali":
        if not dali_available():
            raise CCSError("backend 'dali' needs nvidia-dali: pip install 'ccs_fast[dali]'")
        from .dali import build_dali_loader
        return build_dali_loader(spec)
    raise ValueError(
        f"unknown loader backend {spec.backend!r}; available: {', '.join(available_backends())}"
    )


def build_video_file_loader(videos, spec: LoaderSpec, **options) -> Loader:
    """The video-file backend (``video_files``): one batch per video file of ``videos``,
    decoded and its flow computed on the fly (``ccs-fast predict``); ``options``: ``flow``,
    ``flow_params``, ``short_side``, ``progress``."""
    from .video_files import build_video_file_loader as build
    return build(videos, spec, **options)


__all__ = ["Loader", "LoaderSpec", "available_backends", "build_loader", "build_video_file_loader",
           "dali_available"]

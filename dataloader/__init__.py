"""Video clip loaders behind one factory (SPEC §4).

``build_loader(LoaderSpec(annotation, data_root, backend=...))`` returns a loader whose
epochs yield the same batch dict whichever backend built it: ``rgb`` (B, K, 3, S, S), ``flow`` (B, K, 2L, S, S)
channels_last-strided on the device, ``label`` and ``index`` (B,) int64. Backends:
``torch`` (DataLoader with workers), ``synthetic`` (random device tensors, no I/O) and
``dali`` (GPU decode), advertised only when nvidia-dali is importable.
"""
from __future__ import annotations

import importlib.util

from ccs_fast.base.errors import CCSError

from .spec import LoaderSpec


def dali_available() -> bool:
    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except (ImportError, ValueError):
        return False


def available_backends() -> list[str]:
    return ["torch", "synthetic"] + (["dali"] if dali_available() else [])


def build_loader(spec: LoaderSpec):
    """A loader of clip batches for ``spec``: ``__iter__`` (one epoch), ``__len__``,
    ``set_epoch``, ``num_videos``, ``num_classes``. See docs/loader.md."""
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


__all__ = ["LoaderSpec", "available_backends", "build_loader", "dali_available"]

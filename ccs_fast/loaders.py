"""The one place where a Config becomes a data loader (training, evaluation, prediction)."""
from __future__ import annotations

from typing import Optional

import torch

from ccs_fast.config import Config
from ccs_fast.errors import CCSError


def loader_from_config(cfg: Config, *, train: bool, device: torch.device | str, rank: int = 0,
                       world_size: int = 1, annotation: Optional[str] = None,
                       segments: Optional[int] = None, labels: bool = True):
    """Loader for the training split (K = model.num_segments, random crops) or for
    evaluation (K = ``segments`` or data.test_segments, centre crops, every video once).
    ``labels=False`` (prediction): label-less list lines are read, with label −1."""
    from ccs_fast.dataloader import build_loader
    from ccs_fast.dataloader.frames import FrameNaming

    data = cfg.data
    which = "train_list" if train else "val_list"
    annotation = annotation or getattr(data, which)
    if not annotation and data.backend != "synthetic":
        raise CCSError(f"config: data.{which} is empty; set it to an annotation list (or use data.backend=synthetic)")
    if train:
        batch_size, num_segments = data.batch_size, cfg.model.num_segments
    else:
        batch_size, num_segments = data.eval_batch_size or data.batch_size, segments or data.test_segments
    return build_loader(
        annotation or None, data.root, backend=data.backend, train=train, batch_size=batch_size,
        num_segments=num_segments, flow_length=cfg.model.flow_length, input_size=data.input_size,
        device=str(device), seed=cfg.train.seed, rank=rank, world_size=world_size,
        modality=data.modality, num_workers=data.num_workers,
        classes_per_batch=data.classes_per_batch if train else None,
        num_classes=cfg.model.num_classes, skip_bad=data.skip_bad, flow_root=data.flow_root,
        synthetic_batches=data.synthetic_batches,
        naming=FrameNaming(data.filename_tmpl, data.flow_tmpl, data.start_index),
        flow_count=data.flow_count, labels=labels or train,
    )


def skipped_report(loader, examples: int = 3) -> dict:
    """``{"skipped_videos": n, "skipped_reasons": [first messages]}`` of the videos a loader
    dropped as bad input (skip_bad); n counts distinct videos. Empty when none was."""
    errors = getattr(loader, "skipped_errors", None) or {}
    if not errors:
        return {}
    return {"skipped_videos": len(errors),
            "skipped_reasons": [errors[row] for row in sorted(errors)[:examples]]}


def skipped_line(report: dict, what: str) -> str:
    """One line for the log: ``<what>: skipped 2 videos as bad input (data.skip_bad): ...``."""
    n = report["skipped_videos"]
    return (f"{what}: skipped {n} video{'s' if n != 1 else ''} as bad input (data.skip_bad): "
            + "; ".join(report["skipped_reasons"]) + ("; ..." if n > len(report["skipped_reasons"]) else ""))

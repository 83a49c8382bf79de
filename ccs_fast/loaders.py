"""The one place where a Config becomes a data loader (training, evaluation, prediction)."""
from __future__ import annotations

from typing import Optional

import torch

from ccs_fast.config import Config


def loader_from_config(cfg: Config, *, train: bool, device: torch.device | str, rank: int = 0,
                       world_size: int = 1, annotation: Optional[str] = None,
                       segments: Optional[int] = None, labels: bool = True):
    """``build_loader(LoaderSpec.from_config(...))``: the training split or the evaluation
    split of a config (see ``LoaderSpec.from_config``)."""
    from ccs_fast.dataloader import LoaderSpec, build_loader

    return build_loader(LoaderSpec.from_config(
        cfg, train=train, device=device, rank=rank, world_size=world_size,
        annotation=annotation, segments=segments, labels=labels))


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

"""The one place where a Config becomes a data loader (training, evaluation, prediction)."""
from __future__ import annotations

from typing import Optional, Sequence

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


def loader_from_videos(cfg: Config, videos: Sequence, *, device: torch.device | str, flow: str = "tvl1",
                       flow_params: Optional[dict] = None, short_side: Optional[int] = None,
                       segments: Optional[int] = None, skip_bad: bool = False, progress: bool = False):
    """The video-file backend (``dataloader.video_files``) over ``videos``: one batch per
    video with the TSN test clip of a 2-D ``cfg`` (``segments`` or data.test_segments,
    model.flow_length, data.input_size), its flow computed by ``flow`` on frames resized to
    ``short_side`` (None: prepare's 256), fp32 on ``device``."""
    from ccs_fast.dataloader import LoaderSpec, build_video_file_loader

    spec = LoaderSpec(annotation=None, data_root=None, train=False, batch_size=1,
                      num_segments=segments or cfg.data.test_segments, flow_length=cfg.model.flow_length,
                      input_size=cfg.data.input_size, device=str(device), seed=cfg.train.seed,
                      num_classes=cfg.model.num_classes, skip_bad=skip_bad, dtype=torch.float32)
    return build_video_file_loader(videos, spec, flow=flow, flow_params=flow_params, short_side=short_side,
                                   progress=progress)


def skipped_report(loader, examples: int = 3) -> dict:
    """``{"skipped_videos": n, "skipped_reasons": [first messages]}`` of the videos a loader
    dropped as bad input (skip_bad); n counts distinct videos. Empty when none was."""
    errors = loader.skipped_errors
    if not errors:
        return {}
    return {"skipped_videos": len(errors),
            "skipped_reasons": [errors[row] for row in sorted(errors)[:examples]]}


def skipped_line(report: dict, what: str) -> str:
    """One line for the log: ``<what>: skipped 2 videos as bad input (data.skip_bad): ...``."""
    n = report["skipped_videos"]
    return (f"{what}: skipped {n} video{'s' if n != 1 else ''} as bad input (data.skip_bad): "
            + "; ".join(report["skipped_reasons"]) + ("; ..." if n > len(report["skipped_reasons"]) else ""))

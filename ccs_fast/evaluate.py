"""Evaluation: RGB, Flow and RGB+Flow top-1/top-5 over a whole split (paper Table 1).

Prediction follows SPEC §2.2: per stream the softmax of its logits, fused score
``w_f·softmax(logits_f) + w_o·softmax(logits_o)``. The eval loader (``train=False``) gives
every video exactly once over all ranks with the TSN test protocol (25 evenly spaced
segments, centre crop); counts are summed across ranks, so the accuracies cover the whole
split whatever the world size.

An evaluation is an error (one CCSError line) when no video was evaluated (e.g. every video
skipped as bad with ``skip_bad``) or when the model's outputs are not finite, and a
checkpoint whose weights or buffers hold NaN or inf is refused when loaded: a diverged model
never gets accuracies printed as if it were a model.
"""
from __future__ import annotations

import json
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from ccs_fast.amp import autocast_context
from ccs_fast.atomic import write_text
from ccs_fast.checkpoint import load_checkpoint, read_checkpoint, resolve_checkpoint_path
from ccs_fast.config import Config, config_from_dict
from ccs_fast.errors import CCSError
from ccs_fast.loaders import loader_from_config, skipped_report
from ccs_fast.metrics import topk_correct

STREAMS = ("rgb", "flow", "fused")
STREAM_TITLES = {"rgb": "RGB", "flow": "Flow", "fused": "RGB+Flow"}


def select_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto``: this rank's GPU when CUDA is available, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CCSError(f"train.device={name}: CUDA is not available on this machine")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    return device


def fuse_scores(logits_f: torch.Tensor, logits_o: torch.Tensor, fusion_weights: Sequence[float] = (1.0, 1.0)) -> dict:
    """Per-stream softmax probabilities (fp32) and their weighted sum (SPEC §2.2)."""
    w_f, w_o = (float(w) for w in fusion_weights)
    rgb = torch.softmax(logits_f.float(), dim=-1)
    flow = torch.softmax(logits_o.float(), dim=-1)
    return {"rgb": rgb, "flow": flow, "fused": w_f * rgb + w_o * flow}


def forward_scores(model, batch, device, precision, fusion_weights) -> dict:
    with autocast_context(precision, device):
        out = model(batch["rgb"], batch["flow"])
    return fuse_scores(out["logits_f"], out["logits_o"], fusion_weights)


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, device, precision: str = "fp32",
             fusion_weights: Sequence[float] = (1.0, 1.0), source: Optional[str] = None) -> dict:
    """Top-1 and top-5 (top-min(5, C)) fractions for ``rgb``, ``flow`` and ``fused``.

    Returns ``{"rgb": {"top1", "top5"}, "flow": {...}, "fused": {...}, "num_videos"}``.
    Under torch.distributed the counts are summed over ranks (every rank must call this).
    The model is put in eval mode and restored to its previous mode afterwards. CCSError
    naming ``source`` (the split evaluated) when no video was evaluated or an output logit
    is NaN or +inf.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    # rows: streams; columns: top-1 hits, top-5 hits. Summed on the device, read once.
    counts = torch.zeros(len(STREAMS), 2, dtype=torch.float64, device=device)
    total = torch.zeros((), dtype=torch.float64, device=device)
    nonfinite = torch.zeros((), dtype=torch.float64, device=device)  # videos whose scores are NaN
    try:
        for batch in loader:
            labels = batch["label"].to(device, non_blocking=True)
            scores = forward_scores(model, batch, device, precision, fusion_weights)
            # NaN or +inf logits make the softmax NaN (a -inf logit is a class with probability 0)
            probabilities = torch.cat([scores["rgb"], scores["flow"]], dim=-1)
            nonfinite += (~probabilities.isfinite()).any(dim=-1).sum()
            for row, stream in enumerate(STREAMS):
                counts[row] += topk_correct(scores[stream], labels, (1, 5)).double()
            total += labels.numel()
    finally:
        model.train(was_training)
    packed = torch.cat([counts.flatten(), total.view(1), nonfinite.view(1)])
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(packed)
    host = packed.tolist()  # host sync: once per evaluation
    num_videos, num_nonfinite = int(host[-2]), int(host[-1])
    source = source or "evaluation"
    if num_videos == 0:
        skipped = getattr(loader, "num_skipped", 0)
        why = f" ({skipped} skipped as bad)" if skipped else ""
        errors = getattr(loader, "skipped_errors", None)
        example = f"; e.g. {next(iter(errors.values()))}" if errors else ""
        raise CCSError(f"{source}: no video left to evaluate{why}{example}")
    if num_nonfinite:
        raise CCSError(f"{source}: the model's outputs are NaN or inf for {num_nonfinite} of {num_videos} videos; "
                       "the model has diverged and its accuracy would be meaningless")
    result = {}
    for row, stream in enumerate(STREAMS):
        result[stream] = {"top1": host[2 * row] / num_videos, "top5": host[2 * row + 1] / num_videos}
    result["num_videos"] = num_videos
    return result


def format_table(result: dict) -> str:
    """Markdown table like the paper's Table 1: columns RGB | Flow | RGB+Flow, in percent."""
    header = "| | " + " | ".join(STREAM_TITLES[s] for s in STREAMS) + " |"
    rule = "|---|" + "---:|" * len(STREAMS)
    rows = [
        f"| top-{k} | " + " | ".join(f"{100 * result[s][f'top{k}']:.2f}" for s in STREAMS) + " |"
        for k in (1, 5)
    ]
    return "\n".join([header, rule, *rows]) + "\n"


# ---------------------------------------------------------------------------- from a checkpoint

def config_for(cfg: Optional[Config], checkpoint) -> Config:
    """``cfg``, or (None) the config stored in ``checkpoint`` (a file or a run folder)."""
    if cfg is not None:
        return cfg
    checkpoint = resolve_checkpoint_path(checkpoint)
    saved = read_checkpoint(checkpoint, mmap=True).get("config")
    if not saved:
        raise CCSError(f"{checkpoint}: checkpoint holds no config; pass one with --config")
    return config_from_dict(saved, source=str(checkpoint))


def load_model(cfg: Config, checkpoint, device) -> torch.nn.Module:
    from ccs_fast.model import build_model
    model = build_model(cfg.model, device=device, channels_last=cfg.train.channels_last)
    load_checkpoint(resolve_checkpoint_path(checkpoint), model, cfg=cfg)
    return model.eval()


def evaluate_checkpoint(cfg: Optional[Config], checkpoint, annotation=None, out_json=None,
                        out_md=None, segments: Optional[int] = None) -> dict:
    """Evaluate ``checkpoint`` on ``annotation`` (default ``cfg.data.val_list``) with
    ``segments`` test segments (default ``cfg.data.test_segments``, 25) and centre crops.

    ``cfg`` None: the config stored in the checkpoint. Writes the result as JSON to
    ``out_json`` and as a markdown table to ``out_md`` when given; returns the dict of
    ``evaluate`` plus ``checkpoint``, ``annotation``, ``segments``, ``variant``,
    ``skipped_videos`` (and ``skipped_reasons``) and ``table``; prints nothing.
    """
    cfg = config_for(cfg, checkpoint)
    device = select_device(cfg.train.device)
    model = load_model(cfg, checkpoint, device)
    loader = loader_from_config(cfg, train=False, device=device, annotation=annotation, segments=segments)
    result = evaluate(model, loader, device, cfg.train.precision, cfg.model.fusion_weights,
                      source=f"{checkpoint} on {annotation or cfg.data.val_list or 'the eval split'}")
    result.update(
        checkpoint=str(checkpoint), annotation=str(annotation or cfg.data.val_list),
        segments=segments or cfg.data.test_segments, variant=cfg.model.variant,
    )
    result.update({"skipped_videos": 0, **skipped_report(loader)})
    table = format_table(result)
    if out_json:
        write_text(out_json, json.dumps(result, indent=2) + "\n")
    if out_md:
        write_text(out_md, 
            f"Checkpoint `{checkpoint}`, {result['num_videos']} videos, "
            f"{result['segments']} segments, variant `{cfg.model.variant}`\n\n{table}"
        )
    result["table"] = table
    return result

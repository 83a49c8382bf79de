"""Evaluation: RGB, Flow and RGB+Flow top-1/top-5 over a whole split (paper Table 1).

Prediction follows SPEC §2.2: per stream the softmax of its logits, fused score
``w_f·softmax(logits_f) + w_o·softmax(logits_o)``. The eval loader (``train=False``) gives
every video exactly once over all ranks with the TSN test protocol (25 evenly spaced
segments, centre crop; a 3-D model: ``data.test_clips`` clips); counts are summed across
ranks, so the accuracies cover the whole split whatever the world size.

Multi-crop testing (``data.test_crops`` = 3 or 10, ``ccs-fast eval --crops``): the loader
gives V views per video (batch key ``views``) and each stream's logits are averaged over the
views before its softmax. That is TSN's score averaging and, for ``avg`` consensus, what
MMAction2 computes (its head averages the segment × crop features before the linear layer,
then takes the softmax); ``protocol`` says which test protocol a result used.

Every evaluation also counts the confusion matrix of each stream (rows: true class,
columns: predicted), summed across ranks like the accuracies; eval.json holds them.
Several checkpoints (one per split, ``evaluate_checkpoints``) give the paper's Table 1:
a row per split and the mean over splits (``paper_table.table1_markdown``).

An evaluation is an error (one CCSError line) when no video was evaluated (e.g. every video
skipped as bad with ``skip_bad``) or when the model's outputs are not finite, and a
checkpoint whose weights or buffers hold NaN or inf is refused when loaded: a diverged model
never gets accuracies printed as if it were a model.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from ccs_fast.amp import autocast_context
from ccs_fast.base.atomic import write_text
from ccs_fast.checkpoint import load_checkpoint, read_checkpoint, resolve_checkpoint_path
from ccs_fast.config import Config, config_from_dict
from ccs_fast.dataloader.progress import Progress
from ccs_fast.base.errors import CCSError
from ccs_fast.loaders import loader_from_config, skipped_report
from ccs_fast.metrics import confusion_counts, topk_correct
from ccs_fast.paper_table import mean_over_splits, table1_markdown

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
    """Per-stream softmax probabilities (fp32) and their fusion (SPEC §2.2), the weighted sum
    ``w_f·p_rgb + w_o·p_flow`` divided by ``w_f + w_o``: a distribution (each row sums to 1)
    that ranks the classes exactly as the plain sum does."""
    w_f, w_o = (float(w) for w in fusion_weights)
    rgb = torch.softmax(logits_f.float(), dim=-1)
    flow = torch.softmax(logits_o.float(), dim=-1)
    return {"rgb": rgb, "flow": flow, "fused": (w_f * rgb + w_o * flow) / (w_f + w_o)}


def average_view_scores(scores: torch.Tensor, num_views: Optional[int] = None) -> torch.Tensor:
    """Average the class scores of each video's views (TSN): (B, V, C), or (B·V, C) with the
    V views of a video contiguous and ``num_views`` given → (B, C)."""
    if scores.dim() == 2:
        if num_views is None or scores.shape[0] % num_views:
            raise ValueError(f"(B·V, C) scores of shape {tuple(scores.shape)} need num_views dividing {scores.shape[0]}")
        scores = scores.view(-1, num_views, scores.shape[-1])
    return scores.mean(dim=1)


def forward_scores(model, batch, device, precision, fusion_weights) -> dict:
    """Fused scores of one batch; a batch with ``views`` > 1 (B·V clips, a video's views
    contiguous) has each stream's logits averaged over its views first (TSN)."""
    with autocast_context(precision, device):
        out = model(batch["rgb"], batch["flow"])
    logits_f, logits_o = out["logits_f"], out["logits_o"]
    views = int(batch.get("views", 1))
    if views > 1:
        logits_f = average_view_scores(logits_f.float(), views)
        logits_o = average_view_scores(logits_o.float(), views)
    return fuse_scores(logits_f, logits_o, fusion_weights)


CROP_NAMES = {1: "centre crop", 3: "3 crops (along the long side)", 10: "10 crops (4 corners + centre, mirrored too)"}


def protocol(cfg: Config, segments: Optional[int] = None, crops: Optional[int] = None) -> dict:
    """The test protocol of an evaluation of ``cfg``: segments (or clips of a 3-D model),
    crops and how view scores are combined, with a one-line ``text``."""
    crops = 1 if cfg.data.backend == "synthetic" else crops or cfg.data.test_crops  # random tensors: no views
    video = cfg.model.video
    result = {"crops": crops, "averaging": "mean of each stream's logits over the views, then softmax (TSN)"
              if crops > 1 else "single view"}
    if video:
        result.update(clips=segments or cfg.data.test_clips, clip_len=cfg.model.clip_len,
                      frame_interval=cfg.model.frame_interval)
        what = f"{result['clips']} clips of {cfg.model.clip_len}x{cfg.model.frame_interval} frames"
    else:
        result["segments"] = segments or cfg.data.test_segments
        what = f"{result['segments']} segments"
    result["text"] = (f"{what} x {CROP_NAMES[crops]}, consensus {cfg.model.consensus}; "
                      f"{result['averaging']}; RGB+Flow = {cfg.model.fusion_weights[0]:g}:"
                      f"{cfg.model.fusion_weights[1]:g} weighted mean of the stream softmaxes")
    return result


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, device, precision: str = "fp32",
             fusion_weights: Sequence[float] = (1.0, 1.0), source: Optional[str] = None,
             progress=None) -> dict:
    """Top-1, top-5 (top-min(5, C)) and mean class accuracy (the mean over the classes
    present of each class's top-1 recall, which UCF-101 papers report beside top-1) for
    ``rgb``, ``flow`` and ``fused``.

    Returns ``{"rgb": {"top1", "top5", "mean_class"}, "flow": {...}, "fused": {...},
    "num_videos", "num_classes", "confusion_matrix": {"rgb", "flow", "fused"}}`` (each a list
    of rows, true class by predicted class). ``loader``: a ``dataloader.Loader``.
    ``progress``: a ``dataloader.progress.Progress`` updated with each batch's video count
    (one host read of the batch size, no sync).
    Under torch.distributed the counts are summed over ranks (every rank must call this).
    The model is put in eval mode and restored to its previous mode afterwards. CCSError
    naming ``source`` (the split evaluated) when no video was evaluated or an output logit
    is NaN or +inf.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    try:
        counts, total, nonfinite, confusion = _tally(model, loader, device, precision, fusion_weights, progress)
    finally:
        model.train(was_training)
    if confusion is None:
        C = int(loader.num_classes or getattr(model, "num_classes", None) or 1)
        confusion = torch.zeros(len(STREAMS), C, C, dtype=torch.float64, device=device)
    packed = torch.cat([counts.flatten(), total.view(1), nonfinite.view(1), confusion.flatten()])
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(packed)
    host = packed.tolist()  # host sync: once per evaluation
    head = 2 * len(STREAMS)
    num_videos, num_nonfinite = int(host[head]), int(host[head + 1])
    matrices = torch.tensor(host[head + 2:], dtype=torch.int64).view(confusion.shape)
    _refuse_empty_or_diverged(source or "evaluation", loader, num_videos, num_nonfinite)
    result = {}
    for row, stream in enumerate(STREAMS):
        result[stream] = {"top1": host[2 * row] / num_videos, "top5": host[2 * row + 1] / num_videos,
                          "mean_class": mean_class_accuracy(matrices[row])}
    result["num_videos"] = num_videos
    result["num_classes"] = int(matrices.shape[-1])
    result["confusion_matrix"] = {stream: matrices[row].tolist() for row, stream in enumerate(STREAMS)}
    return result


def _tally(model, loader, device, precision, fusion_weights, progress):
    """The loader's batches counted on the device: (top-1 and top-5 hits (streams, 2),
    videos, videos whose scores are NaN, confusion counts (streams, C, C) with the first
    batch's class count, None without a batch)."""
    counts = torch.zeros(len(STREAMS), 2, dtype=torch.float64, device=device)
    total = torch.zeros((), dtype=torch.float64, device=device)
    nonfinite = torch.zeros((), dtype=torch.float64, device=device)
    confusion = None
    for batch in loader:
        labels = batch["label"].to(device, non_blocking=True)
        scores = forward_scores(model, batch, device, precision, fusion_weights)
        # NaN or +inf logits make the softmax NaN (a -inf logit is a class with probability 0)
        probabilities = torch.cat([scores["rgb"], scores["flow"]], dim=-1)
        nonfinite += (~probabilities.isfinite()).any(dim=-1).sum()
        if confusion is None:
            C = scores["fused"].shape[-1]
            confusion = torch.zeros(len(STREAMS), C, C, dtype=torch.float64, device=device)
        for row, stream in enumerate(STREAMS):
            counts[row] += topk_correct(scores[stream], labels, (1, 5)).double()
            confusion[row] += confusion_counts(scores[stream], labels)
        total += labels.numel()
        if progress is not None:
            progress.update(int(labels.shape[0]))
    return counts, total, nonfinite, confusion


def _refuse_empty_or_diverged(source: str, loader, num_videos: int, num_nonfinite: int) -> None:
    if num_videos == 0:
        skipped = loader.num_skipped
        why = f" ({skipped} skipped as bad)" if skipped else ""
        errors = loader.skipped_errors
        example = f"; e.g. {next(iter(errors.values()))}" if errors else ""
        raise CCSError(f"{source}: no video left to evaluate{why}{example}")
    if num_nonfinite:
        raise CCSError(f"{source}: the model's outputs are NaN or inf for {num_nonfinite} of {num_videos} videos; "
                       "the model has diverged and its accuracy would be meaningless")


def mean_class_accuracy(confusion: torch.Tensor) -> float:
    """The mean over the classes with at least one video of each class's recall (diagonal
    over row sum) of a (C, C) confusion matrix, rows the true class."""
    confusion = confusion.double()
    videos = confusion.sum(dim=1)
    present = videos > 0
    return float((confusion.diagonal()[present] / videos[present]).mean()) if present.any() else 0.0


ROW_TITLES = {"top1": "top-1", "mean_class": "mean class accuracy", "top5": "top-5"}


def accuracy_keys(num_classes: Optional[int]) -> tuple[str, ...]:
    """The accuracies shown for ``num_classes`` classes: top-1, mean class accuracy and,
    only with more than 5 classes (where it differs from certainty), top-5."""
    return ("top1", "mean_class") + (("top5",) if num_classes is None or num_classes > 5 else ())


def format_table(result: dict) -> str:
    """Markdown table like the paper's Table 1: columns RGB | Flow | RGB+Flow, in percent;
    rows top-1, mean class accuracy and (more than 5 classes) top-5."""
    header = "| | " + " | ".join(STREAM_TITLES[s] for s in STREAMS) + " |"
    rule = "|---|" + "---:|" * len(STREAMS)
    rows = [
        f"| {ROW_TITLES[k]} | " + " | ".join(f"{100 * result[s][k]:.2f}" for s in STREAMS) + " |"
        for k in accuracy_keys(result.get("num_classes")) if all(k in result[s] for s in STREAMS)
    ]
    return "\n".join([header, rule, *rows]) + "\n"


def most_confused_pairs(confusion, class_names: Optional[Sequence[str]] = None, count: int = 10) -> list[dict]:
    """The ``count`` largest off-diagonal cells of a confusion matrix (rows: true class), largest
    first: ``{"true", "predicted", "videos", "share"}`` with ``share`` the fraction of the
    true class's videos predicted as that class. Empty cells are left out."""
    matrix = torch.as_tensor(confusion, dtype=torch.float64)
    C = matrix.shape[0]
    names = list(class_names) if class_names else [str(i) for i in range(C)]
    off = matrix.clone()
    off.fill_diagonal_(0)
    values, cells = off.flatten().sort(descending=True, stable=True)
    rows = matrix.sum(dim=1)
    pairs = []
    for value, cell in zip(values.tolist()[:count], cells.tolist()[:count]):
        if value <= 0:
            break
        true, predicted = divmod(cell, C)
        pairs.append({"true": names[true], "predicted": names[predicted], "videos": int(value),
                      "share": value / float(rows[true])})
    return pairs


def most_confused_markdown(pairs: Sequence[dict], stream: str = "fused") -> str:
    """A Markdown section listing ``most_confused_pairs``."""
    lines = ["", f"#### Most confused pairs ({STREAM_TITLES[stream]})", ""]
    if not pairs:
        return "\n".join(lines + ["No video was misclassified.", ""])
    lines += ["| true class | predicted as | videos | share of the true class |", "|---|---|---:|---:|"]
    lines += [f"| {p['true']} | {p['predicted']} | {p['videos']} | {100 * p['share']:.1f} % |" for p in pairs]
    return "\n".join(lines) + "\n"


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
                        out_md=None, segments: Optional[int] = None, crops: Optional[int] = None,
                        return_model: bool = False, progress: bool = False) -> dict:
    """Evaluate ``checkpoint`` on ``annotation`` (default ``cfg.data.val_list``) with
    ``segments`` test segments or clips (default ``cfg.data.test_segments``, 25, or
    ``data.test_clips`` for a 3-D model) and ``crops`` views (default ``data.test_crops``).

    ``cfg`` None: the config stored in the checkpoint. Writes the result as JSON to
    ``out_json`` and as the paper's Table 1 layout (one split) to ``out_md`` when given;
    returns the dict of ``evaluate`` plus ``checkpoint``, ``annotation``, ``segments``,
    ``crops``, ``protocol``, ``variant``, ``skipped_videos`` (and ``skipped_reasons``) and
    ``table``, ``class_names``, ``most_confused`` (``most_confused_pairs`` of RGB+Flow) (and
    ``model``, ``cfg``, ``device`` with ``return_model``). Prints nothing but, with
    ``progress``, the videos done (``dataloader.progress``: a bar on a terminal, a line at
    least every 30 s elsewhere) on stderr.
    """
    cfg = config_for(cfg, checkpoint)
    if crops is not None and crops != cfg.data.test_crops:
        cfg = config_from_dict({**cfg.to_dict(), "data": {**cfg.to_dict()["data"], "test_crops": crops}},
                               source="--crops")
    device = select_device(cfg.train.device)
    model = load_model(cfg, checkpoint, device)
    loader = loader_from_config(cfg, train=False, device=device, annotation=annotation, segments=segments)
    split = annotation or cfg.data.val_list or "the eval split"
    with Progress(loader.num_videos, f"eval {Path(str(split)).name}", enabled=progress) as bar:
        result = evaluate(model, loader, device, cfg.train.precision, cfg.model.fusion_weights,
                          source=f"{checkpoint} on {split}", progress=bar)
    describe_evaluation(cfg, result, checkpoint, annotation, segments, skipped_report(loader), out_json, out_md)
    if return_model:
        result.update(model=model, cfg=cfg, device=device)
    return result


def describe_evaluation(cfg: Config, result: dict, checkpoint, annotation=None, segments: Optional[int] = None,
                        skipped: Optional[dict] = None, out_json=None, out_md=None) -> dict:
    """Complete an ``evaluate`` result of ``checkpoint`` under ``cfg`` in place (the keys
    ``evaluate_checkpoint`` documents: protocol, class names, most confused pairs, skipped
    videos, ``table``) and write eval.json (``out_json``) and eval.md (``out_md``) when given.
    The trainer's final evaluation goes through here too where it is reported as is (the demo)."""
    test_protocol = protocol(cfg, segments)
    names = list(cfg.model.class_names or [str(i) for i in range(cfg.model.num_classes)])
    result.update(
        checkpoint=str(checkpoint), annotation=str(annotation or cfg.data.val_list),
        segments=test_protocol.get("segments", test_protocol.get("clips")), crops=test_protocol["crops"],
        protocol=test_protocol, variant=cfg.model.variant, class_names=names,
        most_confused=most_confused_pairs(result["confusion_matrix"]["fused"], names),
    )
    result.update({"skipped_videos": 0, **(skipped or {})})
    table = format_table(result)
    if out_json:
        write_text(out_json, json.dumps(result, indent=2) + "\n")
    if out_md:
        write_text(out_md, table1_markdown(
            {split_label(result): result}, title=f"Variant `{cfg.model.variant}`: checkpoint `{checkpoint}`",
            protocol=test_protocol["text"], digits=2) + most_confused_markdown(result["most_confused"]))
    result["table"] = table
    return result


def split_label(result: dict) -> str:
    """A Table 1 row label: the annotation list's file name."""
    return Path(result["annotation"]).name or result["checkpoint"]


def evaluate_checkpoints(cfgs: Sequence[Optional[Config]], checkpoints: Sequence, annotations: Sequence = (),
                         out_json=None, out_md=None, segments: Optional[int] = None,
                         crops: Optional[int] = None, progress: bool = False) -> dict:
    """One checkpoint per split (``cfgs[i]`` its config, None: the checkpoint's own;
    ``annotations[i]`` its list, none: each config's val_list):
    ``{"splits": {label: result}, "mean": mean over splits, "protocol", "table"}``
    with ``table`` in the paper's Table 1 layout (split rows and their unweighted mean),
    written to ``out_md``; the whole dict to ``out_json``. Prints nothing."""
    if len(cfgs) != len(checkpoints):
        raise ValueError(f"{len(cfgs)} configs for {len(checkpoints)} checkpoints")
    if annotations and len(annotations) != len(checkpoints):
        raise CCSError(f"eval: {len(checkpoints)} --checkpoint but {len(annotations)} --list; "
                       "give one list per checkpoint (or none)")
    splits = {}
    for i, checkpoint in enumerate(checkpoints):
        result = evaluate_checkpoint(cfgs[i], checkpoint, annotation=annotations[i] if annotations else None,
                                     segments=segments, crops=crops, progress=progress)
        result.pop("table")
        label = f"{i + 1}: {split_label(result)}"
        splits[label] = result
    first = next(iter(splits.values()))
    text = table1_markdown(splits, title="RGB, Flow and RGB+Flow accuracy per split (paper Table 1 layout)",
                           protocol=first["protocol"]["text"], digits=2)
    report = {"splits": splits, "mean": mean_over_splits(splits), "protocol": first["protocol"], "table": text}
    if out_json:
        write_text(out_json, json.dumps({k: v for k, v in report.items() if k != "table"}, indent=2) + "\n")
    if out_md:
        write_text(out_md, text)
    return report

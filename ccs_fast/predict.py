"""``ccs-fast predict``: per-video class predictions of a checkpoint.

Two kinds of input:

- **Video files** (``predict_videos``): the video-file loader (``dataloader.video_files``)
  decodes each video with PyAV, resized as ``prepare`` resizes (short side ``short_side``,
  256 by default), computes its flow on the fly with the chosen estimator, quantised as
  stored rawframes are, and cuts the TSN test clip of the checkpoint's config
  (``data.test_segments`` evenly spaced segments, centre crop, ``model.flow_length`` flow
  pairs per segment), the same plan the other loaders use.
- **An annotation list** (``predict_list``): the loaders read it, label-less lines allowed.

Either way this module only runs the model on the loader's batches.

Scores are computed exactly as ``eval`` computes them (``evaluate.forward_scores``): each
stream's softmax, and RGB+Flow the weighted mean ``(w_f·p_rgb + w_o·p_flow) / (w_f + w_o)``,
so every stream's ``probability`` values over all classes sum to 1. Both kinds of input
give the same JSON line per video: ``video`` (the file, or the list's frame folder),
``label`` (``{"class", "index"}`` of the list's label; null for video files and label-less
lines) and ``rgb``, ``flow``, ``fused``: the top-k ``{"class", "index", "probability"}``,
best first. Class names come from ``model.class_names`` in the checkpoint's config (found at
training time from classInd.txt or the list's class folders) or from a ``classInd.txt``
given here; without either, a class is named by its index.

A 3-D checkpoint predicts from prepared rawframes (``--list``), not from video files: its
test clips (``data.test_clips`` × ``model.clip_len`` frames, 160 at the defaults) need a flow
pair per frame, 160 TV-L1 pairs per video against the 2-D model's at most 125, and the
on-the-fly path samples TSN segments only.

Long steps show progress (``dataloader.progress``): per video file, the flow pairs computed;
for a list, the videos done.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import torch

from ccs_fast.base.atomic import write_text
from ccs_fast.config import Config
from ccs_fast.dataloader.progress import Progress
from ccs_fast.base.errors import CCSError, bad_file
from ccs_fast.evaluate import STREAM_TITLES, STREAMS, config_for, forward_scores, load_model, select_device
from ccs_fast.loaders import loader_from_config, loader_from_videos, skipped_report


def class_names_of(cfg: Config, class_ind=None) -> list[str]:
    """Label i's name: from ``class_ind`` (a classInd.txt), else ``model.class_names``, else
    ``str(i)``."""
    n = cfg.model.num_classes
    if class_ind is not None:
        from ccs_fast.dataloader.formats import read_ucf101_classes

        by_label = {label: name for name, label in read_ucf101_classes(class_ind).items()}
        if sorted(by_label) != list(range(n)):
            raise bad_file(class_ind, f"names {len(by_label)} classes numbered "
                                      f"{min(by_label) + 1}..{max(by_label) + 1}; the checkpoint has {n}")
        return [by_label[i] for i in range(n)]
    return list(cfg.model.class_names or [str(i) for i in range(n)])


def _top(probabilities: torch.Tensor, names: Sequence[str], k: int) -> list[dict]:
    values, indices = probabilities.topk(min(k, probabilities.numel()))
    return [{"class": names[i], "index": i, "probability": round(v, 6)}
            for v, i in zip(values.tolist(), indices.tolist())]


def prediction_row(video: str, label: Optional[int], scores: dict, row: int, names: Sequence[str],
                   k: int) -> dict:
    """One JSON line: ``video``, ``label`` (``{"class", "index"}`` or None) and the top-``k`` of
    each stream of ``scores`` (row ``row`` of each (B, C) probability tensor)."""
    out = {"video": video, "label": None if label is None or label < 0 else {"class": names[label], "index": label}}
    out.update({stream: _top(scores[stream][row].cpu(), names, k) for stream in STREAMS})
    return out


# ---------------------------------------------------------------------------- video files

@torch.no_grad()
def predict_videos(cfg: Optional[Config], checkpoint, videos: Sequence, *, flow: str = "tvl1",
                   flow_params: Optional[dict] = None, topk: int = 5, class_ind=None,
                   short_side: Optional[int] = None, segments: Optional[int] = None,
                   skip_bad: bool = False, progress: bool = False) -> dict:
    """Top-``topk`` classes with probabilities per stream for each video file (the
    video-file loader, ``loaders.loader_from_videos``; ``short_side`` None: prepare's 256).

    Returns ``{"rows": [prediction_row], "skipped_videos", "short", ...}`` (``label`` None;
    ``short``: a line per video that decoded to fewer frames than its container declares,
    as ``prepare`` reports them). A bad video is a CCSError, or with ``skip_bad`` a skipped
    row reported like the loaders' (``skipped_reasons``). ``progress``: the flow pairs of
    each video on stderr."""
    cfg = config_for(cfg, checkpoint)
    if cfg.model.video:
        raise CCSError(f"{checkpoint}: predict on video files samples 2-D TSN clips; a 3-D model "
                       f"({cfg.model.backbone}) predicts from prepared rawframes with --list")
    device = select_device(cfg.train.device)
    model = load_model(cfg, checkpoint, device)
    names = class_names_of(cfg, class_ind)
    loader = loader_from_videos(cfg, videos, device=device, flow=flow, flow_params=flow_params,
                                short_side=short_side, segments=segments, skip_bad=skip_bad, progress=progress)
    rows = []
    for batch in loader:
        scores = forward_scores(model, batch, device, cfg.train.precision, cfg.model.fusion_weights)
        video = videos[int(batch["index"][0])]  # one video per batch
        rows.append(prediction_row(str(video), None, scores, 0, names, topk))
    return {"rows": rows, "skipped_videos": 0, "short": loader.short, **skipped_report(loader)}


def format_predictions(rows: Sequence[dict]) -> str:
    """A Markdown table: video, the fused top-k with probabilities, RGB's and Flow's top-1."""
    lines = [f"| video | {STREAM_TITLES['fused']} | {STREAM_TITLES['rgb']} top-1 | {STREAM_TITLES['flow']} top-1 |",
             "|---|---|---|---|"]
    for row in rows:
        fused = ", ".join(f"{c['class']} {c['probability']:.3f}" for c in row["fused"])
        rgb, flow = row["rgb"][0], row["flow"][0]
        lines.append(f"| {row['video']} | {fused} | {rgb['class']} {rgb['probability']:.3f} "
                     f"| {flow['class']} {flow['probability']:.3f} |")
    return "\n".join(lines) + "\n"


def write_json_lines(rows: Sequence[dict], out_path) -> Path:
    return write_text(out_path, "".join(json.dumps(row) + "\n" for row in rows))


# ---------------------------------------------------------------------------- annotation lists

@torch.no_grad()
def predict_list(cfg: Optional[Config], checkpoint, annotation, out_path, segments: Optional[int] = None,
                 class_ind=None, topk: int = 5, progress: bool = False) -> dict:
    """Write one JSON line per video of ``annotation`` to ``out_path``, in annotation order,
    in the layout of ``predict_videos``' rows (``prediction_row``: ``video`` is the list's
    path, ``label`` its label or null in a label-less list). Single process. Returns a
    summary; ``fused_top1`` covers the labelled videos (None if none is). ``progress``: the
    videos done on stderr."""
    from ccs_fast.dataloader.formats import read_annotation

    cfg = config_for(cfg, checkpoint)
    device = select_device(cfg.train.device)
    model = load_model(cfg, checkpoint, device)
    names = class_names_of(cfg, class_ind)
    annotation_path = annotation or cfg.data.val_list
    loader = loader_from_config(cfg, train=False, device=device, annotation=annotation,
                                segments=segments, labels=False)
    paths = [r.path for r in read_annotation(annotation_path, cfg.data.modality, labels=False)] \
        if annotation_path and Path(annotation_path).is_file() else []
    rows = []
    with Progress(loader.num_videos, f"predict {Path(str(annotation_path)).name}",
                  enabled=progress) as bar:
        for batch in loader:
            scores = forward_scores(model, batch, device, cfg.train.precision, cfg.model.fusion_weights)
            indices, labels = batch["index"].tolist(), batch["label"].tolist()  # one copy per batch
            for row, (index, label) in enumerate(zip(indices, labels)):
                video = paths[index] if index < len(paths) else str(index)
                rows.append((index, prediction_row(video, label, scores, row, names, topk)))
            bar.update(len(indices))
    rows = [row for _, row in sorted(rows, key=lambda item: item[0])]
    write_json_lines(rows, out_path)
    labelled = [r for r in rows if r["label"] is not None]
    hits = sum(r["fused"][0]["index"] == r["label"]["index"] for r in labelled)
    return {"num_videos": len(rows), "fused_top1": hits / len(labelled) if labelled else None,
            "out_path": str(out_path), "annotation": str(annotation_path), "skipped_videos": 0,
            **skipped_report(loader)}

"""``ccs-fast predict``: per-video class predictions of a checkpoint.

Two kinds of input:

- **Video files** (``predict_videos``): each video is decoded with PyAV and resized as
  ``prepare`` resizes (short side ``short_side``, 256 by default), its flow is computed on
  the fly with the chosen estimator and quantised as stored rawframes are (denseflow's
  uint8 mapping, bound 20; only the JPEG compression of stored flow is left out), and the
  clip is sampled with the TSN test protocol of the checkpoint's config (``data.test_segments``
  evenly spaced segments, centre crop, ``model.flow_length`` flow pairs per segment), the same
  plan the loaders use. Only the flow pairs the clip needs are computed.
- **An annotation list** (``predict_list``): the loaders read it, label-less lines allowed.

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

import numpy as np
import torch

from ccs_fast.base.atomic import write_text
from ccs_fast.config import Config
from ccs_fast.dataloader.progress import Progress
from ccs_fast.base.errors import CCSError, bad_file
from ccs_fast.evaluate import STREAM_TITLES, STREAMS, config_for, forward_scores, load_model, select_device
from ccs_fast.loaders import loader_from_config, skipped_report

DEFAULT_SHORT_SIDE = 256  # prepare's default: 320x240 -> 340x256


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

def video_clip(path, cfg: Config, estimator, short_side: int = DEFAULT_SHORT_SIDE,
               segments: Optional[int] = None, progress: bool = False,
               notes: Optional[list] = None) -> tuple[np.ndarray, np.ndarray]:
    """The TSN test clip of a video file: uint8 RGB (K, S, S, 3) and flow (K, S, S, 2L),
    K = ``segments`` or data.test_segments; CCSError naming the file for a missing,
    undecodable or too short video, or a folder. ``progress``: count the flow pairs computed
    (``dataloader.progress``). ``notes`` receives prepare's line for a video that decodes to
    fewer frames than its container declares (it is predicted from the frames it has)."""
    import cv2

    from ccs_fast.dataloader.flow import FLOW_BOUND, flow_to_uint8
    from ccs_fast.dataloader.prepare import decode_resized, short_decode_line
    from ccs_fast.dataloader.sampling import plan_clip
    from ccs_fast.dataloader.torch_loader import cut_clip

    import av

    path = Path(path)
    if path.is_dir():
        raise bad_file(path, "is a folder, not a video file (rawframe folders are predicted with --list)")
    if not path.is_file():
        raise bad_file(path, "video not found")
    info: dict = {}
    try:
        frames = list(decode_resized(path, short_side, info))
    except (av.FFmpegError, IndexError) as exc:
        raise bad_file(path, f"cannot decode video ({exc.__class__.__name__})") from None
    if not frames:
        raise bad_file(path, "no frames decoded")
    short = short_decode_line(path, len(frames), info.get("declared", 0))
    if short and notes is not None:
        notes.append(short)
    height, width = frames[0].shape[:2]
    try:
        plan = plan_clip(len(frames), width, height, num_segments=segments or cfg.data.test_segments,
                         flow_length=cfg.model.flow_length, input_size=cfg.data.input_size,
                         train=False, seed=cfg.train.seed, epoch=0, index=0)
    except ValueError as exc:
        raise bad_file(path, f"video too short: {exc}") from None
    grey: dict[int, np.ndarray] = {}
    flows: dict[int, tuple] = {}

    def grey_frame(i: int) -> np.ndarray:
        if i not in grey:
            grey[i] = cv2.cvtColor(frames[i], cv2.COLOR_RGB2GRAY)
        return grey[i]

    def flow_pair(i: int):
        if i not in flows:
            fx, fy = flow_to_uint8(estimator(grey_frame(i), grey_frame(i + 1)), FLOW_BOUND)
            flows[i] = ((f"{path} flow_x {i}", fx), (f"{path} flow_y {i}", fy))
            bar.update()
        return flows[i]

    rgb_frames = [(path, frames[int(i)]) for i in plan.frame_indices]
    pairs = len(np.unique(plan.flow_indices))
    with Progress(pairs, f"flow of {path.name}", unit="pairs", enabled=progress) as bar:
        return cut_clip(plan, width, height, cfg.data.input_size, rgb_frames, flow_pair)


@torch.no_grad()
def predict_videos(cfg: Optional[Config], checkpoint, videos: Sequence, *, flow: str = "tvl1",
                   flow_params: Optional[dict] = None, topk: int = 5, class_ind=None,
                   short_side: int = DEFAULT_SHORT_SIDE, segments: Optional[int] = None,
                   skip_bad: bool = False, progress: bool = False) -> dict:
    """Top-``topk`` classes with probabilities per stream for each video file.

    Returns ``{"rows": [prediction_row], "skipped_videos", "short", ...}`` (``label`` None;
    ``short``: a line per video that decoded to fewer frames than its container declares,
    as ``prepare`` reports them). A bad video is a CCSError, or with ``skip_bad`` a skipped
    row reported like the loaders' (``skipped_reasons``). ``progress``: the flow pairs of
    each video on stderr."""
    from ccs_fast.dataloader.flow import make_flow_estimator
    from ccs_fast.dataloader.torch_loader import normalize_on_device

    cfg = config_for(cfg, checkpoint)
    if cfg.model.video:
        raise CCSError(f"{checkpoint}: predict on video files samples 2-D TSN clips; a 3-D model "
                       f"({cfg.model.backbone}) predicts from prepared rawframes with --list")
    device = select_device(cfg.train.device)
    model = load_model(cfg, checkpoint, device)
    names = class_names_of(cfg, class_ind)
    estimator = make_flow_estimator(flow, **(flow_params or {}))
    rows, skipped, short = [], [], []
    for video in videos:
        try:
            rgb, flo = video_clip(video, cfg, estimator, short_side, segments, progress=progress, notes=short)
        except CCSError as exc:
            if not skip_bad:
                raise
            skipped.append(str(exc))
            continue
        rgb_t, flow_t = normalize_on_device(torch.from_numpy(rgb[None]).to(device),
                                            torch.from_numpy(flo[None]).to(device), torch.float32)
        scores = forward_scores(model, {"rgb": rgb_t, "flow": flow_t}, device,
                                cfg.train.precision, cfg.model.fusion_weights)
        rows.append(prediction_row(str(video), None, scores, 0, names, topk))
    report = {"rows": rows, "skipped_videos": len(skipped), "short": short}
    if skipped:
        report["skipped_reasons"] = skipped[:3]
    return report


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
    with Progress(getattr(loader, "num_videos", 0) or 0, f"predict {Path(str(annotation_path)).name}",
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

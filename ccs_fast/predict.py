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

Scores follow SPEC §2.2 (per-stream softmax, fused ``w_f·p_rgb + w_o·p_flow``). Class names
come from ``model.class_names`` in the checkpoint's config (found at training time from
classInd.txt or the list's class folders) or from a ``classInd.txt`` given here; without
either, a class is named by its index.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from ccs_fast.atomic import write_text
from ccs_fast.config import Config
from ccs_fast.errors import CCSError, bad_file
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
    return [{"class": names[i], "index": i, "p": round(v, 6)}
            for v, i in zip(values.tolist(), indices.tolist())]


# ---------------------------------------------------------------------------- video files

def video_clip(path, cfg: Config, estimator, short_side: int = DEFAULT_SHORT_SIDE,
               segments: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
    """The TSN test clip of a video file: uint8 RGB (K, S, S, 3) and flow (K, S, S, 2L),
    K = ``segments`` or data.test_segments; CCSError naming the file for a missing,
    undecodable or too short video."""
    import cv2

    from ccs_fast.dataloader.flow import FLOW_BOUND, flow_to_uint8
    from ccs_fast.dataloader.prepare import decode_resized
    from ccs_fast.dataloader.sampling import plan_clip
    from ccs_fast.dataloader.torch_loader import cut_clip

    import av

    path = Path(path)
    if not path.is_file():
        raise bad_file(path, "video not found")
    try:
        frames = list(decode_resized(path, short_side))
    except (av.FFmpegError, IndexError) as exc:
        raise bad_file(path, f"cannot decode video ({exc.__class__.__name__})") from None
    if not frames:
        raise bad_file(path, "no frames decoded")
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
        return flows[i]

    rgb_frames = [(path, frames[int(i)]) for i in plan.frame_indices]
    return cut_clip(plan, width, height, cfg.data.input_size, rgb_frames, flow_pair)


@torch.no_grad()
def predict_videos(cfg: Optional[Config], checkpoint, videos: Sequence, *, flow: str = "tvl1",
                   flow_params: Optional[dict] = None, topk: int = 5, class_ind=None,
                   short_side: int = DEFAULT_SHORT_SIDE, segments: Optional[int] = None,
                   skip_bad: bool = False) -> dict:
    """Top-``topk`` classes with probabilities per stream for each video file.

    Returns ``{"rows": [{"video", "rgb", "flow", "fused"}], "skipped_videos", ...}``; each
    stream is a list of ``{"class", "index", "p"}``, best first. A bad video is a CCSError,
    or with ``skip_bad`` a skipped row reported like the loaders' (``skipped_reasons``)."""
    from ccs_fast.dataloader.flow import make_flow_estimator
    from ccs_fast.dataloader.torch_loader import normalize_on_device
    from ccs_fast.video_backbones import is_video_backbone

    cfg = config_for(cfg, checkpoint)
    if is_video_backbone(cfg.model.backbone):
        raise CCSError(f"{checkpoint}: predict on video files samples 2-D TSN clips; a 3-D model "
                       f"({cfg.model.backbone}) predicts from prepared rawframes with --list")
    device = select_device(cfg.train.device)
    model = load_model(cfg, checkpoint, device)
    names = class_names_of(cfg, class_ind)
    estimator = make_flow_estimator(flow, **(flow_params or {}))
    rows, skipped = [], []
    for video in videos:
        try:
            rgb, flo = video_clip(video, cfg, estimator, short_side, segments)
        except CCSError as exc:
            if not skip_bad:
                raise
            skipped.append(str(exc))
            continue
        rgb_t, flow_t = normalize_on_device(torch.from_numpy(rgb[None]).to(device),
                                            torch.from_numpy(flo[None]).to(device), torch.float32)
        scores = forward_scores(model, {"rgb": rgb_t, "flow": flow_t}, device,
                                cfg.train.precision, cfg.model.fusion_weights)
        row = {"video": str(video)}
        row.update({stream: _top(scores[stream][0].cpu(), names, topk) for stream in STREAMS})
        rows.append(row)
    report = {"rows": rows, "skipped_videos": len(skipped)}
    if skipped:
        report["skipped_reasons"] = skipped[:3]
    return report


def format_predictions(rows: Sequence[dict]) -> str:
    """A Markdown table: video, the fused top-k with probabilities, RGB's and Flow's top-1."""
    lines = [f"| video | {STREAM_TITLES['fused']} | {STREAM_TITLES['rgb']} top-1 | {STREAM_TITLES['flow']} top-1 |",
             "|---|---|---|---|"]
    for row in rows:
        fused = ", ".join(f"{c['class']} {c['p']:.3f}" for c in row["fused"])
        rgb, flow = row["rgb"][0], row["flow"][0]
        lines.append(f"| {row['video']} | {fused} | {rgb['class']} {rgb['p']:.3f} | {flow['class']} {flow['p']:.3f} |")
    return "\n".join(lines) + "\n"


def write_json_lines(rows: Sequence[dict], out_path) -> Path:
    return write_text(out_path, "".join(json.dumps(row) + "\n" for row in rows))


# ---------------------------------------------------------------------------- annotation lists

@torch.no_grad()
def predict_list(cfg: Optional[Config], checkpoint, annotation, out_path, segments: Optional[int] = None,
                 class_ind=None) -> dict:
    """Write one JSON line per video of ``annotation`` to ``out_path``, in annotation order:
    ``index``, ``label`` (null in a label-less list), ``rgb``, ``flow``, ``fused`` (predicted
    classes), ``class`` (the fused prediction's name) and ``score`` (its fused score).
    Single process. Returns a summary; ``fused_top1`` covers the labelled videos (None if
    none is)."""
    cfg = config_for(cfg, checkpoint)
    device = select_device(cfg.train.device)
    model = load_model(cfg, checkpoint, device)
    names = class_names_of(cfg, class_ind)
    loader = loader_from_config(cfg, train=False, device=device, annotation=annotation,
                                segments=segments, labels=False)
    rows = []
    for batch in loader:
        scores = forward_scores(model, batch, device, cfg.train.precision, cfg.model.fusion_weights)
        fused_score, fused_class = scores["fused"].max(dim=-1)
        columns = {
            "index": batch["index"], "label": batch["label"], "rgb": scores["rgb"].argmax(-1),
            "flow": scores["flow"].argmax(-1), "fused": fused_class, "score": fused_score,
        }
        host = {k: v.cpu().tolist() for k, v in columns.items()}  # one copy per batch
        rows.extend(dict(zip(host, values)) for values in zip(*host.values()))
    rows.sort(key=lambda r: r["index"])
    for row in rows:
        row["label"] = None if row["label"] < 0 else row["label"]
        row["class"] = names[row["fused"]]
    write_json_lines(rows, out_path)
    labelled = [r for r in rows if r["label"] is not None]
    top1 = sum(r["fused"] == r["label"] for r in labelled) / len(labelled) if labelled else None
    return {"num_videos": len(rows), "fused_top1": top1, "out_path": str(out_path),
            "annotation": str(annotation or cfg.data.val_list), "skipped_videos": 0,
            **skipped_report(loader)}

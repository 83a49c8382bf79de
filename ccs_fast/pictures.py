"""Pictures of a trained model on test videos: class activation maps per stream (the paper's
Fig. 6), the connection block's attention, the confusion matrix. ``viz`` draws; this module
runs the model and picks what to draw.

For each chosen video the picture shows its middle segment (a 3-D model: the middle frame of
its middle clip, and the middle time step T'/2 of the maps):

- CAM (``write_cams``): M_c(x) = Σ_k w_{c,k} F_k(x) on the last stage's maps of each stream,
  for the video's true class c (the fused prediction when the list has no label), with w the
  stream's classifier (``baseline``/``cb``) or the shared ``projection → classifier`` folded into
  one linear map (``cs``/``all``; BatchNorm1d with its running statistics). With ``avg``
  consensus the mean of the map over every position of every segment is the class logit, so
  the picture shows where the logit comes from. Other consensus modes are not linear in the
  segment features (``max`` picks one, ``mul``/``concat``/``trn`` mix them): CCSError.
- Attention (``write_attention``): for the last connection block, q = φ(x_f), k = κ(x_o) of
  the video's tokens and S = scale·q kᵀ (SPEC §2.1); the row softmax of the RGB position at
  the centre of the middle segment over all flow positions, and the column softmax of the flow
  position there over all RGB positions, each shown on the middle segment (the title gives the
  share of the softmax mass that falls in that segment). With ``cb_heads`` > 1 the first head.

The videos: the first ``count`` of the loader's order that have distinct true classes, then
the next ones; the loader should give one view per video (``data.test_crops`` = 1).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ccs_fast.amp import autocast_context
from ccs_fast.dataloader.transforms import IMAGENET_MEAN, IMAGENET_STD
from ccs_fast.base.errors import CCSError


def rgb_frame(x: torch.Tensor) -> np.ndarray:
    """Normalised (3, H, W) → uint8 (H, W, 3)."""
    image = x.detach().float().cpu().permute(1, 2, 0).numpy() * IMAGENET_STD + IMAGENET_MEAN
    return (np.clip(image, 0.0, 1.0) * 255).round().astype(np.uint8)


def head_weights(model, stream: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(W, b) of the linear map from a stream's video feature to its logits."""
    from ccs_fast.viz import linear_chain_weight

    if model.consensus_mode != "avg":
        raise CCSError(f"class activation maps need model.consensus=avg (a linear consensus), "
                       f"got {model.consensus_mode!r}")
    if model.uses_shared_block:
        return linear_chain_weight(model.projection, model.classifier)
    fc = model.classifier_rgb if stream == "rgb" else model.classifier_flow
    return fc.weight.detach().float(), fc.bias.detach().float()


def class_name(names, label: int) -> str:
    return names[label] if names and 0 <= label < len(names) else str(label)


def video_name(names, index: int) -> Optional[str]:
    """The annotation list's path of video ``index`` (``names`` from ``video_names``), or None."""
    return names[index] if names and 0 <= index < len(names) else None


def picture_file(prefix: str, index: int, name: Optional[str]) -> str:
    """``<prefix>_<index>_<video name>.png`` (the name's folders joined by ``_`` and any
    character outside letters, digits, ``.-_`` replaced), ``<prefix>_<index>.png`` without a name."""
    if not name:
        return f"{prefix}_{index}.png"
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name).with_suffix("").as_posix().strip("/").replace("/", "_"))
    return f"{prefix}_{index}_{safe[:120]}.png"


def video_names(cfg, annotation=None) -> Optional[list[str]]:
    """The paths of the annotation list's videos (default ``data.val_list``), by row; None
    for the synthetic backend or without a list file."""
    from ccs_fast.dataloader.formats import read_annotation

    path = annotation or cfg.data.val_list
    if cfg.data.backend == "synthetic" or not path or not Path(path).is_file():
        return None
    return [r.path for r in read_annotation(path, cfg.data.modality, labels=False)]


def _describe(names, video: dict) -> str:
    return video_name(names, video["index"]) or f"video {video['index']} of the list"


def _picture_path(out_dir: Path, prefix: str, names, video: dict) -> Path:
    """``out_dir/<picture_file>`` for ``video``, the folder made if missing."""
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir / picture_file(prefix, video["index"], video_name(names, video["index"]))


def _choose(loader, count: int, max_batches_for_variety: int = 4):
    """Yield (batch, row in batch) of up to ``count`` videos, distinct true classes first."""
    chosen, seen, spare = 0, set(), []
    for number, batch in enumerate(loader):
        views = int(batch.get("views", 1))
        for row, label in enumerate(batch["label"].tolist()):
            if chosen >= count:
                return
            if label not in seen or number >= max_batches_for_variety:
                seen.add(label)
                chosen += 1
                yield _one_video(batch, row, views)
            elif len(spare) < count:
                spare.append(_one_video(batch, row, views))
        if chosen >= count:
            return
    for item in spare[: count - chosen]:
        yield item


def _one_video(batch, row: int, views: int) -> dict:
    return {"rgb": batch["rgb"][row * views: row * views + 1], "flow": batch["flow"][row * views: row * views + 1],
            "label": int(batch["label"][row]), "index": int(batch["index"][row])}


def _middle(frame_count: int, K: int) -> tuple[int, int]:
    """(segment or clip k, position on the frame axis of the batch) shown for a video of
    ``frame_count`` frames in K inputs (a 2-D model's segments, a 3-D model's clips)."""
    k, per_input = K // 2, frame_count // K
    return k, k * per_input + per_input // 2


@torch.no_grad()
def write_cams(model, loader, count: int, out_dir, *, device, precision: str = "fp32",
               class_names=None, fusion_weights=(1.0, 1.0), videos=None) -> list[Path]:
    """``cam_<index>_<video>.png`` in ``out_dir`` for ``count`` videos (``picture_file``;
    ``videos``: the list's paths by row, ``video_names``): frame, flow magnitude, CAM of each
    stream; the title names the video, the segment shown, the class mapped and the RGB+Flow
    prediction (``fusion_weights``, SPEC §2.2). Returns the paths."""
    from ccs_fast.evaluate import fuse_scores
    from ccs_fast.viz import class_activation_maps, plot_cams

    weights = {stream: head_weights(model, stream) for stream in ("rgb", "flow")}
    model.eval()
    out_dir = Path(out_dir)
    paths = []
    for video in _choose(loader, count):
        with autocast_context(precision, device):
            x_rgb, x_flow, B, K = model.feature_maps(video["rgb"], video["flow"])
            out = model.head_from_maps(x_rgb, x_flow, B, K)
        predicted = int(fuse_scores(out["logits_f"], out["logits_o"], fusion_weights)["fused"].argmax())
        target = video["label"] if video["label"] >= 0 else predicted
        k, position = _middle(video["rgb"].shape[1], K)
        cams = {}
        for stream, maps in (("RGB", x_rgb), ("Flow", x_flow)):
            W, b = weights["rgb" if stream == "RGB" else "flow"]
            selected = maps[k: k + 1].float()
            if selected.dim() == 5:  # 3-D: the middle time step of the clip's maps
                selected = selected[:, :, selected.shape[2] // 2]
            cams[stream] = class_activation_maps(selected, W.to(selected.device), [target],
                                                 b.to(selected.device))[0].cpu().numpy()
        flow = video["flow"][0, position, :2].float().permute(1, 2, 0).cpu().numpy()
        h, w = cams["RGB"].shape
        where = f"clip {k + 1} of {K}" if model.video else f"segment {k + 1} of {K}"
        title = (f"{_describe(videos, video)}, {where}: where each stream finds the class "
                 f"{class_name(class_names, target)}{' (true class)' if video['label'] >= 0 else ' (predicted)'}\n"
                 f"(class activation maps on the {h}x{w} last-stage grid); RGB+Flow predicts "
                 f"{class_name(class_names, predicted)}")
        paths.append(plot_cams(rgb_frame(video["rgb"][0, position]), cams,
                               _picture_path(out_dir, "cam", videos, video), flow_image=flow, title=title))
    return paths


@torch.no_grad()
def write_attention(model, loader, count: int, out_dir, *, device, precision: str = "fp32",
                    class_names=None, videos=None) -> list[Path]:
    """``attention_<index>_<video>.png`` in ``out_dir`` for ``count`` videos (module
    docstring; ``videos`` as in ``write_cams``).
    CCSError when the model has no connection block (variants ``baseline``, ``cs``)."""
    from ccs_fast.viz import attention_maps, plot_attention

    if not len(model.connections):
        raise CCSError(f"attention pictures need a connection block; variant {model.variant!r} has none")
    stage = max(int(s) for s in model.connections)
    block = model.connections[str(stage)]
    captured = {}
    hooks = [block.register_forward_pre_hook(lambda _m, args: captured.update(tokens=args)),
             model.backbone_rgb.stages[stage - 1].register_forward_hook(
                 lambda _m, _i, out: captured.update(shape=tuple(out.shape)))]
    model.eval()
    out_dir = Path(out_dir)
    paths = []
    try:
        for video in _choose(loader, count):
            with autocast_context(precision, device):
                _, _, _, K = model.feature_maps(video["rgb"], video["flow"])
            x_f, x_o = (t.float() for t in captured["tokens"])
            shape = captured["shape"]
            k, position = _middle(video["rgb"].shape[1], K)
            if model.video:  # tokens per clip: (N, T'·h·w, C), grid (T', h, w)
                grid, tokens, shown = shape[2:], k, shape[2] // 2
            else:  # tokens per video: (1, K·h·w, C), grid (K, h, w)
                grid, tokens, shown = (K, *shape[2:]), 0, k
            q = block.phi(x_f[tokens])
            key = block.kappa(x_o[tokens])
            width = q.shape[1] // block.heads
            q, key = q[:, :width], key[:, :width]
            h, w = grid[1:]
            centre = shown * h * w + (h // 2) * w + w // 2
            to_flow, to_rgb = attention_maps(q, key, centre, centre, grid, scale=block.scale)
            where = (f"clip {k + 1}, time step {shown + 1} of {grid[0]}" if model.video
                     else f"segment {shown + 1} of {K}")
            title = (f"{_describe(videos, video)} (class {class_name(class_names, video['label'])}), {where}: "
                     f"the connection block's attention at the centre position\n"
                     f"{to_flow[shown].sum():.0%} (left) and {to_rgb[shown].sum():.0%} (right) of the attention "
                     f"falls in this {'time step' if model.video else 'segment'}, the rest in the others")
            paths.append(plot_attention(rgb_frame(video["rgb"][0, position]), to_flow[shown], to_rgb[shown],
                                        _picture_path(out_dir, "attention", videos, video),
                                        query_rgb=(h // 2, w // 2), query_flow=(h // 2, w // 2), title=title))
    finally:
        for hook in hooks:
            hook.remove()
    return paths


def confusion_title(result: dict, stream: str = "fused") -> str:
    """What a confusion picture shows: the stream, the split, the test views, the checkpoint
    and the accuracies of an ``evaluate_checkpoint`` result."""
    from ccs_fast.evaluate import CROP_NAMES, STREAM_TITLES

    acc = result.get(stream, {})
    views = f"{result['segments']} segments x {CROP_NAMES.get(result.get('crops'), 'centre crop')}" \
        if result.get("segments") else ""
    what = (f"{STREAM_TITLES[stream]} confusion matrix of {result.get('num_videos', '?')} videos"
            + (f" of {Path(result['annotation']).name}" if result.get("annotation") else "")
            + (f", {views}" if views else ""))
    scores = [f"top-1 {100 * acc['top1']:.1f} %" if "top1" in acc else "",
              f"mean class accuracy {100 * acc['mean_class']:.1f} %" if "mean_class" in acc else ""]
    lines = [what, f"checkpoint {result['checkpoint']}" if result.get("checkpoint") else "",
             ", ".join(p for p in scores if p)]
    return "\n".join(line for line in lines if line)


def write_confusion(result: dict, path, class_names: Optional[list] = None, title: Optional[str] = None) -> Path:
    """The RGB+Flow confusion matrix of an evaluation result as a PNG, with the class names
    (``class_names``, else the result's ``class_names``, else the indices) and a title
    (``confusion_title`` unless given)."""
    from ccs_fast.viz import plot_confusion_matrix

    matrix = result["confusion_matrix"]["fused"]
    names = class_names or result.get("class_names")
    names = names if names and len(names) == len(matrix) else [str(i) for i in range(len(matrix))]
    return plot_confusion_matrix(matrix, names, path, title=title or confusion_title(result))


def picture_loader(cfg, device, annotation=None):
    """The evaluation loader of ``cfg`` with one centre view per video."""
    from ccs_fast.config import config_from_dict
    from ccs_fast.loaders import loader_from_config

    data = {**cfg.to_dict()["data"], "test_crops": 1}
    single = config_from_dict({**cfg.to_dict(), "data": data}, source="pictures")
    return loader_from_config(single, train=False, device=device, annotation=annotation)

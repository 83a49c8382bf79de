"""Pictures of a run: training curves, confusion matrix, connection-block attention, class
activation maps (the paper's Fig. 6). Each ``plot_*`` function writes one PNG and returns its path.

Numbers (no matplotlib needed):

- ``class_activation_maps(features, weight, classes, bias=None)``: CAM (Zhou et al. 2016),
  M_k(x) = Σ_c w_{k,c} F_c(x) (+ b_k), for (N, C, h, w) or (N, C, T, h, w) maps → (N, h, w) or
  (N, T, h, w). Its mean over positions is the logit of a linear head on average-pooled
  features. ``linear_chain_weight(*modules)`` folds Linear, eval-mode BatchNorm1d, Dropout and
  Identity layers into the one (weight, bias) they apply, so the shared block's
  ``projection → classifier`` gives a CAM weight too.
- ``attention_maps(q, k, query_rgb, query_flow, grid, scale=None)``: for one video's
  connection-block projections q = φ(x_f) (N_f, C_e) and k = κ(x_o) (N_o, C_e), S = scale·q kᵀ
  (SPEC §2.1, scale C_e^-1/2 by default); the row softmax of RGB position ``query_rgb`` over the
  flow positions and the column softmax of flow position ``query_flow`` over the RGB positions,
  each reshaped to ``grid`` (K, h, w) or (T, h, w). Computes one row and one column, never N×N.

Pictures use matplotlib's object API (``matplotlib.figure.Figure``, no pyplot state, safe in
worker threads); matplotlib is the optional extra ``ccs_fast[viz]``, imported on the first
picture, and its absence is one ``CCSError`` line. The figure sizes are fixed, so a PNG is
``figsize · dpi`` pixels (``bbox_inches`` is not "tight"); each is written atomically
(``atomic.atomic_path``). Maps are upsampled bilinearly to the frame (cv2.resize), scaled to
[0, 1] per map and drawn with the ``jet`` colormap at 50 % over the frame.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import cv2
import numpy as np
import torch
from torch import nn

from ccs_fast.base.atomic import atomic_path
from ccs_fast.base.errors import CCSError
from ccs_fast.metrics import read_metrics

DEFAULT_DPI = 100
OVERLAY_ALPHA = 0.5


def matplotlib_available() -> bool:
    """Whether the pictures can be drawn (the ``[viz]`` extra is installed)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _figure(figsize):
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise CCSError("pictures need matplotlib, which is not installed (pip install 'ccs_fast[viz]')") from None
    return Figure(figsize=figsize)


def _save(fig, path, dpi: int) -> Path:
    path = Path(path)
    try:
        with atomic_path(path) as tmp:  # a picture is complete or absent
            fig.savefig(tmp, dpi=dpi, format="png")
    except OSError as exc:
        raise CCSError(f"{path}: could not write the picture ({exc.strerror or exc})") from None
    return path


# ----------------------------------------------------------------------------- numbers

def row_normalised(matrix) -> np.ndarray:
    """Each row divided by its sum (recall per true class); empty rows stay 0."""
    m = np.asarray(matrix, dtype=np.float64)
    sums = m.sum(axis=1, keepdims=True)
    return np.divide(m, sums, out=np.zeros_like(m), where=sums > 0)


def class_activation_maps(features: torch.Tensor, weight: torch.Tensor, classes, bias=None) -> torch.Tensor:
    """CAM of class ``classes[n]`` (an int for all) on ``features[n]``: (N, C, *spatial) → (N, *spatial)."""
    if features.dim() < 3 or weight.dim() != 2 or weight.shape[1] != features.shape[1]:
        raise ValueError(f"features (N, C, ...) and weight (num_classes, C) do not fit: "
                         f"{tuple(features.shape)} and {tuple(weight.shape)}")
    N = features.shape[0]
    classes = torch.as_tensor(classes, device=weight.device).long()
    classes = classes.expand(N) if classes.dim() == 0 else classes
    w = weight[classes].to(features.dtype)  # (N, C)
    cams = torch.einsum("nc...,nc->n...", features, w)
    if bias is not None:
        cams = cams + bias[classes].to(cams.dtype).view(N, *([1] * (cams.dim() - 1)))
    return cams


def linear_chain_weight(*modules: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(W, b) with ``x ↦ W x + b`` equal to applying ``modules`` in order (Linear; BatchNorm1d
    with running statistics, i.e. eval mode; Dropout and Identity as identity; Sequential
    unfolded)."""
    flat: list[nn.Module] = []
    for module in modules:
        flat.extend(module if isinstance(module, nn.Sequential) else [module])
    W: Optional[torch.Tensor] = None
    b: Optional[torch.Tensor] = None
    for module in flat:
        if isinstance(module, nn.Linear):
            mw = module.weight.detach().double()
            mb = module.bias.detach().double() if module.bias is not None else torch.zeros(mw.shape[0], dtype=mw.dtype)
        elif isinstance(module, nn.BatchNorm1d):
            if module.running_var is None:
                raise ValueError("a BatchNorm1d without running statistics is not a fixed linear map")
            scale = (module.running_var.double() + module.eps).rsqrt()
            gamma = module.weight.detach().double() if module.affine else torch.ones_like(scale)
            beta = module.bias.detach().double() if module.affine else torch.zeros_like(scale)
            mw = torch.diag(gamma * scale)
            mb = beta - gamma * scale * module.running_mean.double()
        elif isinstance(module, (nn.Dropout, nn.Identity)):
            continue
        else:
            raise ValueError(f"{type(module).__name__} is not a linear layer")
        W, b = (mw, mb) if W is None else (mw @ W, mw @ b + mb)
    if W is None:
        raise ValueError("no linear layer given")
    return W.float(), b.float()


def attention_maps(q: torch.Tensor, k: torch.Tensor, query_rgb: int, query_flow: int, grid: Sequence[int],
                   scale: Optional[float] = None) -> tuple[np.ndarray, np.ndarray]:
    """(RGB position ``query_rgb`` → flow positions, flow position ``query_flow`` → RGB positions),
    the row and column softmax of S = scale·q kᵀ, each reshaped to ``grid``; each sums to 1."""
    if q.dim() != 2 or k.dim() != 2 or q.shape[1] != k.shape[1]:
        raise ValueError(f"expected q (N_f, C_e) and k (N_o, C_e), got {tuple(q.shape)} and {tuple(k.shape)}")
    n = int(np.prod(grid))
    if q.shape[0] != n or k.shape[0] != n:
        raise ValueError(f"grid {tuple(grid)} has {n} positions; q has {q.shape[0]}, k has {k.shape[0]}")
    if scale is None:
        scale = q.shape[1] ** -0.5
    q, k = q.detach().double(), k.detach().double()
    to_flow = (scale * (k @ q[query_rgb])).softmax(dim=0)
    to_rgb = (scale * (q @ k[query_flow])).softmax(dim=0)
    return to_flow.view(*grid).float().cpu().numpy(), to_rgb.view(*grid).float().cpu().numpy()


def upsample_map(values, height: int, width: int) -> np.ndarray:
    """(h, w) map → (height, width) float32, bilinear, scaled to [0, 1] (a flat map becomes 0)."""
    m = np.asarray(values, dtype=np.float32)
    up = cv2.resize(m, (width, height), interpolation=cv2.INTER_LINEAR)
    low, high = float(up.min()), float(up.max())
    return (up - low) / (high - low) if high > low else np.zeros_like(up)


def _as_rgb_image(frame) -> np.ndarray:
    """uint8 (H, W, 3), float in [0, 1] (H, W, 3), or a tensor (3, H, W) → float (H, W, 3) in [0, 1]."""
    if torch.is_tensor(frame):
        frame = frame.detach().cpu().float()
        frame = frame.permute(1, 2, 0) if frame.dim() == 3 and frame.shape[0] == 3 else frame
        frame = frame.numpy()
    image = np.asarray(frame)
    if image.dtype == np.uint8:
        image = image.astype(np.float32) / 255.0
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an RGB frame (H, W, 3), got shape {image.shape}")
    return np.clip(image.astype(np.float32), 0.0, 1.0)


def _overlay(ax, image, values, title, colorbar_label: Optional[str] = None):
    """``values`` (h, w) upsampled over ``image`` (H, W, 3); with ``colorbar_label`` a colour
    bar in the map's own units (its minimum to its maximum)."""
    H, W = image.shape[:2]
    values = np.asarray(values, dtype=np.float32)
    ax.imshow(image)
    heat = cv2.resize(values, (W, H), interpolation=cv2.INTER_LINEAR)
    low, high = float(values.min()), float(values.max())
    if high - low <= 1e-6 * max(abs(low), abs(high), 1e-30):  # a flat map: its value mid-scale
        half = 0.05 * max(abs(low), 1e-6)
        low, high = low - half, high + half
    mappable = ax.imshow(heat, cmap="jet", alpha=OVERLAY_ALPHA, vmin=low, vmax=high)
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    if colorbar_label:
        from matplotlib.ticker import ScalarFormatter

        bar = ax.figure.colorbar(mappable, ax=ax, fraction=0.046, pad=0.03)
        bar.formatter = ScalarFormatter(useOffset=False)  # plain values, no "1e-13+0.5" offset
        bar.update_ticks()
        bar.set_label(colorbar_label, fontsize=8)
        bar.ax.tick_params(labelsize=7)


# ----------------------------------------------------------------------------- pictures

def plot_training_curves(metrics: Union[str, Path, Mapping[str, Union[str, Path]]], path, *,
                         dpi: int = DEFAULT_DPI, title: Optional[str] = None) -> Path:
    """Loss per epoch (``train_epoch`` records: total loss solid, CE dashed) and top-1 per epoch
    (``val`` records: RGB+Flow solid, RGB dashed, Flow dotted; the training batches' RGB+Flow
    top-1 of ``train_epoch`` records, ``train_fused_top1``, thin dash-dot) for one metrics.jsonl or for
    {label: metrics.jsonl} of several runs (e.g. the variants). A resumed run's repeated epoch
    keeps its last record. 1200 × 450 pixels at dpi 100."""
    runs = {"": metrics} if isinstance(metrics, (str, Path)) else dict(metrics)
    fig = _figure((12, 4.5))
    ax_loss, ax_acc = fig.subplots(1, 2)
    colors = [f"C{i}" for i in range(10)]
    for i, (label, file) in enumerate(runs.items()):
        try:
            records = read_metrics(file)
        except (OSError, ValueError) as exc:
            raise CCSError(f"{file}: cannot read the metrics ({exc})") from None
        color, prefix = colors[i % len(colors)], f"{label} " if label else ""
        train = _per_epoch(records, "train_epoch")
        val = _per_epoch(records, "val")
        if train:
            epochs = sorted(train)
            ax_loss.plot(epochs, [train[e].get("loss") for e in epochs], "-o", color=color, ms=3, label=f"{prefix}loss")
            if any("ce" in train[e] for e in epochs):
                ax_loss.plot(epochs, [train[e].get("ce") for e in epochs], "--", color=color, label=f"{prefix}CE")
            if any("train_fused_top1" in train[e] for e in epochs):
                ax_acc.plot(epochs, [train[e].get("train_fused_top1") for e in epochs], "-.", color=color, lw=1,
                            label=f"{prefix}RGB+Flow (training batches)")
        if val:
            epochs = sorted(val)
            for key, style, name in (("fused_top1", "-o", "RGB+Flow"), ("rgb_top1", "--s", "RGB"),
                                     ("flow_top1", ":^", "Flow")):
                if any(key in val[e] for e in epochs):
                    ax_acc.plot(epochs, [val[e].get(key) for e in epochs], style, color=color, ms=3,
                                label=f"{prefix}{name}")
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="loss per epoch")
    ax_acc.set(xlabel="epoch", ylabel="top-1", title="top-1 per epoch (test split; training batches dash-dot)",
               ylim=(-0.02, 1.02))
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    return _save(fig, path, dpi)


def _per_epoch(records, split: str) -> dict:
    by_epoch = {}
    for record in records:
        if record.get("split") == split and "epoch" in record:
            by_epoch[int(record["epoch"])] = record
    return by_epoch


CELL_NUMBERS_UP_TO = 20  # classes up to which the counts are written in the cells
LABEL_SPACING_PT = 7.0  # tick labels (6 pt type) at least this far apart; every k-th class otherwise


def confusion_figsize(n: int) -> tuple[float, float]:
    """Inches of the two-panel confusion picture of ``n`` classes: 12 × 5.5 up to 20 classes,
    then 0.12 inch per class and panel (101 classes: 2 panels of 12.1 inches + labels), at
    most 16 inches a panel (133 classes; beyond, every k-th class is named)."""
    if n <= CELL_NUMBERS_UP_TO:
        return 12.0, 5.5
    side = min(0.12 * n, 16.0)
    return 2 * side + 5.0, side + 2.5


def label_step(n: int, panel_inches: float) -> int:
    """Label every k-th class so that tick labels stay ``LABEL_SPACING_PT`` apart."""
    spacing = panel_inches * 72.0 / max(n, 1)
    return max(1, int(np.ceil(LABEL_SPACING_PT / spacing)))


def plot_confusion_matrix(matrix, class_names: Sequence[str], path, *, dpi: int = DEFAULT_DPI,
                          title: Optional[str] = None) -> Path:
    """Counts (left, integer ticks on its colour bar) and row-normalised recall (right) of
    ``matrix`` [true][predicted], with class names on the axes (every k-th where they would
    overprint, ``label_step``) and the numbers written in the cells up to 20 classes.
    1200 × 550 pixels at dpi 100 up to 20 classes, larger beyond (``confusion_figsize``:
    2924 × 1462 at 101 classes)."""
    from matplotlib.ticker import MaxNLocator

    counts = np.asarray(matrix)
    n = counts.shape[0]
    if counts.shape != (n, n) or len(class_names) != n:
        raise ValueError(f"a {counts.shape} matrix needs {counts.shape[0]} class names, got {len(class_names)}")
    figsize = confusion_figsize(n)
    fig = _figure(figsize)
    fig.set_layout_engine("constrained")
    axes = fig.subplots(1, 2)
    step = label_step(n, figsize[1] - 2.5) if n > CELL_NUMBERS_UP_TO else 1
    ticks = list(range(0, n, step))
    labels = [class_names[i] for i in ticks]
    fontsize = 7 if n <= CELL_NUMBERS_UP_TO else 6
    every = "" if step == 1 else f" (every {step}th class named)"
    for ax, values, name, fmt in ((axes[0], counts, "videos (count)", "{:d}"),
                                  (axes[1], row_normalised(counts), "share of the true class (recall)", "{:.2f}")):
        image = ax.imshow(values, cmap="Blues", vmin=0, vmax=None if values is counts else 1.0,
                          interpolation="nearest")
        bar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.02)
        if values is counts:
            bar.locator = MaxNLocator(integer=True)
            bar.update_ticks()
        ax.set(title=name, xlabel=f"predicted class{every}", ylabel=f"true class{every}")
        ax.set_xticks(ticks)
        ax.set_yticks(ticks)
        ax.set_xticklabels(labels, rotation=90, fontsize=fontsize)
        ax.set_yticklabels(labels, fontsize=fontsize)
        if n <= CELL_NUMBERS_UP_TO:
            limit = (values.max() if values is counts else 1.0) / 2  # half the colour scale
            for i in range(n):
                for j in range(n):
                    text = fmt.format(int(values[i, j]) if values is counts else float(values[i, j]))
                    ax.text(j, i, text, ha="center", va="center", fontsize=6,
                            color="white" if values[i, j] > limit else "black")
    if title:
        fig.suptitle(title, fontsize=11)
    return _save(fig, path, dpi)


def plot_attention(frame, to_flow: np.ndarray, to_rgb: np.ndarray, path, *, query_rgb: tuple[int, int],
                   query_flow: tuple[int, int], dpi: int = DEFAULT_DPI, title: Optional[str] = None) -> Path:
    """Two panels on the RGB frame: how the RGB position ``query_rgb`` (row, col of the h × w
    grid, marked × where it is) spreads its attention over the flow positions, and how the
    flow position ``query_flow`` (marked +) spreads its attention over the RGB positions;
    each (h, w) map upsampled to the frame, with a colour bar of the softmax weight. Pass one
    segment's slice of ``attention_maps``. 1000 × 480 pixels at dpi 100."""
    image = _as_rgb_image(frame)
    H, W = image.shape[:2]
    fig = _figure((10, 4.8))
    fig.set_layout_engine("constrained")
    axes = fig.subplots(1, 2)
    panels = ((axes[0], to_flow, query_rgb, "×", "RGB", "flow"),
              (axes[1], to_rgb, query_flow, "+", "flow", "RGB"))
    for ax, values, (r, c), marker, query, keys in panels:
        values = np.asarray(values)
        h, w = values.shape
        _overlay(ax, image, values, f"where the {query} position {marker} looks in the {keys} stream\n"
                                    f"(its attention over the {h}x{w} {keys} positions)", "attention weight")
        ax.plot([(c + 0.5) * W / w - 0.5], [(r + 0.5) * H / h - 0.5], "x" if marker == "×" else marker,
                color="white", ms=14, mew=3,
                label=f"query: {query} position (row {r}, col {c})")
        ax.set_xlim(-0.5, W - 0.5)
        ax.set_ylim(H - 0.5, -0.5)
        ax.legend(loc="lower left", fontsize=7, framealpha=0.7)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path, dpi)


def plot_cams(frame, cams: Mapping[str, np.ndarray], path, *, flow_image=None, dpi: int = DEFAULT_DPI,
              title: Optional[str] = None) -> Path:
    """One panel per stream (e.g. {"RGB": cam_f, "Flow": cam_o}, each an (h, w) CAM) over the RGB
    frame, as in the paper's Fig. 6, with a colour bar of the map's values, after a panel of
    the frame itself; ``flow_image`` (H, W) or (H, W, 2) adds a panel of the flow magnitude.
    Panels 3.5 inches wide (plus 0.6 per colour bar) and 3.8 high (at dpi 100: 350 px each)."""
    image = _as_rgb_image(frame)
    H, W = image.shape[:2]
    panels = 1 + len(cams) + (flow_image is not None)
    fig = _figure((3.5 * panels + 0.6 * len(cams), 3.8))
    fig.set_layout_engine("constrained")
    axes = np.atleast_1d(fig.subplots(1, panels))
    axes[0].imshow(image)
    axes[0].set_title("the frame shown", fontsize=9)
    axes[0].set_axis_off()
    i = 1
    if flow_image is not None:
        flow = np.asarray(flow_image, dtype=np.float32)
        magnitude = np.sqrt((flow ** 2).sum(axis=-1)) if flow.ndim == 3 else np.abs(flow)
        axes[i].imshow(magnitude, cmap="gray")
        axes[i].set_title("motion: flow magnitude\n(brighter = faster)", fontsize=9)
        axes[i].set_axis_off()
        i += 1
    for name, cam in cams.items():
        cam = cam.detach().cpu().float().numpy() if torch.is_tensor(cam) else np.asarray(cam)
        _overlay(axes[i], image, cam, f"where the {name} stream sees the class\n(class activation map)",
                 "contribution to the class logit")
        i += 1
    if title:
        fig.suptitle(title)
    return _save(fig, path, dpi)

"""Pictures and their numbers: confusion matrix, CAM, folded linear heads, attention maps, PNG files."""
import json
import struct

import numpy as np
import pytest
import torch
from torch import nn

from ccs_fast.viz import attention_maps, class_activation_maps, linear_chain_weight, row_normalised, upsample_map


def _png_size(path):
    with open(path, "rb") as f:
        header = f.read(24)
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", header[16:24])  # IHDR width, height


def test_row_normalised_rows_sum_to_one():
    matrix = np.random.default_rng().integers(0, 9, (5, 5))
    matrix[2] = 0  # a class with no test video keeps a row of zeros
    recall = row_normalised(matrix.tolist())
    np.testing.assert_allclose(recall.sum(axis=1), [1, 1, 0, 1, 1])
    np.testing.assert_allclose(recall[0], matrix[0] / matrix[0].sum())


def test_cam_mean_is_the_linear_logit():
    features = torch.randn(3, 8, 4, 5)
    head = nn.Linear(8, 6)
    classes = torch.tensor([0, 5, 2])
    cams = class_activation_maps(features, head.weight, classes, bias=head.bias)
    assert cams.shape == (3, 4, 5)
    logits = head(features.mean(dim=(2, 3)))
    torch.testing.assert_close(cams.mean(dim=(1, 2)), logits[torch.arange(3), classes])
    # one class for all, 3-D maps
    video = torch.randn(2, 8, 3, 4, 4)
    cams3d = class_activation_maps(video, head.weight, 4)
    torch.testing.assert_close(cams3d, torch.einsum("ncthw,c->nthw", video, head.weight[4]))


def test_linear_chain_folds_projection_bn_and_classifier():
    chain = nn.Sequential(nn.Linear(8, 6), nn.BatchNorm1d(6), nn.Dropout(0.5), nn.Linear(6, 4))
    with torch.no_grad():
        chain[1].running_mean.uniform_(-1, 1)
        chain[1].running_var.uniform_(0.5, 2)
        chain[1].weight.uniform_(0.5, 2)
        chain[1].bias.uniform_(-1, 1)
    chain.eval()
    x = torch.randn(5, 8)
    W, b = linear_chain_weight(chain)
    torch.testing.assert_close(x @ W.t() + b, chain(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="not a linear layer"):
        linear_chain_weight(nn.ReLU())


def test_attention_maps_are_the_row_and_column_softmax():
    grid = (2, 3, 4)
    q, k = torch.randn(24, 16), torch.randn(24, 16)
    to_flow, to_rgb = attention_maps(q, k, query_rgb=7, query_flow=13, grid=grid)
    S = (q @ k.t()) / 4.0
    assert to_flow.shape == to_rgb.shape == grid
    np.testing.assert_allclose(to_flow.reshape(-1), S.softmax(dim=1)[7].numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(to_rgb.reshape(-1), S.softmax(dim=0)[:, 13].numpy(), rtol=1e-5, atol=1e-7)
    assert abs(to_flow.sum() - 1) < 1e-5 and abs(to_rgb.sum() - 1) < 1e-5
    with pytest.raises(ValueError, match="positions"):
        attention_maps(q, k, 0, 0, grid=(5, 5))


def test_upsample_map_range_and_peak():
    values = np.random.rand(4, 4) * 0.5
    values[np.random.randint(4), np.random.randint(4)] = 1.0  # one clear peak
    up = upsample_map(values, 32, 48)
    assert up.shape == (32, 48) and up.min() == 0.0 and up.max() == pytest.approx(1.0)
    r, c = np.unravel_index(values.argmax(), values.shape)
    ur, uc = np.unravel_index(up.argmax(), up.shape)
    assert abs(ur / 32 * 4 - (r + 0.5)) <= 1 and abs(uc / 48 * 4 - (c + 0.5)) <= 1


def test_pictures_written_at_their_size(tmp_path):
    pytest.importorskip("matplotlib")
    from ccs_fast.viz import plot_attention, plot_cams, plot_confusion_matrix, plot_training_curves

    rng = np.random.default_rng()
    runs = {}
    for variant in ("baseline", "all"):
        lines = []
        for epoch in range(1, 4):
            lines.append({"split": "train_epoch", "step": epoch * 10, "epoch": epoch, "loss": float(rng.random()),
                          "ce": float(rng.random())})
            lines.append({"split": "val", "step": epoch * 10, "epoch": epoch, "rgb_top1": float(rng.random()),
                          "flow_top1": float(rng.random()), "fused_top1": float(rng.random())})
        file = tmp_path / variant / "metrics.jsonl"
        file.parent.mkdir()
        file.write_text("".join(json.dumps(r) + "\n" for r in lines))
        runs[variant] = file
    curves = plot_training_curves(runs, tmp_path / "curves.png")
    assert _png_size(curves) == (1200, 450)

    matrix = rng.integers(0, 12, (4, 4)).tolist()
    confusion = plot_confusion_matrix(matrix, ["a", "b", "c", "d"], tmp_path / "confusion.png")
    assert _png_size(confusion) == (1200, 550)

    frame = rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)
    to_flow, to_rgb = attention_maps(torch.randn(2 * 4 * 5, 8), torch.randn(2 * 4 * 5, 8), 3, 17, (2, 4, 5))
    attention = plot_attention(frame, to_flow[0], to_rgb[0], tmp_path / "sub" / "attention.png",
                               query_rgb=(0, 3), query_flow=(3, 2))
    assert _png_size(attention) == (1000, 480)

    cams = {"RGB": torch.randn(4, 5), "Flow": rng.random((4, 5))}
    cam = plot_cams(torch.rand(3, 64, 80), cams, tmp_path / "cam.png", flow_image=rng.normal(size=(64, 80, 2)))
    assert _png_size(cam) == (350 * 4 + 2 * 60, 380)
    assert not list(tmp_path.rglob(".*.tmp"))  # written through temporary files, none left


def test_missing_matplotlib_is_one_clear_line(monkeypatch, tmp_path):
    import sys

    from ccs_fast.base.errors import CCSError
    from ccs_fast.viz import plot_cams

    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails as if not installed
    with pytest.raises(CCSError, match=r"pip install 'ccs_fast\[viz\]'"):
        plot_cams(np.zeros((8, 8, 3), np.uint8), {"RGB": np.random.rand(2, 2)}, tmp_path / "cam.png")
    assert not (tmp_path / "cam.png").exists()


def _axes_of(monkeypatch):
    """Record every figure ``viz`` saves (instead of reading pixels back)."""
    import ccs_fast.viz as viz

    saved = []
    real = viz._save
    monkeypatch.setattr(viz, "_save", lambda fig, path, dpi: saved.append(fig) or real(fig, path, dpi))
    return saved


def test_confusion_matrix_readable_at_101_classes(tmp_path, monkeypatch):
    """Issue 22 #7: at UCF-101's 101 classes the canvas grows with the classes, every tick
    label keeps its own room (no overprinted band), the counts' colour bar has integer ticks
    and the picture has a title."""
    pytest.importorskip("matplotlib")
    from ccs_fast.viz import plot_confusion_matrix

    saved = _axes_of(monkeypatch)
    rng = np.random.default_rng()
    n = 101
    matrix = rng.integers(0, 3, (n, n)) * (rng.random((n, n)) < 0.05)
    matrix[np.arange(n), np.arange(n)] = rng.integers(20, 45, n)
    names = [f"Class{i:03d}With{'Long' * int(rng.integers(1, 4))}Name" for i in range(n)]
    path = plot_confusion_matrix(matrix, names, tmp_path / "c.png", title="RGB+Flow, 101 classes")
    width, height = _png_size(path)
    assert width >= 2800 and height >= 1400
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = saved[-1]
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    counts_ax, recall_ax = fig.axes[:2]
    for ax in (counts_ax, recall_ax):
        labels = [t for t in ax.get_yticklabels() if t.get_text()]
        assert [t.get_text() for t in labels] == names  # every class named at 101 classes
        boxes = sorted((t.get_window_extent(renderer) for t in labels), key=lambda b: b.y0)
        assert all(a.y1 <= b.y0 + 0.5 for a, b in zip(boxes, boxes[1:]))  # no two labels overlap
    bar = fig.axes[2]  # the counts' colour bar
    ticks = [t for t in bar.get_yticks() if bar.get_ylim()[0] <= t <= bar.get_ylim()[1]]
    assert ticks and all(float(t).is_integer() for t in ticks)
    assert fig._suptitle is not None and fig._suptitle.get_text() == "RGB+Flow, 101 classes"


def test_confusion_counts_bar_has_integer_ticks_with_few_videos(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from ccs_fast.viz import plot_confusion_matrix

    saved = _axes_of(monkeypatch)
    matrix = np.random.default_rng().integers(0, 3, (3, 3))
    matrix[0, 0] = 3
    plot_confusion_matrix(matrix, ["HandstandPushups", "Archery", "Basketball"], tmp_path / "c.png")
    bar = saved[-1].axes[2]
    low, high = bar.get_ylim()
    assert all(float(t).is_integer() for t in bar.get_yticks() if low <= t <= high)
    assert [t.get_text() for t in saved[-1].axes[0].get_xticklabels()] == ["HandstandPushups", "Archery", "Basketball"]


def test_attention_and_cam_pictures_explain_themselves(tmp_path, monkeypatch):
    """Issue 22 #8: plain-word panel titles, a colour bar per map in the map's own units, the
    query marker at the query's cell centre."""
    pytest.importorskip("matplotlib")
    from ccs_fast.viz import plot_attention, plot_cams

    saved = _axes_of(monkeypatch)
    rng = np.random.default_rng()
    frame = rng.integers(0, 256, (70, 98, 3), dtype=np.uint8)
    to_flow, to_rgb = rng.random((5, 7)), rng.random((5, 7))
    plot_attention(frame, to_flow, to_rgb, tmp_path / "a.png", query_rgb=(1, 5), query_flow=(4, 0))
    fig = saved[-1]
    panels = [ax for ax in fig.axes if ax.get_images()]
    assert len(panels) == 2 and len(fig.axes) == 4  # two maps, two colour bars
    assert "the RGB position ×" in panels[0].get_title() and "in the flow stream" in panels[0].get_title()
    assert "the flow position +" in panels[1].get_title() and "in the RGB stream" in panels[1].get_title()
    for ax, values, (r, c) in ((panels[0], to_flow, (1, 5)), (panels[1], to_rgb, (4, 0))):
        x, y = ax.lines[0].get_data()
        assert (x[0], y[0]) == pytest.approx(((c + 0.5) * 98 / 7 - 0.5, (r + 0.5) * 70 / 5 - 0.5))
        assert ax.get_images()[1].get_clim() == pytest.approx((values.min(), values.max()), rel=1e-6)
    plot_cams(frame, {"RGB": rng.normal(size=(5, 7)), "Flow": np.full((1, 1), rng.normal())}, tmp_path / "c.png")
    titles = [ax.get_title() for ax in saved[-1].axes]
    assert sum("where the RGB stream" in t or "where the Flow stream" in t for t in titles) == 2
    assert sum(ax.get_ylabel() == "contribution to the class logit" for ax in saved[-1].axes) == 2
    # a flat map (a 1x1 grid) gets a readable scale around its value, not an offset of 1e-13
    flat_bar = saved[-1].axes[-1]
    low, high = flat_bar.get_ylim()
    assert high - low > 1e-7 and not flat_bar.yaxis.get_offset_text().get_text()

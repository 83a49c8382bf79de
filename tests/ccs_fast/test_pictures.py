"""Pictures of a trained model (ccs_fast/pictures.py): CAM weights against the model's logits,
attention maps against the connection block's own projections, and the demo's report with
its pictures on a tiny data set."""
import json

import pytest
import torch

from ccs_fast.config import ModelConfig
from ccs_fast.base.errors import CCSError
from ccs_fast.model import build_model
from ccs_fast.pictures import head_weights, write_attention, write_cams
from ccs_fast.viz import class_activation_maps

pytest.importorskip("timm")
B, K, S, CLASSES = 2, 3, 32, 3


def tiny_model(variant, **fields):
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="timm:test_resnet", num_classes=CLASSES, num_segments=K, flow_length=1,
                                    variant=variant, embed_dim=8, impl="eager", cb_gamma_init=1.0, **fields))
    if model.uses_shared_block:  # running statistics away from (0, 1): the BN fold is not the identity
        bn = model.projection[1]
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    return model.eval()


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"rgb": torch.randn(B, K, 3, S, S, generator=g), "flow": torch.randn(B, K, 2, S, S, generator=g),
            "label": torch.tensor([2, 0]), "index": torch.tensor([7, 9])}


@pytest.mark.parametrize("variant", ["baseline", "all"])
def test_cam_mean_over_segments_and_positions_is_the_logit(variant):
    model = tiny_model(variant)
    data = batch()
    with torch.no_grad():
        x_rgb, x_flow, b, k = model.feature_maps(data["rgb"], data["flow"])
        out = model.head_from_maps(x_rgb, x_flow, b, k)
    for stream, maps, key in (("rgb", x_rgb, "logits_f"), ("flow", x_flow, "logits_o")):
        W, bias = head_weights(model, stream)
        cams = class_activation_maps(maps, W, data["label"].repeat_interleave(K), bias)
        torch.testing.assert_close(cams.view(B, -1).mean(dim=1), out[key][torch.arange(B), data["label"]],
                                   rtol=1e-4, atol=1e-5)
    with pytest.raises(CCSError, match="model.consensus=avg"):
        head_weights(tiny_model(variant, consensus="max"), "rgb")


def test_attention_maps_are_the_blocks_row_and_column_softmax(monkeypatch, tmp_path):
    import ccs_fast.viz as viz

    model = tiny_model("cb")
    shown = {}
    monkeypatch.setattr(viz, "plot_attention", lambda frame, to_flow, to_rgb, path, **kw: shown.update(
        to_flow=to_flow, to_rgb=to_rgb, **kw) or path)
    full = {}
    real = viz.attention_maps
    monkeypatch.setattr(viz, "attention_maps", lambda *a, **kw: full.setdefault("maps", real(*a, **kw)))
    data = batch(1)
    paths = write_attention(model, [data], 1, tmp_path, device="cpu")
    assert [p.name for p in paths] == ["attention_7.png"]
    # reference: the last stage's maps of video 0 as the block's tokens, S = scale · φ(x_f) κ(x_o)ᵀ
    block = model.connections[str(model.num_stages)]
    with torch.no_grad():
        x_f = data["rgb"][:1].flatten(0, 1)
        x_o = data["flow"][:1].flatten(0, 1)
        for stage in range(model.num_stages):
            x_f, x_o = model.backbone_rgb.stages[stage](x_f), model.backbone_flow.stages[stage](x_o)
        h, w = x_f.shape[2:]
        to_tokens = model.backbone_rgb.to_tokens
        q, key = block.phi(to_tokens(x_f, 1)[0]), block.kappa(to_tokens(x_o, 1)[0])
        scores = (q @ key.T) * q.shape[1] ** -0.5
    centre = (K // 2) * h * w + (h // 2) * w + w // 2
    to_flow, to_rgb = full["maps"]
    torch.testing.assert_close(torch.from_numpy(to_flow).flatten(), scores[centre].softmax(0).float(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(torch.from_numpy(to_rgb).flatten(), scores[:, centre].softmax(0).float(), rtol=1e-4, atol=1e-6)
    assert (shown["to_flow"] == to_flow[K // 2]).all() and shown["query_rgb"] == (h // 2, w // 2)
    with pytest.raises(CCSError, match="need a connection block"):
        write_attention(tiny_model("cs"), [data], 1, tmp_path, device="cpu")


def test_cams_written_for_distinct_classes_first(tmp_path):
    pytest.importorskip("matplotlib")
    model = tiny_model("all")
    data = batch(2)
    data["label"] = torch.tensor([1, 1])
    second = batch(3)  # labels 2, 0
    second["index"] = torch.tensor([11, 12])
    paths = write_cams(model, [data, second], 3, tmp_path, device="cpu", class_names=["a", "b", "c"])
    # video 9 repeats class b, so the classes not seen yet (videos 11, 12) come before it
    assert [p.name for p in paths] == ["cam_7.png", "cam_11.png", "cam_12.png"]
    assert all(p.stat().st_size > 1000 for p in paths)


@pytest.fixture
def one_thread():
    """Tiny tensors: more intra-op threads only contend with the other processes of a shared
    CPU (measured: this test took 20 s with 2 threads on a loaded 2-core machine, 2 s with 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_demo_report_has_table3_and_links_its_pictures(tmp_path, capsys, one_thread):
    """run_demo on a tiny data set (variant cb, 1 epoch, a 0.4 M-parameter backbone): the
    Table 3 layout with seed and wall time, and every linked picture exists (or, without
    matplotlib, the report says the pictures were skipped)."""
    import re

    from ccs_fast.demo import parse_variants, run_demo

    assert parse_variants("cb, baseline,cb") == ("cb", "baseline")
    with pytest.raises(CCSError, match="--variants 'base'"):
        parse_variants("base")
    out = tmp_path / "demo"
    report = run_demo(out, seed=1, workers=0, variants=("cb",),
                      dataset=dict(classes=2, videos_per_cell=2, val_videos_per_cell=1, frames=8, size=32,
                                   flow="farneback"),
                      config_overrides={"model.backbone": "timm:test_resnet", "model.cb_stages": [-1], "model.num_classes": 2,
                                        "model.embed_dim": 8, "optim.epochs": 1, "data.input_size": 32,
                                        "data.test_segments": 2, "data.batch_size": 4, "data.classes_per_batch": 2,
                                        "data.eval_batch_size": 4, "data.num_workers": 0, "train.progress": False,
                                        "train.tensorboard": False, "train.channels_last": False})
    text = (out / "report.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert [row.split("|")[1].strip() for row in rows] == ["`cb`"]
    assert all(row.split("|")[6].strip() == "1" and row.split("|")[7].strip().endswith("s") for row in rows)
    assert json.loads((out / "report.json").read_text())["variants"]["cb"] == report["variants"]["cb"]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "Pictures skipped: matplotlib is not installed" in text
        return
    links = re.findall(r"!\[[^]]*\]\(([^)]+)\)", text)
    assert {"training_curves.png", "cb/confusion.png"} <= set(links)
    assert any(link.startswith("cams/") for link in links) and any(link.startswith("attention/") for link in links)
    assert all((out / link).is_file() for link in links)


def test_cam_and_attention_pictures_name_the_video_and_segment(tmp_path, monkeypatch):
    """Issue 22 #8: the title names the video (its list path) and the segment shown, not
    "video 0"; the file name carries the video's name."""
    import ccs_fast.viz as viz

    titles = []
    for name in ("plot_cams", "plot_attention"):
        real = getattr(viz, name)
        monkeypatch.setattr(viz, name, lambda *a, _real=real, **kw: titles.append(kw["title"]) or _real(*a, **kw))
    pytest.importorskip("matplotlib")
    model = tiny_model("all")
    data = batch(1)
    names = [f"Class/v_{i}" for i in range(8)]
    names[7] = "Archery/v_Archery_g01_c01"
    cams = write_cams(model, [data], 1, tmp_path / "cams", device="cpu", class_names=["a", "b", "c"], videos=names)
    attention = write_attention(model, [data], 1, tmp_path / "att", device="cpu", class_names=["a", "b", "c"],
                                videos=names)
    assert [p.name for p in cams] == ["cam_7_Archery_v_Archery_g01_c01.png"]
    assert [p.name for p in attention] == ["attention_7_Archery_v_Archery_g01_c01.png"]
    assert all(t.startswith("Archery/v_Archery_g01_c01") and f"segment {K // 2 + 1} of {K}" in t for t in titles)
    assert "where each stream finds the class" in titles[0] and "attention" in titles[1]


def test_3d_pictures_show_the_middle_frame_of_the_middle_clip(tmp_path, monkeypatch):
    """A 3-D model's inputs are clips: the picture shows frame T/2 of clip N/2 (position
    k·T + T/2 on the batch's frame axis) and names the clip and its time step."""
    import ccs_fast.viz as viz
    from ccs_fast.pictures import rgb_frame

    shown = []
    for name in ("plot_cams", "plot_attention"):
        monkeypatch.setattr(viz, name, lambda frame, *a, **kw: shown.append((frame, kw["title"])) or a[-1])
    clips, T = 3, 2
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="i3d_resnet18", num_classes=CLASSES, num_segments=clips, clip_len=T,
                                    variant="all", embed_dim=8, impl="eager", cb_gamma_init=1.0)).eval()
    g = torch.Generator().manual_seed(0)
    data = {"rgb": torch.randn(1, clips * T, 3, S, S, generator=g), "flow": torch.randn(1, clips * T, 2, S, S, generator=g),
            "label": torch.tensor([1]), "index": torch.tensor([4])}
    write_cams(model, [data], 1, tmp_path, device="cpu")
    write_attention(model, [data], 1, tmp_path, device="cpu")
    middle = rgb_frame(data["rgb"][0, (clips // 2) * T + T // 2])
    assert all((frame == middle).all() for frame, _ in shown) and len(shown) == 2
    assert f"clip {clips // 2 + 1} of {clips}" in shown[0][1] and f"clip {clips // 2 + 1}, time step" in shown[1][1]

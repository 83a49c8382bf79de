"""Evaluation: top-1/top-5 on hand-built logits, late fusion, checkpoint evaluation and
per-video predictions."""
import json

import pytest
import torch

from ccs_fast.checkpoint import save_checkpoint
from ccs_fast.base.errors import CCSError
from ccs_fast.evaluate import average_view_scores, evaluate, evaluate_checkpoint, format_table, fuse_scores
from ccs_fast.predict import predict_list


class FixedLogits(torch.nn.Module):
    """Returns the logits stored for each batch, looked up by the batch's first index."""

    def __init__(self, logits_f, logits_o):
        super().__init__()
        self.logits_f, self.logits_o = logits_f, logits_o

    def forward(self, rgb, flow):
        rows = rgb[:, 0, 0, 0, 0].long()  # the test stores each row's index in the input
        return {"logits_f": self.logits_f[rows], "logits_o": self.logits_o[rows],
                "z_f": torch.zeros(len(rows), 2), "z_o": torch.zeros(len(rows), 2)}


class ListLoader(list):
    """Fixed batches with the members of a ``dataloader.Loader`` that ``evaluate`` reads."""

    def __init__(self, batches, num_classes=None, skipped_errors=None):
        super().__init__(batches)
        self.num_videos = sum(len(b["index"]) for b in batches)
        self.num_classes = num_classes
        self.batches_done = 0
        self.skipped_errors = dict(skipped_errors or {})
        self.num_skipped = len(self.skipped_errors)
        self.frame_count = None

    def set_epoch(self, epoch, first_batch=0):
        pass

    def close(self):
        pass


def _loader(labels, batch_size):
    batches = []
    for start in range(0, len(labels), batch_size):
        idx = torch.arange(start, min(start + batch_size, len(labels)))
        rgb = idx.float().view(-1, 1, 1, 1, 1).expand(-1, 2, 3, 4, 4).contiguous()
        batches.append({"rgb": rgb, "flow": torch.zeros(len(idx), 2, 2, 4, 4),
                        "label": labels[idx], "index": idx})
    return ListLoader(batches)


def test_loader_fake_is_a_loader():
    from ccs_fast.dataloader import Loader

    assert isinstance(_loader(torch.tensor([0, 1]), 1), Loader)


def test_average_view_scores():
    scores = torch.randn(4 * 3, 6)
    expected = scores.view(4, 3, 6).mean(1)
    torch.testing.assert_close(average_view_scores(scores, 3), expected)
    torch.testing.assert_close(average_view_scores(scores.view(4, 3, 6)), expected)
    with pytest.raises(ValueError, match="num_views"):
        average_view_scores(scores, 5)


def test_topk_by_hand():
    # 7 videos, 6 classes, last batch partial. Ranks of the true label per stream:
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 0])
    rank_f = [0, 0, 1, 4, 5, 0, 2]  # top-1 hits: 3/7, top-5 hits: 6/7
    rank_o = [1, 0, 0, 0, 3, 5, 5]  # top-1 hits: 3/7, top-5 hits: 5/7
    order = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0, 0.0])

    def logits_with_rank(ranks):
        out = torch.empty(len(labels), 6)
        for i, (y, r) in enumerate(zip(labels.tolist(), ranks)):
            others = [c for c in range(6) if c != y]
            classes = others[:r] + [y] + others[r:]
            out[i, classes] = order
        return out

    model = FixedLogits(logits_with_rank(rank_f), logits_with_rank(rank_o))
    result = evaluate(model, _loader(labels, 3), "cpu", "fp32", (1.0, 0.0))
    assert result["num_videos"] == 7
    # mean class accuracy: per-class recall averaged over the 6 classes (class 0 has 2 videos)
    assert result["rgb"] == pytest.approx({"top1": 3 / 7, "top5": 6 / 7, "mean_class": (0.5 + 1 + 0 + 0 + 0 + 1) / 6})
    assert result["flow"] == pytest.approx({"top1": 3 / 7, "top5": 5 / 7, "mean_class": (0 + 1 + 1 + 1 + 0 + 0) / 6})
    assert result["fused"] == result["rgb"]  # weights 1:0 is the RGB stream alone
    assert result["num_classes"] == 6


def test_top5_is_top_c_with_few_classes():
    labels = torch.tensor([0, 1, 2, 1])
    logits = torch.randn(4, 3)
    result = evaluate(FixedLogits(logits, logits), _loader(labels, 2), "cpu", "fp32")
    assert result["rgb"]["top5"] == 1.0 and result["fused"]["top5"] == 1.0


def test_fused_is_weighted_softmax_sum():
    torch.manual_seed(0)
    logits_f, logits_o = torch.randn(5, 4), torch.randn(5, 4) * 3
    scores = fuse_scores(logits_f, logits_o, (0.3, 1.7))
    expected = (0.3 * torch.softmax(logits_f, -1) + 1.7 * torch.softmax(logits_o, -1)) / 2.0
    torch.testing.assert_close(scores["fused"], expected)
    torch.testing.assert_close(scores["fused"].sum(-1), torch.ones(5))  # a distribution (issue 22 #4)
    torch.testing.assert_close(scores["rgb"], torch.softmax(logits_f, -1))
    # A case where the fusion picks a class neither stream ranks first.
    lf = torch.tensor([[2.0, 0.0, 1.9]]).log()
    lo = torch.tensor([[0.0, 2.0, 1.9]]).log()
    assert fuse_scores(lf, lo)["fused"].argmax().item() == 2
    labels = torch.tensor([2])
    result = evaluate(FixedLogits(lf, lo), _loader(labels, 1), "cpu", "fp32", (1.0, 1.0))
    assert (result["rgb"]["top1"], result["flow"]["top1"], result["fused"]["top1"]) == (0.0, 0.0, 1.0)


def test_evaluate_restores_training_mode():
    model = FixedLogits(torch.randn(2, 3), torch.randn(2, 3)).train()
    evaluate(model, _loader(torch.tensor([0, 1]), 2), "cpu", "fp32")
    assert model.training


def test_format_table():
    result = {s: {"top1": 0.5, "top5": 0.875, "mean_class": 0.25} for s in ("rgb", "flow", "fused")}
    lines = format_table({**result, "num_classes": 6}).splitlines()
    assert lines[0] == "| | RGB | Flow | RGB+Flow |"
    assert lines[2] == "| top-1 | 50.00 | 50.00 | 50.00 |"
    assert lines[3].startswith("| mean class accuracy | 25.00") and lines[4].startswith("| top-5 | 87.50")
    # issue 22 #9: with at most 5 classes top-5 is 100 % by construction and not shown
    assert [line.split("|")[1].strip() for line in format_table({**result, "num_classes": 5}).splitlines()[2:]] == [
        "top-1", "mean class accuracy"]


def test_most_confused_pairs():
    from ccs_fast.evaluate import most_confused_markdown, most_confused_pairs

    rng = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    C = 7
    matrix = torch.randint(0, 3, (C, C), generator=rng)
    matrix.fill_diagonal_(20)
    matrix[4, 2], matrix[1, 6] = 9, 8  # the two largest off-diagonal cells
    names = [f"class_{i}" for i in range(C)]
    pairs = most_confused_pairs(matrix.tolist(), names, count=3)
    assert [(p["true"], p["predicted"], p["videos"]) for p in pairs[:2]] == [("class_4", "class_2", 9),
                                                                           ("class_1", "class_6", 8)]
    assert pairs[0]["share"] == pytest.approx(9 / matrix[4].sum().item())
    assert len(pairs) == 3 and all(p["true"] != p["predicted"] for p in pairs)
    text = most_confused_markdown(pairs)
    assert "| class_4 | class_2 | 9 |" in text
    assert most_confused_pairs(torch.eye(3).tolist()) == []


@pytest.fixture
def tiny_checkpoint(tiny_config, tmp_path, monkeypatch):
    pytest.importorskip("timm")
    from ccs_fast.model import build_model

    cfg = tiny_config(tmp_path)
    cfg.model.num_classes = 5
    cfg.data.batch_size = 3
    torch.manual_seed(0)
    path = save_checkpoint(tmp_path / "last.pt", build_model(cfg.model), config=cfg.to_dict())
    return cfg, path


def test_evaluate_checkpoint_and_predict(tiny_checkpoint, tmp_path, capsys):
    cfg, path = tiny_checkpoint
    result = evaluate_checkpoint(None, path, out_json=tmp_path / "eval.json", out_md=tmp_path / "eval.md")
    assert result["num_videos"] == 6 and result["segments"] == 2
    assert json.loads((tmp_path / "eval.json").read_text())["fused"] == result["fused"]
    md = (tmp_path / "eval.md").read_text()
    # Table 1 layout; 5 classes: top-1 and mean class accuracy, no top-5 column (issue 22 #9)
    assert "| RGB top-1 | RGB mean class | Flow top-1 |" in md and "top-5" not in md
    assert "Protocol: 2 segments x centre crop" in md and "Most confused pairs (RGB+Flow)" in md
    assert result["class_names"] == ["0", "1", "2", "3", "4"]
    assert "RGB+Flow" in result["table"] and capsys.readouterr().out == ""  # the CLI prints

    summary = predict_list(cfg, path, None, tmp_path / "pred.jsonl", topk=3)
    rows = [json.loads(line) for line in (tmp_path / "pred.jsonl").read_text().splitlines()]
    assert summary["num_videos"] == len(rows) == 6
    assert set(rows[0]) == {"video", "label", "rgb", "flow", "fused"}  # predict_videos' layout
    for row in rows:
        for stream in ("rgb", "flow", "fused"):
            assert len(row[stream]) == 3 and all(c["class"] == str(c["index"]) for c in row[stream])
            assert row[stream][0]["probability"] >= row[stream][1]["probability"]
    assert summary["fused_top1"] == pytest.approx(
        sum(r["fused"][0]["index"] == r["label"]["index"] for r in rows) / 6)


def _nothing_left():
    """An eval loader whose every video was skipped as bad (skip_bad)."""
    loader = ListLoader([], skipped_errors={0: "v0/img_00001.jpg: cannot decode (corrupt or not an image)"})
    loader.num_skipped = 4
    return loader


def test_empty_evaluation_is_an_error():
    """Issue 11 #8: with every video skipped, evaluation printed 0.0000 (0 videos)."""
    model = FixedLogits(torch.randn(2, 3), torch.randn(2, 3))
    with pytest.raises(CCSError) as info:
        evaluate(model, _nothing_left(), "cpu", "fp32", source="val.txt")
    assert str(info.value) == ("val.txt: no video left to evaluate (4 skipped as bad); "
                               "e.g. v0/img_00001.jpg: cannot decode (corrupt or not an image)")


def test_nonfinite_outputs_are_an_error():
    logits = torch.randn(4, 3)
    logits[2, 1] = float("nan")
    with pytest.raises(CCSError, match="val.txt: the model's outputs are NaN or inf for 1 of 4 videos"):
        evaluate(FixedLogits(logits, torch.randn(4, 3)), _loader(torch.tensor([0, 1, 2, 0]), 3), "cpu", "fp32",
                 source="val.txt")


def test_checkpoint_of_a_diverged_model_is_refused(tiny_checkpoint, capsys):
    """Issue 11 #1: ``ccs-fast eval`` printed accuracies for a model with inf BN statistics."""
    from ccs_fast.cli import main

    cfg, path = tiny_checkpoint
    state = torch.load(path, weights_only=True)
    name = next(k for k in state["model"] if k.endswith("running_var"))
    state["model"][name].fill_(float("inf"))
    torch.save(state, path)
    with pytest.raises(CCSError, match=f"{path}: the checkpoint's model holds NaN or inf in 1 tensor"):
        evaluate_checkpoint(None, path)
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(path)]) == 2
    captured = capsys.readouterr()
    assert name in captured.err and "RGB+Flow" not in captured.out


def test_set_applies_on_top_of_the_checkpoints_config(tiny_checkpoint, tmp_path, capsys):
    """Issue 12 #3: ``eval --set`` rebuilt the config from the defaults (resnet50, 101
    classes), so the checkpoint was refused as "from another config"."""
    from ccs_fast.cli import main

    cfg, path = tiny_checkpoint
    assert main(["eval", "--checkpoint", str(path), "--set", "data.test_segments=3",
                 "--out", str(tmp_path / "eval")]) == 0
    assert json.loads((tmp_path / "eval" / "eval.json").read_text())["segments"] == 3
    out = tmp_path / "pred.jsonl"
    assert main(["predict", "--checkpoint", str(path), "--set", "data.eval_batch_size=2",
                 "--list", "", "--out", str(out)]) == 0
    assert len(out.read_text().splitlines()) == 2 * 2  # synthetic: 2 batches of eval_batch_size
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(path), "--set", "model.num_classes=7"]) == 2
    assert "checkpoint from another config" in capsys.readouterr().err


# ---------------------------------------------------------------------------- multi-crop, confusion, Table 1

def _view_loader(labels, views, batch_size):
    """Batches of B·V clips (a video's views contiguous) whose first pixel is the clip's row."""
    batches = []
    for start in range(0, len(labels), batch_size):
        idx = torch.arange(start, min(start + batch_size, len(labels)))
        rows = (idx[:, None] * views + torch.arange(views)).flatten()
        rgb = rows.float().view(-1, 1, 1, 1, 1).expand(-1, 2, 3, 4, 4).contiguous()
        batches.append({"rgb": rgb, "flow": torch.zeros(len(rows), 2, 2, 4, 4), "label": labels[idx],
                        "index": idx, "views": views})
    return ListLoader(batches)


@pytest.mark.parametrize("views", [3, 10])
def test_view_logits_are_averaged_before_the_softmax(views):
    """TSN: each stream's logits are averaged over a video's views, then softmaxed and fused;
    the confusion matrices count the resulting predictions (rows true, columns predicted)."""
    torch.manual_seed(views)
    labels = torch.randint(0, 4, (7,))
    logits_f, logits_o = torch.randn(7 * views, 4) * 3, torch.randn(7 * views, 4) * 3
    result = evaluate(FixedLogits(logits_f, logits_o), _view_loader(labels, views, 3), "cpu", "fp32")
    mean_f, mean_o = logits_f.view(7, views, 4).mean(1), logits_o.view(7, views, 4).mean(1)
    expected = fuse_scores(mean_f, mean_o)
    for stream in ("rgb", "flow", "fused"):
        predicted = expected[stream].argmax(-1)
        assert result[stream]["top1"] == pytest.approx((predicted == labels).float().mean().item())
        matrix = torch.zeros(4, 4, dtype=torch.int64)
        for y, p in zip(labels.tolist(), predicted.tolist()):
            matrix[y, p] += 1
        assert result["confusion_matrix"][stream] == matrix.tolist()
    assert result["num_videos"] == 7


def test_table1_over_several_checkpoints(tiny_checkpoint, tmp_path, capsys):
    """eval with two --checkpoint: a row per split and their mean (paper Table 1 layout)."""
    import shutil

    from ccs_fast.cli import main

    cfg, path = tiny_checkpoint
    second = tmp_path / "split2.pt"
    shutil.copy(path, second)
    assert main(["eval", "--checkpoint", str(path), "--checkpoint", str(second), "--set", "data.test_segments=3",
                 "--out", str(tmp_path / "eval")]) == 0
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    splits = list(report["splits"].values())
    assert len(splits) == 2 and report["protocol"]["segments"] == 3
    for stream in ("rgb", "flow", "fused"):
        assert report["mean"][stream]["top1"] == pytest.approx((splits[0][stream]["top1"] + splits[1][stream]["top1"]) / 2)
    md = (tmp_path / "eval" / "eval.md").read_text()
    assert "**Mean (2 splits)**" in md and md in printed and "Protocol: 3 segments x centre crop" in md
    assert main(["eval", "--checkpoint", str(path), "--checkpoint", str(second), "--list", "a.txt"]) == 2
    assert "2 --checkpoint but 1 --list" in capsys.readouterr().err


def test_eval_crops_confusion_and_pictures_on_rawframes(tiny_config, noise_rawframes, tmp_path, capsys):
    """ccs-fast eval --crops 3 --cam 2 --attention 1 on a rawframe list (torch backend):
    the protocol and the confusion matrix in eval.json, the pictures beside it (or a line
    saying they were skipped without matplotlib)."""
    pytest.importorskip("timm")
    from ccs_fast.cli import main
    from ccs_fast.model import build_model

    root, annotation = noise_rawframes(tmp_path, videos=4, classes=3)
    cfg = tiny_config(tmp_path / "run")
    cfg.model.num_classes, cfg.model.variant = 3, "all"
    cfg.data.backend, cfg.data.root, cfg.data.val_list = "torch", str(root), str(annotation)
    cfg.data.eval_batch_size = 2
    torch.manual_seed(0)
    path = save_checkpoint(tmp_path / "last.pt", build_model(cfg.model), config=cfg.validate().to_dict())
    out = tmp_path / "eval"
    assert main(["eval", "--checkpoint", str(path), "--crops", "3", "--cam", "2", "--attention", "1",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "eval.json").read_text())
    assert result["crops"] == 3 and result["protocol"]["crops"] == 3 and result["num_videos"] == 4
    assert "2 segments x 3 crops" in result["protocol"]["text"] and "[eval] protocol: 2 segments x 3 crops" in printed
    assert sum(map(sum, result["confusion_matrix"]["fused"])) == 4
    assert [sum(row) for row in result["confusion_matrix"]["rgb"]] == [2, 1, 1]  # labels v % 3
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "pictures skipped" in printed
        return
    assert (out / "confusion.png").is_file()
    assert len(list((out / "cams").glob("cam_*.png"))) == 2
    assert len(list((out / "attention").glob("attention_*.png"))) == 1


def test_predict_on_video_files_refuses_a_3d_model_in_one_line(tmp_path):
    from ccs_fast.config import Config
    from ccs_fast.predict import predict_videos

    cfg = Config()
    cfg.model.backbone, cfg.model.num_segments = "r3d_18", 1
    cfg.validate()
    path = tmp_path / "3d.pt"
    torch.save({"model": {}, "config": cfg.to_dict()}, path)
    with pytest.raises(CCSError, match=r"3d.pt: predict on video files samples 2-D TSN clips; a 3-D "
                                       r"model \(r3d_18\) predicts from prepared rawframes with --list"):
        predict_videos(None, path, [tmp_path / "v.mp4"])

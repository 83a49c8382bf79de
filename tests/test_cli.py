"""The ``ccs-fast`` command line: every subcommand's help, a tiny synth → train → eval →
predict run through ``main``, and bad input ending in one line on stderr with status 2."""
import json

import pytest
import torch

from ccs_fast.cli import build_parser, main
from ccs_fast.demo import format_report

SUBCOMMANDS = ("synth", "prepare", "train", "eval", "predict", "export", "bench", "demo")


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    assert "usage: ccs-fast " + command in capsys.readouterr().out


def test_synth_train_eval_predict(tmp_path, capsys):
    pytest.importorskip("timm")
    data = tmp_path / "data"
    assert main(["synth", "--out", str(data), "--classes", "2", "--videos-per-cell", "2",
                 "--val-videos-per-cell", "1", "--frames", "8", "--size", "32", "--flow", "farneback",
                 "--workers", "1"]) == 0
    sets = [
        f"data.root={data / 'rawframes'}",
        f"data.train_list={data / 'annotations' / 'train_rawframes.txt'}",
        f"data.val_list={data / 'annotations' / 'val_rawframes.txt'}",
        "model.backbone=timm:test_resnet", "model.num_classes=2", "model.embed_dim=8",
        "model.cb_stages=[-1]", "data.input_size=32", "data.batch_size=4", "data.classes_per_batch=2",
        "data.test_segments=3", "data.num_workers=0", "optim.epochs=1", "train.tensorboard=false",
    ]
    run = tmp_path / "run"
    args = ["train", "--config", "demo", "--out", str(run)]
    for item in sets:
        args += ["--set", item]
    assert main(args) == 0
    assert (run / "last.pt").exists() and (run / "config.yaml").exists() and (run / "metrics.jsonl").exists()

    # the same command again would replace the run: refused, one line (issue 11 #5)
    capsys.readouterr()
    assert main(args) == 2
    assert "output folder is not empty" in capsys.readouterr().err
    # --resume takes the checkpoint's config; --set may change what a resume may change (#7)
    assert main(["train", "--resume", str(run), "--set", "model.dropout=0.1"]) == 2
    err = capsys.readouterr().err
    assert "model.dropout 0.2 in the checkpoint, 0.1 now" in err and err.count("\n") == 1
    assert main(["train", "--resume", str(run / "last.pt"), "--set", "optim.epochs=2", "--set", "optim.lr=0.0005"]) == 0
    assert "changed on resume: optim.lr 0.001 -> 0.0005, optim.epochs 1 -> 2" in capsys.readouterr().out
    assert 'lr: 0.0005' in (run / "config.yaml").read_text()

    assert main(["eval", "--checkpoint", str(run / "last.pt"), "--out", str(tmp_path / "eval")]) == 0
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    for stream in ("rgb", "flow", "fused"):
        assert 0.0 <= result[stream]["top1"] <= result[stream]["top5"] <= 1.0
    assert "RGB+Flow" in (tmp_path / "eval" / "eval.md").read_text()

    out = tmp_path / "pred.jsonl"
    assert main(["predict", "--checkpoint", str(run / "last.pt"), "--out", str(out),
                 "--list", str(data / "annotations" / "val_rawframes.txt")]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    videos = (data / "annotations" / "val_rawframes.txt").read_text().splitlines()
    assert len(rows) == len(videos) and {"label", "rgb", "flow", "fused"} <= set(rows[0])
    # class names stored at training time, from the list's class folders
    names = torch.load(run / "last.pt", weights_only=True)["config"]["model"]["class_names"]
    assert names == sorted({line.split("/")[0] for line in videos}) and {r["class"] for r in rows} <= set(names)

    # predict on video files: a video synth wrote (VP9/VP8 WebM) and a 320x240 MPEG-4 .avi
    webm = sorted((data / "videos").rglob("*.webm"))[0]
    avi = tmp_path / "v_Other_g01_c01.avi"
    _write_video(avi, codec="mpeg4", width=320, height=240, frames=12)
    capsys.readouterr()
    out = tmp_path / "videos.jsonl"
    assert main(["predict", "--checkpoint", str(run), str(webm), str(avi), "--flow", "farneback",
                 "--topk", "2", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert str(webm) in table and str(avi) in table and "RGB+Flow" in table
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["video"] for r in rows] == [str(webm), str(avi)]
    for row in rows:
        for stream in ("rgb", "flow", "fused"):
            classes = row[stream]
            assert len(classes) == 2 and {c["class"] for c in classes} == set(names)
            assert classes[0]["p"] >= classes[1]["p"] and abs(sum(c["p"] for c in classes) - (
                2.0 if stream == "fused" else 1.0)) < 1e-4

    # export: weights and config only, smaller than last.pt, and predict reads it
    shared = tmp_path / "shared.pt"
    assert main(["export", "--checkpoint", str(run), "--out", str(shared)]) == 0
    state = torch.load(shared, weights_only=True)
    assert set(state) <= {"model", "config", "epoch", "step", "run_id", "best_metric", "exported_from"}
    assert shared.stat().st_size < (run / "last.pt").stat().st_size
    assert main(["predict", "--checkpoint", str(shared), str(webm), "--flow", "farneback"]) == 0
    assert str(webm) in capsys.readouterr().out
    assert main(["predict", "--checkpoint", str(shared), str(tmp_path / "missing.mp4")]) == 2
    assert capsys.readouterr().err.strip().endswith("missing.mp4: video not found")


def _write_video(path, *, codec, width, height, frames, fps=25):
    """A moving gradient as a video file written by PyAV (``codec``: mpeg4, libx264, ...)."""
    import av
    import numpy as np

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        x = np.arange(width)[None, :, None]
        for t in range(frames):
            image = ((x + 4 * t) % 256 + np.zeros((height, 1, 3))).astype(np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode(None))


@pytest.mark.parametrize("argv, match", [
    (["train", "--set", "model.nope=1"], "unknown config key model.nope"),
    (["train", "--config", "demo", "--set", "data.batch_size=0"], "--set: data.batch_size = 0: must be >= 1"),
    (["train", "--set", "optim.lr=-0.1"], "--set: optim.lr = -0.1: must be > 0"),
    (["train", "--set", "data.num_workers=-2"], "--set: data.num_workers = -2: must be >= 0"),
    (["train", "--set", "optim.epochs=0"], "--set: optim.epochs = 0: must be >= 1"),
    (["train", "--set", "model.cb_stages=[1,"], "--set 'model.cb_stages=[1,': the value is not valid YAML"),
    (["train", "--resume", "/nonexistent/run"], "/nonexistent/run: checkpoint not found"),
    (["train", "--config", "/nonexistent/cfg.yaml"], "cfg.yaml: config file not found"),
    (["eval", "--checkpoint", "/nonexistent/last.pt"], "last.pt: checkpoint not found"),
])
def test_bad_input_is_one_line_and_status_2(argv, match, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ccs-fast: error: ") and match in err and "\n" not in err


def test_bad_setting_writes_nothing(tmp_path, capsys):
    """Issue 11 #6: model.num_segments=0 crashed with a traceback after creating --out."""
    out = tmp_path / "run"
    assert main(["train", "--config", "demo", "--set", "model.num_segments=0", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "ccs-fast: error: --set: model.num_segments = 0: must be >= 1" and not out.exists()


def test_parser_lists_packaged_configs():
    text = build_parser().format_help()
    assert all(name in text for name in SUBCOMMANDS)


def test_demo_report_table():
    report = {"chance": 1 / 3, "classes": 3, "test_videos": 108, "seed": 0, "wall_s": 400.0,
              "variants": {"baseline": {"rgb": 0.3, "flow": 0.31, "fused": 0.32},
                           "all": {"rgb": 1.0, "flow": 0.99, "fused": 1.0}}}
    text = format_report(report)
    assert "| `all` | CCS: connection block + shared block, L1 + L2 + L3 | 100.0 | 99.0 | 100.0 | 0 | – |" in text
    assert "| `baseline` |" in text.split("| `all` |")[0] and "chance 0.333" in text  # paper Table 3 order

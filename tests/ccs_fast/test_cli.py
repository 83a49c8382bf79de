"""The ``ccs-fast`` command line: every subcommand's help, a tiny synth → train → eval →
predict run through ``main``, and bad input ending in one line on stderr with status 2."""
import json
import re
from pathlib import Path

import pytest
import yaml
import torch

from ccs_fast.cli import build_parser, main
from ccs_fast.demo import format_report

SUBCOMMANDS = ("synth", "prepare", "train", "eval", "predict", "config", "export", "bench", "demo")


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    assert "usage: ccs-fast " + command in capsys.readouterr().out


def test_synth_train_eval_predict(tmp_path, capsys, monkeypatch):
    timm = pytest.importorskip("timm")
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
    # weights named with ~, which no shell expands after = (issue 22 #1)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home" / "weights").mkdir(parents=True)
    torch.save(timm.create_model("test_resnet").state_dict(), tmp_path / "home" / "weights" / "test_resnet.pth")
    sets.append("model.pretrained=~/weights/test_resnet.pth")
    run = tmp_path / "run"
    args = ["train", "--config", "demo", "--out", str(run)]
    for item in sets:
        args += ["--set", item]
    capsys.readouterr()
    assert main(args) == 0
    assert (run / "last.pt").exists() and (run / "config.yaml").exists() and (run / "metrics.jsonl").exists()
    # the start line names the class count, the loader backend and the weights (issue 22 #1, #9)
    start = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("[train] run "))
    assert (f"2 classes, torch loader, timm:test_resnet streams from "
            f"{tmp_path / 'home' / 'weights' / 'test_resnet.pth'}") in start

    # the same command again would replace the run: refused, one line (issue 11 #5)
    capsys.readouterr()
    assert main(args) == 2
    assert "output folder is not empty" in capsys.readouterr().err
    # --resume takes the checkpoint's config; --set may change what a resume may change (#7)
    assert main(["train", "--resume", str(run), "--set", "model.dropout=0.1"]) == 2
    err = capsys.readouterr().err
    assert "model.dropout 0.2 in the checkpoint, 0.1 now" in err and err.count("\n") == 1
    assert main(["train", "--resume", str(run / "last.pt"), "--set", "optim.epochs=2", "--set", "optim.lr=0.0005"]) == 0
    demo_lr = yaml.safe_load((Path(__file__).resolve().parents[2] / "ccs_fast/configs/demo.yaml").read_text())["optim"]["lr"]
    assert f"changed on resume: optim.lr {demo_lr!r} -> 0.0005, optim.epochs 1 -> 2" in capsys.readouterr().out
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
    # --list rows: the video path and predict_videos' layout (issue 22 #4)
    assert len(rows) == len(videos) and [r["video"] for r in rows] == [line.split()[0] for line in videos]
    assert all(set(r) == {"video", "label", "rgb", "flow", "fused"} for r in rows)
    # class names stored at training time, from the list's class folders
    names = torch.load(run / "last.pt", weights_only=True)["config"]["model"]["class_names"]
    assert names == sorted({line.split("/")[0] for line in videos})
    assert all(r["label"]["class"] == names[int(line.split()[-1])] and r["label"]["class"] == line.split("/")[0]
               for r, line in zip(rows, videos))
    assert {c["class"] for r in rows for c in r["fused"]} <= set(names)

    # predict on video files: a video synth wrote (VP9/VP8 WebM) and a 320x240 MPEG-4 .avi
    webm = sorted((data / "videos").rglob("*.webm"))[0]
    avi = tmp_path / "v_Other_g01_c01.avi"
    _write_video(avi, codec="mpeg4", width=320, height=240, frames=12)
    capsys.readouterr()
    out = tmp_path / "videos.jsonl"
    assert main(["predict", "--checkpoint", str(run), str(webm), str(avi), "--flow", "farneback",
                 "--topk", "2", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    table = captured.out
    assert str(webm) in table and str(avi) in table and "RGB+Flow" in table
    # progress of the flow pairs per video on stderr (issue 22 #5)
    assert re.search(r"^flow of v_Other_g01_c01\.avi: (\d+)/\1 pairs \(.* in all\)$", captured.err, re.M)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["video"] for r in rows] == [str(webm), str(avi)]
    for row in rows:
        for stream in ("rgb", "flow", "fused"):
            classes = row[stream]
            assert len(classes) == 2 and {c["class"] for c in classes} == set(names)
            # 2 classes, top-2: every stream's probabilities, RGB+Flow's too, sum to 1 (issue 22 #4)
            assert classes[0]["probability"] >= classes[1]["probability"]
            assert abs(sum(c["probability"] for c in classes) - 1.0) < 1e-4
        assert row["label"] is None

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


# ---------------------------------------------------------------------------- issue 22 #9, #3

def test_version_and_top_level_description(capsys):
    from ccs_fast import __version__

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"ccs-fast {__version__}"
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "``" not in text and ":class:" not in text and "Two-stream" in text


def test_every_option_has_help():
    import argparse

    missing = []

    def walk(parser, name):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for command, sub in action.choices.items():
                    walk(sub, f"{name} {command}")
            elif not isinstance(action, argparse._HelpAction) and not (action.help or "").strip():
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")

    walk(build_parser(), "ccs-fast")
    assert missing == []


def test_config_prints_the_merged_yaml(tmp_path, capsys, monkeypatch):
    import random

    import yaml

    monkeypatch.setenv("HOME", str(tmp_path))
    lr = random.choice([0.003, 0.02, 0.5])
    assert main(["config", "--config", "ucf101", "--set", f"optim.lr={lr}",
                 "--set", "model.pretrained=~/w.pth"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["optim"]["lr"] == lr and printed["model"]["pretrained"] == str(tmp_path / "w.pth")
    assert printed["model"]["num_classes"] == 101 and printed["data"]["backend"] == "dali"  # from ucf101.yaml
    assert printed["loss"]["alpha3"] == 0.8  # a default
    assert main(["config", "--set", "optim.lr=-1"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_train_refuses_a_class_count_mismatch_in_one_line(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    lines = "".join(f"C{c}/v{i} 8 {c}\n" for c in range(3) for i in range(2))
    (data / "train.txt").write_text(lines)
    (data / "classInd.txt").write_text("1 C0\n2 C1\n3 C2\n")
    assert main(["train", "--config", "ucf101", "--set", f"data.train_list={data / 'train.txt'}",
                 "--set", f"data.root={data}", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the data has 3 classes (" in err and "classInd.txt names 3)" in err
    assert "but model.num_classes = 101 (from " in err
    assert "--set model.num_classes=3" in err and not (tmp_path / "run").exists()

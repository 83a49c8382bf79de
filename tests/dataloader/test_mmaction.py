"""Data as MMAction2 users have it (issue 12): its rawframe layouts and lists, read with no
conversion. Layouts as MMAction2's data-preparation docs describe them:
``rawframes/<Class>/<video>/img_00001.jpg, flow_x_00001.jpg, flow_y_00001.jpg`` (denseflow
names, 1-based) and its test data's ``img_00001.jpg, x_00001.jpg, y_00001.jpg``
(``flow_tmpl='{}_{:05d}.jpg'``); lists ``frame_dir total_frames label`` and, with offsets,
``frame_dir offset total_frames label``."""
import json

import cv2
import numpy as np
import pytest

from ccs_fast.dataloader import LoaderSpec, build_loader, dali_available
from ccs_fast.dataloader.rawframes import FrameNaming
from ccs_fast.dataloader.clip_plan import plan_clip
from ccs_fast.dataloader.transforms import IMAGENET_MEAN, IMAGENET_STD
from ccs_fast.base.errors import CCSError

SIZE = 32
X_Y = FrameNaming(flow_tmpl="{}_{:05d}.jpg")


def write_video_frames(folder, rgb_frames, naming=FrameNaming(), first=1):
    """RGB frames whose blue level is 10 × the file number; flow frames one fewer."""
    folder.mkdir(parents=True, exist_ok=True)
    grad = np.tile(np.linspace(0, 255, SIZE).astype(np.uint8), (SIZE, 1))
    for number in range(first, first + rgb_frames):
        rgb = np.dstack([grad, grad.T, np.full((SIZE, SIZE), 10 * number, np.uint8)])
        cv2.imwrite(str(folder / naming.filename_tmpl.format(number)), rgb[..., ::-1])
        if number < first + rgb_frames - 1:
            for axis in "xy":
                cv2.imwrite(str(folder / naming.flow_tmpl.format(axis, number)), grad)


def blue_levels(batch):
    """(B, K) mean blue level of each RGB segment, back in 0..255."""
    rgb = batch["rgb"].permute(0, 1, 3, 4, 2).numpy() * IMAGENET_STD + IMAGENET_MEAN
    return (255 * rgb[..., 2]).mean(axis=(2, 3))


BACKENDS = ["torch"] + (["dali"] if dali_available() else [])


@pytest.mark.parametrize("backend", BACKENDS)
def test_templates_start_index_and_offsets_pick_the_right_files(tmp_path, backend):
    naming = FrameNaming("frame{:04d}.jpg", "{}_{:05d}.jpg", start_index=0)
    write_video_frames(tmp_path / "long", 16, naming, first=0)
    (tmp_path / "list.txt").write_text("long 0 8 0\nlong 8 8 1\n")
    data = build_loader(LoaderSpec(tmp_path / "list.txt", tmp_path, backend=backend, train=False,
                        batch_size=2, num_segments=3, flow_length=2, input_size=16,
                        device="cpu", num_workers=1, naming=naming))
    (batch,) = list(data)
    plan = plan_clip(8, SIZE, SIZE, num_segments=3, flow_length=2, train=False,
                     seed=0, epoch=0, index=0)
    for row, offset in enumerate((0, 8)):
        np.testing.assert_allclose(blue_levels(batch)[row], 10 * (offset + plan.frame_indices),
                                   atol=3)
    assert str(data.frame_count) == "total_frames counts RGB frames (detected from the files)"


def test_lists_counting_flow_frames_are_detected(tmp_path):
    """A list whose total_frames counts flow_x files (as MMAction2's build_file_list writes
    for flow) reads like one that counts RGB frames; data.flow_count overrides."""
    write_video_frames(tmp_path / "Jump" / "v0", 9)  # 9 RGB, 8 flow
    options = dict(backend="torch", train=False, batch_size=1, num_segments=2, flow_length=8,
                   input_size=16, device="cpu", num_workers=0)
    (tmp_path / "rgb.txt").write_text("Jump/v0 9 0\n")
    (tmp_path / "flow.txt").write_text("Jump/v0 8 0\n")
    by_rgb = build_loader(LoaderSpec(tmp_path / "rgb.txt", tmp_path, **options))
    by_flow = build_loader(LoaderSpec(tmp_path / "flow.txt", tmp_path, **options))
    assert str(by_flow.frame_count) == "total_frames counts flow frames (detected from the files)"
    assert str(by_rgb.frame_count) == "total_frames counts RGB frames (detected from the files)"
    (a,), (b,) = list(by_rgb), list(by_flow)
    assert np.array_equal(a["rgb"].numpy(), b["rgb"].numpy())
    assert np.array_equal(a["flow"].numpy(), b["flow"].numpy())
    # told that the list counts RGB frames, 8 frames give 7 flow frames: too short for L = 8
    with pytest.raises(CCSError, match="too short"):
        build_loader(LoaderSpec(tmp_path / "flow.txt", tmp_path, flow_count=False, **options))
    told = build_loader(LoaderSpec(tmp_path / "flow.txt", tmp_path, flow_count=True, **options))
    assert str(told.frame_count) == "total_frames counts flow frames (data.flow_count)"


def test_mmaction_test_data_layout_trains_evaluates_and_predicts(tmp_path, capsys):
    """img_00001.jpg / x_00001.jpg / y_00001.jpg folders, a list with offsets, a label-less
    list: train, eval, eval --no-labels and predict with only data.flow_tmpl set."""
    pytest.importorskip("timm")
    from ccs_fast.cli import main

    root = tmp_path / "data" / "rawframes"
    for v in range(4):
        write_video_frames(root / f"c{v % 2}" / f"v{v}", 6, X_Y)
    write_video_frames(root / "long", 12, X_Y)
    lists = tmp_path / "data"
    (lists / "train.txt").write_text("c0/v0 0 6 0\nc1/v1 0 6 1\nc0/v2 0 6 0\nc1/v3 0 6 1\n")
    (lists / "val.txt").write_text("long 0 6 0\nlong 6 6 1\n")
    (lists / "test.txt").write_text("long 6\nc1/v1 6 -1\nlong 6 6 -1\n")
    sets = [f"data.root={root}", f"data.train_list={lists / 'train.txt'}",
            f"data.val_list={lists / 'val.txt'}", "data.flow_tmpl={}_{:05d}.jpg",
            "model.backbone=timm:test_resnet", "model.num_classes=2", "model.embed_dim=8",
            "model.flow_length=2", "model.num_segments=2", "data.input_size=32",
            "data.batch_size=2", "data.classes_per_batch=2", "data.test_segments=2",
            "data.num_workers=0", "optim.epochs=1",
            "train.tensorboard=false"]
    run = tmp_path / "run"
    args = ["train", "--config", "demo", "--out", str(run)]
    for item in sets:
        args += ["--set", item]
    assert main(args) == 0
    assert "total_frames counts RGB frames (detected from the files)" in capsys.readouterr().out

    assert main(["eval", "--checkpoint", str(run / "last.pt"), "--out", str(tmp_path / "eval")]) == 0
    assert json.loads((tmp_path / "eval" / "eval.json").read_text())["num_videos"] == 2

    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run / "last.pt"), "--list", str(lists / "test.txt")]) == 2
    err = capsys.readouterr().err
    assert f"{lists / 'test.txt'}:1" in err and "--no-labels" in err and err.count("\n") == 1
    assert main(["eval", "--checkpoint", str(run / "last.pt"), "--list", str(lists / "test.txt"),
                 "--no-labels", "--out", str(tmp_path / "eval")]) == 0
    assert len((tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()) == 3

    out = tmp_path / "pred.jsonl"
    assert main(["predict", "--checkpoint", str(run / "last.pt"), "--list", str(lists / "test.txt"),
                 "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["label"] for r in rows] == [None, None, None]
    assert all(0 <= c["index"] < 2 for r in rows for c in r["fused"])

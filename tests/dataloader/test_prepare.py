"""prepare: UCF-style tree of MPEG-4 .avi → rawframes + flow + split lists; resume; bad video."""
import argparse

import cv2
import numpy as np
import pytest

from ccs_fast.dataloader.formats import read_rawframe_list
from ccs_fast.dataloader.prepare import prepare_dataset, read_splits
from ccs_fast.dataloader.prepare_videos import resized_shape
from ccs_fast.base.errors import CCSError

W, H, FRAMES = 64, 48, 5


def _write_avi(path, seed):
    import av

    rng = np.random.default_rng(seed)
    base = cv2.GaussianBlur(rng.integers(0, 255, (H, W, 3), dtype=np.uint8), (5, 5), 2)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        for t in range(FRAMES):
            frame = av.VideoFrame.from_ndarray(np.roll(base, 2 * t, axis=1), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


@pytest.fixture
def ucf_tree(tmp_path):
    videos, splits = tmp_path / "videos", tmp_path / "splits"
    names = {"Jump": ["v_Jump_g01_c01", "v_Jump_g02_c01"],
             "Run": ["v_Run_g01_c01", "v_Run_g02_c01"]}
    for c, (cls, stems) in enumerate(names.items()):
        for s, stem in enumerate(stems):
            _write_avi(videos / cls / f"{stem}.avi", 10 * c + s)
    splits.mkdir()
    (splits / "classInd.txt").write_text("1 Jump\n2 Run\n")
    (splits / "trainlist01.txt").write_text("Jump/v_Jump_g01_c01.avi 1\nRun/v_Run_g01_c01.avi 2\n")
    (splits / "testlist01.txt").write_text("Jump/v_Jump_g02_c01.avi\nRun/v_Run_g02_c01.avi\n")
    return videos, splits, tmp_path / "out"


def test_prepare_writes_frames_flow_and_lists_then_resumes(ucf_tree):
    videos, splits, out = ucf_tree
    summary = prepare_dataset(videos, splits, out, workers=2, flow="farneback", short_side=32,
                              progress=False)
    assert (summary["videos"], summary["done"], summary["failed"]) == (4, 4, 0)
    train = read_rawframe_list(out / "train_rawframes_split1.txt")
    val = read_rawframe_list(out / "val_rawframes_split1.txt")
    assert [(r.path, r.num_frames, r.label) for r in train] == [
        ("Jump/v_Jump_g01_c01", FRAMES, 0), ("Run/v_Run_g01_c01", FRAMES, 1)]
    assert [r.label for r in val] == [0, 1]
    folder = out / "rawframes" / "Run" / "v_Run_g02_c01"
    names = sorted(p.name for p in folder.iterdir())
    assert sum(n.startswith("img_") for n in names) == FRAMES
    assert sum(n.startswith("flow_x_") for n in names) == FRAMES - 1
    assert sum(n.startswith("flow_y_") for n in names) == FRAMES - 1
    img = cv2.imread(str(folder / "img_00001.jpg"))
    assert img.shape[:2] == (32, 42)  # 64x48 scaled to short side 32, long side even
    assert cv2.imread(str(folder / "flow_x_00001.jpg"), cv2.IMREAD_UNCHANGED).ndim == 2

    stamp = (folder / "img_00001.jpg").stat().st_mtime_ns
    again = prepare_dataset(videos, splits, out, workers=2, flow="farneback", short_side=32,
                            progress=False)
    assert (again["done"], again["existing"], again["failed"]) == (0, 4, 0)
    assert (folder / "img_00001.jpg").stat().st_mtime_ns == stamp
    assert read_rawframe_list(out / "train_rawframes_split1.txt")[0].num_frames == FRAMES


def test_corrupt_video_is_counted_and_the_rest_done(ucf_tree, capsys):
    videos, splits, out = ucf_tree
    bad = videos / "Run" / "v_Run_g02_c01.avi"
    bad.write_bytes(b"RIFF" + bytes(range(256)) * 8)
    summary = prepare_dataset(videos, splits, out, workers=1, flow="farneback", short_side=32,
                              progress=False)
    assert (summary["done"], summary["failed"]) == (3, 1)
    assert len(summary["failures"]) == 1 and str(bad) in summary["failures"][0]
    assert "\n" not in summary["failures"][0]
    # issue 12 #8: the path once, no "[Errno N]"
    assert summary["failures"][0].count(str(bad)) == 1 and "Errno" not in summary["failures"][0]
    assert [r.path for r in read_rawframe_list(out / "val_rawframes_split1.txt")] == [
        "Jump/v_Jump_g02_c01"]
    assert not any(p.name.startswith(".") for p in (out / "rawframes" / "Run").iterdir())


def test_split_files_are_checked(tmp_path):
    with pytest.raises(CCSError, match="split"):
        read_splits(tmp_path)


@pytest.mark.parametrize("size, expected", [((320, 240), (340, 256)), ((240, 320), (256, 340)),
                                            ((256, 256), (256, 256))])
def test_resized_shape(size, expected):
    assert resized_shape(*size, 256) == expected


def test_hmdb_split_files_give_train_and_val(tmp_path):
    for cls in ("jump", "run"):
        (tmp_path / f"{cls}_test_split1.txt").write_text(
            f"{cls}_a.avi 1\n{cls}_b.avi 2\n{cls}_c.avi 0\n")
    ((train, val),) = read_splits(tmp_path).values()
    assert [(r.path, r.label) for r in train] == [("jump/jump_a.avi", 0), ("run/run_a.avi", 1)]
    assert [r.path for r in val] == ["jump/jump_b.avi", "run/run_b.avi"]


def test_prepare_with_mmaction_names_feeds_the_loader(ucf_tree, capsys):
    """Issue 12: prepare writes the names data.filename_tmpl / flow_tmpl / start_index give,
    and the loader reads them back with the same settings."""
    from ccs_fast.dataloader import LoaderSpec, build_loader
    from ccs_fast.dataloader.rawframes import FrameNaming

    videos, splits, out = ucf_tree
    naming = FrameNaming("img_{:05d}.jpg", "{}_{:05d}.jpg", start_index=0)
    # workers=2: a spawned pool, so no FFmpeg thread runs in this process (a later fork of
    # a loader worker in the same pytest process can otherwise hang)
    summary = prepare_dataset(videos, splits, out, workers=2, flow="farneback", short_side=32,
                              progress=True, naming=naming)
    assert summary["failed"] == 0
    err = capsys.readouterr().err  # not a terminal: lines, no carriage-return bar (#7)
    assert "\r" not in err and "prepare: 4/4 videos (" in err
    folder = out / "rawframes" / "Jump" / "v_Jump_g01_c01"
    names = sorted(p.name for p in folder.iterdir())
    assert names[0] == "img_00000.jpg" and "x_00000.jpg" in names and "y_00003.jpg" in names
    assert read_rawframe_list(out / "train_rawframes_split1.txt")[0].num_frames == FRAMES
    data = build_loader(LoaderSpec(
        out / "train_rawframes_split1.txt", out / "rawframes", backend="torch", train=False,
        batch_size=2, num_segments=2, flow_length=2, input_size=16, device="cpu",
        num_workers=0, naming=naming))
    assert [b["rgb"].shape[0] for b in data] == [2]


def test_prepare_tvl1_torch_batches_pairs_across_videos(ucf_tree):
    from ccs_fast.dataloader.flow import make_flow_estimator, write_rawframes
    from ccs_fast.dataloader.prepare_videos import decode_resized

    videos, splits, out = ucf_tree
    summary = prepare_dataset(videos, splits, out, workers=2, flow="tvl1-torch", flow_device="cpu",
                              batch_pairs=3, short_side=32, progress=False)
    assert (summary["done"], summary["failed"]) == (4, 0)
    assert summary["flow"] == "tvl1-torch on cpu"
    # the same files, byte for byte, as one video at a time with the same estimator
    alone = out.parent / "alone"
    source = videos / "Jump" / "v_Jump_g02_c01.avi"
    write_rawframes(decode_resized(source, 32), alone, make_flow_estimator("tvl1-torch", device="cpu"))
    batched = out / "rawframes" / "Jump" / "v_Jump_g02_c01"
    names = sorted(p.name for p in alone.iterdir())
    assert names == sorted(p.name for p in batched.iterdir()) and len(names) == 3 * FRAMES - 2
    assert all((alone / n).read_bytes() == (batched / n).read_bytes() for n in names)


def test_prepare_flow_defaults_and_devices(ucf_tree, monkeypatch):
    import torch

    videos, splits, out = ucf_tree
    if torch.cuda.is_available():
        pytest.skip("checks the choice on a machine without CUDA")
    with pytest.raises(CCSError, match="no CUDA device"):
        prepare_dataset(videos, splits, out, flow="tvl1-torch", flow_device="cuda", progress=False)
    with pytest.raises(CCSError, match="needs --flow tvl1-torch"):
        prepare_dataset(videos, splits, out, flow="farneback", flow_device="cuda", progress=False)
    summary = prepare_dataset(videos, splits, out, workers=1, short_side=32, progress=False)
    assert summary["flow"] == "tvl1 (OpenCV, CPU)" and summary["done"] == 4


def test_prepare_tvl1_torch_too_small_video_fails_alone(ucf_tree):
    videos, splits, out = ucf_tree
    summary = prepare_dataset(videos, splits, out, workers=1, flow="tvl1-torch", flow_device="cpu",
                              short_side=12, progress=False)
    assert summary["failed"] == 4 and summary["done"] == 0
    assert all("too small for TV-L1's pyramid" in f and "\n" not in f for f in summary["failures"])
    assert not (out / "rawframes").exists() or not any((out / "rawframes").rglob("*.jpg"))


def test_truncated_video_is_reported_short(ucf_tree, capsys):
    """Issue 12 #6: a video that decodes to fewer frames than its container declares."""
    import av

    from ccs_fast.dataloader.prepare import add_prepare_arguments, run_prepare

    videos, splits, out = ucf_tree
    path = videos / "Run" / "v_Run_g02_c01.avi"
    rng = np.random.default_rng(7)
    base = cv2.GaussianBlur(rng.integers(0, 255, (H, W, 3), dtype=np.uint8), (5, 5), 2)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        for t in range(20):
            frame = av.VideoFrame.from_ndarray(np.roll(base, 2 * t, axis=1), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * 0.9)])  # the header still says 20 frames
    with av.open(str(path)) as container:
        declared = container.streams.video[0].frames
        decoded = sum(1 for _ in container.decode(video=0))
    assert declared == 20 and 1 < decoded < 20

    parser = argparse.ArgumentParser()
    add_prepare_arguments(parser)
    args = parser.parse_args(["--videos", str(videos), "--splits", str(splits), "--out", str(out),
                              "--workers", "1", "--flow", "farneback", "--short-side", "32"])
    assert run_prepare(args) == 0
    text = capsys.readouterr().out
    assert "1 videos decoded short" in text
    assert f"{path}: decoded {decoded} of the 20 frames its container declares" in text
    val = read_rawframe_list(out / "val_rawframes_split1.txt")
    assert [r.num_frames for r in val if r.path.endswith("v_Run_g02_c01")] == [decoded]


# ------------------------------------------------------------------ faults (issue 23 #5)

def _prepare_args(videos, splits, out, *extra):
    from ccs_fast.dataloader.prepare import add_prepare_arguments

    parser = argparse.ArgumentParser()
    add_prepare_arguments(parser)
    return parser.parse_args(["--videos", str(videos), "--splits", str(splits), "--out", str(out),
                              "--workers", "1", "--flow", "farneback", *extra])


@pytest.mark.parametrize("short_side", [0, -int(np.random.default_rng().integers(1, 500))])
def test_short_side_below_one_is_refused_up_front(ucf_tree, capsys, short_side):
    """Before: OpenCV's resize assertion, once per video."""
    from ccs_fast.cli import main

    videos, splits, out = ucf_tree
    with pytest.raises(CCSError, match=rf"^--short-side {short_side}: must be a positive number of pixels"):
        prepare_dataset(videos, splits, out, workers=1, flow="farneback", short_side=short_side, progress=False)
    assert main(["prepare", "--videos", str(videos), "--splits", str(splits), "--out", str(out),
                 "--flow", "farneback", "--short-side", str(short_side)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"ccs-fast: error: --short-side {short_side}: ")
    assert not out.exists()


def test_hidden_folders_of_an_interrupted_prepare_are_removed(ucf_tree, capsys):
    from ccs_fast.dataloader.prepare import run_prepare

    videos, splits, out = ucf_tree
    stale = [out / "rawframes" / "Jump" / f".v_Jump_g01_c01.4242.{np.random.default_rng().bytes(4).hex()}.tmp",
             out / "rawframes" / "Run" / ".v_Run_g02_c01.17.0123abcd.tmp",
             out / "rawframes" / "Run" / ".v_Run_g01_c01.tmp-89abcdef"]  # the earlier scheme
    for folder in stale:
        folder.mkdir(parents=True)
        (folder / "img_00001.jpg").write_bytes(b"half")
    keep = out / "rawframes" / "Run" / ".notes"  # not a name prepare writes
    keep.mkdir()
    assert run_prepare(_prepare_args(videos, splits, out, "--short-side", "32")) == 0
    assert not any(folder.exists() for folder in stale) and keep.is_dir()
    assert "removed 3 unfinished folder(s) of an interrupted prepare" in capsys.readouterr().out


def test_full_disk_stops_at_once_with_one_line_and_no_list(ucf_tree, monkeypatch, capsys):
    """Before: one 'could not write JPEG' line per frame, the run went on and wrote lists of
    the videos that fit."""
    import errno

    from ccs_fast.cli import main
    from ccs_fast.dataloader import flow as flow_module

    videos, splits, out = ucf_tree
    real_imwrite, writes = flow_module._imwrite, []
    fail_at = 3 * FRAMES - 2 + int(np.random.default_rng().integers(1, 3 * FRAMES - 2))  # in the 2nd video

    def imwrite(path, image):
        writes.append(path)
        if len(writes) >= fail_at:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_imwrite(path, image)

    monkeypatch.setattr(flow_module, "_imwrite", imwrite)
    code = main(["prepare", "--videos", str(videos), "--splits", str(splits), "--out", str(out),
                 "--workers", "1", "--flow", "farneback", "--short-side", "32"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line or "could not write" in line]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert len(writes) == fail_at  # stopped at the first ENOSPC
    assert errors[0].startswith(f"ccs-fast: error: {out / 'rawframes' / 'Jump'}: disk full (no space left on device) "
                          "while writing the frames of Jump/v_Jump_g02_c01.avi; prepare stopped after 1 of 4 videos, "
                          "no annotation list written")
    assert not list(out.glob("*_rawframes_split*.txt"))
    assert not [p for p in (out / "rawframes").rglob(".*") if p.is_dir()]
    assert (out / "rawframes" / "Jump" / "v_Jump_g01_c01").is_dir()


WORKER_DRIVER = """
import os, sys, time
from multiprocessing import get_context
from ccs_fast.dataloader.prepare_videos import pool_worker_init


def worker_pid(_):
    time.sleep(0.05)
    return os.getpid()


if __name__ == "__main__":
    with get_context("spawn").Pool(2, initializer=pool_worker_init, initargs=(os.getpid(),)) as pool:
        print(" ".join(str(p.pid) for p in pool._pool), flush=True)
        # a worker runs a task only after its initializer: READY once both have run one
        while len(set(pool.map(worker_pid, range(8), chunksize=1))) < 2:
            pass
        print("READY", flush=True)
        time.sleep(120)
"""


def test_pool_workers_end_with_a_killed_prepare_and_ignore_ctrl_c(tmp_path):
    """Before: the spawned workers of a killed prepare stayed, waiting on their queue."""
    import os
    import signal
    import subprocess
    import sys
    import time

    driver = tmp_path / "driver.py"
    driver.write_text(WORKER_DRIVER)
    log = tmp_path / "driver.log"
    with open(log, "w") as sink:
        proc = subprocess.Popen([sys.executable, str(driver)], stdout=sink, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while "READY" not in log.read_text() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert "READY" in log.read_text(), log.read_text()[-2000:]
        pids = [int(p) for p in log.read_text().splitlines()[0].split()]
        assert len(pids) == 2
        os.kill(pids[0], signal.SIGINT)  # Ctrl-C reaches every process of the group
        time.sleep(0.5)
        assert _alive(pids[0])  # still there: the main process decides
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 10
        alive = pids
        while alive and time.monotonic() < deadline:
            alive = [p for p in alive if _alive(p)]
            time.sleep(0.1)
        assert not alive, f"workers {alive} outlived the killed prepare"
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for pid in pids if "pids" in locals() else []:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def _alive(pid) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False


# ------------------------------------------------------- flow manifest (issue 22 #6)

def test_rerun_with_another_flow_is_refused_then_redone(ucf_tree, capsys):
    """Before: a rerun with --flow tvl1 kept the Farneback flow and reported tvl1."""
    import json

    from ccs_fast.cli import main
    from ccs_fast.dataloader.prepare import read_flow_manifest

    videos, splits, out = ucf_tree
    prepare_dataset(videos, splits, out, workers=1, flow="farneback", short_side=32, progress=False)
    manifest = read_flow_manifest(out)
    assert sorted(manifest) == ["Jump/v_Jump_g01_c01", "Jump/v_Jump_g02_c01", "Run/v_Run_g01_c01", "Run/v_Run_g02_c01"]
    assert {(e["flow"], e["short_side"]) for e in manifest.values()} == {("farneback", 32)}
    flow_file = out / "rawframes" / "Run" / "v_Run_g01_c01" / "flow_x_00001.jpg"
    farneback_bytes = flow_file.read_bytes()
    lists_before = (out / "train_rawframes_split1.txt").read_bytes()

    args = ["prepare", "--videos", str(videos), "--splits", str(splits), "--out", str(out), "--workers", "1",
            "--short-side", "32"]
    assert main([*args, "--flow", "tvl1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(
        f"ccs-fast: error: {out}: 4 prepared video(s) (e.g. Jump/v_Jump_g01_c01) have flow and frames made with "
        "farneback, short side 32, bound 20, this run asks for tvl1, short side 32, bound 20; pass --redo")
    assert flow_file.read_bytes() == farneback_bytes and (out / "train_rawframes_split1.txt").read_bytes() == lists_before
    assert main([*args, "--flow", "farneback", "--short-side", "48"]) == 2  # other frame sizes: refused too
    assert "short side 48" in capsys.readouterr().err

    assert main([*args, "--flow", "tvl1", "--redo"]) == 0
    assert "prepared 4 videos, 0 already done" in capsys.readouterr().out
    assert flow_file.read_bytes() != farneback_bytes
    assert {e["flow"] for e in read_flow_manifest(out).values()} == {"tvl1"}
    assert main([*args, "--flow", "tvl1-torch", "--flow-device", "cpu"]) == 0  # the same algorithm: kept
    assert "prepared 0 videos, 4 already done" in capsys.readouterr().out

    # a video whose line is missing (killed between its rename and its line) is redone;
    # output from before manifests is kept as it is, with a note
    lines = (out / "flow_manifest.jsonl").read_text().splitlines()
    (out / "flow_manifest.jsonl").write_text("\n".join(l for l in lines if "v_Run_g01_c01" not in l) + "\n")
    assert main([*args, "--flow", "tvl1"]) == 0
    assert "prepared 1 videos, 3 already done" in capsys.readouterr().out
    assert json.loads((out / "flow_manifest.jsonl").read_text().splitlines()[-1])["video"] == "Run/v_Run_g01_c01"
    (out / "flow_manifest.jsonl").unlink()
    assert main([*args, "--flow", "farneback"]) == 0
    printed = capsys.readouterr().out
    assert "4 videos already in" in printed and "flow estimator is unknown" in printed
    (out / "rawframes" / "Run" / "v_Run_g02_c01" / "img_00001.jpg").parent.rename(out / "moved")
    assert main([*args, "--flow", "farneback"]) == 0  # the unknown ones stay kept, the new one is recorded
    printed = capsys.readouterr().out
    assert "3 videos already in" in printed and "prepared 1 videos, 3 already done" in printed
    assert read_flow_manifest(out)["Run/v_Run_g02_c01"]["flow"] == "farneback"

"""The embedded Latin-square data set: files, labels, determinism, and the factor separation."""
import json
import shutil
from collections import Counter

import cv2
import numpy as np
import pytest

from ccs_fast.dataloader.flow import make_flow_estimator
from ccs_fast.dataloader.synth import (
    MOTIONS,
    SYNTH_TVL1_PARAMS,
    VideoSpec,
    make_synthetic_dataset,
    render_video,
    video_specs,
)
from ccs_fast.base.errors import CCSError

TINY = dict(classes=3, videos_per_cell=1, val_videos_per_cell=1, frames=6, size=32)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A TV-L1 data set of 18 tiny videos (about a second), built in one process."""
    root = tmp_path_factory.mktemp("synth") / "data"
    summary = make_synthetic_dataset(root, seed=3, workers=1, **TINY)
    return root, summary


def _lines(path):
    return path.read_text().splitlines()


def _files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_summary_and_files(dataset):
    root, summary = dataset
    assert summary["train_videos"] == summary["val_videos"] == 9
    assert summary["videos_written"] == 18 and summary["chance"] == pytest.approx(1 / 3)
    names = summary["class_names"]
    assert _lines(root / "splits" / "classInd.txt") == [f"{i + 1} {n}" for i, n in enumerate(names)]

    for split in ("train", "val"):
        raw = [line.split() for line in _lines(root / "annotations" / f"{split}_rawframes.txt")]
        vid = [line.split() for line in _lines(root / "annotations" / f"{split}_videos.txt")]
        assert len(raw) == len(vid) == 9
        for (frame_dir, total, label), (path, video_label) in zip(raw, vid):
            assert int(total) == 6 and label == video_label and path == frame_dir + ".webm"
            assert frame_dir.split("/")[0] == names[int(label)]
            folder = root / "rawframes" / frame_dir
            assert len(list(folder.glob("img_*.jpg"))) == 6
            assert len(list(folder.glob("flow_x_*.jpg"))) == len(list(folder.glob("flow_y_*.jpg"))) == 5
            assert (root / "videos" / path).is_file()

    train = [line.split() for line in _lines(root / "splits" / "trainlist01.txt")]
    assert [(p, int(k) - 1) for p, k in train] == [
        (p, int(k)) for p, k in (line.split() for line in _lines(root / "annotations" / "train_videos.txt"))]
    test = _lines(root / "splits" / "testlist01.txt")
    assert test == [line.split()[0] for line in _lines(root / "annotations" / "val_videos.txt")]
    assert not set(test) & {p for p, _ in train}
    assert not [p for p in root.rglob(".*tmp*")]  # no temporary leftovers


def test_video_decodes(dataset):
    av = pytest.importorskip("av")
    root, summary = dataset
    path = next((root / "videos").rglob("*.webm"))
    with av.open(str(path)) as container:
        assert container.streams.video[0].codec_context.name in ("vp9", "vp8")
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 6 and frames[0].shape == (32, 32, 3)
    reference = cv2.imread(str(root / "rawframes" / path.parent.name / path.stem / "img_00001.jpg"))
    assert np.abs(frames[0].astype(int) - reference[..., ::-1]).mean() < 8  # same picture


def test_latin_square_labels(dataset):
    root, _ = dataset
    meta = json.loads((root / "meta.json").read_text())
    assert meta["chance"] == pytest.approx(1 / 3) and meta["seed"] == 3
    classes = meta["classes"]
    cells = Counter()
    for video in meta["videos"]:
        assert video["label"] == (video["appearance"] + video["motion"]) % classes
        assert video["class_name"] == meta["class_names"][video["label"]]
        cells[video["split"], video["appearance"], video["motion"]] += 1
    assert set(cells.values()) == {1} and len(cells) == 2 * classes * classes
    listed = {tuple(line.split()[0::2]) for line in _lines(root / "annotations" / "val_rawframes.txt")}
    assert listed == {(f"{v['class_name']}/{v['name']}", str(v["label"]))
                      for v in meta["videos"] if v["split"] == "val"}


def test_deterministic_across_workers_and_seeds(dataset, tmp_path):
    root, _ = dataset
    again = make_synthetic_dataset(tmp_path / "again", seed=3, workers=2, **TINY)
    assert again["workers"] == 2
    assert _files(root) == _files(tmp_path / "again")  # webm bytes included
    make_synthetic_dataset(tmp_path / "other", seed=4, workers=1, **TINY)
    first = "rawframes/Action00/v_Action00_0001/img_00001.jpg"
    assert (root / first).read_bytes() != (tmp_path / "other" / first).read_bytes()


def test_resume_and_option_checks(dataset, tmp_path):
    root, _ = dataset
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    victim = copy / "rawframes" / "Action01" / "v_Action01_0002"
    shutil.rmtree(victim)
    stale = [victim.parent / f".{victim.name}.4242.0badc0de.tmp",  # as if killed mid-write
             victim.parent / f".{victim.name}.old-0badc0de"]  # the earlier scheme's
    for folder in stale:
        folder.mkdir()
        (folder / "img_00001.jpg").write_bytes(b"half")
    summary = make_synthetic_dataset(copy, seed=3, workers=1, **TINY)
    assert not any(folder.exists() for folder in stale)
    assert summary["videos_written"] == 1 and summary["videos_kept"] == 17
    assert _files(copy) == _files(root)

    with pytest.raises(CCSError, match="other options .*seed"):
        make_synthetic_dataset(copy, seed=5, workers=1, **TINY)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(CCSError, match="not a synthetic data set"):
        make_synthetic_dataset(tmp_path / "busy", **TINY)
    for bad in (dict(classes=5), dict(frames=1), dict(size=31), dict(flow="deepflow")):
        with pytest.raises(CCSError, match="synth:"):
            make_synthetic_dataset(tmp_path / "bad", **{**TINY, **bad})


def _spec(motion, appearance=0, index=0, classes=4, frames=4, size=48):
    return VideoSpec(index=index, name="v", class_name="c", label=(appearance + motion) % classes,
                     appearance=appearance, motion=motion, split="train", seed=11,
                     classes=classes, frames=frames, size=size)


def _grey(video):
    return np.stack([cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY) for frame in video])


@pytest.mark.parametrize("motion", range(len(MOTIONS)))
def test_appearance_is_isoluminant(motion):
    """Flow sees grey frames; they must not depend on the appearance at all."""
    spec = _spec(motion)
    videos = [render_video(spec, appearance=a) for a in range(4)]
    for video in videos[1:]:
        np.testing.assert_array_equal(_grey(video), _grey(videos[0]))
    centre = [video[:, 24, 24].astype(int) for video in videos]
    assert min(np.abs(a - b).sum() for i, a in enumerate(centre) for b in centre[i + 1:]) > 0
    assert max(np.abs(video.astype(int) - videos[0]).max() for video in videos[1:]) > 30


@pytest.mark.parametrize("motion", range(len(MOTIONS)))
def test_flow_shows_motion(motion):
    video = render_video(_spec(motion, index=motion))
    grey = _grey(video)
    flow = make_flow_estimator("tvl1", **SYNTH_TVL1_PARAMS)(grey[1], grey[2])
    yy, xx = np.mgrid[0:48, 0:48] + 0.5
    moving = np.hypot(*flow.transpose(2, 0, 1)) > 0.75
    fx, fy = flow[..., 0][moving], flow[..., 1][moving]
    assert moving.mean() > 0.08  # the texture inside the disk
    name = MOTIONS[motion]
    if name == "up":
        assert fy.mean() < -1.0 and abs(fx.mean()) < 0.5
    elif name == "down":
        assert fy.mean() > 1.0 and abs(fx.mean()) < 0.5
    elif name == "sideways":
        assert abs(fx.mean()) > 1.0 and abs(fy.mean()) < 0.5
    else:  # spin: no net drift, but a consistent curl about the disk's centre
        cx, cy = xx[moving].mean(), yy[moving].mean()
        curl = (xx[moving] - cx) * fy - (yy[moving] - cy) * fx
        assert abs(fx.mean()) < 0.5 and abs(fy.mean()) < 0.5
        assert abs(curl.mean()) > 5 * np.abs(curl).std() / np.sqrt(curl.size)


def test_motion_invisible_in_frame_statistics():
    """Per-frame texture statistics do not depend on the motion (only frame order does)."""
    def stats(motion):
        rows = []
        for index in range(24):
            video = render_video(_spec(motion, index=index, frames=3)).astype(float)
            gy, gx = np.gradient(video[1].mean(axis=2))
            rows.append([np.abs(gx).mean(), np.abs(gy).mean()])
        return np.array(rows)
    base = stats(0)
    for motion in range(1, len(MOTIONS)):
        other = stats(motion)
        assert np.allclose(base.mean(0), other.mean(0), rtol=0.1)


def test_video_specs_balance():
    specs = video_specs(seed=0, classes=4, videos_per_cell=2, val_videos_per_cell=1, frames=8, size=32)
    assert len(specs) == 16 * 3 and len({s.name for s in specs}) == len(specs)
    per_class = Counter((s.split, s.label) for s in specs)
    assert per_class == {(split, label): 8 if split == "train" else 4
                         for split in ("train", "val") for label in range(4)}
    assert all(s.label == (s.appearance + s.motion) % 4 for s in specs)
    assert video_specs(seed=0, classes=4, videos_per_cell=2, val_videos_per_cell=1, frames=8,
                       size=32) == specs


def test_synth_with_mmaction_names(tmp_path, capsys):
    """Issue 12: synth --flow-tmpl / --start-index write the names MMAction2's settings give;
    off a terminal its progress is plain lines, no carriage-return bar (#7)."""
    from ccs_fast.cli import main

    out = tmp_path / "named"
    assert main(["synth", "--out", str(out), "--classes", "2", "--videos-per-cell", "1",
                 "--val-videos-per-cell", "1", "--frames", "3", "--size", "16",
                 "--flow", "farneback", "--workers", "1", "--flow-tmpl", "{}_{:05d}.jpg",
                 "--start-index", "0"]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err and "synth: 8/8 videos (" in err
    folder = next((out / "rawframes").glob("*/*"))
    assert sorted(p.name for p in folder.iterdir()) == [
        "img_00000.jpg", "img_00001.jpg", "img_00002.jpg",
        "x_00000.jpg", "x_00001.jpg", "y_00000.jpg", "y_00001.jpg"]
    assert main(["synth", "--out", str(tmp_path / "bad"), "--flow-tmpl", "flow_{:05d}.jpg"]) == 2

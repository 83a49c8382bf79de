"""The torch and synthetic backends on tiny rawframe trees (12 frames of 40×32)."""
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import ccs_fast.dataloader as dataloader
from ccs_fast.dataloader import LoaderSpec, build_loader
from ccs_fast.dataloader.clip_plan import plan_clip
from ccs_fast.dataloader.transforms import (IMAGENET_MEAN, IMAGENET_STD, crop_resize,
                                            invert_flow_x, normalize_flow, normalize_rgb,
                                            stack_flow)
from ccs_fast.base.errors import CCSError

W, H, FRAMES = 40, 32, 12
S, K, L = 16, 3, 4
JPEG = [cv2.IMWRITE_JPEG_QUALITY, 100, cv2.IMWRITE_JPEG_SAMPLING_FACTOR,
        cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444]
XGRAD = np.tile(np.linspace(0, 255, W).round().astype(np.uint8), (H, 1))
YGRAD = np.tile(np.linspace(0, 255, H).round().astype(np.uint8)[:, None], (1, W))


def rgb_frame(i):
    """R: x position, G: y position, B: frame index — markers that survive JPEG."""
    return np.stack([XGRAD, YGRAD, np.full((H, W), 20 * i, np.uint8)], axis=-1)


def write_frames(frame_dir, num_frames=FRAMES, rgb=True, flow_y_marks_index=False):
    frame_dir.mkdir(parents=True, exist_ok=True)
    if rgb:
        for i in range(num_frames):
            cv2.imwrite(str(frame_dir / f"img_{i + 1:05d}.jpg"), rgb_frame(i)[..., ::-1], JPEG)
    for i in range(num_frames - 1):
        fy = np.full((H, W), 20 * i, np.uint8) if flow_y_marks_index else YGRAD
        cv2.imwrite(str(frame_dir / f"flow_x_{i + 1:05d}.jpg"), XGRAD, JPEG)
        cv2.imwrite(str(frame_dir / f"flow_y_{i + 1:05d}.jpg"), fy, JPEG)


def make_rawframes(root, num_videos=6, num_classes=3, **kwargs):
    lines = []
    for v in range(num_videos):
        write_frames(root / "rawframes" / f"v{v}", **kwargs)
        lines.append(f"v{v} {FRAMES} {v % num_classes}\n")
    (root / "train.txt").write_text("".join(lines))
    return root / "train.txt", root / "rawframes"


def loader(annotation, data_root, **kwargs):
    options = dict(backend="torch", train=True, batch_size=3, num_segments=K, flow_length=L,
                   input_size=S, device="cpu", num_workers=0)
    return build_loader(LoaderSpec(annotation, data_root, **(options | kwargs)))


def denormalize_rgb(x):
    """(3, S, S) normalised → (S, S, 3) in 0..255."""
    return (x.permute(1, 2, 0).numpy() * IMAGENET_STD + IMAGENET_MEAN) * 255


@pytest.fixture
def tree(tmp_path):
    return make_rawframes(tmp_path)


def one_line_error(excinfo, *needles):
    message = str(excinfo.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message


def test_batch_shapes_dtypes_and_channels_last(tree):
    data = loader(*tree)
    assert len(data) == 2 and data.num_videos == 6 and data.num_classes == 3
    batches = list(data)
    assert len(batches) == 2
    batch = batches[0]
    assert batch["rgb"].shape == (3, K, 3, S, S) and batch["rgb"].dtype == torch.float32
    assert batch["flow"].shape == (3, K, 2 * L, S, S) and batch["flow"].dtype == torch.float32
    assert batch["label"].dtype == torch.int64 and batch["index"].dtype == torch.int64
    for key in ("rgb", "flow"):
        assert batch[key].flatten(0, 1).is_contiguous(memory_format=torch.channels_last)
    rows = torch.cat([b["index"] for b in batches]).tolist()
    assert sorted(rows) == list(range(6))
    assert torch.equal(torch.cat([b["label"] for b in batches]), torch.tensor(rows) % 3)
    half = list(loader(*tree, dtype=torch.bfloat16))[0]
    assert half["rgb"].dtype == torch.bfloat16 and half["flow"].dtype == torch.bfloat16


def test_rgb_and_flow_share_crop_and_flip(tree):
    data = loader(*tree)
    flips = set()
    for epoch in range(3):
        data.set_epoch(epoch)
        for batch in data:
            for rgb_clip, flow_clip in zip(batch["rgb"], batch["flow"]):
                for rgb, flow in zip(rgb_clip, flow_clip):
                    image = denormalize_rgb(rgb)
                    fx = flow[0::2].numpy() * 128 + 128
                    fy = flow[1::2].numpy() * 128 + 128
                    flipped = image[0, 0, 0] > image[0, -1, 0]
                    flips.add(bool(flipped))
                    expected_fx = 255 - image[..., 0] if flipped else image[..., 0]
                    assert np.abs(fx - expected_fx).max() < 8
                    assert np.abs(fy - image[..., 1]).max() < 8
    assert flips == {True, False}


def test_frames_and_flow_follow_the_plan(tmp_path):
    annotation, root = make_rawframes(tmp_path, flow_y_marks_index=True)
    for train in (True, False):
        num_segments = K if train else 5
        data = loader(annotation, root, train=train, num_segments=num_segments, seed=3)
        data.set_epoch(2)
        for batch in data:
            for row, rgb_clip, flow_clip in zip(batch["index"], batch["rgb"], batch["flow"]):
                plan = plan_clip(FRAMES, W, H, num_segments=num_segments, flow_length=L,
                                 train=train, seed=3, epoch=2, index=int(row))
                marks = [denormalize_rgb(rgb)[..., 2].mean() for rgb in rgb_clip]
                np.testing.assert_allclose(marks, 20 * plan.frame_indices, atol=2)
                flow_marks = (flow_clip[:, 1::2].numpy() * 128 + 128).mean(axis=(2, 3))
                np.testing.assert_allclose(flow_marks, 20 * plan.flow_indices, atol=2)


def test_loader_equals_the_shared_transforms(tree):
    annotation, root = tree
    batch = next(iter(loader(annotation, root, seed=1)))
    row = int(batch["index"][0])
    plan = plan_clip(FRAMES, W, H, num_segments=K, flow_length=L, train=True,
                     seed=1, epoch=0, index=row)
    frame_dir = root / f"v{row}"

    def read(name, flags):
        return cv2.imread(str(frame_dir / name), flags)

    rgb = [crop_resize(read(f"img_{i + 1:05d}.jpg", cv2.IMREAD_COLOR)[..., ::-1], plan.crop,
                       S, plan.flip) for i in plan.frame_indices]
    flows = []
    for segment in plan.flow_indices:
        fx = [crop_resize(read(f"flow_x_{i + 1:05d}.jpg", cv2.IMREAD_GRAYSCALE), plan.crop, S,
                          plan.flip) for i in segment]
        fy = [crop_resize(read(f"flow_y_{i + 1:05d}.jpg", cv2.IMREAD_GRAYSCALE), plan.crop, S,
                          plan.flip) for i in segment]
        flows.append(stack_flow([invert_flow_x(x) if plan.flip else x for x in fx], fy))
    expected_rgb = normalize_rgb(np.stack(rgb)).transpose(0, 3, 1, 2)
    expected_flow = normalize_flow(np.stack(flows)).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(batch["rgb"][0].numpy(), expected_rgb, rtol=0, atol=1e-6)
    np.testing.assert_allclose(batch["flow"][0].numpy(), expected_flow, rtol=0, atol=1e-6)


def epoch_tensors(data, epoch):
    data.set_epoch(epoch)
    return {int(i): r for b in data for i, r in zip(b["index"], b["rgb"])}


def test_epoch_reaches_the_workers(tree):
    in_process = loader(*tree, num_workers=0)
    workers = loader(*tree, num_workers=1)
    for epoch in (0, 1, 0):
        a, b = epoch_tensors(in_process, epoch), epoch_tensors(workers, epoch)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    e0, e1 = epoch_tensors(in_process, 0), epoch_tensors(in_process, 1)
    assert any(not torch.equal(e0[k], e1[k]) for k in e0.keys() & e1.keys())


def test_eval_covers_every_video_once_over_two_ranks(tmp_path):
    annotation, root = make_rawframes(tmp_path, num_videos=5)
    rows = []
    for rank in range(2):
        data = loader(annotation, root, train=False, batch_size=2, rank=rank, world_size=2)
        batches = list(data)
        assert len(batches) == len(data)
        rows += [int(i) for b in batches for i in b["index"]]
    assert sorted(rows) == list(range(5))


def test_balanced_batches(tmp_path):
    annotation, root = make_rawframes(tmp_path, num_videos=8, num_classes=4)
    data = loader(annotation, root, batch_size=4, classes_per_batch=2)
    for batch in data:
        labels = batch["label"].tolist()
        assert len(set(labels)) == 2 and all(labels.count(c) == 2 for c in set(labels))


def test_missing_frame_names_the_file(tree):
    annotation, root = tree
    (root / "v2" / "img_00005.jpg").unlink()
    (root / "v2" / "img_00006.jpg").unlink()
    (root / "v2" / "img_00007.jpg").unlink()
    (root / "v2" / "img_00008.jpg").unlink()
    for workers in (0, 1):
        with pytest.raises(CCSError) as excinfo:
            list(loader(annotation, root, train=False, num_workers=workers))
        one_line_error(excinfo, "v2/img_0000", "missing frame")
        assert str(excinfo.value).startswith(str(root / "v2"))


def test_corrupt_frame_names_the_file(tree):
    annotation, root = tree
    (root / "v1" / "flow_x_00006.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(CCSError) as excinfo:
        list(loader(annotation, root, train=False, num_segments=5))
    one_line_error(excinfo, "v1/flow_x_00006.jpg", "cannot decode")


def test_worker_error_surfaces_as_its_one_line_message(tree):
    annotation, root = tree
    frame = root / "v4" / "img_00001.jpg"
    good = frame.read_bytes()
    frame.write_bytes(b"\xff\xd8 truncated")
    data = loader(annotation, root, num_workers=1)
    with pytest.raises(CCSError) as excinfo:
        list(data)
    assert str(excinfo.value) == f"{frame}: cannot decode (truncated JPEG: no end-of-image marker)"
    frame.write_bytes(good)
    assert len(list(data)) == len(data)  # the error stopped the workers; new ones start


def test_truncated_jpeg_is_rejected_without_opencv_warnings(tree, capfd):
    """Issue 12 #1: OpenCV decoded half of a truncated JPEG (grey below) and only printed
    libjpeg's "Premature end of JPEG file", naming no file; skip_bad never triggered."""
    annotation, root = tree
    frame = root / "v1" / "img_00001.jpg"  # every clip of v1 reads it (the frame size)
    data = frame.read_bytes()
    frame.write_bytes(data[: len(data) // 2])
    capfd.readouterr()
    with pytest.raises(CCSError) as excinfo:
        list(loader(annotation, root, train=False))
    assert str(excinfo.value) == f"{frame}: cannot decode (truncated JPEG: no end-of-image marker)"
    skipping = loader(annotation, root, train=False, skip_bad=True)
    rows = [int(i) for b in skipping for i in b["index"]]
    assert sorted(rows) == [0, 2, 3, 4, 5] and skipping.num_skipped == 1
    assert "truncated JPEG" in skipping.skipped_errors[1]
    captured = capfd.readouterr()
    assert "JPEG" not in captured.err + captured.out, captured.err


def test_skip_bad_drops_and_counts_the_bad_video(tree):
    annotation, root = tree
    shutil.rmtree(root / "v3")
    data = loader(annotation, root, train=False, skip_bad=True)
    rows = [int(i) for b in data for i in b["index"]]
    assert sorted(rows) == [0, 1, 2, 4, 5] and data.num_skipped == 1
    assert list(data.skipped_errors) == [3]
    assert data.skipped_errors[3] == f"{annotation}:4: frame folder {root / 'v3'} not found"


def test_missing_frame_folder_names_the_list_line(tree):
    """Issue 12 #8: a missing folder was reported as its img_00001.jpg."""
    annotation, root = tree
    shutil.rmtree(root / "v3")
    with pytest.raises(CCSError) as excinfo:
        loader(annotation, root, train=False)
    assert str(excinfo.value) == f"{annotation}:4: frame folder {root / 'v3'} not found"


def test_too_short_video_in_the_list(tree):
    annotation, root = tree
    annotation.write_text(annotation.read_text().replace("v2 12 2", "v2 4 2"))
    with pytest.raises(CCSError) as excinfo:
        loader(annotation, root)
    one_line_error(excinfo, f"{annotation}:3", "v2", "too short")
    data = loader(annotation, root, train=False, skip_bad=True)
    assert data.num_videos == 5 and data.num_skipped == 1
    assert 2 not in [int(i) for b in data for i in b["index"]]


def test_label_out_of_range_and_empty_list(tree):
    annotation, root = tree
    with pytest.raises(CCSError) as excinfo:
        loader(annotation, root, num_classes=2)
    one_line_error(excinfo, f"{annotation}:3", "label 2")
    annotation.write_text("")
    with pytest.raises(CCSError) as excinfo:
        loader(annotation, root)
    one_line_error(excinfo, str(annotation), "no videos")
    annotation.write_text("v0 12\n")
    with pytest.raises(CCSError) as excinfo:
        loader(annotation, root)
    one_line_error(excinfo, f"{annotation}:1", "expected")


def write_video(path, num_frames):
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        stream.codec_context.options = {"qscale": "1"}
        for i in range(num_frames):
            frame = av.VideoFrame.from_ndarray(rgb_frame(i), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def test_video_modality(tmp_path):
    videos = tmp_path / "videos"
    for v in range(3):
        write_video(videos / "cls" / f"v{v}.avi", FRAMES if v != 2 else 6)
        write_frames(tmp_path / "rawframes" / "cls" / f"v{v}", rgb=False)
    annotation = tmp_path / "videos.txt"
    annotation.write_text("cls/v0.avi 0\ncls/v1.avi 1\n")
    data = loader(annotation, videos, modality="video", train=False, batch_size=2)
    batch = next(iter(data))
    assert batch["rgb"].shape == (2, K, 3, S, S) and batch["flow"].shape == (2, K, 2 * L, S, S)
    plan = plan_clip(FRAMES, W, H, num_segments=K, flow_length=L, train=False,
                     seed=0, epoch=0, index=0)
    marks = [denormalize_rgb(rgb)[..., 2].mean() for rgb in batch["rgb"][0]]
    np.testing.assert_allclose(marks, 20 * plan.frame_indices, atol=8)

    annotation.write_text("cls/v0.avi 0\ncls/v2.avi 1\n")
    with pytest.raises(CCSError) as excinfo:
        list(loader(annotation, videos, modality="video", train=False, batch_size=2,
                    num_segments=5, num_workers=1))
    one_line_error(excinfo, str(videos / "cls" / "v2.avi"), "too short")


def test_synthetic_backend_is_deterministic_per_epoch():
    def epoch(e):
        data = build_loader(LoaderSpec(None, None, backend="synthetic", train=True, batch_size=4,
                            num_segments=K, flow_length=L, input_size=S, device="cpu",
                            num_classes=7, synthetic_batches=2, seed=1))
        data.set_epoch(e)
        return list(data)

    first = epoch(0)
    assert len(first) == 2
    batch = first[0]
    assert batch["rgb"].shape == (4, K, 3, S, S) and batch["flow"].shape == (4, K, 2 * L, S, S)
    assert batch["rgb"].flatten(0, 1).is_contiguous(memory_format=torch.channels_last)
    assert batch["label"].dtype == torch.int64 and 0 <= batch["label"].min()
    assert batch["label"].max() < 7
    assert torch.equal(first[1]["rgb"], epoch(0)[1]["rgb"])
    assert not torch.equal(first[1]["rgb"], epoch(1)[1]["rgb"])


def test_unknown_backend_and_missing_dali(tree, monkeypatch):
    with pytest.raises(ValueError, match="available: torch, synthetic"):
        loader(*tree, backend="tfrecord")
    monkeypatch.setattr(dataloader, "dali_available", lambda: False)
    assert "dali" not in dataloader.available_backends()
    with pytest.raises(CCSError, match="nvidia-dali"):
        loader(*tree, backend="dali")


def test_default_workers_share_the_cores_among_local_ranks(monkeypatch):
    from ccs_fast.base import distributed
    from ccs_fast.base.distributed import default_loader_workers

    monkeypatch.setattr(distributed, "available_cores", lambda: 16)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert default_loader_workers("cuda:0") == 16
    assert default_loader_workers("cpu") == 4  # the model's threads take the other 12
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert default_loader_workers("cuda:0") == 2
    assert default_loader_workers("cpu") == 0  # 2 cores each: load in the training process


def test_unreadable_frame_is_not_called_corrupt(tree, monkeypatch):
    """Issue 11 #8: a frame without read permission was reported as "cannot decode"."""
    import errno
    import os
    import re

    from ccs_fast.dataloader import rawframes as frame_files

    annotation, root = tree
    video = root / "v2"
    frames = sorted(video.iterdir())
    for frame in frames:
        frame.chmod(0)
    if os.geteuid() == 0:  # permission bits do not bind root: answer as the OS does for a user
        real_open = open

        def denied(path, *args, **kwargs):
            if Path(path).parent == video:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
            return real_open(path, *args, **kwargs)

        monkeypatch.setattr(frame_files, "open", denied, raising=False)
    try:
        with pytest.raises(CCSError) as excinfo:
            list(loader(annotation, root, train=False))
        assert re.fullmatch(rf"{re.escape(str(video))}/\w+_\d+\.jpg: cannot read \(permission denied\)",
                            str(excinfo.value)), str(excinfo.value)
    finally:
        for frame in frames:
            frame.chmod(0o644)


def test_video_frames_are_resized_to_the_flows_size(tmp_path):
    """Issue 12 #2: prepare writes flow at 340x256 for a 320x240 UCF-101 clip; the video
    modality refused every clip ("frame is 340x256, the video's frames are 320x240")."""
    import av

    video = tmp_path / "videos" / "cls" / "v0.avi"
    video.parent.mkdir(parents=True)
    grad = np.tile(np.linspace(0, 255, 320).astype(np.uint8), (240, 1))
    with av.open(str(video), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 320, 240, "yuv420p"
        for i in range(6):
            rgb = np.dstack([grad, np.full_like(grad, 128), np.full_like(grad, 40 * i)])
            container.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        container.mux(stream.encode())
    flow_dir = tmp_path / "rawframes" / "cls" / "v0"
    flow_dir.mkdir(parents=True)
    for i in range(5):  # what prepare's default short side 256 writes
        for axis in "xy":
            cv2.imwrite(str(flow_dir / f"flow_{axis}_{i + 1:05d}.jpg"), np.full((256, 340), 128, np.uint8))
    annotation = tmp_path / "videos.txt"
    annotation.write_text("cls/v0.avi 0\n")
    data = loader(annotation, tmp_path / "videos", modality="video", train=False, batch_size=1,
                  num_segments=2, flow_length=2, num_classes=2)
    (batch,) = list(data)
    plan = plan_clip(6, 340, 256, num_segments=2, flow_length=2, train=False,
                     seed=0, epoch=0, index=0)
    marks = [denormalize_rgb(rgb)[..., 2].mean() for rgb in batch["rgb"][0]]
    np.testing.assert_allclose(marks, 40 * plan.frame_indices, atol=6)


@pytest.mark.timeout(120)
def test_workers_start_after_opencv_ran_its_thread_pool_here(tree):
    """A worker forked while OpenCV's thread pool runs in this process (after `prepare`'s
    flow, or any parallel cv2 call) hung in its set-up; the loader brings the pool down for
    the fork."""
    cv2.setNumThreads(2)
    cv2.GaussianBlur(np.random.rand(2048, 2048).astype(np.float32), (31, 31), 5)  # runs the pool
    workers = loader(*tree, num_workers=1)
    assert epoch_tensors(workers, 0)
    workers.close()
    assert cv2.getNumThreads() == 2  # restored


def test_test_crops_are_the_multicrop_views(tree):
    """data.test_crops: B·V clips per batch, a video's views contiguous, each view the
    multicrop box resized (flipped views mirrored, flow_x inverted); 1 view = the centre crop."""
    from ccs_fast.dataloader.multicrop import crop_views

    annotation, root = tree
    kw = dict(train=False, batch_size=2, num_segments=2, flow_length=2)
    single = next(iter(loader(annotation, root, **kw)))
    for crops in (3, 10):
        batch = next(iter(loader(annotation, root, test_crops=crops, **kw)))
        assert batch["rgb"].shape == (2 * crops, 2, 3, S, S) and batch["flow"].shape == (2 * crops, 2, 4, S, S)
        assert batch["views"] == crops and batch["label"].shape == (2,)
        plan = plan_clip(FRAMES, W, H, num_segments=2, flow_length=2, train=False,
                         seed=0, epoch=0, index=1)
        image = rgb_frame(int(plan.frame_indices[0]))  # video 1, segment 0
        for v, view in enumerate(crop_views(W, H, crops)):
            expected = crop_resize(image, view.box, S, view.flip).astype(np.float32)
            got = denormalize_rgb(batch["rgb"][crops + v, 0])
            assert np.abs(got - expected).max() < 3.0  # JPEG quality 100
            flow_x = crop_resize(XGRAD, view.box, S, view.flip)
            flow_x = invert_flow_x(flow_x) if view.flip else flow_x
            assert np.abs(batch["flow"][crops + v, 0, 0].numpy() - normalize_flow(flow_x)).max() < 3 / 128
    centre = next(iter(loader(annotation, root, test_crops=10, **kw)))
    assert torch.equal(centre["rgb"][4::10], single["rgb"]) and torch.equal(centre["flow"][4::10], single["flow"])


def test_3d_clips_follow_sample_frames(tmp_path):
    """clip_len: a video gives N·T frames on the segment axis, frame t of clip n at position
    n·T + t, each with its one flow pair, at the indices of sample_frames."""
    from ccs_fast.dataloader.sample_frames import flow_clip_indices

    annotation, root = make_rawframes(tmp_path, num_videos=3, flow_y_marks_index=True)
    batch = next(iter(loader(annotation, root, train=False, batch_size=3, num_segments=2, flow_length=1,
                             clip_len=4, frame_interval=2)))
    assert batch["rgb"].shape == (3, 8, 3, S, S) and batch["flow"].shape == (3, 8, 2, S, S)
    expected = flow_clip_indices(FRAMES, 4, 2, 2, train=False).reshape(-1)
    blue = np.stack([denormalize_rgb(batch["rgb"][0, p])[..., 2].mean() for p in range(8)])
    assert np.abs(blue - 20 * expected).max() < 3.0  # B channel marks the frame index
    flow_y = batch["flow"][0, :, 1].mean(dim=(1, 2)).numpy() * 128 + 128
    assert np.abs(flow_y - 20 * expected).max() < 3.0  # flow_y marks the flow index


def test_torch_and_synthetic_loaders_are_whole_loaders(assert_whole_loader, tmp_path):
    annotation, root = make_rawframes(tmp_path)
    torch_data = loader(annotation, root)
    assert_whole_loader(torch_data)
    assert torch_data.frame_count is not None and torch_data.num_classes == 3
    synthetic = build_loader(LoaderSpec(None, None, backend="synthetic", batch_size=2, num_segments=K,
                                        flow_length=L, input_size=S, device="cpu", num_classes=7,
                                        synthetic_batches=2))
    assert_whole_loader(synthetic)
    assert synthetic.frame_count is None and synthetic.num_classes == 7
    synthetic.set_epoch(1, first_batch=1)
    assert len(list(synthetic)) == 1 and synthetic.batches_done == 2
    synthetic.close()

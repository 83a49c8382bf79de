"""predict on video files says what prepare says (issue 23 #6): a video that decodes fewer
frames than its container declares is reported; a folder given as a video says it is one."""
import cv2
import numpy as np
import pytest
import torch

from ccs_fast.checkpoint import save_checkpoint
from ccs_fast.cli import main

W, H = 64, 48


@pytest.fixture
def checkpoint(tiny_config, tmp_path):
    pytest.importorskip("timm")
    from ccs_fast.model import build_model

    cfg = tiny_config(tmp_path)
    torch.manual_seed(int(np.random.default_rng().integers(1000)))
    return save_checkpoint(tmp_path / "last.pt", build_model(cfg.model), config=cfg.to_dict())


def _write_truncated_avi(path, frames, rng):
    """An MPEG-4 .avi whose header declares ``frames`` frames, cut so that fewer decode."""
    import av

    base = cv2.GaussianBlur(rng.integers(0, 255, (H, W, 3), dtype=np.uint8), (5, 5), 2)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        for t in range(frames):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.roll(base, 2 * t, axis=1), format="rgb24")))
        container.mux(stream.encode(None))
    data = path.read_bytes()
    declared = decoded = None
    for keep in np.linspace(0.85, 0.99, 15):  # the AVI's index goes; some trailing frames too
        path.write_bytes(data[:int(len(data) * keep)])
        try:
            with av.open(str(path)) as container:
                declared = container.streams.video[0].frames
                decoded = sum(1 for _ in container.decode(video=0))
        except av.FFmpegError:  # cut inside the header
            continue
        if 2 < decoded < frames:
            break
    assert declared == frames and 2 < decoded < frames
    return decoded


def test_video_decoding_fewer_frames_than_declared_is_reported(checkpoint, tmp_path, capsys):
    """Before: predicted without a word (prepare reported it)."""
    video = tmp_path / "short.avi"
    decoded = _write_truncated_avi(video, 16, np.random.default_rng())
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(checkpoint), "--flow", "farneback", "--short-side", "32",
                 str(video)]) == 0
    printed = capsys.readouterr().out
    assert (f"[predict] {video}: decoded {decoded} of the 16 frames its container declares (truncated?); "
            "predicted from the frames decoded") in printed
    assert str(video) in printed.split("|---|")[-1]  # and it is predicted


def test_a_folder_given_as_a_video_says_so(checkpoint, tmp_path, capsys):
    """Before: 'video not found' for a folder that is there."""
    folder = tmp_path / "v_Jump_g01_c01"
    folder.mkdir()
    (folder / "img_00001.jpg").write_bytes(b"")
    assert main(["predict", "--checkpoint", str(checkpoint), str(folder)]) == 2
    err = capsys.readouterr().err
    assert err == (f"ccs-fast: error: {folder}: is a folder, not a video file (rawframe folders are predicted "
                   "with --list)\n")


def test_video_file_loader_is_a_whole_loader_and_skips_bad_videos(assert_whole_loader, tmp_path):
    """One batch per good video (index: its place in the list); with skip_bad a bad one is a
    ``skipped_errors`` entry, as in the other backends."""
    from ccs_fast.dataloader import LoaderSpec, build_video_file_loader

    video = tmp_path / "short.avi"
    decoded = _write_truncated_avi(video, 16, np.random.default_rng(0))
    spec = LoaderSpec(None, None, num_segments=2, flow_length=2, input_size=16, device="cpu", skip_bad=True)
    loader = build_video_file_loader([tmp_path / "missing.avi", video], spec, flow="farneback", short_side=32)
    assert_whole_loader(loader)
    batches = list(loader)
    assert len(batches) == 1 and batches[0]["index"].tolist() == [1] and batches[0]["label"].tolist() == [-1]
    assert batches[0]["rgb"].shape == (1, 2, 3, 16, 16) and batches[0]["flow"].shape == (1, 2, 4, 16, 16)
    assert loader.skipped_errors == {0: f"{tmp_path / 'missing.avi'}: video not found"}
    assert loader.num_skipped == 1 and loader.batches_done == 2
    assert loader.short == [f"{video}: decoded {decoded} of the 16 frames its container declares (truncated?)"]

"""DALI backend (CPU pipeline) against the torch backend: same clips, same pixels.

Measured tolerance (CPU, libjpeg-turbo in both, 64×64 crops of 100×80 frames): the decoded
JPEGs are identical and DALI's bilinear resize differs from cv2.INTER_LINEAR by at most one
uint8 level (≤ 1/(255·0.224) ≈ 0.0177 after RGB normalisation, 1/128 ≈ 0.0078 after flow
normalisation), on ~12 % of RGB and ~3 % of flow values; the test allows one level and a
mean under a quarter level. VP9 video frames go through two different
YUV→RGB conversions (DALI vs PyAV/swscale): a few levels, checked with a looser bound.
"""
import shutil
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali")

from ccs_fast.dataloader import LoaderSpec, build_loader  # noqa: E402
from ccs_fast.dataloader.rawframes import jpeg_size  # noqa: E402
from ccs_fast.dataloader.flow import write_rawframes  # noqa: E402
from ccs_fast.dataloader.clip_plan import plan_clip  # noqa: E402
from ccs_fast.base.errors import CCSError  # noqa: E402

pytestmark = pytest.mark.dali

WIDTH, HEIGHT, SIZE, K, L = 100, 80, 64, 3, 4
FRAME_COUNTS = [9, 10, 12, 8, 11]  # 5 videos: batches of 2 leave a partial eval batch
RGB_ATOL = 1.01 / (255 * 0.224)  # one uint8 level of the narrowest ImageNet std
FLOW_ATOL = 1.01 / 128


def _frames(rng, n):
    """Smooth moving texture: realistic for JPEG and flow, cheap to make."""
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, 3)
    frames = []
    for t in range(n):
        channels = [127 + 100 * np.sin((x + 2 * t) / (7 + 3 * c) + phase[c]) * np.cos(y / 11)
                    for c in range(3)]
        frames.append(np.clip(np.stack(channels, -1), 0, 255).astype(np.uint8))
    return frames


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("dali")
    rng = np.random.default_rng(0)
    lines = []
    for v, n in enumerate(FRAME_COUNTS):
        write_rawframes(_frames(rng, n), root / "rawframes" / f"c{v % 2}" / f"v{v}",
                        method="farneback")
        lines.append(f"c{v % 2}/v{v} {n} {v % 2}\n")
    (root / "train.txt").write_text("".join(lines))
    return root


def _load(backend, annotation, data_root, *, epochs=(0,), **kw):
    options = dict(backend=backend, batch_size=2, num_segments=K, flow_length=L,
                   input_size=SIZE, device="cpu", seed=3, num_workers=1 if backend == "dali" else 0)
    options.update(kw)
    loader = build_loader(LoaderSpec(annotation, data_root, **options))
    out = []
    for epoch in epochs:
        loader.set_epoch(epoch)
        out.append(list(loader))
    return loader, out


@contextmanager
def deadline(seconds):
    """Fail instead of hanging if DALI or its workers stall."""
    def expire(*_):
        raise TimeoutError(f"no answer within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _assert_same_batches(dali_batches, torch_batches, rgb_atol=RGB_ATOL, flow_atol=FLOW_ATOL):
    assert len(dali_batches) == len(torch_batches)
    for d, t in zip(dali_batches, torch_batches):
        assert torch.equal(d["index"], t["index"])
        assert torch.equal(d["label"], t["label"])
        for key, atol in (("rgb", rgb_atol), ("flow", flow_atol)):
            diff = (d[key] - t[key]).abs()
            assert diff.max() <= atol, (key, float(diff.max()))
            assert diff.mean() < 0.25 * atol, (key, float(diff.mean()))


def test_train_agrees_with_torch_backend(tree):
    annotation = tree / "train.txt"
    with deadline(60):
        _, dali_epochs = _load("dali", annotation, tree / "rawframes", train=True, epochs=(0, 1))
    _, torch_epochs = _load("torch", annotation, tree / "rawframes", train=True, epochs=(0, 1))
    for dali_batches, torch_batches in zip(dali_epochs, torch_epochs):
        _assert_same_batches(dali_batches, torch_batches)
    assert not torch.equal(dali_epochs[0][0]["index"], dali_epochs[1][0]["index"]) or \
        not torch.equal(dali_epochs[0][0]["rgb"], dali_epochs[1][0]["rgb"])
    # the flip path (ROI start past its end, flow_x inverted) must have been exercised
    flips = [plan_clip(FRAME_COUNTS[int(i)], WIDTH, HEIGHT, num_segments=K, flow_length=L,
                       train=True, seed=3, epoch=e, index=int(i)).flip
             for e, batches in enumerate(dali_epochs) for b in batches for i in b["index"]]
    assert any(flips) and not all(flips)


def test_batch_layout(tree):
    with deadline(60):
        _, (batches,) = _load("dali", tree / "train.txt", tree / "rawframes", train=True,
                              dtype=torch.bfloat16)
    batch = batches[0]
    assert batch["rgb"].shape == (2, K, 3, SIZE, SIZE)
    assert batch["flow"].shape == (2, K, 2 * L, SIZE, SIZE)
    assert batch["rgb"].dtype == batch["flow"].dtype == torch.bfloat16
    assert batch["label"].dtype == batch["index"].dtype == torch.int64
    for key in ("rgb", "flow"):
        assert batch[key].flatten(0, 1).is_contiguous(memory_format=torch.channels_last)


def test_eval_covers_every_video_once_with_partial_batch(tree):
    annotation, root = tree / "train.txt", tree / "rawframes"
    with deadline(60):
        loader, (dali_batches,) = _load("dali", annotation, root, train=False)
        assert len(loader) == 3 and [len(b["index"]) for b in dali_batches] == [2, 2, 1]
        _, (torch_batches,) = _load("torch", annotation, root, train=False)
        _assert_same_batches(dali_batches, torch_batches)
        seen = []
        for rank in range(2):
            _, (batches,) = _load("dali", annotation, root, train=False, rank=rank, world_size=2)
            seen += [int(i) for b in batches for i in b["index"]]
    assert sorted(seen) == list(range(len(FRAME_COUNTS)))


@pytest.mark.parametrize("flow_size", [None, (120, 96)])
def test_video_modality_agrees_with_torch_backend(tmp_path, flow_size):
    """flow_size: flow computed on resized frames, as prepare does (320x240 -> 340x256);
    both backends resize the decoded frames to it (issue 12 #2)."""
    import cv2

    from ccs_fast.dataloader.synth import pick_video_codec, write_webm

    rng = np.random.default_rng(1)
    codec = pick_video_codec()
    lines = []
    for v, n in enumerate([8, 9, 10]):
        frames = _frames(rng, n)
        write_webm(frames, tmp_path / "videos" / f"v{v}.webm", codec=codec)
        if flow_size:
            frames = [cv2.resize(f, flow_size, interpolation=cv2.INTER_LINEAR) for f in frames]
        write_rawframes(frames, tmp_path / "rawframes" / f"v{v}", method="farneback")
        lines.append(f"v{v}.webm {v % 2}\n")
    (tmp_path / "videos.txt").write_text("".join(lines))
    kw = dict(train=True, modality="video", batch_size=3)
    with deadline(60):
        _, (dali_batches,) = _load("dali", tmp_path / "videos.txt", tmp_path / "videos", **kw)
    _, (torch_batches,) = _load("torch", tmp_path / "videos.txt", tmp_path / "videos", **kw)
    # the flow comes from the same rawframes; RGB through two YUV→RGB conversions
    _assert_same_batches(dali_batches, torch_batches, rgb_atol=12 / (255 * 0.224))


def _break_huffman_tables(data: bytes) -> bytes:
    """A JPEG whose header parses (SOI, SOF, EOI intact) but whose decoding fails."""
    at = data.index(b"\xff\xc4") + 5  # DHT marker, length, table class/id: code counts
    return data[:at] + b"\xff" * 16 + data[at + 16:]


@pytest.mark.parametrize("damage", ["truncate", "missing", "huffman", "half"])
def test_bad_jpeg_is_one_line_error_naming_the_file(tree, tmp_path, damage):
    root = tmp_path / "rawframes"
    shutil.copytree(tree / "rawframes", root)
    victim = root / "c0" / "v2" / "flow_y_00003.jpg"  # every clip of v2 reads it at eval
    if damage == "truncate":
        victim.write_bytes(victim.read_bytes()[:300])
    elif damage == "half":  # cut inside the scan data: OpenCV alone decodes it part grey
        data = victim.read_bytes()
        victim.write_bytes(data[: len(data) // 2])
    elif damage == "huffman":  # passes the source's header check; DALI's decoder fails and
        # skip_bad restarts the pipeline at that batch without the video
        victim.write_bytes(_break_huffman_tables(victim.read_bytes()))
    else:
        victim.unlink()
    annotation = tree / "train.txt"
    # in a child process with a timeout: a hang inside DALI would not see SIGALRM
    script = ("import sys\n"
              "from ccs_fast.dataloader import LoaderSpec, build_loader\n"
              "from ccs_fast.base.errors import CCSError\n"
              "loader = build_loader(LoaderSpec(sys.argv[1], sys.argv[2], backend='dali',\n"
              "    train=False,"
              f"    batch_size=2, num_segments=25, flow_length={L}, input_size={SIZE},\n"
              "    device='cpu', num_workers=1))\n"
              "try:\n"
              "    list(loader)\n"
              "except CCSError as error:\n"
              "    print('CCSError|' + str(error))\n"
              "loader = build_loader(LoaderSpec(sys.argv[1], sys.argv[2], backend='torch',\n"
              "    train=False,"
              f"    batch_size=2, num_segments=25, flow_length={L}, input_size={SIZE},\n"
              "    device='cpu', num_workers=0))\n"
              "try:\n"
              "    list(loader)\n"
              "except CCSError as error:\n"
              "    print('torch|' + str(error))\n")
    child = subprocess.run([sys.executable, "-c", script, str(annotation), str(root)],
                           capture_output=True, text=True, timeout=120)
    errors = [line for line in child.stdout.splitlines() if line.startswith("CCSError|")]
    assert child.returncode == 0 and len(errors) == 1, child.stdout + child.stderr
    assert str(victim) in errors[0]
    # issue 12 #1: the torch backend rejects the same file with the same line
    torch_errors = [line for line in child.stdout.splitlines() if line.startswith("torch|")]
    assert errors[0] == "CCSError|" + torch_errors[0].split("|", 1)[1]
    with deadline(60):
        # batches of one: v2's batch is all bad (DALI refuses empty batches; a placeholder
        # clip goes through the pipeline and is dropped)
        loader, (batches,) = _load("dali", annotation, root, train=False, num_segments=25,
                                   skip_bad=True, batch_size=1)
    assert loader.num_skipped == 1
    assert sorted(int(i) for b in batches for i in b["index"]) == [0, 1, 3, 4]
    # issue 12 #5: why, as the torch backend says it
    assert list(loader.skipped_errors) == [2] and str(victim) in loader.skipped_errors[2]


def test_jpeg_size_reads_the_header(tree):
    data = (tree / "rawframes" / "c0" / "v0" / "img_00001.jpg").read_bytes()
    assert jpeg_size(data) == (WIDTH, HEIGHT)
    with pytest.raises(ValueError):
        jpeg_size(data[: len(data) // 2])
    with pytest.raises(ValueError):
        jpeg_size(b"GIF89a" + data)


def test_epochs_resume_and_restart_deterministically(tree):
    annotation, root = tree / "train.txt", tree / "rawframes"
    with deadline(60):
        _, (first, _, third) = _load("dali", annotation, root, train=True, epochs=(0, 1, 2))
        loader, _ = _load("dali", annotation, root, train=True, epochs=())
        loader.set_epoch(2)  # a resumed run starts at a later epoch
        resumed = list(loader)
        loader.set_epoch(0)
        next(iter(loader))  # abandoned mid-epoch: the pipeline is rebuilt
        again = list(loader)
    for got, want in ((resumed, third), (again, first)):
        assert [b["index"].tolist() for b in got] == [b["index"].tolist() for b in want]
        assert all(torch.equal(g["rgb"], w["rgb"]) for g, w in zip(got, want))


def _encode(path, frames, codec):
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=25)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode(None))


def test_undecodable_codec_is_one_line_naming_file_and_codec(tmp_path, capfd):
    """Issue 12 #4: H.264 or MPEG-4 on DALI's CPU decoder gave a multi-line DALI traceback
    (and C++ log lines on stderr)."""
    from ccs_fast.dataloader.synth import pick_video_codec, write_webm

    rng = np.random.default_rng()
    lines = []
    for v, (name, codec) in enumerate([("v0.mp4", "libx264"), ("v1.webm", None),
                                       ("v2.avi", "mpeg4"), ("v3.webm", None)]):
        frames = _frames(rng, 8)
        if codec is None:
            write_webm(frames, tmp_path / "videos" / name, codec=pick_video_codec())
        else:
            _encode(tmp_path / "videos" / name, frames, codec)
        write_rawframes(frames, tmp_path / "rawframes" / name.split(".")[0], method="farneback")
        lines.append(f"{name} {v % 2}\n")
    (tmp_path / "videos.txt").write_text("".join(lines))
    kw = dict(train=False, modality="video", batch_size=2, epochs=(0,))
    capfd.readouterr()
    with pytest.raises(CCSError) as info:
        _load("dali", tmp_path / "videos.txt", tmp_path / "videos", **kw)
    message = str(info.value)
    assert message == (f"{tmp_path / 'videos' / 'v0.mp4'}: codec h264: DALI cannot decode it on the "
                       "CPU (its CPU decoder reads VP8, VP9 and MJPEG only); data.backend=torch "
                       "reads it (PyAV), or DALI on a GPU")
    assert capfd.readouterr().err == ""  # no DALI log line before ours
    with deadline(60):
        loader, (batches,) = _load("dali", tmp_path / "videos.txt", tmp_path / "videos",
                                   skip_bad=True, **kw)
    assert sorted(int(i) for b in batches for i in b["index"]) == [1, 3]
    reasons = sorted(loader.skipped_errors.items())
    assert [row for row, _ in reasons] == [0, 2]
    assert "codec h264" in reasons[0][1] and "v2.avi: codec mpeg4" in reasons[1][1]
    assert "or DALI on a GPU" not in reasons[1][1]  # DivX/XviD in AVI: no DALI reader takes it
    # the torch backend (PyAV) reads every one of them
    _, (batches,) = _load("torch", tmp_path / "videos.txt", tmp_path / "videos", **kw)
    assert sorted(int(i) for b in batches for i in b["index"]) == [0, 1, 2, 3]


def test_dali_codec_table_on_a_gpu():
    from ccs_fast.dataloader.dali_sources import check_dali_codec

    for codec in ("h264", "hevc", "av1", "vp9", "mpeg4"):
        check_dali_codec(Path("x.mp4"), codec, on_gpu=True)
    with pytest.raises(CCSError, match=r"x.avi: codec mpeg4: DALI cannot decode it on a GPU; "
                                       r"data.backend=torch reads it \(PyAV\)$"):
        check_dali_codec(Path("x.avi"), "mpeg4", on_gpu=True)
    with pytest.raises(CCSError, match="codec msmpeg4v3"):
        check_dali_codec(Path("x.avi"), "msmpeg4v3", on_gpu=True)


def test_test_crops_and_3d_clips_agree_with_torch_backend(tree):
    """Per-view crop arguments (10 crops: corners, centre, mirrored with flow_x inverted) and
    3-D clips (2 clips of 4 frames, one flow pair each) give the torch backend's batches,
    partial last batch included."""
    annotation, root = tree / "train.txt", tree / "rawframes"
    for options in (dict(train=False, num_segments=2, flow_length=2, test_crops=10),
                    dict(train=True, num_segments=2, flow_length=1, clip_len=4, frame_interval=2)):
        with deadline(90):
            _, (dali_batches,) = _load("dali", annotation, root, **options)
        _, (torch_batches,) = _load("torch", annotation, root, **options)
        _assert_same_batches(dali_batches, torch_batches)
        views = options.get("test_crops", 1)
        positions = options["num_segments"] * options.get("clip_len", 1)
        assert dali_batches[0]["rgb"].shape == (2 * views, positions, 3, SIZE, SIZE)
        assert dali_batches[0].get("views", 1) == views


def test_dali_loader_is_a_whole_loader(assert_whole_loader, tree):
    """The ``dataloader.Loader`` members, before and after an epoch of the CPU pipeline."""

    loader = build_loader(LoaderSpec(tree / "train.txt", tree / "rawframes", backend="dali", batch_size=2,
                                     num_segments=K, flow_length=L, input_size=SIZE, device="cpu",
                                     num_workers=1))
    assert_whole_loader(loader)
    assert loader.frame_count is not None and loader.num_classes == 2
    with deadline(60):
        assert len(list(loader)) == len(loader) and loader.batches_done == len(loader)
    loader.close()

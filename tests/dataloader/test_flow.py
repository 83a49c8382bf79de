"""Flow estimation, the denseflow uint8 mapping and atomic rawframes folders."""
import pickle

import cv2
import numpy as np
import pytest

from ccs_fast.base.atomic import atomic_dir
from ccs_fast.dataloader.flow import (
    FLOW_BOUND,
    flow_to_uint8,
    make_flow_estimator,
    uint8_to_flow,
    write_rawframes,
)


def _textured_frames(count, shift=(2, 0), size=48, seed=0):
    """Grey-textured RGB frames whose content moves by ``shift`` (dx, dy) pixels per frame."""
    rng = np.random.default_rng(seed)
    canvas = cv2.GaussianBlur(rng.integers(0, 256, (size * 2, size * 2)).astype(np.uint8),
                              (0, 0), 1.5)
    canvas = cv2.normalize(canvas, None, 20, 235, cv2.NORM_MINMAX)
    frames = []
    for t in range(count):
        moved = np.roll(canvas, (shift[1] * t, shift[0] * t), axis=(0, 1))
        grey = moved[size // 2:size // 2 + size, size // 2:size // 2 + size]
        frames.append(np.repeat(grey[..., None], 3, axis=2))
    return frames


def test_uint8_mapping_centre_ends_and_clipping():
    flow = np.array([[[0.0, 0.0], [FLOW_BOUND, -FLOW_BOUND], [3 * FLOW_BOUND, -99.0]]],
                    np.float32)
    fx, fy = flow_to_uint8(flow)
    assert fx.dtype == fy.dtype == np.uint8 and fx.shape == fy.shape == (1, 3)
    assert fx[0, 0] == 128 and fy[0, 0] == 128  # zero motion
    assert fx[0, 1] == 255 and fy[0, 1] == 0  # exactly the bound
    assert fx[0, 2] == 255 and fy[0, 2] == 0  # clipped beyond it
    assert fx.flags.c_contiguous and fy.flags.c_contiguous


def test_uint8_mapping_round_trip_and_custom_bound():
    rng = np.random.default_rng(1)
    flow = rng.uniform(-7.5, 7.5, (5, 7, 2)).astype(np.float32)
    back = uint8_to_flow(*flow_to_uint8(flow, bound=8.0), bound=8.0)
    assert np.abs(back - flow).max() <= 8.0 / 255 + 1e-6  # half of one level of 16/255


@pytest.mark.parametrize("method", ["farneback", "tvl1"])
@pytest.mark.parametrize("shift", [(2, 0), (0, -3)])
def test_flow_direction_matches_motion(method, shift):
    frames = _textured_frames(2, shift)
    grey = [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames]
    flow = make_flow_estimator(method)(grey[0], grey[1])
    assert flow.shape == (48, 48, 2) and flow.dtype == np.float32
    centre = flow[12:36, 12:36].reshape(-1, 2).mean(axis=0)
    np.testing.assert_allclose(centre, shift, atol=0.5)


def test_estimator_validates_and_pickles():
    with pytest.raises(ValueError, match="unknown flow method"):
        make_flow_estimator("deepflow")
    with pytest.raises(ValueError, match="unknown TV-L1 parameters"):
        make_flow_estimator("tvl1", warp=3)
    estimator = make_flow_estimator("tvl1", nscales=3)
    grey = np.zeros((16, 16), np.uint8)
    estimator(grey, grey)  # builds the OpenCV object, which must not go into the pickle
    clone = pickle.loads(pickle.dumps(estimator))
    assert clone(grey, grey).shape == (16, 16, 2)
    with pytest.raises(TypeError):
        estimator(grey.astype(np.float32), grey)


def test_write_rawframes_layout(tmp_path):
    frames = _textured_frames(4, (2, 0))
    out = tmp_path / "cls" / "video"
    assert write_rawframes(frames, out, method="farneback") == 4
    names = sorted(p.name for p in out.iterdir())
    assert names == ([f"flow_x_{i:05d}.jpg" for i in (1, 2, 3)]
                     + [f"flow_y_{i:05d}.jpg" for i in (1, 2, 3)]
                     + [f"img_{i:05d}.jpg" for i in (1, 2, 3, 4)])
    image = cv2.imread(str(out / "img_00004.jpg"), cv2.IMREAD_UNCHANGED)
    assert image.shape == (48, 48, 3)
    fx = cv2.imread(str(out / "flow_x_00002.jpg"), cv2.IMREAD_UNCHANGED)
    fy = cv2.imread(str(out / "flow_y_00002.jpg"), cv2.IMREAD_UNCHANGED)
    assert fx.shape == fy.shape == (48, 48) and fx.dtype == np.uint8  # grey JPEG
    dx = (fx[12:36, 12:36].astype(float).mean() - 128) * 2 * FLOW_BOUND / 255
    dy = (fy[12:36, 12:36].astype(float).mean() - 128) * 2 * FLOW_BOUND / 255
    assert dx == pytest.approx(2.0, abs=0.5) and dy == pytest.approx(0.0, abs=0.5)
    assert [p.name for p in tmp_path.joinpath("cls").iterdir()] == ["video"]  # no temp left


def test_write_rawframes_is_atomic(tmp_path):
    calls = []

    def failing_estimator(gray0, gray1):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("disk full")
        return np.zeros(gray0.shape + (2,), np.float32)

    out = tmp_path / "video"
    with pytest.raises(RuntimeError, match="disk full"):
        write_rawframes(_textured_frames(4), out, method=failing_estimator)
    assert list(tmp_path.iterdir()) == []  # neither the folder nor its temporary twin

    with pytest.raises(ValueError, match="no frames"):
        write_rawframes([], out, method="farneback")
    assert list(tmp_path.iterdir()) == []


def test_existing_folder_kept_unless_overwrite(tmp_path):
    out = tmp_path / "video"
    write_rawframes(_textured_frames(3), out, method="farneback")
    with pytest.raises(FileExistsError):
        write_rawframes(_textured_frames(2), out, method="farneback")
    assert len(list(out.glob("img_*.jpg"))) == 3

    with pytest.raises(RuntimeError):
        atomic_dir(out, lambda folder: (_ for _ in ()).throw(RuntimeError("boom")),
                   overwrite=True)
    assert len(list(out.glob("img_*.jpg"))) == 3  # a failed overwrite keeps the old folder

    assert write_rawframes(_textured_frames(2), out, method="farneback", overwrite=True) == 2
    assert len(list(out.glob("img_*.jpg"))) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["video"]


def test_tvl1_torch_on_cpu_runs_with_one_intra_op_thread(monkeypatch):
    """Issue 22 #10: with several intra-op threads tvl1-torch's many small ops stall at their
    barriers when other jobs hold the cores (more than 20x slower measured); the CPU
    estimator runs with one thread and restores the caller's setting."""
    import torch

    import ccs_fast.dataloader.tvl1 as tvl1

    seen = []
    real = tvl1.tvl1_flow
    monkeypatch.setattr(tvl1, "tvl1_flow", lambda *a, **k: seen.append(torch.get_num_threads()) or real(*a, **k))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        rng = np.random.default_rng()
        gray0 = rng.integers(0, 256, (24, 20), dtype=np.uint8)
        flow = make_flow_estimator("tvl1-torch", device="cpu", nscales=1, warps=1)(gray0, np.roll(gray0, 1, axis=1))
        assert flow.shape == (24, 20, 2) and seen == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)

"""Multi-crop test views: crop geometry, mirrored flow_x inverted, numpy and torch, score averaging."""
import numpy as np
import pytest
import torch

from ccs_fast.dataloader.multicrop import (CropView, apply_view, average_view_scores, crop_views, multi_crop)
from ccs_fast.dataloader.sampling import test_crop as sampling_test_crop
from ccs_fast.dataloader.transforms import invert_flow_x, normalize_flow


def _rng():
    return np.random.default_rng(np.random.SeedSequence().entropy)


def test_centre_crop_is_the_single_view_test_crop():
    (view,) = crop_views(340, 256, 1)
    assert view.box == sampling_test_crop(340, 256) == (58, 16, 224, 224) and not view.flip


def test_three_crops_along_the_long_side():
    assert [v.box for v in crop_views(340, 256, 3)] == [(0, 0, 256, 256), (42, 0, 256, 256), (84, 0, 256, 256)]
    assert [v.box for v in crop_views(240, 320, 3)] == [(0, 0, 240, 240), (0, 40, 240, 240), (0, 80, 240, 240)]


def test_ten_crops_corners_centre_and_mirrors():
    views = crop_views(340, 256, 10)
    # step = (340 - 224) // 4 = 29 across, (256 - 224) // 4 = 8 down
    corners = [(0, 0), (116, 0), (0, 32), (116, 32), (58, 16)]
    assert [(v.x0, v.y0) for v in views] == corners + corners
    assert [v.flip for v in views] == [False] * 5 + [True] * 5
    assert all(v.w == v.h == 224 and v.x0 + v.w <= 340 and v.y0 + v.h <= 256 for v in views)
    with pytest.raises(ValueError, match="num_crops"):
        crop_views(340, 256, 5)
    with pytest.raises(ValueError, match="does not fit"):
        crop_views(100, 80, 10, crop_size=90)


@pytest.mark.parametrize("as_tensor", [False, True])
def test_flipped_views_invert_flow_x_uint8(as_tensor):
    flow = _rng().integers(0, 256, size=(3, 10, 20, 28), dtype=np.uint8)  # (K, 2L, H, W)
    frames = torch.from_numpy(flow) if as_tensor else flow
    views = crop_views(28, 20, 10, crop_size=16)
    out = multi_crop(frames, 10, crop_size=16, flow_x_channels=slice(0, None, 2))
    out = out.numpy() if as_tensor else out
    assert out.shape == (10, 3, 10, 16, 16) and out.dtype == np.uint8
    for got, view in zip(out, views):
        patch = flow[..., view.y0:view.y0 + 16, view.x0:view.x0 + 16]
        if not view.flip:
            np.testing.assert_array_equal(got, patch)
            continue
        mirrored = patch[..., ::-1]
        np.testing.assert_array_equal(got[:, 1::2], mirrored[:, 1::2])  # flow_y only mirrored
        np.testing.assert_array_equal(got[:, 0::2], invert_flow_x(mirrored[:, 0::2]))


def test_float_flow_negated_and_matches_uint8_inversion_within_one_level():
    flow_u8 = _rng().integers(0, 256, size=(2, 4, 12, 12), dtype=np.uint8)
    flow = torch.from_numpy(normalize_flow(flow_u8))  # (v - 128) / 128, centred at zero
    view = CropView(2, 1, 8, 8, True)
    got = apply_view(flow, view, flow_x_channels=slice(0, None, 2))
    mirrored = flow[..., 1:9, 2:10].flip(-1)
    torch.testing.assert_close(got[:, 0::2], -mirrored[:, 0::2])
    torch.testing.assert_close(got[:, 1::2], mirrored[:, 1::2])
    from_u8 = torch.from_numpy(normalize_flow(apply_view(flow_u8, view, flow_x_channels=slice(0, None, 2))))
    assert (from_u8 - got).abs().max() <= 1 / 128 + 1e-6


def test_rgb_view_mirrored_without_inversion_and_input_untouched():
    rgb = torch.rand(2, 3, 3, 10, 14)  # (B, K, 3, H, W)
    before = rgb.clone()
    out = multi_crop(rgb, 10, crop_size=8)
    assert out.shape == (10, 2, 3, 3, 8, 8)
    view = crop_views(14, 10, 10, crop_size=8)[7]
    torch.testing.assert_close(out[7], rgb[..., view.y0:view.y0 + 8, view.x0:view.x0 + 8].flip(-1))
    torch.testing.assert_close(rgb, before)


def test_three_d_flow_clip_channel_axis():
    clip = torch.randn(2, 2, 4, 9, 9)  # (B, 2, T, H, W), x then y per time step
    view = CropView(1, 0, 8, 8, True)
    got = apply_view(clip, view, flow_x_channels=0, channel_axis=-4)
    mirrored = clip[..., 0:8, 1:9].flip(-1)
    torch.testing.assert_close(got[:, 0], -mirrored[:, 0])
    torch.testing.assert_close(got[:, 1], mirrored[:, 1])


def test_average_view_scores():
    scores = torch.randn(4 * 3, 6)
    expected = scores.view(4, 3, 6).mean(1)
    torch.testing.assert_close(average_view_scores(scores, 3), expected)
    torch.testing.assert_close(average_view_scores(scores.view(4, 3, 6)), expected)
    probs = average_view_scores(scores, 3, mode="prob")
    torch.testing.assert_close(probs, scores.softmax(-1).view(4, 3, 6).mean(1))
    torch.testing.assert_close(probs.sum(-1), torch.ones(4))
    with pytest.raises(ValueError, match="num_views"):
        average_view_scores(scores, 5)

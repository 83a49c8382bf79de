"""Multi-crop test views: crop geometry (the loaders' pixels of each view, flow_x inverted on
mirrored ones: tests/dataloader/test_torch_loader.py, tests/dataloader/test_dali.py; the averaging of their scores:
tests/ccs_fast/test_evaluate.py)."""
import pytest

from ccs_fast.dataloader.multicrop import crop_views
from ccs_fast.dataloader.clip_plan import centre_crop


def test_centre_crop_is_the_single_view_test_crop():
    (view,) = crop_views(340, 256, 1)
    assert view.box == centre_crop(340, 256) == (58, 16, 224, 224) and not view.flip


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


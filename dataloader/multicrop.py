"""Multi-crop test views (TSN / MMAction2 testing): 1, 3 or 10 crops per frame (the scores of a
video's views are averaged by ``ccs_fast.evaluate.average_view_scores``).

Geometry (``crop_views(width, height, num_crops, crop_size=None) -> list[CropView]``), in source
pixels, with ``short = min(width, height)``:

- 1 (``CenterCrop``): the centred square of side ``crop_size``, default ``round(0.875 · short)``,
  the same box as ``clip_plan.centre_crop``.
- 3 (``ThreeCrop``): three squares of side ``crop_size``, default ``short`` (MMAction2 takes
  the short side after resizing it to 256), at the start, middle and end of the long side,
  centred on the short side.
- 10 (``TenCrop``): squares of side ``crop_size`` (default ``round(0.875 · short)``) at the four
  corners and the centre, on the grid ``step = (size − crop) // 4`` that TSN's corner cropping and
  ``clip_plan.train_crop`` use (corners at 0 and 4·step, centre at 2·step), then the same five
  mirrored.

Pixels: the loaders cut each view with ``transforms.crop_resize(frame, view.box, size,
view.flip)``, and a mirrored view's flow_x becomes ``255 − v`` (``transforms.invert_flow_x``),
as in the training flip.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


CROP_COUNTS = (1, 3, 10)
DEFAULT_CROP_SCALE = 0.875  # TSN/MMAction2: 224 of 256


@dataclass(frozen=True)
class CropView:
    x0: int
    y0: int
    w: int
    h: int
    flip: bool

    @property
    def box(self) -> tuple[int, int, int, int]:
        """(x0, y0, w, h), the crop argument of ``transforms.crop_resize``."""
        return (self.x0, self.y0, self.w, self.h)


def crop_views(width: int, height: int, num_crops: int, crop_size: Optional[int] = None) -> list[CropView]:
    """The ``num_crops`` (1, 3 or 10) views of a width × height frame (module docstring)."""
    if num_crops not in CROP_COUNTS:
        raise ValueError(f"num_crops must be one of {', '.join(map(str, CROP_COUNTS))}, got {num_crops}")
    short = min(width, height)
    if crop_size is None:
        crop_size = short if num_crops == 3 else round(DEFAULT_CROP_SCALE * short)
    if not 1 <= crop_size <= short:
        raise ValueError(f"crop_size {crop_size} does not fit a {width}x{height} frame")
    s = crop_size
    if num_crops == 1:
        return [CropView((width - s) // 2, (height - s) // 2, s, s, False)]
    if num_crops == 3:
        if width >= height:
            y0 = (height - s) // 2
            return [CropView(x0, y0, s, s, False) for x0 in (0, (width - s) // 2, width - s)]
        x0 = (width - s) // 2
        return [CropView(x0, y0, s, s, False) for y0 in (0, (height - s) // 2, height - s)]
    ws, hs = (width - s) // 4, (height - s) // 4
    positions = ((0, 0), (4 * ws, 0), (0, 4 * hs), (4 * ws, 4 * hs), (2 * ws, 2 * hs))
    return [CropView(x0, y0, s, s, flip) for flip in (False, True) for x0, y0 in positions]


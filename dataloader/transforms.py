"""Pixel operations of the clip (numpy/cv2): crop, resize, flip, normalise, stack flow.

Shared by the torch backend and used by the DALI tests as the reference. Images are HWC
(or HW for grey flow) uint8 until normalisation; outputs stay HWC so a batch stored as
(B, K, S, S, C) and permuted to (B, K, C, S, S) is channels_last after ``flatten(0, 1)``.
"""
from __future__ import annotations

import cv2
import numpy as np

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
# denseflow maps flow in [-bound, bound] linearly to 0..255, so 128 is zero motion.
FLOW_MEAN = 128.0
FLOW_STD = 128.0


def crop_resize(img: np.ndarray, crop, size: int, flip: bool) -> np.ndarray:
    """Crop (x0, y0, w, h), resize to size × size bilinear (no antialias), mirror if flip.

    Mirroring only; a flipped flow_x image must also go through ``invert_flow_x``.
    """
    x0, y0, w, h = crop
    patch = img[y0:y0 + h, x0:x0 + w]
    out = cv2.resize(patch, (size, size), interpolation=cv2.INTER_LINEAR)
    if flip:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)


def invert_flow_x(flow_x: np.ndarray) -> np.ndarray:
    """Horizontal flow of a mirrored image: motion to the right becomes motion to the left."""
    return 255 - flow_x


def normalize_rgb(img: np.ndarray) -> np.ndarray:
    """uint8 RGB (..., 3) → float32 (x/255 − ImageNet mean)/std."""
    return (img.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD


def normalize_flow(flow: np.ndarray) -> np.ndarray:
    """uint8 flow → float32 (x − 128)/128."""
    return (flow.astype(np.float32) - FLOW_MEAN) / FLOW_STD


def stack_flow(fx_list, fy_list) -> np.ndarray:
    """L grey flow_x and L flow_y images (H, W) → (H, W, 2L) in order x1, y1, x2, y2, …"""
    if len(fx_list) != len(fy_list):
        raise ValueError(f"{len(fx_list)} flow_x images but {len(fy_list)} flow_y images")
    interleaved = [img for pair in zip(fx_list, fy_list) for img in pair]
    return np.stack(interleaved, axis=-1)


def video_frame_rgb(frame) -> np.ndarray:
    """A decoded PyAV video frame as RGB uint8 (H, W, 3), converted by swscale on this
    thread alone. From PyAV 17 the conversion defaults to a pool of threads sized to the CPUs
    (``threads=0``), which stays in the process after the first conversion; a DataLoader
    worker forked from that process then waits for ever in its own first conversion (seen
    with PyAV 19). Earlier PyAV converts on one thread and has no ``threads`` argument."""
    try:
        return frame.to_ndarray(format="rgb24", threads=1)
    except TypeError:
        return frame.to_ndarray(format="rgb24")

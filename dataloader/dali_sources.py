"""The DALI backend's external source and checks: everything about a clip that is not pixels.

``ClipSource`` is the parallel batch-mode ``fn.external_source`` of the pipeline in
``dali.py``, run in DALI's Python worker processes: it takes the rank's batches of the epoch
from the same samplers as the torch backend, plans every clip with ``plan_clip(seed, epoch,
index)``, reads the encoded bytes of the chosen files, checks them with the torch backend's
checks and messages (``rawframes.py``: missing frame, JPEG without SOI/SOF/EOI; then a frame
size that differs within a video, a video shorter than the flow stack) and passes the crop
box, flip and flow normalisation as per-sample arguments (``_crop_arguments``; flow_x →
255 − flow_x on flip is folded into the normalisation: (x − 127)/(−128)).

With V test crops a clip's samples are its V views one after another, each with its own crop
box and flip (``clip_plan.view_plans``). A batch left with no clip by skip_bad carries a
placeholder the loader drops (DALI refuses empty batches).

Codec checks (``check_dali_codec``, ``video_codec``): which videos DALI's decoder can read,
checked before DALI sees the bytes, so a refusal is one line, not a DALI traceback.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ccs_fast.base.errors import CCSError, bad_file

from .rawframes import checked_jpeg, frame_size, frames_folder, read_file_bytes
from .clip_plan import plan_clip, view_plans
from .transforms import FLOW_MEAN, FLOW_STD


class ClipSource:
    """Batch-mode DALI source: batch ``i`` of epoch ``epoch_base + epoch_idx`` of one rank.

    ``records`` are the usable videos (as the torch backend resolves them), ``rows`` their
    annotation rows (the ``index`` of a clip, which also seeds its plan); the sampler draws
    positions in ``records``. Picklable (plain data), so it runs in DALI's worker processes
    under fork or spawn; the per-video caches (frame size, video length) fill per worker.
    """

    def __init__(self, records, rows, spec, flow_root, sampler):
        self.records = records
        self.rows = rows
        self.data_root = Path(spec.data_root)
        self.flow_root = Path(flow_root)
        self.sampler = sampler
        self.spec = spec
        # A pipeline built for epoch e (restarted at batch i after a decoder failure) sees
        # DALI's epoch_idx 0 and iteration 0 there.
        self.epoch_base = 0
        self.iteration_base = 0
        self.excluded = set()  # videos whose frames DALI could not decode (skip_bad)
        self._batches_of_epoch = {}
        self._video_info = {}

    # -- what each batch holds -------------------------------------------------------
    def epoch_batches(self, epoch: int) -> list[list[int]]:
        if epoch not in self._batches_of_epoch:
            self.sampler.set_epoch(epoch)
            self._batches_of_epoch = {epoch: [list(b) for b in self.sampler]}
        return self._batches_of_epoch[epoch]

    def frames_dir(self, index: int) -> Path:
        return frames_folder(self.records[index].path, modality=self.spec.modality, data_root=self.data_root,
                             flow_root=self.flow_root)

    def plan(self, index: int, epoch: int):
        """(ClipPlan, video info) of one clip; CCSError naming the video if it cannot be
        planned (too short, unreadable first frame or video, frames past the video's end)."""
        opts = self.spec
        info = self._describe(index)
        try:
            plan = plan_clip(info["num_frames"], info["width"], info["height"],
                             num_segments=opts.num_segments, flow_length=opts.flow_length,
                             train=opts.train, seed=opts.seed,
                             epoch=epoch, index=self.rows[index], clip_len=opts.clip_len,
                             frame_interval=opts.frame_interval)
        except ValueError as exc:
            raise bad_file(info["name"], str(exc)) from None
        if info.get("video_frames") is not None:
            last = int(plan.frame_indices.max())
            if last >= info["video_frames"]:
                raise bad_file(info["video"], f"frame {last} requested but the video has "
                                              f"{info['video_frames']} frames")
        return plan, info

    def _describe(self, index: int) -> dict:
        if index in self._video_info:
            return self._video_info[index]
        record = self.records[index]
        folder = self.frames_dir(index)
        if self.spec.modality == "video":
            video = self.data_root / record.path
            _, _, video_frames, codec = _video_geometry(video)
            check_dali_codec(video, codec, torch.device(self.spec.device).type == "cuda")
            # decoded frames are resized to the flow's size (prepare's 340x256 for 320x240)
            width, height = frame_size(self.spec.naming.flow(folder, 0)[0])
            info = dict(name=video, video=video, video_frames=video_frames)
        else:
            width, height = frame_size(self.spec.naming.rgb(folder, record.offset))
            info = dict(name=folder)
        info.update(num_frames=record.num_frames, width=width, height=height)
        self._video_info[index] = info
        return info

    # -- the DALI callback -----------------------------------------------------------
    def __call__(self, batch_info):
        epoch = self.epoch_base + batch_info.epoch_idx
        iteration = batch_info.iteration + (self.iteration_base if batch_info.epoch_idx == 0
                                            else 0)
        batches = self.epoch_batches(epoch)
        if iteration >= len(batches):
            raise StopIteration
        segments = []
        for index in batches[iteration]:
            segments.extend(self.try_read_clip(index, epoch) or [])
        if not segments:  # DALI refuses empty batches: send one clip the loader drops
            if self.spec.modality == "video":
                raise CCSError(f"{self.data_root}: every video of batch {iteration} "
                               f"of epoch {epoch} is bad input")
            segments = self.placeholder_clip()
        return tuple(list(column) for column in zip(*segments))

    def try_read_clip(self, index: int, epoch: int) -> list[tuple] | None:
        """``read_clip``, or None for a clip that skip_bad drops."""
        if index in self.excluded:
            return None
        try:
            return self.read_clip(index, epoch)
        except CCSError:
            if not self.spec.skip_bad:
                raise
            return None

    def placeholder_clip(self) -> list[tuple]:
        """A clip's samples of a black 16×16 JPEG with index −1 (dropped by the loader)."""
        import cv2

        opts = self.spec
        jpeg = np.ascontiguousarray(cv2.imencode(".jpg", np.zeros((16, 16), np.uint8))[1].ravel())
        mean = np.full(2 * opts.flow_length, FLOW_MEAN, dtype=np.float32)
        std = np.full(2 * opts.flow_length, FLOW_STD, dtype=np.float32)
        segment = (jpeg, *[jpeg] * (2 * opts.flow_length), *_crop_arguments((0, 0, 16, 16), False),
                   mean, std, np.array(-1, dtype=np.int64), np.array(-1, dtype=np.int64))
        return [segment] * opts.samples_per_video

    def read_clip(self, index: int, epoch: int) -> list[tuple]:
        """The DALI samples of one clip: one tuple of outputs per position (segment, or frame
        of a 3-D clip), view after view (``spec.samples_per_video`` in all)."""
        opts = self.spec
        plan, info = self.plan(index, epoch)
        size = (info["width"], info["height"])
        segments = []
        for view in view_plans(plan, info["width"], info["height"], opts.views):
            segments += self._read_view(index, view, info, size)
        return segments

    def _read_view(self, index: int, plan, info: dict, size) -> list[tuple]:
        opts = self.spec
        folder = self.frames_dir(index)
        crop_args = _crop_arguments(plan.crop, plan.flip)
        # flow_x → 255 − flow_x on flip, folded into the normalisation: (x − 127)/(−128)
        x_mean, x_std = (FLOW_MEAN - 1.0, -FLOW_STD) if plan.flip else (FLOW_MEAN, FLOW_STD)
        flow_mean = np.array([x_mean, FLOW_MEAN] * opts.flow_length, dtype=np.float32)
        flow_std = np.array([x_std, FLOW_STD] * opts.flow_length, dtype=np.float32)
        record = self.records[index]
        label = np.array(-1 if record.label is None else record.label, dtype=np.int64)
        row = np.array(self.rows[index], dtype=np.int64)
        if opts.modality == "video":
            video_bytes = _read_video_bytes(info["video"])
        segments = []
        for k in range(len(plan.frame_indices)):
            if opts.modality == "video":
                rgb = (video_bytes, np.array([plan.frame_indices[k]], dtype=np.int32),
                       np.array([info["height"], info["width"]], dtype=np.float32))
            else:
                rgb = (_read_jpeg(opts.naming.rgb(folder, record.offset + plan.frame_indices[k]),
                                  size),)
            flows = []
            for t in plan.flow_indices[k]:
                path_x, path_y = opts.naming.flow(folder, record.offset + t)
                flows.append(_read_jpeg(path_x, size))
                flows.append(_read_jpeg(path_y, size))
            segments.append((*rgb, *flows, *crop_args, flow_mean, flow_std, label, row))
        return segments


def _crop_arguments(crop, flip):
    """(anchor, shape) of fn.slice and (roi_start, roi_end) of fn.resize, all (y, x).

    Slicing first makes the resize clamp at the crop's edges, as cv2 does on the cropped
    patch (a ROI alone would blend in the pixels just outside the crop). The ROI spans the
    whole slice; its x start past its end mirrors the output.
    """
    x0, y0, w, h = crop
    xs, xe = (w, 0) if flip else (0, w)
    return (np.array([y0, x0], dtype=np.int64), np.array([h, w], dtype=np.int64),
            np.array([0, xs], dtype=np.float32), np.array([h, xe], dtype=np.float32))


def _read_video_bytes(path: Path) -> np.ndarray:
    return read_file_bytes(path, missing="video not found", empty="empty file")


def _read_jpeg(path: Path, size) -> np.ndarray:
    data, found = checked_jpeg(path)
    if found != tuple(size):
        raise bad_file(path, f"frame is {found[0]}x{found[1]}, "
                             f"the video's frames are {size[0]}x{size[1]}")
    return data


# What DALI's fn.decoders.video decodes (DALI 2.4; shared/notes/dali.md): the CPU operator
# VP8, VP9 and MJPEG only; NVDEC on a GPU also H.264, HEVC, AV1 and MPEG-4 part 2, except in
# an AVI container (UCF-101's DivX/XviD .avi files), which DALI's demuxing refuses.
DALI_CPU_CODECS = frozenset({"vp8", "vp9", "mjpeg"})
DALI_GPU_CODECS = DALI_CPU_CODECS | {"h264", "hevc", "av1", "mpeg4"}


def check_dali_codec(path: Path, codec: str, on_gpu: bool) -> None:
    """CCSError naming the video and its codec when DALI's video decoder cannot read it
    (checked before DALI sees the bytes, so no DALI traceback or C++ log line appears)."""
    avi = Path(path).suffix.lower() == ".avi"
    if on_gpu and codec in DALI_GPU_CODECS and not (codec == "mpeg4" and avi):
        return
    if not on_gpu and codec in DALI_CPU_CODECS:
        return
    where = "on a GPU" if on_gpu else "on the CPU (its CPU decoder reads VP8, VP9 and MJPEG only)"
    gpu_note = ", or DALI on a GPU" if not on_gpu and codec in DALI_GPU_CODECS and not avi else ""
    raise bad_file(path, f"codec {codec}: DALI cannot decode it {where}; "
                         f"data.backend=torch reads it (PyAV){gpu_note}")


def video_codec(path: Path) -> str:
    """The codec name of a video's first video stream (FFmpeg's, e.g. h264, vp9, mpeg4)."""
    import av

    if not path.is_file():
        raise bad_file(path, "video not found")
    try:
        with av.open(str(path)) as container:
            return container.streams.video[0].codec_context.name
    except (av.error.FFmpegError, IndexError) as exc:
        raise bad_file(path, f"unreadable video ({exc.__class__.__name__})") from None


def _video_geometry(path: Path):
    """(width, height, frame count, codec name) of a video, counting packets (no decoding)."""
    import av

    if not path.is_file():
        raise bad_file(path, "video not found")
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            width, height = stream.codec_context.width, stream.codec_context.height
            codec = stream.codec_context.name
            frames = sum(1 for packet in container.demux(stream) if packet.size)
    except (av.error.FFmpegError, IndexError) as exc:
        raise bad_file(path, f"unreadable video ({exc.__class__.__name__})") from None
    if not width or not height or not frames:
        raise bad_file(path, "video has no decodable frames")
    return width, height, frames, codec

"""Rawframes on disk, as both loader backends, ``prepare`` and ``synth`` see them: file names,
bytes and JPEG checks, frame counts and the annotation records resolved against the files.

Names follow MMAction2's settings: ``filename_tmpl`` (RGB, ``img_{:05d}.jpg``), ``flow_tmpl``
(``flow_{}_{:05d}.jpg``, the ``{}`` taking ``x`` / ``y``) and ``start_index`` (the number of
the first file, 1 by default). Frame indices inside the loader are 0-based; file ``i`` is
``tmpl.format(i + start_index)``.

Every frame is read as bytes and checked before it is decoded: SOI at the start, an EOI
marker in its last 32 bytes, a SOF header with a non-empty size. A truncated JPEG (the
common damage of an interrupted copy or extraction) fails the EOI check, so neither backend
hands it to a decoder that would return a partly grey image with only a libjpeg warning on
stderr. Both backends raise the same one-line messages, ``<file>: missing frame``,
``<file>: cannot decode (truncated JPEG: no end-of-image marker)``, etc. Corruption inside
the entropy-coded data with intact markers is left to the decoder, which fails on it.

Records (``load_records``): a list's lines become the videos a loader can use, with their
RGB frame counts (a list may count flow frames instead: detected from the files or told by
``data.flow_count``) and the one-line reasons of the videos skipped as bad.
"""
from __future__ import annotations

import os
import re
import string
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ccs_fast.base.errors import CCSError, bad_file, read_failure

from .formats import VideoRecord, read_annotation
from .clip_plan import num_flow_frames

_SOF_MARKERS = frozenset([0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7,
                          0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF])


@dataclass(frozen=True)
class FrameNaming:
    """File names of the frames of one video folder (MMAction2's settings)."""
    filename_tmpl: str = "img_{:05d}.jpg"
    flow_tmpl: str = "flow_{}_{:05d}.jpg"
    start_index: int = 1

    def rgb(self, frame_dir, i: int) -> Path:
        """RGB frame of 0-based index ``i``."""
        return Path(frame_dir) / self.filename_tmpl.format(int(i) + self.start_index)

    def flow(self, frame_dir, i: int) -> tuple[Path, Path]:
        """(flow_x, flow_y) of 0-based flow index ``i``."""
        number = int(i) + self.start_index
        return (Path(frame_dir) / self.flow_tmpl.format("x", number),
                Path(frame_dir) / self.flow_tmpl.format("y", number))

    def flow_x_pattern(self) -> re.Pattern:
        return template_pattern(self.flow_tmpl, "x")

    def rgb_pattern(self) -> re.Pattern:
        return template_pattern(self.filename_tmpl)


def template_pattern(tmpl: str, axis: str | None = None) -> re.Pattern:
    """A regex matching the names ``tmpl`` produces (``axis`` fills an empty ``{}`` that
    comes before the number field)."""
    parts = []
    fields = 0
    for literal, name, spec, _ in string.Formatter().parse(tmpl):
        parts.append(re.escape(literal))
        if name is None:
            continue
        fields += 1
        if axis is not None and fields == 1 and tmpl.count("{") == 2:
            parts.append(re.escape(axis))
        else:
            parts.append(r"\d+")
    return re.compile("".join(parts) + r"\Z")


def check_templates(filename_tmpl: str, flow_tmpl: str, start_index: int, where="config"):
    """ValueError with the reason when a template does not format as MMAction2's do."""
    try:
        filename_tmpl.format(start_index)
    except (IndexError, KeyError, ValueError):
        raise ValueError(f"data.filename_tmpl = {filename_tmpl!r}: must take one frame number, "
                         "e.g. img_{:05d}.jpg") from None
    try:
        if flow_tmpl.format("x", start_index) == flow_tmpl.format("y", start_index):
            raise ValueError
    except (IndexError, KeyError, ValueError):
        raise ValueError(f"data.flow_tmpl = {flow_tmpl!r}: must take the direction (x or y) "
                         "and a frame number, e.g. flow_{}_{:05d}.jpg") from None


def add_naming_arguments(parser) -> None:
    """``--filename-tmpl``, ``--flow-tmpl``, ``--start-index`` (prepare, synth)."""
    default = FrameNaming()
    parser.add_argument("--filename-tmpl", default=default.filename_tmpl,
                        help="RGB frame names, as data.filename_tmpl (default %(default)s)")
    parser.add_argument("--flow-tmpl", default=default.flow_tmpl,
                        help="flow frame names, {} = x | y, as data.flow_tmpl (default "
                             "%(default)s; {}_{:05d}.jpg gives x_00001.jpg)")
    parser.add_argument("--start-index", type=int, default=default.start_index,
                        help="number of the first frame file, as data.start_index "
                             "(default %(default)s)")


def naming_from_arguments(args) -> FrameNaming:
    """The FrameNaming of ``add_naming_arguments``' options; CCSError when a template or the
    start index is unusable."""
    from ccs_fast.base.errors import CCSError

    if args.start_index < 0:
        raise CCSError(f"--start-index {args.start_index}: must be >= 0")
    try:
        check_templates(args.filename_tmpl, args.flow_tmpl, args.start_index)
    except ValueError as exc:
        raise CCSError(str(exc).replace("data.filename_tmpl", "--filename-tmpl")
                       .replace("data.flow_tmpl", "--flow-tmpl")) from None
    return FrameNaming(args.filename_tmpl, args.flow_tmpl, args.start_index)


def read_frame_bytes(path) -> np.ndarray:
    """The bytes of a frame file; CCSError ``missing frame``, ``cannot read (...)`` or
    ``cannot decode (empty file)``."""
    return read_file_bytes(path, missing="missing frame", empty="cannot decode (empty file)")


def read_file_bytes(path, missing: str, empty: str) -> np.ndarray:
    """The bytes of a frame or video file; one CCSError line naming it when it is missing
    (``missing``), unreadable (``cannot read (...)``) or empty (``empty``)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise read_failure(path, exc, "cannot read", missing) from None
    if not data:
        raise bad_file(path, empty)
    return np.frombuffer(data, dtype=np.uint8)


def jpeg_size(data) -> tuple[int, int]:
    """(width, height) from a JPEG's SOF header; ValueError with the reason if the bytes are
    not a whole JPEG (no SOI, no EOI in the last 32 bytes, no SOF, empty frame)."""
    view = memoryview(data)
    n = len(view)
    if n < 4 or view[0] != 0xFF or view[1] != 0xD8:
        raise ValueError("not a JPEG: no start-of-image marker")
    if bytes(view[max(0, n - 32):]).rfind(b"\xff\xd9") < 0:
        raise ValueError("truncated JPEG: no end-of-image marker")
    pos = 2
    while pos + 4 <= n:
        if view[pos] != 0xFF:
            raise ValueError(f"corrupt JPEG header at byte {pos}")
        marker = view[pos + 1]
        if marker == 0xFF:
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        length = (view[pos + 2] << 8) | view[pos + 3]
        if marker in _SOF_MARKERS and pos + 9 <= n:
            height = (view[pos + 5] << 8) | view[pos + 6]
            width = (view[pos + 7] << 8) | view[pos + 8]
            if width == 0 or height == 0:
                raise ValueError("JPEG with an empty frame")
            return width, height
        if marker in (0xD9, 0xDA):
            break
        pos += 2 + length
    raise ValueError("corrupt JPEG header: no frame header")


def checked_jpeg(path) -> tuple[np.ndarray, tuple[int, int]]:
    """(bytes, (width, height)) of a frame that passed the checks; CCSError otherwise."""
    data = read_frame_bytes(path)
    try:
        return data, jpeg_size(data)
    except ValueError as exc:
        raise bad_file(path, f"cannot decode ({exc})") from None


def frame_size(path) -> tuple[int, int]:
    """(width, height) of a frame file from its header, without decoding the pixels."""
    return checked_jpeg(path)[1]


def decode_jpeg(path, grey: bool) -> np.ndarray:
    """uint8 HWC RGB (or HW grey) of a checked JPEG; CCSError naming the file otherwise.

    EXIF orientation is ignored: crops are planned on the header's width and height.
    """
    import cv2

    data, _ = checked_jpeg(path)
    flags = (cv2.IMREAD_GRAYSCALE if grey else cv2.IMREAD_COLOR) | cv2.IMREAD_IGNORE_ORIENTATION
    img = cv2.imdecode(data, flags)
    if img is None:
        raise bad_file(path, "cannot decode (corrupt JPEG data)")
    return img if grey else cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


# -- frame counts and annotation records -----------------------------------------------
def count_flow_frames(frame_dir, naming: FrameNaming = FrameNaming()) -> int:
    """Number of flow_x files in ``frame_dir`` (named by ``naming.flow_tmpl``)."""
    pattern = naming.flow_x_pattern()
    try:
        return sum(1 for name in os.listdir(frame_dir) if pattern.match(name))
    except OSError as exc:
        raise read_failure(frame_dir, exc, "cannot read the flow frame folder", "flow frame folder not found") from None


RAWFRAMES_FOLDER = "rawframes"  # the frames root prepare and synth write, beside the videos


def frames_dir_name(video_path) -> str:
    """``Class/v_X.avi`` → ``Class/v_X``: a video's frames folder under the frames root, as
    ``prepare`` and ``synth`` write it and a rawframe list names it."""
    return str(Path(video_path).with_suffix("")).replace(os.sep, "/")


def default_flow_root(data_root) -> Path:
    """The frames root beside a video data root (``<data>/videos`` → ``<data>/rawframes``)."""
    return Path(data_root).resolve().parent / RAWFRAMES_FOLDER


def frames_folder(record_path, *, modality: str, data_root, flow_root) -> Path:
    """The folder of a listed video's frames (its flow; its RGB too in a rawframe list): a
    rawframe list names it under ``data_root``; a video list's ``Class/v_X.avi`` has it at
    ``flow_root/Class/v_X`` (``frames_dir_name``)."""
    if modality == "video":
        return Path(flow_root) / frames_dir_name(record_path)
    return Path(data_root) / record_path


def lists_count_flow_frames(records, data_root, naming: FrameNaming) -> bool | None:
    """Whether a rawframe list's total_frames counts flow frames rather than RGB frames,
    from the files of its first folder that exists: with n RGB frames there are n − 1 flow
    frames (denseflow), so a flow file numbered like the last RGB frame exists only when
    the list counts flow frames. Where lines with offsets share a folder, the line that
    reaches furthest into it decides. None when no listed folder exists. A folder that
    cannot be read decides nothing (reading its frames later says so, or skips it)."""
    for record in records:
        folder = Path(data_root) / record.path
        try:
            if folder.is_dir():
                last = max(r.offset + r.num_frames for r in records if r.path == record.path)
                return naming.flow(folder, last - 1)[0].is_file()
        except OSError:  # PermissionError: a mode-000 folder
            continue
    return None


@dataclass(frozen=True)
class FrameCount:
    """What the total_frames of a list counts, and how that was decided (the start line)."""
    flow: bool
    how: str  # "detected from the files" | "data.flow_count" | "video: flow frames + 1"

    def __str__(self):
        return f"total_frames counts {'flow' if self.flow else 'RGB'} frames ({self.how})"


def resolve_records(records, annotation, data_root, *, modality, flow_root, flow_length,
                    skip_bad, naming: FrameNaming = FrameNaming(), flow_count=None,
                    check=None):
    """Fill in num_frames (RGB frames) of video lists from the flow folders, and of rawframe
    lists whose total_frames counts flow frames (``flow_count``; None: detected from the
    files); check every video is long enough for the flow stack. ``check(record)``, a
    backend's own check raising CCSError, runs on every video with ``skip_bad`` and on the
    first good one without (the rest are checked as they are read). Returns (good records,
    their annotation rows, {row: message} of the videos skipped as bad, FrameCount)."""
    if modality == "video":
        count = FrameCount(True, "video: flow frames + 1")
    elif flow_count is None:
        count = FrameCount(bool(lists_count_flow_frames(records, data_root, naming)),
                           "detected from the files")
    else:
        count = FrameCount(bool(flow_count), "data.flow_count")
    good, rows, skipped = [], [], {}
    for row, record in enumerate(records):
        try:
            folder = frames_folder(record.path, modality=modality, data_root=data_root, flow_root=flow_root)
            if not folder.is_dir():
                what = "flow frame folder" if modality == "video" else "frame folder"
                raise bad_file(f"{annotation}:{record.line}", f"{what} {folder} not found")
            if modality == "video":
                frames = count_flow_frames(folder, naming) + 1
                record = VideoRecord(record.path, frames, record.label, record.line)
            elif count.flow:
                record = VideoRecord(record.path, record.num_frames + 1, record.label,
                                     record.line, record.offset)
            if num_flow_frames(record.num_frames) < flow_length:
                raise bad_file(
                    f"{annotation}:{record.line}",
                    f"video {record.path} too short: {record.num_frames} frames give "
                    f"{max(num_flow_frames(record.num_frames), 0)} flow frames, "
                    f"fewer than the flow stack of {flow_length}",
                )
            if check is not None and (skip_bad or not good):
                check(record)
        except CCSError as exc:
            if not skip_bad:
                raise
            skipped[row] = str(exc)
            continue
        good.append(record)
        rows.append(row)
    if not good:
        example = f", e.g. {next(iter(skipped.values()))}" if skipped else ""
        raise bad_file(annotation, f"no usable videos (all skipped as bad){example}")
    return good, rows, skipped, count


def load_records(spec, check=None):
    """Read and check the annotation list of a ``LoaderSpec`` for either backend: (records,
    their annotation rows, {row: message} of the videos skipped as bad, flow root,
    FrameCount). Video lists take their flow from ``spec.flow_root`` (default: the
    ``rawframes`` folder beside the data root). ``spec.labels=False`` accepts label-less
    lines (label None). ``check``: see ``resolve_records``."""
    records = read_annotation(spec.annotation, spec.modality, spec.num_classes,
                              labels=spec.labels)
    flow_root = spec.flow_root
    if flow_root is None:
        video = spec.modality == "video"
        flow_root = default_flow_root(spec.data_root) if video else spec.data_root
    records, rows, skipped, count = resolve_records(
        records, spec.annotation, spec.data_root, modality=spec.modality, flow_root=flow_root,
        flow_length=spec.flow_length, skip_bad=spec.skip_bad, naming=spec.naming,
        flow_count=spec.flow_count, check=check)
    return records, rows, skipped, Path(flow_root), count

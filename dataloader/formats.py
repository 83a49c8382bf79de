"""Annotation formats: MMAction2 rawframe and video lists, UCF-101 and HMDB-51 splits.

Every reader returns ``list[VideoRecord]`` in file order and raises a one-line ``CCSError``
naming ``file:line`` for a line that does not parse or a label outside ``[0, num_classes)``,
and naming the file for a list with no videos (SPEC §9).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from ccs_fast.base.atomic import write_text
from ccs_fast.base.errors import CCSError, bad_file


@dataclass
class VideoRecord:
    path: str  # frame directory (rawframes) or video file, relative to the data root
    num_frames: int | None  # RGB frames; None where the list does not say (video lists)
    label: int | None  # 0-based class index; None in a label-less list
    line: int  # 1-based line of the annotation file it came from
    offset: int = 0  # frames before the video's first one in its folder (MMAction2 with_offset)


NO_LABEL_HINT = "label-less lists are read by predict and eval --no-labels"


def _lines(path):
    """(line number, stripped text) of the non-blank, non-comment lines of ``path``."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise bad_file(path, "annotation file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise bad_file(path, f"cannot read annotation file ({exc.__class__.__name__})") from None
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if line and not line.startswith("#"):
            yield number, line


def _int_field(path, number, value, what, minimum):
    try:
        parsed = int(value)
    except ValueError:
        raise bad_file(f"{path}:{number}", f"{what} {value!r} is not an integer") from None
    if parsed < minimum:
        raise bad_file(f"{path}:{number}", f"{what} {parsed} is below {minimum}")
    return parsed


def _label_field(path, number, value, labels):
    """The 0-based label of a field, or None for -1 where labels are optional."""
    if value == "-1" and not labels:
        return None
    try:
        return _int_field(path, number, value, "label", 0)
    except CCSError as exc:
        if value.lstrip("-").isdigit():  # a negative label
            raise CCSError(f"{exc} ({NO_LABEL_HINT}, with -1 or no label)") from None
        raise


def _check_records(path, records, num_classes):
    if not records:
        raise bad_file(path, "no videos")
    if num_classes is not None:
        for record in records:
            if record.label is not None and not 0 <= record.label < num_classes:
                raise bad_file(
                    f"{path}:{record.line}",
                    f"label {record.label} outside the {num_classes} classes [0, {num_classes})",
                )
    return records


def read_rawframe_list(path, num_classes=None, labels=True) -> list[VideoRecord]:
    """MMAction2 rawframe list, one video per line: ``frame_dir total_frames label`` or, with
    offsets, ``frame_dir offset total_frames label``. ``labels=False`` also reads label-less
    lines (``frame_dir total_frames``, or label -1: label None). A line with more fields (a
    multi-label line) is refused: the model is a single-label classifier."""
    records = []
    for number, line in _lines(path):
        fields = line.split()
        where = f"{path}:{number}"
        if len(fields) > 4:
            raise bad_file(where, f"{len(fields) - 2} labels on one line: multi-label lists are not "
                                  f"supported (one class per video); got {line!r}")
        if len(fields) < 3 and not (len(fields) == 2 and not labels):
            expected = "'frame_dir total_frames label'"
            hint = f" ({NO_LABEL_HINT})" if len(fields) == 2 else ""
            raise bad_file(where, f"expected {expected}, got {line!r}{hint}")
        offset = _int_field(path, number, fields[1], "offset", 0) if len(fields) == 4 else 0
        count = fields[2] if len(fields) == 4 else fields[1]
        frames = _int_field(path, number, count, "total_frames", 1)
        label = _label_field(path, number, fields[-1], labels) if len(fields) >= 3 else None
        records.append(VideoRecord(fields[0], frames, label, number, offset))
    return _check_records(path, records, num_classes)


def read_video_list(path, num_classes=None, labels=True) -> list[VideoRecord]:
    """MMAction2 video list: ``path label`` per line (``path`` alone, or label -1, where
    ``labels=False``: label None)."""
    records = []
    for number, line in _lines(path):
        fields = line.split()
        if len(fields) > 2:
            raise bad_file(f"{path}:{number}", f"expected 'path label', got {line!r} (multi-label "
                                               "lists are not supported; a path with a space "
                                               "cannot be listed)")
        if len(fields) == 1 and labels:
            raise bad_file(f"{path}:{number}", f"expected 'path label', got {line!r} "
                                               f"({NO_LABEL_HINT})")
        label = _label_field(path, number, fields[1], labels) if len(fields) == 2 else None
        records.append(VideoRecord(fields[0], None, label, number))
    return _check_records(path, records, num_classes)


def read_ucf101_classes(class_ind) -> dict[str, int]:
    """classInd.txt (``1 ApplyEyeMakeup``) → {class name: 0-based label}."""
    classes = {}
    for number, line in _lines(class_ind):
        fields = line.split()
        if len(fields) != 2:
            raise bad_file(f"{class_ind}:{number}", f"expected 'index ClassName', got {line!r}")
        index = _int_field(class_ind, number, fields[0], "class index", 1)
        if fields[1] in classes:
            raise bad_file(f"{class_ind}:{number}", f"class {fields[1]!r} listed twice")
        classes[fields[1]] = index - 1
    if not classes:
        raise bad_file(class_ind, "no classes")
    return classes


def class_ind_files(annotation, data_root) -> list[Path]:
    """The ``classInd.txt`` files that name an annotation list's classes, nearest first:
    beside the list, in its parent folder, beside the data root."""
    annotation = Path(annotation)
    folders = dict.fromkeys([annotation.parent, annotation.parent.parent,
                             Path(data_root).parent if data_root else annotation.parent])
    return [folder / "classInd.txt" for folder in folders if (folder / "classInd.txt").is_file()]


def find_class_names(annotation, data_root, num_classes: int,
                     modality: str = "rawframes") -> list[str] | None:
    """Names of labels 0..num_classes−1 for an annotation list, or None when none are found:
    a ``classInd.txt`` beside the list, in its parent or beside the data root (UCF-101's
    file), else the class folders of the list's paths (``Class/video``: MMAction2's and
    ``prepare``'s layout) when every label has one folder of its own."""
    for class_ind in class_ind_files(annotation, data_root):
        by_label = {label: name for name, label in read_ucf101_classes(class_ind).items()}
        if sorted(by_label) == list(range(num_classes)):
            return [by_label[i] for i in range(num_classes)]
    folders: dict[int, set[str]] = {}
    for record in read_annotation(annotation, modality, num_classes):
        if record.label is not None and "/" in record.path.strip("/"):
            folders.setdefault(record.label, set()).add(record.path.strip("/").split("/")[0])
    names = [folders.get(i, set()) for i in range(num_classes)]
    if all(len(n) == 1 for n in names) and len({next(iter(n)) for n in names}) == num_classes:
        return [next(iter(n)) for n in names]
    return None


def read_ucf101_split(split_file, class_ind, num_classes=None) -> list[VideoRecord]:
    """UCF-101 trainlist0N.txt (``Class/v.avi 1``, 1-based label) or testlist0N.txt
    (``Class/v.avi``, label from the class folder via classInd.txt)."""
    classes = read_ucf101_classes(class_ind)
    num_classes = len(classes) if num_classes is None else num_classes
    records = []
    for number, line in _lines(split_file):
        fields = line.split()
        where = f"{split_file}:{number}"
        if len(fields) > 1 and "/" in "".join(fields[1:]).replace("\\", "/"):
            raise bad_file(where, f"the path {line!r} holds a space: class folders and video "
                                  "names with spaces cannot be listed (annotation fields are "
                                  "split on spaces); rename them without spaces")
        if len(fields) == 2:
            label = _int_field(split_file, number, fields[1], "label", 1) - 1
        elif len(fields) == 1:
            folder = fields[0].replace("\\", "/").split("/")[0]
            if folder not in classes or "/" not in fields[0].replace("\\", "/"):
                raise bad_file(where, f"class folder of {fields[0]!r} is not in {class_ind}")
            label = classes[folder]
        else:
            raise bad_file(where, f"expected 'Class/video.avi [label]', got {line!r}")
        records.append(VideoRecord(fields[0].replace("\\", "/"), None, label, number))
    return _check_records(split_file, records, num_classes)


_HMDB_SPLIT = re.compile(r"^(?P<cls>.+)_test_split(?P<split>\d+)\.txt$")


def read_hmdb51_split(split_dir, split=1, train=True) -> list[VideoRecord]:
    """HMDB-51 split files ``<class>_test_split<N>.txt`` (``video.avi 0|1|2``; 1 = train,
    2 = test, 0 = unused). Labels follow the sorted class names; paths are ``class/video``."""
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise bad_file(split_dir, "HMDB-51 split folder not found")
    files = {}
    for name in os.listdir(split_dir):
        match = _HMDB_SPLIT.match(name)
        if match and int(match["split"]) == split:
            files[match["cls"]] = split_dir / name
    if not files:
        raise bad_file(split_dir, f"no '<class>_test_split{split}.txt' files")
    wanted = "1" if train else "2"
    records = []
    for label, cls in enumerate(sorted(files)):
        for number, line in _lines(files[cls]):
            fields = line.split()
            if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
                raise bad_file(f"{files[cls]}:{number}",
                               f"expected 'video.avi 0|1|2', got {line!r}")
            if fields[1] == wanted:
                records.append(VideoRecord(f"{cls}/{fields[0]}", None, label, number))
    if not records:
        raise bad_file(split_dir, f"no videos in split {split} ({'train' if train else 'test'})")
    return records


def default_num_classes(labels) -> int:
    """1 + the largest label (None, a label-less line, counts for nothing)."""
    return max((label for label in labels if label is not None), default=0) + 1


MODALITIES = ("rawframes", "video")  # data.modality: what a list names, frame folders or video files


def read_annotation(path, modality="rawframes", num_classes=None,
                    labels=True) -> list[VideoRecord]:
    """The list build_loader reads: rawframe list, or video list for modality="video";
    ``labels=False`` accepts label-less lines."""
    if modality == "rawframes":
        return read_rawframe_list(path, num_classes, labels)
    if modality == "video":
        return read_video_list(path, num_classes, labels)
    raise ValueError(f"unknown modality {modality!r}; available: {', '.join(MODALITIES)}")


def write_rawframe_list(records, path) -> None:
    """Write ``frame_dir [offset] total_frames [label]`` lines atomically (temporary file,
    rename): the offset where it is not 0, the label where there is one."""
    path = Path(path)
    lines = []
    for record in records:
        if record.num_frames is None:
            raise ValueError(f"{record.path}: a rawframe list needs num_frames")
        offset = f" {record.offset}" if record.offset else ""
        # without a label an offset line would read as 'frame_dir total_frames label': -1
        label = f" {record.label}" if record.label is not None else " -1" if offset else ""
        lines.append(f"{record.path}{offset} {record.num_frames}{label}\n")
    try:
        write_text(path, "".join(lines))
    except OSError as exc:
        raise CCSError(f"{path}: cannot write annotation list ({exc.strerror or exc})") from None

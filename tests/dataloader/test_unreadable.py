"""A listed video folder that cannot be read (mode 000; issue 23 #4): one line naming it in
both backends, with or without skip_bad (with it: skipped and counted). Tests run as root,
who reads a mode-000 folder, so the refusal is simulated for every path inside the folder."""
import builtins
import errno
import os

import numpy as np
import pytest

from ccs_fast.dataloader import LoaderSpec, build_loader
from ccs_fast.base.errors import CCSError

BACKENDS = ["torch", pytest.param("dali", marks=pytest.mark.dali)]


def _write_tree(root, videos, frames, rng):
    import cv2

    lines = []
    for v in range(videos):
        folder = root / f"v{v}"
        folder.mkdir(parents=True)
        for i in range(1, frames + 1):
            cv2.imwrite(str(folder / f"img_{i:05d}.jpg"), rng.integers(0, 256, (24, 32, 3), np.uint8))
            if i < frames:
                for axis in "xy":
                    cv2.imwrite(str(folder / f"flow_{axis}_{i:05d}.jpg"), rng.integers(0, 256, (24, 32), np.uint8))
        lines.append(f"v{v} {frames} {v % 2}\n")
    (root / "list.txt").write_text("".join(lines))
    return root / "list.txt"


def _unreadable(monkeypatch, folder):
    """Everything inside ``folder`` raises PermissionError, as in a mode-000 folder."""
    inside = str(folder) + os.sep

    def guard(real, whole_folder=True):
        def wrapper(path, *args, **kwargs):
            text = os.fsdecode(path) if isinstance(path, (str, bytes, os.PathLike)) else ""
            if text.startswith(inside) or (whole_folder and text == str(folder)):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), text)
            return real(path, *args, **kwargs)
        return wrapper

    monkeypatch.setattr(os, "stat", guard(os.stat, whole_folder=False))  # the folder itself: stat works
    monkeypatch.setattr(os, "listdir", guard(os.listdir))
    monkeypatch.setattr(os, "scandir", guard(os.scandir))
    monkeypatch.setattr(builtins, "open", guard(builtins.open))


@pytest.fixture
def tree(tmp_path):
    rng = np.random.default_rng(int.from_bytes(os.urandom(4), "little"))
    return tmp_path, _write_tree(tmp_path, videos=4, frames=int(rng.integers(6, 10)), rng=rng)


def _spec(root, annotation, backend, skip_bad):
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    return LoaderSpec(annotation, root, backend=backend, batch_size=2, num_segments=2, flow_length=1,
                      input_size=16, device="cpu", seed=0, num_workers=0, skip_bad=skip_bad, train=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unreadable_folder_is_one_line(tree, monkeypatch, backend):
    """The first listed folder, from which the loaders tell what total_frames counts."""
    root, annotation = tree
    bad = 0
    _unreadable(monkeypatch, root / f"v{bad}")
    with pytest.raises(CCSError) as info:
        list(build_loader(_spec(root, annotation, backend, skip_bad=False)))
    message = str(info.value)
    assert "\n" not in message and message.startswith(str(root / f"v{bad}"))
    assert "permission denied" in message


@pytest.mark.parametrize("backend", BACKENDS)
def test_unreadable_folder_is_skipped_and_counted_with_skip_bad(tree, monkeypatch, backend):
    root, annotation = tree
    _unreadable(monkeypatch, root / "v0")
    loader = build_loader(_spec(root, annotation, backend, skip_bad=True))
    rows = sorted(int(i) for batch in loader for i in batch["index"])
    assert rows == [1, 2, 3]
    assert list(loader.skipped_errors) == [0] and "permission denied" in loader.skipped_errors[0]


def test_unreadable_flow_folder_of_a_video_list_is_one_line(tmp_path, monkeypatch):
    """Video lists count each video's flow frames from its folder (os.listdir)."""
    rng = np.random.default_rng(int.from_bytes(os.urandom(4), "little"))
    flow_root = tmp_path / "rawframes"
    _write_tree(flow_root, videos=2, frames=6, rng=rng)
    (tmp_path / "videos").mkdir()
    for v in range(2):
        (tmp_path / "videos" / f"v{v}.avi").write_bytes(b"")
    annotation = tmp_path / "videos.txt"
    annotation.write_text("v0.avi 0\nv1.avi 1\n")
    _unreadable(monkeypatch, flow_root / "v1")
    spec = LoaderSpec(annotation, tmp_path / "videos", backend="torch", batch_size=2, num_segments=2, flow_length=1,
                      input_size=16, device="cpu", seed=0, num_workers=0, modality="video", flow_root=flow_root)
    with pytest.raises(CCSError) as info:
        build_loader(spec)
    assert str(info.value) == f"{flow_root / 'v1'}: cannot read the flow frame folder (permission denied)"

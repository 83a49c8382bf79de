"""Every command block of README.md runs as written, on tiny data (SPEC §5, issue 22 #2).

Each ```bash block of the README is run by bash as it stands, with ``ccs-fast`` defined as
a shell function that records its arguments; bash does the quoting, the loops and the
variables. The recorded commands then run in this process (one torch import for all of
them), in README order, in a folder laid out as the README assumes: ``UCF-101/`` and
``ucfTrainTestlist/`` (a tiny ``ccs-fast synth`` data set of 3 classes, 32 px, 8 frames, in
UCF-101's layout, its split 1 repeated as splits 2 and 3), ``~/weights/`` and two video files.
Only sizes and paths are substituted (``TINY``): the ResNet-50 of the packaged ``ucf101``
config becomes timm's ``test_resnet`` (an I3D ResNet-50 an I3D ResNet-18) with the weights
file of that architecture under ``~/weights/``, the class count is the tiny set's, frames
are 32 px, one epoch, one loader process. Blocks that cannot run here are listed in
``SKIPPED`` with the reason; any other block that fails or a new block the test does not
recognise fails the test.
"""
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from ccs_fast.cli import main

README = Path(__file__).resolve().parents[2] / "README.md"
CLASSES = 3

# a block is recognised by a text it holds
SKIPPED = {
    "--flow-device cuda": "needs a CUDA GPU (tvl1-torch on cuda)",
    "make gpu": "needs one H100/H200 (python -m bench.gpu); its CPU dry run is tests/bench/test_gpu.py",
}

TINY_TRAIN = [
    f"model.num_classes={CLASSES}", "model.embed_dim=8", "model.cb_stages=[-1]",
    "data.input_size=32", "data.batch_size=3", f"data.classes_per_batch={CLASSES}",
    "data.test_segments=3", "data.num_workers=0", "optim.epochs=1", "train.tensorboard=false",
]
TINY_3D = ["model.clip_len=2", "model.frame_interval=1", "data.test_clips=1"]


def bash_blocks(text: str) -> list[str]:
    blocks, current = [], None
    for line in text.splitlines():
        if current is None and line.strip() == "```bash":
            current = []
        elif current is not None and line.strip() == "```":
            blocks.append("\n".join(current) + "\n")
            current = None
        elif current is not None:
            current.append(line)
    return blocks


def recorded_calls(block: str, cwd: Path, env: dict) -> list[list[str]]:
    """The ``ccs-fast`` commands of ``block`` as bash expands them, in order."""
    record = cwd / ".calls"
    record.unlink(missing_ok=True)
    shell = (f'ccs-fast() {{ printf "%s\\x1f" "$@" >> "{record}"; printf "\\n" >> "{record}"; }}\n'
             "set -eu\n" + block)
    subprocess.run(["bash", "-c", shell], cwd=cwd, env=env, check=True, timeout=60)
    if not record.exists():
        return []
    return [line.rstrip("\x1f").split("\x1f") for line in record.read_text().splitlines()]


def _sets(argv: list[str]) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--set"]


def tiny(argv: list[str]) -> list[str]:
    """``argv`` with the sizes and paths of the tiny set substituted (module docstring)."""
    command = argv[0] if argv else ""
    if command == "prepare":
        return argv + ["--short-side", "32", "--workers", "1"]
    if command == "predict":
        return argv + ["--short-side", "32"]
    if command != "train":
        return argv
    video = "model.backbone=i3d_resnet50" in _sets(argv)
    out = []
    for arg in argv:
        if arg == "model.pretrained=~/weights/resnet50.pth":
            arg = f"model.pretrained=~/weights/{'resnet18' if video else 'test_resnet'}.pth"
        elif arg == "model.backbone=i3d_resnet50":
            arg = "model.backbone=i3d_resnet18"
        out.append(arg)
    sets = TINY_TRAIN + (TINY_3D if video else ["model.backbone=timm:test_resnet"])
    return out + [item for s in sets for item in ("--set", s)]


@pytest.fixture
def readme_tree(tmp_path, monkeypatch):
    timm = pytest.importorskip("timm")
    pytest.importorskip("av")
    import torchvision

    synth = tmp_path / "synth"
    assert main(["synth", "--out", str(synth), "--classes", str(CLASSES), "--videos-per-cell", "1",
                 "--val-videos-per-cell", "1", "--frames", "8", "--size", "32", "--flow", "farneback",
                 "--workers", "1"]) == 0
    work = tmp_path / "work"
    work.mkdir()
    shutil.copytree(synth / "videos", work / "UCF-101")
    splits = work / "ucfTrainTestlist"
    shutil.copytree(synth / "splits", splits)
    for n in (2, 3):
        shutil.copy(splits / "trainlist01.txt", splits / f"trainlist0{n}.txt")
        shutil.copy(splits / "testlist01.txt", splits / f"testlist0{n}.txt")
    home = tmp_path / "home"
    (home / "weights").mkdir(parents=True)
    torch.save(timm.create_model("test_resnet").state_dict(), home / "weights" / "test_resnet.pth")
    torch.save(torchvision.models.resnet18().state_dict(), home / "weights" / "resnet18.pth")
    for name, container in (("clip1.avi", "avi"), ("clip2.mp4", "mp4")):
        _write_video(work / name, container)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.chdir(work)
    return work


def _write_video(path: Path, container: str) -> None:
    import av
    import numpy as np

    rng = np.random.default_rng()
    base = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    with av.open(str(path), mode="w", format=container) as out:
        stream = out.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for t in range(12):
            frame = np.roll(base, 2 * t, axis=1)
            out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        out.mux(stream.encode(None))


def test_every_readme_command_block_runs(readme_tree, capsys):
    torch.set_num_threads(1)
    env = {**os.environ}
    blocks = bash_blocks(README.read_text())
    assert len(blocks) >= 6
    ran, skipped = [], []
    for block in blocks:
        reason = next((why for key, why in SKIPPED.items() if key in block), None)
        if reason:
            skipped.append(reason)
            continue
        calls = recorded_calls(block, readme_tree, env)
        assert calls, f"a README block with no ccs-fast command and no reason to skip it:\n{block}"
        for argv in calls:
            try:
                code = main(tiny(argv))
            except SystemExit as exit_:  # --version
                code = exit_.code
            err = capsys.readouterr().err
            assert code == 0, f"README command failed: ccs-fast {' '.join(argv)}\n{err[-2000:]}"
            ran.append(argv[0] if argv[0] != "--version" else "version")
    assert sorted(skipped) == sorted(SKIPPED.values())
    assert ran.count("train") == 4 and {"prepare", "eval", "predict", "export", "config", "version"} <= set(ran)

    work = readme_tree
    assert (work / "data/ucf101/val_rawframes_split3.txt").is_file()
    rows = [json.loads(line) for line in (work / "predictions.jsonl").read_text().splitlines()]
    assert [r["video"] for r in rows] == ["clip1.avi", "clip2.mp4"]
    assert all(abs(sum(c["probability"] for c in r["fused"]) - 1) < 1e-4 for r in rows)  # 3 classes, top-5
    table = (work / "runs/ucf101-eval/eval.md").read_text()
    assert "val_rawframes_split2.txt" in table and "Mean (3 splits)" in table
    assert (work / "ccs_ucf101.pt").is_file() and (work / "runs/i3d/last.pt").is_file()

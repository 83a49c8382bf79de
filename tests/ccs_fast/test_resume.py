"""Where a resumed run writes (issue 23 #1): into the folder it was resumed from, whatever
out_dir the checkpoint recorded; elsewhere only with --out, said in the start line."""
import shutil

import pytest
import torch

from ccs_fast import trainer
from ccs_fast.checkpoint import read_checkpoint
from ccs_fast.cli import main

pytest.importorskip("timm")


@pytest.fixture(scope="module")
def run_x(tiny_config, tmp_path_factory):
    x = tmp_path_factory.mktemp("runs") / "X"
    trainer.train(tiny_config(x, epochs=1))
    return x


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def _start_line(out: str) -> str:
    (line,) = [line for line in out.splitlines() if line.startswith("[train] run ")]
    return line


def test_resume_of_a_copied_folder_writes_into_the_copy(run_x, tmp_path, capsys):
    """Before: the copy's resume wrote into X (recorded out_dir): X's metrics were cut back and
    its last.pt replaced."""
    y = tmp_path / "Y"
    shutil.copytree(run_x, y)
    before = _snapshot(run_x)
    capsys.readouterr()
    assert main(["train", "--resume", str(y), "--set", "optim.epochs=2"]) == 0
    line = _start_line(capsys.readouterr().out)
    assert f"-> {y};" in line and str(run_x) not in line.replace(str(y), "")
    assert _snapshot(run_x) == before
    assert read_checkpoint(y / "last.pt")["epoch"] == 2
    assert read_checkpoint(y / "last.pt")["config"]["train"]["out_dir"] == str(y)


def test_resume_of_a_moved_folder_does_not_recreate_the_old_one(run_x, tmp_path, capsys):
    z = tmp_path / "Z"
    shutil.copytree(run_x, tmp_path / "old")
    shutil.move(tmp_path / "old", z)  # a run folder whose checkpoint records another out_dir
    assert read_checkpoint(z / "last.pt")["config"]["train"]["out_dir"] == str(run_x)
    shutil.rmtree(run_x.parent / "gone", ignore_errors=True)
    state = read_checkpoint(z / "last.pt")
    state["config"]["train"]["out_dir"] = str(run_x.parent / "gone")  # as after `mv gone Z`
    torch.save(state, z / "last.pt")
    assert main(["train", "--resume", str(z / "last.pt"), "--set", "optim.epochs=2"]) == 0
    assert not (run_x.parent / "gone").exists()
    assert read_checkpoint(z / "last.pt")["epoch"] == 2


def test_resume_elsewhere_needs_out_and_says_so(run_x, tmp_path, capsys):
    w = tmp_path / "W"
    before = _snapshot(run_x)
    capsys.readouterr()
    assert main(["train", "--resume", str(run_x), "--out", str(w), "--set", "optim.epochs=2"]) == 0
    line = _start_line(capsys.readouterr().out)
    assert f"-> {w};" in line and f"writing to {w} (--out), not to {run_x}" in line
    assert _snapshot(run_x) == before and read_checkpoint(w / "last.pt")["epoch"] == 2


@pytest.mark.parametrize("backend", ["torch", "synthetic", pytest.param("dali", marks=pytest.mark.dali)])
def test_loaders_start_an_epoch_at_a_batch(noise_rawframes, tmp_path, backend):
    """The loader position of a mid-epoch checkpoint: set_epoch(e, first_batch=k) gives the
    epoch's batches from k on, exactly those of an uninterrupted epoch; batches_done counts
    the batches consumed."""
    import numpy as np

    from ccs_fast.dataloader import LoaderSpec, build_loader

    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    root, annotation = noise_rawframes(tmp_path, videos=10)
    loader = build_loader(LoaderSpec(annotation, root, backend=backend, train=True, batch_size=2, num_segments=2,
                                     flow_length=1, input_size=16, device="cpu", seed=7, num_workers=0,
                                     num_classes=4, synthetic_batches=5))
    epoch = int(np.random.default_rng().integers(0, 100))
    loader.set_epoch(epoch)
    whole = list(loader)
    assert len(whole) == len(loader) == 5 and loader.batches_done == 5
    first = int(np.random.default_rng().integers(1, 5))
    loader.set_epoch(epoch, first_batch=first)
    tail, done = [], []
    for batch in loader:
        tail.append(batch)
        done.append(loader.batches_done)
    assert done == list(range(first + 1, 6))
    assert len(tail) == 5 - first
    for a, b in zip(whole[first:], tail):
        assert torch.equal(a["index"], b["index"]) and torch.equal(a["rgb"], b["rgb"])
        assert torch.equal(a["flow"], b["flow"]) and torch.equal(a["label"], b["label"])
    loader.set_epoch(epoch + 1)  # the next epoch starts at its beginning again
    assert len(list(loader)) == 5

"""How a training run fails: a NaN loss and a non-finite model stop it with the last good
checkpoint kept, a run folder is never overwritten by accident nor shared by two runs, a full
disk and an unwritable --out are one line, an evaluation with every video bad is an error."""
import collections
import errno
import os
import shutil

import pytest
import torch

from ccs_fast import epoch, recipe, trainer
from ccs_fast.checkpoint import read_checkpoint
from ccs_fast.base.errors import CCSError
from ccs_fast.metrics import read_metrics

pytest.importorskip("timm")




class _NaNLoss(torch.nn.Module):
    """The real objective whose reported loss turns NaN (weights stay finite: the NaN is a
    constant added to the loss, so the gradient is the real one)."""

    def __init__(self, objective):
        super().__init__()
        self.objective = objective

    def forward(self, *args):
        losses = self.objective(*args)
        losses["loss"] = losses["loss"] + float("nan")
        return losses


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_config, tiny_runs, tmp_path, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(tiny_runs["root"] / "epoch1.pt", out / "last.pt")
    good = (out / "last.pt").read_bytes()
    real_objective = recipe.build_objective
    monkeypatch.setattr(recipe, "build_objective", lambda cfg: _NaNLoss(real_objective(cfg)))
    with pytest.raises(CCSError) as info:
        trainer.train(tiny_config(out, epochs=2), resume=str(out / "last.pt"))
    message = str(info.value)
    assert "\n" not in message and "non-finite loss" in message and str(out / "last.pt") in message
    assert (out / "last.pt").read_bytes() == good
    assert not (out / "best.pt").exists()


def _diverge_after_step(monkeypatch, at_step):
    """The first tracked BatchNorm of the model gets an infinite running_var right after the
    optimizer step number ``at_step`` (the loss of that step stays finite)."""
    models, steps = [], []
    real_build, real_step = recipe.build_model, epoch.amp_step

    def build(cfg, **kwargs):
        models.append(real_build(cfg, **kwargs))
        return models[-1]

    def step(*args, **kwargs):
        grad_norm = real_step(*args, **kwargs)
        steps.append(1)
        if len(steps) == at_step:
            bn = next(m for m in models[-1].modules() if isinstance(m, torch.nn.BatchNorm2d) and m.track_running_stats)
            bn.running_var.fill_(float("inf"))
        return grad_norm

    monkeypatch.setattr(recipe, "build_model", build)
    monkeypatch.setattr(epoch, "amp_step", step)


def test_nonfinite_model_is_neither_evaluated_nor_saved(tiny_config, tiny_runs, tmp_path, monkeypatch, capsys):
    """#1: BN running_var went inf on the last step of an epoch with a finite loss; that model
    was evaluated, saved as last.pt and best.pt, and called the last good checkpoint."""
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(tiny_runs["root"] / "epoch1.pt", out / "last.pt")
    good = (out / "last.pt").read_bytes()
    _diverge_after_step(monkeypatch, tiny_config.batches)  # the last step of epoch 2
    with pytest.raises(CCSError) as info:
        trainer.train(tiny_config(out, epochs=2), resume=str(out))
    message = str(info.value)
    assert "\n" not in message and "running_var" in message and "nothing evaluated or saved" in message
    assert f"last good checkpoint kept at {out / 'last.pt'}" in message
    assert (out / "last.pt").read_bytes() == good and not (out / "best.pt").exists()
    assert "[eval]" not in capsys.readouterr().out


def test_fresh_run_never_overwrites_a_run_folder(tiny_config, tiny_runs, tmp_path):
    """#5: a fresh train into a finished run's folder silently replaced last.pt and best.pt."""
    finished = tiny_runs["root"] / "straight"
    before = {name: (finished / name).read_bytes() for name in ("last.pt", "best.pt", "metrics.jsonl")}
    with pytest.raises(CCSError) as info:
        trainer.train(tiny_config(finished, epochs=1))
    assert "not empty" in str(info.value) and "--overwrite" in str(info.value)
    assert {name: (finished / name).read_bytes() for name in before} == before

    copy = tmp_path / "copy"
    shutil.copytree(finished, copy)
    summary = trainer.train(tiny_config(copy, epochs=1, tensorboard=False), overwrite=True)
    assert read_checkpoint(copy / "last.pt")["epoch"] == 1 and not (copy / "tb").exists()
    assert {r["run_id"] for r in read_metrics(copy / "metrics.jsonl")} == {summary["run_id"]}
    assert read_checkpoint(copy / "best.pt")["optimizer"] is None  # SPEC §5: best.pt holds the model only
    with pytest.raises(CCSError, match="holds no optimizer state"):
        trainer.train(tiny_config(copy, epochs=2), resume=str(copy / "best.pt"))


def test_two_runs_into_one_folder(tiny_config, tmp_path):
    """#5: two runs into one --out both exited 0 with last.pt from one and best.pt from the other."""
    from ccs_fast.run_folder import claim_run_folder

    out = tmp_path / "run"
    first = claim_run_folder(out, resume=False, overwrite=False, run_id="first", log=lambda line: None)
    try:
        with pytest.raises(CCSError) as info:
            trainer.train(tiny_config(out, epochs=1))
        message = str(info.value)
        assert "in use by another training run" in message and f"PID {os.getpid()}" in message
        assert sorted(p.name for p in out.iterdir()) == ["train.lock"]
    finally:
        first.release()


class _FillsUp:
    """metrics.jsonl on a disk that fills once the resumed run logs its first training row."""

    def __init__(self, real):
        self.real = real

    def write(self, text):
        if '"split": "train"' in text:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.real.write(text)

    def __getattr__(self, name):
        return getattr(self.real, name)


def test_full_disk_and_unwritable_out_are_one_line(tiny_config, tiny_runs, tmp_path, monkeypatch):
    """#4: a full disk on metrics.jsonl, no room for a checkpoint and an unwritable --out."""
    from ccs_fast import metrics, run_folder

    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(tiny_runs["root"] / "epoch1.pt", out / "last.pt")
    good = (out / "last.pt").read_bytes()
    monkeypatch.setattr(metrics, "open", lambda *a, **k: _FillsUp(open(*a, **k)), raising=False)
    with pytest.raises(CCSError) as info:
        trainer.train(tiny_config(out, epochs=2), resume=str(out))
    assert str(info.value) == (f"{out / 'metrics.jsonl'}: disk full (no space left on device) while writing metrics; "
                               f"training stopped in epoch 2 (step {tiny_config.batches + 2}), last good checkpoint kept at "
                               f"{out / 'last.pt'}")
    assert (out / "last.pt").read_bytes() == good
    monkeypatch.undo()

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(run_folder.shutil, "disk_usage", lambda path: usage(2**30, 2**30 - 2**16, 2**16))
    with pytest.raises(CCSError, match="not enough free space for a checkpoint: one needs about"):
        trainer.train(tiny_config(tmp_path / "full", epochs=1))
    assert not (tmp_path / "full").exists()  # nothing trained, nothing left behind

    (tmp_path / "file").write_text("")
    with pytest.raises(CCSError, match="cannot create the output folder"):
        trainer.train(tiny_config(tmp_path / "file" / "run", epochs=1))


def test_all_eval_videos_bad_with_skip_bad_is_an_error(tiny_config, tiny_rawframes, tmp_path, capsys):
    """#8: skip_bad with every validation video bad printed 0.0000 (0 videos) and saved best.pt."""
    from ccs_fast.cli import main

    root, annotation = tiny_rawframes
    bad_root = tmp_path / "bad"
    shutil.copytree(root, bad_root)
    for frame in bad_root.glob("v*/img_*.jpg"):
        frame.write_bytes(b"not a jpeg")
    val = tmp_path / "val.txt"
    val.write_text("".join(f"{bad_root / line}" for line in annotation.read_text().splitlines(True)[:4]))
    out = tmp_path / "run"
    args = ["train", "--out", str(out), *tiny_config.torch_loader_settings(root, annotation, 0),
            "--set", f"data.val_list={val}", "--set", "data.skip_bad=true", "--set", "optim.epochs=1"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"ccs-fast: error: {val}: no video left to evaluate (4 skipped as bad)")
    assert "cannot decode (not a JPEG: no start-of-image marker)" in err and "training stopped in epoch 1" in err
    assert not (out / "best.pt").exists() and not (out / "last.pt").exists()

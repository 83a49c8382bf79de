"""Checkpoints: full round trip, atomic save on a full disk, refusal of a foreign config."""
import errno
import os
import random

import numpy as np
import pytest
import torch

from ccs_fast import checkpoint as ckpt
from ccs_fast.config import Config
from ccs_fast.errors import CCSError


def _setup(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=512.0)
    return model, opt, sched, scaler


def _train_steps(model, opt, sched, n=3):
    for _ in range(n):
        loss = model(torch.randn(8, 6)).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()


def _draws():
    return (random.random(), float(np.random.rand()), torch.rand(3))


def test_round_trip_restores_everything(tmp_path):
    model, opt, sched, scaler = _setup()
    _train_steps(model, opt, sched)
    scaler.scale(torch.ones(()))
    scaler.update(new_scale=64.0)
    cfg = Config()
    path = ckpt.save_checkpoint(tmp_path / ckpt.LAST, model, optimizer=opt, scheduler=sched,
                                scaler=scaler, epoch=3, step=42, config=cfg.to_dict(), best_metric=0.25)
    saved_weights = {k: v.clone() for k, v in model.state_dict().items()}
    saved_momentum = [s["momentum_buffer"].clone() for s in opt.state_dict()["state"].values()]
    saved_sched = sched.state_dict()
    expected_draws = _draws()  # what the RNGs give right after the save
    _train_steps(model, opt, sched, 2)

    model2, opt2, sched2, scaler2 = _setup(seed=1)
    _draws()
    state = ckpt.load_checkpoint(path, model2, opt2, sched2, scaler2, cfg=cfg, restore_rng=True)
    assert (state["epoch"], state["step"], state["best_metric"]) == (3, 42, 0.25)
    assert state["config"] == cfg.to_dict()
    for k, v in model2.state_dict().items():
        assert torch.equal(v, saved_weights[k]), k
    assert sched2.state_dict() == saved_sched
    assert scaler2.get_scale() == 64.0
    for buf, state_b in zip(saved_momentum, opt2.state_dict()["state"].values()):
        assert torch.equal(buf, state_b["momentum_buffer"])
    draws = _draws()
    assert draws[0] == expected_draws[0] and draws[1] == expected_draws[1]
    assert torch.equal(draws[2], expected_draws[2])
    # training continues identically from the restored state (same batches, same updates)
    _train_steps(model2, opt2, sched2, 2)
    assert opt.param_groups[0]["lr"] == opt2.param_groups[0]["lr"]
    for (k, a), (_, b) in zip(model.state_dict().items(), model2.state_dict().items()):
        assert torch.equal(a, b), k


def test_unwraps_compiled_and_ddp_style_prefixes(tmp_path):
    model, *_ = _setup()

    class Wrapper(torch.nn.Module):  # what torch.compile's OptimizedModule looks like
        def __init__(self, inner):
            super().__init__()
            self._orig_mod = inner

    path = ckpt.save_checkpoint(tmp_path / "w.pt", Wrapper(model))
    keys = list(torch.load(path, weights_only=True)["model"])
    assert keys == list(model.state_dict())


def test_save_on_full_disk_keeps_previous_file(tmp_path, monkeypatch):
    model, opt, *_ = _setup()
    path = ckpt.save_checkpoint(tmp_path / ckpt.LAST, model, optimizer=opt, epoch=1)
    before = path.read_bytes()

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ckpt.torch, "save", no_space)
    with pytest.raises(CCSError) as info:
        ckpt.save_checkpoint(path, model, optimizer=opt, epoch=2)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and "disk full" in message
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [ckpt.LAST]  # no temp file left


def test_save_fails_on_rename_error_too(tmp_path, monkeypatch):
    model, *_ = _setup()
    path = ckpt.save_checkpoint(tmp_path / ckpt.LAST, model, epoch=1)

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(ckpt.os, "replace", read_only)
    with pytest.raises(CCSError, match="could not save"):
        ckpt.save_checkpoint(path, model, epoch=2)
    assert ckpt.read_checkpoint(path)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [ckpt.LAST]


def test_missing_and_corrupt_files(tmp_path):
    model, *_ = _setup()
    with pytest.raises(CCSError, match="checkpoint not found"):
        ckpt.load_checkpoint(tmp_path / "nope.pt", model)
    path = ckpt.save_checkpoint(tmp_path / "x.pt", model)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CCSError) as info:
        ckpt.load_checkpoint(path, model)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_checkpoint_from_another_config(tmp_path):
    model, *_ = _setup()
    saved = Config()
    path = ckpt.save_checkpoint(tmp_path / "a.pt", model, config=saved.to_dict())
    other = Config()
    other.model.backbone = "resnet18"
    other.model.num_classes = 51
    with pytest.raises(CCSError) as info:
        ckpt.load_checkpoint(path, model, cfg=other)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    assert "backbone" in message and "num_classes" in message
    # fields that do not shape the model may differ
    relaxed = Config()
    relaxed.optim.lr = 0.5
    relaxed.model.dropout = 0.1
    ckpt.load_checkpoint(path, model, cfg=relaxed)


def test_state_dict_mismatch_is_one_line(tmp_path):
    model, *_ = _setup()
    path = ckpt.save_checkpoint(tmp_path / "a.pt", model)
    other = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.BatchNorm1d(5), torch.nn.Linear(5, 3))
    with pytest.raises(CCSError) as info:
        ckpt.load_checkpoint(path, other)
    assert "does not match the model" in str(info.value) and "\n" not in str(info.value)

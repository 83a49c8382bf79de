"""Checkpoints: full round trip, atomic save on a full disk, refusal of a foreign config."""
import errno
import os
import random

import numpy as np
import pytest
import torch

from ccs_fast import checkpoint as ckpt
from ccs_fast.config import Config
from ccs_fast.base.errors import CCSError


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

    monkeypatch.setattr("ccs_fast.base.atomic.os.replace", read_only)
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


def test_nonfinite_names_across_dtypes():
    named = [("a", torch.ones(3)), ("b", torch.tensor([1.0, float("nan")])), ("c", torch.zeros(0)),
             ("d", torch.tensor([float("inf")], dtype=torch.float16)), ("e", torch.tensor([3e38, -3e38])),
             ("f", torch.tensor([5], dtype=torch.int64)), ("g", torch.tensor([-1e300], dtype=torch.float64))]
    assert ckpt.nonfinite_names(named) == ["b", "d"]
    assert ckpt.nonfinite_names(named[:1] + named[4:]) == []


def test_nonfinite_model_is_never_saved_or_loaded(tmp_path):
    """Issue 11 #1: BatchNorm running_var went inf while the loss stayed finite."""
    model, opt, *_ = _setup()
    path = ckpt.save_checkpoint(tmp_path / ckpt.LAST, model, optimizer=opt, epoch=1)
    good = path.read_bytes()
    model[1].running_var[2] = float("inf")
    with pytest.raises(CCSError) as info:
        ckpt.save_checkpoint(path, model, optimizer=opt, epoch=2)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and "1.running_var" in message
    assert "previous checkpoint is intact" in message
    assert path.read_bytes() == good and sorted(p.name for p in tmp_path.iterdir()) == [ckpt.LAST]
    # a checkpoint written without this check (an older version) is refused when loaded
    state = torch.load(path, weights_only=True)
    state["model"]["1.running_var"][0] = float("nan")
    torch.save(state, tmp_path / "broken.pt")
    with pytest.raises(CCSError, match=r"broken.pt: the checkpoint's model holds NaN or inf in 1 tensor \(e.g. 1.running_var\)"):
        ckpt.load_checkpoint(tmp_path / "broken.pt", _setup()[0])


def test_torch_zip_writer_failure_is_one_line(tmp_path, monkeypatch):
    """Issue 11 #4: a disk that fills during torch.save raises RuntimeError, not OSError."""
    import collections

    model, opt, *_ = _setup()
    path = ckpt.save_checkpoint(tmp_path / ckpt.LAST, model, optimizer=opt, epoch=1)
    before = path.read_bytes()

    def fills_the_disk(obj, f, *args, **kwargs):
        f.write(b"x" * 1000)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file "
                           "data/3: file write failed")

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(ckpt.torch, "save", fills_the_disk)
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda p: usage(2**30, 2**30, 0))
    with pytest.raises(CCSError) as info:
        ckpt.save_checkpoint(path, model, optimizer=opt, epoch=2)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{path}: disk full")
    assert message.endswith("the previous checkpoint is intact")
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == [ckpt.LAST]

    def programming_error(*args, **kwargs):
        raise RuntimeError("something else")

    monkeypatch.setattr(ckpt.torch, "save", programming_error)
    with pytest.raises(RuntimeError, match="something else"):  # not disguised as a disk problem
        ckpt.save_checkpoint(path, model, epoch=2)


def test_file_size_limit_is_one_line(tmp_path):
    """Issue 11 #4: ``ulimit -f`` (Python ignores SIGXFSZ, so the write fails with EFBIG)."""
    import resource

    torch.manual_seed(0)
    model = torch.nn.Linear(64, 256)  # ~66 KB of weights
    path = ckpt.save_checkpoint(tmp_path / ckpt.LAST, model, epoch=1)
    before = path.read_bytes()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (16384, hard))
    try:
        with pytest.raises(CCSError) as info:
            ckpt.save_checkpoint(path, model, epoch=2)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    message = str(info.value)
    assert "\n" not in message and str(path) in message and "file size limit (ulimit -f, 16384 bytes)" in message
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == [ckpt.LAST]


def test_checkpoints_follow_the_umask(tmp_path):
    """Issue 11 #8: checkpoints were 0600 while every other output followed the umask."""
    model, *_ = _setup()
    previous = os.umask(0o022)
    try:
        path = ckpt.save_checkpoint(tmp_path / ckpt.LAST, model)
        os.umask(0o027)
        other = ckpt.save_checkpoint(tmp_path / ckpt.BEST, model)
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == 0o644
    assert other.stat().st_mode & 0o777 == 0o640


def test_size_estimate_covers_the_file(tmp_path):
    model, opt, sched, _ = _setup()
    estimate = ckpt.estimate_checkpoint_bytes(model, opt)  # before the first step: estimated state
    _train_steps(model, opt, sched, 1)
    path = ckpt.save_checkpoint(tmp_path / ckpt.LAST, model, optimizer=opt)
    assert path.stat().st_size <= estimate == ckpt.estimate_checkpoint_bytes(model, opt)
    adam = torch.optim.AdamW(model.parameters())
    assert ckpt.estimate_checkpoint_bytes(model, adam) > estimate


def test_checkpoints_with_the_older_stream_names_load(tmp_path):
    """The model's streams were ``backbone_f``/``backbone_o`` (classifiers ``_f``/``_o``)."""
    from ccs_fast.config import ModelConfig
    from ccs_fast.model import build_model

    cfg = ModelConfig(variant="baseline", backbone="resnet18", num_classes=3, flow_length=1)
    source, target = build_model(cfg), build_model(cfg)
    old = {k.replace("backbone_rgb.", "backbone_f.").replace("backbone_flow.", "backbone_o.")
           .replace("classifier_rgb.", "classifier_f.").replace("classifier_flow.", "classifier_o."): v
           for k, v in source.state_dict().items()}
    assert any(k.startswith("backbone_o.") for k in old)
    ckpt.load_model_state(tmp_path / "old.pt", target, old)
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_export_refuses_a_nonfinite_model(tmp_path, capsys, bad):
    """Issue 23 #2: a checkpoint holding NaN or inf exported with exit 0."""
    from ccs_fast.cli import main

    model, opt, sched, scaler = _setup(seed=int(torch.randint(0, 1000, ())))
    path = tmp_path / "last.pt"
    ckpt.save_checkpoint(path, model, optimizer=opt, config=Config().to_dict())
    state = torch.load(path, weights_only=True)
    index = int(torch.randint(0, state["model"]["2.weight"].numel(), ()))
    state["model"]["2.weight"].view(-1)[index] = bad  # as torch.save of a diverged model writes it
    torch.save(state, path)
    out = tmp_path / "shared.pt"
    with pytest.raises(CCSError, match=r"not exported: the model holds NaN or inf in 1 tensor \(e.g. 2.weight\)"):
        ckpt.export_checkpoint(path, out)
    assert main(["export", "--checkpoint", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"ccs-fast: error: {path}: not exported") and "Traceback" not in err
    assert not out.exists() and not list(tmp_path.glob(".*.tmp"))

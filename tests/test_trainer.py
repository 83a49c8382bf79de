"""The training loop on CPU with a tiny model and synthetic clips: outputs, exact resume,
NaN stop, optimizer and LR schedule; and what issue 11 found: a non-finite model, kill -9 and
resume with loader workers and dropout, resume traces, disk errors, run folder protection,
changes on resume, an empty evaluation."""
import collections
import errno
import functools
import os
import json
import math
import shutil

import pytest
import torch

from ccs_fast import trainer
from ccs_fast.checkpoint import read_checkpoint
from ccs_fast.config import Config
from ccs_fast.base.errors import CCSError
from ccs_fast.metrics import read_metrics
from tiny import BATCHES, tiny_config

pytest.importorskip("timm")




@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Shared runs (the slow part): 2 epochs straight, and 1 epoch then a resumed 2nd."""
    root = tmp_path_factory.mktemp("runs")
    straight = trainer.train(tiny_config(root / "straight", epochs=2))
    trainer.train(tiny_config(root / "split", epochs=1))
    shutil.copy(root / "split" / "last.pt", root / "epoch1.pt")
    resumed = trainer.train(tiny_config(root / "split", epochs=2), resume=str(root / "split"))
    return {"root": root, "straight": straight, "resumed": resumed}




def test_train_writes_outputs_and_summary(runs):
    out, summary = runs["root"] / "straight", runs["straight"]
    assert summary["epochs"] == 2 and summary["steps"] == 2 * BATCHES
    assert set(summary["eval"]) >= {"rgb", "flow", "fused", "num_videos"}
    assert 0.0 <= summary["eval"]["fused"]["top1"] <= summary["eval"]["fused"]["top5"] <= 1.0
    assert summary["best_metric"] is not None
    for name in ("config.yaml", "metrics.jsonl", "last.pt", "best.pt"):
        assert (out / name).is_file(), name
    assert any(p.name.startswith("events.out.tfevents") for p in (out / "tb").iterdir())
    records = read_metrics(out / "metrics.jsonl")
    splits = [r["split"] for r in records]
    assert splits.count("train") == 2 and splits.count("val") == 2 and splits.count("train_epoch") == 2
    train_record = next(r for r in records if r["split"] == "train")
    assert {"loss", "ce", "triplet", "center", "grad_norm", "lr", "clips_per_s", "epoch"} <= set(train_record)
    assert "fused_top1" in next(r for r in records if r["split"] == "val")
    epoch_record = next(r for r in records if r["split"] == "train_epoch")
    assert all(0.0 <= epoch_record[f"train_{s}_top1"] <= 1.0 for s in ("rgb", "flow", "fused"))
    state = read_checkpoint(out / "last.pt")
    assert (state["epoch"], state["step"]) == (2, 2 * BATCHES)
    assert state["config"]["model"]["backbone"] == "timm:test_resnet"
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in state["model"])


def test_resume_equals_straight_run(runs):
    root = runs["root"]
    assert read_checkpoint(root / "epoch1.pt")["epoch"] == 1
    assert runs["resumed"]["steps"] == 2 * BATCHES
    straight = read_checkpoint(root / "straight" / "last.pt")
    resumed = read_checkpoint(root / "split" / "last.pt")
    assert (resumed["epoch"], resumed["step"]) == (straight["epoch"], straight["step"])
    for key, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    for key, value in straight["optimizer"]["state"].items():
        assert torch.equal(value["momentum_buffer"], resumed["optimizer"]["state"][key]["momentum_buffer"])
    assert straight["scheduler"] == resumed["scheduler"]
    timings = ("eval_s",)  # seconds, not results
    assert ({k: v for k, v in runs["resumed"]["eval"].items() if k not in timings}
            == {k: v for k, v in runs["straight"]["eval"].items() if k not in timings})


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


def test_nan_loss_stops_and_keeps_last_good_checkpoint(runs, tmp_path, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(runs["root"] / "epoch1.pt", out / "last.pt")
    good = (out / "last.pt").read_bytes()
    real_objective = trainer.build_objective
    monkeypatch.setattr(trainer, "build_objective", lambda cfg: _NaNLoss(real_objective(cfg)))
    with pytest.raises(CCSError) as info:
        trainer.train(tiny_config(out, epochs=2), resume=str(out / "last.pt"))
    message = str(info.value)
    assert "\n" not in message and "non-finite loss" in message and str(out / "last.pt") in message
    assert (out / "last.pt").read_bytes() == good
    assert not (out / "best.pt").exists()


def test_resume_from_another_config_is_refused(runs):
    cfg = tiny_config(runs["root"] / "other", epochs=2)
    cfg.model.embed_dim = 8
    with pytest.raises(CCSError, match="embed_dim"):
        trainer.train(cfg, resume=str(runs["root"] / "epoch1.pt"))


def test_no_weight_decay_on_bn_and_bias():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(), torch.nn.LazyLinear(2))
    model(torch.randn(1, 3, 5, 5))
    decay, plain = trainer.param_groups(model, 5e-4)
    assert decay["weight_decay"] == 5e-4 and plain["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"]) and len(decay["params"]) == 2
    assert all(p.ndim == 1 for p in plain["params"]) and len(plain["params"]) == 4


def test_apex_asked_for_but_missing(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_apex(name, *args, **kwargs):
        if name.startswith("apex"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_apex)
    cfg = Config()
    cfg.optim.use_apex = True
    with pytest.raises(CCSError, match="apex"):
        trainer.build_optimizer(cfg, torch.nn.Linear(2, 2), torch.device("cpu"))


def test_lr_schedule_warmup_and_steps():
    factor = functools.partial(trainer.lr_factor, iters_per_epoch=10, lr_steps=[2, 4], gamma=0.1, warmup_iters=5)
    assert factor(0) == pytest.approx(0.2)
    assert factor(4) == pytest.approx(1.0)
    assert factor(19) == pytest.approx(1.0)
    assert factor(20) == pytest.approx(0.1)
    assert factor(40) == pytest.approx(0.01)


def test_two_process_ddp_under_torchrun(tmp_path):
    """torchrun with 2 CPU processes (gloo): both ranks train, rank 0 alone writes the run
    folder, and evaluation counts the videos of both ranks."""
    import json
    import socket
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "run.py"
    out = tmp_path / "run"
    script.write_text(
        "import json, os, sys, torch\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from tiny import tiny_config\n"
        "from ccs_fast import trainer\n"
        "torch.set_num_threads(1)\n"
        f"summary = trainer.train(tiny_config({str(out)!r}, epochs=1))\n"
        "print('RESULT', os.environ['RANK'], json.dumps(summary['eval']['num_videos']), flush=True)\n"
    )
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(port), str(script)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    results = dict(line.split()[1:] for line in proc.stdout.splitlines() if line.startswith("RESULT"))
    assert set(results) == {"0", "1"}
    # synthetic eval: BATCHES batches of 4 clips on each of the 2 ranks, gathered
    assert all(json.loads(v) == 2 * BATCHES * 4 for v in results.values())
    assert (out / "last.pt").exists()
    starts = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r.get("event") == "start"]
    assert len(starts) == 1 and starts[0]["world_size"] == 2


def test_deterministic_mode_reaches_the_ops_and_is_restored(tmp_path, monkeypatch):
    from ccs_fast import losses

    seen = []
    original = losses.cross_modal_triplet_loss

    def spy(*args, **kwargs):
        seen.append(torch.are_deterministic_algorithms_enabled())
        return original(*args, **kwargs)

    monkeypatch.setattr(losses, "cross_modal_triplet_loss", spy)
    before = torch.are_deterministic_algorithms_enabled()
    trainer.train(tiny_config(tmp_path / "det", epochs=1, deterministic=True))
    assert seen and all(seen)
    assert torch.are_deterministic_algorithms_enabled() == before


# ---------------------------------------------------------------------------- issue 11

def test_every_metrics_record_carries_the_run_id(runs):
    records = read_metrics(runs["root"] / "straight" / "metrics.jsonl")
    assert {r["run_id"] for r in records} == {runs["straight"]["run_id"]}


def _diverge_after_step(monkeypatch, at_step):
    """The first tracked BatchNorm of the model gets an infinite running_var right after the
    optimizer step number ``at_step`` (the loss of that step stays finite)."""
    models, steps = [], []
    real_build, real_step = trainer.build_model, trainer.amp_step

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

    monkeypatch.setattr(trainer, "build_model", build)
    monkeypatch.setattr(trainer, "amp_step", step)


def test_nonfinite_model_is_neither_evaluated_nor_saved(runs, tmp_path, monkeypatch, capsys):
    """#1: BN running_var went inf on the last step of an epoch with a finite loss; that model
    was evaluated, saved as last.pt and best.pt, and called the last good checkpoint."""
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(runs["root"] / "epoch1.pt", out / "last.pt")
    good = (out / "last.pt").read_bytes()
    _diverge_after_step(monkeypatch, BATCHES)  # the last step of epoch 2
    with pytest.raises(CCSError) as info:
        trainer.train(tiny_config(out, epochs=2), resume=str(out))
    message = str(info.value)
    assert "\n" not in message and "running_var" in message and "nothing evaluated or saved" in message
    assert f"last good checkpoint kept at {out / 'last.pt'}" in message
    assert (out / "last.pt").read_bytes() == good and not (out / "best.pt").exists()
    assert "[eval]" not in capsys.readouterr().out


def test_fresh_run_never_overwrites_a_run_folder(runs, tmp_path):
    """#5: a fresh train into a finished run's folder silently replaced last.pt and best.pt."""
    finished = runs["root"] / "straight"
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


def test_two_runs_into_one_folder(tmp_path):
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


def test_resume_applies_allowed_changes_and_refuses_others(runs, tmp_path, capsys):
    """#7: --set optim.lr on resume was dropped while config.yaml recorded it."""
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(runs["root"] / "epoch1.pt", out / "last.pt")
    refused = tiny_config(out, epochs=2)
    refused.optim.momentum = 0.5
    with pytest.raises(CCSError) as info:
        trainer.train(refused, resume=str(out))
    assert "optim.momentum 0.9 in the checkpoint, 0.5 now" in str(info.value)
    assert sorted(p.name for p in out.iterdir()) == ["last.pt"]

    cfg = tiny_config(out, epochs=2)
    cfg.optim.lr = 0.002
    trainer.train(cfg, resume=str(out))
    assert "changed on resume: optim.lr 0.01 -> 0.002, optim.epochs 1 -> 2" in capsys.readouterr().out
    state = read_checkpoint(out / "last.pt")
    assert state["scheduler"]["base_lrs"] == [0.002, 0.002]
    assert [g["lr"] for g in state["optimizer"]["param_groups"]] == [pytest.approx(0.002 * 0.1)] * 2  # decayed at epoch 1
    assert state["config"]["optim"]["lr"] == 0.002
    assert "lr: 0.002" in (out / "config.yaml").read_text()


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


def test_full_disk_and_unwritable_out_are_one_line(runs, tmp_path, monkeypatch):
    """#4: a full disk on metrics.jsonl, no room for a checkpoint and an unwritable --out."""
    from ccs_fast import metrics, run_folder

    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(runs["root"] / "epoch1.pt", out / "last.pt")
    good = (out / "last.pt").read_bytes()
    monkeypatch.setattr(metrics, "open", lambda *a, **k: _FillsUp(open(*a, **k)), raising=False)
    with pytest.raises(CCSError) as info:
        trainer.train(tiny_config(out, epochs=2), resume=str(out))
    assert str(info.value) == (f"{out / 'metrics.jsonl'}: disk full (no space left on device) while writing metrics; "
                               f"training stopped in epoch 2 (step {BATCHES + 2}), last good checkpoint kept at "
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


# ------------------------------------------------------ the torch loader with workers

def write_rawframes(root, videos, frames=6, size=32, classes=4):
    """``videos`` rawframe folders of noise JPEGs and their annotation list."""
    import cv2
    import numpy as np

    rng = np.random.default_rng(0)
    lines = []
    for v in range(videos):
        folder = root / "rawframes" / f"v{v}"
        folder.mkdir(parents=True)
        for i in range(1, frames + 1):
            cv2.imwrite(str(folder / f"img_{i:05d}.jpg"), rng.integers(0, 256, (size, size, 3), np.uint8))
            if i < frames:
                for axis in "xy":
                    cv2.imwrite(str(folder / f"flow_{axis}_{i:05d}.jpg"), rng.integers(0, 256, (size, size), np.uint8))
        lines.append(f"v{v} {frames} {v % classes}\n")
    (root / "list.txt").write_text("".join(lines))
    return root / "rawframes", root / "list.txt"


@pytest.fixture(scope="module")
def rawframes(tmp_path_factory):
    return write_rawframes(tmp_path_factory.mktemp("data"), videos=2 * 4)


def torch_loader_settings(root, annotation, workers):
    """--set values of the tiny config on the torch backend (dropout stays at its 0.5)."""
    cfg = tiny_config("unused")
    values = {
        "model.backbone": cfg.model.backbone, "model.num_classes": 4, "model.num_segments": 2,
        "model.flow_length": 1, "model.embed_dim": 16, "model.impl": "eager",
        "data.backend": "torch", "data.root": root, "data.train_list": annotation, "data.val_list": annotation,
        "data.batch_size": 4, "data.input_size": 32, "data.test_segments": 2, "data.num_workers": workers,
        "optim.lr": 0.01, "optim.epochs": 2, "optim.lr_steps": "[1]", "optim.warmup_epochs": 0.5,
        "train.precision": "fp32", "train.device": "cpu", "train.log_interval": 1, "train.eval_interval": 1,
        "train.progress": "false", "train.tensorboard": "false",
    }
    return [arg for key, value in values.items() for arg in ("--set", f"{key}={value}")]


def test_all_eval_videos_bad_with_skip_bad_is_an_error(rawframes, tmp_path, capsys):
    """#8: skip_bad with every validation video bad printed 0.0000 (0 videos) and saved best.pt."""
    from ccs_fast.cli import main

    root, annotation = rawframes
    bad_root = tmp_path / "bad"
    shutil.copytree(root, bad_root)
    for frame in bad_root.glob("v*/img_*.jpg"):
        frame.write_bytes(b"not a jpeg")
    val = tmp_path / "val.txt"
    val.write_text("".join(f"{bad_root / line}" for line in annotation.read_text().splitlines(True)[:4]))
    out = tmp_path / "run"
    args = ["train", "--out", str(out), *torch_loader_settings(root, annotation, 0),
            "--set", f"data.val_list={val}", "--set", "data.skip_bad=true", "--set", "optim.epochs=1"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"ccs-fast: error: {val}: no video left to evaluate (4 skipped as bad)")
    assert "cannot decode (not a JPEG: no start-of-image marker)" in err and "training stopped in epoch 1" in err
    assert not (out / "best.pt").exists() and not (out / "last.pt").exists()


def test_skipped_videos_are_counted_and_reported(rawframes, tmp_path, capsys):
    """Issue 12 #5: with skip_bad, the skipped videos were invisible in train and eval."""
    import json

    from ccs_fast.cli import main

    root, annotation = rawframes
    bad_root = tmp_path / "bad"
    shutil.copytree(root, bad_root)
    (bad_root / "v1" / "img_00001.jpg").write_bytes(b"not a jpeg")
    lines = annotation.read_text().splitlines(True)
    train = tmp_path / "train.txt"
    train.write_text("".join(lines) + "v0 1 1\n")  # and a line too short for the flow stack
    out = tmp_path / "run"
    args = ["train", "--out", str(out), *torch_loader_settings(bad_root, train, 0),
            "--set", "data.skip_bad=true", "--set", "optim.epochs=1"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    # v1 is drawn in training or not (8 of 9 rows fill 2 batches of 4): the short one is
    # dropped when the list is read
    assert "[train] epoch 1: skipped " in printed and "too short" in printed
    assert "[eval] epoch 1: skipped 2 videos as bad input" in printed
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    (epoch,) = [r for r in records if r["split"] == "train_epoch"]
    (val,) = [r for r in records if r["split"] == "val"]
    assert epoch["skipped_videos"] in (1, 2) and val["skipped_videos"] == 2
    assert any("too short" in reason for reason in epoch["skipped_reasons"])
    assert val["skipped_reasons"][0] == (f"{bad_root / 'v1' / 'img_00001.jpg'}: cannot decode "
                                         "(not a JPEG: no start-of-image marker)")
    assert "too short" in val["skipped_reasons"][1]

    assert main(["eval", "--checkpoint", str(out / "last.pt"), "--out", str(tmp_path / "eval")]) == 0
    assert "[eval] " in capsys.readouterr().out
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert result["skipped_videos"] == 2 and result["num_videos"] == 7


KILL_DRIVER = """
import io, os, sys, time
import torch
from ccs_fast.cli import main

kill_at = int(sys.argv[1])
real_save = torch.save
saves = []


def save_then_hang(obj, f, *args, **kwargs):
    # the kill_at-th save of last.pt writes half its bytes, says KILL, and waits to be killed
    if os.path.basename(str(getattr(f, "name", ""))).startswith(".last.pt."):
        saves.append(1)
        if len(saves) == kill_at:
            buffer = io.BytesIO()
            real_save(obj, buffer, *args, **kwargs)
            f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            f.flush()
            print("KILL", flush=True)
            time.sleep(300)
    return real_save(obj, f, *args, **kwargs)


torch.save = save_then_hang
sys.exit(main(sys.argv[2:]))
"""


def _run_driver(tmp_path, name, kill_at, args, timeout=150):
    """Run the training CLI in a new process group; with ``kill_at``, SIGKILL the whole group
    (the trainer and its loader workers) once the driver says KILL."""
    import signal
    import time

    from tiny import start_driver

    proc, log = start_driver(tmp_path, KILL_DRIVER, name, [kill_at, *args])
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if kill_at and "KILL" in log.read_text():
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return -signal.SIGKILL, log.read_text()
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, log.read_text()


@pytest.fixture(scope="module")
def killed_and_resumed(rawframes, tmp_path_factory):
    """A straight 2-epoch run, and one killed with -9 while saving last.pt after epoch 2 and
    resumed from last.pt of epoch 1; the torch loader with a worker, dropout 0.5."""
    tmp = tmp_path_factory.mktemp("kill")
    settings = torch_loader_settings(*rawframes, workers=1)
    code, log = _run_driver(tmp, "straight", 0, ["train", "--out", str(tmp / "straight"), *settings])
    assert code == 0, log
    out = tmp / "killed"
    code, log = _run_driver(tmp, "killed", 2, ["train", "--out", str(out), *settings])
    assert code == -9, log
    before = {
        "files": sorted(p.name for p in out.iterdir()),
        "epoch": read_checkpoint(out / "last.pt")["epoch"],
        "metrics": read_metrics(out / "metrics.jsonl"),
    }
    code, log = _run_driver(tmp, "resumed", 0, ["train", "--resume", str(out)])
    assert code == 0, log
    return {"straight": tmp / "straight", "out": out, "before": before, "log": log}


def test_kill_9_and_resume_with_workers_and_dropout_is_bit_exact(killed_and_resumed):
    """#2: the DataLoader drew worker seeds from the global RNG once per fresh iterator, so
    dropout after a resume differed from a straight run."""
    straight = read_checkpoint(killed_and_resumed["straight"] / "last.pt")
    resumed = read_checkpoint(killed_and_resumed["out"] / "last.pt")
    assert killed_and_resumed["before"]["epoch"] == 1 and "resumed from" in killed_and_resumed["log"]
    assert straight["config"]["data"]["num_workers"] == 1 and straight["config"]["model"]["dropout"] == 0.5
    assert (resumed["epoch"], resumed["step"]) == (straight["epoch"], straight["step"]) == (2, 4)
    differing = [k for k, v in straight["model"].items() if not torch.equal(v, resumed["model"][k])]
    assert not differing, f"{len(differing)} of {len(straight['model'])} tensors differ, e.g. {differing[:3]}"
    for key, slots in straight["optimizer"]["state"].items():
        assert torch.equal(slots["momentum_buffer"], resumed["optimizer"]["state"][key]["momentum_buffer"])
    assert resumed["best_metric"] == straight["best_metric"]


def test_resume_after_kill_leaves_no_traces(killed_and_resumed):
    """#3: the killed epoch's metrics rows stayed and were appended again, and the killed save
    left an orphan temporary file."""
    out, before = killed_and_resumed["out"], killed_and_resumed["before"]
    assert any(name.startswith(".last.pt.") and name.endswith(".tmp") for name in before["files"])
    assert "train.lock" in before["files"]
    assert max(r["step"] for r in before["metrics"]) == 4  # epoch 2 was logged before the kill
    assert "removed 1 unfinished temporary file(s)" in killed_and_resumed["log"]
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "config.yaml", "last.pt", "metrics.dropped.jsonl",
                                                     "metrics.jsonl"]
    records = read_metrics(out / "metrics.jsonl")
    keys = [(r["split"], r["step"]) for r in records if r["split"] != "info"]
    assert len(keys) == len(set(keys)) and ("val", 4) in keys
    killed_run, resumed_run = records[0]["run_id"], records[-1]["run_id"]
    assert killed_run != resumed_run
    assert all(r["run_id"] == (killed_run if r["step"] <= 2 and r.get("resumed_from") is None else resumed_run)
               for r in records)
    dropped = read_metrics(out / "metrics.dropped.jsonl")
    assert {(r["split"], r["step"]) for r in dropped} >= {("train", 3), ("train", 4), ("val", 4)}


def test_one_line_per_log_interval_off_a_terminal(tmp_path, capsys):
    """Issue 12 #7: in a log file nothing was printed between the start line and the end."""
    pytest.importorskip("timm")
    cfg = tiny_config(tmp_path / "run", epochs=2, progress=True, tensorboard=False)
    trainer.train(cfg)
    captured = capsys.readouterr()
    lines = [line for line in captured.out.splitlines() if " step " in line]
    assert [line.split(":")[0] for line in lines] == ["[train] epoch 1/2 step 2/2", "[train] epoch 2/2 step 2/2"]
    assert all("loss " in line and "lr " in line and "clips/s ETA " in line for line in lines)
    assert "\r" not in captured.out + captured.err
    assert trainer.format_duration(3725) == "1h02m" and trainer.format_duration(192) == "3m12s"


def test_3d_model_with_trn_trains_and_evaluates_on_rawframes(rawframes, tmp_path, capsys):
    """A 3-D base model end to end on the torch backend: train (i3d_resnet18, 2 clips of T=4
    frames at 32x32, TRN consensus over the clips, variant all: the block on each clip's
    T'·h·w tokens), then ``eval --crops 3`` over 2 test clips; eval.json reports the 3-D
    protocol."""
    from ccs_fast.cli import main

    root, full = rawframes
    annotation = tmp_path / "four.txt"
    annotation.write_text("".join(full.read_text().splitlines(keepends=True)[:4]))
    out = tmp_path / "run"
    settings = torch_loader_settings(root, annotation, 0) + [
        "--set", "model.backbone=i3d_resnet18", "--set", "model.num_segments=2", "--set", "model.clip_len=4",
        "--set", "model.frame_interval=1", "--set", "model.consensus=trn", "--set", "data.test_clips=2",
        "--set", "optim.epochs=1", "--set", "data.val_list=",
        "--set", "model.cb_gamma_init=1.0"]
    assert main(["train", "--out", str(out), *settings]) == 0
    records = read_metrics(out / "metrics.jsonl")
    assert math.isfinite(next(r for r in records if r["split"] == "train_epoch")["loss"])
    assert main(["eval", "--checkpoint", str(out), "--list", str(annotation), "--crops", "3",
                 "--out", str(tmp_path / "eval")]) == 0
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert result["num_videos"] == 4 and result["crops"] == 3
    assert (result["protocol"]["clips"], result["protocol"]["clip_len"]) == (2, 4)
    assert "2 clips of 4x1 frames x 3 crops (along the long side), consensus trn" in capsys.readouterr().out


def test_training_batch_top1_per_stream_and_fused():
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    logits_f, logits_o = torch.randn(64, 5, generator=g), torch.randn(64, 5, generator=g)
    labels = torch.randint(0, 5, (64,), generator=g)
    hits = trainer._batch_hits({"logits_f": logits_f, "logits_o": logits_o}, labels, (1.0, 2.0))
    fused = logits_f.softmax(-1) + 2.0 * logits_o.softmax(-1)
    want = [(x.argmax(-1) == labels).float().mean().item() for x in (logits_f, logits_o, fused)]
    assert hits.tolist() == pytest.approx(want)

"""Exact resume of a training run: a resumed run ends as a straight one (synthetic clips; and
the torch loader with a worker and dropout after kill -9), a checkpoint of another config is
refused, the changeable settings are applied, and a resume leaves no traces of the killed run."""
import os
import shutil

import pytest
import torch

from ccs_fast import trainer
from ccs_fast.checkpoint import read_checkpoint
from ccs_fast.base.errors import CCSError
from ccs_fast.metrics import read_metrics

pytest.importorskip("timm")




def test_resume_equals_straight_run(tiny_config, tiny_runs):
    root = tiny_runs["root"]
    assert read_checkpoint(root / "epoch1.pt")["epoch"] == 1
    assert tiny_runs["resumed"]["steps"] == 2 * tiny_config.batches
    straight = read_checkpoint(root / "straight" / "last.pt")
    resumed = read_checkpoint(root / "split" / "last.pt")
    assert (resumed["epoch"], resumed["step"]) == (straight["epoch"], straight["step"])
    for key, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    for key, value in straight["optimizer"]["state"].items():
        assert torch.equal(value["momentum_buffer"], resumed["optimizer"]["state"][key]["momentum_buffer"])
    assert straight["scheduler"] == resumed["scheduler"]
    timings = ("eval_s",)  # seconds, not results
    assert ({k: v for k, v in tiny_runs["resumed"]["eval"].items() if k not in timings}
            == {k: v for k, v in tiny_runs["straight"]["eval"].items() if k not in timings})


def test_resume_from_another_config_is_refused(tiny_config, tiny_runs):
    cfg = tiny_config(tiny_runs["root"] / "other", epochs=2)
    cfg.model.embed_dim = 8
    with pytest.raises(CCSError, match="embed_dim"):
        trainer.train(cfg, resume=str(tiny_runs["root"] / "epoch1.pt"))


def test_resume_applies_allowed_changes_and_refuses_others(tiny_config, tiny_runs, tmp_path, capsys):
    """#7: --set optim.lr on resume was dropped while config.yaml recorded it."""
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(tiny_runs["root"] / "epoch1.pt", out / "last.pt")
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


def _run_driver(start_driver, tmp_path, name, kill_at, args, timeout=150):
    """Run the training CLI in a new process group; with ``kill_at``, SIGKILL the whole group
    (the trainer and its loader workers) once the driver says KILL."""
    import signal
    import time


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
def killed_and_resumed(tiny_config, tiny_rawframes, start_driver, tmp_path_factory):
    """A straight 2-epoch run, and one killed with -9 while saving last.pt after epoch 2 and
    resumed from last.pt of epoch 1; the torch loader with a worker, dropout 0.5."""
    tmp = tmp_path_factory.mktemp("kill")
    settings = tiny_config.torch_loader_settings(*tiny_rawframes, workers=1)
    code, log = _run_driver(start_driver, tmp, "straight", 0, ["train", "--out", str(tmp / "straight"), *settings])
    assert code == 0, log
    out = tmp / "killed"
    code, log = _run_driver(start_driver, tmp, "killed", 2, ["train", "--out", str(out), *settings])
    assert code == -9, log
    before = {
        "files": sorted(p.name for p in out.iterdir()),
        "epoch": read_checkpoint(out / "last.pt")["epoch"],
        "metrics": read_metrics(out / "metrics.jsonl"),
    }
    code, log = _run_driver(start_driver, tmp, "resumed", 0, ["train", "--resume", str(out)])
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

"""The training loop on CPU with a tiny model and synthetic clips: outputs, exact resume,
NaN stop, optimizer and LR schedule."""
import functools
import shutil

import pytest
import torch

from ccs_fast import trainer
from ccs_fast.checkpoint import read_checkpoint
from ccs_fast.config import Config
from ccs_fast.errors import CCSError
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
    assert runs["resumed"]["eval"] == runs["straight"]["eval"]


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

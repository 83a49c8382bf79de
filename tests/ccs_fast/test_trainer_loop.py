"""The training loop on CPU with a tiny model and synthetic clips: outputs and summary, the
optimizer's weight-decay groups and LR schedule, DDP under torchrun, deterministic mode, the
log lines, skipped videos, a 3-D model, the training-batch top-1."""
import functools
import json
import math
import shutil

import pytest
import torch

from ccs_fast import epoch, metrics, recipe, trainer
from ccs_fast.checkpoint import read_checkpoint
from ccs_fast.config import Config
from ccs_fast.base.errors import CCSError
from ccs_fast.metrics import read_metrics

pytest.importorskip("timm")




def test_train_writes_outputs_and_summary(tiny_config, tiny_runs):
    out, summary = tiny_runs["root"] / "straight", tiny_runs["straight"]
    assert summary["epochs"] == 2 and summary["steps"] == 2 * tiny_config.batches
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
    assert (state["epoch"], state["step"]) == (2, 2 * tiny_config.batches)
    assert state["config"]["model"]["backbone"] == "timm:test_resnet"
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in state["model"])


def test_no_weight_decay_on_bn_and_bias():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(), torch.nn.LazyLinear(2))
    model(torch.randn(1, 3, 5, 5))
    decay, plain = recipe.param_groups(model, 5e-4)
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
        recipe.build_optimizer(cfg, torch.nn.Linear(2, 2), torch.device("cpu"))


def test_lr_schedule_warmup_and_steps():
    factor = functools.partial(recipe.lr_factor, iters_per_epoch=10, lr_steps=[2, 4], gamma=0.1, warmup_iters=5)
    assert factor(0) == pytest.approx(0.2)
    assert factor(4) == pytest.approx(1.0)
    assert factor(19) == pytest.approx(1.0)
    assert factor(20) == pytest.approx(0.1)
    assert factor(40) == pytest.approx(0.01)


def test_two_process_ddp_under_torchrun(tiny_config, tmp_path):
    """torchrun with 2 CPU processes (gloo): both ranks train, rank 0 alone writes the run
    folder, and evaluation counts the videos of both ranks."""
    import json
    import socket
    import subprocess
    import sys
    from ccs_fast.config import save_config

    script, config = tmp_path / "run.py", tmp_path / "tiny.yaml"
    out = tmp_path / "run"
    save_config(tiny_config(out, epochs=1), config)
    script.write_text(
        "import json, os, torch\n"
        "from ccs_fast import trainer\n"
        "from ccs_fast.config import load_config\n"
        "torch.set_num_threads(1)\n"
        f"summary = trainer.fit(load_config({str(config)!r}))\n"
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
    # synthetic eval: tiny_config.batches batches of 4 clips on each of the 2 ranks, gathered
    assert all(json.loads(v) == 2 * tiny_config.batches * 4 for v in results.values())
    assert (out / "last.pt").exists()
    starts = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r.get("event") == "start"]
    assert len(starts) == 1 and starts[0]["world_size"] == 2


def test_deterministic_mode_reaches_the_ops_and_is_restored(tiny_config, tmp_path, monkeypatch):
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


def test_every_metrics_record_carries_the_run_id(tiny_runs):
    records = read_metrics(tiny_runs["root"] / "straight" / "metrics.jsonl")
    assert {r["run_id"] for r in records} == {tiny_runs["straight"]["run_id"]}


def test_skipped_videos_are_counted_and_reported(tiny_config, tiny_rawframes, tmp_path, capsys):
    """Issue 12 #5: with skip_bad, the skipped videos were invisible in train and eval."""
    import json

    from ccs_fast.cli import main

    root, annotation = tiny_rawframes
    bad_root = tmp_path / "bad"
    shutil.copytree(root, bad_root)
    (bad_root / "v1" / "img_00001.jpg").write_bytes(b"not a jpeg")
    lines = annotation.read_text().splitlines(True)
    train = tmp_path / "train.txt"
    train.write_text("".join(lines) + "v0 1 1\n")  # and a line too short for the flow stack
    out = tmp_path / "run"
    args = ["train", "--out", str(out), *tiny_config.torch_loader_settings(bad_root, train, 0),
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


def test_one_line_per_log_interval_off_a_terminal(tiny_config, tmp_path, capsys):
    """Issue 12 #7: in a log file nothing was printed between the start line and the end."""
    pytest.importorskip("timm")
    cfg = tiny_config(tmp_path / "run", epochs=2, progress=True, tensorboard=False)
    trainer.train(cfg)
    captured = capsys.readouterr()
    lines = [line for line in captured.out.splitlines() if " step " in line]
    assert [line.split(":")[0] for line in lines] == ["[train] epoch 1/2 step 2/2", "[train] epoch 2/2 step 2/2"]
    assert all("loss " in line and "lr " in line and "clips/s ETA " in line for line in lines)
    assert "\r" not in captured.out + captured.err
    assert metrics.format_duration(3725) == "1h02m" and metrics.format_duration(192) == "3m12s"


def test_3d_model_with_trn_trains_and_evaluates_on_rawframes(tiny_config, tiny_rawframes, tmp_path, capsys):
    """A 3-D base model end to end on the torch backend: train (i3d_resnet18, 2 clips of T=4
    frames at 32x32, TRN consensus over the clips, variant all: the block on each clip's
    T'·h·w tokens), then ``eval --crops 3`` over 2 test clips; eval.json reports the 3-D
    protocol."""
    from ccs_fast.cli import main

    root, full = tiny_rawframes
    annotation = tmp_path / "four.txt"
    annotation.write_text("".join(full.read_text().splitlines(keepends=True)[:4]))
    out = tmp_path / "run"
    settings = tiny_config.torch_loader_settings(root, annotation, 0) + [
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
    hits = epoch.batch_hits({"logits_f": logits_f, "logits_o": logits_o}, labels, (1.0, 2.0))
    fused = logits_f.softmax(-1) + 2.0 * logits_o.softmax(-1)
    want = [(x.argmax(-1) == labels).float().mean().item() for x in (logits_f, logits_o, fused)]
    assert hits.tolist() == pytest.approx(want)


def test_a_training_run_validates_its_config_once(tiny_config, tmp_path, monkeypatch):
    """``train`` validates a Config built in code once; nothing after it (the model's build
    included) validates it again. ``ccs-fast train`` validates in load_config and calls fit."""
    calls = []
    real = Config.validate
    cfg = tiny_config(tmp_path / "run", epochs=1, tensorboard=False)
    monkeypatch.setattr(Config, "validate", lambda self, *args, **kwargs: calls.append(1) or real(self, *args, **kwargs))
    trainer.train(cfg)
    assert len(calls) == 1

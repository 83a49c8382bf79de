"""Stop signals (issue 23 #3): SIGTERM, SIGINT and SIGUSR1 stop training at a step boundary
with a resumable mid-epoch checkpoint; the resumed run ends bit-identical to one that never
stopped. The subprocess test signals a real ``ccs-fast train`` with a loader worker and
dropout, as a batch scheduler does (the whole process group)."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from ccs_fast import epoch, recipe, trainer
from ccs_fast.checkpoint import read_checkpoint
from ccs_fast.metrics import read_metrics
from ccs_fast.base.signals import SignalExit

pytest.importorskip("timm")


class _SignalAtStep(torch.nn.Module):
    """The real objective; at step ``at`` it sends this process ``signals`` (then sleeps
    ``sleep`` seconds: a slow step)."""

    def __init__(self, objective, at, signals, sleep=0.0):
        super().__init__()
        self.objective, self.at, self.signals, self.sleep = objective, at, signals, sleep
        self.calls = 0

    def forward(self, *args):
        self.calls += 1
        if self.calls == self.at:
            for signum in self.signals:
                os.kill(os.getpid(), signum)
            time.sleep(self.sleep)
        return self.objective(*args)


def _signal_at(monkeypatch, at, signals, sleep=0.0):
    real = recipe.build_objective
    monkeypatch.setattr(recipe, "build_objective", lambda cfg: _SignalAtStep(real(cfg), at, signals, sleep))


def _same_weights(a, b):
    differing = [k for k, v in a["model"].items() if not torch.equal(v, b["model"][k])]
    assert not differing, f"{len(differing)} of {len(a['model'])} tensors differ, e.g. {differing[:3]}"
    for key, slots in a["optimizer"]["state"].items():
        assert torch.equal(slots["momentum_buffer"], b["optimizer"]["state"][key]["momentum_buffer"])
    assert a["scheduler"] == b["scheduler"] and (a["epoch"], a["step"]) == (b["epoch"], b["step"])


def _accuracies(result: dict) -> dict:
    """An evaluation's results without its timings (``*_s``)."""
    return {key: value for key, value in result.items() if not key.endswith("_s")}


@pytest.fixture(scope="module")
def straight(tiny_config, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "run"
    return out, trainer.train(tiny_config(out, epochs=2))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1], ids=["SIGTERM", "SIGINT", "SIGUSR1"])
def test_signal_stops_mid_epoch_and_resume_is_bit_exact(tiny_config, straight, tmp_path, monkeypatch, capsys, signum):
    """Before: SIGTERM killed the run without a word (exit 143, lock and temporary left);
    SIGINT raised KeyboardInterrupt out of the loop; SIGUSR1 killed it."""
    out = tmp_path / "run"
    _signal_at(monkeypatch, tiny_config.batches + 1, [signum])  # the first step of epoch 2
    summary = trainer.train(tiny_config(out, epochs=2))
    name = signal.Signals(signum).name
    assert summary["stopped_by"] == name and summary["exit_code"] == 128 + signum
    lines = [line for line in capsys.readouterr().out.splitlines() if "received" in line]
    assert lines == [f"[train] {name} received: stopped in epoch 2 after batch 1/{tiny_config.batches} (step {tiny_config.batches + 1}), "
                     + lines[0].split(f"(step {tiny_config.batches + 1}), ", 1)[1]]
    assert lines[0].endswith(f"resume with: ccs-fast train --resume {out}")
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "config.yaml", "last.pt", "metrics.jsonl", "tb"]
    state = read_checkpoint(out / "last.pt")
    assert (state["epoch"], state["step"], state["mid_epoch"]["batches"]) == (1, tiny_config.batches + 1, 1)
    monkeypatch.undo()
    resumed = trainer.train(tiny_config(out, epochs=2), resume=str(out))
    assert "stopped_by" not in resumed
    _same_weights(read_checkpoint(straight[0] / "last.pt"), read_checkpoint(out / "last.pt"))
    assert _accuracies(resumed["eval"]) == _accuracies(straight[1]["eval"])
    # the resumed epoch's record holds the whole epoch, as the straight run's does
    epoch_records = [[r for r in read_metrics(folder / "metrics.jsonl") if r["split"] == "train_epoch"]
                     for folder in (straight[0], out)]
    keep = ("loss", "ce", "triplet", "center", "grad_norm", "train_fused_top1", "epoch", "step")
    assert [{k: r[k] for k in keep} for r in epoch_records[1]] == [{k: r[k] for k in keep} for r in epoch_records[0]]


def test_second_signal_ends_at_once_without_a_checkpoint(tiny_config, tmp_path, monkeypatch):
    out = tmp_path / "run"
    trainer.train(tiny_config(out, epochs=1))
    before = (out / "last.pt").read_bytes()
    _signal_at(monkeypatch, 1, [signal.SIGTERM, signal.SIGTERM])
    with pytest.raises(SignalExit) as info:
        trainer.train(tiny_config(out, epochs=2), resume=str(out))
    assert info.value.exit_code == 143 and "received again" in str(info.value) and "\n" not in str(info.value)
    assert (out / "last.pt").read_bytes() == before
    assert not (out / "train.lock").exists() and not list(out.glob(".*.tmp"))


def test_no_step_boundary_in_time_ends_without_a_checkpoint(tiny_config, tmp_path, monkeypatch):
    """The wait for a step boundary is bounded by train.stop_timeout_s."""
    out = tmp_path / "run"
    _signal_at(monkeypatch, 1, [signal.SIGTERM], sleep=30)
    started = time.monotonic()
    with pytest.raises(SignalExit) as info:
        trainer.train(tiny_config(out, epochs=1, stop_timeout_s=0.5))
    assert time.monotonic() - started < 15
    assert "no step boundary within 0.5 s (train.stop_timeout_s)" in str(info.value)
    assert not (out / "train.lock").exists() and not (out / "last.pt").exists()


def test_save_every_steps_writes_mid_epoch_checkpoints(tiny_config, straight, tmp_path):
    """train.save_every_steps: a resumable last.pt between epoch ends (jobs killed with no signal)."""
    out = tmp_path / "run"
    seen = []
    real_save = epoch.save_checkpoint

    def spy(path, model, **fields):
        seen.append((fields["step"], (fields.get("mid_epoch") or {}).get("batches")))
        return real_save(path, model, **fields)

    epoch.save_checkpoint = spy
    try:
        trainer.train(tiny_config(out, epochs=2, save_every_steps=1, eval_interval=5))
    finally:
        epoch.save_checkpoint = real_save
    assert [s for s in seen if s[1] is not None] == [(1, 1), (3, 1)]
    _same_weights(read_checkpoint(straight[0] / "last.pt"), read_checkpoint(out / "last.pt"))


# ------------------------------------------------------------ a real ccs-fast train process

SIGNAL_DRIVER = """
import os, signal, sys, time
import torch
from ccs_fast import recipe
from ccs_fast.cli import main

wait_at = int(sys.argv[1])
real_objective = recipe.build_objective


class Marked(torch.nn.Module):
    # the real objective; at step wait_at it says STEP and holds the step until the trainer
    # has seen a stop signal, so the stop falls at that step's end whatever the timing
    def __init__(self, objective):
        super().__init__()
        self.objective, self.calls = objective, 0

    def forward(self, *args):
        self.calls += 1
        if self.calls == wait_at:
            print("STEP", self.calls, flush=True)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                handler = signal.getsignal(signal.SIGTERM)
                if getattr(getattr(handler, "__self__", None), "requested", False):
                    break
                time.sleep(0.02)
        return self.objective(*args)


recipe.build_objective = lambda cfg: Marked(real_objective(cfg))
sys.exit(main(sys.argv[2:]))
"""


def _run(start_driver, tmp_path, name, wait_at, args, signum=None, timeout=180):
    proc, log = start_driver(tmp_path, SIGNAL_DRIVER, name, [wait_at, *args])
    deadline = time.monotonic() + timeout
    signalled = None
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if signum is not None and signalled is None and "STEP" in log.read_text():
                os.killpg(proc.pid, signum)  # the trainer and its loader worker, as Slurm does
                signalled = time.monotonic()
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    group_left = True
    try:
        os.killpg(proc.pid, 0)
    except ProcessLookupError:
        group_left = False
    return proc.returncode, log.read_text(), group_left, (time.monotonic() - signalled) if signalled else None


def test_sigterm_to_a_training_process_then_resume_is_bit_exact(tiny_config, noise_rawframes, start_driver, tmp_path):
    """A real ``ccs-fast train`` (torch loader, 1 worker, dropout 0.5) gets SIGTERM in epoch 1
    (after batch 3 of 4), writes a mid-epoch checkpoint, exits 143 with one line; ``--resume``
    ends with the same weights, bit for bit, as a run that never stopped."""
    root, annotation = noise_rawframes(tmp_path / "data", videos=4 * 4)
    settings = tiny_config.torch_loader_settings(root, annotation, workers=1)
    code, log, _, _ = _run(start_driver, tmp_path, "straight", 0, ["train", "--out", str(tmp_path / "straight"), *settings])
    assert code == 0, log
    out = tmp_path / "stopped"
    code, log, group_left, seconds = _run(start_driver, tmp_path, "stopped", 3, ["train", "--out", str(out), *settings],
                                          signum=signal.SIGTERM)
    assert code == 143, log
    assert not group_left, "a loader worker outlived the trainer"
    stop_lines = [line for line in log.splitlines() if "SIGTERM" in line]
    assert len(stop_lines) == 1 and "stopped in epoch 1 after batch 3/4 (step 3)" in stop_lines[0], log
    assert stop_lines[0].endswith(f"resume with: ccs-fast train --resume {out}")
    assert "Traceback" not in log and seconds < 30
    assert not (out / "train.lock").exists() and not list(out.glob(".*.tmp"))
    state = read_checkpoint(out / "last.pt")
    assert (state["epoch"], state["step"], state["mid_epoch"]["batches"]) == (0, 3, 3)

    code, log, _, _ = _run(start_driver, tmp_path, "resumed", 0, ["train", "--resume", str(out)])
    assert code == 0, log
    assert f"resumed from {out / 'last.pt'} (epoch 1 after batch 3/4, step 3)" in log
    straight, resumed = read_checkpoint(tmp_path / "straight" / "last.pt"), read_checkpoint(out / "last.pt")
    assert straight["config"]["data"]["num_workers"] == 1 and straight["config"]["model"]["dropout"] == 0.5
    _same_weights(straight, resumed)
    assert (resumed["epoch"], resumed["step"]) == (2, 8) and resumed["best_metric"] == straight["best_metric"]


LEFT_WORKERS = """
import functools, os, sys, time
import torch
from torch.utils.data import DataLoader
from ccs_fast.dataloader.torch_loader import _worker_init

class Rows(torch.utils.data.Dataset):
    def __len__(self):
        return 64
    def __getitem__(self, i):
        return torch.full((4,), float(i))

loader = DataLoader(Rows(), batch_size=4, num_workers=2, persistent_workers=True,
                    worker_init_fn=functools.partial(_worker_init, parent_pid=os.getpid()))
it = iter(loader)
next(it)  # the workers run; `it` stays referenced until the interpreter exits
print(" ".join(str(w.pid) for w in it._workers), flush=True)
sys.stdin.readline()  # the test signals a worker, then says go
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sigwaitinfo and /proc: Linux")
def test_loader_workers_ignore_a_group_sigterm_but_not_their_parents(tmp_path):
    """A SIGTERM from anyone but the trainer (a scheduler signalling the process group) leaves
    a loader worker running; the parent's own terminate(), which Python's exit sends to every
    daemonic child it then joins, ends it: a process that exits with loader workers still
    running does not wait for them for ever."""
    script = tmp_path / "left_workers.py"
    script.write_text(LEFT_WORKERS)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=env, cwd=tmp_path)
    try:
        workers = [int(pid) for pid in proc.stdout.readline().split()]
        assert len(workers) == 2 and all(_alive(pid) for pid in workers)
        os.kill(workers[0], signal.SIGTERM)  # from this process: not the worker's parent
        time.sleep(1.0)
        assert _alive(workers[0]), "a SIGTERM from outside ended a loader worker"
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            for pid in workers:
                if _alive(pid):
                    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in workers)

"""Where a training run starts: from scratch, or from a checkpoint it may continue.

``read_resume`` decides whether a checkpoint can continue a config before anything is
built or written: it must hold the optimizer state (``last.pt``; ``best.pt`` keeps the model
only), differ from the config only in ``config.RESUME_CHANGEABLE`` settings, and leave
epochs to train. ``restore`` then puts the checkpoint back into the run's model, optimizer,
schedule and loss scaler, with every RNG state of this rank; a new ``optim.lr`` replaces the
base rate of the restored schedule (its position and decays stay).

Exact resume: the checkpoint holds every RNG state, the loaders draw nothing from the
global RNGs (the torch loader's DataLoader has its own generator, so its workers' seeds are
the same in a resumed process), so a run killed at any point and resumed from ``last.pt``
ends with the same weights, bit for bit on CPU, as one that never stopped. A mid-epoch
checkpoint (a stop signal, ``train.save_every_steps``) also holds each rank's
``EpochProgress``: the resumed epoch starts its loader after the batches already trained on
and logs what an uninterrupted epoch would; it needs the same number of processes and an
epoch at least that long.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ccs_fast.base.distributed import DistEnv
from ccs_fast.base.errors import bad_file
from ccs_fast.checkpoint import BEST, LAST, read_checkpoint, resolve_checkpoint_path, restore_checkpoint
from ccs_fast.config import RESUME_CHANGEABLE, Config, resume_differences
from ccs_fast.metrics import EpochProgress


@dataclass
class StartPoint:
    """Where a run starts. A fresh run: epoch 0, step 0. A resumed one: its checkpoint
    (``path``; ``state`` until ``restore`` has put it back), the settings changed
    (``{name: (old, new)}``), the epochs and steps done, the best RGB+Flow top-1 so far, the
    run id of the run that wrote it and, for a mid-epoch checkpoint, this rank's progress."""
    path: Optional[Path] = None
    state: Optional[dict] = None
    changed: dict = field(default_factory=dict)
    epoch: int = 0
    step: int = 0
    best_metric: Optional[float] = None
    run_id: Optional[str] = None
    progress: Optional[EpochProgress] = None

    @property
    def resumed(self) -> bool:
        return self.path is not None


def read_resume(resume, cfg: Config) -> StartPoint:
    """The start of a run of ``cfg``: fresh without ``resume``; else the checkpoint (a file or
    a run folder holding last.pt), CCSError when it cannot continue this config."""
    if not resume:
        return StartPoint()
    path = resolve_checkpoint_path(resume)
    state = read_checkpoint(path)
    if state.get("optimizer") is None:
        raise bad_file(path, f"holds no optimizer state ({BEST} keeps the model only); resume from {LAST}")
    changed, refused = resume_differences(state.get("config") or {}, cfg)
    if refused:
        shown = "; ".join(f"{name} {old!r} in the checkpoint, {new!r} now" for name, (old, new) in refused.items())
        raise bad_file(path, f"cannot resume with different settings ({shown}); a resumed run may only change "
                             f"{', '.join(RESUME_CHANGEABLE)}; start a new run in another folder instead")
    if state["epoch"] >= cfg.optim.epochs:
        raise bad_file(path, f"nothing to train: the checkpoint has finished epoch {state['epoch']} and "
                             f"optim.epochs is {cfg.optim.epochs}; raise optim.epochs to train on")
    return StartPoint(path=path, state=state, changed=changed)


def restore(point: StartPoint, cfg: Config, env: DistEnv, device, iters_per_epoch: int,
            model, optimizer, scheduler, scaler) -> None:
    """A resumed run's checkpoint back into the model, optimizer, schedule, scaler and this
    rank's RNGs; ``point`` then says where the run goes on (nothing happens for a fresh one)."""
    if point.state is None:
        return
    state = point.state
    restore_checkpoint(point.path, state, model, optimizer, scheduler, scaler, restore_rng=True, rank=env.rank)
    point.epoch, point.step, point.best_metric = state["epoch"], state["step"], state.get("best_metric")
    point.run_id = state.get("run_id")
    point.progress = _resumed_progress(point.path, state, env, device, iters_per_epoch)
    _apply_changes(cfg, point.changed, optimizer, scheduler)
    point.state = None  # the tensors now live in the model and optimizer


def _resumed_progress(path: Path, state: dict, env: DistEnv, device, iters_per_epoch: int) -> Optional[EpochProgress]:
    """The epoch progress of a mid-epoch checkpoint (this rank's; None at an epoch's end)."""
    mid = state.get("mid_epoch")
    if not mid:
        return None
    ranks = mid["progress"]
    if len(ranks) != env.world_size:
        raise bad_file(path, f"stopped mid-epoch with {len(ranks)} process(es), resumed with {env.world_size}: "
                             "the loader's position in the epoch depends on it; resume with the same number, "
                             "or from a checkpoint written at an epoch's end")
    progress = EpochProgress.from_state(ranks[env.rank], device)
    if progress.batches > iters_per_epoch:
        raise bad_file(path, f"stopped after batch {progress.batches} of an epoch that now has {iters_per_epoch}: "
                             "the training list or batch size changed")
    return progress


def _apply_changes(cfg: Config, changed: dict, optimizer, scheduler) -> None:
    """A new optim.lr replaces the base rate of the restored schedule (its position and
    decays stay); the other changeable settings take effect through ``cfg``."""
    if "optim.lr" in changed:
        scheduler.base_lrs = [cfg.optim.lr] * len(optimizer.param_groups)
        for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas):
            group["initial_lr"] = cfg.optim.lr
            group["lr"] = cfg.optim.lr * factor(scheduler.last_epoch)

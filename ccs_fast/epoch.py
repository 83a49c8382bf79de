"""One training epoch, and the run state its steps share (``TrainingRun``).

A step (``train_step``) runs forward, the losses, the AMP step and the LR step; its losses,
gradient norm and training-batch top-1 add up on the device. They are read (a host sync)
every ``train.log_interval`` steps (``log_interval``: logged, shown on the bar, printed as a
line where no bar is drawn) and at the epoch's end (``epoch_record``), which is also where a
NaN/inf loss stops training. Between steps: the stop check (``stop_now``: a stop signal ends
the epoch at a step boundary) and, every ``train.save_every_steps`` steps, a mid-epoch
``last.pt`` (``write_checkpoint``: every rank's RNG states and epoch progress, rank 0 writes).
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from ccs_fast.amp import amp_step
from ccs_fast.base.distributed import DistEnv, any_rank, gather_objects
from ccs_fast.base.errors import CCSError
from ccs_fast.base.signals import GracefulStop
from ccs_fast.checkpoint import BEST, LAST, rng_state, save_checkpoint
from ccs_fast.config import Config
from ccs_fast.evaluate import STREAMS, fuse_scores
from ccs_fast.loaders import skipped_line, skipped_report
from ccs_fast.losses import ranking_ramp
from ccs_fast.metrics import (LOSS_NAMES, TRAIN_ACCURACY_NAMES, EpochProgress, MetricsLogger, Progress, Throughput,
                              interval_line, mean_over_steps, topk_correct)
from ccs_fast.recipe import Parts


@dataclass
class TrainingRun:
    """A run under way: its config, process and id, the parts, the wrapped model the steps
    run (DDP / torch.compile), the metrics writer, and how far it has got (``step``: optimizer
    steps; ``epoch``: 0-based, the one training or just trained)."""
    cfg: Config
    env: DistEnv
    device: torch.device
    run_id: str
    stop: GracefulStop
    parts: Parts
    forward_model: torch.nn.Module
    logger: MetricsLogger
    step: int
    epoch: int
    best_metric: Optional[float]
    last_train: dict = field(default_factory=dict)  # the last logged losses
    last_eval: dict = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)
    start_step: int = 0

    @property
    def last_path(self) -> Path:
        return Path(self.cfg.train.out_dir) / LAST

    @property
    def best_path(self) -> Path:
        return Path(self.cfg.train.out_dir) / BEST

    # never evaluate through DDP: ranks may get different numbers of eval batches, and DDP's
    # per-forward buffer broadcast would then wait for ever
    @property
    def eval_model(self) -> torch.nn.Module:
        return self.forward_model if (self.cfg.train.compile and not self.env.distributed) else self.parts.model


class TrainingStopped(CCSError):
    """A stop whose message already says what was kept."""


def kept(last_path: Path) -> str:
    return f"last good checkpoint kept at {last_path}" if last_path.exists() else "no checkpoint written yet"


def nan_error(where: str, values: dict, run: TrainingRun) -> CCSError:
    bad = ", ".join(f"{k}={v}" for k, v in values.items() if not math.isfinite(v))
    return TrainingStopped(f"{run.last_path.parent}: non-finite loss ({bad}) at epoch {run.epoch + 1} step {run.step} "
                           f"({where}); training stopped, {kept(run.last_path)}")


def batch_hits(out: dict, labels: torch.Tensor, fusion_weights) -> torch.Tensor:
    """Top-1 of the RGB, flow and fused predictions (``evaluate.fuse_scores``) on one training
    batch, on the device (the augmented clips, train-mode model)."""
    scores = fuse_scores(out["logits_f"].detach(), out["logits_o"].detach(), fusion_weights)
    return torch.cat([topk_correct(scores[s], labels, (1,)) for s in STREAMS]) / labels.numel()


def write_checkpoint(run: TrainingRun, path: Path, epoch_done: int, with_optimizer: bool,
                     progress: Optional[EpochProgress] = None) -> None:
    """A checkpoint after ``epoch_done`` epochs, or (``progress``) inside epoch ``epoch_done``
    (0-based); a collective: every rank calls it, rank 0 writes."""
    rngs = gather_objects(run.env, rng_state())
    mid_epoch = None
    if progress is not None:
        mid_epoch = {"batches": progress.batches, "progress": gather_objects(run.env, progress.state())}
    if run.env.is_main:
        parts = run.parts
        state = dict(optimizer=parts.optimizer, scheduler=parts.scheduler, scaler=parts.precision.scaler) if with_optimizer else {}
        save_checkpoint(path, parts.model, epoch=epoch_done, step=run.step, config=run.cfg.to_dict(),
                        best_metric=run.best_metric, rng_states=rngs, run_id=run.run_id, mid_epoch=mid_epoch, **state)


def stop_now(run: TrainingRun, synced: bool) -> bool:
    """Whether a stop signal asks every rank to stop at this step boundary. One process: read
    every step. Several: agreed (a host sync) only where the loop syncs anyway (``synced``: a
    log interval), so the ranks stop at the same step."""
    if not run.env.distributed:
        return run.stop.requested
    return synced and any_rank(run.env, run.stop.requested, run.device)


# ---------------------------------------------------------------------------- one epoch

def train_step(run: TrainingRun, batch: dict, progress: EpochProgress, params: list) -> None:
    """Forward, losses, AMP step and LR step on one batch; its losses, gradient norm and
    top-1 add up on the device (no host sync)."""
    parts, cfg = run.parts, run.cfg
    with parts.precision.autocast():
        out = run.forward_model(batch["rgb"], batch["flow"])
        losses = parts.objective(out["z_f"], out["z_o"], out["logits_f"], out["logits_o"], batch["label"])
    grad_norm = amp_step(losses["loss"], parts.optimizer, parts.precision.scaler, cfg.optim.clip_grad, params)
    parts.scheduler.step()
    run.step += 1
    stats = torch.stack([losses[k].detach().float() for k in LOSS_NAMES] + [grad_norm.float()])
    progress.running += stats
    progress.epoch_sum += stats
    progress.epoch_hits += batch_hits(out, batch["label"], cfg.model.fusion_weights)
    progress.since_log += 1
    progress.steps += 1


def log_interval(run: TrainingRun, progress: EpochProgress, throughput: Throughput, bar: Progress) -> None:
    """The interval's mean losses (a host sync; a NaN stops here): logged, shown on the bar,
    and printed as a line where no bar is drawn (a log file)."""
    cfg, epoch, iters = run.cfg, run.epoch, run.parts.iters_per_epoch
    values = mean_over_steps(progress.running, progress.since_log, run.env)
    progress.running.zero_()
    progress.since_log = 0
    if not math.isfinite(values["loss"]):
        raise nan_error("log interval", values, run)
    values.update(lr=run.parts.scheduler.get_last_lr()[0], clips_per_s=throughput.rate())
    run.logger.log("train", run.step, values, epoch=epoch + 1)
    bar.show(loss=values["loss"], clips_s=values["clips_per_s"])
    if run.env.is_main and not (cfg.train.progress and sys.stderr.isatty()):
        per_step = (time.perf_counter() - run.started) / max(run.step - run.start_step, 1)
        eta = per_step * ((cfg.optim.epochs - epoch) * iters - progress.steps)
        print(interval_line(epoch + 1, cfg.optim.epochs, progress.steps, iters, values, eta), flush=True)
    run.last_train = values


def epoch_record(run: TrainingRun, progress: EpochProgress) -> dict:
    """The epoch's mean losses, gradient norm and training top-1 (a host sync; a NaN stops
    here), logged with the videos the loader skipped."""
    values = mean_over_steps(progress.epoch_sum, progress.steps, run.env)
    if not math.isfinite(values["loss"]):
        raise nan_error("epoch end", values, run)
    values.update(mean_over_steps(progress.epoch_hits, progress.steps, run.env, TRAIN_ACCURACY_NAMES))
    skipped = skipped_report(run.parts.train_loader)
    run.logger.log("train_epoch", run.step, values, epoch=run.epoch + 1, **skipped)
    if skipped and run.env.is_main:
        print(skipped_line(skipped, f"[train] epoch {run.epoch + 1}"), flush=True)
    if not run.last_train:
        run.last_train = values
    return values


def train_one_epoch(run: TrainingRun, progress: EpochProgress) -> Optional[dict]:
    """One pass over the training loader from ``progress`` on (a run resumed mid-epoch starts
    after the ``progress.batches`` batches already trained on), filling it in; the losses are
    read every ``train.log_interval`` steps. Returns the epoch's record, or None when a stop
    signal ended the epoch at a step boundary (``progress`` then says where)."""
    cfg, env, loader, iters = run.cfg, run.env, run.parts.train_loader, run.parts.iters_per_epoch
    params = [p for p in run.parts.model.parameters() if p.requires_grad]
    loader.set_epoch(run.epoch, first_batch=progress.batches) if progress.batches else loader.set_epoch(run.epoch)
    run.forward_model.train()
    throughput = Throughput()
    bar = Progress(iters, f"epoch {run.epoch + 1}/{cfg.optim.epochs}", enabled=env.is_main and cfg.train.progress)
    bar.update(progress.batches)
    ranking_warmup_iters = int(round(cfg.loss.ranking_warmup_epochs * iters))
    for batch in loader:
        run.parts.objective.ranking_scale = ranking_ramp(run.step, ranking_warmup_iters)
        train_step(run, batch, progress, params)
        progress.batches = loader.batches_done
        throughput.add(cfg.data.batch_size * env.world_size)
        bar.update()
        log_now = run.step % cfg.train.log_interval == 0
        if log_now:
            log_interval(run, progress, throughput, bar)
        if stop_now(run, log_now):
            bar.close()
            return None
        save_every = cfg.train.save_every_steps
        if save_every and run.step % save_every == 0 and progress.batches < iters:
            write_checkpoint(run, run.last_path, run.epoch, True, progress)
    bar.close()
    return epoch_record(run, progress)

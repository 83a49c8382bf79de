"""The training run: ``fit(cfg, resume=None, overwrite=False) -> summary``; ``train`` is the
same for a Config built in code (it validates it first).

``fit`` tells the whole story: the process set-up (``base.distributed``: one process per GPU
under ``torchrun``, DDP when WORLD_SIZE > 1, rank 0 writes every file), the precision checked
against the device, the resume decision (``resume``), the run folder claimed (``run_folder``:
a lock, no silent overwrite, room for one checkpoint), the parts built (``recipe``) and a
resumed checkpoint put back, then the epochs (``epoch.train_one_epoch``) each ending in the
finite check, the evaluation and the checkpoints that are due, and the summary.

At the end of an epoch that evaluates or saves, every parameter, buffer and optimizer state
tensor is checked once (one fused reduction): a non-finite model stops training before it is
evaluated or saved, as a NaN/inf loss does at a log interval. Every stop is a one-line
CCSError with the last good checkpoint untouched. Stop signals (``signals.GracefulStop``):
SIGTERM, SIGINT and SIGUSR1 end the epoch at the next step boundary (one process: checked every
step; under DDP agreed at log intervals); ``last.pt`` then keeps the loader's position and the
epoch's running sums, and the summary holds ``stopped_by`` and ``exit_code`` (128 + the
signal) after one line saying how to resume.

Files in ``train.out_dir``: ``config.yaml``, ``metrics.jsonl`` (each record with the run id;
``train_epoch`` records hold the epoch's mean losses and the top-1 of RGB, Flow and RGB+Flow on
its training batches), ``tb/`` (TensorBoard), ``last.pt`` (every ``save_interval`` epochs, at
the end, at a stop signal and every ``train.save_every_steps`` steps), ``best.pt`` (best
RGB+Flow top-1 so far; model only) and, while training, ``train.lock``.
"""
from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Optional

import torch

from ccs_fast.amp import training_precision
from ccs_fast.base.distributed import any_rank, dist_env, on_main_rank, training_process
from ccs_fast.base.errors import CCSError
from ccs_fast.base.signals import GracefulStop, exit_code, signal_name
from ccs_fast.checkpoint import checkpoint_tensors, describe_names, estimate_checkpoint_bytes, nonfinite_names
from ccs_fast.config import Config
from ccs_fast.epoch import TrainingRun, TrainingStopped, kept, stop_now, train_one_epoch, write_checkpoint
from ccs_fast.evaluate import evaluate, select_device
from ccs_fast.loaders import skipped_line, skipped_report
from ccs_fast.metrics import EpochProgress, eval_line, flatten_metrics, resumed_note, start_line, stop_line
from ccs_fast.recipe import build_parts, name_classes, wrap_model
from ccs_fast.resume import StartPoint, read_resume, restore
from ccs_fast.run_folder import new_run_id, open_outputs, run_folder


def _check_model_finite(run: TrainingRun) -> None:
    """TrainingStopped when a parameter, buffer or optimizer state tensor holds NaN or inf
    on any rank (one fused reduction and one host sync per rank; the verdict is shared)."""
    state = {"model": run.parts.model.state_dict(), "optimizer": run.parts.optimizer.state_dict()}
    bad = nonfinite_names(checkpoint_tensors(state))
    if any_rank(run.env, bool(bad), run.device):
        raise TrainingStopped(f"{run.last_path.parent}: the model holds NaN or inf in "
                              f"{describe_names(bad or ['(on another rank)'])} at the end of epoch {run.epoch + 1} "
                              f"(step {run.step}); nothing evaluated or saved from it, training stopped, "
                              f"{kept(run.last_path)}")


def _stopped(run: TrainingRun, where: str, checkpoint: str) -> dict:
    """The loader's workers stopped, one line saying how to resume, the summary's stop fields."""
    signum = run.stop.signum or signal.SIGTERM  # SIGTERM: a rank told to stop by another
    run.parts.train_loader.close()
    if run.env.is_main:
        print(stop_line(signum, where, run.stop.elapsed(), checkpoint, run.last_path.parent), flush=True)
    return {"stopped_by": signal_name(signum), "exit_code": exit_code(signum)}


def _stop_in_epoch(run: TrainingRun, progress: EpochProgress) -> dict:
    """A stop signal ended the epoch at a step boundary: a resumable mid-epoch last.pt."""
    run.stop.boundary_reached()
    saved_at = time.perf_counter()
    write_checkpoint(run, run.last_path, run.epoch, True, progress)
    where = f"in epoch {run.epoch + 1} after batch {progress.batches}/{run.parts.iters_per_epoch} (step {run.step})"
    return _stopped(run, where, f"{run.last_path} written in {time.perf_counter() - saved_at:.1f} s")


def evaluate_epoch(run: TrainingRun, model: torch.nn.Module, loader, epoch_done: int) -> dict:
    """Evaluate after ``epoch_done`` epochs: log, print and return the accuracies (and
    ``eval_s``, the seconds the evaluation took)."""
    cfg = run.cfg
    source = cfg.data.val_list or f"the {cfg.data.backend} eval split"
    started = time.perf_counter()
    result = evaluate(model, loader, run.device, cfg.train.precision, cfg.model.fusion_weights, source=source)
    skipped = skipped_report(loader)
    scalars = {key: value for key, value in result.items() if key != "confusion_matrix"}
    run.logger.log("val", run.step, flatten_metrics(scalars), epoch=epoch_done, **skipped)
    if run.env.is_main:
        if skipped:
            print(skipped_line(skipped, f"[eval] epoch {epoch_done}"), flush=True)
        print(eval_line(epoch_done, result), flush=True)
    result["eval_s"] = time.perf_counter() - started
    return result


def _end_epoch(run: TrainingRun) -> dict:
    """After an epoch: the finite check, the evaluation (a new best RGB+Flow top-1 writes
    best.pt) and last.pt when due; a stop signal that came meanwhile ends the run (the
    summary's stop fields), unless this was the last epoch."""
    cfg, epoch_done, eval_loader = run.cfg, run.epoch + 1, run.parts.eval_loader
    final = epoch_done == cfg.optim.epochs
    evaluate_now = eval_loader is not None and (final or epoch_done % cfg.train.eval_interval == 0)
    save_now = final or epoch_done % cfg.train.save_interval == 0
    if evaluate_now or save_now:
        _check_model_finite(run)
    if evaluate_now:
        run.last_eval = evaluate_epoch(run, run.eval_model, eval_loader, epoch_done)
        if run.best_metric is None or run.last_eval["fused"]["top1"] > run.best_metric:
            run.best_metric = run.last_eval["fused"]["top1"]
            write_checkpoint(run, run.best_path, epoch_done, with_optimizer=False)
    if save_now:
        write_checkpoint(run, run.last_path, epoch_done, with_optimizer=True)
    run.logger.flush()
    if final or not stop_now(run, synced=True):
        return {}
    run.stop.boundary_reached()
    if not save_now:
        write_checkpoint(run, run.last_path, epoch_done, with_optimizer=True)
    return _stopped(run, f"after epoch {epoch_done} (step {run.step})", str(run.last_path))


def _train_epochs(run: TrainingRun, point: StartPoint) -> dict:
    """The epochs from ``point`` on; returns the summary's stop fields ({} when every epoch
    ran). A CCSError on the way stops training with a line naming the epoch and step."""
    try:
        for epoch in range(point.epoch, run.cfg.optim.epochs):
            run.epoch = epoch
            progress = (point.progress if epoch == point.epoch else None) or EpochProgress.start(run.device)
            if train_one_epoch(run, progress) is None:
                return _stop_in_epoch(run, progress)
            stopped = _end_epoch(run)
            if stopped:
                return stopped
        return {}
    except TrainingStopped:
        raise
    except CCSError as exc:
        raise TrainingStopped(f"{exc}; training stopped in epoch {run.epoch + 1} (step {run.step}), "
                              f"{kept(run.last_path)}") from None
    finally:
        run.logger.close()


# ---------------------------------------------------------------------------- the whole run

def _log_start(run: TrainingRun, point: StartPoint, moved: int) -> None:
    """The start record of metrics.jsonl and, on rank 0, the start line."""
    cfg, parts = run.cfg, run.parts
    weight_tensors = tuple(len(g["params"]) for g in parts.optimizer.param_groups[:2])
    frame_count = parts.train_loader.frame_count
    batches = point.progress.batches if point.progress is not None else None
    run.logger.log("info", run.step, {}, event="start", world_size=run.env.world_size, device=str(run.device),
                   iters_per_epoch=parts.iters_per_epoch, start_epoch=point.epoch,
                   weight_decay_tensors=weight_tensors[0], no_weight_decay_tensors=weight_tensors[1],
                   resumed_from=str(point.path) if point.resumed else None, resumed_mid_epoch_batches=batches,
                   resumed_run_id=point.run_id,
                   changed_on_resume={name: [old, new] for name, (old, new) in point.changed.items()},
                   total_frames=str(frame_count) if frame_count is not None else None)
    if run.env.is_main:
        resumed = resumed_note(cfg, point.path, point.epoch, run.step, parts.iters_per_epoch, batches, point.changed, moved)
        print(start_line(cfg, run.run_id, run.device, run.env.world_size, parts.iters_per_epoch, point.epoch,
                         weight_tensors, frame_count, point.path, resumed), flush=True)


def _summary(run: TrainingRun, stopped: dict) -> dict:
    return {"epochs": run.cfg.optim.epochs, "steps": run.step, "out_dir": str(Path(run.cfg.train.out_dir)),
            "run_id": run.run_id, "last_checkpoint": str(run.last_path),
            "best_checkpoint": str(run.best_path) if run.best_path.exists() else None,
            "best_metric": run.best_metric, "train": run.last_train, "eval": run.last_eval, **stopped}


def train(cfg: Config, resume: Optional[str] = None, overwrite: bool = False) -> dict:
    """``fit`` of a Config built in code: validated here first (CCSError naming the field)."""
    return fit(cfg.validate(), resume, overwrite)


def fit(cfg: Config, resume: Optional[str] = None, overwrite: bool = False) -> dict:
    """Train per ``cfg``, a validated Config (``load_config`` validates; ``train`` validates a
    Config built in code). ``resume``: a checkpoint (or an out_dir holding last.pt) to go on
    from; ``overwrite``: replace the previous run in ``train.out_dir`` (without it or
    ``resume`` a folder that holds anything is refused). The class names (``recipe.name_classes``)
    are stored with the config in every checkpoint.

    Returns a summary: ``epochs``, ``steps``, ``out_dir``, ``run_id``, ``last_checkpoint``,
    ``best_checkpoint``, ``best_metric`` (RGB+Flow top-1), ``train`` (last logged losses),
    ``eval`` (the final evaluation, empty without an eval split) and, after a stop signal,
    ``stopped_by`` and ``exit_code``.
    """
    name_classes(cfg)
    if resume and overwrite:
        raise CCSError(f"{cfg.train.out_dir}: --resume continues the run in the folder and --overwrite replaces it; "
                       "pass one of them")
    env = dist_env()
    device = select_device(cfg.train.device, env.local_rank)
    with training_process(env, device, cfg.train.deterministic):
        precision = training_precision(cfg.train.precision, device)
        run_id = new_run_id()
        point = read_resume(resume, cfg)
        with GracefulStop(cfg.train.stop_timeout_s) as stop, \
                run_folder(cfg, env, stop, resume=bool(resume), overwrite=overwrite, run_id=run_id) as folder:
            parts = build_parts(cfg, env, device, precision)
            on_main_rank(env, lambda: folder.check_room(estimate_checkpoint_bytes(parts.model, parts.optimizer)))
            restore(point, cfg, env, device, parts.iters_per_epoch, parts.model, parts.optimizer, parts.scheduler,
                    precision.scaler)
            logger, moved = open_outputs(cfg, env, run_id, point.step, point.resumed)
            run = TrainingRun(cfg, env, device, run_id, stop, parts, wrap_model(parts.model, cfg, env, device),
                              logger, step=point.step, epoch=point.epoch, best_metric=point.best_metric,
                              start_step=point.step)
            _log_start(run, point, moved)
            stopped = _train_epochs(run, point)
            return _summary(run, stopped)

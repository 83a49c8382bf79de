"""The training loop: ``train(cfg, resume=None, overwrite=False) -> summary``.

One process per GPU under ``torchrun`` (RANK, WORLD_SIZE, LOCAL_RANK; DDP when
WORLD_SIZE > 1, NCCL on CUDA, gloo on CPU); rank 0 writes every file. The hot loop never
waits for the device: losses accumulate in a device tensor and are read (``.tolist()``,
a host sync) only every ``train.log_interval`` steps and at the end of an epoch, which is
also where a NaN/inf loss is caught. At the end of an epoch that evaluates or saves, every
parameter, buffer and optimizer state tensor is checked once (one fused reduction): a
non-finite model stops training before it is evaluated or saved. Either stop is a one-line
CCSError with the last good checkpoint untouched.

Before the first step: the config is validated, a resumed checkpoint is read and compared
with the config (only ``config.RESUME_CHANGEABLE`` settings may differ; a new learning rate
is applied to the restored schedule), the run folder is claimed (``run_folder``: a lock, no
silent overwrite, stale temporaries removed) and checked for room for one checkpoint.

Exact resume: the checkpoint holds every RNG state, the loaders draw nothing from the
global RNGs (the torch loader's DataLoader has its own generator, so its workers' seeds are
the same in a resumed process), so a run killed at any point and resumed from ``last.pt``
ends with the same weights, bit for bit on CPU, as one that never stopped. A resume first
cuts ``metrics.jsonl`` back to the checkpoint's step (``ccs-fast train --resume`` points
``train.out_dir`` at the checkpoint's own folder unless ``--out`` names another).

Stop signals (``signals.GracefulStop``): SIGTERM, SIGINT and SIGUSR1 end the epoch at the next
step boundary (one process: checked every step; under DDP agreed at log intervals). A
mid-epoch ``last.pt`` then keeps the loader's position (``EpochProgress.batches``: batches
consumed, which every backend's ``set_epoch(epoch, first_batch)`` skips without loading) and
the epoch's running sums, so the resumed epoch trains on exactly the remaining batches and logs
what an uninterrupted one would. ``train`` then returns with ``stopped_by`` and ``exit_code``
(128 + the signal) in its summary after one line saying how to resume. ``train.save_every_steps``
writes the same mid-epoch checkpoint every N steps.

Files in ``train.out_dir``: ``config.yaml``, ``metrics.jsonl`` (each record with the run
id; ``train_epoch`` records hold the epoch's mean losses and the top-1 of RGB, Flow and
RGB+Flow on its training batches, accumulated on the device and read with the losses at the
epoch's end), ``tb/`` (TensorBoard), ``last.pt`` (every ``save_interval`` epochs and at the end),
``best.pt`` (best RGB+Flow top-1 so far; model only, no optimizer state) and, while
training, ``train.lock``. ``last.pt`` is also written at a stop signal and every
``train.save_every_steps`` steps (mid-epoch).
"""
from __future__ import annotations

import contextlib
import math
import os
import random
import signal
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from ccs_fast.amp import amp_step, autocast_context, check_precision, make_scaler
from ccs_fast.checkpoint import (BEST, LAST, checkpoint_tensors, describe_names, estimate_checkpoint_bytes,
                                 nonfinite_names, read_checkpoint, resolve_checkpoint_path,
                                 restore_checkpoint, rng_state, save_checkpoint)
from ccs_fast.config import RESUME_CHANGEABLE, Config, resume_differences, save_config
from ccs_fast.base.distributed import DistEnv, dist_env
from ccs_fast.base.errors import CCSError, bad_file
from ccs_fast.evaluate import STREAMS, evaluate, fuse_scores, select_device
from ccs_fast.loaders import loader_from_config, skipped_line, skipped_report
from ccs_fast.losses import ranking_ramp
from ccs_fast.metrics import MetricsLogger, Progress, Throughput, flatten_metrics, topk_correct, truncate_metrics
from ccs_fast.model import build_model
from ccs_fast.run_folder import CONFIG_FILE, claim_run_folder
from ccs_fast.base.signals import GracefulStop, exit_code, signal_name

LOSS_NAMES = ("loss", "ce", "triplet", "center")


# ---------------------------------------------------------------------------- processes

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------- builders

def build_objective(cfg: Config) -> torch.nn.Module:
    from ccs_fast.losses import CCSObjective
    loss = cfg.loss
    return CCSObjective(
        loss.lambda1, loss.lambda2, loss.alpha1, loss.alpha2, loss.alpha3,
        ranking=cfg.model.variant in ("cs", "all"), impl=cfg.model.impl,
    )


def build_loaders(cfg: Config, device: torch.device, env: DistEnv):
    """(train loader with K = model.num_segments, eval loader with K = data.test_segments
    or None when there is nothing to evaluate on)."""
    train_loader = loader_from_config(cfg, train=True, device=device, rank=env.rank, world_size=env.world_size)
    eval_loader = None
    if cfg.data.val_list or cfg.data.backend == "synthetic":
        eval_loader = loader_from_config(cfg, train=False, device=device, rank=env.rank, world_size=env.world_size)
    return train_loader, eval_loader


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on conv/linear weights only: BN/LayerNorm parameters and biases (every
    parameter with fewer than 2 dimensions) get none, as in TSN and torchvision's recipes."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(cfg: Config, model: torch.nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """SGD with momentum (the paper's) or AdamW; torch's fused kernels on CUDA, apex's when asked."""
    optim = cfg.optim
    groups = param_groups(model, optim.weight_decay)
    if optim.use_apex:
        try:
            from apex.optimizers import FusedAdam, FusedSGD
        except ImportError:
            raise CCSError("optim.use_apex=true but NVIDIA apex is not installed; install apex or set optim.use_apex=false") from None
        if optim.name == "adamw":
            return FusedAdam(groups, lr=optim.lr, betas=tuple(optim.betas), adam_w_mode=True)
        return FusedSGD(groups, lr=optim.lr, momentum=optim.momentum)
    fused = bool(optim.fused and device.type == "cuda") or None
    if optim.name == "adamw":
        return torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas), fused=fused)
    return torch.optim.SGD(groups, lr=optim.lr, momentum=optim.momentum, fused=fused)


def lr_factor(iteration: int, iters_per_epoch: int, lr_steps, gamma: float, warmup_iters: int) -> float:
    """LR multiplier at ``iteration`` (0-based): ×gamma at each epoch in ``lr_steps``, times
    a linear warm-up from 1/warmup_iters to 1 over the first ``warmup_iters`` iterations."""
    decays = sum(iteration >= step * iters_per_epoch for step in lr_steps)
    factor = gamma ** decays
    if warmup_iters > 0 and iteration < warmup_iters:
        factor *= (iteration + 1) / warmup_iters
    return factor


def build_scheduler(cfg: Config, optimizer, iters_per_epoch: int):
    """Per-iteration LambdaLR; the lambda is rebuilt from the config, its position
    (``last_epoch`` = iterations done) comes back from the checkpoint on resume."""
    optim = cfg.optim
    warmup_iters = int(round(optim.warmup_epochs * iters_per_epoch))
    steps, gamma = list(optim.lr_steps), optim.lr_gamma
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda it: lr_factor(it, iters_per_epoch, steps, gamma, warmup_iters)
    )


def wrap_model(model: torch.nn.Module, cfg: Config, env: DistEnv, device: torch.device) -> torch.nn.Module:
    """DDP (when distributed), then torch.compile (when asked); checkpoints unwrap both."""
    wrapped = model
    if env.distributed:
        from torch.nn.parallel import DistributedDataParallel
        wrapped = DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            # without the ranking losses the shared projection gets no gradient
            find_unused_parameters=cfg.model.variant not in ("cs", "all"),
        )
    if cfg.train.compile:
        wrapped = torch.compile(wrapped)
    return wrapped


# ---------------------------------------------------------------------------- helpers

def _gather_rng_states(env: DistEnv) -> list:
    if not env.distributed:
        return [rng_state()]
    states = [None] * env.world_size
    dist.all_gather_object(states, rng_state())
    return states


class TrainingStopped(CCSError):
    """A stop whose message already says what was kept."""


def _kept(last_path: Path) -> str:
    return f"last good checkpoint kept at {last_path}" if last_path.exists() else "no checkpoint written yet"


def _nan_error(where: str, values: dict, epoch: int, step: int, last_path: Path) -> CCSError:
    bad = ", ".join(f"{k}={v}" for k, v in values.items() if not math.isfinite(v))
    return TrainingStopped(f"{last_path.parent}: non-finite loss ({bad}) at epoch {epoch + 1} step {step} ({where}); "
                           f"training stopped, {_kept(last_path)}")


def _check_model_finite(model, optimizer, env: DistEnv, device, epoch: int, step: int, last_path: Path) -> None:
    """TrainingStopped when a parameter, buffer or optimizer state tensor holds NaN or inf
    on any rank (one fused reduction and one host sync per rank; the verdict is shared)."""
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
    bad = nonfinite_names(checkpoint_tensors(state))
    if env.distributed:
        flag = torch.tensor([len(bad)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if not bad and flag.item():
            bad = ["(on another rank)"]
    if bad:
        raise TrainingStopped(f"{last_path.parent}: the model holds NaN or inf in {describe_names(bad)} at the end of "
                              f"epoch {epoch + 1} (step {step}); nothing evaluated or saved from it, training stopped, "
                              f"{_kept(last_path)}")


def _on_main_rank(env: DistEnv, action):
    """``action()`` on rank 0 only; a CCSError there is raised on every rank (the others
    would otherwise wait for rank 0 in the next collective for ever)."""
    result, message = None, None
    if env.is_main:
        try:
            result = action()
        except CCSError as exc:
            message = str(exc)
    if env.distributed:
        box = [message]
        dist.broadcast_object_list(box, src=0)
        message = box[0]
    if message is not None:
        raise CCSError(message)
    return result


def new_run_id() -> str:
    """Start time and random hex (from os.urandom: no draw from the seeded RNGs)."""
    return time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]


def _read_resume(resume, cfg: Config) -> tuple[Path, dict, dict]:
    """(checkpoint path, checkpoint dict, {setting: (old, new)} changed on resume); CCSError
    for a checkpoint that cannot continue this config."""
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
    return path, state, changed


def _apply_resume_changes(cfg: Config, changed: dict, optimizer, scheduler) -> None:
    """A new optim.lr replaces the base rate of the restored schedule (its position and
    decays stay); the other changeable settings take effect through ``cfg``."""
    if "optim.lr" in changed:
        scheduler.base_lrs = [cfg.optim.lr] * len(optimizer.param_groups)
        for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas):
            group["initial_lr"] = cfg.optim.lr
            group["lr"] = cfg.optim.lr * factor(scheduler.last_epoch)


def format_duration(seconds: float) -> str:
    """``1h02m``, ``3m12s``, ``45s``."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def interval_line(epoch: int, epochs: int, step_in_epoch: int, steps_per_epoch: int,
                  values: dict, eta_s: float) -> str:
    """The log line of one interval, printed where there is no progress bar (stderr not a
    terminal: a batch job, nohup, CI)."""
    losses = " ".join(f"{name} {values[name]:.4f}" for name in LOSS_NAMES)
    return (f"[train] epoch {epoch}/{epochs} step {step_in_epoch}/{steps_per_epoch}: {losses} "
            f"lr {values['lr']:.3g} {values['clips_per_s']:.1f} clips/s ETA {format_duration(eta_s)}")


def _read_running(running: torch.Tensor, count: int, env: DistEnv, names=LOSS_NAMES + ("grad_norm",)) -> dict:
    """Mean of the accumulated values (losses and gradient norm by default) over ``count``
    steps (and every rank)."""
    if env.distributed:
        running = running.clone()
        dist.all_reduce(running)
        count *= env.world_size
    values = (running / max(count, 1)).tolist()  # syncs with the device: logging intervals only
    return dict(zip(names, values))


TRAIN_ACCURACY_NAMES = ("train_rgb_top1", "train_flow_top1", "train_fused_top1")


def _batch_hits(out: dict, labels: torch.Tensor, fusion_weights) -> torch.Tensor:
    """Top-1 of the RGB, flow and fused predictions (``evaluate.fuse_scores``) on one training
    batch, on the device (the augmented clips, train-mode model)."""
    scores = fuse_scores(out["logits_f"].detach(), out["logits_o"].detach(), fusion_weights)
    return torch.cat([topk_correct(scores[s], labels, (1,)) for s in STREAMS]) / labels.numel()


# ---------------------------------------------------------------------------- train

def train(cfg: Config, resume: Optional[str] = None, overwrite: bool = False) -> dict:
    """Train per ``cfg``; ``resume``: a checkpoint (or an out_dir holding last.pt) to go on
    from; ``overwrite``: replace the previous run in ``train.out_dir`` (without it or
    ``resume`` a folder that holds anything is refused). Unless ``model.class_names`` is
    set, the class names are looked up (``formats.find_class_names``: classInd.txt or the
    list's class folders) and stored with the config in every checkpoint, for ``predict``.

    Returns a summary: ``epochs``, ``steps``, ``out_dir``, ``run_id``, ``last_checkpoint``,
    ``best_checkpoint``, ``best_metric`` (RGB+Flow top-1), ``train`` (last logged losses)
    and ``eval`` (the final evaluation, empty without an eval split).
    """
    cfg.validate()
    if cfg.model.class_names is None and cfg.data.train_list and Path(cfg.data.train_list).is_file():
        from ccs_fast.dataloader.formats import find_class_names

        cfg.model.class_names = find_class_names(cfg.data.train_list, cfg.data.root,
                                                 cfg.model.num_classes, cfg.data.modality)
    if resume and overwrite:
        raise CCSError(f"{cfg.train.out_dir}: --resume continues the run in the folder and --overwrite replaces it; "
                       "pass one of them")
    env = dist_env()
    device = select_device(cfg.train.device, env.local_rank)
    own_group = env.distributed and not dist.is_initialized()
    if own_group:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        with deterministic_mode(cfg.train.deterministic):
            return _train(cfg, resume, overwrite, env, device)
    finally:
        if own_group:
            dist.destroy_process_group()


@contextlib.contextmanager
def deterministic_mode(enabled: bool):
    """``train.deterministic``: torch's deterministic algorithms (warning, not failing, on an op
    that has none), cuDNN without autotuning, cuBLAS with a fixed workspace; the ccs_fast ops
    then take their atomic-free paths (their ``deterministic=None`` follows torch's flag).
    The previous settings come back afterwards."""
    if not enabled:
        yield
        return
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.deterministic, os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.deterministic = before[2]
        if before[3] is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


def _train(cfg: Config, resume: Optional[str], overwrite: bool, env: DistEnv, device: torch.device) -> dict:
    check_precision(cfg.train.precision, device)
    out_dir = Path(cfg.train.out_dir)
    run_id = new_run_id()
    resume_path, resume_state, changed = None, None, {}
    if resume:
        resume_path, resume_state, changed = _read_resume(resume, cfg)
    with GracefulStop(cfg.train.stop_timeout_s) as stop:
        folder = _on_main_rank(env, lambda: claim_run_folder(out_dir, resume=bool(resume), overwrite=overwrite,
                                                             run_id=run_id))
        if folder is not None:
            stop.on_hard_exit(lambda: _clean_up_now(folder, out_dir))
        try:
            return _train_in_folder(cfg, env, device, folder, run_id, resume_path, resume_state, changed, stop)
        finally:
            if folder is not None:
                folder.release()


def _clean_up_now(folder, out_dir: Path) -> None:
    """What a process that must exit at once (``GracefulStop``'s hard exit) leaves in order:
    its temporary files gone, the lock released."""
    for tmp in out_dir.glob(f".*.{os.getpid()}.*.tmp"):
        tmp.unlink(missing_ok=True)
    folder.release()


@dataclass
class _Run:
    """What the steps of one training run share; ``step`` counts optimizer steps."""
    cfg: Config
    env: DistEnv
    device: torch.device
    model: torch.nn.Module  # unwrapped: checkpoints and evaluation
    forward_model: torch.nn.Module  # DDP / torch.compile wrapped: training steps
    objective: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: object
    logger: MetricsLogger
    last_path: Path
    step: int = 0
    last_train: dict = field(default_factory=dict)  # the last logged losses
    started: float = field(default_factory=time.perf_counter)
    start_step: int = 0
    stop: Optional[GracefulStop] = None
    save_mid_epoch: Optional[object] = None  # (epoch, EpochProgress) -> None: a mid-epoch last.pt


@dataclass
class EpochProgress:
    """Where one epoch stands: the loader's position (``batches``: its batches consumed, the
    ones a resume skips) and the running sums the epoch's records are made of. A mid-epoch
    checkpoint keeps it, so a resumed epoch logs what an uninterrupted one would."""
    running: torch.Tensor  # losses and gradient norm since the last log line
    epoch_sum: torch.Tensor  # the same over the epoch
    epoch_hits: torch.Tensor  # training-batch top-1 of RGB, Flow, RGB+Flow over the epoch
    since_log: int = 0
    steps: int = 0
    batches: int = 0

    @classmethod
    def start(cls, device) -> "EpochProgress":
        return cls(torch.zeros(len(LOSS_NAMES) + 1, device=device), torch.zeros(len(LOSS_NAMES) + 1, device=device),
                   torch.zeros(len(TRAIN_ACCURACY_NAMES), device=device))

    def state(self) -> dict:
        return {"running": self.running.cpu(), "epoch_sum": self.epoch_sum.cpu(), "epoch_hits": self.epoch_hits.cpu(),
                "since_log": self.since_log, "steps": self.steps, "batches": self.batches}

    @classmethod
    def from_state(cls, state: dict, device) -> "EpochProgress":
        return cls(*(state[k].to(device) for k in ("running", "epoch_sum", "epoch_hits")),
                   since_log=int(state["since_log"]), steps=int(state["steps"]), batches=int(state["batches"]))


def _stop_now(run: "_Run", synced: bool) -> bool:
    """Whether a stop signal asks every rank to stop at this step boundary. One process: read
    every step. Several: agreed (a MAX all-reduce, a host sync) only where the loop syncs
    anyway (``synced``: a log interval), so the ranks stop at the same step."""
    if run.stop is None:
        return False
    if not run.env.distributed:
        return run.stop.requested
    if not synced:
        return False
    flag = torch.tensor([float(run.stop.requested)], device=run.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def train_one_epoch(run: _Run, loader, epoch: int, iters_per_epoch: int,
                    progress: Optional[EpochProgress] = None) -> Optional[dict]:
    """One pass over ``loader``: forward, losses, AMP step, LR step per batch; the losses
    are read every ``train.log_interval`` steps (logged, shown, and printed as a line where
    no bar is drawn). Returns the epoch's mean losses and gradient norm (all ranks), or None
    when a stop signal ended the epoch at a step boundary (``progress`` then says where).

    ``progress``: the epoch so far (a run resumed mid-epoch: the loader starts after the
    ``progress.batches`` batches already trained on); filled in as the epoch goes."""
    cfg, env, device = run.cfg, run.env, run.device
    epochs = cfg.optim.epochs
    params = [p for p in run.model.parameters() if p.requires_grad]
    clips_per_step = cfg.data.batch_size * env.world_size
    # one line per log interval where no bar is drawn (a log file); the bar on a terminal
    log_lines = env.is_main and not (cfg.train.progress and sys.stderr.isatty())
    progress = progress if progress is not None else EpochProgress.start(device)
    loader.set_epoch(epoch, first_batch=progress.batches) if progress.batches else loader.set_epoch(epoch)
    run.forward_model.train()
    running, epoch_sum, epoch_hits = progress.running, progress.epoch_sum, progress.epoch_hits
    save_every = cfg.train.save_every_steps
    throughput = Throughput()
    bar = Progress(iters_per_epoch, f"epoch {epoch + 1}/{epochs}", enabled=env.is_main and cfg.train.progress)
    bar.update(progress.batches)
    ranking_warmup_iters = int(round(cfg.loss.ranking_warmup_epochs * iters_per_epoch))
    for batch in loader:
        run.objective.ranking_scale = ranking_ramp(run.step, ranking_warmup_iters)
        with autocast_context(cfg.train.precision, device):
            out = run.forward_model(batch["rgb"], batch["flow"])
            losses = run.objective(out["z_f"], out["z_o"], out["logits_f"], out["logits_o"], batch["label"])
        grad_norm = amp_step(losses["loss"], run.optimizer, run.scaler, cfg.optim.clip_grad, params)
        run.scheduler.step()
        run.step += 1
        stats = torch.stack([losses[k].detach().float() for k in LOSS_NAMES] + [grad_norm.float()])
        running += stats
        epoch_sum += stats
        epoch_hits += _batch_hits(out, batch["label"], cfg.model.fusion_weights)
        progress.since_log += 1
        progress.steps += 1
        progress.batches = loader.batches_done
        throughput.add(clips_per_step)
        bar.update()
        log_now = run.step % cfg.train.log_interval == 0
        if log_now:
            values = _read_running(running, progress.since_log, env)  # host sync
            running.zero_()
            progress.since_log = 0
            if not math.isfinite(values["loss"]):
                raise _nan_error("log interval", values, epoch, run.step, run.last_path)
            values.update(lr=run.scheduler.get_last_lr()[0], clips_per_s=throughput.rate())
            run.logger.log("train", run.step, values, epoch=epoch + 1)
            bar.show(loss=values["loss"], clips_s=values["clips_per_s"])
            if log_lines:
                per_step = (time.perf_counter() - run.started) / max(run.step - run.start_step, 1)
                eta = per_step * ((epochs - epoch) * iters_per_epoch - progress.steps)
                print(interval_line(epoch + 1, epochs, progress.steps, iters_per_epoch, values, eta), flush=True)
            run.last_train = values
        if _stop_now(run, log_now):
            bar.close()
            return None
        if save_every and run.step % save_every == 0 and progress.batches < iters_per_epoch:
            run.save_mid_epoch(epoch, progress)
    bar.close()
    values = _read_running(epoch_sum, progress.steps, env)  # host sync: epoch end
    if not math.isfinite(values["loss"]):
        raise _nan_error("epoch end", values, epoch, run.step, run.last_path)
    values.update(_read_running(epoch_hits, progress.steps, env, TRAIN_ACCURACY_NAMES))
    skipped = skipped_report(loader)
    run.logger.log("train_epoch", run.step, values, epoch=epoch + 1, **skipped)
    if skipped and env.is_main:
        print(skipped_line(skipped, f"[train] epoch {epoch + 1}"), flush=True)
    if not run.last_train:
        run.last_train = values
    return values


def evaluate_epoch(run: _Run, model: torch.nn.Module, loader, epoch_done: int) -> dict:
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
        print(f"[eval] epoch {epoch_done}: top-1 RGB {result['rgb']['top1']:.4f} "
              f"Flow {result['flow']['top1']:.4f} RGB+Flow {result['fused']['top1']:.4f} "
              f"({result['num_videos']} videos)", flush=True)
    result["eval_s"] = time.perf_counter() - started
    return result


def _start_line(run: _Run, run_id: str, iters_per_epoch: int, start_epoch: int, train_loader,
                resume_path: Optional[Path], resumed_run: Optional[str], changed: dict, moved: int,
                resumed_progress: Optional[EpochProgress] = None) -> None:
    """The start record of metrics.jsonl and the start line (rank 0)."""
    cfg, optimizer = run.cfg, run.optimizer
    n_decay, n_plain = (len(g["params"]) for g in optimizer.param_groups[:2])
    frame_count = train_loader.frame_count
    run.logger.log("info", run.step, {}, event="start", world_size=run.env.world_size, device=str(run.device),
                   iters_per_epoch=iters_per_epoch, start_epoch=start_epoch,
                   weight_decay_tensors=n_decay, no_weight_decay_tensors=n_plain,
                   resumed_from=str(resume_path) if resume_path else None,
                   resumed_mid_epoch_batches=resumed_progress.batches if resumed_progress else None,
                   resumed_run_id=resumed_run,
                   changed_on_resume={name: [old, new] for name, (old, new) in changed.items()},
                   total_frames=str(frame_count) if frame_count is not None else None)
    resumed = ""
    if resume_path is not None:
        where = (f"epoch {start_epoch + 1} after batch {resumed_progress.batches}/{iters_per_epoch}"
                 if resumed_progress is not None else f"epoch {start_epoch}")
        resumed = f"; resumed from {resume_path} ({where}, step {run.step})"
        if Path(resume_path).parent.resolve() != Path(cfg.train.out_dir).resolve():
            resumed += f", writing to {cfg.train.out_dir} (--out), not to {Path(resume_path).parent}"
        shown = {name: values for name, values in changed.items() if name != "train.out_dir"}  # the "->" says it
        if shown:
            resumed += ", changed on resume: " + ", ".join(f"{name} {old!r} -> {new!r}"
                                                           for name, (old, new) in shown.items())
        if moved:
            resumed += f"; {moved} metrics record(s) after step {run.step} moved to metrics.dropped.jsonl"
    data_note = f"; {cfg.data.train_list}: {frame_count}" if frame_count is not None else ""
    if resume_path is not None:
        weights = f"weights from {resume_path}"
    elif cfg.model.pretrained:
        weights = f"{cfg.model.backbone} streams from {cfg.model.pretrained}"
    else:
        weights = f"{cfg.model.backbone} streams from scratch (no model.pretrained)"
    data_note = f"; {cfg.model.num_classes} classes, {cfg.data.backend} loader, {weights}{data_note}"
    print(f"[train] run {run_id}: {cfg.model.variant} on {run.device} x{run.env.world_size}, {cfg.train.precision}, "
          f"{iters_per_epoch} steps/epoch, epochs {start_epoch + 1}..{cfg.optim.epochs}; weight decay "
          f"{cfg.optim.weight_decay:g} on {n_decay} conv/linear weights, none on {n_plain} BN/bias tensors "
          f"-> {cfg.train.out_dir}{data_note}{resumed}", flush=True)


def _train_in_folder(cfg: Config, env: DistEnv, device: torch.device, folder, run_id: str,
                     resume_path: Optional[Path], resume_state: Optional[dict], changed: dict,
                     stop: Optional[GracefulStop] = None) -> dict:
    out_dir = Path(cfg.train.out_dir)
    last_path, best_path = out_dir / LAST, out_dir / BEST
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not cfg.train.deterministic
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    # Same seed everywhere for the initial weights (DDP would broadcast rank 0's anyway);
    # then a per-rank seed so dropout and augmentation differ between ranks.
    seed_everything(cfg.train.seed)
    model = build_model(cfg.model, device=device, channels_last=cfg.train.channels_last)
    objective = build_objective(cfg).to(device)
    seed_everything(cfg.train.seed + env.rank)

    train_loader, eval_loader = build_loaders(cfg, device, env)
    iters_per_epoch = len(train_loader)
    if iters_per_epoch == 0:
        raise CCSError(f"{cfg.data.train_list}: no full training batch (batch_size {cfg.data.batch_size} on {env.world_size} process(es))")
    optimizer = build_optimizer(cfg, model, device)
    scheduler = build_scheduler(cfg, optimizer, iters_per_epoch)
    scaler = make_scaler(cfg.train.precision, device)
    checkpoint_bytes = estimate_checkpoint_bytes(model, optimizer)
    _on_main_rank(env, lambda: folder.check_room(checkpoint_bytes))

    start_epoch, step, best_metric, resumed_run, resumed_progress = 0, 0, None, None, None
    if resume_state is not None:
        restore_checkpoint(resume_path, resume_state, model, optimizer, scheduler, scaler,
                           restore_rng=True, rank=env.rank)
        start_epoch, step, best_metric = resume_state["epoch"], resume_state["step"], resume_state.get("best_metric")
        resumed_run = resume_state.get("run_id")
        resumed_progress = _resumed_progress(resume_path, resume_state, env, device, iters_per_epoch)
        _apply_resume_changes(cfg, changed, optimizer, scheduler)
        resume_state = None  # the tensors now live in the model and optimizer

    def open_outputs():
        save_config(cfg, out_dir / CONFIG_FILE)
        moved = truncate_metrics(out_dir, step) if resume_path is not None else 0
        logger = MetricsLogger(out_dir, tensorboard=cfg.train.tensorboard, run_id=run_id,
                               purge_step=step + 1 if resume_path is not None else None)
        return logger, moved

    opened = _on_main_rank(env, open_outputs)
    logger, moved = opened if env.is_main else (MetricsLogger(out_dir, enabled=False), 0)
    run = _Run(cfg, env, device, model, wrap_model(model, cfg, env, device), objective, optimizer,
               scheduler, scaler, logger, last_path, step=step, start_step=step, stop=stop)
    if env.is_main:
        _start_line(run, run_id, iters_per_epoch, start_epoch, train_loader, resume_path, resumed_run,
                    changed, moved, resumed_progress)

    def save(path: Path, epoch_done: int, with_optimizer: bool, progress: Optional[EpochProgress] = None) -> None:
        """``progress``: a mid-epoch checkpoint of epoch ``epoch_done`` (0-based) stopped there."""
        rngs = _gather_rng_states(env)  # collective: every rank calls save()
        mid_epoch = None
        if progress is not None:
            mid_epoch = {"batches": progress.batches, "progress": _gather_objects(env, progress.state())}
        if env.is_main:
            state = dict(optimizer=optimizer, scheduler=scheduler, scaler=scaler) if with_optimizer else {}
            save_checkpoint(path, model, epoch=epoch_done, step=run.step, config=cfg.to_dict(),
                            best_metric=best_metric, rng_states=rngs, run_id=run_id, mid_epoch=mid_epoch, **state)

    run.save_mid_epoch = lambda epoch_now, progress: save(last_path, epoch_now, True, progress)

    # Never evaluate through DDP: ranks may get different numbers of eval batches, and DDP's
    # per-forward buffer broadcast would then wait forever.
    eval_model = run.forward_model if (cfg.train.compile and not env.distributed) else model
    last_eval: dict = {}
    epochs = cfg.optim.epochs
    epoch = start_epoch
    stopped = None
    try:
        for epoch in range(start_epoch, epochs):
            progress = resumed_progress if epoch == start_epoch else None
            progress = progress or EpochProgress.start(device)
            if train_one_epoch(run, train_loader, epoch, iters_per_epoch, progress) is None:
                stopped = _stop_mid_epoch(run, save, train_loader, epoch, progress, iters_per_epoch)
                break
            epoch_done = epoch + 1
            final = epoch_done == epochs
            evaluate_now = eval_loader is not None and (final or epoch_done % cfg.train.eval_interval == 0)
            save_now = final or epoch_done % cfg.train.save_interval == 0
            if evaluate_now or save_now:
                _check_model_finite(model, optimizer, env, device, epoch, run.step, last_path)
            if evaluate_now:
                last_eval = evaluate_epoch(run, eval_model, eval_loader, epoch_done)
                if best_metric is None or last_eval["fused"]["top1"] > best_metric:
                    best_metric = last_eval["fused"]["top1"]
                    save(best_path, epoch_done, with_optimizer=False)
            if save_now:
                save(last_path, epoch_done, with_optimizer=True)
            logger.flush()
            if not final and _stop_now(run, synced=True):  # a signal during the epoch's end
                stopped = _stop_at_epoch_end(run, save, train_loader, epoch_done, saved=save_now)
                break
    except TrainingStopped:
        raise
    except CCSError as exc:
        raise TrainingStopped(f"{exc}; training stopped in epoch {epoch + 1} (step {run.step}), {_kept(last_path)}") from None
    finally:
        logger.close()

    return {
        "epochs": epochs,
        "steps": run.step,
        "out_dir": str(out_dir),
        "run_id": run_id,
        "last_checkpoint": str(last_path),
        "best_checkpoint": str(best_path) if best_path.exists() else None,
        "best_metric": best_metric,
        "train": run.last_train,
        "eval": last_eval,
        **(stopped or {}),
    }


def _gather_objects(env: DistEnv, value) -> list:
    """``value`` of every rank, in rank order (a collective under DDP)."""
    if not env.distributed:
        return [value]
    values = [None] * env.world_size
    dist.all_gather_object(values, value)
    return values


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


def _resume_hint(out_dir: Path) -> str:
    return f"resume with: ccs-fast train --resume {out_dir}"


def _stopped_summary(signum: int) -> dict:
    return {"stopped_by": signal_name(signum), "exit_code": exit_code(signum)}


def _signum(run: _Run) -> int:
    """The signal that stopped the run (SIGTERM on a rank told to stop by another)."""
    return run.stop.signum or signal.SIGTERM


def _stop_mid_epoch(run: _Run, save, loader, epoch: int, progress: EpochProgress, iters_per_epoch: int) -> dict:
    """A stop signal ended epoch ``epoch`` at a step boundary: a resumable last.pt there, the
    loader's workers stopped, one line saying how to resume."""
    run.stop.boundary_reached()
    saved_at = time.perf_counter()
    save(run.last_path, epoch, True, progress)
    _close_loader(loader)
    if run.env.is_main:
        print(f"[train] {signal_name(_signum(run))} received: stopped in epoch {epoch + 1} after batch "
              f"{progress.batches}/{iters_per_epoch} (step {run.step}), {run.stop.elapsed():.1f} s after the signal; "
              f"checkpoint {run.last_path} written in {time.perf_counter() - saved_at:.1f} s; "
              f"{_resume_hint(run.last_path.parent)}", flush=True)
    return _stopped_summary(_signum(run))


def _stop_at_epoch_end(run: _Run, save, loader, epoch_done: int, saved: bool) -> dict:
    """A stop signal came while an epoch ended (evaluation, saving): last.pt of that epoch
    (written now unless it just was), one line saying how to resume."""
    run.stop.boundary_reached()
    if not saved:
        save(run.last_path, epoch_done, with_optimizer=True)
    _close_loader(loader)
    if run.env.is_main:
        print(f"[train] {signal_name(_signum(run))} received: stopped after epoch {epoch_done} (step {run.step}), "
              f"{run.stop.elapsed():.1f} s after the signal; checkpoint {run.last_path}; "
              f"{_resume_hint(run.last_path.parent)}", flush=True)
    return _stopped_summary(_signum(run))


def _close_loader(loader) -> None:
    loader.close()

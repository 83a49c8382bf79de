"""The training recipe: what a training run is built from, set by the config.

The objective (CE + the cross-modal triplet and discriminative embedding losses), the
loaders (training clips with K = model.num_segments, evaluation with K = data.test_segments),
SGD with momentum or AdamW with weight decay on conv/linear weights only, the per-iteration
LR schedule (steps and linear warm-up), and the model wrapped for the steps (DDP, then
torch.compile). ``build_parts`` builds them in the order that keeps the seeded RNGs the same
in every run of a config.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ccs_fast.amp import Precision
from ccs_fast.base.distributed import DistEnv, seed_everything
from ccs_fast.base.errors import CCSError
from ccs_fast.config import Config
from ccs_fast.loaders import loader_from_config
from ccs_fast.model import build_model


def name_classes(cfg: Config) -> None:
    """Unless ``model.class_names`` is set, the class names of the training list
    (``formats.find_class_names``: classInd.txt or the list's class folders), stored with the
    config in every checkpoint for ``predict``."""
    if cfg.model.class_names is None and cfg.data.train_list and Path(cfg.data.train_list).is_file():
        from ccs_fast.dataloader.formats import find_class_names

        cfg.model.class_names = find_class_names(cfg.data.train_list, cfg.data.root,
                                                 cfg.model.num_classes, cfg.data.modality)


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


@dataclass
class Parts:
    """What a run trains with: the unwrapped model (checkpoints, evaluation), the objective,
    the optimizer and its per-step schedule, the precision, the loaders."""
    model: torch.nn.Module
    objective: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    precision: Precision
    train_loader: object
    eval_loader: object  # None without an eval split
    iters_per_epoch: int


def build_parts(cfg: Config, env: DistEnv, device: torch.device, precision: Precision) -> Parts:
    """The same seed on every rank for the initial weights (DDP would broadcast rank 0's
    anyway), then a per-rank seed so that dropout and augmentation differ between ranks."""
    seed_everything(cfg.train.seed)
    model = build_model(cfg.model, device=device, channels_last=cfg.train.channels_last, validate=False)
    objective = build_objective(cfg).to(device)
    seed_everything(cfg.train.seed + env.rank)
    train_loader, eval_loader = build_loaders(cfg, device, env)
    iters_per_epoch = len(train_loader)
    if iters_per_epoch == 0:
        raise CCSError(f"{cfg.data.train_list}: no full training batch (batch_size {cfg.data.batch_size} on {env.world_size} process(es))")
    optimizer = build_optimizer(cfg, model, device)
    scheduler = build_scheduler(cfg, optimizer, iters_per_epoch)
    return Parts(model, objective, optimizer, scheduler, precision, train_loader, eval_loader, iters_per_epoch)

"""Mixed precision: the autocast context, the loss scaler and the one optimizer step.

``amp_step`` is the only place the trainer calls ``backward`` and ``step``; keeping scale →
backward → unscale → clip → step → update in one tested function is what stops the two
classic AMP bugs (clipping the still-scaled gradients, and stepping twice).

bf16 and fp32 need no scaler. fp16 uses ``torch.amp.GradScaler``; with a fused optimizer
(``SGD(fused=True)`` on CUDA) the scaler hands the inf check to the optimizer and nothing
syncs, with any other optimizer ``GradScaler.step`` reads ``found_inf`` on the host once per
step (a sync that is torch's, not ours).

A training run checks its precision against its device once (``training_precision``, before
anything is built or written) and then enters ``Precision.autocast()`` every step with no
further check.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterable, Optional

import torch

from ccs_fast.base.errors import CCSError

PRECISIONS = ("bf16", "fp16", "fp32")


def _device_type(device) -> str:
    return torch.device(device).type


def autocast_dtype(precision: str) -> Optional[torch.dtype]:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


def check_precision(precision: str, device) -> None:
    """Raise a one-line CCSError when ``precision`` cannot run on ``device``."""
    device_type = _device_type(device)
    if precision == "bf16" and device_type == "cuda" and not torch.cuda.is_bf16_supported():
        raise CCSError("train.precision=bf16: this GPU has no bf16 support; use fp16 or fp32")
    if precision == "fp16" and device_type not in ("cuda", "cpu"):
        raise CCSError(f"train.precision=fp16 needs CUDA (device is {device_type}); use bf16 or fp32")


def autocast_context(precision: str, device):
    """``torch.autocast`` for bf16/fp16 on ``device``; a no-op context for fp32."""
    dtype = autocast_dtype(precision)
    if dtype is None:
        return contextlib.nullcontext()
    check_precision(precision, device)
    return torch.autocast(device_type=_device_type(device), dtype=dtype)


@dataclass(frozen=True)
class Precision:
    """The precision of one training run on its device, checked: the autocast dtype (None for
    fp32) and, for fp16, the loss scaler ``amp_step`` takes."""
    name: str
    device_type: str
    dtype: Optional[torch.dtype]
    scaler: Optional[torch.amp.GradScaler]

    def autocast(self):
        """The autocast context of one step (a no-op context for fp32)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)


def training_precision(precision: str, device) -> Precision:
    """``precision`` checked once against ``device`` (one-line CCSError when it cannot run
    there), with its autocast dtype and scaler."""
    dtype = autocast_dtype(precision)
    check_precision(precision, device)
    scaler = torch.amp.GradScaler(_device_type(device)) if precision == "fp16" else None
    return Precision(precision, _device_type(device), dtype, scaler)


def _params_of(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def amp_step(
    loss: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    scaler: Optional[torch.amp.GradScaler] = None,
    clip_grad: Optional[float] = None,
    parameters: Optional[Iterable[torch.Tensor]] = None,
) -> torch.Tensor:
    """One optimizer step from ``loss``; returns the (unscaled, pre-clip) gradient norm.

    Order: scale → backward → unscale → clip → step → update, then
    ``zero_grad(set_to_none=True)`` so the gradients are freed before the next forward and
    the next call starts from none. The norm is a device tensor: reading it syncs, so the
    caller does that only at logging intervals. With a scaler, a step whose gradients hold
    inf/NaN is skipped by the scaler (the returned norm is then non-finite).
    """
    params = list(parameters) if parameters is not None else _params_of(optimizer)
    use_scaler = scaler is not None and scaler.is_enabled()
    if use_scaler:
        scaler.scale(loss).backward()
        # Clipping must see the true gradients, so unscale first (once per step).
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    grads = [p.grad for p in params if p.grad is not None]
    if clip_grad is not None and clip_grad > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip_grad, foreach=True)
    elif grads:
        grad_norm = torch.nn.utils.get_total_norm(grads, foreach=True)
    else:
        grad_norm = torch.zeros((), device=loss.device)
    if use_scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm.detach()

"""Training logs: JSON-lines metrics, TensorBoard scalars, a progress bar, top-k accuracy,
an epoch's running sums, and the text lines a training run prints.

Only rank 0 writes (the writers are no-ops elsewhere). Values reach these writers as Python
numbers, read from the device at logging intervals by the trainer (``mean_over_steps``, the
host sync). Every JSON record carries the ``run_id`` of the process that wrote it. A resumed
run first cuts ``metrics.jsonl`` back to the checkpoint's step (``truncate_metrics``): the
interrupted attempt's later records move to ``metrics.dropped.jsonl`` and TensorBoard is told
to purge its later events.

The lines, each built by one function here: the start line (``start_line``, with
``resumed_note``), one per log interval where no bar is drawn (``interval_line``), one per
evaluation (``eval_line``) and one when a stop signal ended training (``stop_line``).
"""
from __future__ import annotations

import errno
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import torch
import torch.distributed as dist

from ccs_fast.base.atomic import write_text
from ccs_fast.base.distributed import DistEnv
from ccs_fast.base.errors import CCSError
from ccs_fast.base.signals import signal_name
from ccs_fast.config import Config

LOSS_NAMES = ("loss", "ce", "triplet", "center")
TRAIN_ACCURACY_NAMES = ("train_rgb_top1", "train_flow_top1", "train_fused_top1")

METRICS_FILE = "metrics.jsonl"
DROPPED_METRICS_FILE = "metrics.dropped.jsonl"
TENSORBOARD_DIR = "tb"


class MetricsWriteError(CCSError):
    """metrics.jsonl could not be written (full disk, file size limit, I/O error)."""


def _jsonable(value):
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no nan/inf; keep them readable
    return value


class MetricsLogger:
    """Appends one JSON object per record to ``out_dir/metrics.jsonl`` and mirrors the
    numeric values to TensorBoard under ``out_dir/tb`` as ``<split>/<name>``.

    ``run_id`` goes into every record. ``purge_step``: TensorBoard drops the events at and
    after this step that earlier writers left (a resumed run passes the checkpoint's step
    + 1). A failed write raises ``MetricsWriteError`` naming the file."""

    def __init__(self, out_dir, enabled: bool = True, tensorboard: bool = True, run_id: Optional[str] = None,
                 purge_step: Optional[int] = None):
        self.enabled = enabled
        self.run_id = run_id
        self.path = Path(out_dir) / METRICS_FILE
        self._file = None
        self._tb = None
        if not enabled:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", buffering=1)
        except OSError as exc:
            raise self._error(exc) from None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # optional dependency: tensorboard
            self._tb = SummaryWriter(log_dir=str(Path(out_dir) / TENSORBOARD_DIR), purge_step=purge_step)

    def _error(self, exc: OSError) -> MetricsWriteError:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            problem = "disk full (no space left on device)"
        elif exc.errno == errno.EFBIG:
            problem = "file size limit (ulimit -f) reached"
        else:
            problem = exc.strerror or str(exc)
        return MetricsWriteError(f"{self.path}: {problem} while writing metrics")

    def log(self, split: str, step: int, values: dict, **fields) -> None:
        if not self.enabled:
            return
        record = {"split": split, "step": int(step), "time": round(time.time(), 3)}
        if self.run_id is not None:
            record["run_id"] = self.run_id
        record.update(fields)
        record.update({k: _jsonable(v) for k, v in values.items()})
        try:
            self._file.write(json.dumps(record) + "\n")
        except OSError as exc:
            raise self._error(exc) from None
        if self._tb is not None:
            for name, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(f"{split}/{name}", value, step)

    def flush(self) -> None:
        if self._file is not None:
            try:
                self._file.flush()
            except OSError as exc:
                raise self._error(exc) from None
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        """Close the writers. Never raises: it runs while another error may be on its way
        out, and ``flush`` has already reported any write that failed."""
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def truncate_metrics(out_dir, step: int) -> int:
    """Cut ``out_dir/metrics.jsonl`` back to the records of steps ``<= step`` (a resumed
    run's checkpoint): later records, and lines a killed writer left unfinished, are
    appended to ``metrics.dropped.jsonl`` and the file is replaced atomically. Returns the
    number of records moved."""
    path = Path(out_dir) / METRICS_FILE
    if not path.is_file():
        return 0
    try:
        lines = path.read_text().splitlines(keepends=True)
        kept, dropped = [], []
        for line in lines:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                keep = line.endswith("\n") and int(record.get("step", 0)) <= step
            except (ValueError, TypeError, AttributeError):
                keep = False
            (kept if keep else dropped).append(line if line.endswith("\n") else line + "\n")
        if not dropped:
            return 0
        with open(path.parent / DROPPED_METRICS_FILE, "a") as f:
            f.writelines(dropped)
        write_text(path, "".join(kept))
    except OSError as exc:
        raise MetricsWriteError(f"{path}: could not cut the metrics back to step {step} for the resume "
                                f"({exc.strerror or exc}); nothing was trained") from None
    return len(dropped)


def flatten_metrics(values: dict, prefix: str = "") -> dict:
    """``{"fused": {"top1": x}}`` → ``{"fused_top1": x}`` (for JSON lines and TensorBoard)."""
    flat = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_metrics(value, f"{name}_"))
        else:
            flat[name] = value
    return flat


def read_metrics(path) -> list[dict]:
    """The records of a metrics.jsonl file (for tests and reports)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


class Progress:
    """A tqdm bar over one epoch showing loss and clips/s; silent when disabled."""

    def __init__(self, total: int, desc: str, enabled: bool = True):
        self._bar = None
        if enabled:
            from tqdm.auto import tqdm
            # disable=None: no bar when stderr is not a terminal (logs, CI); the trainer still
            # prints its [train] and [eval] lines.
            self._bar = tqdm(total=total, desc=desc, unit="batch", dynamic_ncols=True, leave=False, disable=None)

    def update(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def show(self, **values) -> None:
        if self._bar is not None:
            self._bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in values.items()}, refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class Throughput:
    """Clips per second between calls to ``rate`` (call it only after a host sync)."""

    def __init__(self):
        self._t0 = time.perf_counter()
        self._clips = 0

    def add(self, clips: int) -> None:
        self._clips += clips

    def rate(self) -> float:
        now = time.perf_counter()
        rate = self._clips / max(now - self._t0, 1e-9)
        self._t0, self._clips = now, 0
        return rate


def topk_correct(scores: torch.Tensor, labels: torch.Tensor, ks: Iterable[int] = (1, 5)) -> torch.Tensor:
    """Number of rows whose label is among the top-k scores, for each k (k capped at the
    number of classes), as a float device tensor (no host sync)."""
    ks = list(ks)
    kmax = min(max(ks), scores.shape[-1])
    top = scores.topk(kmax, dim=-1).indices  # (B, kmax)
    hit = top.eq(labels.view(-1, 1))
    return torch.stack([hit[:, : min(k, kmax)].any(dim=1).sum() for k in ks]).float()


def confusion_counts(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(C, C) float64 counts[true class, argmax of ``scores``] of a (B, C) batch, on the
    device with no host sync (a scatter-add, not ``bincount``, which reads its maximum);
    rows whose label lies outside [0, C) (a label-less video, −1) are not counted."""
    C = scores.shape[-1]
    labels = labels.to(scores.device).long()
    known = (labels >= 0) & (labels < C)
    cells = torch.where(known, labels * C + scores.argmax(dim=-1), C * C)  # C·C: the discard cell
    flat = torch.zeros(C * C + 1, dtype=torch.float64, device=scores.device)
    flat.index_add_(0, cells, torch.ones_like(cells, dtype=torch.float64))
    return flat[:-1].view(C, C)


# ---------------------------------------------------------------------------- one epoch's sums

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


def mean_over_steps(running: torch.Tensor, count: int, env: DistEnv, names=LOSS_NAMES + ("grad_norm",)) -> dict:
    """Mean of the accumulated values (losses and gradient norm by default) over ``count``
    steps (and every rank)."""
    if env.distributed:
        running = running.clone()
        dist.all_reduce(running)
        count *= env.world_size
    values = (running / max(count, 1)).tolist()  # syncs with the device: logging intervals only
    return dict(zip(names, values))


# ---------------------------------------------------------------------------- printed lines

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


def resumed_note(cfg: Config, path: Optional[Path], start_epoch: int, step: int, iters_per_epoch: int,
                 batches: Optional[int], changed: dict, moved: int) -> str:
    """The start line's account of a resume (empty for a fresh run): the checkpoint and where
    in it the run goes on (``batches``: of a mid-epoch checkpoint), another target folder,
    the settings changed and the metrics records moved aside."""
    if path is None:
        return ""
    where = f"epoch {start_epoch + 1} after batch {batches}/{iters_per_epoch}" if batches is not None else f"epoch {start_epoch}"
    note = f"; resumed from {path} ({where}, step {step})"
    if Path(path).parent.resolve() != Path(cfg.train.out_dir).resolve():
        note += f", writing to {cfg.train.out_dir} (--out), not to {Path(path).parent}"
    shown = {name: values for name, values in changed.items() if name != "train.out_dir"}  # the "->" says it
    if shown:
        note += ", changed on resume: " + ", ".join(f"{name} {old!r} -> {new!r}" for name, (old, new) in shown.items())
    if moved:
        note += f"; {moved} metrics record(s) after step {step} moved to metrics.dropped.jsonl"
    return note


def start_line(cfg: Config, run_id: str, device, world_size: int, iters_per_epoch: int, start_epoch: int,
               weight_tensors: tuple[int, int], frame_count, resume_path: Optional[Path], resumed: str) -> str:
    """The line a training run starts with: what trains where, the schedule, the weight decay
    (``weight_tensors``: conv/linear weights with it, BN/bias tensors without), the output
    folder, the data and where the weights come from, then ``resumed`` (``resumed_note``)."""
    n_decay, n_plain = weight_tensors
    data_note = f"; {cfg.data.train_list}: {frame_count}" if frame_count is not None else ""
    if resume_path is not None:
        weights = f"weights from {resume_path}"
    elif cfg.model.pretrained:
        weights = f"{cfg.model.backbone} streams from {cfg.model.pretrained}"
    else:
        weights = f"{cfg.model.backbone} streams from scratch (no model.pretrained)"
    data_note = f"; {cfg.model.num_classes} classes, {cfg.data.backend} loader, {weights}{data_note}"
    return (f"[train] run {run_id}: {cfg.model.variant} on {device} x{world_size}, {cfg.train.precision}, "
            f"{iters_per_epoch} steps/epoch, epochs {start_epoch + 1}..{cfg.optim.epochs}; weight decay "
            f"{cfg.optim.weight_decay:g} on {n_decay} conv/linear weights, none on {n_plain} BN/bias tensors "
            f"-> {cfg.train.out_dir}{data_note}{resumed}")


def eval_line(epoch_done: int, result: dict) -> str:
    return (f"[eval] epoch {epoch_done}: top-1 RGB {result['rgb']['top1']:.4f} "
            f"Flow {result['flow']['top1']:.4f} RGB+Flow {result['fused']['top1']:.4f} "
            f"({result['num_videos']} videos)")


def stop_line(signum: int, where: str, since_signal_s: float, checkpoint: str, out_dir: Path) -> str:
    """The one line of a run that a stop signal ended: ``where`` it stopped, how long after the
    signal, the checkpoint written and how to resume."""
    return (f"[train] {signal_name(signum)} received: stopped {where}, {since_signal_s:.1f} s after the signal; "
            f"checkpoint {checkpoint}; resume with: ccs-fast train --resume {out_dir}")

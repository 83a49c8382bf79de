"""Checkpoints: a plain dict written atomically, checked against the config when read.

A checkpoint holds the state dict of the unwrapped, uncompiled model (no ``module.`` or
``_orig_mod.`` prefixes), the optimizer, LR scheduler and loss-scaler states, the epoch
(completed epochs, i.e. the next one to run), the global step, the RNG states of every
rank, ``Config.to_dict()``, the best metric so far and, for a run stopped between two steps
of an epoch, ``mid_epoch``: the loader's position in that epoch (batches consumed) and the
epoch's running sums per rank. It loads with
``torch.load(weights_only=True)``: nothing but tensors and plain Python values inside.

Saving writes a temporary file ``.<name>.<pid>.<random>.tmp`` in the destination folder
(mode 0666 less the umask, like every other output), fsyncs it and ``os.replace``s it over
the destination, so a crash or a full disk never leaves a half-written ``last.pt``: the
previous file stays as it was and the temporary file is removed (a process killed during
the write leaves it behind; the trainer removes such files when it next claims the folder).
A failed write is one CCSError line whatever torch raised (an ``OSError``, or a
``RuntimeError`` from its zip writer on a full disk or past ``ulimit -f``).

A checkpoint is only written when every floating-point tensor in the model state and the
optimizer state is finite (one fused max-|x| reduction, one host sync), and a model state
holding NaN or inf is refused when loaded, so a diverged model is never kept or evaluated
as good.
"""
from __future__ import annotations

import errno
import random
import resource
import shutil
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

import numpy as np
import torch

from ccs_fast.base.atomic import atomic_path
from ccs_fast.base.errors import bad_file

LAST = "last.pt"
BEST = "best.pt"
FORMAT_VERSION = 1

# Model config fields that change parameter shapes or the architecture: a checkpoint whose
# values differ cannot be loaded into this config's model.
MODEL_SHAPE_FIELDS = (
    "backbone", "variant", "num_classes", "flow_length", "cb_stages", "cb_reduction",
    "cb_heads", "consensus", "embed_dim",
)


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under DistributedDataParallel and torch.compile wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):  # torch.compile's OptimizedModule
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


# ---------------------------------------------------------------------------- RNG state

def rng_state() -> dict:
    """Python, NumPy, torch CPU and CUDA generator states as weights_only-loadable values."""
    _, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    state = {
        "python": random.getstate(),
        "numpy": (torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached_gaussian)),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    keys, pos, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch"])
    cuda_states = state.get("cuda") or []
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)


# ---------------------------------------------------------------------------- finiteness

def nonfinite_names(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """Names of the floating-point tensors holding a NaN or an infinity.

    One ``torch._foreach_norm(ord=inf)`` per dtype (max |x| of every tensor at once; NaN
    propagates through the max) and one host sync; the per-tensor scan that finds the names
    runs only when something is not finite."""
    named = [(name, t.detach()) for name, t in named_tensors
             if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel() > 0]
    by_dtype: dict[tuple, list[torch.Tensor]] = {}
    for _, t in named:
        by_dtype.setdefault((t.dtype, t.device), []).append(t)
    flags = [torch.stack(torch._foreach_norm(group, float("inf"))).isfinite().all()
             for group in by_dtype.values()]
    if not flags or bool(torch.stack([f.cpu() for f in flags]).all()):  # host sync
        return []
    return [name for name, t in named if not bool(t.isfinite().all())]


def checkpoint_tensors(state: dict) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) of a checkpoint dict's model and optimizer state."""
    named = list((state.get("model") or {}).items())
    optimizer = state.get("optimizer") or {}
    for index, slots in (optimizer.get("state") or {}).items():
        named += [(f"optimizer.state.{index}.{slot}", value) for slot, value in slots.items()]
    return named


def describe_names(names: list[str]) -> str:
    return f"{len(names)} tensor{'s' if len(names) > 1 else ''} (e.g. {', '.join(names[:3])})"


# ---------------------------------------------------------------------------- saving

def _write_failure(path: Path, exc: BaseException, size: int) -> str:
    """What went wrong when writing ``size`` bytes to ``path`` failed with ``exc``."""
    code = getattr(exc, "errno", None)
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        free = None
    if code == errno.ENOSPC or code == errno.EDQUOT or (code is None and free is not None and free < size):
        return f"disk full (no space left on device, {free / 2**20:.0f} MiB free) while saving the checkpoint"
    if code == errno.EFBIG or (code is None and limit != resource.RLIM_INFINITY and size >= limit):
        return f"file size limit (ulimit -f, {limit} bytes) reached while saving the checkpoint"
    if isinstance(exc, OSError):
        return f"could not save the checkpoint ({exc.strerror or exc})"
    return f"could not save the checkpoint (torch: {str(exc).splitlines()[0][:160]})"


def _is_write_failure(exc: BaseException) -> bool:
    """torch's zip writer reports a failed write as a RuntimeError, not an OSError."""
    if isinstance(exc, OSError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("inline_container" in text or "PytorchStreamWriter" in text
                                              or "file write failed" in text)


def _atomic_torch_save(obj: Any, path: Path, size_hint: int = 0) -> None:
    """torch.save to a temporary file beside ``path``, fsync, then rename over ``path``
    (``atomic.atomic_path``); a failed write is one CCSError saying what it needed."""
    written = 0
    try:
        with atomic_path(path, durable=True) as tmp:
            try:
                with open(tmp, "xb") as f:  # "x": a fresh file, mode 0666 & ~umask
                    torch.save(obj, f)
            except BaseException:
                written = tmp.stat().st_size if tmp.exists() else 0
                raise
    except (OSError, RuntimeError) as exc:
        if not _is_write_failure(exc):
            raise
        problem = _write_failure(path, exc, max(size_hint, written))
        previous = "the previous checkpoint is intact" if path.exists() else "no previous checkpoint there"
        raise bad_file(path, f"{problem}; {previous}") from None


def tensor_bytes(tensors: Iterable) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


# Optimizer state per parameter before the first step creates it: SGD's momentum buffer,
# Adam's two moments (the default for anything else).
_STATE_SLOTS = {"SGD": 1, "FusedSGD": 1}


def estimate_checkpoint_bytes(model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer] = None) -> int:
    """Size of a checkpoint of ``model`` and ``optimizer`` on disk, from their tensors (the
    optimizer's state is estimated from its kind until its first step creates it), plus
    1 MiB for the zip structure, RNG states and config."""
    total = tensor_bytes(unwrap_model(model).state_dict().values()) + 2**20
    if optimizer is not None:
        if optimizer.state:
            total += tensor_bytes(v for slots in optimizer.state.values() for v in slots.values())
        else:
            params = tensor_bytes(p for group in optimizer.param_groups for p in group["params"])
            total += params * _STATE_SLOTS.get(type(optimizer).__name__, 2)
    return total


def build_checkpoint(
    model: torch.nn.Module,
    *,
    optimizer: Optional[torch.optim.Optimizer] = None,
    scheduler=None,
    scaler: Optional[torch.amp.GradScaler] = None,
    epoch: int = 0,
    step: int = 0,
    config: Optional[dict] = None,
    best_metric: Optional[float] = None,
    rng_states: Optional[list] = None,
    run_id: Optional[str] = None,
    mid_epoch: Optional[dict] = None,
) -> dict:
    """The checkpoint dict (``rng_states``: one entry per rank; default: this process's;
    ``run_id``: the training run that wrote it; ``mid_epoch``: where in epoch ``epoch`` a
    run stopped between steps, see ``trainer``; None at an epoch's end)."""
    return {
        "format_version": FORMAT_VERSION,
        "model": unwrap_model(model).state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "epoch": int(epoch),
        "step": int(step),
        "rng": rng_states if rng_states is not None else [rng_state()],
        "config": config,
        "best_metric": None if best_metric is None else float(best_metric),
        "run_id": run_id,
        "mid_epoch": mid_epoch,
        "torch_version": str(torch.__version__),
    }


def save_checkpoint(path, model: torch.nn.Module, **fields) -> Path:
    """Build the checkpoint (see ``build_checkpoint`` for ``fields``) and save it atomically.

    Raises CCSError naming ``path`` when a model or optimizer tensor is not finite (nothing
    is written) or when writing fails (full disk, file size limit, any OSError); the file
    previously at ``path`` is then untouched and no temporary file is left behind.
    """
    path = Path(path)
    state = build_checkpoint(model, **fields)
    bad = nonfinite_names(checkpoint_tensors(state))
    if bad:
        raise bad_file(path, f"not written: the model holds NaN or inf in {describe_names(bad)}; "
                             "the previous checkpoint is intact")
    _atomic_torch_save(state, path, size_hint=tensor_bytes(t for _, t in checkpoint_tensors(state)))
    return path


# ---------------------------------------------------------------------------- loading

def resolve_checkpoint_path(path) -> Path:
    """``path`` itself, or ``path/last.pt`` when ``path`` is a run folder."""
    path = Path(path)
    return path / LAST if path.is_dir() else path


def read_checkpoint(path, mmap: bool = False) -> dict:
    """The checkpoint dict at ``path``; CCSError naming the file if missing or corrupt.
    ``mmap``: map the file instead of reading it (cheap when only the config is needed)."""
    path = Path(path)
    if not path.is_file():
        raise bad_file(path, "checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # torch.load raises many types for a damaged file
        raise bad_file(path, f"not a readable checkpoint (corrupt or truncated: {type(exc).__name__})") from None
    if not isinstance(state, dict) or "model" not in state:
        raise bad_file(path, "not a ccs_fast checkpoint (no model state)")
    return state


EXPORTED_FIELDS = ("model", "config", "epoch", "step", "run_id", "best_metric")


def export_checkpoint(checkpoint, out) -> tuple[Path, int]:
    """Write the weights and config of ``checkpoint`` (or of a run folder's last.pt) to
    ``out``: no optimizer, scheduler, scaler or RNG state, parameter names current. The file
    is a checkpoint ``eval`` and ``predict`` read; a model holding NaN or inf is refused (CCSError,
nothing written). Returns (out, its size in bytes)."""
    source = resolve_checkpoint_path(checkpoint)
    state = read_checkpoint(source)
    if not state.get("config"):
        raise bad_file(source, "holds no config; a shared checkpoint must carry one")
    out = Path(out)
    if out.resolve() == source.resolve():
        raise bad_file(out, "is the checkpoint being exported; write the export elsewhere")
    bad = nonfinite_names(state["model"].items())
    if bad:
        raise bad_file(source, f"not exported: the model holds NaN or inf in {describe_names(bad)}; "
                               "it was saved from a diverged model and cannot be shared")
    exported = {key: state[key] for key in EXPORTED_FIELDS if key in state}
    exported["model"] = _current_names(state["model"])
    exported["exported_from"] = str(source)
    _atomic_torch_save(exported, out, size_hint=tensor_bytes(exported["model"].values()))
    return out, out.stat().st_size


def check_config_compatible(path, saved: Optional[dict], cfg) -> None:
    """CCSError when the checkpoint's model config differs from ``cfg`` in a shape field."""
    if cfg is None or not saved:
        return
    saved_model = saved.get("model", {})
    current = cfg.to_dict()["model"]
    fields = list(MODEL_SHAPE_FIELDS)
    if current.get("consensus") == "concat" or saved_model.get("consensus") == "concat":
        fields.append("num_segments")  # concat consensus sizes its input by K
    diffs = [
        f"{name} {saved_model.get(name)!r} vs {current.get(name)!r}"
        for name in fields
        if name in saved_model and saved_model.get(name) != current.get(name)
    ]
    if diffs:
        raise bad_file(path, "checkpoint from another config (checkpoint vs this config: " + "; ".join(diffs) + ")")


# Parameter names of checkpoints from before the streams were named rgb/flow in the model.
_RENAMED_PREFIXES = {"backbone_f.": "backbone_rgb.", "backbone_o.": "backbone_flow.",
                     "classifier_f.": "classifier_rgb.", "classifier_o.": "classifier_flow."}


def _current_names(state_dict: dict) -> dict:
    renamed = {}
    for key, value in state_dict.items():
        for old, new in _RENAMED_PREFIXES.items():
            if key.startswith(old):
                key = new + key[len(old):]
                break
        renamed[key] = value
    return renamed


def load_model_state(path, model: torch.nn.Module, state_dict: dict) -> None:
    """Strict load into the unwrapped model (parameter names of older checkpoints are
    renamed first); a mismatch, or a NaN or inf in the state, is one CCSError line naming
    ``path``."""
    state_dict = _current_names(state_dict)
    bad = nonfinite_names(state_dict.items())
    if bad:
        raise bad_file(path, f"the checkpoint's model holds NaN or inf in {describe_names(bad)}; "
                             "it was saved from a diverged model and cannot be used")
    target = unwrap_model(model)
    own = target.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [
        k for k in own
        if k in state_dict and tuple(own[k].shape) != tuple(state_dict[k].shape)
    ]
    if missing or unexpected or mismatched:
        parts = []
        for name, keys in (("missing", missing), ("unexpected", unexpected), ("shape-mismatched", mismatched)):
            if keys:
                parts.append(f"{len(keys)} {name} (e.g. {keys[0]})")
        raise bad_file(path, "checkpoint does not match the model: " + ", ".join(parts))
    target.load_state_dict(state_dict, strict=True)


def load_checkpoint(
    path,
    model: Optional[torch.nn.Module] = None,
    optimizer: Optional[torch.optim.Optimizer] = None,
    scheduler=None,
    scaler: Optional[torch.amp.GradScaler] = None,
    cfg=None,
    restore_rng: bool = False,
    rank: int = 0,
) -> dict:
    """Read ``path`` and restore what is given; returns the checkpoint dict.

    ``cfg``: refuse (CCSError) a checkpoint whose model config differs in a shape field.
    ``restore_rng``: put back this rank's RNG states (rank 0's if the checkpoint has fewer).
    """
    path = Path(path)
    state = read_checkpoint(path)
    check_config_compatible(path, state.get("config"), cfg)
    restore_checkpoint(path, state, model, optimizer, scheduler, scaler, restore_rng, rank)
    return state


def restore_checkpoint(path, state: Mapping, model=None, optimizer=None, scheduler=None, scaler=None,
                       restore_rng: bool = False, rank: int = 0) -> None:
    """Put a checkpoint dict read from ``path`` back into what is given (see load_checkpoint)."""
    if model is not None:
        load_model_state(path, model, state["model"])
    try:
        if optimizer is not None and state.get("optimizer") is not None:
            optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state.get("scheduler") is not None:
            scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler") is not None:
            scaler.load_state_dict(state["scaler"])
    except (ValueError, KeyError, RuntimeError) as exc:
        raise bad_file(path, f"optimizer/scheduler state does not match ({str(exc).splitlines()[0][:120]})") from None
    if restore_rng and state.get("rng"):
        rngs = state["rng"]
        set_rng_state(rngs[rank] if rank < len(rngs) else rngs[0])

"""Checkpoints: a plain dict written atomically, checked against the config when read.

A checkpoint holds the state dict of the unwrapped, uncompiled model (no ``module.`` or
``_orig_mod.`` prefixes), the optimizer, LR scheduler and loss-scaler states, the epoch
(completed epochs, i.e. the next one to run), the global step, the RNG states of every
rank, ``Config.to_dict()`` and the best metric so far. It loads with
``torch.load(weights_only=True)``: nothing but tensors and plain Python values inside.

Saving writes a temporary file in the destination folder, fsyncs it and ``os.replace``s it
over the destination, so a crash or a full disk never leaves a half-written ``last.pt``:
the previous file stays as it was and the temporary file is removed.
"""
from __future__ import annotations

import errno
import os
import random
import tempfile
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ccs_fast.errors import CCSError, bad_file

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


# ---------------------------------------------------------------------------- saving

def _atomic_torch_save(obj: Any, path: Path) -> None:
    """torch.save to a temporary file beside ``path``, fsync, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_name = None
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
        tmp_name = None
        try:  # make the rename itself durable
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError:
            pass  # some file systems cannot fsync a directory; the data is already safe
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            problem = "disk full (no space left on device) while saving the checkpoint"
        else:
            problem = f"could not save the checkpoint ({exc.strerror or exc})"
        raise bad_file(path, f"{problem}; the previous checkpoint is unchanged") from None
    finally:
        if tmp_name is not None:
            try:
                os.unlink(tmp_name)
            except OSError:
                pass


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
) -> dict:
    """The checkpoint dict (``rng_states``: one entry per rank; default: this process's)."""
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
        "torch_version": str(torch.__version__),
    }


def save_checkpoint(path, model: torch.nn.Module, **fields) -> Path:
    """Build the checkpoint (see ``build_checkpoint`` for ``fields``) and save it atomically.

    Raises CCSError naming ``path`` if writing fails (full disk or any OSError); the file
    previously at ``path`` is then untouched and no temporary file is left behind.
    """
    path = Path(path)
    _atomic_torch_save(build_checkpoint(model, **fields), path)
    return path


# ---------------------------------------------------------------------------- loading

def read_checkpoint(path) -> dict:
    """The checkpoint dict at ``path``; CCSError naming the file if missing or corrupt."""
    path = Path(path)
    if not path.is_file():
        raise bad_file(path, "checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises many types for a damaged file
        raise bad_file(path, f"not a readable checkpoint (corrupt or truncated: {type(exc).__name__})") from None
    if not isinstance(state, dict) or "model" not in state:
        raise bad_file(path, "not a ccs_fast checkpoint (no model state)")
    return state


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


def load_model_state(path, model: torch.nn.Module, state_dict: dict) -> None:
    """Strict load into the unwrapped model; a mismatch is one CCSError line naming ``path``."""
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
    return state

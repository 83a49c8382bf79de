"""Atomic file writes: an output is complete or absent, never half-written.

Every file ccs_fast writes (checkpoints, metrics after a resume cut, annotation lists,
configs, evaluation and benchmark results, ``synth``'s videos) is written to a hidden
temporary file beside it, ``.<name>.<pid>.<random>.tmp``, and renamed over it when complete
(``os.replace``: atomic on one file system). A write that fails or is interrupted removes its
temporary file; one a killed process left behind matches ``temporary_glob(name)``, which
``run_folder`` and ``synth`` clear before they write again. ``durable=True`` also fsyncs the
file before the rename and the folder after it (checkpoints).
"""
from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import Iterator


def temporary_name(path: Path) -> Path:
    """The temporary file a write of ``path`` goes to first (unique per process and call)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def temporary_glob(name: str) -> str:
    """Glob matching every temporary file a write of ``name`` may leave behind."""
    return f".{name}.*.tmp"


def fsync_path(path: Path) -> None:
    """fsync a file or folder by path; a file system that cannot fsync a folder is let be
    (the data written before it is already safe)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path, *, durable: bool = False) -> Iterator[Path]:
    """``with atomic_path(out) as tmp: <write tmp>``: ``tmp`` replaces ``out`` when the block
    ends normally and is removed when it raises. The folder of ``out`` is created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        yield tmp
        if durable:
            fsync_path(tmp)
        os.replace(tmp, path)
        if durable:
            fsync_path(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path, text: str, *, durable: bool = False) -> Path:
    """Write ``text`` to ``path`` atomically; returns ``path``."""
    with atomic_path(path, durable=durable) as tmp:
        tmp.write_text(text)
    return Path(path)

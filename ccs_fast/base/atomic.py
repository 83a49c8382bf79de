"""Atomic writes: an output is complete or absent, never half-written.

Every file ccs_fast writes (checkpoints, metrics after a resume cut, annotation lists,
configs, evaluation and benchmark results, ``synth``'s videos) is written to a hidden
temporary file beside it, ``.<name>.<pid>.<random>.tmp``, and renamed over it when complete
(``os.replace``: atomic on one file system). A rawframes folder is written the same way
(``atomic_dir``): into a hidden temporary folder of the same name scheme, renamed when
complete. A write that fails or is interrupted removes its temporary; one a killed process
left behind matches ``temporary_glob(name)`` (``is_temporary`` for a name), which
``run_folder``, ``synth`` and ``prepare`` clear before they write again. ``durable=True``
also fsyncs the file before the rename and the folder after it (checkpoints).
"""
from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Callable, Iterator

_TEMPORARY = re.compile(r"^\..+\.\d+\.[0-9a-f]{8}\.tmp$")  # what temporary_name makes
# The frames folders' earlier scheme (``.<name>.tmp-<hex>``, ``.<name>.old-<hex>``, from before
# atomic_dir joined this module): still recognised, so a run killed under it is cleaned too.
_EARLIER_TEMPORARY = re.compile(r"^\..+\.(tmp|old)-[0-9a-f]{8}$")


def temporary_name(path: Path) -> Path:
    """The temporary file a write of ``path`` goes to first (unique per process and call)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def temporary_glob(name: str) -> str:
    """Glob matching every temporary a write of ``name`` may leave behind."""
    return f".{name}.*.tmp"


def is_temporary(name: str) -> bool:
    """Whether a file or folder name is one ``temporary_name`` makes (or the frames folders'
    earlier scheme, ``.<name>.tmp-<hex>`` and ``.<name>.old-<hex>``)."""
    return _TEMPORARY.match(name) is not None or _EARLIER_TEMPORARY.match(name) is not None


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


def atomic_dir(out_dir, write: Callable[[Path], object], *, overwrite: bool = False):
    """Run ``write(tmp_dir)`` and rename ``tmp_dir`` to ``out_dir`` only if it returns.

    The temporary folder is a hidden sibling of ``out_dir`` (``temporary_name``: same file
    system, so the rename is atomic); it is removed if ``write`` raises. An existing ``out_dir``
    raises ``FileExistsError`` unless ``overwrite``, in which case it is replaced only after the
    new folder is complete. Returns what ``write`` returned.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir}: already exists")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = temporary_name(out_dir)
    tmp_dir.mkdir()
    try:
        result = write(tmp_dir)
        if out_dir.exists():
            old_dir = temporary_name(out_dir)
            os.rename(out_dir, old_dir)
            os.rename(tmp_dir, out_dir)
            shutil.rmtree(old_dir, ignore_errors=True)
        else:
            os.rename(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return result

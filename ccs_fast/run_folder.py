"""The run folder (``train.out_dir``): one training process at a time, never overwritten by
accident, checked for room before the first epoch (SPEC §5, §9).

``claim_run_folder`` creates the folder and takes ``train.lock`` in it: an exclusive
``flock`` held for the whole run on a file holding the holder's PID, host, run id and start
time as JSON. The kernel drops the lock when the process dies, so a lock file a killed run
left behind is taken over; so is one whose holder, on this host, is gone while the forked
DataLoader workers that inherited the lock have not exited yet. A folder that already holds
anything else is refused unless the run resumes (``--resume``) or replaces it
(``--overwrite``, which removes the previous run's outputs named in ``RUN_OUTPUTS`` and
nothing else). Temporary files that saves interrupted by a kill left behind are removed.
An output folder that cannot be created or written to is one error line before anything
is written.

Without ``flock`` support on the file system, a lock file whose PID is alive (or on another
host) counts as held.

``run_folder`` is the claim a training run holds (rank 0 claims, every rank learns of a
refusal; a hard exit on a second signal removes this process's temporaries and the lock);
``open_outputs`` writes ``config.yaml``, cuts ``metrics.jsonl`` back to a resumed run's step
and opens the metrics writers.

``RunFolder.check_room`` compares the free space and the file size limit (``ulimit -f``)
with the size of one checkpoint: a save writes the new file beside the previous one
before replacing it. Limits: ``flock`` is advisory and, on NFS, only as good as the
server's lock manager; PIDs are compared on the same host name only.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import resource
import shutil
import socket
import time
import uuid
from pathlib import Path
from typing import Optional

from ccs_fast.base.atomic import temporary_glob
from ccs_fast.base.distributed import DistEnv, on_main_rank
from ccs_fast.base.errors import CCSError, bad_file
from ccs_fast.base.signals import GracefulStop
from ccs_fast.checkpoint import BEST, LAST
from ccs_fast.config import Config, save_config
from ccs_fast.metrics import DROPPED_METRICS_FILE, METRICS_FILE, TENSORBOARD_DIR, MetricsLogger, truncate_metrics

LOCK_FILE = "train.lock"
CONFIG_FILE = "config.yaml"
# What a training run (and ccs-fast demo's evaluation beside it) writes into its folder.
RUN_OUTPUTS = (LAST, BEST, CONFIG_FILE, METRICS_FILE, DROPPED_METRICS_FILE, TENSORBOARD_DIR, "eval.json", "eval.md")
TEMPORARY_GLOBS = (temporary_glob(LAST), temporary_glob(BEST), temporary_glob(METRICS_FILE))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def _read_holder(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        holder = json.loads(os.read(fd, 4096).decode() or "{}")
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}


def _describe_holder(holder: dict) -> str:
    if not holder:
        return "a process that has not written its PID yet"
    started = holder.get("started")
    since = f" since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(started))}" if started else ""
    return f"PID {holder.get('pid')} on {holder.get('host')} (run {holder.get('run_id')}){since}"


def _not_writable(path: Path, exc: OSError) -> CCSError:
    return bad_file(path, f"output folder is not writable ({exc.strerror or exc}); nothing was written")


class RunFolder:
    """A claimed run folder; ``release`` gives it back (see the module docstring)."""

    def __init__(self, path: Path, lock_fd: int, created: bool):
        self.path = path
        self.lock_path = path / LOCK_FILE
        self._fd: Optional[int] = lock_fd
        self._created = created

    def check_room(self, checkpoint_bytes: int) -> None:
        """CCSError when one more checkpoint of ``checkpoint_bytes`` would not fit."""
        free = shutil.disk_usage(self.path).free
        if free < checkpoint_bytes:
            raise bad_file(self.path, f"not enough free space for a checkpoint: one needs about "
                                      f"{checkpoint_bytes / 2**20:.1f} MiB, {free / 2**20:.1f} MiB free; nothing was trained")
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if limit != resource.RLIM_INFINITY and limit < checkpoint_bytes:
            raise bad_file(self.path, f"the file size limit (ulimit -f) of {limit} bytes is below the size of a "
                                      f"checkpoint (about {checkpoint_bytes} bytes); nothing was trained")

    def clean_up_now(self) -> None:
        """What a process that must exit at once (``GracefulStop``'s hard exit) leaves in order:
        its temporary files gone, the lock released."""
        for tmp in self.path.glob(f".*.{os.getpid()}.*.tmp"):
            tmp.unlink(missing_ok=True)
        self.release()

    def release(self) -> None:
        """Remove the lock; a folder this claim created and nothing else was written to goes too."""
        if self._fd is None:
            return
        try:
            if os.path.samestat(os.fstat(self._fd), os.stat(self.lock_path)):
                os.unlink(self.lock_path)
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None
        if self._created:
            try:
                self.path.rmdir()  # only succeeds when empty
            except OSError:
                pass


def _take_lock(path: Path, run_id: str) -> int:
    lock_path = path / LOCK_FILE
    host = socket.gethostname()
    for _ in range(10):
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except OSError as exc:
            raise _not_writable(path, exc) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held = False
        except BlockingIOError:
            held = True
        except OSError:  # a file system without flock: judge by the PID in the file alone
            held = bool(_read_holder(fd))
        if held:
            holder = _read_holder(fd)
            os.close(fd)
            pid = holder.get("pid")
            if holder.get("host") == host and isinstance(pid, int) and not _pid_alive(pid):
                # The holder is gone; children it forked may still hold the lock for a
                # moment. A fresh lock file (a new inode) leaves them theirs.
                try:
                    os.unlink(lock_path)
                except FileNotFoundError:
                    pass
                continue
            raise bad_file(path, f"in use by another training run: {_describe_holder(holder)} holds {lock_path}; "
                                 "wait for it to finish, or use another --out")
        try:  # the previous holder may have unlinked the file between our open and flock
            current = os.path.samestat(os.fstat(fd), os.stat(lock_path))
        except FileNotFoundError:
            current = False
        if not current:
            os.close(fd)
            continue
        try:
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            holder = {"pid": os.getpid(), "host": host, "run_id": run_id, "started": round(time.time(), 3)}
            os.write(fd, (json.dumps(holder) + "\n").encode())
        except OSError as exc:
            os.close(fd)
            raise _not_writable(path, exc) from None
        return fd
    raise bad_file(lock_path, "could not take the run folder's lock (it kept changing hands)")


def new_run_id() -> str:
    """Start time and random hex (from os.urandom: no draw from the seeded RNGs)."""
    return time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def claim_run_folder(path, *, resume: bool, overwrite: bool, run_id: str,
                     log=print) -> RunFolder:
    """Create and lock ``path`` for a training run (see the module docstring); ``log``
    receives one line per thing removed."""
    path = Path(path)
    created = not path.exists()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise bad_file(path, "output folder is a file") from None
    except OSError as exc:
        raise bad_file(path, f"cannot create the output folder ({exc.strerror or exc}); nothing was written") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise _not_writable(path, OSError(errno.EACCES, os.strerror(errno.EACCES)))
    folder = RunFolder(path, _take_lock(path, run_id), created)
    try:
        entries = sorted(p.name for p in path.iterdir() if p.name != LOCK_FILE)
        if entries and not (resume or overwrite):
            shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
            raise bad_file(path, f"output folder is not empty ({shown}); pass --resume {path} to continue "
                                 "its run or --overwrite to replace it")
        if overwrite:
            removed = [name for name in RUN_OUTPUTS if (path / name).exists()]
            for name in removed:
                _remove(path / name)
            if removed:
                log(f"[train] --overwrite: removed the previous run's {', '.join(removed)} from {path}")
        stale = sorted(p for pattern in TEMPORARY_GLOBS for p in path.glob(pattern))
        for tmp in stale:
            tmp.unlink()
        if stale:
            log(f"[train] removed {len(stale)} unfinished temporary file(s) of an interrupted save: "
                + ", ".join(p.name for p in stale))
    except OSError as exc:
        folder.release()
        raise _not_writable(path, exc) from None
    except CCSError:
        folder.release()
        raise
    return folder


@contextlib.contextmanager
def run_folder(cfg: Config, env: DistEnv, stop: GracefulStop, *, resume: bool, overwrite: bool, run_id: str):
    """``train.out_dir`` claimed for the run (``claim_run_folder`` on rank 0; a refusal is
    raised on every rank) and released on exit; yields the RunFolder (None off rank 0)."""
    out_dir = Path(cfg.train.out_dir)
    folder = on_main_rank(env, lambda: claim_run_folder(out_dir, resume=resume, overwrite=overwrite, run_id=run_id))
    if folder is not None:
        stop.on_hard_exit(folder.clean_up_now)
    try:
        yield folder
    finally:
        if folder is not None:
            folder.release()


def open_outputs(cfg: Config, env: DistEnv, run_id: str, step: int, resumed: bool) -> tuple[MetricsLogger, int]:
    """``config.yaml`` written, ``metrics.jsonl`` cut back to ``step`` when ``resumed``, the
    metrics writers opened (TensorBoard purges its events after ``step``) on rank 0; a disabled
    logger elsewhere. Returns (the logger, the number of metrics records moved aside)."""
    out_dir = Path(cfg.train.out_dir)

    def open_on_main():
        save_config(cfg, out_dir / CONFIG_FILE)
        moved = truncate_metrics(out_dir, step) if resumed else 0
        logger = MetricsLogger(out_dir, tensorboard=cfg.train.tensorboard, run_id=run_id,
                               purge_step=step + 1 if resumed else None)
        return logger, moved

    opened = on_main_rank(env, open_on_main)
    return opened if env.is_main else (MetricsLogger(out_dir, enabled=False), 0)

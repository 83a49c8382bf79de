"""Stopping on a scheduler's signal, and child processes that end with their parent.

``GracefulStop`` turns SIGTERM (what Slurm, Kubernetes and most batch schedulers send before
SIGKILL), SIGINT (Ctrl-C) and SIGUSR1 (Slurm's ``--signal``, Lightning's requeue signal)
into a request the training loop reads at its next step boundary (``requested``); the trainer
then writes a resumable checkpoint and ends with ``exit_code`` = 128 + the signal's number
(143 for SIGTERM, 130 for SIGINT, 138 for SIGUSR1), the status a shell and torchrun report
for a process ended by that signal, so a scheduler sees an interrupted job, not a finished one.

The wait is bounded: when no step boundary comes within ``timeout_s`` of the first signal,
and at once on a second signal, the main thread is interrupted with ``SignalExit`` (a
KeyboardInterrupt), which unwinds through every ``finally`` (the run folder's lock is released,
a half-written temporary file removed) without a new checkpoint. Should the main thread not
run Python code for ``HARD_EXIT_S`` more seconds (stuck in a native call), the registered
``on_hard_exit`` cleanups run on the timer thread and the process exits with ``os._exit``.

Handlers are installed only in the main thread of the main interpreter and put back on exit.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from typing import Callable, Optional

STOP_SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGINT", None),
                                 getattr(signal, "SIGUSR1", None)) if s is not None)
HARD_EXIT_S = 10.0  # after the interrupt, how long the main thread gets to unwind


def exit_code(signum: int) -> int:
    """128 + the signal number: the exit status a shell shows for a process the signal ended."""
    return 128 + int(signum)


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class SignalExit(KeyboardInterrupt):
    """A second signal, or no step boundary in time: unwind now, without a new checkpoint."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
        self.exit_code = exit_code(signum)


class GracefulStop:
    """``with GracefulStop(timeout_s) as stop: ... if stop.requested: ...`` (see the module
    docstring). ``stop.signum`` is the first signal received, ``stop.elapsed()`` the seconds
    since it came. ``stop.boundary_reached()`` cancels the timeout once the loop has stopped
    at a step boundary (the checkpoint write that follows is not cut short)."""

    def __init__(self, timeout_s: float = 20.0, what: str = "training"):
        self.timeout_s = float(timeout_s)
        self.what = what
        self.signum: Optional[int] = None
        self.received_at: Optional[float] = None
        self._previous: dict = {}
        self._timers: list[threading.Timer] = []
        self._cleanups: list[Callable[[], None]] = []
        self._forced: Optional[str] = None
        self._lock = threading.Lock()

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def elapsed(self) -> float:
        return 0.0 if self.received_at is None else time.monotonic() - self.received_at

    def on_hard_exit(self, cleanup: Callable[[], None]) -> None:
        """Run ``cleanup`` (on the timer thread) before a hard exit."""
        self._cleanups.append(cleanup)

    # -- handlers --------------------------------------------------------------------
    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                try:
                    self._previous[signum] = signal.signal(signum, self._handle)
                except (ValueError, OSError):  # not the main interpreter
                    pass
        return self

    def __exit__(self, *exc) -> None:
        self.boundary_reached()
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self._forced is not None:
            raise SignalExit(self._forced, self.signum or signum)
        if self.signum is None:
            self.signum, self.received_at = signum, time.monotonic()
            self._arm(self.timeout_s, self._interrupt)
            return
        raise SignalExit(f"{signal_name(signum)} received again: {self.what} ended at once, without a new "
                         "checkpoint", signum)

    def _arm(self, seconds: float, action) -> None:
        timer = threading.Timer(seconds, action)
        timer.daemon = True
        with self._lock:
            self._timers.append(timer)
        timer.start()

    def boundary_reached(self) -> None:
        with self._lock:
            timers, self._timers = self._timers, []
        for timer in timers:
            timer.cancel()

    def _interrupt(self) -> None:
        """The timeout: interrupt the main thread (through ``_handle``), and exit hard if it
        does not unwind in HARD_EXIT_S."""
        self._forced = (f"{signal_name(self.signum)}: no step boundary within {self.timeout_s:g} s "
                        f"(train.stop_timeout_s); {self.what} ended without a new checkpoint")
        self._arm(HARD_EXIT_S, self._hard_exit)
        # a real signal to the main thread: it also breaks a blocking call (sleep, a queue wait)
        signal.pthread_kill(threading.main_thread().ident, self.signum)

    def _hard_exit(self) -> None:
        for cleanup in self._cleanups:
            try:
                cleanup()
            except Exception:  # noqa: BLE001 - best effort on the way out
                pass
        print(f"ccs-fast: {self._forced}; the main thread did not unwind in {HARD_EXIT_S:g} s", file=sys.stderr,
              flush=True)
        os._exit(exit_code(self.signum))


# ---------------------------------------------------------------------------- child processes

_PR_SET_PDEATHSIG = 1


def end_with_parent(parent_pid: Optional[int] = None, sig: int = signal.SIGKILL) -> bool:
    """Ask Linux to send ``sig`` to this process when its parent ends (``prctl
    PR_SET_PDEATHSIG``); True when it was set. Called in a freshly started child (a loader
    worker, a prepare pool worker), so a killed parent leaves no orphans running; with
    ``parent_pid``, a child whose parent has already gone ends at once."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        ok = libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False
    if ok and parent_pid is not None and os.getppid() != parent_pid:  # gone before the call
        os._exit(1)
    return ok


def ignore_stop_signals(parent_pid: Optional[int] = None) -> None:
    """Leave SIGINT, SIGTERM and SIGUSR1 to the parent (a child process's own handling would
    kill it mid-batch when a terminal or a scheduler signals the whole process group; the
    parent stops it in order, and ``end_with_parent`` covers a parent that dies).

    With ``parent_pid`` (Linux), a SIGTERM that the parent itself sends still ends the child
    at once: ``multiprocessing``'s ``terminate()``, which torch uses for a worker that did not
    stop in time and which Python's exit runs on every daemonic child left before joining it.
    An ignored SIGTERM there would make the parent wait for ever at exit. SIGTERM is blocked
    and a daemon thread takes it with ``sigwaitinfo``, which tells who sent it."""
    ignored = STOP_SIGNALS
    watch = parent_pid is not None and sys.platform.startswith("linux") and hasattr(signal, "sigwaitinfo")
    if watch:
        ignored = tuple(s for s in STOP_SIGNALS if s != signal.SIGTERM)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        threading.Thread(target=_exit_on_sigterm_from, args=(parent_pid,), daemon=True,
                         name="sigterm-from-parent").start()
    for signum in ignored:
        try:
            signal.signal(signum, signal.SIG_IGN)
        except (ValueError, OSError):
            pass


def _exit_on_sigterm_from(parent_pid: int) -> None:
    while True:
        info = signal.sigwaitinfo({signal.SIGTERM})
        if info.si_pid == parent_pid:
            os._exit(128 + signal.SIGTERM)

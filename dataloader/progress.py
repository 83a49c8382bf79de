"""Progress of every long step (``synth``, ``prepare``, ``eval``, ``predict``): one helper.

On a terminal it is a tqdm bar. Off a terminal (a log file, ``nohup``, CI), where a
carriage-return bar would fill the log with one overwritten line, it prints plain lines
``<desc>: <done>/<total> <unit> (<rate>, ETA h:mm:ss)`` from a timer thread at least every
``interval`` seconds (30 by default) whether or not work finished in between, and a last
line ``(<rate>, h:mm:ss in all)`` when it closes.
The rate is given in the unit that keeps it readable (``2.3 videos/s``, ``4.1 videos/min``,
``0.8 videos/h``); before the first item is done there is no rate and no ETA.
"""
from __future__ import annotations

import sys
import threading
import time


def format_clock(seconds: float) -> str:
    """``h:mm:ss`` (``0:04:05``; ``27:46:40`` past a day)."""
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def format_rate(count: float, seconds: float, unit: str) -> str:
    """``count`` per ``seconds`` as ``x.x <unit>/s``, ``/min`` or ``/h``: the first whose
    figure is at least 1 (``/h`` below one an hour)."""
    per_second = count / max(seconds, 1e-9)
    for scale, name in ((1, "s"), (60, "min"), (3600, "h")):
        value = per_second * scale
        if value >= 1 or name == "h":
            digits = 0 if value >= 100 else 1 if value >= 10 else 2
            return f"{value:.{digits}f} {unit}/{name}"
    raise AssertionError("unreachable")


class Progress:
    """``update(n)`` per finished item, ``write(line)`` for a message, ``close()`` at the
    end (or use it as a context manager). ``unit``: what is counted, plural (``videos``,
    ``pairs``); ``stream``: default stderr; ``enabled=False``: silent."""

    def __init__(self, total: int, desc: str, unit: str = "videos", enabled: bool = True,
                 stream=None, interval: float = 30.0):
        self.total, self.desc, self.unit, self.done = int(total), desc, unit, 0
        self.stream = stream or sys.stderr
        self.enabled, self.interval = enabled, interval
        self._bar = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._timer = None
        self._start = time.perf_counter()
        if not enabled:
            return
        if _isatty(self.stream):
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, desc=desc, unit=unit.rstrip("s") or unit,
                             file=self.stream, dynamic_ncols=True)
        else:
            self._timer = threading.Thread(target=self._tick, name=f"progress-{desc}", daemon=True)
            self._timer.start()

    def status(self, final: bool = False) -> str:
        """The line printed off a terminal."""
        elapsed = time.perf_counter() - self._start
        head = f"{self.desc}: {self.done}/{self.total} {self.unit}"
        if final:
            rate = f"{format_rate(self.done, elapsed, self.unit)}, " if self.done else ""
            return f"{head} ({rate}{format_clock(elapsed)} in all)"
        if not self.done:
            return f"{head} (none done yet after {format_clock(elapsed)}; no rate or ETA yet)"
        eta = (self.total - self.done) * elapsed / self.done
        return f"{head} ({format_rate(self.done, elapsed, self.unit)}, ETA {format_clock(eta)})"

    def _tick(self) -> None:
        while not self._stop.wait(self.interval):
            self._print(self.status())

    def _print(self, line: str) -> None:
        with self._lock:
            print(line, file=self.stream, flush=True)

    def update(self, n: int = 1) -> None:
        with self._lock:
            self.done += n
        if self._bar is not None:
            self._bar.update(n)

    def write(self, line: str) -> None:
        if self._bar is not None:
            self._bar.write(line, file=self.stream)
        else:
            self._print(line)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._timer is not None:
            self._stop.set()
            self._timer.join()
            self._timer = None
            self._print(self.status(final=True))

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


# ``synth`` and ``prepare`` count videos
VideoProgress = Progress

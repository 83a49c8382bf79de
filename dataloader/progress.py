"""Progress of ``synth`` and ``prepare``: a tqdm bar on a terminal, plain lines elsewhere.

Off a terminal (a log file, ``nohup``, CI) a carriage-return bar fills the log with one
overwritten line; there a line ``<desc>: <done>/<total> videos (<rate>/s, ETA <time>)`` is
printed at every tenth of the work (and at the end) instead.
"""
from __future__ import annotations

import sys
import time


class VideoProgress:
    """``update()`` per finished video, ``write(line)`` for a message, ``close()`` at the end."""

    def __init__(self, total: int, desc: str, enabled: bool = True, stream=None):
        self.total, self.desc, self.done = total, desc, 0
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self._bar = None
        self._start = time.perf_counter()
        self._next = self._step()
        if enabled and self.stream.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit="video", file=self.stream)

    def _step(self) -> int:
        return min(self.total, self.done + max(1, -(-self.total // 10)))

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.enabled and self.done >= self._next:
            elapsed = time.perf_counter() - self._start
            rate = self.done / max(elapsed, 1e-9)
            eta = (self.total - self.done) / max(rate, 1e-9)
            print(f"{self.desc}: {self.done}/{self.total} videos ({rate:.2f}/s, ETA {eta:.0f} s)",
                  file=self.stream, flush=True)
            self._next = self._step()

    def write(self, line: str) -> None:
        if self._bar is not None:
            self._bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

"""Reading a stage's log: the ``skip <part>: <why>`` lines of the benchmarks and the counts of a
``pytest -v`` run, complete or cut short."""
from __future__ import annotations

import re


SKIP_LINE = re.compile(r"^skip ([\w.-]+): (.+)$", re.M)  # what a benchmark left out, and why


def parse_skips(text: str) -> list[str]:
    """``"part: why"`` of each ``skip <part>: <why>`` line a benchmark printed (bench_flow names
    the missing package; bench_loader "skip dali-gpu: nvidia-dali is not installed")."""
    found = []
    for part, why in SKIP_LINE.findall(text):
        if f"{part}: {why}" not in found:
            found.append(f"{part}: {why.strip()}")
    return found


TEST_LINE = re.compile(r"^(\S+::.*?) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")
COLLECTED = re.compile(r"(\d+)(?:/\d+)? tests? collected")


def parse_pytest_log(text: str) -> dict:
    """Counts of a ``pytest -v`` log (complete or cut short) and the failing test ids."""
    counts = {"passed": 0, "failed": 0, "error": 0, "skipped": 0, "xfail": 0, "xpass": 0}
    failing = []
    for line in text.splitlines():
        m = TEST_LINE.match(line)
        if m:
            counts[m.group(2).lower() if m.group(2) != "ERROR" else "error"] += 1
            if m.group(2) in ("FAILED", "ERROR"):
                failing.append(m.group(1))
    collected = [int(n) for n in COLLECTED.findall(text)]
    if collected:
        counts["collected"] = collected[-1]
    errors = re.findall(r"^ERROR (\S+)", text, re.M)  # collection errors: no per-test line
    new = [e for e in errors if e not in failing]
    counts["error"] += len(new)
    failing += new
    return {**counts, "failing": failing}


"""Running a stage: its commands as subprocesses in their own process group, output appended to
the stage's log, stopped when its budget runs out, and what it left (rows appended, skip lines,
test counts) in a ``StageResult``."""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.gpu.logs import parse_pytest_log, parse_skips
from bench.gpu.plan import REPO, Stage, Step

KILL_GRACE_S = 3  # between SIGTERM and SIGKILL of a stage that overran its budget


@dataclass
class Run:
    dry_run: bool
    python: str
    out: Path  # JSON rows and the summary
    work: Path  # logs and the generated rawframes
    logs: Path
    wheelhouse: Path
    deadline: float  # time.monotonic() by which every stage has stopped
    stretch: float = 1.0  # dry run on a busy machine: every budget times this (dry_run_stretch)
    kit_dir: Path | None = None  # --kit: the parts of `make gpu-kit`
    kit_target: Path | None = None  # where the kit stage installs them (a temporary folder)
    kit: dict | None = None  # the kit stage's report (bench.kit's kit.json), once it ran

    def budget(self, stage: Stage) -> float:
        return (stage.dry_budget_s if self.dry_run else stage.budget_s) * self.stretch

    def load_kit(self) -> None:
        """Read what the kit stage installed (nothing when it did not run or wrote no report)."""
        if self.kit_target is not None:
            try:
                self.kit = json.loads((self.kit_target / "kit.json").read_text())
            except (OSError, ValueError):
                self.kit = None

    def env(self, stage: Stage | None = None) -> dict:
        """The stages' environment: the kit's folder first on PYTHONPATH, and for a stage that
        compares with OpenCV's TV-L1 (``stage.opencv``) the kit's opencv-contrib before it."""
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        paths = list((self.kit or {}).get("pythonpath") or [])
        if stage is not None and stage.opencv and (self.kit or {}).get("cv2_path"):
            paths.insert(0, self.kit["cv2_path"])
        if paths:
            env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in [env.get("PYTHONPATH")] if p])
        return env

    def wheels_to_install(self) -> list[str]:
        """Wheels in the wheelhouse whose distribution is not installed in this Python (any
        version): the machine's own packages are never replaced."""
        from importlib import metadata

        wanted = []
        for wheel in sorted(self.wheelhouse.glob("*.whl")):
            name = wheel.name.split("-")[0]
            try:
                metadata.distribution(name)
            except metadata.PackageNotFoundError:
                wanted.append(str(wheel))
        return wanted

    def resolve(self, step: Step) -> list[str] | None:
        """The step's argv, or None when it has nothing to do (no wheels to install)."""
        argv = []
        for arg in (*step.argv, *(step.dry if self.dry_run else step.gpu)):
            if arg == "{wheels}":
                wheels = self.wheels_to_install()
                if not wheels:
                    return None
                argv += wheels
            else:
                for key, value in (("{python}", self.python), ("{out}", self.out), ("{work}", self.work),
                                   ("{kit}", self.kit_dir), ("{kit_target}", self.kit_target)):
                    arg = arg.replace(key, str(value))
                argv.append(arg)
        return argv


@dataclass
class StageResult:
    name: str
    status: str  # ok | failed | timeout | skipped
    wall_s: float = 0.0
    budget_s: float = 0.0
    rc: int | None = None
    note: str = ""
    rows: dict[str, int] = field(default_factory=dict)  # result file name -> rows appended
    tests: dict | None = None
    log: str | None = None
    skipped: list[str] = field(default_factory=list)  # "part: why" of each `skip <part>: <why>` line of its log


def count_rows(out: Path) -> dict[str, int]:
    counts = {}
    for path in sorted(out.glob("*.json")):
        try:
            counts[path.name] = len(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return counts


def run_logged(argv: list[str], log: Path, timeout: float, env: dict | None = None) -> tuple[int | None, bool]:
    """Run ``argv`` in its own process group, output appended to ``log``. (exit status, timed out)."""
    env = env or dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log, "a") as f:
        f.write(f"$ {shlex.join(argv)}\n")
        f.flush()
        proc = subprocess.Popen(argv, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            return proc.wait(timeout=max(timeout, 0.1)), False
        except subprocess.TimeoutExpired:
            _stop(proc)
            f.write(f"\n[bench.gpu] stopped: the stage's time budget ran out after {timeout:.0f} s\n")
            return None, True
        except BaseException:
            _stop(proc)
            raise


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the whole group (DataLoader workers included), SIGKILL after KILL_GRACE_S."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=KILL_GRACE_S)
            return
        except subprocess.TimeoutExpired:
            continue

def run_stage(stage: Stage, run: Run) -> StageResult:
    budget = run.budget(stage)
    log = run.logs / f"{stage.name}.log"
    result = StageResult(stage.name, "ok", budget_s=budget, log=repo_relative(log))
    start = time.monotonic()
    reason = stage.skip(run)
    if reason:
        result.status, result.note = "skipped", reason
        result.wall_s = round(time.monotonic() - start, 1)
        return result
    end = run.deadline if stage.fill else min(start + budget, run.deadline)
    result.budget_s = round(end - start, 1)
    before = count_rows(run.out)
    log.write_text("")
    ran = 0
    for step in stage.steps:
        argv = run.resolve(step)
        if argv is None:
            continue
        left = end - time.monotonic()
        if left <= 1:
            result.status, result.note = "timeout", "no time left for its remaining commands"
            break
        rc, timed_out = run_logged(argv, log, left, run.env(stage))
        ran += 1
        if timed_out:
            result.status = "timeout"
            break
        result.rc = rc if result.rc in (None, 0) else result.rc
        if rc != 0 and not (stage.kind == "tests" and rc == 5):  # 5: pytest selected no test
            result.status = "failed"
    result.wall_s = round(time.monotonic() - start, 1)
    after = count_rows(run.out)
    result.rows = {name: n - before.get(name, 0) for name, n in after.items() if n > before.get(name, 0)}
    text = log.read_text(errors="replace")
    result.skipped = parse_skips(text)
    if result.skipped and not result.note:
        result.note = "skipped " + "; ".join(result.skipped)
    if stage.kind == "tests":
        result.tests = parse_pytest_log(text)
        if result.tests["failed"] or result.tests["error"]:
            result.status = "failed" if result.status != "timeout" else result.status
    if not ran and result.status == "ok":
        result.status, result.note = "skipped", "nothing to do"
    return result


def repo_relative(path: Path) -> str:
    """A path relative to the repository when it lies inside it (the summary is committed)."""
    try:
        return str(path.relative_to(REPO))
    except ValueError:
        return str(path)


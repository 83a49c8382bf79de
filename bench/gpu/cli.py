"""``python -m bench.gpu``: the command line, and the run from the first stage to the summary."""
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import os
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import bench.gpu
from bench.gpu.plan import (DRY_POINTS, DRY_TOTAL_BUDGET_S, GPU_POINTS, OVERHEAD_S, PLAN, REPO, RESULTS_DIR,
                            TOTAL_BUDGET_S, Points, Stage, check_budgets, dry_run_stretch, plan_table)
from bench.gpu.runner import Run, StageResult, count_rows, run_stage
from bench.gpu.summary import write_summary


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.gpu", description=bench.gpu.__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="the same plan on CPU at toy sizes, into a temporary folder")
    p.add_argument("--plan", action="store_true", help="print the plan and its budgets, run nothing")
    p.add_argument("--stages", default=None,
                   help="comma list of stages to run (default: all); e2e reads the rawframes the loader stage "
                        "leaves in <work>/rawframes")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON rows and the summary (default bench/results/; a new temporary folder with --dry-run)")
    p.add_argument("--work", type=Path, default=None,
                   help="logs and generated rawframes (default runs/gpu/; <out>/work with --dry-run)")
    p.add_argument("--wheelhouse", type=Path, default=REPO / "wheelhouse")
    p.add_argument("--kit", type=Path, default=None,
                   help="a folder of `make gpu-kit` parts (README, \"Taking the GPU figures\"): the complete "
                        "wheels are installed into a temporary folder on the stages' PYTHONPATH")
    return p.parse_args(argv)


class UsageError(Exception):
    """Bad arguments, or a GPU run without a CUDA device: one line on stderr, exit status 2."""


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        check_budgets()
    except ValueError as e:
        print(f"bench.gpu: {e}", file=sys.stderr)
        return 2
    if args.plan:
        print(plan_table())
        return 0
    try:
        stages = select_stages(args)
        session = start(args, argv)
    except UsageError as e:
        print(f"bench.gpu: {e}", file=sys.stderr)
        return 2
    results, text = run_stages(stages, session)
    if session.run.kit_target is not None:
        shutil.rmtree(session.run.kit_target, ignore_errors=True)
    print("\n" + text)
    print(f"summary: {session.summary}")
    failed = failed_stages(results, session.run.dry_run)
    if failed:
        print(f"bench.gpu: failed: {', '.join(failed)} (logs in {session.run.logs})", file=sys.stderr)
        return 1
    return 0


def select_stages(args) -> list[Stage]:
    """The plan's stages ``--stages`` names (all by default; ``kit`` whenever ``--kit`` is given)."""
    stages = list(PLAN)
    if args.stages:
        names = args.stages.split(",")
        unknown = sorted(set(names) - {s.name for s in PLAN})
        if unknown:
            raise UsageError(f"unknown stages {unknown}; the plan has {[s.name for s in PLAN]}")
        stages = [s for s in PLAN if s.name in names or (s.name == "kit" and args.kit is not None)]
    if args.kit is not None and not (args.kit / "manifest.json").is_file():
        raise UsageError(f"--kit {args.kit}: no manifest.json there (make it with `make gpu-kit`)")
    return stages


@dataclass
class Session:
    """One ``python -m bench.gpu`` run: the stages' ``Run`` and what the rows and the summary need."""

    run: Run
    points: Points
    total_s: int  # the run's budget before stretching
    started: float  # time.monotonic() at the start
    env: dict  # device, versions, date and command: in every row of gpu-<device>.json
    start_counts: dict[str, int]  # rows per result file before the run
    rows: Path  # <out>/gpu-<device>.json, one row per stage
    summary: Path  # <out>/gpu-summary-<device>.md

    def write_summary(self, results: list[StageResult], not_run: list[str] = ()) -> str:
        return write_summary(self.run, results, self.points, self.start_counts, self.env,
                             time.monotonic() - self.started, self.summary, not_run=not_run)


def start(args, argv) -> Session:
    """The folders, the deadline and the device of the run (CPU at toy sizes with ``--dry-run``)."""
    started = time.monotonic()
    import torch

    from bench import common

    if args.dry_run:
        out = args.out or Path(tempfile.mkdtemp(prefix="ccs-gpu-dry-run-"))
        if out.resolve() == RESULTS_DIR.resolve():
            raise UsageError("--dry-run writes toy figures; give it an --out other than bench/results/")
        work = args.work or out / "work"
        device, points, total = "cpu", DRY_POINTS, DRY_TOTAL_BUDGET_S
        stretch = dry_run_stretch()
        os.environ.setdefault("TRITON_INTERPRET", "1")
    else:
        if not torch.cuda.is_available():
            raise UsageError("no CUDA device here (python -m bench.gpu --dry-run runs the plan on CPU)")
        out, work = args.out or RESULTS_DIR, args.work or REPO / "runs" / "gpu"
        device, points, total = "cuda", GPU_POINTS, TOTAL_BUDGET_S
        stretch = 1.0
    logs = work / _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    for folder in (out, logs):
        folder.mkdir(parents=True, exist_ok=True)
    run = Run(dry_run=args.dry_run, python=sys.executable, out=out.resolve(), work=work.resolve(),
              logs=logs.resolve(), wheelhouse=args.wheelhouse.resolve(),
              deadline=started + (total - OVERHEAD_S) * stretch, stretch=stretch,
              kit_dir=args.kit.resolve() if args.kit else None,
              kit_target=Path(tempfile.mkdtemp(prefix="ccs-gpu-kit-")) if args.kit else None)
    env = {**common.env_info(device), "command": shlex.join(["python", "-m", "bench.gpu", *(argv or sys.argv[1:])])}
    slug = common.slug(env["device"])
    session = Session(run, points, total, started, env, count_rows(run.out), rows=run.out / f"gpu-{slug}.json",
                      summary=run.out / f"gpu-summary-{slug}.md")
    print(f"bench.gpu: {env['device']}{' (dry run)' if run.dry_run else ''}; results in {run.out}, logs in {run.logs}"
          + (f"; budgets stretched ×{stretch:.2f} for the machine's load" if stretch > 1 else ""), flush=True)
    return session


def run_stages(stages: list[Stage], session: Session) -> tuple[list[StageResult], str]:
    """Each stage in turn; after every stage its row and the summary of every figure so far (a
    run cut off keeps them). Returns the results and the last summary's text."""
    from bench import common

    run = session.run
    results: list[StageResult] = []
    for i, stage in enumerate(stages, 1):
        if run.dry_run:  # other jobs may load the machine more than when the run started
            later = dry_run_stretch()
            if later > run.stretch:
                run.deadline += (session.total_s - OVERHEAD_S) * (later - run.stretch)
                run.stretch = later
        print(f"[{i}/{len(stages)}] {stage.name} (budget {run.budget(stage):.0f} s"
              f"{' + time left' if stage.fill else ''}) ...", end=" ", flush=True)
        try:
            result = run_stage(stage, run)
        except Exception as e:  # noqa: BLE001 - the harness's own failure in one stage: the next stages still run
            result = StageResult(stage.name, "failed", note=f"bench.gpu: {type(e).__name__}: {e}")
        results.append(result)
        if stage.name == "kit":
            run.load_kit()
        print(stage_line(result), flush=True)
        common.append_rows(session.rows, [
            {**dataclasses.asdict(result), "dry_run": run.dry_run, "stretch": round(run.stretch, 2),
             "run_wall_s": round(time.monotonic() - session.started, 1), **session.env}])
        text = session.write_summary(results, not_run=[s.name for s in stages[i:]])
    if not stages:
        text = session.write_summary(results)
    return results, text


def stage_line(result: StageResult) -> str:
    """How a stage ended, for the console: status, wall time, rows appended or test counts, note."""
    detail = ", ".join(f"{n} rows to {name}" for name, n in result.rows.items())
    if result.tests:
        t = result.tests
        detail = f"{t['passed']} passed, {t['failed']} failed, {t['error']} errors, {t['skipped']} skipped" + (
            f", {t['collected']} collected" if "collected" in t else "")
    return (f"{result.status} in {result.wall_s:.0f} s" + (f": {detail}" if detail else "")
            + (f" ({result.note})" if result.note else ""))


def failed_stages(results: list[StageResult], dry_run: bool) -> list[str]:
    """Stages that make the run fail: a crash, a failing test (also in a test stage cut short by
    its budget), and in the dry run a stage that overran its budget."""
    return [r.name for r in results if r.status == "failed" or (dry_run and r.status == "timeout")
            or (r.tests and (r.tests["failed"] or r.tests["error"]))]



"""Every SPEC §8 figure on one GPU machine in one command, inside 8 minutes (`make gpu`).

    python -m bench.gpu                  # on the GPU machine, from the repository root
    python -m bench.gpu --dry-run        # the same plan on CPU at toy sizes (part of `make test`)
    python -m bench.gpu --plan           # print the plan and its time budgets
    python -m bench.gpu --stages e2e,grid   # rerun some stages
    python -m bench.gpu --kit .device_wheels   # with the parts of `make gpu-kit` that arrived

The plan (``PLAN``) is data: a list of stages, each a few commands with the arguments they
take on the GPU and in the dry run, a GPU time budget and a dry-run budget. Each command runs
as a subprocess of the machine's own Python, its output appended to
``<work>/<UTC time>/<stage>.log``;
when a stage's budget runs out its process group is stopped, the stage is recorded as
``timeout`` with the JSON rows it had appended so far (the benchmarks append row by row), and
the next stage starts. A stage that fails (or the harness failing in it) never stops the next
ones. The stages, in order of value, so that a run cut short keeps the most useful figures:

1. ``kit`` (only with ``--kit DIR``): ``bench.kit`` checks the parts of ``make gpu-kit`` that
   arrived (SHA-256), joins the complete wheels and installs them with ``pip install --no-deps
   --no-index --target`` into a temporary folder that goes on ``PYTHONPATH`` of every later
   stage; opencv-contrib into a folder of its own, first on the path of the two test stages and
   ``flow`` only (``Stage.opencv``), where the machine's cv2 lacks ``cv2.optflow``.
2. ``setup``: installs the wheels of ``wheelhouse/`` whose distributions are not installed yet
   (``pip install --no-index --no-deps``: the machine's torch, numpy and OpenCV stay as they
   are), then the checkout (``pip install --no-deps --no-build-isolation --no-index -e .``).
3. ``cuda-tests`` (``pytest -m cuda``) and ``kernel-tests`` (the kernel test files, which run on
   the CUDA device when there is one): Triton against the eager references, forward and
   backward, fp32/fp16/bf16. A failure makes the command exit non-zero; the benchmarks still run.
4. ``attention-targets``, ``loss-targets``: the kernel benchmarks at the §8 target points.
5. ``e2e``: generates the 340×256 rawframes the later stages share, then (b), (c), (d) at
   ResNet-50, 224 px.
6. ``flow``: ``bench.bench_flow`` at 340×256: tvl1-torch pairs/s on CUDA with the Triton and
   the eager iteration, the CUDA flow against the CPU path on the same pairs, and where
   ``cv2.optflow`` imports, agreement with OpenCV and OpenCV's pairs/s.
7. ``loader``: the torch DataLoader on the rawframes.
8. ``dali`` (only where ``nvidia.dali`` imports): the DALI loader rows and e2e (a).
9. ``grid``: the wider kernel and loss sweeps, for whatever time the earlier stages left.

What a stage leaves out for a missing package is a ``skip <part>: <why>`` line in its log
(bench_flow names ``opencv-contrib-python-headless``); those lines, and a stage skipped for a
missing package, go into its row and the summary. The summary,
``<out>/gpu-summary-<device>.md``, is rewritten after every stage (the stages not reached yet
listed as such): each §8 target with the measured value and pass/fail, the tests, every kernel
row with its TFLOP/s or GB/s and the fraction of the device's datasheet peak (``PEAKS``), what
was not measured for a missing package, and what the kit installed. One row per stage goes to
``<out>/gpu-<device>.json`` as each stage ends.

On the GPU, ``<out>`` is ``bench/results/`` and ``<work>`` is ``runs/gpu/`` (git-ignored:
logs and the generated rawframes, reused by the next run). The budgets add up to at most
``TOTAL_BUDGET_S`` with ``OVERHEAD_S`` kept for start-up, the summary and stopping timed-out
stages; a run also stops every stage at that deadline. ``grid`` may use the time earlier
stages left unused. The GPU budgets are estimates that no GPU run has checked yet; the
``gpu-<device>.json`` rows of the first run give each stage's real time.

``--dry-run`` runs the same stages on CPU: the kernels in the Triton interpreter at toy sizes,
e2e with timm's ``test_resnet`` at 32 px, the kernel tests collected but not run (``make
test`` runs them itself), the flow's Triton iteration in the interpreter against the CPU path
with few iterations, no DALI stage, pip with ``--dry-run``. Its results go to a
temporary folder (never ``bench/results/``), and it fails if any stage fails or overruns its
dry budget, so that the command cannot rot between GPU visits. On a machine other jobs keep
busy the dry budgets stretch by the load average per core (``dry_run_stretch``). Measured on the 2-core CPU
machine: 46 s with torch 2.14 / triton 3.8 (Python 3.11), 52 s with torch 2.11 / triton 3.6
(Python 3.12, ``make compat``). With the present plan, under ``bench/bare_image`` (no PyAV,
DALI or cv2.optflow) and a load average of 2.6–4.5 from other jobs: 73 s (stretch ×1.31;
e2e 18 s, flow 9 s, loader 5 s, cuda-tests 12 s, grid 12 s); in ``make compat-bare``'s venv
(Python 3.12, torch 2.11, triton 3.6, no PyAV, DALI or opencv-contrib installed) 92 s at a
load average of 8 (stretch ×4.0).

``python -m bench.gpu --dry-run`` under ``PYTHONPATH=bench/bare_image`` is what ``make test``
runs (``bench/test_gpu.py``): a stage that imports what the bare GPU image lacks without a
skip fails there.

Exit status: 0; 1 when a test failed or a stage crashed (and, in the dry run, overran); 2 for
bad arguments or a GPU run without a CUDA device.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[2]
RESULTS_DIR = REPO / "bench" / "results"

TOTAL_BUDGET_S = 480  # SPEC §5: every §8 figure in ≤ 8 minutes on one GPU machine, set-up included
DRY_TOTAL_BUDGET_S = 120  # the dry run is part of `make test`
OVERHEAD_S = 15  # Python start-up, the summary, and KILL_GRACE_S for each stage that overruns
KILL_GRACE_S = 3  # between SIGTERM and SIGKILL of a stage that overran its budget

KERNEL_TESTS = ("tests/test_cross_attention.py", "tests/test_triplet.py", "tests/test_center.py",
                "tests/test_losses.py", "tests/test_tvl1.py")

# (fragment of torch.cuda.get_device_name, dense bf16 tensor-core TFLOP/s, HBM TB/s); first
# match wins. NVIDIA datasheets; "dense" is half the figure quoted with 2:4 sparsity.
PEAKS = (
    ("H200 NVL", 835, 4.8),
    ("H200", 989, 4.8),
    ("H100 NVL", 835, 3.9),
    ("H100 PCIe", 756, 2.0),
    ("H100", 989, 3.35),  # SXM; torch names it "NVIDIA H100 80GB HBM3"
)


def device_peak(name: str) -> tuple[float, float] | None:
    """(dense bf16 TFLOP/s, HBM GB/s) of a device by name, or None when it is not in PEAKS."""
    for fragment, tflops, tbps in PEAKS:
        if fragment.lower() in name.lower():
            return float(tflops), tbps * 1e3
    return None


# ----------------------------------------------------------------------------- the plan

@dataclass(frozen=True)
class Points:
    """The shapes the §8 targets are read at: the targets themselves on a GPU, toy shapes in
    the dry run (with the kernels in the interpreter)."""

    device: str
    dtype: str
    attention_B: int
    attention_N: tuple[int, ...]  # N = N_f = N_o; speed-ups are checked at each, the % of peak at the last
    attention_features: int  # d = e
    loss_B: int
    loss_D: int


GPU_POINTS = Points("cuda", "bfloat16", attention_B=32, attention_N=(588, 1225), attention_features=512,
                    loss_B=8192, loss_D=512)
DRY_POINTS = Points("cpu", "float32", attention_B=2, attention_N=(20, 33), attention_features=16,
                    loss_B=24, loss_D=16)


def _attention_args(p: Points) -> tuple[str, ...]:
    return ("--device", p.device, "--dtype", p.dtype, "--B", str(p.attention_B),
            "--N", ",".join(map(str, p.attention_N)), "--features", str(p.attention_features))


def _loss_args(p: Points) -> tuple[str, ...]:
    return ("--device", p.device, "--dtype", p.dtype, "--B", str(p.loss_B), "--D", str(p.loss_D))


@dataclass(frozen=True)
class Step:
    """One command: ``argv`` with ``{python}``, ``{out}``, ``{work}`` filled in at run time (and
    ``{wheels}`` by the wheels to install; the step is left out when there are none), followed
    by ``gpu`` or ``dry`` arguments."""

    argv: tuple[str, ...]
    gpu: tuple[str, ...] = ()
    dry: tuple[str, ...] = ()


@dataclass(frozen=True)
class Stage:
    name: str
    what: str
    budget_s: int  # on the GPU machine
    dry_budget_s: int  # in the dry run, on a 2-core CPU machine
    steps: tuple[Step, ...]
    kind: str = "bench"  # "setup" | "tests" | "bench"
    fill: bool = False  # may run until the run's deadline, using time earlier stages left
    skip: Callable[["Run"], str | None] = lambda run: None  # a reason to skip, asked when the stage starts
    opencv: bool = False  # compares with OpenCV's TV-L1: the kit's opencv-contrib goes first on its path


def _needs_dali(run: "Run") -> str | None:
    if run.dry_run:
        return "dry run: no DALI stage"
    try:
        probe = subprocess.run([run.python, "-c", "import nvidia.dali"], cwd=REPO, capture_output=True, text=True,
                               timeout=60, env=run.env())
    except subprocess.TimeoutExpired:
        return "needs nvidia-dali-cuda130: import nvidia.dali took over 60 s"
    if probe.returncode == 0:
        return None
    err = (probe.stderr.strip().splitlines() or ["?"])[-1]
    return f"needs nvidia-dali-cuda130 (`make gpu-kit`, then --kit): import nvidia.dali failed: {err}"


def _needs_kit(run: "Run") -> str | None:
    return None if run.kit_dir else "no --kit given"


PY = "{python}"
RAWFRAMES = ("--data", "{work}/rawframes", "--annotation", "{work}/rawframes/train_list.txt")
MAKE_RAWFRAMES = (PY, "-m", "bench.bench_loader", "--out", "{out}", "--make-into", "{work}/rawframes")
MAKE_GPU = ("--make", "256")  # 340×256 rawframe videos, 24 frames each
MAKE_DRY = ("--make", "4", "--frames", "8")
E2E_DRY = ("--device", "cpu", "--backbone", "timm:test_resnet", "--classes", "4", "--input-size", "32",
           "--batch-size", "4", "--steps", "2", "--log-interval", "1", "--warmup-logs", "0", "--workers", "1",
           "--test-segments", "1")
PYTEST = (PY, "-m", "pytest", "-v", "-rfE", "-p", "no:cacheprovider")
FLOW_DRY_PARAMS = "nscales=1,warps=1,outerIterations=1,innnerIterations=2"  # the interpreter: ~0.5 s per iteration

# In order of value: a run cut short keeps the first stages' figures (the summary is rewritten
# after every stage). `kit` and `setup` come first because the rest needs them.
PLAN: tuple[Stage, ...] = (
    Stage("kit", "--kit DIR: check the parts that arrived, join the complete wheels, install them into a "
          "temporary folder on the stages' PYTHONPATH (bench.kit)", budget_s=25, dry_budget_s=3, kind="setup",
          skip=_needs_kit, steps=(
              Step((PY, "-m", "bench.kit", "install", "{kit}", "--target", "{kit_target}")),
          )),
    Stage("setup", "the wheelhouse's missing wheels, then the checkout, into the machine's Python",
          budget_s=20, dry_budget_s=3, kind="setup", steps=(
              Step((PY, "-m", "pip", "install", "--no-index", "--no-deps", "{wheels}"), dry=("--dry-run",)),
              Step((PY, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "-e", "."),
                   dry=("--dry-run",)),
          )),
    Stage("cuda-tests", "pytest -m cuda: the autotuned and autocast cases on the device",
          budget_s=45, dry_budget_s=18, kind="tests", opencv=True, steps=(
              Step((*PYTEST, "-m", "cuda", "tests", "bench")),
          )),
    Stage("kernel-tests", "the kernel test files on the device: Triton vs eager, fwd and bwd, fp32/fp16/bf16",
          budget_s=45, dry_budget_s=8, kind="tests", opencv=True, steps=(
              Step((*PYTEST, "-m", "not cuda", *KERNEL_TESTS), dry=("--collect-only", "-q")),
          )),
    Stage("attention-targets", "cross_stream_attention fwd+bwd at B=32, N ∈ {588, 1225}, d=e=512, bf16; "
          "eager, compile, triton, sdpa", budget_s=80, dry_budget_s=12, steps=(
              Step((PY, "-m", "bench.bench_cross_attention", "--out", "{out}", "--modes", "full"),
                   gpu=_attention_args(GPU_POINTS),
                   dry=(*_attention_args(DRY_POINTS), "--providers", "eager,triton,sdpa", "--rep", "1")),
          )),
    Stage("loss-targets", "cross-modal triplet and center loss fwd+bwd at B=8192, D=512, bf16; eager, compile, triton",
          budget_s=40, dry_budget_s=8, steps=(
              Step((PY, "-m", "bench.bench_losses", "--out", "{out}", "--modes", "full",
                    "--ops", "cross_modal_triplet_loss,discriminative_embedding_loss"),
                   gpu=(*_loss_args(GPU_POINTS), "--providers", "eager,compile,triton"),
                   dry=(*_loss_args(DRY_POINTS), "--providers", "eager,triton", "--rep", "1")),
          )),
    Stage("e2e", "256 rawframe videos at 340×256 (kept for loader and dali), then trainer clips/s, ResNet-50 at "
          "224 px, batch 32: (b) CCS on synthetic tensors, (c) the backbones alone, (d) eager fp32 with the "
          "torch DataLoader", budget_s=110, dry_budget_s=25, steps=(
              Step((*MAKE_RAWFRAMES, "--backends="), gpu=MAKE_GPU, dry=MAKE_DRY),
              Step((PY, "-m", "bench.bench_e2e", "--out", "{out}", *RAWFRAMES,
                    "--cases", "ccs-synthetic,backbones-synthetic,eager-fp32-torch"),
                   gpu=("--device", "cuda", "--test-segments", "1"), dry=E2E_DRY),
          )),
    Stage("flow", "tvl1-torch at 340×256 with OpenCV's defaults: pairs/s on CUDA with the Triton and the eager "
          "iteration (128 pairs in batches of 64), agreement of the CUDA flow with the CPU path on the same pairs; "
          "where cv2.optflow imports (opencv-contrib: the kit) also agreement with OpenCV and the ground truth, "
          "and OpenCV's pairs/s (one process per core, 32 pairs)", budget_s=30, dry_budget_s=15, opencv=True,
          steps=(
              Step((PY, "-m", "bench.bench_flow", "--out", "{out}"),
                   gpu=("--skip", "cpu", "--pairs", "128", "--opencv-pairs", "32", "--batch", "64"),
                   dry=("--device", "cpu", "--height", "24", "--width", "32", "--pairs", "2",
                        "--batch", "2", "--params", FLOW_DRY_PARAMS)),
          )),
    Stage("loader", "clips/s of the torch DataLoader (every core) on the e2e stage's rawframes",
          budget_s=15, dry_budget_s=10, steps=(
              Step((*MAKE_RAWFRAMES, "--backends", "torch"),
                   gpu=(*MAKE_GPU, "--batch-size", "32", "--batches", "20"),
                   dry=(*MAKE_DRY, "--batch-size", "2", "--batches", "2", "--warmup", "1", "--workers", "1")),
          )),
    Stage("dali", "where nvidia.dali imports (nvidia-dali-cuda130: the kit): clips/s of the DALI loader "
          "(dali-gpu, dali-cpu), then (a) CCS with the DALI loader, ResNet-50 at 224 px", budget_s=45,
          dry_budget_s=0, skip=_needs_dali, steps=(
              Step((*MAKE_RAWFRAMES, "--backends", "dali-gpu,dali-cpu"),
                   gpu=(*MAKE_GPU, "--batch-size", "32", "--batches", "20")),
              Step((PY, "-m", "bench.bench_e2e", "--out", "{out}", *RAWFRAMES, "--cases", "ccs-dali"),
                   gpu=("--device", "cuda")),
          )),
    Stage("grid", "the wider sweeps: losses at B ∈ {512, 2048, 8192} × D ∈ {256, 2048}; attention bf16 at "
          "N ∈ {147, 588, 1225, 2352} × d=e ∈ {256, 1024}, fwd/bwd/full (no torch.compile: a compile per shape)",
          budget_s=10, dry_budget_s=3, fill=True, steps=(
              Step((PY, "-m", "bench.bench_losses", "--out", "{out}", "--modes", "full", "--providers", "eager,triton"),
                   gpu=("--device", "cuda", "--dtype", "bfloat16", "--B", "512,2048,8192", "--D", "256,2048"),
                   dry=("--device", "cpu", "--B", "24", "--D", "8", "--ops", "batch_hard_triplet_loss",
                        "--rep", "1")),
              Step((PY, "-m", "bench.bench_cross_attention", "--out", "{out}", "--providers", "triton,eager,sdpa"),
                   gpu=("--device", "cuda", "--dtype", "bfloat16", "--B", "32", "--N", "147,588,1225,2352",
                        "--features", "256,1024", "--modes", "full,fwd,bwd"),
                   dry=("--device", "cpu", "--B", "1", "--N", "20", "--features", "8", "--modes", "fwd,bwd",
                        "--providers", "eager,triton", "--rep", "1")),
          )),
)


def dry_run_stretch() -> float:
    """How much longer the dry run's budgets are on a machine other jobs keep busy: the 1-minute
    load average per core, at least 1, asked again before each stage (a stretch only grows
    during a run, and the run's deadline with it). The dry budgets are sized for an idle 2-core
    machine; the GPU budgets are never stretched."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return 1.0
    return max(1.0, load / (os.cpu_count() or 1))


def check_budgets(plan=PLAN) -> None:
    """The plan fits its deadlines: GPU budgets plus OVERHEAD_S within TOTAL_BUDGET_S, dry budgets
    plus OVERHEAD_S within DRY_TOTAL_BUDGET_S. Raises ValueError otherwise."""
    for label, total, budgets in (("GPU", TOTAL_BUDGET_S, [s.budget_s for s in plan]),
                                  ("dry-run", DRY_TOTAL_BUDGET_S, [s.dry_budget_s for s in plan])):
        if sum(budgets) + OVERHEAD_S > total:
            raise ValueError(f"the {label} budgets add up to {sum(budgets)} s + {OVERHEAD_S} s overhead "
                             f"> {total} s")
    names = [s.name for s in plan]
    if len(set(names)) != len(names):
        raise ValueError(f"stage names repeat: {names}")


def plan_table(plan=PLAN) -> str:
    lines = ["| stage | budget s (GPU) | budget s (dry run) | what |", "|---|---|---|---|"]
    for s in plan:
        budget = f"{s.budget_s} + time left" if s.fill else str(s.budget_s)
        lines.append(f"| `{s.name}` | {budget} | {s.dry_budget_s or 'skipped'} | {s.what} |")
    lines.append(f"| (start-up, summary, stopping overruns) | {OVERHEAD_S} | {OVERHEAD_S} | |")
    lines.append(f"| **total** | **{sum(s.budget_s for s in plan) + OVERHEAD_S}** (≤ {TOTAL_BUDGET_S}) "
                 f"| **{sum(s.dry_budget_s for s in plan) + OVERHEAD_S}** (≤ {DRY_TOTAL_BUDGET_S}) | |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- running it

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


def run_stage(stage: Stage, run: Run) -> StageResult:
    budget = run.budget(stage)
    log = run.logs / f"{stage.name}.log"
    result = StageResult(stage.name, "ok", budget_s=budget, log=_show(log))
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


# ----------------------------------------------------------------------------- the summary

def new_rows(out: Path, start_counts: dict[str, int], prefix: str) -> list[dict]:
    """Rows appended during this run to ``<out>/<prefix>-*.json``."""
    rows = []
    for path in sorted(out.glob(f"{prefix}-*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        rows += data[start_counts.get(path.name, 0):]
    return rows


DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


def loss_min_bytes(op: str, mode: str, B: int, D: int, dtype: str) -> int:
    """HBM bytes a loss must move at least: embeddings and int64 labels read once, the fp32 loss
    written once; with ``full`` also the scalar grad_output read and every embedding's gradient
    written once."""
    embeddings = (2 if op == "cross_modal_triplet_loss" else 1) * B * D * DTYPE_BYTES[dtype]
    nbytes = embeddings + 8 * B + 4
    if mode == "full":
        nbytes += embeddings + 4
    return nbytes


def _fmt(v, digits=3) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def kernel_rows(rows_attention: list[dict], rows_losses: list[dict], peak) -> list[dict]:
    """One line per kernel benchmark row: TFLOP/s (attention, useful FLOPs) or GB/s (losses,
    minimal bytes), and the fraction of the datasheet peak (half-precision rows only for TFLOP/s)."""
    lines = []
    for r in rows_attention:
        pct = None
        if peak and r["dtype"] in ("bfloat16", "float16"):
            pct = 100 * r["tflops"] / peak[0]
        lines.append(dict(op=r["op"], provider=r["provider"], mode=r["mode"], dtype=r["dtype"],
                          shape=f"B={r['B']} N_f={r['N_f']} N_o={r['N_o']} d={r['d']} e={r['e']}",
                          ms=r["ms_p50"], tflops=r["tflops"], gbps=None, pct=pct,
                          pct_matmul=r.get("pct_peak"), mem=r.get("peak_mem_bytes")))
    for r in rows_losses:
        gbps = loss_min_bytes(r["op"], r["mode"], r["B"], r["D"], r["dtype"]) / (r["ms_p50"] * 1e-3) / 1e9
        lines.append(dict(op=r["op"], provider=r["provider"], mode=r["mode"], dtype=r["dtype"],
                          shape=f"B={r['B']} D={r['D']}", ms=r["ms_p50"], tflops=None, gbps=gbps,
                          pct=100 * gbps / peak[1] if peak else None, pct_matmul=None,
                          mem=r.get("peak_mem_bytes")))
    return lines


def _pick(rows, **want):
    """The last row matching every key of ``want`` (the latest measurement), or None."""
    found = [r for r in rows if all(r.get(k) == v for k, v in want.items())]
    return found[-1] if found else None


def evaluate_targets(points: Points, attention, losses, loader, e2e, peak) -> list[tuple[str, str, str]]:
    """(target, measured, pass/fail/not measured) for each §8 target ``make gpu`` takes."""
    out = []
    F, B, dtype = points.attention_features, points.attention_B, points.dtype
    shape = dict(mode="full", dtype=dtype, B=B, d=F, e=F)

    def verdict(ok):
        return "pass" if ok else "**fail**"

    n_last = points.attention_N[-1]
    row = _pick(attention, provider="triton", N_f=n_last, **shape)
    name = f"cross_stream_attention fwd+bwd at N = {n_last}, d = e = {F}, {dtype}: ≥ 50 % of the dense bf16 peak"
    if row is None:
        out.append((name, "not measured", "—"))
    elif peak:
        pct = 100 * row["tflops"] / peak[0]
        out.append((name, f"{row['tflops']:.1f} TFLOP/s = {pct:.1f} % of {peak[0]:.0f}", verdict(pct >= 50)))
    else:
        out.append((name, f"{row['tflops']:.3g} TFLOP/s (no datasheet peak for this device)", "—"))

    for n in points.attention_N:
        tri = _pick(attention, provider="triton", N_f=n, **shape)
        for provider, factor in (("eager", 3.0), ("compile", 1.5), ("sdpa", 1.0)):
            other = _pick(attention, provider=provider, N_f=n, **shape)
            label = {"eager": "≥ 3× eager", "compile": "≥ 1.5× torch.compile", "sdpa": "faster than two SDPA calls"}
            name = f"cross_stream_attention fwd+bwd at N = {n}, e = {F}: {label[provider]}"
            if tri is None or other is None:
                out.append((name, "not measured", "—"))
                continue
            speedup = other["ms_p50"] / tri["ms_p50"]
            ok = speedup > factor if provider == "sdpa" else speedup >= factor
            out.append((name, f"{speedup:.2f}× ({tri['ms_p50']:.3g} ms vs {other['ms_p50']:.3g} ms)", verdict(ok)))

    name = f"cross_stream_attention peak extra memory O(B·N·e): bytes / (B·N·e·itemsize) constant over N ∈ {list(points.attention_N)}"
    factors = []
    for n in points.attention_N:
        tri = _pick(attention, provider="triton", N_f=n, **shape)
        if tri is not None and tri.get("peak_mem_bytes") is not None:
            factors.append(tri["peak_mem_bytes"] / (B * n * F * DTYPE_BYTES[dtype]))
    if len(factors) == len(points.attention_N) and len(factors) > 1:
        out.append((name, " → ".join(f"{f:.2f}" for f in factors), verdict(factors[-1] <= 1.1 * factors[0])))
    else:
        out.append((name, "not measured (needs CUDA memory statistics)", "—"))

    LB, LD = points.loss_B, points.loss_D
    for op, factor in (("cross_modal_triplet_loss", 5.0), ("discriminative_embedding_loss", 3.0)):
        tri = _pick(losses, op=op, provider="triton", mode="full", dtype=dtype, B=LB, D=LD)
        eager = _pick(losses, op=op, provider="eager", mode="full", dtype=dtype, B=LB, D=LD)
        name = f"{op} fwd+bwd at B = {LB}, D = {LD}: ≥ {factor:g}× eager"
        if tri is None or eager is None:
            out.append((name, "not measured", "—"))
            continue
        speedup = eager["ms_p50"] / tri["ms_p50"]
        out.append((name, f"{speedup:.2f}× ({tri['ms_p50']:.3g} ms vs {eager['ms_p50']:.3g} ms)", verdict(speedup >= factor)))
        if op == "cross_modal_triplet_loss":
            name = f"{op} at B = {LB}, D = {LD}: peak memory ≤ 1/10 of eager"
            if tri.get("peak_mem_bytes") and eager.get("peak_mem_bytes"):
                ratio = tri["peak_mem_bytes"] / eager["peak_mem_bytes"]
                out.append((name, f"{ratio:.3f} of eager", verdict(ratio <= 0.1)))
            else:
                out.append((name, "not measured (needs CUDA memory statistics)", "—"))

    pairs = []
    for tri in (r for r in losses if r["op"] == "cross_modal_triplet_loss" and r["provider"] == "triton"
                and r["mode"] == "full" and r["dtype"] == dtype):
        eager = _pick(losses, op=tri["op"], provider="eager", mode="full", dtype=dtype, B=tri["B"], D=tri["D"])
        if eager is not None:
            pairs.append((eager["ms_p50"] / tri["ms_p50"], tri["B"], tri["D"]))
    name = "cross_modal_triplet_loss fwd+bwd ≥ 5× eager over every measured (B, D)"
    if pairs:
        worst = min(pairs)
        out.append((name, f"min {worst[0]:.2f}× at B = {worst[1]}, D = {worst[2]} ({len(pairs)} points)",
                    verdict(worst[0] >= 5)))
    else:
        out.append((name, "not measured", "—"))

    dali = _pick(loader, backend="dali-gpu")
    torch_loader = _pick(loader, backend="torch")
    name = "DALI GPU loader ≥ 3× the torch DataLoader on every core"
    if dali and torch_loader:
        ratio = dali["clips_per_s"] / torch_loader["clips_per_s"]
        out.append((name, f"{ratio:.2f}× ({dali['clips_per_s']:.0f} vs {torch_loader['clips_per_s']:.0f} clips/s)",
                    verdict(ratio >= 3)))
    else:
        measured = f"torch DataLoader {torch_loader['clips_per_s']:.1f} clips/s; " if torch_loader else ""
        out.append((name, measured + "dali-gpu not measured", "—"))

    rates = {r["case"]: r["clips_per_s"] for r in e2e if "clips_per_s" in r}
    for num, den, target, label in (("ccs-dali", "ccs-synthetic", 0.95, "(a)/(b) ≥ 0.95: the loader never the bottleneck"),
                                    ("ccs-synthetic", "backbones-synthetic", 0.90, "(b)/(c) ≥ 0.90: CCS cost over the backbones"),
                                    ("ccs-dali", "eager-fp32-torch", 3.0, "(a)/(d) ≥ 3: end to end vs the eager baseline")):
        if num in rates and den in rates:
            ratio = rates[num] / rates[den]
            out.append((label, f"{ratio:.3f} ({rates[num]:.1f} / {rates[den]:.1f} clips/s)", verdict(ratio >= target)))
        else:
            out.append((label, "not measured", "—"))
    return out


DEVICE_AGREEMENT = 0.99  # share of pixels within ±1 uint8 level of the CPU path, on every pair


def flow_targets(flow: list[dict]) -> list[tuple[str, str, str]]:
    """(target, measured, verdict) of issue 15 from ``bench_flow`` rows: pairs/s of the Triton
    path on CUDA, EPE against the ground truth within 1.1× OpenCV's on every pair, ≥ 95 % of
    pixels within ±2 uint8 levels of OpenCV on every pair (these two need cv2.optflow); and,
    with or without OpenCV, the GPU's flow (Triton and eager iteration) against the CPU path on
    the same pairs: ≥ ``DEVICE_AGREEMENT`` of pixels within ±1 uint8 level on every pair."""
    def verdict(ok):
        return "pass" if ok else "**fail**"

    out = []
    name = "tvl1-torch (Triton iteration) ≥ 300 pairs/s at 340×256 on one GPU"
    fast = _pick(flow, kind="speed", provider="tvl1-torch triton", height=256, width=340)
    cv = _pick(flow, kind="speed", flow_device="cpu", height=256, width=340)
    if fast and fast.get("flow_device", "").startswith("cuda"):
        extra = f"; OpenCV on every core {cv['pairs_per_s']:.1f}" if cv and cv["provider"].startswith("opencv") else ""
        out.append((name, f"{fast['pairs_per_s']:.1f} pairs/s (batch {fast['batch']}){extra}",
                    verdict(fast["pairs_per_s"] >= 300)))
    else:
        out.append((name, "not measured", "—"))
    agree = [r for r in flow if r.get("kind") == "agreement"]
    truth = [r for r in agree if "epe_ratio" in r]
    name = "tvl1-torch EPE against the ground truth ≤ 1.1× OpenCV's on every synthetic pair"
    if truth:
        worst = max(truth, key=lambda r: r["epe_ratio"])
        out.append((name, f"max {worst['epe_ratio']:.3f}× ({worst['pair']}, {len(truth)} pairs)",
                    verdict(worst["epe_ratio"] <= 1.1)))
    else:
        out.append((name, "not measured", "—"))
    name = "tvl1-torch ≥ 95 % of pixels within ±2 uint8 levels of OpenCV (bound 20) on every pair"
    if agree:
        worst = min(agree, key=lambda r: r["within_2_levels"])
        out.append((name, f"min {100 * worst['within_2_levels']:.1f} % ({worst['pair']}, {len(agree)} pairs)",
                    verdict(worst["within_2_levels"] >= 0.95)))
    else:
        out.append((name, "not measured", "—"))
    device = [r for r in flow if r.get("kind") == "device-agreement"]
    for impl in ("triton", "eager"):
        rows = [r for r in device if r.get("impl") == impl]
        name = (f"tvl1-torch on the GPU ({impl} iteration) against its CPU path on the same pairs: "
                f"≥ {100 * DEVICE_AGREEMENT:g} % of pixels within ±1 uint8 level on every pair")
        if not rows:
            out.append((name, "not measured", "—"))
            continue
        worst = min(rows, key=lambda r: r["within_1_level"])
        same = min(r["same_levels"] for r in rows)
        identical = sum(bool(r["identical"]) for r in rows)
        truth = [r["epe_ours"] for r in rows if r.get("epe_ours") is not None]
        out.append((name, f"min {100 * worst['within_1_level']:.2f} % ({worst['pair']}, {len(rows)} pairs, "
                          f"{rows[0]['flow_device']}); equal levels ≥ {100 * same:.2f} %; {identical} pairs "
                          f"bit-identical; largest difference {max(r['max_abs_diff_px'] for r in rows):.2g} px"
                          + (f"; EPE against the truth ≤ {max(truth):.3g} px" if truth else ""),
                    verdict(worst["within_1_level"] >= DEVICE_AGREEMENT)))
    return out


NOT_TAKEN = (
    ("accuracy on the embedded data set (§6)", "`make demo`"),
    ("static targets (executed/useful FLOPs, atomics, glue bytes, spills)", "CPU report, not a GPU figure"),
)


def _show(path: Path) -> str:
    """A path relative to the repository when it lies inside it (the summary is committed)."""
    try:
        return str(path.relative_to(REPO))
    except ValueError:
        return str(path)


def write_summary(run: Run, results: list[StageResult], points: Points, start_counts: dict[str, int],
                  env: dict, wall_s: float, path: Path, not_run: list[str] = ()) -> str:
    """The summary of every stage run so far (``not_run``: the plan's stages still to come, listed
    as such: a run cut off after any stage leaves the figures it took). Written atomically."""
    peak = device_peak(env["device"])
    attention = new_rows(run.out, start_counts, "cross_attention")
    losses = new_rows(run.out, start_counts, "losses")
    loader = new_rows(run.out, start_counts, "loader")
    e2e = new_rows(run.out, start_counts, "e2e")
    lines = [f"# GPU figures: {env['device']}" + (" (dry run: toy sizes on CPU)" if run.dry_run else ""), ""]
    lines.append(f"`{env['command']}` on {env['date']}: torch {env['torch']}, triton {env['triton']}, "
                 f"Python {sys.version.split()[0]}; {wall_s:.0f} s of wall time (budget "
                 f"{(DRY_TOTAL_BUDGET_S if run.dry_run else TOTAL_BUDGET_S) * run.stretch:.0f} s"
                 + (f", every budget stretched ×{run.stretch:.2f} for the machine's load" if run.stretch > 1 else "")
                 + f"). Rows appended to `{_show(run.out)}`; "
                 f"logs in `{_show(run.logs)}`.")
    if run.dry_run:
        lines += ["", "Dry run: the kernels ran in the Triton interpreter at toy sizes, so the figures and the "
                  "pass/fail column below say nothing about speed; they show that every stage ran."]
    if peak:
        lines += ["", f"Datasheet peak used for the fractions: {peak[0]:.0f} TFLOP/s dense bf16, "
                  f"{peak[1] / 1e3:.2f} TB/s HBM."]
    lines += ["", "## Stages", "", "| stage | status | wall s | budget s | rows appended | notes |", "|---|---|---|---|---|---|"]
    for r in results:
        rows = ", ".join(f"{n} {name}" for name, n in r.rows.items()) or "—"
        note = r.note
        if r.tests:
            t = r.tests
            note = (f"{t['passed']} passed, {t['failed']} failed, {t['error']} errors, {t['skipped']} skipped"
                    + (f", {t['collected']} collected" if "collected" in t else "") + (f"; {note}" if note else ""))
        if r.rc not in (None, 0):
            note = f"exit status {r.rc}" + (f"; {note}" if note else "")
        lines.append(f"| `{r.name}` | {r.status} | {r.wall_s:.0f} | {r.budget_s:.0f} | {rows} | {note} |")
    for name in not_run:
        lines.append(f"| `{name}` | not run yet | | | — | the run had not reached it when this summary was written |")
    missing = [f"`{r.name}`: {why}" for r in results for why in r.skipped]
    missing += [f"`{r.name}`: {r.note}" for r in results if r.status == "skipped" and "needs" in r.note]
    if missing:
        lines += ["", "Not measured for a missing package (`make gpu-kit` carries it; README, \"Taking the GPU "
                  "figures\"):", ""] + [f"- {m}" for m in missing]
    if run.kit:
        lines += ["", "Kit (`--kit`):", ""] + [f"- {line}" for line in run.kit.get("lines", [])]
    failing = [f for r in results if r.tests for f in r.tests["failing"]]
    if failing:
        lines += ["", "Failing tests:", ""] + [f"- `{f}`" for f in failing]

    lines += ["", "## SPEC §8 targets", "", "| target | measured | verdict |", "|---|---|---|"]
    lines += [f"| {t} | {m} | {v} |" for t, m, v in evaluate_targets(points, attention, losses, loader, e2e, peak)]
    lines += [f"| {t} | {m} | {v} |" for t, m, v in flow_targets(new_rows(run.out, start_counts, "flow"))]
    lines += [f"| {t} | not taken by `make gpu`: {why} | — |" for t, why in NOT_TAKEN]

    table = kernel_rows(attention, losses, peak)
    if table:
        lines += ["", "## Kernel rows", "",
                  "TFLOP/s from the useful FLOPs (attention); GB/s from the minimal bytes, inputs read and outputs "
                  "written once (losses); % of the datasheet peak (bf16/fp16 rows for TFLOP/s); % of a measured "
                  "dense matmul where the benchmark took one.", "",
                  "| op | provider | mode | dtype | shape | ms (p50) | TFLOP/s | GB/s | % of peak | % of matmul | peak extra MiB |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for k in table:
            mem = None if k["mem"] is None else k["mem"] / 2**20
            lines.append(f"| {k['op']} | {k['provider']} | {k['mode']} | {k['dtype']} | {k['shape']} | {_fmt(k['ms'])} "
                         f"| {_fmt(k['tflops'])} | {_fmt(k['gbps'])} | {_fmt(k['pct'])} | {_fmt(k['pct_matmul'])} "
                         f"| {_fmt(mem)} |")
    if loader or e2e:
        lines += ["", "## Loader and end to end", "", "| benchmark | case | clips/s |", "|---|---|---|"]
        lines += [f"| loader | {r['backend']} ({r['device']}) | {_fmt(r['clips_per_s'])} |" for r in loader]
        lines += [f"| e2e | {r['case']} ({r['backbone']}, {r['input_size']} px, batch {r['batch_size']}) "
                  f"| {_fmt(r['clips_per_s'])} |" for r in e2e if "clips_per_s" in r]
    speed = [r for r in new_rows(run.out, start_counts, "flow") if r.get("kind") == "speed"]
    if speed:
        lines += ["", "## Optical flow", "", "| provider | device | frame | batch | pairs | pairs/s |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['provider']} | {r['flow_device']} | {r['width']}×{r['height']} | {r.get('batch') or '—'} "
                  f"| {r['pairs']} | {_fmt(r['pairs_per_s'])} |" for r in speed]
    text = "\n".join(lines) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return text


# ----------------------------------------------------------------------------- command line

def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n\n")[0])
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
    stages = list(PLAN)
    if args.stages:
        names = args.stages.split(",")
        unknown = sorted(set(names) - {s.name for s in PLAN})
        if unknown:
            print(f"bench.gpu: unknown stages {unknown}; the plan has {[s.name for s in PLAN]}", file=sys.stderr)
            return 2
        stages = [s for s in PLAN if s.name in names or (s.name == "kit" and args.kit is not None)]
    if args.kit is not None and not (args.kit / "manifest.json").is_file():
        print(f"bench.gpu: --kit {args.kit}: no manifest.json there (make it with `make gpu-kit`)", file=sys.stderr)
        return 2

    started = time.monotonic()
    import torch

    from bench import common

    if args.dry_run:
        out = args.out or Path(tempfile.mkdtemp(prefix="ccs-gpu-dry-run-"))
        if out.resolve() == RESULTS_DIR.resolve():
            print("bench.gpu: --dry-run writes toy figures; give it an --out other than bench/results/", file=sys.stderr)
            return 2
        work = args.work or out / "work"
        device, points, total = "cpu", DRY_POINTS, DRY_TOTAL_BUDGET_S
        stretch = dry_run_stretch()
        os.environ.setdefault("TRITON_INTERPRET", "1")
    else:
        if not torch.cuda.is_available():
            print("bench.gpu: no CUDA device here (python -m bench.gpu --dry-run runs the plan on CPU)", file=sys.stderr)
            return 2
        out, work = args.out or RESULTS_DIR, args.work or REPO / "runs" / "gpu"
        device, points, total = "cuda", GPU_POINTS, TOTAL_BUDGET_S
        stretch = 1.0
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    logs = work / stamp
    for folder in (out, logs):
        folder.mkdir(parents=True, exist_ok=True)
    run = Run(dry_run=args.dry_run, python=sys.executable, out=out.resolve(), work=work.resolve(),
              logs=logs.resolve(), wheelhouse=args.wheelhouse.resolve(),
              deadline=started + (total - OVERHEAD_S) * stretch, stretch=stretch,
              kit_dir=args.kit.resolve() if args.kit else None,
              kit_target=Path(tempfile.mkdtemp(prefix="ccs-gpu-kit-")) if args.kit else None)
    env = {**common.env_info(device), "command": shlex.join(["python", "-m", "bench.gpu", *(argv or sys.argv[1:])])}
    start_counts = count_rows(run.out)
    print(f"bench.gpu: {env['device']}{' (dry run)' if run.dry_run else ''}; results in {run.out}, logs in {run.logs}"
          + (f"; budgets stretched ×{stretch:.2f} for the machine's load" if stretch > 1 else ""), flush=True)

    slug = common.slug(env["device"])
    summary = run.out / f"gpu-summary-{slug}.md"
    results: list[StageResult] = []
    for i, stage in enumerate(stages, 1):
        if run.dry_run:  # other jobs may load the machine more than when the run started
            later = dry_run_stretch()
            if later > run.stretch:
                run.deadline += (total - OVERHEAD_S) * (later - run.stretch)
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
        detail = ", ".join(f"{n} rows to {name}" for name, n in result.rows.items())
        if result.tests:
            t = result.tests
            detail = f"{t['passed']} passed, {t['failed']} failed, {t['error']} errors, {t['skipped']} skipped" + (
                f", {t['collected']} collected" if "collected" in t else "")
        print(f"{result.status} in {result.wall_s:.0f} s" + (f": {detail}" if detail else "")
              + (f" ({result.note})" if result.note else ""), flush=True)
        # after every stage: its row, and the summary of every figure so far (a run cut off keeps them)
        common.append_rows(run.out / f"gpu-{slug}.json", [
            {**dataclasses.asdict(result), "dry_run": run.dry_run, "stretch": round(run.stretch, 2),
             "run_wall_s": round(time.monotonic() - started, 1), **env}])
        text = write_summary(run, results, points, start_counts, env, time.monotonic() - started, summary,
                             not_run=[s.name for s in stages[i:]])
    if not stages:
        text = write_summary(run, results, points, start_counts, env, time.monotonic() - started, summary)
    if run.kit_target is not None:
        shutil.rmtree(run.kit_target, ignore_errors=True)
    print("\n" + text)
    print(f"summary: {summary}")
    failed = failed_stages(results, run.dry_run)
    if failed:
        print(f"bench.gpu: failed: {', '.join(failed)} (logs in {run.logs})", file=sys.stderr)
        return 1
    return 0


def failed_stages(results: list[StageResult], dry_run: bool) -> list[str]:
    """Stages that make the run fail: a crash, a failing test (also in a test stage cut short by
    its budget), and in the dry run a stage that overran its budget."""
    return [r.name for r in results if r.status == "failed" or (dry_run and r.status == "timeout")
            or (r.tests and (r.tests["failed"] or r.tests["error"]))]


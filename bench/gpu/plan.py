"""The plan: the stages ``make gpu`` runs, in order of value, each a few commands with the
arguments they take on the GPU and in the dry run, and the time budgets they must fit."""
from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from bench.gpu.runner import Run

REPO = Path(__file__).resolve().parents[2]
RESULTS_DIR = REPO / "bench" / "results"

TOTAL_BUDGET_S = 480  # SPEC §5: every §8 figure in ≤ 8 minutes on one GPU machine, set-up included
DRY_TOTAL_BUDGET_S = 120  # the dry run is part of `make test`
OVERHEAD_S = 15  # Python start-up, the summary, and KILL_GRACE_S for each stage that overruns

KERNEL_TESTS = ("tests/kernels/test_cross_attention.py", "tests/kernels/test_triplet.py",
                "tests/kernels/test_center.py", "tests/ccs_fast/test_losses.py", "tests/dataloader/test_tvl1.py")


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


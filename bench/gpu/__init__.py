"""Every SPEC §8 figure on one GPU machine in one command, inside 8 minutes (`make gpu`).

    python -m bench.gpu                  # on the GPU machine, from the repository root
    python -m bench.gpu --dry-run        # the same plan on CPU at toy sizes (part of `make test`)
    python -m bench.gpu --plan           # print the plan and its time budgets
    python -m bench.gpu --stages e2e,grid   # rerun some stages
    python -m bench.gpu --kit .device_wheels   # with the parts of `make gpu-kit` that arrived

The plan (``plan.PLAN``) is data: a list of stages, each a few commands with the arguments they
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
   ``flow`` only (``plan.Stage.opencv``), where the machine's cv2 lacks ``cv2.optflow``.
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
row with its TFLOP/s or GB/s and the fraction of the device's datasheet peak (``targets.PEAKS``), what
was not measured for a missing package, and what the kit installed. One row per stage goes to
``<out>/gpu-<device>.json`` as each stage ends.

On the GPU, ``<out>`` is ``bench/results/`` and ``<work>`` is ``runs/gpu/`` (git-ignored:
logs and the generated rawframes, reused by the next run). The budgets add up to at most
``plan.TOTAL_BUDGET_S`` with ``plan.OVERHEAD_S`` kept for start-up, the summary and stopping timed-out
stages; a run also stops every stage at that deadline. ``grid`` may use the time earlier
stages left unused. The GPU budgets are estimates that no GPU run has checked yet; the
``gpu-<device>.json`` rows of the first run give each stage's real time.

``--dry-run`` runs the same stages on CPU: the kernels in the Triton interpreter at toy sizes,
e2e with timm's ``test_resnet`` at 32 px, the kernel tests collected but not run (``make
test`` runs them itself), the flow's Triton iteration in the interpreter against the CPU path
with few iterations, no DALI stage, pip with ``--dry-run``. Its results go to a
temporary folder (never ``bench/results/``), and it fails if any stage fails or overruns its
dry budget, so that the command cannot rot between GPU visits. On a machine other jobs keep
busy the dry budgets stretch by the load average per core (``plan.dry_run_stretch``). Measured on the 2-core CPU
machine: 46 s with torch 2.14 / triton 3.8 (Python 3.11), 52 s with torch 2.11 / triton 3.6
(Python 3.12, ``make compat``). With the present plan, under ``bench/bare_image`` (no PyAV,
DALI or cv2.optflow) and a load average of 2.6–4.5 from other jobs: 73 s (stretch ×1.31;
e2e 18 s, flow 9 s, loader 5 s, cuda-tests 12 s, grid 12 s); in ``make compat-bare``'s venv
(Python 3.12, torch 2.11, triton 3.6, no PyAV, DALI or opencv-contrib installed) 92 s at a
load average of 8 (stretch ×4.0).

``python -m bench.gpu --dry-run`` under ``PYTHONPATH=bench/bare_image`` is what ``make test``
runs (``tests/bench/test_gpu.py``): a stage that imports what the bare GPU image lacks without a
skip fails there.

Exit status: 0; 1 when a test failed or a stage crashed (and, in the dry run, overran); 2 for
bad arguments or a GPU run without a CUDA device.

The modules, in the order a run uses them: ``plan`` (the stages, their commands and budgets),
``runner`` (a stage's commands as subprocesses, stopped at its budget), ``logs`` (skip lines
and pytest counts read from a stage's log), ``targets`` (the §8 targets read from the rows),
``summary`` (the summary file) and ``cli`` (the command line and the run from the first stage
to the summary; ``__main__`` calls it).
"""

"""Shared pieces of the benchmarks: device naming, versions, timing, JSON rows, tables, the
command line (``bench_parser``, ``kernel_parser``: the options the benchmarks share, declared once),
and ``run_sweep``, which times a list of ``Case``s (the benchmarks only declare their cases).

Every result row carries the device, the library versions, the date and the command that
produced it (SPEC §7); rows are appended to ``bench/results/<name>-<device-slug>.json``.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import torch

from ccs_fast.base.atomic import write_text

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: str | torch.device = "cuda") -> str:
    """Human-readable name of the device the benchmark runs on."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({os.cpu_count()} cores)"


def slug(name: str) -> str:
    """File-name-safe short form of a device name, e.g. ``nvidia-h100-80gb-hbm3``."""
    name = re.sub(r"\(.*?\)", "", name)
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def env_info(device: str | torch.device = "cuda") -> dict:
    """Device, versions, date and command for a result row."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
    }


def result_path(name: str, device: str | torch.device, out_dir: str | Path | None = None) -> Path:
    return Path(out_dir or RESULTS_DIR) / f"{name}-{slug(device_name(device))}.json"


def append_rows(path: str | Path, rows: Sequence[dict]) -> Path:
    """Append rows to the JSON list at ``path`` (created when missing); written atomically."""
    path = Path(path)
    existing = json.loads(path.read_text()) if path.exists() else []
    return write_text(path, json.dumps(existing + list(rows), indent=1) + "\n")


def print_table(rows: Iterable[dict], columns: Sequence[str]) -> str:
    """Print rows as a markdown table with the given columns; returns the text."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    text = "\n".join(lines)
    print(text)
    return text


def timeit(fn: Callable[[], object], device: str | torch.device, warmup: int = 3, rep: int = 10) -> tuple[float, float, float]:
    """(median, 20th, 80th percentile) milliseconds of ``fn()``.

    CUDA: ``triton.testing.do_bench`` (CUDA events, cache flushed between runs). CPU:
    ``time.perf_counter`` over ``rep`` runs after ``warmup`` runs.
    """
    device = torch.device(device)
    if device.type == "cuda":
        from triton.testing import do_bench

        p50, p20, p80 = do_bench(fn, quantiles=[0.5, 0.2, 0.8])
        return float(p50), float(p20), float(p80)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rep):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else times * 9
    return float(statistics.median(times)), float(q[1]), float(q[7])


def peak_memory(fn: Callable[[], object], device: str | torch.device) -> int | None:
    """Peak bytes allocated on the CUDA device while ``fn()`` runs, beyond what was live before; None on CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device) - before)


def matmul_peak_tflops(device: str | torch.device = "cuda", dtype: torch.dtype = torch.bfloat16, n: int = 8192) -> float:
    """Measured dense matmul throughput of the device (the 'peak' that percentages refer to)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms, _, _ = timeit(lambda: a @ b, device)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def run_pytest_benchmark(benchmark, fn: Callable[[], object], device: str | torch.device):
    """pytest-benchmark of ``fn`` with first-call costs (autotune, compilation) left out and
    the device synchronised in each timed call; a few rounds on CPU, where it is slow."""
    device = torch.device(device)
    fn()

    def step():
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return out

    if device.type == "cpu":
        return benchmark.pedantic(step, rounds=3, iterations=1)
    return benchmark(step)


def prepare_kernel_device(device: str, prog: str) -> bool:
    """Check ``device`` for a kernel benchmark; on CPU the Triton kernels run in the
    interpreter (``triton.jit`` reads TRITON_INTERPRET when they are defined, so this runs
    before they are imported). Returns True for the CPU smoke run."""
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit(f"{prog}: --device cuda needs a CUDA GPU (use --device cpu for the smoke run)")
    if device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    return device == "cpu"


def compile_for_the_gpu(prog: str) -> None:
    """For the CPU reports that compile or record kernels for a GPU (``bench.aot``,
    ``bench.static``): the kernels must be real ``triton.jit`` functions, not the
    interpreter's, so TRITON_INTERPRET is cleared before ``ccs_fast.kernels`` is first imported."""
    if os.environ.pop("TRITON_INTERPRET", None) == "1" and "ccs_fast.kernels" in sys.modules:
        sys.exit(f"{prog}: ccs_fast.kernels was imported under TRITON_INTERPRET=1; run it as its own process")


def int_list(text: str | None, default: Sequence[int]) -> list[int]:
    """``"1,2,3"`` → ``[1, 2, 3]``; ``default`` when the option was not given."""
    return [int(v) for v in text.split(",")] if text else list(default)


# ----------------------------------------------------------------------------- the command line
# Every benchmark's parser starts here: the options they share are declared once, and each
# benchmark adds only its own.

def bench_parser(doc: str, prog: str | None = None, results: bool = True) -> argparse.ArgumentParser:
    """A benchmark's parser: the first paragraph of ``doc`` (its module's docstring) as the
    description and, with ``results``, ``--out``, the folder its rows are appended to."""
    p = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0])
    if results:
        p.add_argument("--out", type=Path, default=None, help="results folder (default bench/results/)")
    return p


def kernel_parser(doc: str, dtypes: Sequence[str], dtype: str, modes: Sequence[str], *, providers_help: str,
                  rep: int) -> argparse.ArgumentParser:
    """``bench_parser`` with the options of a kernel sweep: ``--device`` (cuda, or the CPU smoke run in
    the Triton interpreter), ``--dtype`` (one of ``dtypes`` or ``all``; default ``dtype``),
    ``--providers``, ``--modes`` (default all of ``modes``) and ``--rep`` (CPU repeats)."""
    p = bench_parser(doc)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--dtype", choices=(*dtypes, "all"), default=dtype, help="'all' = bfloat16 and float32")
    p.add_argument("--providers", default=None, help=providers_help)
    p.add_argument("--modes", default=",".join(modes))
    p.add_argument("--rep", type=int, default=rep, help="CPU repeats")
    return p


@dataclass(frozen=True)
class KernelSweep:
    """A kernel sweep's common options, resolved (``kernel_sweep``)."""

    device: str
    cpu: bool  # the CPU smoke run: the Triton kernels in the interpreter, tiny shapes
    dtypes: list[str]
    providers: list[str]
    modes: list[str]


def kernel_sweep(args: argparse.Namespace, prog: str, cpu_providers: Sequence[str],
                 providers: Sequence[str]) -> KernelSweep:
    """The options of ``kernel_parser`` resolved: the device checked (on CPU, TRITON_INTERPRET
    set before the kernels are imported), the providers (``cpu_providers`` on CPU, else
    ``providers``, unless ``--providers`` names them), ``all`` dtypes as bfloat16 and float32,
    and bfloat16 left out on CPU (float32 instead when nothing else is left)."""
    cpu = prepare_kernel_device(args.device, prog)
    chosen = args.providers.split(",") if args.providers else list(cpu_providers if cpu else providers)
    dtypes = ["bfloat16", "float32"] if args.dtype == "all" else [args.dtype]
    if cpu:
        dtypes = [t for t in dtypes if t != "bfloat16"] or ["float32"]  # bf16 matmuls on CPU say little
    return KernelSweep(args.device, cpu, dtypes, chosen, args.modes.split(","))


@dataclass(frozen=True)
class Case:
    """One benchmark row to take: ``params`` name it (op, provider, mode, dtype, shape),
    ``make()`` builds the zero-argument callable to time (None: the provider lacks the op),
    ``flops`` is the useful work that TFLOP/s refer to and ``extra`` goes into the row as is."""

    params: dict
    make: Callable[[], Optional[Callable[[], object]]]
    flops: Optional[int] = None
    extra: dict = field(default_factory=dict)


def run_sweep(name: str, cases: Iterable[Case], device: str, out_dir=None, rep: int = 5,
              warmup: int = 3, peak_tflops: Optional[dict] = None, columns: Sequence[str] = ()) -> list[dict]:
    """Time every case and append one row per case to ``<out_dir>/<name>-<device>.json`` as it is
    measured (a run stopped by a time limit keeps what it took); a case that runs out of device
    memory is skipped with a line on stderr. ``peak_tflops`` maps a case's ``dtype`` to the
    measured matmul peak for ``pct_peak``. Prints ``columns`` as a table; returns the rows."""
    env = env_info(device)
    path = result_path(name, device, out_dir)
    rows = []
    for case in cases:
        label = " ".join(f"{k}={v}" for k, v in case.params.items())
        try:
            fn = case.make()
            if fn is None:
                continue
            fn()  # compilation and autotuning stay out of the timing
            p50, p20, p80 = timeit(fn, device, warmup=warmup, rep=rep)
            mem = peak_memory(fn, device)
        except torch.OutOfMemoryError:
            print(f"skip {label}: out of memory", file=sys.stderr)
            torch.cuda.empty_cache()
            continue
        row = dict(case.params, ms_p50=p50, ms_p20=p20, ms_p80=p80, peak_mem_bytes=mem)
        if case.flops is not None:
            row.update(flops=case.flops, tflops=case.flops / (p50 * 1e-3) / 1e12)
            peak = (peak_tflops or {}).get(case.params.get("dtype"))
            row.update(peak_tflops=peak, pct_peak=100 * row["tflops"] / peak if peak else None)
        row.update(case.extra)
        row.update(env)
        append_rows(path, [row])
        rows.append(row)
    if columns:
        print_table(rows, columns)
    print(f"\n{len(rows)} rows appended to {path}")
    return rows

"""The ahead-of-time compile gate (SPEC §3, §8), run by ``make test`` with no GPU.

``python -m bench.aot --check`` compiles every Triton kernel launch of the ops, for every
autotune candidate they may choose and every input dtype, for sm_90a and sm_80, reusing the
committed report's facts for launches whose source and specialisation are unchanged, and
fails on a compile error, a half-precision spill on sm_90a, shared memory over the limit, a
Hopper dot kernel without HGMMA or any fenced atomic. The unit tests below check the gate's
rules on made-up rows, so a broken rule cannot pass silently.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
triton = pytest.importorskip("triton")

from bench import aot  # noqa: E402


def row(**kw):
    base = dict(kernel="_xattn_fwd_kernel", arch="sm_90a", dtype="bf16", config={}, flags={}, dot_rows=64,
                registers=200, spill_bytes=0, stack_bytes=0, local_bytes=0, shared_bytes=64 * 1024, hgmma=8,
                hmma=0, membar=1, membar_gpu=0, atom=0, red=0)
    base.update(kw)
    return base


def test_gate_rules():
    assert aot.gate([row()]) == []
    assert "spills" in aot.gate([row(spill_bytes=16)])[0]
    assert aot.gate([row(spill_bytes=16, dtype="fp32")]) == []  # fp32 spills are reported, not gated
    assert aot.gate([row(spill_bytes=16, arch="sm_80", hgmma=0, hmma=8)]) == []
    assert "shared memory" in aot.gate([row(shared_bytes=228 * 1024)])[0]
    assert "shared memory" in aot.gate([row(arch="sm_80", hgmma=0, hmma=8, shared_bytes=164 * 1024)])[0]
    assert "HGMMA" in aot.gate([row(hgmma=0, hmma=8)])[0]
    assert aot.gate([row(hgmma=0, dot_rows=32)]) == []
    assert "fenced" in aot.gate([row(membar_gpu=2)])[0]
    assert "fenced" in aot.gate([row(kernel="_triplet_grad_kernel", atom=3)])[0]
    assert aot.gate([row(kernel="_triplet_grad_kernel", red=3)]) == []  # relaxed reductions are fine
    assert "does not compile" in aot.gate([dict(row(), error="boom")])[0]


def kernel_names():
    import ccs_fast.kernels.center as center
    import ccs_fast.kernels.cross_attention as xa
    import ccs_fast.kernels.normalize as normalize
    import ccs_fast.kernels.segments as segments
    import ccs_fast.kernels.triplet as triplet
    import ccs_fast.kernels.tvl1 as tvl1

    jit_types = ("JITFunction", "InterpretedFunction")  # the interpreter wraps kernels in the latter
    return {name for mod in (xa, triplet, center, normalize, segments, tvl1) for name, obj in vars(mod).items()
            if name.endswith("_kernel") and type(obj).__name__ in jit_types}


def test_compile_gate_passes_for_every_kernel():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "bench.aot", "--check"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=3600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    report = json.loads((ROOT / "bench" / "results" / f"aot-triton{triton.__version__}.json").read_text())
    compiled = {r["kernel"] for r in report["rows"] if "error" not in r}
    assert kernel_names() <= compiled, kernel_names() - compiled
    assert {r["arch"] for r in report["rows"]} == {"sm_90a", "sm_80"}
    assert {r["dtype"] for r in report["rows"]} == {"bf16", "fp16", "fp32"}

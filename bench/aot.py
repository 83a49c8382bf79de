"""Ahead-of-time compile report and gate for every Triton kernel, on a machine with no GPU.

Each op's launcher runs on meta tensors at the SPEC §8 shapes with its kernel launches recorded
(a ``ccs_fast.kernels._common.Recording`` passed to it), once per autotune candidate that its pruning
keeps at those shapes and per input dtype. Every recorded launch is specialised exactly as
Triton's launcher would specialise it (its own binder: int and alignment specialisations,
constexprs) and compiled for sm_90a and sm_80 with ``triton.compile``. The cubin is read
with the tools in the Triton wheel: ptxas's report (registers, spill bytes, stack frame),
``cuobjdump`` (shared memory, SASS) and the SASS's tensor-core instructions (HGMMA on
sm_90a, HMMA), fences (MEMBAR) and atomics (ATOM/ATOMG with a result, RED without).

    python -m bench.aot            # compile what the report lacks, write it, print the gate
    python -m bench.aot --check    # the same, but exit 1 on a gate failure (run by make test)

The report, ``bench/results/aot-triton<version>.json``, keys each compile by Triton's own
source hash of the kernel (line numbers left out) and its specialisation, so a run
recompiles only the kernels whose source or launch changed; with an up-to-date report the
gate takes a few seconds.

The gate (SPEC §3, §8): every launch compiles; no half-precision launch spills or uses a
stack frame on sm_90a; shared memory fits (227 KB sm_90a, 163 KB sm_80); every
half-precision ``tl.dot`` kernel whose dot tiles are ≥ 64 rows issues HGMMA on sm_90a; no
GPU-scope fence (MEMBAR.*.GPU) and no atomic that returns a value (fenced atomics) anywhere.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
SHARED_LIMIT = {"sm_90a": 227 * 1024, "sm_80": 163 * 1024}
REGS_PER_SM = 65536
MAX_WARPS_PER_SM = {"sm_90a": 64, "sm_80": 64}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _targets():
    from triton.backends.compiler import GPUTarget

    return {"sm_90a": GPUTarget("cuda", 90, 32), "sm_80": GPUTarget("cuda", 80, 32)}


# ----------------------------------------------------------------------------- cases


def _meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, device="meta", dtype=dtype)


def attention_calls(dtype):
    """(label, function of a Recording, configs) per autotune candidate of both attention kernels."""
    from ccs_fast.kernels import cross_attention as xa
    from ccs_fast.kernels._dispatch import Impl

    B, N = 32, 588
    for d in (64, 128, 256, 512, 1024):
        e = d
        q, k, v_f, v_o = _meta(B, N, d, dtype=dtype), _meta(B, N, d, dtype=dtype), _meta(B, N, e, dtype=dtype), _meta(B, N, e, dtype=dtype)
        lse = _meta(B, N)
        for cfg in xa.prune_configs(xa.fwd_configs(), d, e):
            yield (f"d=e={d}", lambda rec, q=q, k=k, vf=v_f, vo=v_o: xa.xattn_forward(q, k, vf, vo, 0.1, Impl.TRITON, rec),
                   {"_xattn_fwd_kernel": cfg})
        for cfg in xa.prune_configs(xa.bwd_configs(), d, e):
            yield (f"d=e={d}",
                   lambda rec, q=q, k=k, vf=v_f, vo=v_o: xa.xattn_backward(q, k, vf, vo, vf, vo, lse, lse, vf, vo, 0.1,
                                                                           Impl.TRITON, rec),
                   {"_xattn_bwd_kernel": cfg})


def loss_calls(dtype):
    """(label, function of a Recording, configs) per autotune candidate of the triplet and center kernels."""
    from ccs_fast.kernels import center, normalize, triplet
    from ccs_fast.kernels._dispatch import Impl

    gpu = Impl.TRITON

    for B, D in ((8192, 512), (512, 2048), (1024, 256)):
        z_a, z_b = _meta(B, D, dtype=dtype), _meta(B, D, dtype=dtype)
        labels = _meta(B, dtype=torch.int64)
        for single in (False, True):
            for cfg in triplet.prune_configs(triplet.mine_configs(), B, D):
                yield (f"B={B} D={D}{' single' if single else ''}",
                       lambda rec, z_a=z_a, z_b=z_b, y=labels, s=single: triplet.triplet_forward(
                           z_a, z_b, y, 0.3, True, single=s, compute_grad=True, impl=gpu, deterministic=False,
                           record=rec),
                       {"_triplet_mine_kernel": cfg})
        yield (f"B={B} D={D} deterministic",
               lambda rec, z_a=z_a, z_b=z_b, y=labels: triplet.triplet_forward(
                   z_a, z_b, y, 0.3, True, single=False, compute_grad=True, impl=gpu, deterministic=True, record=rec),
               {"_triplet_mine_kernel": triplet.mine_configs()[0]})
        for grad in (True, False):
            yield (f"B={B} D={D}", lambda rec, z=z_a, y=labels, c=grad: center.center_forward(
                z, y, 0.3, 0.8, True, compute_grad=c, impl=gpu, record=rec), {})
        r, g, go = _meta(B), _meta(B, D), _meta(())
        for norm in (True, False):  # the losses' backward
            yield (f"B={B} D={D} backward",
                   lambda rec, z=z_a, r=r, g=g, go=go, n=norm: normalize.finish_grad(z, r, g, go, n, gpu, rec), {})


def tvl1_calls(dtype):
    """(label, function, configs) of the TV-L1 kernels (iteration, convergence, median): fp32
    only (the flow is fp32), at 340×256 (the frame size ``prepare`` writes)."""
    from ccs_fast.kernels import tvl1

    if dtype != torch.float32:
        return
    for P in (1, 64):
        fields = [_meta(P, 256, 340) for _ in range(10)]
        active = _meta(P, dtype=torch.bool)
        yield (f"P={P} 340x256",
               lambda rec, f=fields, a=active: tvl1.tvl1_step_triton(*f, a, 0.045, 0.3, 0.25 / 0.3, record=rec), {})
        state = _meta(P, dtype=torch.int32)
        yield (f"P={P} 340x256 median 5x5",
               lambda rec, f=fields, s=state: tvl1.median_filter_triton(f[0], s, f[1], 5, record=rec), {})


def _ignore_line_numbers():
    """Triton's source hash of a kernel ends with the line it starts on, so an edit above a
    kernel (a docstring) would invalidate its cached facts. Line numbers only feed debug
    info, not the code: the report keys them out (every @triton.jit function of the package
    hashes as if it started on line 0)."""
    from triton.runtime.jit import JITFunction

    import ccs_fast.kernels as pkg

    for module in list(sys.modules.values()):
        if getattr(module, "__name__", "").startswith(pkg.__name__):
            for obj in vars(module).values():
                if isinstance(obj, JITFunction) and obj.starting_line_number:
                    obj.starting_line_number = 0
                    obj.hash = None


def recorded_launches():
    """Every distinct launch the ops make at the gate's shapes: (op, dtype, label, Launch)."""
    from ccs_fast.kernels._common import Recording

    out = []
    for dname, dtype in DTYPES.items():
        for op, calls in (("cross_stream_attention", attention_calls), ("losses", loss_calls),
                          ("tvl1_flow", tvl1_calls)):
            for label, fn, configs in calls(dtype):
                recording = Recording(configs)
                fn(recording)
                out += [(op, dname, label, la) for la in recording.launches]
    return out


# ----------------------------------------------------------------------------- compiling


def specialise(launch, target):
    """(ASTSource, options) exactly as Triton's launcher builds them for these arguments."""
    import triton
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    from ccs_fast.kernels._common import jit_function

    fn = jit_function(launch.kernel)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(launch.meta)
    kwargs.setdefault("debug", False)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    del triton
    return ASTSource(fn, signature, constexprs, attrs), options


ANALYSIS = 3  # bump when ``analyse`` changes, so that cached facts are taken again


def compile_key(src, options, arch):
    import triton

    opts = json.dumps({k: v for k, v in sorted(options.__dict__.items()) if k != "extern_libs"}, default=str)
    text = f"{ANALYSIS}|{triton.__version__}|{arch}|{src.hash()}|{opts}"
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _tool(name):
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


_SASS_OPS = re.compile(r"\b(HGMMA|HMMA|MEMBAR|ATOMG|ATOMS|ATOM|REDG|RED|BAR)(\.[A-Z0-9_.]+)?(?![A-Z0-9_])")


def analyse(kernel, arch, ptxas_log):
    """Registers, spills, shared memory and SASS instruction counts of a compiled kernel."""
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", str(cubin)],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True,
                              check=True).stdout
    res = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    counts: dict = {}
    for op, suffix in _SASS_OPS.findall(sass):
        counts[op] = counts.get(op, 0) + 1
        if op == "MEMBAR" and ".GPU" in suffix or op == "MEMBAR" and ".SYS" in suffix:
            counts["MEMBAR_GPU"] = counts.get("MEMBAR_GPU", 0) + 1
    spill_st = sum(int(x) for x in re.findall(r"(\d+) bytes spill stores", ptxas_log))
    spill_ld = sum(int(x) for x in re.findall(r"(\d+) bytes spill loads", ptxas_log))
    stack = sum(int(x) for x in re.findall(r"(\d+) bytes stack frame", ptxas_log))
    regs = int(res.get("REG", 0))
    warps = kernel.metadata.num_warps
    shared = int(kernel.metadata.shared) + int(res.get("SHARED", 0))
    # occupancy: programs per SM limited by registers (allocated per warp in 256s), shared memory, warps
    regs_per_warp = ((max(regs, 1) * 32 + 255) // 256) * 256
    by_regs = REGS_PER_SM // (regs_per_warp * warps)
    by_shared = SHARED_LIMIT[arch] // shared if shared else 32
    by_warps = MAX_WARPS_PER_SM[arch] // warps
    blocks = max(0, min(by_regs, by_shared, by_warps, 32))
    return {
        "registers": regs,
        "spill_bytes": spill_st + spill_ld,
        "stack_bytes": max(stack, int(res.get("STACK", 0))),
        "local_bytes": int(res.get("LOCAL", 0)),
        "shared_bytes": shared,
        "hgmma": counts.get("HGMMA", 0),
        "hmma": counts.get("HMMA", 0),
        "membar": counts.get("MEMBAR", 0),
        "membar_gpu": counts.get("MEMBAR_GPU", 0),
        "atom": counts.get("ATOMG", 0) + counts.get("ATOM", 0),
        "red": counts.get("REDG", 0) + counts.get("RED", 0),
        "programs_per_sm": blocks,
        "occupancy_warps": blocks * warps,
    }


_JOBS: list = []  # (key, arch, Launch); the compile processes are forked and read it by index


def compile_one(index):
    """Compile job ``_JOBS[index]``; returns its key and facts (an ``error`` entry if it fails)."""
    import triton

    key, arch, launch = _JOBS[index]
    target = _targets()[arch]
    t0 = time.perf_counter()
    try:
        src, options = specialise(launch, target)
        log = io.StringIO()
        os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(src, target=target, options=options.__dict__)
        facts = analyse(kernel, arch, log.getvalue())
    except Exception as exc:  # a kernel that does not compile is a gate failure, reported
        facts = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]}
    facts["compile_s"] = round(time.perf_counter() - t0, 2)
    return key, facts


def _dot_rows(launch):
    """Smallest M of the kernel's tl.dot tiles: the block sizes that feed its dots."""
    m = launch.meta
    blocks = [m[k] for k in ("BLOCK_M", "BLOCK_N") if k in m]
    return min(blocks) if blocks else 0


def build_report(jobs_out=None, workers=2, verbose=True):
    """All launches × targets, with cached facts reused from the committed report."""
    import triton

    path = RESULTS / f"aot-triton{triton.__version__}.json"
    old = {}
    if path.exists():
        old = {row["key"]: row for row in json.loads(path.read_text())["rows"]}
    rows, todo, seen = [], [], set()
    launches = recorded_launches()
    _ignore_line_numbers()
    for op, dname, label, launch in launches:
        for arch, target in _targets().items():
            src, options = specialise(launch, target)
            key = compile_key(src, options, arch)
            if key in seen:
                continue
            seen.add(key)
            cfg = {k: v for k, v in launch.meta.items() if k.startswith("BLOCK_") or k in ("num_warps", "num_stages")}
            flags = {k: v for k, v in launch.meta.items() if k in ("OWN_ROWS", "SINGLE", "COMPUTE_GRAD", "FROM_KEYS")}
            row = {"key": key, "op": op, "kernel": launch.name, "arch": arch, "dtype": dname, "shape": label,
                   "config": cfg, "flags": flags, "dot_rows": _dot_rows(launch)}
            if key in old and "error" not in old[key]:
                row.update({k: v for k, v in old[key].items() if k not in row})
            else:
                todo.append((key, arch, launch))
            rows.append(row)
    if todo:
        if verbose:
            print(f"aot: compiling {len(todo)} of {len(rows)} kernel launches ({workers} processes)", flush=True)
        _JOBS[:] = todo
        ctx = multiprocessing.get_context("fork")
        done = {}
        with ctx.Pool(workers) as pool:
            for key, facts in pool.imap_unordered(compile_one, range(len(todo))):
                done[key] = facts
                if verbose and len(done) % 50 == 0:
                    print(f"aot: {len(done)} of {len(todo)} compiled", flush=True)
        for row in rows:
            if row["key"] in done:
                row.update(done[row["key"]])
    return path, rows, len(todo)


def _uses_dot(row):
    return row["kernel"] in DOT_KERNELS


# Kernels whose main work is a tl.dot on the inputs' dtype (half inputs must reach the tensor
# cores). ``_center_inter_kernel`` is not among them: its dots are IEEE fp32 on the class means
# (|classes|² · D, a few MFLOP), whatever the inputs' dtype.
DOT_KERNELS = {"_xattn_fwd_kernel", "_xattn_bwd_kernel", "_triplet_mine_kernel"}


def gate(rows):
    """The failures of the compile gate, one line each."""
    bad = []
    for r in rows:
        where = f"{r['kernel']} {r['arch']} {r['dtype']} {r['config']} {r['flags']}"
        if "error" in r:
            bad.append(f"does not compile: {where}: {r['error']}")
            continue
        half = r["dtype"] in ("bf16", "fp16")
        if half and r["arch"] == "sm_90a" and (r["spill_bytes"] or r["stack_bytes"]):
            bad.append(f"spills {r['spill_bytes']} B (stack {r['stack_bytes']} B): {where}")
        if r["shared_bytes"] > SHARED_LIMIT[r["arch"]]:
            bad.append(f"shared memory {r['shared_bytes']} B > {SHARED_LIMIT[r['arch']]}: {where}")
        if half and r["arch"] == "sm_90a" and _uses_dot(r) and r["dot_rows"] >= 64 and not r["hgmma"]:
            bad.append(f"no HGMMA on sm_90a: {where}")
        if r["membar_gpu"] or r["atom"]:
            bad.append(f"fenced atomics (MEMBAR.GPU {r['membar_gpu']}, ATOM {r['atom']}): {where}")
    return bad


def summary(rows):
    """One line per (kernel, arch, dtype): configs, max registers, spills, shared, HGMMA/HMMA, atomics."""
    groups: dict = {}
    for r in rows:
        if "error" in r:
            continue
        g = groups.setdefault((r["kernel"], r["arch"], r["dtype"]), [])
        g.append(r)
    lines = ["| kernel | arch | dtype | launches | max regs | spilling | max shared KB | HGMMA | HMMA | RED | fenced |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for (kernel, arch, dtype), g in sorted(groups.items()):
        lines.append(
            f"| {kernel} | {arch} | {dtype} | {len(g)} | {max(r['registers'] for r in g)} | "
            f"{sum(1 for r in g if r['spill_bytes'] or r['stack_bytes'])} | "
            f"{max(r['shared_bytes'] for r in g) / 1024:.0f} | {sum(1 for r in g if r['hgmma'])} | "
            f"{sum(1 for r in g if r['hmma'])} | {sum(1 for r in g if r['red'])} | "
            f"{sum(1 for r in g if r['membar_gpu'] or r['atom'])} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.aot", description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="exit 1 when the gate fails (and don't rewrite an up-to-date report)")
    p.add_argument("--workers", type=int, default=2, help="compile processes")
    args = p.parse_args(argv)
    from bench.common import compile_for_the_gpu

    compile_for_the_gpu("bench.aot")
    import triton

    from bench.common import env_info

    t0 = time.perf_counter()
    path, rows, compiled = build_report(workers=args.workers)
    text = summary(rows)
    print(text)
    bad = gate(rows)
    if compiled or not args.check:
        info = env_info("cpu")
        info.update(device="none (ahead-of-time compile for sm_90a and sm_80)", triton=triton.__version__)
        path.write_text(json.dumps({"info": info, "summary": text.splitlines(), "gate_failures": bad,
                                    "rows": sorted(rows, key=lambda r: (r["kernel"], r["arch"], r["dtype"], r["key"]))},
                                   indent=1) + "\n")
        print(f"aot: wrote {path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path}")
    print(f"aot: {len(rows)} launches, {compiled} compiled now, {time.perf_counter() - t0:.1f} s; "
          f"gate: {'pass' if not bad else f'{len(bad)} failure(s)'}")
    for line in bad:
        print("  " + line)
    return 1 if bad and args.check else 0


if __name__ == "__main__":
    sys.exit(main())

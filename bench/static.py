"""Static cost report: what each op does per call at the SPEC §8 shapes, without a GPU.

    python -m bench.static          # print the tables, write bench/results/static-triton<version>.json

Each op's launcher runs on meta tensors with its kernel launches recorded (a
``ccs_fast.kernels._common.Recording`` passed to it), once per autotune config the pruning keeps at
that shape, while a ``TorchDispatchMode`` counts the bytes that torch ops around the kernels
read and write (the "glue"). Each recorded launch is costed from its grid and tiling:

- tensor-core FLOPs executed: every ``tl.dot`` tile the programs issue, padding included
  (``executed``), and the same count over real rows and columns only (``algorithmic``);
  ``useful`` is the mathematics done once (attention: S once, two P·V forward; 2d + 4e
  backward; triplet: one distance matrix);
- bytes: ``compulsory`` (each input read once, each output written once) and ``tiles`` (what
  the programs load and store, L2 or HBM);
- atomics issued, by kind (relaxed integer max, relaxed fp32 add; none fenced);
- the roofline floor: max(FLOPs / 989 TFLOP/s bf16 dense, compulsory bytes / bandwidth) on an
  H100 SXM (3.35 TB/s) and an H200 (4.8 TB/s), datasheet figures.

These are static bounds, not timings: ``make gpu`` measures the times.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

RESULTS = Path(__file__).resolve().parent / "results"
PEAK_FLOPS = 989e12  # dense bf16, H100 SXM and H200 (datasheets)
BANDWIDTH = {"H100 SXM": 3.35e12, "H200": 4.8e12}
SMS = 132


# ----------------------------------------------------------------------------- glue bytes


_FREE = {"empty", "empty_like", "empty_strided", "detach", "lift_fresh", "_to_copy_noop"}


class GlueBytes(TorchDispatchMode):
    """Bytes read and written by torch ops (views and allocations are free)."""

    def __init__(self):
        super().__init__()
        self.bytes = 0
        self.ops: dict = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        aliases = any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns)
        if name in _FREE or aliases:
            return out
        moved = 0
        for t in _tensors(args) + _tensors(kwargs or {}):
            moved += t.numel() * t.element_size()
        for t in _tensors(out):
            moved += t.numel() * t.element_size()
        self.bytes += moved
        self.ops[name] = self.ops.get(name, 0) + moved
        return out


def _tensors(x):
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for v in x for t in _tensors(v)]
    if isinstance(x, dict):
        return [t for v in x.values() for t in _tensors(v)]
    return []


def _meta(*shape, dtype=torch.bfloat16):
    return torch.empty(*shape, device="meta", dtype=dtype)


def _size(t):
    return t.numel() * t.element_size()


def record(fn, configs):
    """(launches, glue bytes, glue by op) of one call of ``fn(recording)`` with these autotune configs."""
    from ccs_fast.kernels._common import Recording

    counter = GlueBytes()
    recording = Recording(configs)
    with counter:
        fn(recording)
    return recording.launches, counter.bytes, counter.ops


# ----------------------------------------------------------------------------- per-kernel costs


def _pad(n, b):
    return math.ceil(n / b) * b


def attention_launch_cost(la):
    """(executed tensor FLOPs, algorithmic FLOPs, tile bytes, atomics) of one attention launch."""
    a, m = la.args, la.meta
    if la.name == "_delta_kernel":
        dy, y = a[0], a[1]
        return 0, 0, _size(dy) + _size(y) + dy.shape[0] * dy.shape[1] * 4, 0
    if la.name == "_xattn_fwd_kernel":
        queries, keys, values = a[0], a[1], a[2]
        B, M, D = queries.shape
        N, E = keys.shape[1], values.shape[2]
        bm, bn, bd, be = m["BLOCK_M"], m["BLOCK_N"], m["BLOCK_D"], m["BLOCK_E"]
        slices = math.ceil(E / be)
        per_pair = 2 * (_pad(D, bd) + be) * slices  # S over padded d per value slice, P·V
        executed = B * _pad(M, bm) * _pad(N, bn) * per_pair
        algorithmic = B * M * N * 2 * (D * slices + E)
        es = queries.element_size()
        programs = math.ceil(M / bm) * slices * B
        tiles = programs * math.ceil(N / bn) * (bm * _pad(D, bd) + bn * _pad(D, bd) + bn * be) * es
        tiles += _size(queries) // D * E + B * M * 4  # y and the LSE
        return executed, algorithmic, tiles, 0
    if la.name == "_xattn_bwd_kernel":
        q, k = a[0], a[1]
        B, M, D = q.shape
        N, E = k.shape[1], a[2].shape[2]
        bm, bn, bd, be = m["BLOCK_M"], m["BLOCK_N"], m["BLOCK_D"], m["BLOCK_E"]
        # S (d), two dP (e), then the two owned outputs (d and e)
        executed = B * _pad(M, bm) * _pad(N, bn) * 2 * (2 * _pad(D, bd) + 3 * _pad(E, be))
        algorithmic = B * M * N * 2 * (2 * D + 3 * E)
        es = q.element_size()
        own_rows = m["OWN_ROWS"]
        owners, steps = (math.ceil(M / bm), math.ceil(N / bn)) if own_rows else (math.ceil(N / bn), math.ceil(M / bm))
        per_tile = (bm + bn) * _pad(D, bd) * es + 2 * (bm + bn) * _pad(E, be) * es  # q, k, dy/v both sides
        per_tile += (bn if own_rows else bm) * (_pad(D, bd) + _pad(E, be)) * es  # second operand of the outputs
        own = bm if own_rows else bn
        acc = own * (_pad(D, bd) + _pad(E, be)) * 4 * 2  # read + write of the owned fp32 rows per tile
        tiles = B * owners * steps * (per_tile + acc)
        return executed, algorithmic, tiles, 0
    raise KeyError(la.name)


def loss_launch_cost(la):
    """(executed, algorithmic, tile bytes, atomics by kind) of one triplet or center launch."""
    a, m = la.args, la.meta
    name = la.name
    atomics = {}
    if name == "_triplet_mine_kernel":
        z_a = a[0]
        B, D = z_a.shape
        bm, bn, bd = m["BLOCK_M"], m["BLOCK_N"], m["BLOCK_D"]
        rows, splits = la.grid[0], la.grid[1]
        executed = 2 * _pad(B, bm) * _pad(B, bn) * _pad(D, bd)
        algorithmic = 2 * B * B * D
        tiles = rows * math.ceil(B / bn) * (bm + bn) * _pad(D, bd) * z_a.element_size()
        atomics["int64 max (relaxed)"] = 2 * B * splits + (0 if m["SINGLE"] else 2 * rows * B)
        return executed, algorithmic, tiles, atomics
    if name == "_triplet_grad_kernel":
        anc = a[0]
        B, D = anc.shape
        es = anc.element_size()
        tiles = 2 * 3 * B * D * es + B * D * 4  # anchor, positive, negative rows (twice), anchor gradient
        if m["COMPUTE_GRAD"] and not m["DETERMINISTIC"]:
            atomics["fp32 add (relaxed), at most"] = 2 * B * D + (B * D if m["ANCHOR"] == 2 else 0)
            tiles += 2 * B * D * 4
        elif m["DETERMINISTIC"]:
            tiles += 2 * B * D * 4
        return 0, 0, tiles, atomics
    if name == "_segment_sum_kernel":
        src, out = a[0], a[5]
        return 0, 0, _size(src) + _size(out) * (2 if m["ACCUMULATE"] else 1), atomics
    if name == "_center_inter_kernel":
        mu = a[0]
        B, D = mu.shape
        bm, bn, bd = m["BLOCK_M"], m["BLOCK_N"], m["BLOCK_D"]
        C = STATIC_CLASSES
        dots = 2 if m["COMPUTE_GRAD"] else 1
        executed = dots * 2 * _pad(C, bm) * _pad(C, bn) * _pad(D, bd)
        return executed, dots * 2 * C * C * D, math.ceil(C / bm) * math.ceil(C / bn) * (bm + bn) * D * 4 * dots, atomics
    if name in ("_row_norm_kernel", "_finish_grad_kernel", "_center_intra_kernel",
                "_center_grad_kernel", "_triplet_count_kernel"):
        z = a[0]
        reads = _size(z)
        if name == "_row_norm_kernel" and m.get("ZERO"):
            reads += z.numel() * 4
        if name == "_finish_grad_kernel":
            reads += z.numel() * 4 + _size(z) * (2 if m["NORMALIZE"] else 0)
        if name in ("_center_intra_kernel", "_center_grad_kernel"):
            reads += z.numel() * 4 * 2
        return 0, 0, reads, atomics
    raise KeyError(name)


STATIC_CLASSES = 101  # classes in a center-loss batch at B = 8192 (UCF-101)


# ----------------------------------------------------------------------------- ops


def floors(flops, nbytes):
    return {name: round(max(flops / PEAK_FLOPS, nbytes / bw) * 1e6, 2) for name, bw in BANDWIDTH.items()}


def attention_rows(N, d=512, e=512, B=32):
    from ccs_fast.kernels import cross_attention as xa
    from ccs_fast.kernels._dispatch import Impl

    q, k, v_f, v_o = _meta(B, N, d), _meta(B, N, d), _meta(B, N, e), _meta(B, N, e)
    lse = _meta(B, N, dtype=torch.float32)
    rows = []
    fwd_in = sum(_size(t) for t in (q, k, v_f, v_o))
    outs = _size(v_f) + _size(v_o) + 2 * B * N * 4  # y_f, y_o and both LSE vectors
    compulsory = {"fwd": fwd_in + outs,  # inputs read once, outputs written once
                  "bwd": fwd_in + outs + _size(v_f) + _size(v_o) + fwd_in}  # + dy_f, dy_o in; four gradients out
    for mode, configs, call, kname in (
        ("fwd", xa.prune_configs(xa.fwd_configs(), d, e),
         lambda rec: xa.xattn_forward(q, k, v_f, v_o, 0.1, Impl.TRITON, rec), "_xattn_fwd_kernel"),
        ("bwd", xa.prune_configs(xa.bwd_configs(), d, e),
         lambda rec: xa.xattn_backward(q, k, v_f, v_o, v_f, v_o, lse, lse, v_f, v_o, 0.1, Impl.TRITON, rec),
         "_xattn_bwd_kernel"),
    ):
        for cfg in configs:
            launches, glue, glue_ops = record(call, {kname: cfg})
            executed = algorithmic = tiles = 0
            for la in launches:
                ex, al, tb, _ = attention_launch_cost(la)
                executed, algorithmic, tiles = executed + ex, algorithmic + al, tiles + tb
            useful = xa.useful_flops(mode, B, N, N, d, e)
            kernel_bytes = compulsory[mode]
            rows.append({
                "op": "cross_stream_attention", "mode": mode, "shape": f"B={B} N_f=N_o={N} d=e={d} bf16",
                "config": {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages},
                "launches": [la.name for la in launches],
                "programs": [math.prod(la.grid) for la in launches],
                "flops_useful": useful, "flops_algorithmic": algorithmic, "flops_executed": executed,
                "executed_over_useful": round(algorithmic / useful, 4),
                "executed_over_useful_with_padding": round(executed / useful, 4),
                "bytes_compulsory": kernel_bytes, "bytes_tiles": tiles,
                "bytes_glue": glue, "glue_ops": glue_ops, "glue_fraction": round(glue / kernel_bytes, 4),
                "atomics": 0, "fenced_atomics": 0,
                "floor_us": floors(executed, kernel_bytes),
            })
    return rows


def attention_backward_alternatives(N, d=512, e=512, B=32, bm=64, bn=64):
    """The chosen two-pass backward against the one-pass atomic designs, per call."""
    pairs = 2 * B * N * N
    tiles = B * math.ceil(N / bm) * math.ceil(N / bn)
    useful = pairs * (2 * d + 4 * e)
    designs = {
        "two passes, owned rows (chosen)": (pairs * (4 * d + 6 * e), 0),
        "one pass, dq and dv_f by relaxed atomics": (pairs * (3 * d + 4 * e), tiles * bm * (d + e)),
        "one pass, all four gradients by fenced atomics (before)": (pairs * (3 * d + 4 * e), tiles * (bm + bn) * (d + e)),
    }
    out = []
    for name, (flops, atomics) in designs.items():
        out.append({"design": name, "shape": f"B={B} N={N} d=e={d}", "flops_executed": flops,
                    "executed_over_useful": round(flops / useful, 3), "fp32_atomics": atomics,
                    "atomic_bytes": atomics * 4,
                    "tensor_core_floor_us": round(flops / PEAK_FLOPS * 1e6, 1)})
    return out


def loss_rows(B=8192, D=512):
    from ccs_fast.kernels import center, triplet
    from ccs_fast.kernels._dispatch import Impl

    rows = []
    z_f, z_o = _meta(B, D), _meta(B, D)
    labels = _meta(B, dtype=torch.int64)
    go = _meta((), dtype=torch.float32)

    def full_triplet(det):
        def call(rec):
            from ccs_fast.kernels.normalize import finish_grad

            _, pf, po = triplet.triplet_forward(z_f, z_o, labels, 0.3, True, single=False, compute_grad=True,
                                                impl=Impl.TRITON, deterministic=det, record=rec)
            finish_grad(pf.z, pf.r, pf.g, go, True, Impl.TRITON, rec)
            finish_grad(po.z, po.r, po.g, go, True, Impl.TRITON, rec)
        return call

    def full_center(rec):
        from ccs_fast.kernels.normalize import finish_grad

        _, p = center.center_forward(z_f, labels, 0.3, 0.8, True, compute_grad=True, impl=Impl.TRITON, record=rec)
        finish_grad(p.z, p.r, p.g, go, True, Impl.TRITON, rec)

    compulsory = {"triplet": 2 * _size(z_f) * 2 + B * 8, "center": 2 * _size(z_f) + B * 8}
    cases = [("cross_modal_triplet_loss", "fwd+bwd", cfg, full_triplet(False), {"_triplet_mine_kernel": cfg}, "triplet")
             for cfg in triplet.prune_configs(triplet.mine_configs(), B, D)]
    cases.append(("cross_modal_triplet_loss", "fwd+bwd deterministic", triplet.mine_configs()[0], full_triplet(True),
                  {"_triplet_mine_kernel": triplet.mine_configs()[0]}, "triplet"))
    cases.append(("discriminative_embedding_loss", f"fwd+bwd, {STATIC_CLASSES} classes", None, full_center, {}, "center"))
    for op, mode, cfg, call, configs, kind in cases:
        launches, glue, glue_ops = record(call, configs)
        executed = algorithmic = tiles = 0
        atomics: dict = {}
        for la in launches:
            ex, al, tb, at = loss_launch_cost(la)
            executed, algorithmic, tiles = executed + ex, algorithmic + al, tiles + tb
            for k_, v in at.items():
                atomics[k_] = atomics.get(k_, 0) + v
        useful = 2 * B * B * D if kind == "triplet" else 2 * STATIC_CLASSES ** 2 * D * 2
        mine = [la for la in launches if la.name == "_triplet_mine_kernel"]
        rows.append({
            "op": op, "mode": mode, "shape": f"B={B} D={D} bf16",
            "config": None if cfg is None else {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages},
            "launches": [la.name for la in launches],
            "mining_programs": math.prod(mine[0].grid) if mine else None,
            "mining_waves_on_132_SMs": round(math.prod(mine[0].grid) / SMS, 2) if mine else None,
            "flops_useful": useful, "flops_algorithmic": algorithmic, "flops_executed": executed,
            "executed_over_useful": round(executed / useful, 4) if useful else None,
            "bytes_compulsory": compulsory[kind], "bytes_tiles": tiles,
            "bytes_glue": glue, "glue_ops": glue_ops, "glue_fraction": round(glue / tiles, 4),
            "glue_over_compulsory": round(glue / compulsory[kind], 4),
            "atomics": atomics, "fenced_atomics": 0,
            "floor_us": floors(executed, compulsory[kind]),
        })
    return rows


def table(rows, cols):
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        vals = []
        for c in cols:
            v = r.get(c)
            if isinstance(v, float):
                v = f"{v:.3g}"
            elif isinstance(v, int) and v > 10**6:
                v = f"{v:.3g}"
            elif isinstance(v, dict):
                v = ", ".join(f"{k}={x}" for k, x in v.items())
            vals.append("" if v is None else str(v))
        lines.append("| " + " | ".join(vals) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.static", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/static-triton<version>.json)")
    args = p.parse_args(argv)
    from bench.common import compile_for_the_gpu

    compile_for_the_gpu("bench.static")
    import triton

    from bench.common import env_info

    att = attention_rows(588) + attention_rows(1225)
    alt = attention_backward_alternatives(588) + attention_backward_alternatives(1225)
    losses = loss_rows()
    print(table(att, ["mode", "shape", "config", "executed_over_useful", "executed_over_useful_with_padding",
                      "bytes_compulsory", "bytes_glue", "glue_fraction", "atomics", "floor_us"]))
    print()
    print(table(alt, ["design", "shape", "executed_over_useful", "fp32_atomics", "tensor_core_floor_us"]))
    print()
    print(table(losses, ["op", "mode", "config", "mining_programs", "mining_waves_on_132_SMs", "executed_over_useful",
                         "bytes_tiles", "bytes_glue", "glue_fraction", "atomics", "floor_us"]))
    info = env_info("cpu")
    info.update(device="none (static count on meta tensors)", triton=triton.__version__)
    out = args.out or RESULTS / f"static-triton{triton.__version__}.json"
    out.write_text(json.dumps({"info": info, "attention": att, "attention_backward_designs": alt, "losses": losses},
                              indent=1) + "\n")
    print(f"static: wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

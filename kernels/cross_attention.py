"""Cross-stream attention (SPEC §2.1, §3): one score matrix, two softmaxes.

    S   = scale · q kᵀ                       (B, N_f, N_o)
    y_f = softmax_over_j(S) · v_o            (B, N_f, e)    row softmax: RGB gathers motion
    y_o = softmax_over_i(S)ᵀ · v_f           (B, N_o, e)    column softmax: flow gathers appearance

Algorithm
---------
Forward. Sᵀ = scale · k qᵀ, so the column direction is the row direction with the roles of q
and k swapped, and one flash-style kernel (``_xattn_fwd_kernel``) runs twice: a row pass
(queries q, keys k, values v_o) gives y_f and the row log-sum-exp, a column pass (queries k,
keys q, values v_f) gives y_o and the column log-sum-exp. A program owns BLOCK_M query rows
and BLOCK_E value features, walks the keys in tiles, builds each S tile from BLOCK_D-wide
slices of the features (any d) and keeps an online softmax (running max m, sum l) with its
fp32 accumulator in registers. BLOCK_E is the value width rounded up to a power of two, up to
512, so for e ≤ 512 each S tile is built once per direction: S twice in all, the least
possible without an N_f × N_o matrix in memory (the column statistics need every row).
For e > 512 the values are split into 512-wide slices and S is rebuilt once per slice.
Softmaxes use exp2 with log2(e) folded into the scale; the saved LSE vectors are in base 2.
Padded key columns are -inf before the max, and every key tile holds at least one real key.

Backward (no atomics; FlashAttention-2's split by ownership). ``_delta_kernel`` computes
Δ_row = rowsum(dy_f ⊙ y_f) and Δ_col = rowsum(dy_o ⊙ y_o) in fp32. Then one kernel,
``_xattn_bwd_kernel``, runs twice: once with each program owning a block of S's columns
(it writes dk and dv_o) and once owning a block of rows (dq and dv_f). Both recompute, per
S tile,

    P_row = exp(S − lse_row)   P_col = exp(S − lse_col)
    dS    = P_row ⊙ (dy_f v_oᵀ − Δ_row) + P_col ⊙ (v_f dy_oᵀ − Δ_col)
    columns:  dk += scale · dSᵀ q    dv_o += P_rowᵀ dy_f
    rows:     dq += scale · dS k     dv_f += P_col dy_o

A program is the only writer of its output rows, so it accumulates them in place with plain
loads and stores (a barrier per tile orders them among its threads), BLOCK_D / BLOCK_E
columns at a time, in an fp32 scratch for half inputs; the first tile stores without reading
(no zeroing) and the last stores in the input dtype (no cast afterwards). The gradients are
therefore bit-identical run to run.

Memory: O(B·(N_f + N_o)·(d + e)): outputs, the fp32 scratch of half-precision gradients and
four vectors; nothing of size N_f × N_o exists in device memory.

Work (multiply-adds × 2), see ``executed_flops``: useful forward 2·B·N_f·N_o·(d + 2e) (S once,
two P·V products), executed 2·B·N_f·N_o·(2d·⌈e/512⌉ + 2e); useful backward
2·B·N_f·N_o·(2d + 4e), executed 2·B·N_f·N_o·(4d + 6e) (each pass rebuilds S, dP_row and
dP_col). At d = e = 512: forward 4/3 of the useful work, backward 5/3.
The one-pass alternative (dq and dv_f merged by atomics across column programs) executes
3d + 4e but issues BLOCK_M·(d + e) fp32 atomics per S tile; ``bench.static`` compares both.

Static figures (``python -m bench.static`` and ``python -m bench.aot``, Triton 3.8), at the
SPEC §8 shapes B = 32, N_f = N_o ∈ {588, 1225}, d = e = 512, bf16:
- executed / useful tensor FLOPs over real rows and columns: forward 4/3, backward 5/3; with
  the 64-row tiles' padding 1.58 / 1.46 forward and 1.97 / 1.82 backward (N = 588 / 1225);
- atomics: none (the one-pass backward this replaced issued 4.2·10⁸ / 1.7·10⁹ fenced fp32
  atomics per call); torch ops around the kernels move 0 bytes (allocations only);
- floor at 989 TFLOP/s (tensor-bound on H100 and H200): forward 54 / 217 µs, backward
  136 / 543 µs;
- sm_90a: every half-precision config issues HGMMA, with at most 253 registers (forward) and
  222 (backward) per thread and no spills; fp32 inputs do spill (reported, not gated).

Known limits
------------
- GPU timings: not yet measured, see bench/results/README.md; the autotune candidates are
  pruned by the compile gate (``bench.aot``: no spills, wgmma on sm_90a), not by timings.
- The owned gradient rows of the backward are accumulated through memory (L2), one
  BLOCK_D / BLOCK_E slice per S tile; d + e = 1024 fp32 accumulators per row do not fit in
  registers beside the S, P and dS tiles. What that costs in time is to be measured.
- fp32 inputs use IEEE fp32 dots unless ``torch.backends.cuda.matmul.allow_tf32`` is set.
- Inputs must be fp32, fp16 or bf16 for the Triton path (fp64 runs on the eager reference).
- Under TRITON_INTERPRET, bf16 dot operands are widened to fp32 (``_common.dot_fp32``).
- The registered backward (``ccs_fast::cross_stream_attention_backward``) is not itself
  differentiable: no double backward.
"""
import math

import torch
from torch import Tensor

from ccs_fast.kernels._common import (
    autograd_inside_op,
    autotuned,
    block_size,
    check_dtype,
    dot_fp32,
    dot_precision,
    launch,
    tl,
    triton,
)
from ccs_fast.kernels._dispatch import Impl, resolve_impl

LOG2E = 1.4426950408889634
MAX_BLOCK_E = 512  # widest value slice a forward program holds (BLOCK_M × BLOCK_E fp32 accumulator)


def _check_inputs(q, k, v_f, v_o):
    for name, t in (("q", q), ("k", k), ("v_f", v_f), ("v_o", v_o)):
        if t.dim() != 3:
            raise ValueError(f"cross_stream_attention: {name} must be 3-D (B, N, features), got {tuple(t.shape)}")
    B, N_f, d = q.shape
    N_o = k.shape[1]
    if k.shape[0] != B or k.shape[2] != d:
        raise ValueError(f"cross_stream_attention: k {tuple(k.shape)} must be (B={B}, N_o, d={d})")
    if v_f.shape[:2] != (B, N_f):
        raise ValueError(f"cross_stream_attention: v_f {tuple(v_f.shape)} must be (B={B}, N_f={N_f}, e)")
    if v_o.shape[:2] != (B, N_o) or v_o.shape[2] != v_f.shape[2]:
        raise ValueError(
            f"cross_stream_attention: v_o {tuple(v_o.shape)} must be (B={B}, N_o={N_o}, e={v_f.shape[2]})"
        )


if triton is not None:
    from ccs_fast.kernels._common import dot as _dot

    @triton.jit
    def _abt_tile(a_base, stride_ar, stride_af, b_base, stride_bc, stride_bf, offs_m, offs_n, row_ok, col_ok, F,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr,
                  DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr):
        # a[rows] b[cols]ᵀ in fp32 over BLOCK_F-wide slices of the F features: q kᵀ (F = d),
        # dy_f v_oᵀ or v_f dy_oᵀ (F = e)
        ab = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for start_f in range(0, F, BLOCK_F):
            offs_f = start_f + tl.arange(0, BLOCK_F)
            f_ok = offs_f < F
            a = tl.load(a_base + offs_m[:, None] * stride_ar + offs_f[None, :] * stride_af,
                        mask=row_ok[:, None] & f_ok[None, :], other=0.0)
            bt = tl.load(b_base + offs_n[None, :] * stride_bc + offs_f[:, None] * stride_bf,
                         mask=f_ok[:, None] & col_ok[None, :], other=0.0)
            ab += _dot(a, bt, DOT_PRECISION, DOT_FP32)
        return ab

    @triton.jit
    def _xattn_fwd_kernel(
        q_ptr, k_ptr, v_ptr, y_ptr, lse_ptr,
        stride_qb, stride_qm, stride_qd,
        stride_kb, stride_kn, stride_kd,
        stride_vb, stride_vn, stride_ve,
        stride_yb, stride_ym, stride_ye,
        stride_lb,
        M, N, D, E,
        qk_scale,
        M_BUCKET, N_BUCKET,  # autotune keys only
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
        DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
    ):
        pid_m = tl.program_id(0).to(tl.int64)
        pid_e = tl.program_id(1).to(tl.int64)
        pid_b = tl.program_id(2).to(tl.int64)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
        row_ok = offs_m < M
        e_ok = offs_e < E
        q_base = q_ptr + pid_b * stride_qb
        k_base = k_ptr + pid_b * stride_kb
        v_base = v_ptr + pid_b * stride_vb

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_E], dtype=tl.float32)
        for start_n in range(0, N, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            col_ok = offs_n < N
            # s = q kᵀ over BLOCK_D-wide feature slices
            s = _abt_tile(q_base, stride_qm, stride_qd, k_base, stride_kn, stride_kd, offs_m, offs_n, row_ok,
                          col_ok, D, BLOCK_M, BLOCK_N, BLOCK_D, DOT_PRECISION, DOT_FP32)
            # s₂ = scale·log2(e)·q kᵀ, padded keys -inf (each tile has ≥ 1 real key)
            s = tl.where(col_ok[None, :], s * qk_scale, float("-inf"))
            # online softmax: m' = max(m, rowmax s₂); acc = acc·2^(m−m') + 2^(s₂−m') v
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_e[None, :] * stride_ve,
                        mask=col_ok[:, None] & e_ok[None, :], other=0.0)
            acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_PRECISION, DOT_FP32)
            m_i = m_new
        # y = acc / l;  lse₂ = m + log2(l)
        acc = acc / l_i[:, None]
        tl.store(y_ptr + pid_b * stride_yb + offs_m[:, None] * stride_ym + offs_e[None, :] * stride_ye,
                 acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & e_ok[None, :])
        if pid_e == 0:
            tl.store(lse_ptr + pid_b * stride_lb + offs_m, m_i + tl.log2(l_i), mask=row_ok)

    @triton.jit
    def _delta_kernel(dy_ptr, y_ptr, delta_ptr, R, E,
                      stride_dyb, stride_dyr, stride_dye, stride_yb, stride_yr, stride_ye,
                      BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr):
        # Δ = rowsum(dy ⊙ y) in fp32, into a contiguous (B, R) vector
        pid_r = tl.program_id(0).to(tl.int64)
        pid_b = tl.program_id(1).to(tl.int64)
        rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < R
        acc = tl.zeros([BLOCK_R], dtype=tl.float32)
        for start_e in range(0, E, BLOCK_E):
            offs_e = start_e + tl.arange(0, BLOCK_E)
            m = row_ok[:, None] & (offs_e < E)[None, :]
            dy = tl.load(dy_ptr + pid_b * stride_dyb + rows[:, None] * stride_dyr + offs_e[None, :] * stride_dye,
                         mask=m, other=0.0)
            y = tl.load(y_ptr + pid_b * stride_yb + rows[:, None] * stride_yr + offs_e[None, :] * stride_ye,
                        mask=m, other=0.0)
            acc += tl.sum(dy.to(tl.float32) * y.to(tl.float32), axis=1)
        tl.store(delta_ptr + pid_b * R + rows, acc, mask=row_ok)

    @triton.jit
    def _accumulate(acc_ptrs, out_ptrs, mask, contrib, first, last):
        # owned rows: total = (earlier tiles' sum) + contrib; fp32 scratch until the last tile
        # (masked stores, not an if: Triton 3.6's software pipeliner rejects stores under scf.if)
        prev = tl.load(acc_ptrs, mask=mask & (first == 0), other=0.0)
        total = prev + contrib
        tl.store(out_ptrs, total.to(out_ptrs.dtype.element_ty), mask=mask & last)
        tl.store(acc_ptrs, total, mask=mask & (last == 0))

    @triton.jit
    def _xattn_bwd_kernel(
        q_ptr, k_ptr, vf_ptr, vo_ptr, dyf_ptr, dyo_ptr,
        lse_row_ptr, lse_col_ptr, delta_row_ptr, delta_col_ptr,
        out_d_ptr, out_e_ptr, acc_d_ptr, acc_e_ptr,
        stride_qb, stride_qm, stride_qd,
        stride_kb, stride_kn, stride_kd,
        stride_vfb, stride_vfm, stride_vfe,
        stride_vob, stride_von, stride_voe,
        stride_dyfb, stride_dyfm, stride_dyfe,
        stride_dyob, stride_dyon, stride_dyoe,
        M, N, D, E,
        scale, qk_scale,
        M_BUCKET, N_BUCKET,  # autotune keys only
        OWN_ROWS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
        DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
    ):
        # OWN_ROWS: this program owns BLOCK_M rows of S and writes dq (out_d) and dv_f (out_e);
        # else it owns BLOCK_N columns and writes dk (out_d) and dv_o (out_e). Outputs and fp32
        # scratch are contiguous (B, rows or columns, D | E); lse and Δ are contiguous (B, M | N).
        pid = tl.program_id(0).to(tl.int64)
        pid_b = tl.program_id(1).to(tl.int64)
        q_base = q_ptr + pid_b * stride_qb
        k_base = k_ptr + pid_b * stride_kb
        vf_base = vf_ptr + pid_b * stride_vfb
        vo_base = vo_ptr + pid_b * stride_vob
        dyf_base = dyf_ptr + pid_b * stride_dyfb
        dyo_base = dyo_ptr + pid_b * stride_dyob
        if OWN_ROWS:
            offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
            steps = tl.cdiv(N, BLOCK_N)
            out_rows = offs_m
            out_ok = offs_m < M
            owned = M
        else:
            offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
            steps = tl.cdiv(M, BLOCK_M)
            out_rows = offs_n
            out_ok = offs_n < N
            owned = N
        for step in range(0, steps):
            if OWN_ROWS:
                offs_n = step * BLOCK_N + tl.arange(0, BLOCK_N)
            else:
                offs_m = step * BLOCK_M + tl.arange(0, BLOCK_M)
            row_ok = offs_m < M
            col_ok = offs_n < N
            valid = row_ok[:, None] & col_ok[None, :]
            lse_row = tl.load(lse_row_ptr + pid_b * M + offs_m, mask=row_ok, other=0.0)
            delta_row = tl.load(delta_row_ptr + pid_b * M + offs_m, mask=row_ok, other=0.0)
            lse_col = tl.load(lse_col_ptr + pid_b * N + offs_n, mask=col_ok, other=0.0)
            delta_col = tl.load(delta_col_ptr + pid_b * N + offs_n, mask=col_ok, other=0.0)
            # s₂ = scale·log2(e)·q kᵀ
            s = _abt_tile(q_base, stride_qm, stride_qd, k_base, stride_kn, stride_kd, offs_m, offs_n, row_ok,
                          col_ok, D, BLOCK_M, BLOCK_N, BLOCK_D, DOT_PRECISION, DOT_FP32) * qk_scale
            # ds = P_row ⊙ (dy_f v_oᵀ − Δ_row) + P_col ⊙ (v_f dy_oᵀ − Δ_col). The term whose P the
            # outputs don't need comes first, so at most three tiles (s, ds, dP or P) are live.
            if OWN_ROWS:
                dp = _abt_tile(dyf_base, stride_dyfm, stride_dyfe, vo_base, stride_von, stride_voe,
                              offs_m, offs_n, row_ok, col_ok, E, BLOCK_M, BLOCK_N, BLOCK_E, DOT_PRECISION, DOT_FP32)
                ds = tl.where(valid, tl.exp2(s - lse_row[:, None]), 0.0) * (dp - delta_row[:, None])
                dp = _abt_tile(vf_base, stride_vfm, stride_vfe, dyo_base, stride_dyon, stride_dyoe,
                              offs_m, offs_n, row_ok, col_ok, E, BLOCK_M, BLOCK_N, BLOCK_E, DOT_PRECISION, DOT_FP32)
                p = tl.where(valid, tl.exp2(s - lse_col[None, :]), 0.0)  # P_col, for dv_f
                ds += p * (dp - delta_col[None, :])
            else:
                dp = _abt_tile(vf_base, stride_vfm, stride_vfe, dyo_base, stride_dyon, stride_dyoe,
                              offs_m, offs_n, row_ok, col_ok, E, BLOCK_M, BLOCK_N, BLOCK_E, DOT_PRECISION, DOT_FP32)
                ds = tl.where(valid, tl.exp2(s - lse_col[None, :]), 0.0) * (dp - delta_col[None, :])
                dp = _abt_tile(dyf_base, stride_dyfm, stride_dyfe, vo_base, stride_von, stride_voe,
                              offs_m, offs_n, row_ok, col_ok, E, BLOCK_M, BLOCK_N, BLOCK_E, DOT_PRECISION, DOT_FP32)
                p = tl.where(valid, tl.exp2(s - lse_row[:, None]), 0.0)  # P_row, for dv_o
                ds += p * (dp - delta_row[:, None])
            first = step == 0
            last = step == steps - 1
            if OWN_ROWS:
                # dq += scale · dS k;  dv_f += P_col dy_o
                for start_d in range(0, D, BLOCK_D):
                    offs_d = start_d + tl.arange(0, BLOCK_D)
                    d_ok = offs_d < D
                    k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                                mask=col_ok[:, None] & d_ok[None, :], other=0.0)
                    idx = pid_b * owned * D + out_rows[:, None] * D + offs_d[None, :]
                    _accumulate(acc_d_ptr + idx, out_d_ptr + idx, out_ok[:, None] & d_ok[None, :],
                                _dot(ds.to(k.dtype), k, DOT_PRECISION, DOT_FP32) * scale, first, last)
                for start_e in range(0, E, BLOCK_E):
                    offs_e = start_e + tl.arange(0, BLOCK_E)
                    e_ok = offs_e < E
                    dyo = tl.load(dyo_base + offs_n[:, None] * stride_dyon + offs_e[None, :] * stride_dyoe,
                                  mask=col_ok[:, None] & e_ok[None, :], other=0.0)
                    idx = pid_b * owned * E + out_rows[:, None] * E + offs_e[None, :]
                    _accumulate(acc_e_ptr + idx, out_e_ptr + idx, out_ok[:, None] & e_ok[None, :],
                                _dot(p.to(dyo.dtype), dyo, DOT_PRECISION, DOT_FP32), first, last)
            else:
                # dk += scale · dSᵀ q;  dv_o += P_rowᵀ dy_f
                for start_d in range(0, D, BLOCK_D):
                    offs_d = start_d + tl.arange(0, BLOCK_D)
                    d_ok = offs_d < D
                    q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
                    idx = pid_b * owned * D + out_rows[:, None] * D + offs_d[None, :]
                    _accumulate(acc_d_ptr + idx, out_d_ptr + idx, out_ok[:, None] & d_ok[None, :],
                                _dot(tl.trans(ds).to(q.dtype), q, DOT_PRECISION, DOT_FP32) * scale, first, last)
                for start_e in range(0, E, BLOCK_E):
                    offs_e = start_e + tl.arange(0, BLOCK_E)
                    e_ok = offs_e < E
                    dyf = tl.load(dyf_base + offs_m[:, None] * stride_dyfm + offs_e[None, :] * stride_dyfe,
                                  mask=row_ok[:, None] & e_ok[None, :], other=0.0)
                    idx = pid_b * owned * E + out_rows[:, None] * E + offs_e[None, :]
                    _accumulate(acc_e_ptr + idx, out_e_ptr + idx, out_ok[:, None] & e_ok[None, :],
                                _dot(tl.trans(p).to(dyf.dtype), dyf, DOT_PRECISION, DOT_FP32), first, last)
            # the next tile reads what this one stored, possibly from other threads
            tl.debug_barrier()


# ----------------------------------------------------------------------------- configs

# Interpreter blocks: large enough that the interpreter runs few iterations, small enough
# that the tests still cross tile boundaries (N = 7, 147, 200; d or e = 40, 1000, 1024).
def _cpu_blocks(D, E):
    # wide features take 128-wide slices: the interpreter's cost is per slice, not per element
    return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_D=32 if D <= 256 else 128, BLOCK_E=32 if E <= 256 else 128)


def _bucket(n: int) -> int:
    # autotune key: powers of two up to 4096, so nearby sizes share a tuned config
    return block_size(n, hi=4096)


def fwd_block_e(E: int) -> int:
    """Value slice of a forward program: all of e (rounded up to a power of two, ≥ 16) up to 512."""
    return block_size(E, lo=16, hi=MAX_BLOCK_E)


# Candidates (BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages). BLOCK_M ≥ 64 everywhere: a
# Hopper warpgroup MMA (wgmma, HGMMA in SASS) is 64 rows tall. Forward: BLOCK_E comes from
# ``fwd_block_e``; its fp32 accumulator takes BLOCK_M·BLOCK_E / (32·num_warps) registers per
# thread, and ``prune_configs`` keeps the configs that fit beside it without spills (16 warps
# would cap a thread at 128 registers: no room for a 512-wide accumulator).
FWD_CONFIGS = (
    (64, 64, 64, 4, 2),
    (64, 64, 64, 8, 2),
    (64, 64, 64, 8, 3),
    (64, 64, 32, 8, 3),
    (64, 128, 64, 8, 2),
    (128, 64, 64, 8, 2),
    (128, 128, 64, 8, 2),
    (64, 64, 128, 8, 2),
)
# Backward (BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_E, num_warps, num_stages): three BLOCK_M × BLOCK_N
# fp32 tiles live at once (S, dS and dP or P). The column pass's output dots are BLOCK_N rows
# tall, so BLOCK_N ≥ 64 too. Larger tiles (128 × 64, 64 × 128) and 4 warps spill on sm_90a.
BWD_CONFIGS = (
    (64, 64, 64, 64, 8, 2),
    (64, 64, 64, 64, 8, 3),
    (64, 64, 32, 64, 8, 2),
    (64, 64, 32, 32, 8, 3),
)


def _config(kwargs, warps, stages):
    return triton.Config(kwargs, num_warps=warps, num_stages=stages)


def fwd_configs():
    return [_config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd), w, st) for bm, bn, bd, w, st in FWD_CONFIGS]


def bwd_configs():
    return [_config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, BLOCK_E=be), w, st)
            for bm, bn, bd, be, w, st in BWD_CONFIGS]


def _fits(config, D, E):
    kw = config.kwargs
    if kw["BLOCK_D"] > block_size(D, lo=64):  # no feature slice wider than d needs
        return False
    if "BLOCK_E" in kw:  # backward: no value slice wider than e needs
        return kw["BLOCK_E"] <= block_size(E, lo=64)
    # forward, by the compile gate on sm_90a: the accumulator plus the S tile within 144 fp32
    # registers per thread, and 128-wide feature slices only beside values up to 256 wide
    block_e = fwd_block_e(E)
    return (kw["BLOCK_M"] * (block_e + kw["BLOCK_N"]) <= 144 * 32 * config.num_warps
            and (kw["BLOCK_D"] <= 64 or block_e <= 256))


def prune_configs(configs, D, E):
    """The candidates the autotuner may choose from at feature sizes (d, e)."""
    kept = [c for c in configs if _fits(c, D, E)]
    return kept or configs[:1]


def _prune(configs, named_args, **kwargs):
    return prune_configs(configs, named_args["D"], named_args["E"])


_tuned = {}


def _kernel(name, D, E):
    """The kernel to launch and its fixed blocks: interpreter blocks on CPU, autotuned on CUDA."""
    raw = {"fwd": _xattn_fwd_kernel, "bwd": _xattn_bwd_kernel}[name]
    if name not in _tuned:
        keys = ["M_BUCKET", "N_BUCKET", "D", "E"] + (["OWN_ROWS"] if name == "bwd" else [])
        configs = fwd_configs() if name == "fwd" else bwd_configs()
        _tuned[name] = triton.autotune(configs, key=keys, prune_configs_by={"early_config_prune": _prune})(raw)
    return _tuned[name]


def _empty_output(shape, device, dtype):
    # every element is written by the kernel; tests swap in NaN-filled buffers to prove it
    return torch.empty(shape, device=device, dtype=dtype)


# ----------------------------------------------------------------------------- launchers


def _attend(queries, keys, values, scale, impl, record):
    """One forward pass: (softmax over keys of scale·queries keysᵀ) values, and base-2 LSE."""
    B, M, D = queries.shape
    N, E = keys.shape[1], values.shape[2]
    y = _empty_output((B, M, E), queries.device, queries.dtype)
    lse = _empty_output((B, M), queries.device, torch.float32)
    if autotuned(impl):
        kernel, blocks = _kernel("fwd", D, E), dict(BLOCK_E=fwd_block_e(E))
    else:
        kernel, blocks = _xattn_fwd_kernel, _cpu_blocks(D, E)

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(E, meta["BLOCK_E"]), B)

    launch(kernel, grid,
           queries, keys, values, y, lse,
           *queries.stride(), *keys.stride(), *values.stride(), *y.stride(), lse.stride(0),
           M, N, D, E, scale * LOG2E, _bucket(M), _bucket(N), record=record,
           DOT_PRECISION=dot_precision(queries.dtype, impl), DOT_FP32=dot_fp32(queries.dtype, impl), **blocks)
    return y, lse


def _check_launch(q, k, v_f, v_o):
    _check_inputs(q, k, v_f, v_o)
    check_dtype("cross_stream_attention", q)
    assert q.dtype == k.dtype == v_f.dtype == v_o.dtype, "inputs must share one dtype"
    assert q.device == k.device == v_f.device == v_o.device, "inputs must share one device"
    assert min(q.shape) >= 1 and min(k.shape) >= 1 and v_f.shape[2] >= 1, "empty inputs"


def xattn_forward(q, k, v_f, v_o, scale, impl, record=None):
    """Launch both forward passes: returns y_f, y_o, lse_row (B, N_f), lse_col (B, N_o) (base 2).
    ``record``: a ``_common.Recording`` that takes the launches."""
    _check_launch(q, k, v_f, v_o)
    y_f, lse_row = _attend(q, k, v_o, scale, impl, record)  # rows of S:    queries q, keys k
    y_o, lse_col = _attend(k, q, v_f, scale, impl, record)  # columns of S: queries k, keys q (Sᵀ = scale·k qᵀ)
    return y_f, y_o, lse_row, lse_col


def _delta(dy, y, record):
    B, R, E = y.shape
    delta = torch.empty((B, R), device=y.device, dtype=torch.float32)
    launch(_delta_kernel, (triton.cdiv(R, 32), B), dy, y, delta, R, E, *dy.stride(), *y.stride(),
           BLOCK_R=32, BLOCK_E=block_size(E, lo=16, hi=128), record=record)
    return delta


def xattn_backward(q, k, v_f, v_o, y_f, y_o, lse_row, lse_col, dy_f, dy_o, scale, impl, record=None):
    """Gradients (dq, dk, dv_f, dv_o) in the input dtype: Δ, then the row and column passes."""
    _check_launch(q, k, v_f, v_o)
    assert dy_f.shape == y_f.shape and dy_o.shape == y_o.shape, "grad_output shapes"
    B, M, D = q.shape
    N, E = k.shape[1], v_f.shape[2]
    dy_f = dy_f.to(q.dtype)
    dy_o = dy_o.to(q.dtype)
    delta_row, delta_col = _delta(dy_f, y_f, record), _delta(dy_o, y_o, record)
    lse_row, lse_col = lse_row.contiguous(), lse_col.contiguous()
    grads = {}
    for own_rows, (rows, out_d, out_e) in ((True, (M, "dq", "dv_f")), (False, (N, "dk", "dv_o"))):
        g_d = _empty_output((B, rows, D), q.device, q.dtype)
        g_e = _empty_output((B, rows, E), q.device, q.dtype)
        # fp32 gradients accumulate in place; half ones in an fp32 scratch, cast at the last tile
        s_d = g_d if q.dtype == torch.float32 else _empty_output((B, rows, D), q.device, torch.float32)
        s_e = g_e if q.dtype == torch.float32 else _empty_output((B, rows, E), q.device, torch.float32)
        if autotuned(impl):
            kernel, blocks = _kernel("bwd", D, E), {}
        else:
            kernel, blocks = _xattn_bwd_kernel, _cpu_blocks(D, E)

        def grid(meta, own_rows=own_rows, rows=rows):
            return (triton.cdiv(rows, meta["BLOCK_M" if own_rows else "BLOCK_N"]), B)

        launch(kernel, grid,
               q, k, v_f, v_o, dy_f, dy_o, lse_row, lse_col, delta_row, delta_col,
               g_d, g_e, s_d, s_e,
               *q.stride(), *k.stride(), *v_f.stride(), *v_o.stride(), *dy_f.stride(), *dy_o.stride(),
               M, N, D, E, scale, scale * LOG2E, _bucket(M), _bucket(N), record=record,
               OWN_ROWS=own_rows, DOT_PRECISION=dot_precision(q.dtype, impl), DOT_FP32=dot_fp32(q.dtype, impl), **blocks)
        grads[out_d], grads[out_e] = g_d, g_e
    return grads["dq"], grads["dk"], grads["dv_f"], grads["dv_o"]


def executed_flops(mode, B, N_f, N_o, d, e):
    """FLOPs the Triton kernels execute (``mode``: "fwd", "bwd" or "full"), by the algorithm above."""
    pairs = 2 * B * N_f * N_o
    fwd = pairs * (2 * d * math.ceil(e / MAX_BLOCK_E) + 2 * e)
    bwd = pairs * (4 * d + 6 * e)
    return {"fwd": fwd, "bwd": bwd, "full": fwd + bwd}[mode]


def useful_flops(mode, B, N_f, N_o, d, e):
    """FLOPs of the mathematics (S once forward, no recomputation backward)."""
    pairs = 2 * B * N_f * N_o
    fwd = pairs * (d + 2 * e)
    bwd = pairs * (2 * d + 4 * e)
    return {"fwd": fwd, "bwd": bwd, "full": fwd + bwd}[mode]


def cross_stream_attention_ref(q, k, v_f, v_o, scale=None):
    """Eager definition: returns ``(y_f, y_o)`` in the input dtype, computed in fp32 (fp64 stays fp64)."""
    _check_inputs(q, k, v_f, v_o)
    out_dtype = q.dtype
    acc = torch.promote_types(out_dtype, torch.float32)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    # Autocast would silently drop the matmuls back to half precision; the reference is fp32.
    with torch.autocast(device_type=q.device.type, enabled=False):
        s = torch.matmul(q.to(acc), k.to(acc).transpose(1, 2)) * scale
        y_f = torch.matmul(torch.softmax(s, dim=2), v_o.to(acc))
        y_o = torch.matmul(torch.softmax(s, dim=1).transpose(1, 2), v_f.to(acc))
    return y_f.to(out_dtype), y_o.to(out_dtype)


def cross_stream_attention(q, k, v_f, v_o, scale=None, impl="auto"):
    """``(y_f, y_o)`` of cross-stream attention; ``impl`` is "auto" | "triton" | "eager".

    q (B, N_f, d), k (B, N_o, d), v_f (B, N_f, e), v_o (B, N_o, e); ``scale`` None means
    d ** -0.5. Outputs are in the inputs' (common) dtype. fp64 and empty inputs always run
    the eager reference (``resolve_impl``).
    """
    _check_inputs(q, k, v_f, v_o)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"cross_stream_attention: scale must be finite, got {scale}")
    if resolve_impl(impl, q, k, v_f, v_o) is Impl.EAGER:
        return cross_stream_attention_ref(q, k, v_f, v_o, scale)
    dtype = q.dtype
    for t in (k, v_f, v_o):
        dtype = torch.promote_types(dtype, t.dtype)
    q, k, v_f, v_o = (t.to(dtype) for t in (q, k, v_f, v_o))
    y_f, y_o, _, _ = cross_stream_attention_op(q, k, v_f, v_o, scale)
    return y_f, y_o


# ----------------------------------------------------------------------------- registered ops
#
# ccs_fast::cross_stream_attention (q, k, v_f, v_o, scale) -> (y_f, y_o, lse_row, lse_col)
# ccs_fast::cross_stream_attention_backward (..., dy_f, dy_o, scale) -> (dq, dk, dv_f, dv_o)
# The LSE vectors (fp32, base 2) are outputs so that autograd can save them: plain tensors are
# all a registered op may keep for its backward. They are not differentiable.


def _lse_ref(q, k, scale):
    """The forward op's base-2 LSE vectors (row, column) in fp32, with torch ops."""
    with torch.autocast(device_type=q.device.type, enabled=False):
        s = torch.matmul(q.float(), k.float().transpose(1, 2)) * scale
        return torch.logsumexp(s, 2) * LOG2E, torch.logsumexp(s, 1) * LOG2E


def _vjp_ref(q, k, v_f, v_o, dy_f, dy_o, scale):
    """The backward op's gradients with torch ops: the reference's, by autograd (contiguous, as
    the fake implementation promises)."""
    with autograd_inside_op():
        inputs = [t.detach().requires_grad_() for t in (q, k, v_f, v_o)]
        y_f, y_o = cross_stream_attention_ref(*inputs, scale)
        grads = torch.autograd.grad((y_f, y_o), inputs, (dy_f.to(y_f.dtype), dy_o.to(y_o.dtype)))
    return tuple(g.contiguous() for g in grads)


@torch.library.custom_op("ccs_fast::cross_stream_attention", mutates_args=())
def cross_stream_attention_op(q: Tensor, k: Tensor, v_f: Tensor, v_o: Tensor,
                              scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Both directions of the attention: y_f (B, N_f, e), y_o (B, N_o, e) in the inputs' dtype
    (which the four must share: fp32, fp16 or bf16) and the base-2 LSE vectors (B, N_f),
    (B, N_o) in fp32. Differentiable in y_f and y_o (``ccs_fast::cross_stream_attention_backward``)."""
    impl = resolve_impl("triton", q, k, v_f, v_o, fallback=True)
    if impl is Impl.EAGER:
        return (*cross_stream_attention_ref(q, k, v_f, v_o, scale), *_lse_ref(q, k, scale))
    return xattn_forward(q, k, v_f, v_o, scale, impl)


@cross_stream_attention_op.register_fake
def _forward_fake(q, k, v_f, v_o, scale):
    B, N_f, N_o, e = q.shape[0], q.shape[1], k.shape[1], v_f.shape[2]
    return (q.new_empty((B, N_f, e)), q.new_empty((B, N_o, e)),
            q.new_empty((B, N_f), dtype=torch.float32), q.new_empty((B, N_o), dtype=torch.float32))


@torch.library.custom_op("ccs_fast::cross_stream_attention_backward", mutates_args=())
def cross_stream_attention_backward_op(q: Tensor, k: Tensor, v_f: Tensor, v_o: Tensor, y_f: Tensor, y_o: Tensor,
                                       lse_row: Tensor, lse_col: Tensor, dy_f: Tensor, dy_o: Tensor,
                                       scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv_f, dv_o) in the inputs' dtype, from the forward op's inputs and outputs and
    the gradients of y_f and y_o. Not differentiable itself (no double backward)."""
    impl = resolve_impl("triton", q, k, v_f, v_o, fallback=True)
    if impl is Impl.EAGER:
        return _vjp_ref(q, k, v_f, v_o, dy_f, dy_o, scale)
    return xattn_backward(q, k, v_f, v_o, y_f, y_o, lse_row, lse_col, dy_f, dy_o, scale, impl)


@cross_stream_attention_backward_op.register_fake
def _backward_fake(q, k, v_f, v_o, y_f, y_o, lse_row, lse_col, dy_f, dy_o, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v_f.new_empty(v_f.shape), v_o.new_empty(v_o.shape)


def _setup_context(ctx, inputs, output):
    q, k, v_f, v_o, scale = inputs
    y_f, y_o, lse_row, lse_col = output
    ctx.mark_non_differentiable(lse_row, lse_col)
    ctx.save_for_backward(q, k, v_f, v_o, y_f, y_o, lse_row, lse_col)
    ctx.scale = scale


def _backward(ctx, dy_f, dy_o, _dlse_row, _dlse_col):
    saved = ctx.saved_tensors
    y_f, y_o = saved[4], saved[5]
    dy_f = torch.zeros_like(y_f) if dy_f is None else dy_f
    dy_o = torch.zeros_like(y_o) if dy_o is None else dy_o
    dq, dk, dv_f, dv_o = cross_stream_attention_backward_op(*saved, dy_f, dy_o, ctx.scale)
    return dq, dk, dv_f, dv_o, None


cross_stream_attention_op.register_autograd(_backward, setup_context=_setup_context)

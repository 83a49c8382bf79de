"""Batch-hard triplet losses: cross-modal (CCS L1, SPEC §2.2) and single-modality.

Definition (d(a, b) = ‖a − b‖², ẑ = z / max(‖z‖, 1e-12) when ``normalize``):
  cross-modal:  mean over anchors i with a negative of
                [max_{p: y_p = y_i} d(ẑ_f,i, ẑ_o,p) − min_{n: y_n ≠ y_i} d(ẑ_f,i, ẑ_o,n) + margin]_+
                plus the same with f and o swapped, i.e. over the columns of the same B×B
                matrix. The own other modality is a positive. A direction without a valid anchor
                contributes 0 (no NaN, zero gradients).
  single:       the same on d(ẑ_i, ẑ_j), the diagonal is not a positive; anchors with no other
                positive or no negative are left out of the mean.
Hardest positive / negative ties go to the lowest index (the gradient follows that pair).

Triton algorithm (four launches, all O(B·D) memory, no B×B tensor, no host sync):
  1. ``_row_norm_kernel``: r = 1/max(‖z‖, eps) and ‖ẑ‖² per row (once per input).
  2. ``_triplet_mine_kernel``: one program per BLOCK_M anchor rows walks all column tiles;
     S = z_f z_oᵀ by ``tl.dot`` over D chunks, d = ‖ẑ_f‖² + ‖ẑ_o‖² − 2 r_f r_o S.
     Rows keep a running (max positive, min negative) with their indices in registers; a
     later tile replaces them only on strict improvement, so ties keep the lowest index.
     Columns (the flow-anchored direction) are reduced inside the tile and merged across
     row programs with one 64-bit ``atomic_max``/``atomic_min`` per column and tile on a
     key (order-preserving bits of d) · 2³¹ + (lowest-index tiebreak): the score matrix is
     computed once, not twice as a second column grid would need, and the key makes the
     merge deterministic. The number of valid anchors is counted here too.
  3. ``_triplet_grad_kernel``: per anchor, recompute d(anchor, pos) and d(anchor, neg) exactly
     as ‖a − b‖² from the rows, the hinge, the loss partial sums, and (when an input needs a
     gradient) ∂L/∂ẑ only through the selected pairs: 2c(n − p) to the anchor, 2c(p − a) to
     the positive, 2c(a − n) to the negative, c = 1/#valid anchors; targets are scattered
     with fp32 ``atomic_add`` (last-bit nondeterminism in the gradient; the loss is a
     deterministic sum of per-block partials).
  4. ``_normalize_bwd_kernel``: ∂L/∂z = r (g − ẑ (ẑ·g)).
The gradient is computed in the forward; backward only scales it by grad_output.

Limits: B < 2³¹; fp32 inputs use IEEE-precision dots (no TF32) so the selection matches the
reference; fp16/bf16 use tensor cores with fp32 accumulation. GPU timings: not measured yet
(no GPU in the session that wrote this); see bench/bench_losses.py.
"""
import torch
import torch.nn.functional as F

from ccs_fast.kernels._dispatch import interpreting, resolve_impl, triton_available

if triton_available():
    import triton
    import triton.language as tl
else:  # the package must import without Triton; the dispatcher then only offers "eager"
    triton = None

_EPS = 1e-12  # F.normalize's clamp of the norm
_LOW31 = 2**31 - 1  # low 31 bits of a selection key hold the index tiebreak
_NO_MAX = -1  # key sentinels: no positive / no negative found for this column
_NO_MIN = 2**63 - 1


# ----------------------------------------------------------------------------- kernels


if triton is not None:

    @triton.jit
    def _row_norm_kernel(z_ptr, r_ptr, sq_ptr, B, D, stride_zm, NORMALIZE: tl.constexpr, EPS: tl.constexpr,
                         BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
        row_ok = rows < B
        ss = tl.zeros([BLOCK_B], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            z = tl.load(z_ptr + rows[:, None] * stride_zm + cols[None, :],
                        mask=row_ok[:, None] & (cols < D)[None, :], other=0.0).to(tl.float32)
            ss += tl.sum(z * z, axis=1)
        if NORMALIZE:
            # r = 1 / max(‖z‖, eps), ‖ẑ‖² = ‖z‖² r²
            r = 1.0 / tl.maximum(tl.sqrt(ss), EPS)
        else:
            r = tl.full([BLOCK_B], 1.0, tl.float32)
        tl.store(r_ptr + rows, r, mask=row_ok)
        tl.store(sq_ptr + rows, ss * r * r, mask=row_ok)


    @triton.jit
    def _max_key(d, idx):
        # order-preserving int of fp32 d, times 2³¹, plus a tiebreak that prefers the lower index
        bits = d.to(tl.int32, bitcast=True).to(tl.int64)
        ordered = tl.where(bits >= 0, bits + 2147483648, -bits - 1)
        return ordered * 2147483648 + (2147483647 - idx.to(tl.int64))


    @triton.jit
    def _min_key(d, idx):
        bits = d.to(tl.int32, bitcast=True).to(tl.int64)
        ordered = tl.where(bits >= 0, bits + 2147483648, -bits - 1)
        return ordered * 2147483648 + idx.to(tl.int64)


    @triton.jit
    def _triplet_mine_kernel(a_ptr, b_ptr, ra_ptr, rb_ptr, sqa_ptr, sqb_ptr, y_ptr,
                             row_pos_ptr, row_neg_ptr, col_pos_key_ptr, col_neg_key_ptr, count_ptr,
                             B, D, stride_am, stride_bm, B_BUCKET, D_BUCKET,
                             SINGLE: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < B
        y_r = tl.load(y_ptr + rows, mask=row_ok, other=0)
        r_r = tl.load(ra_ptr + rows, mask=row_ok, other=0.0)
        sq_r = tl.load(sqa_ptr + rows, mask=row_ok, other=0.0)
        best_pos = tl.full([BLOCK_M], float("-inf"), tl.float32)
        best_neg = tl.full([BLOCK_M], float("inf"), tl.float32)
        pos_idx = tl.full([BLOCK_M], -1, tl.int32)
        neg_idx = tl.full([BLOCK_M], -1, tl.int32)
        for n0 in range(0, B, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            col_ok = cols < B
            # S = a_rows · b_colsᵀ over D chunks, fp32 accumulation
            s = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                dd = d0 + tl.arange(0, BLOCK_D)
                d_ok = dd < D
                a = tl.load(a_ptr + rows[:, None] * stride_am + dd[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
                b = tl.load(b_ptr + cols[:, None] * stride_bm + dd[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
                if DOT_FP32:
                    a, b = a.to(tl.float32), b.to(tl.float32)
                s = tl.dot(a, tl.trans(b), s, input_precision=DOT_PRECISION)
            r_c = tl.load(rb_ptr + cols, mask=col_ok, other=0.0)
            sq_c = tl.load(sqb_ptr + cols, mask=col_ok, other=0.0)
            y_c = tl.load(y_ptr + cols, mask=col_ok, other=0)
            # d = ‖ẑ_a‖² + ‖ẑ_b‖² − 2 r_a r_b S
            d = sq_r[:, None] + sq_c[None, :] - 2.0 * s * r_r[:, None] * r_c[None, :]
            both = row_ok[:, None] & col_ok[None, :]
            same = y_r[:, None] == y_c[None, :]
            pos = both & same
            if SINGLE:
                pos = pos & (rows[:, None] != cols[None, :])
            neg = both & (y_r[:, None] != y_c[None, :])
            d_pos = tl.where(pos, d, float("-inf"))
            d_neg = tl.where(neg, d, float("inf"))
            # rows: strict improvement only, so earlier (lower) indices win ties across tiles
            tile_pos = tl.max(d_pos, axis=1)
            tile_pos_idx = (n0 + tl.argmax(d_pos, axis=1, tie_break_left=True)).to(tl.int32)
            take = tile_pos > best_pos
            pos_idx = tl.where(take, tile_pos_idx, pos_idx)
            best_pos = tl.where(take, tile_pos, best_pos)
            tile_neg = tl.min(d_neg, axis=1)
            tile_neg_idx = (n0 + tl.argmin(d_neg, axis=1, tie_break_left=True)).to(tl.int32)
            take = tile_neg < best_neg
            neg_idx = tl.where(take, tile_neg_idx, neg_idx)
            best_neg = tl.where(take, tile_neg, best_neg)
            if not SINGLE:
                # columns: reduce over this tile's rows, merge across programs by packed keys
                col_pos = tl.max(d_pos, axis=0)
                col_pos_idx = pid * BLOCK_M + tl.argmax(d_pos, axis=0, tie_break_left=True)
                tl.atomic_max(col_pos_key_ptr + cols, _max_key(col_pos, col_pos_idx),
                              mask=col_ok & (col_pos > float("-inf")))
                col_neg = tl.min(d_neg, axis=0)
                col_neg_idx = pid * BLOCK_M + tl.argmin(d_neg, axis=0, tie_break_left=True)
                tl.atomic_min(col_neg_key_ptr + cols, _min_key(col_neg, col_neg_idx),
                              mask=col_ok & (col_neg < float("inf")))
        tl.store(row_pos_ptr + rows, pos_idx, mask=row_ok)
        tl.store(row_neg_ptr + rows, neg_idx, mask=row_ok)
        valid = row_ok & (pos_idx >= 0) & (neg_idx >= 0)
        tl.atomic_add(count_ptr, tl.sum(valid.to(tl.int32), axis=0))


    @triton.jit
    def _triplet_grad_kernel(anc_ptr, tgt_ptr, r_anc_ptr, r_tgt_ptr, pos_ptr, neg_ptr, count_ptr,
                             g_anc_ptr, g_tgt_ptr, partial_ptr,
                             B, D, stride_am, stride_tm, margin,
                             FROM_KEYS: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
                             BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
        row_ok = rows < B
        if FROM_KEYS:
            pos_key = tl.load(pos_ptr + rows, mask=row_ok, other=-1)
            neg_key = tl.load(neg_ptr + rows, mask=row_ok, other=9223372036854775807)
            found = (pos_key >= 0) & (neg_key != 9223372036854775807)
            p = 2147483647 - (pos_key & 2147483647)
            n = neg_key & 2147483647
        else:
            p = tl.load(pos_ptr + rows, mask=row_ok, other=-1).to(tl.int64)
            n = tl.load(neg_ptr + rows, mask=row_ok, other=-1).to(tl.int64)
            found = (p >= 0) & (n >= 0)
        valid = row_ok & found
        p = tl.where(valid, p, 0)
        n = tl.where(valid, n, 0)
        r_a = tl.load(r_anc_ptr + rows, mask=valid, other=0.0)
        r_p = tl.load(r_tgt_ptr + p, mask=valid, other=0.0)
        r_n = tl.load(r_tgt_ptr + n, mask=valid, other=0.0)
        # exact d(a, p) = ‖ẑ_a − ẑ_p‖², d(a, n) = ‖ẑ_a − ẑ_n‖²
        dp = tl.zeros([BLOCK_B], dtype=tl.float32)
        dn = tl.zeros([BLOCK_B], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            m = valid[:, None] & (dd < D)[None, :]
            a = tl.load(anc_ptr + rows[:, None] * stride_am + dd[None, :], mask=m, other=0.0).to(tl.float32) * r_a[:, None]
            zp = tl.load(tgt_ptr + p[:, None] * stride_tm + dd[None, :], mask=m, other=0.0).to(tl.float32) * r_p[:, None]
            zn = tl.load(tgt_ptr + n[:, None] * stride_tm + dd[None, :], mask=m, other=0.0).to(tl.float32) * r_n[:, None]
            dp += tl.sum((a - zp) * (a - zp), axis=1)
            dn += tl.sum((a - zn) * (a - zn), axis=1)
        inv_count = 1.0 / tl.maximum(tl.load(count_ptr).to(tl.float32), 1.0)
        hinge = tl.where(valid, tl.maximum(dp - dn + margin, 0.0), 0.0)
        tl.store(partial_ptr + pid, tl.sum(hinge, axis=0) * inv_count)
        if COMPUTE_GRAD:
            active = valid & (dp - dn + margin > 0.0)
            c = 2.0 * inv_count
            for d0 in range(0, D, BLOCK_D):
                dd = d0 + tl.arange(0, BLOCK_D)
                m = active[:, None] & (dd < D)[None, :]
                a = tl.load(anc_ptr + rows[:, None] * stride_am + dd[None, :], mask=m, other=0.0).to(tl.float32) * r_a[:, None]
                zp = tl.load(tgt_ptr + p[:, None] * stride_tm + dd[None, :], mask=m, other=0.0).to(tl.float32) * r_p[:, None]
                zn = tl.load(tgt_ptr + n[:, None] * stride_tm + dd[None, :], mask=m, other=0.0).to(tl.float32) * r_n[:, None]
                # ∂/∂a = 2c(n − p), ∂/∂p = 2c(p − a), ∂/∂n = 2c(a − n)
                tl.atomic_add(g_anc_ptr + rows[:, None] * D + dd[None, :], c * (zn - zp), mask=m)
                tl.atomic_add(g_tgt_ptr + p[:, None] * D + dd[None, :], c * (zp - a), mask=m)
                tl.atomic_add(g_tgt_ptr + n[:, None] * D + dd[None, :], c * (a - zn), mask=m)


    @triton.jit
    def _normalize_bwd_kernel(z_ptr, r_ptr, g_ptr, B, D, stride_zm, EPS: tl.constexpr,
                              BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
        row_ok = rows < B
        r = tl.load(r_ptr + rows, mask=row_ok, other=0.0)
        dot = tl.zeros([BLOCK_B], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            m = row_ok[:, None] & (dd < D)[None, :]
            zh = tl.load(z_ptr + rows[:, None] * stride_zm + dd[None, :], mask=m, other=0.0).to(tl.float32) * r[:, None]
            g = tl.load(g_ptr + rows[:, None] * D + dd[None, :], mask=m, other=0.0)
            dot += tl.sum(zh * g, axis=1)
        # ∂L/∂z = r (g − ẑ (ẑ·g)); where the norm was clamped to eps, ẑ = z/eps and ∂L/∂z = r g
        unclamped = r < 1.0 / EPS
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            m = row_ok[:, None] & (dd < D)[None, :]
            zh = tl.load(z_ptr + rows[:, None] * stride_zm + dd[None, :], mask=m, other=0.0).to(tl.float32) * r[:, None]
            g = tl.load(g_ptr + rows[:, None] * D + dd[None, :], mask=m, other=0.0)
            dz = tl.where(unclamped[:, None], r[:, None] * (g - zh * dot[:, None]), r[:, None] * g)
            tl.store(g_ptr + rows[:, None] * D + dd[None, :], dz, mask=m)


# ----------------------------------------------------------------------------- launchers


def _use_autotune(t: torch.Tensor) -> bool:
    return t.is_cuda and not interpreting()


def _mine_configs():
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_D": bd}, num_warps=w, num_stages=s, pre_hook=_reset_mine)
        for bm, bn in ((64, 64), (128, 64), (64, 128), (128, 128))
        for bd in (32, 64)
        for w, s in ((4, 3), (8, 3))
        if not (bm * bn >= 128 * 128 and w == 4)
    ]


def _reset_mine(nargs):
    # the kernel accumulates into these with atomics: autotune's repeated runs must start clean
    nargs["col_pos_key_ptr"].fill_(_NO_MAX)
    nargs["col_neg_key_ptr"].fill_(_NO_MIN)
    nargs["count_ptr"].zero_()


_mine_tuned = None
if triton is not None and torch.cuda.is_available():
    _mine_tuned = triton.autotune(configs=_mine_configs(), key=["B_BUCKET", "D_BUCKET", "SINGLE", "DOT_PRECISION"])(
        _triplet_mine_kernel
    )


def _blocks_1d(t: torch.Tensor, D: int):
    if _use_autotune(t):
        return 16, min(triton.next_power_of_2(D), 256), 4
    return 16, min(triton.next_power_of_2(D), 32), 1


def row_norms(z: torch.Tensor, normalize: bool):
    """(r, ‖ẑ‖²) per row, fp32: r = 1/max(‖z‖, eps), or 1 when not normalising."""
    B, D = z.shape
    r = torch.empty(B, dtype=torch.float32, device=z.device)
    sq = torch.empty_like(r)
    bb, bd, w = _blocks_1d(z, D)
    _row_norm_kernel[(triton.cdiv(B, bb),)](z, r, sq, B, D, z.stride(0), NORMALIZE=normalize, EPS=_EPS,
                                             BLOCK_B=bb, BLOCK_D=bd, num_warps=w)
    return r, sq


def normalize_backward_(z: torch.Tensor, r: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """In place: g (∂L/∂ẑ, fp32 contiguous) becomes ∂L/∂z through ẑ = z / max(‖z‖, eps)."""
    B, D = z.shape
    bb, bd, w = _blocks_1d(z, D)
    _normalize_bwd_kernel[(triton.cdiv(B, bb),)](z, r, g, B, D, z.stride(0), EPS=_EPS, BLOCK_B=bb, BLOCK_D=bd,
                                                  num_warps=w)
    return g


def _prepare(z: torch.Tensor) -> torch.Tensor:
    assert z.dtype in (torch.float32, torch.float16, torch.bfloat16), f"unsupported dtype {z.dtype}"
    return z if z.stride(-1) == 1 else z.contiguous()


def triplet_forward(z_a, z_b, labels, margin, normalize, single, compute_grad):
    """Loss (fp32 0-dim) and, if ``compute_grad``, fp32 gradients w.r.t. z_a (and z_b when not ``single``)."""
    if z_a.dtype != z_b.dtype:
        z_a, z_b = z_a.float(), z_b.float()
    z_a, z_b = _prepare(z_a), _prepare(z_b)
    labels = labels.contiguous()
    B, D = z_a.shape
    assert z_b.shape == (B, D) and labels.shape == (B,), "z_a, z_b must be (B, D), labels (B,)"
    assert B < 2**31, "indices are packed in 31 bits"
    dev = z_a.device
    r_a, sq_a = row_norms(z_a, normalize)
    r_b, sq_b = (r_a, sq_a) if single else row_norms(z_b, normalize)
    row_pos = torch.empty(B, dtype=torch.int32, device=dev)
    row_neg = torch.empty(B, dtype=torch.int32, device=dev)
    col_pos_key = torch.full((B,), _NO_MAX, dtype=torch.int64, device=dev)
    col_neg_key = torch.full((B,), _NO_MIN, dtype=torch.int64, device=dev)
    count = torch.zeros(1, dtype=torch.int32, device=dev)
    # The Triton 3.9 interpreter multiplies bf16 tiles wrongly in tl.dot (numpy has no bf16), so
    # under TRITON_INTERPRET=1 bf16 tiles are upcast first; tests/test_triplet.py::test_half_inputs covers it.
    dot_fp32 = interpreting() and z_a.dtype == torch.bfloat16
    precision = "ieee" if z_a.dtype == torch.float32 or dot_fp32 else "tf32"
    args = (z_a, z_b, r_a, r_b, sq_a, sq_b, labels, row_pos, row_neg, col_pos_key, col_neg_key, count,
            B, D, z_a.stride(0), z_b.stride(0), triton.next_power_of_2(B), triton.next_power_of_2(D))
    if _use_autotune(z_a):
        _mine_tuned[lambda meta: (triton.cdiv(B, meta["BLOCK_M"]),)](*args, SINGLE=single, DOT_PRECISION=precision,
                                                                      DOT_FP32=False)
    else:
        _triplet_mine_kernel[(triton.cdiv(B, 16),)](*args, SINGLE=single, DOT_PRECISION=precision,
                                                    DOT_FP32=dot_fp32, BLOCK_M=16, BLOCK_N=16, BLOCK_D=16)

    bb, bd, w = _blocks_1d(z_a, D)
    nblk = triton.cdiv(B, bb)
    partial = torch.empty(nblk if single else 2 * nblk, dtype=torch.float32, device=dev)
    g_a = torch.zeros(B, D, dtype=torch.float32, device=dev) if compute_grad else partial
    g_b = g_a if single or not compute_grad else torch.zeros_like(g_a)
    # anchored on a's rows (targets from b), then for the cross-modal form on b's rows (targets from a)
    _triplet_grad_kernel[(nblk,)](z_a, z_b, r_a, r_b, row_pos, row_neg, count, g_a, g_b, partial,
                                  B, D, z_a.stride(0), z_b.stride(0), margin, FROM_KEYS=False,
                                  COMPUTE_GRAD=compute_grad, BLOCK_B=bb, BLOCK_D=bd, num_warps=w)
    if not single:
        _triplet_grad_kernel[(nblk,)](z_b, z_a, r_b, r_a, col_pos_key, col_neg_key, count, g_b, g_a,
                                      partial[nblk:], B, D, z_b.stride(0), z_a.stride(0), margin, FROM_KEYS=True,
                                      COMPUTE_GRAD=compute_grad, BLOCK_B=bb, BLOCK_D=bd, num_warps=w)
    loss = partial.sum()
    if not compute_grad:
        return loss, None, None
    if normalize:
        normalize_backward_(z_a, r_a, g_a)
        if not single:
            normalize_backward_(z_b, r_b, g_b)
    return loss, g_a, (None if single else g_b)


# ----------------------------------------------------------------------------- autograd


class CrossModalTripletFunction(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, z_f, z_o, labels, margin, normalize):
        need = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        loss, g_f, g_o = triplet_forward(z_f, z_o, labels, margin, normalize, single=False, compute_grad=need)
        ctx.dtypes = (z_f.dtype, z_o.dtype)
        if need:
            ctx.save_for_backward(g_f, g_o)
        return loss

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_out):
        g_f, g_o = ctx.saved_tensors
        return (g_f * grad_out).to(ctx.dtypes[0]), (g_o * grad_out).to(ctx.dtypes[1]), None, None, None


class BatchHardTripletFunction(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, z, labels, margin, normalize):
        need = ctx.needs_input_grad[0]
        loss, g, _ = triplet_forward(z, z, labels, margin, normalize, single=True, compute_grad=need)
        ctx.dtype = z.dtype
        if need:
            ctx.save_for_backward(g)
        return loss

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_out):
        (g,) = ctx.saved_tensors
        return (g * grad_out).to(ctx.dtype), None, None, None


# ----------------------------------------------------------------------------- eager reference


def _embed(z: torch.Tensor, normalize: bool) -> torch.Tensor:
    z = z.float()
    return F.normalize(z, dim=1, eps=_EPS) if normalize else z


def _sq_dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # ‖a‖² + ‖b‖² − 2 a·bᵀ: one matmul, not a B×B×D difference tensor
    return a.pow(2).sum(1)[:, None] + b.pow(2).sum(1)[None, :] - 2.0 * (a @ b.T)


def _hardest(d: torch.Tensor, mask: torch.Tensor, largest: bool):
    """Per row: d at the arg-max (``largest``) or arg-min over ``mask``, and whether there is any.

    ``torch.max``/``torch.min`` along a dim return the first index of a tie (documented), so the
    gradient follows the lowest index, as in the kernel.
    """
    fill = float("-inf") if largest else float("inf")
    masked = d.masked_fill(~mask, fill)
    idx = masked.max(1).indices if largest else masked.min(1).indices
    return d.gather(1, idx[:, None]).squeeze(1), mask.any(1)


def _batch_hard_mean(d: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, margin: float):
    d_pos, has_pos = _hardest(d, pos, largest=True)
    d_neg, has_neg = _hardest(d, neg, largest=False)
    valid = has_pos & has_neg
    hinge = torch.where(valid, (d_pos - d_neg + margin).clamp_min(0), 0.0)
    return hinge.sum() / valid.sum().clamp_min(1)


def cross_modal_triplet_loss_ref(z_f, z_o, labels, margin=0.3, normalize=True):
    """Eager definition of L1 (SPEC §2.2): fp32 0-dim loss, O(B²) memory, no host sync."""
    with torch.autocast(z_f.device.type, enabled=False):
        f, o = _embed(z_f, normalize), _embed(z_o, normalize)
        d = _sq_dist(f, o)
        same = labels[:, None] == labels[None, :]
        return _batch_hard_mean(d, same, ~same, margin) + _batch_hard_mean(d.T, same, ~same, margin)


def batch_hard_triplet_loss_ref(z, labels, margin=0.3, normalize=True):
    """Eager single-modality batch-hard triplet loss: fp32 0-dim, diagonal not a positive."""
    with torch.autocast(z.device.type, enabled=False):
        e = _embed(z, normalize)
        d = _sq_dist(e, e)
        same = labels[:, None] == labels[None, :]
        eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
        return _batch_hard_mean(d, same & ~eye, ~same, margin)


def _check(name, labels, *zs):
    for z in zs:
        if z.dim() != 2 or z.shape != zs[0].shape:
            raise ValueError(f"{name}: embeddings must be (B, D) of one shape, got {[tuple(t.shape) for t in zs]}")
    if labels.shape != (zs[0].shape[0],):
        raise ValueError(f"{name}: labels must be ({zs[0].shape[0]},), got {tuple(labels.shape)}")


def cross_modal_triplet_loss(z_f, z_o, labels, margin=0.3, normalize=True, impl="auto"):
    """Cross-modal batch-hard triplet loss L1 (fp32 0-dim). ``impl``: "auto" | "triton" | "eager"."""
    _check("cross_modal_triplet_loss", labels, z_f, z_o)
    if resolve_impl(impl, z_f, z_o, labels) == "eager":
        return cross_modal_triplet_loss_ref(z_f, z_o, labels, margin, normalize)
    return CrossModalTripletFunction.apply(z_f, z_o, labels, float(margin), bool(normalize))


def batch_hard_triplet_loss(z, labels, margin=0.3, normalize=True, impl="auto"):
    """Single-modality batch-hard triplet loss (fp32 0-dim). ``impl``: "auto" | "triton" | "eager"."""
    _check("batch_hard_triplet_loss", labels, z)
    if resolve_impl(impl, z, labels) == "eager":
        return batch_hard_triplet_loss_ref(z, labels, margin, normalize)
    return BatchHardTripletFunction.apply(z, labels, float(margin), bool(normalize))

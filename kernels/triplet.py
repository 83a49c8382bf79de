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

Triton algorithm (O(B·D) memory, no B×B tensor, no host sync):
  1. ``normalize.row_norms``: r = 1/max(‖z‖, eps) and ‖ẑ‖² per row (once per input).
  2. ``_triplet_mine_kernel`` on a 2-D grid: BLOCK_M anchor rows × one of SPLITS column
     ranges, SPLITS chosen so the grid holds at least two programs per SM of a 132-SM GPU
     (B = 8192, BLOCK_M = 64: 128 row blocks × 3 ranges). Each S tile = z_a z_bᵀ is one
     ``tl.dot`` over D chunks, d = ‖ẑ_a‖² + ‖ẑ_b‖² − 2 r_a r_b S, computed once for both
     directions: rows and columns are reduced inside the tile to (hardest distance, lowest
     index) and merged across programs with one relaxed 64-bit ``atomic_max`` per row or
     column and tile on an order-preserving key (distance bits · 2³¹ + index tiebreak;
     negatives stored inverted so that every key buffer merges by max from zero). Integer
     max is exact and commutative: the selection is deterministic.
  3. ``_triplet_count_kernel``: the number of valid anchors per direction.
  4. ``_triplet_grad_kernel`` per direction: recompute d(anchor, pos) and d(anchor, neg)
     exactly as ‖a − b‖² from the rows, the hinge, per-block loss partials (summed in a
     fixed order) and, when a gradient is needed, ∂L/∂ẑ through the selected pairs only:
     2c(n − p) to the anchor, 2c(p − a) to the positive, 2c(a − n) to the negative,
     c = 1/#valid anchors. The anchor's rows are the program's own (plain stores); targets
     are scattered with relaxed fp32 ``atomic_add`` (no fence), or, with ``deterministic``,
     written per anchor and summed per target row in sorted anchor order by
     ``segments.segment_sum`` (bit-identical run to run, one extra pass over 2·B·D floats).
The gradient ∂L/∂ẑ is computed in the forward; the backward is one kernel per input,
``normalize.finish_grad``: ∂L/∂z = grad_output · r (g − ẑ (ẑ·g)) in the input's dtype.

Static figures (``python -m bench.static``, Triton 3.8) at B = 8192, D = 512, bf16: the
mining grid has 384 programs (2.9 per SM of a 132-SM GPU; the one-dimensional grid it
replaced had 64–128), one S tile per pair of rows (executed = useful tensor FLOPs), about
2.1·10⁶ relaxed int64 max atomics and at most 1.7·10⁷ relaxed fp32 adds per call (none
with ``deterministic``); torch ops around the kernels move 0.27 MB (5.9 MB with
``deterministic``: the sort of the target indices), under 0.3 % of the kernels' own bytes.
Floor: 69 µs (tensor-bound).

Limits: B < 2³¹; fp32 inputs use IEEE-precision dots (no TF32) so the selection matches the
reference; fp16/bf16 use tensor cores with fp32 accumulation. GPU timings: not yet measured,
see bench/results/README.md.
"""
import torch
import torch.nn.functional as F
from torch import Tensor

from ccs_fast.kernels._common import (
    PendingGrad,
    autotuned,
    block_size,
    check_dtype,
    deterministic as _deterministic,
    dot_fp32,
    grad_outputs,
    grad_outputs_fake,
    launch,
    needs_grad,
    tl,
    triton,
)
from ccs_fast.kernels._dispatch import Impl, resolve_impl
from ccs_fast.kernels.normalize import EPS as _EPS, loss_outputs_ref, register_loss_autograd, row_blocks, row_norms
from ccs_fast.kernels.segments import segment_sum

_MIN_PROGRAMS = 264  # two programs per SM of a 132-SM H100/H200


# ----------------------------------------------------------------------------- kernels


if triton is not None:

    @triton.jit
    def _ordered(d):
        # fp32 → int64 in [0, 2³²) with the same order (total order of the bit patterns)
        bits = d.to(tl.int32, bitcast=True).to(tl.int64)
        return tl.where(bits >= 0, bits + 2147483648, -bits - 1)

    @triton.jit
    def _pos_key(d, idx):
        # max d, lowest index on ties; +1 so that 0 means "none"
        return _ordered(d) * 2147483648 + (2147483647 - idx.to(tl.int64)) + 1

    @triton.jit
    def _neg_key(d, idx):
        # min d, lowest index on ties, inverted so that max merges it; 0 means "none"
        return 9223372036854775807 - (_ordered(d) * 2147483648 + idx.to(tl.int64))

    @triton.jit
    def _triplet_mine_kernel(a_ptr, b_ptr, ra_ptr, rb_ptr, sqa_ptr, sqb_ptr, y_ptr,
                             row_pos_ptr, row_neg_ptr, col_pos_ptr, col_neg_ptr,
                             B, D, stride_am, stride_bm, B_BUCKET, D_BUCKET,
                             SINGLE: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        split = tl.program_id(1)
        n_tiles = tl.cdiv(B, BLOCK_N)
        per_split = tl.cdiv(n_tiles, tl.num_programs(1))
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < B
        y_r = tl.load(y_ptr + rows, mask=row_ok, other=0)
        r_r = tl.load(ra_ptr + rows, mask=row_ok, other=0.0)
        sq_r = tl.load(sqa_ptr + rows, mask=row_ok, other=0.0)
        best_pos = tl.zeros([BLOCK_M], tl.int64)
        best_neg = tl.zeros([BLOCK_M], tl.int64)
        for t in range(split * per_split, tl.minimum((split + 1) * per_split, n_tiles)):
            cols = t * BLOCK_N + tl.arange(0, BLOCK_N)
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
            # one key per (row, col): the tile's max over a row or column is its hardest pair
            pk = tl.where(pos, _pos_key(d, cols[None, :]), 0)
            nk = tl.where(neg, _neg_key(d, cols[None, :]), 0)
            best_pos = tl.maximum(best_pos, tl.max(pk, axis=1))
            best_neg = tl.maximum(best_neg, tl.max(nk, axis=1))
            if not SINGLE:
                pkc = tl.where(pos, _pos_key(d, rows[:, None]), 0)
                nkc = tl.where(neg, _neg_key(d, rows[:, None]), 0)
                tl.atomic_max(col_pos_ptr + cols, tl.max(pkc, axis=0), mask=col_ok, sem="relaxed")
                tl.atomic_max(col_neg_ptr + cols, tl.max(nkc, axis=0), mask=col_ok, sem="relaxed")
        tl.atomic_max(row_pos_ptr + rows, best_pos, mask=row_ok, sem="relaxed")
        tl.atomic_max(row_neg_ptr + rows, best_neg, mask=row_ok, sem="relaxed")

    @triton.jit
    def _triplet_count_kernel(pos_ptr, neg_ptr, count_ptr, B, DIRECTIONS: tl.constexpr, BLOCK: tl.constexpr):
        # count[k] = #anchors with a positive and a negative in direction k (keys non-zero)
        for k in tl.static_range(DIRECTIONS):
            total = tl.zeros([BLOCK], dtype=tl.int32)
            for start in range(0, B, BLOCK):
                i = start + tl.arange(0, BLOCK)
                ok = i < B
                p = tl.load(pos_ptr + k * B + i, mask=ok, other=0)
                n = tl.load(neg_ptr + k * B + i, mask=ok, other=0)
                total += ((p != 0) & (n != 0)).to(tl.int32)
            tl.store(count_ptr + k, tl.sum(total, axis=0))

    @triton.jit
    def _triplet_grad_kernel(anc_ptr, tgt_ptr, r_anc_ptr, r_tgt_ptr, pos_ptr, neg_ptr, count_ptr,
                             g_anc_ptr, g_tgt_ptr, t_pos_ptr, t_neg_ptr, partial_ptr,
                             B, D, stride_am, stride_tm, margin,
                             COMPUTE_GRAD: tl.constexpr, ANCHOR: tl.constexpr, DETERMINISTIC: tl.constexpr,
                             BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
        # ANCHOR: 0 = plain store of the anchor rows (first writer of g_anc),
        #         1 = add to them (their earlier value is complete), 2 = atomic add (g_anc is g_tgt)
        pid = tl.program_id(0).to(tl.int64)
        rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
        row_ok = rows < B
        pos_key = tl.load(pos_ptr + rows, mask=row_ok, other=0)
        neg_key = tl.load(neg_ptr + rows, mask=row_ok, other=0)
        valid = row_ok & (pos_key != 0) & (neg_key != 0)
        p = tl.where(valid, 2147483647 - ((pos_key - 1) & 2147483647), 0)
        n = tl.where(valid, (9223372036854775807 - neg_key) & 2147483647, 0)
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
            c = tl.where(active, 2.0 * inv_count, 0.0)
            for d0 in range(0, D, BLOCK_D):
                dd = d0 + tl.arange(0, BLOCK_D)
                d_ok = (dd < D)[None, :]
                m = active[:, None] & d_ok
                a = tl.load(anc_ptr + rows[:, None] * stride_am + dd[None, :], mask=m, other=0.0).to(tl.float32) * r_a[:, None]
                zp = tl.load(tgt_ptr + p[:, None] * stride_tm + dd[None, :], mask=m, other=0.0).to(tl.float32) * r_p[:, None]
                zn = tl.load(tgt_ptr + n[:, None] * stride_tm + dd[None, :], mask=m, other=0.0).to(tl.float32) * r_n[:, None]
                # ∂/∂a = 2c(n − p), ∂/∂p = 2c(p − a), ∂/∂n = 2c(a − n)
                g_a = c[:, None] * (zn - zp)
                own = row_ok[:, None] & d_ok
                anc = g_anc_ptr + rows[:, None] * D + dd[None, :]
                if ANCHOR == 0:
                    tl.store(anc, g_a, mask=own)
                elif ANCHOR == 1:
                    tl.store(anc, tl.load(anc, mask=own, other=0.0) + g_a, mask=own)
                else:
                    tl.atomic_add(anc, g_a, mask=m, sem="relaxed")
                if DETERMINISTIC:
                    # per anchor; summed per target row by segments.segment_sum
                    tl.store(t_pos_ptr + rows[:, None] * D + dd[None, :], c[:, None] * (zp - a), mask=own)
                    tl.store(t_neg_ptr + rows[:, None] * D + dd[None, :], c[:, None] * (a - zn), mask=own)
                else:
                    tl.atomic_add(g_tgt_ptr + p[:, None] * D + dd[None, :], c[:, None] * (zp - a), mask=m, sem="relaxed")
                    tl.atomic_add(g_tgt_ptr + n[:, None] * D + dd[None, :], c[:, None] * (a - zn), mask=m, sem="relaxed")


# ----------------------------------------------------------------------------- launchers


def mine_configs():
    """Autotune candidates of the mining kernel (spill-free on sm_90a by ``bench.aot``)."""
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_D": bd}, num_warps=w, num_stages=s)
        for bm, bn, bd, w, s in (
            # spill-free on sm_90a under Triton 3.6 and 3.8 (bench.aot); 128 × 128 tiles, and
            # 4 warps with 3 stages, spill
            (64, 64, 32, 8, 3), (64, 64, 64, 8, 3), (64, 128, 32, 8, 3), (64, 64, 32, 4, 2), (128, 64, 32, 8, 2),
        )
    ]


def prune_configs(configs, B, D):
    """No D chunk wider than D needs (rounded up to a power of two, ≥ 16)."""
    kept = [c for c in configs if c.kwargs["BLOCK_D"] <= block_size(D, lo=32)]
    return kept or configs[:1]


def _prune(configs, named_args, **kwargs):
    return prune_configs(configs, named_args["B"], named_args["D"])


_mine_tuned = None


def _mine_kernel():
    global _mine_tuned
    if _mine_tuned is None:
        _mine_tuned = triton.autotune(
            configs=mine_configs(), key=["B_BUCKET", "D_BUCKET", "SINGLE", "DOT_PRECISION"],
            prune_configs_by={"early_config_prune": _prune},
            # the keys merge by atomic max: the tuner's repeated runs start from zero
            reset_to_zero=["row_pos_ptr", "row_neg_ptr", "col_pos_ptr", "col_neg_ptr"],
        )(_triplet_mine_kernel)
    return _mine_tuned


def mine_grid(B, block_m, block_n):
    """(row blocks, column ranges): at least ``_MIN_PROGRAMS`` programs where B allows."""
    rows = triton.cdiv(B, block_m)
    splits = max(1, min(triton.cdiv(_MIN_PROGRAMS, rows), triton.cdiv(B, block_n)))
    return rows, splits


def _prepare(z: torch.Tensor) -> torch.Tensor:
    check_dtype("triplet loss", z)
    return z if z.stride(-1) == 1 else z.contiguous()


def _segments(idx: torch.Tensor, B: int):
    """Sorted order, start and count of each target row in ``idx`` (stable: anchor order)."""
    order = torch.sort(idx, stable=True).indices
    counts = torch.zeros(B, dtype=torch.int64, device=idx.device).index_add_(0, idx, torch.ones_like(idx))
    return order, torch.cumsum(counts, 0) - counts, counts


def _scatter_deterministic(g_tgt, t_both, pos_key, neg_key, impl, record):
    """g_tgt[p_i] += t_both[i] and g_tgt[n_i] += t_both[B + i], summed in anchor order."""
    B = pos_key.shape[0]
    valid = (pos_key != 0) & (neg_key != 0)
    p = torch.where(valid, 2147483647 - ((pos_key - 1) & 2147483647), 0)
    n = torch.where(valid, (9223372036854775807 - neg_key) & 2147483647, 0)
    order, starts, counts = _segments(torch.cat([p, n]), B)  # rows of invalid or inactive anchors are zero
    segment_sum(t_both, order, starts, counts, g_tgt, impl, accumulate=True, record=record)


def _mine(z_a, z_b, labels, r_a, r_b, sq_a, sq_b, single, impl, record):
    """The hardest positive and negative of every anchor as keys (2, directions, B): [0] the
    positives, [1] the negatives; [:, 0] anchored on a's rows, [:, 1] on b's (the columns).
    And the number of valid anchors per direction."""
    B, D = z_a.shape
    dirs = 1 if single else 2
    keys = torch.zeros((2, dirs, B), dtype=torch.int64, device=z_a.device)
    col_pos, col_neg = (keys[0, 0], keys[1, 0]) if single else (keys[0, 1], keys[1, 1])
    widen = dot_fp32(z_a.dtype, impl)
    precision = "ieee" if z_a.dtype == torch.float32 or widen else "tf32"
    args = (z_a, z_b, r_a, r_b, sq_a, sq_b, labels, keys[0, 0], keys[1, 0], col_pos, col_neg,
            B, D, z_a.stride(0), z_b.stride(0), block_size(B), block_size(D))
    if autotuned(impl):
        launch(_mine_kernel(), lambda meta: mine_grid(B, meta["BLOCK_M"], meta["BLOCK_N"]), *args,
               SINGLE=single, DOT_PRECISION=precision, DOT_FP32=widen, record=record)
    else:
        launch(_triplet_mine_kernel, mine_grid(B, 16, 16), *args, SINGLE=single, DOT_PRECISION=precision,
               DOT_FP32=widen, BLOCK_M=16, BLOCK_N=16, BLOCK_D=16, record=record)
    count = torch.empty(dirs, dtype=torch.int32, device=z_a.device)
    launch(_triplet_count_kernel, (1,), keys[0], keys[1], count, B, DIRECTIONS=dirs, BLOCK=512, num_warps=4,
           record=record)
    return keys, count


def _hinges(passes, count, margin, compute_grad, t_both, impl, record):
    """The loss over the anchor directions in ``passes`` (anchors, targets, their r, keys,
    gradient buffers, ANCHOR mode) and, with ``compute_grad``, ∂L/∂ẑ into the gradient
    buffers; ``t_both`` (2B, D) holds the per-anchor target terms of the deterministic sum."""
    B, D = passes[0][0].shape
    bb, bd, w = row_blocks(D, impl)
    nblk = triton.cdiv(B, bb)
    partial = torch.empty(len(passes) * nblk, dtype=torch.float32, device=passes[0][0].device)
    det = t_both is not None
    t_pos, t_neg = (t_both[:B], t_both[B:]) if det else (partial, partial)
    for k, (anc, tgt, r_anc, r_tgt, pk, nk, g_anc, g_tgt, anchor) in enumerate(passes):
        if not compute_grad:
            g_anc = g_tgt = partial  # placeholders: nothing is written
        launch(_triplet_grad_kernel, (nblk,), anc, tgt, r_anc, r_tgt, pk, nk, count[k:], g_anc, g_tgt,
               t_pos, t_neg, partial[k * nblk:], B, D, anc.stride(0), tgt.stride(0), margin,
               COMPUTE_GRAD=compute_grad, ANCHOR=anchor, DETERMINISTIC=det, BLOCK_B=bb, BLOCK_D=bd, num_warps=w,
               record=record)
        if det:
            _scatter_deterministic(g_tgt, t_both, pk, nk, impl, record)
    return partial.sum()


def triplet_forward(z_a, z_b, labels, margin, normalize, single, compute_grad, impl, deterministic=False,
                    record=None):
    """Loss (fp32 0-dim) and, if ``compute_grad``, the ``PendingGrad`` of z_a (and of z_b when
    not ``single``): ∂L/∂ẑ, finished by ``normalize.finish_grad``. ``record``: a
    ``_common.Recording`` that takes the launches."""
    if z_a.dtype != z_b.dtype:
        z_a, z_b = z_a.float(), z_b.float()
    z_a, z_b = _prepare(z_a), _prepare(z_b)
    labels = labels.contiguous()
    B, D = z_a.shape
    assert z_b.shape == (B, D) and labels.shape == (B,), "z_a, z_b must be (B, D), labels (B,)"
    assert B < 2**31, "indices are packed in 31 bits"
    f32 = dict(dtype=torch.float32, device=z_a.device)
    g_a = g_b = t_both = None
    if compute_grad:
        # single: anchors and targets share g (zeroed); cross-modal: the first pass stores a's
        # anchor rows and scatters into g_b (zeroed), the second adds b's anchor rows to g_b
        # and scatters into g_a. The zeroing rides on the row-norm pass.
        g_a = torch.empty((B, D), **f32)
        g_b = g_a if single else torch.empty((B, D), **f32)
        if deterministic:  # per-anchor contributions to the positive and negative targets
            t_both = torch.empty((2 * B, D), **f32)
    r_a, sq_a = row_norms(z_a, normalize, impl, zero=g_a if single else None, record=record)
    r_b, sq_b = (r_a, sq_a) if single else row_norms(z_b, normalize, impl, zero=g_b, record=record)
    keys, count = _mine(z_a, z_b, labels, r_a, r_b, sq_a, sq_b, single, impl, record)
    # ANCHOR 2 (single): the anchors' rows are targets too, so atomics; deterministic: none,
    # the anchors add to their own rows and the targets come after
    passes = [(z_a, z_b, r_a, r_b, keys[0, 0], keys[1, 0], g_a, g_b, (1 if t_both is not None else 2) if single else 0)]
    if not single:
        passes.append((z_b, z_a, r_b, r_a, keys[0, 1], keys[1, 1], g_b, g_a, 1))
    loss = _hinges(passes, count, margin, compute_grad, t_both, impl, record)
    if not compute_grad:
        return loss, None, None
    return loss, PendingGrad(z_a, r_a, g_a, normalize), (None if single else PendingGrad(z_b, r_b, g_b, normalize))


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


def cross_modal_triplet_loss(z_f, z_o, labels, margin=0.3, normalize=True, impl="auto", deterministic=None):
    """Cross-modal batch-hard triplet loss L1 (fp32 0-dim). ``impl``: "auto" | "triton" | "eager";
    ``deterministic`` (None: ``torch.are_deterministic_algorithms_enabled()``) gives
    bit-identical gradients run to run (no floating-point atomics)."""
    _check("cross_modal_triplet_loss", labels, z_f, z_o)
    if resolve_impl(impl, z_f, z_o, labels) is Impl.EAGER:
        return cross_modal_triplet_loss_ref(z_f, z_o, labels, margin, normalize)
    return cross_modal_triplet_loss_op(z_f, z_o, labels, float(margin), bool(normalize), _deterministic(deterministic),
                                       needs_grad(z_f, z_o))[0]


def batch_hard_triplet_loss(z, labels, margin=0.3, normalize=True, impl="auto", deterministic=None):
    """Single-modality batch-hard triplet loss (fp32 0-dim). ``impl``: "auto" | "triton" | "eager";
    ``deterministic`` as in ``cross_modal_triplet_loss``."""
    _check("batch_hard_triplet_loss", labels, z)
    if resolve_impl(impl, z, labels) is Impl.EAGER:
        return batch_hard_triplet_loss_ref(z, labels, margin, normalize)
    return batch_hard_triplet_loss_op(z, labels, float(margin), bool(normalize), _deterministic(deterministic),
                                      needs_grad(z))[0]


# ----------------------------------------------------------------------------- registered ops
#
# ccs_fast::cross_modal_triplet_loss (z_f, z_o, labels, margin, normalize, deterministic,
#                                     compute_grad) -> (loss, r_f, g_f, r_o, g_o)
# ccs_fast::batch_hard_triplet_loss (z, labels, margin, normalize, deterministic, compute_grad)
#                                     -> (loss, r, g)
# r (B,) and g = ∂L/∂ẑ (B, D) are fp32 outputs, not differentiable, that the registered
# autograd saves for ``ccs_fast::finish_grad``; empty ((0,), (0, D)) when compute_grad is False.


@torch.library.custom_op("ccs_fast::cross_modal_triplet_loss", mutates_args=())
def cross_modal_triplet_loss_op(z_f: Tensor, z_o: Tensor, labels: Tensor, margin: float, normalize: bool,
                                deterministic: bool, compute_grad: bool
                                ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """L1 (fp32 0-dim) and, when ``compute_grad``, each input's row factors and ∂L/∂ẑ."""
    impl = resolve_impl("triton", z_f, z_o, labels, fallback=True)
    if impl is Impl.EAGER:
        return loss_outputs_ref(lambda f, o: cross_modal_triplet_loss_ref(f, o, labels, margin, False),
                                [z_f, z_o], normalize, compute_grad)
    loss, p_f, p_o = triplet_forward(z_f, z_o, labels, margin, normalize, single=False, compute_grad=compute_grad,
                                     impl=impl, deterministic=deterministic)
    return (loss, *grad_outputs(z_f, p_f), *grad_outputs(z_o, p_o))


@cross_modal_triplet_loss_op.register_fake
def _cross_modal_fake(z_f, z_o, labels, margin, normalize, deterministic, compute_grad):
    return (z_f.new_empty((), dtype=torch.float32), *grad_outputs_fake(z_f, compute_grad),
            *grad_outputs_fake(z_o, compute_grad))


@torch.library.custom_op("ccs_fast::batch_hard_triplet_loss", mutates_args=())
def batch_hard_triplet_loss_op(z: Tensor, labels: Tensor, margin: float, normalize: bool, deterministic: bool,
                               compute_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The single-modality loss (fp32 0-dim) and, when ``compute_grad``, r and ∂L/∂ẑ."""
    impl = resolve_impl("triton", z, labels, fallback=True)
    if impl is Impl.EAGER:
        return loss_outputs_ref(lambda e: batch_hard_triplet_loss_ref(e, labels, margin, False), [z], normalize,
                                compute_grad)
    loss, p, _ = triplet_forward(z, z, labels, margin, normalize, single=True, compute_grad=compute_grad,
                                 impl=impl, deterministic=deterministic)
    return (loss, *grad_outputs(z, p))


@batch_hard_triplet_loss_op.register_fake
def _batch_hard_fake(z, labels, margin, normalize, deterministic, compute_grad):
    return (z.new_empty((), dtype=torch.float32), *grad_outputs_fake(z, compute_grad))


register_loss_autograd(cross_modal_triplet_loss_op, embeddings=(0, 1), normalize_arg=4)
register_loss_autograd(batch_hard_triplet_loss_op, embeddings=(0,), normalize_arg=3)

"""Segment sums over a sorted order, shared by the losses: for each segment t,

    out[t] (=|+=) Σ_{k < counts[t]} scale[i_k] · src[i_k],   i_k = order[starts[t] + k]

divided by counts[t] when ``mean``. One program per (segment, D chunk) walks its members in
order, so the sums need no atomics and are bit-identical run to run. The center loss takes
its class means this way (scale = the row-norm factors r), the deterministic triplet
gradient its per-target sums.
"""
from ccs_fast.kernels._common import autotuned, block_size, launch, tl, triton

if triton is not None:

    @triton.jit
    def _segment_sum_kernel(src_ptr, scale_ptr, order_ptr, starts_ptr, counts_ptr, out_ptr, D, stride_src,
                            HAS_SCALE: tl.constexpr, MEAN: tl.constexpr, ACCUMULATE: tl.constexpr,
                            BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        dd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        d_ok = dd < D
        start = tl.load(starts_ptr + t)
        n = tl.load(counts_ptr + t)
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for k0 in range(0, n, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < n
            i = tl.load(order_ptr + start + k, mask=k_ok, other=0)
            x = tl.load(src_ptr + i[:, None] * stride_src + dd[None, :], mask=k_ok[:, None] & d_ok[None, :],
                        other=0.0).to(tl.float32)
            if HAS_SCALE:
                x = x * tl.load(scale_ptr + i, mask=k_ok, other=0.0)[:, None]
            acc += tl.sum(x, axis=0)
        if MEAN:
            acc = acc / tl.maximum(n, 1).to(tl.float32)
        if ACCUMULATE:
            acc += tl.load(out_ptr + t * D + dd, mask=d_ok, other=0.0)
        tl.store(out_ptr + t * D + dd, acc, mask=d_ok)


def segment_sum(src, order, starts, counts, out, impl, scale=None, mean=False, accumulate=False, record=None):
    """Fill (or add to) the first ``len(counts)`` rows of ``out`` (fp32, contiguous) with segment sums."""
    T, D = counts.shape[0], src.shape[1]
    gpu = autotuned(impl)
    bd = block_size(D, hi=128 if gpu else 32)
    launch(_segment_sum_kernel, (T, triton.cdiv(D, bd)), src, counts if scale is None else scale, order, starts,
           counts, out, D, src.stride(0), HAS_SCALE=scale is not None, MEAN=mean, ACCUMULATE=accumulate,
           BLOCK_K=16, BLOCK_D=bd, num_warps=4 if gpu else 1, record=record)
    return out

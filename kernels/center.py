"""Discriminative embedding (center) loss of CCS, one modality's L2_m (SPEC §2.2).

  ẑ = z / max(‖z‖, 1e-12) when ``normalize``; μ_c = batch mean of ẑ over class c, 𝒞 = present classes
  L2_m = mean_i [‖ẑ_i − μ_{y_i}‖² − alpha_intra]_+ + mean_{c ≠ c' ∈ 𝒞} [alpha_inter − ‖μ_c − μ_c'‖²]_+
The second mean is over ordered pairs and is 0 when |𝒞| < 2; gradients flow through μ.
Labels are arbitrary int64 values; classes are numbered 0..|𝒞|−1 by sorting, without host sync.

Triton algorithm (O(B·D) memory: μ and ∂L/∂μ are B×D buffers of which the first |𝒞| rows are
used, since |𝒞| is known only on the device; no B×B tensor, no host sync):
  0. ``class_ids``: stable sort of the labels → dense class ids, class sizes, member order and
     segment starts (a handful of small torch ops).
  1. ``normalize.row_norms``: r = 1/max(‖z‖, eps) per row.
  2. ``segments.segment_sum``: one program per (class, D chunk) sums its members' ẑ from the
     sorted order, so the class means are deterministic and need no atomics.
  3. ``_center_intra_kernel``: per sample the intra hinge, its loss partial, the weight
     w_i = 2/B·[active] and the direct gradient w_i (ẑ_i − μ_{y_i}).
  4. ``_center_inter_kernel``: per tile of classes, ‖μ_c − μ_c'‖² tile by tile with ``tl.dot``,
     the inter hinge and ∂L/∂μ_c = (4/P)(Σ_c' a_cc' μ_c' − deg_c μ_c), P = |𝒞|(|𝒞|−1),
     accumulated with plain loads and stores in the program's own rows of a B×D buffer (no
     atomics). Its grid covers B rows; programs past |𝒞| return at once (C²·D work).
  5. ``_center_grad_kernel``: per (class, D chunk) G_c = ∂L/∂μ_c − Σ_{i∈c} w_i (ẑ_i − μ_c),
     then each member gets G_c / n_c.
Each step needs the previous one complete (means → hinges → ∂L/∂μ → per-sample gradient),
hence the separate launches. The gradient ∂L/∂ẑ is computed in the forward; the backward is
one kernel, ``normalize.finish_grad``: ∂L/∂z = grad_output · r (g − ẑ (ẑ·g)) in z's dtype.
No step uses floating-point atomics: the gradients are bit-identical run to run.

Static figures (``python -m bench.static``, Triton 3.8) at B = 8192, D = 512, bf16, 101
classes: of the inter-class kernel's 256 programs (B / 32 class rows each), the 4 that hold
the 101 classes work on 32 × 32 class tiles and the rest exit at once; no atomics; torch ops around the kernels (the label sort) move 2.1 MB
against the kernels' 161 MB.

Limits: fp32 μ with IEEE-precision dots; one program per class walks its members, so a batch
with one huge class serialises step 2 and 5 on a few programs. GPU timings: not yet measured,
see bench/results/README.md.
"""
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ccs_fast.kernels._common import (
    PendingGrad,
    autotuned,
    block_size,
    check_dtype,
    grad_outputs,
    grad_outputs_fake,
    launch,
    needs_grad,
    tl,
    triton,
)
from ccs_fast.kernels._dispatch import Impl, resolve_impl
from ccs_fast.kernels.normalize import EPS as _EPS, loss_outputs_ref, register_loss_autograd, row_norms
from ccs_fast.kernels.segments import segment_sum

# ----------------------------------------------------------------------------- kernels


if triton is not None:

    @triton.jit
    def _center_intra_kernel(z_ptr, r_ptr, cls_ptr, mu_ptr, w_ptr, g_ptr, partial_ptr, B, D, stride_zm, alpha_intra,
                             COMPUTE_GRAD: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
        row_ok = rows < B
        r = tl.load(r_ptr + rows, mask=row_ok, other=0.0)
        c = tl.load(cls_ptr + rows, mask=row_ok, other=0)
        # dist_i = ‖ẑ_i − μ_{y_i}‖²
        dist = tl.zeros([BLOCK_B], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            m = row_ok[:, None] & (dd < D)[None, :]
            e = tl.load(z_ptr + rows[:, None] * stride_zm + dd[None, :], mask=m, other=0.0).to(tl.float32) * r[:, None]
            mu = tl.load(mu_ptr + c[:, None] * D + dd[None, :], mask=m, other=0.0)
            dist += tl.sum((e - mu) * (e - mu), axis=1)
        hinge = tl.where(row_ok, tl.maximum(dist - alpha_intra, 0.0), 0.0)
        tl.store(partial_ptr + pid, tl.sum(hinge, axis=0) / B)
        if COMPUTE_GRAD:
            # ∂/∂ẑ_i (direct) = w_i (ẑ_i − μ), w_i = 2/B [active]; the μ part is step 5's
            w = tl.where(row_ok & (dist - alpha_intra > 0.0), 2.0 / B, 0.0)
            tl.store(w_ptr + rows, w, mask=row_ok)
            for d0 in range(0, D, BLOCK_D):
                dd = d0 + tl.arange(0, BLOCK_D)
                m = row_ok[:, None] & (dd < D)[None, :]
                e = tl.load(z_ptr + rows[:, None] * stride_zm + dd[None, :], mask=m, other=0.0).to(tl.float32) * r[:, None]
                mu = tl.load(mu_ptr + c[:, None] * D + dd[None, :], mask=m, other=0.0)
                tl.store(g_ptr + rows[:, None] * D + dd[None, :], w[:, None] * (e - mu), mask=m)


    @triton.jit
    def _center_inter_kernel(mu_ptr, num_classes_ptr, dmu_ptr, partial_ptr, D, alpha_inter,
                             COMPUTE_GRAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_D: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        C = tl.load(num_classes_ptr)
        # the grid covers B rows, the classes are the first C ≤ B: programs past C have no work
        if pid * BLOCK_M < C:
            rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
            row_ok = rows < C
            inv_pairs = 1.0 / tl.maximum(C * (C - 1), 1).to(tl.float32)
            total = tl.zeros([BLOCK_M], dtype=tl.float32)
            deg = tl.zeros([BLOCK_M], dtype=tl.float32)
            for n0 in range(0, C, BLOCK_N):
                cols = n0 + tl.arange(0, BLOCK_N)
                col_ok = cols < C
                s = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
                sq_r = tl.zeros([BLOCK_M], dtype=tl.float32)
                sq_c = tl.zeros([BLOCK_N], dtype=tl.float32)
                for d0 in range(0, D, BLOCK_D):
                    dd = d0 + tl.arange(0, BLOCK_D)
                    d_ok = dd < D
                    a = tl.load(mu_ptr + rows[:, None] * D + dd[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
                    b = tl.load(mu_ptr + cols[:, None] * D + dd[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
                    s = tl.dot(a, tl.trans(b), s, input_precision="ieee")
                    sq_r += tl.sum(a * a, axis=1)
                    sq_c += tl.sum(b * b, axis=1)
                # hinge α − ‖μ_c − μ_c'‖² over distinct present classes
                gap = alpha_inter - (sq_r[:, None] + sq_c[None, :] - 2.0 * s)
                pair = row_ok[:, None] & col_ok[None, :] & (rows[:, None] != cols[None, :])
                act = pair & (gap > 0.0)
                total += tl.sum(tl.where(act, gap, 0.0), axis=1)
                if COMPUTE_GRAD:
                    a_w = tl.where(act, 4.0 * inv_pairs, 0.0)
                    deg += tl.sum(a_w, axis=1)
                    # ∂L/∂μ_c += (4/P) Σ_c' a_cc' μ_c': this program is the only writer of these rows
                    # (first column tile stores, later ones add; a barrier orders the threads)
                    for d0 in range(0, D, BLOCK_D):
                        dd = d0 + tl.arange(0, BLOCK_D)
                        d_ok = dd < D
                        m = row_ok[:, None] & d_ok[None, :]
                        b = tl.load(mu_ptr + cols[:, None] * D + dd[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
                        ptrs = dmu_ptr + rows[:, None] * D + dd[None, :]
                        prev = tl.load(ptrs, mask=m & (n0 > 0), other=0.0)
                        tl.store(ptrs, prev + tl.dot(a_w, b, input_precision="ieee"), mask=m)
                    tl.debug_barrier()
            tl.store(partial_ptr + pid, tl.sum(total, axis=0) * inv_pairs)
            if COMPUTE_GRAD:
                # ∂L/∂μ_c −= (4/P) deg_c μ_c
                for d0 in range(0, D, BLOCK_D):
                    dd = d0 + tl.arange(0, BLOCK_D)
                    m = row_ok[:, None] & (dd < D)[None, :]
                    a = tl.load(mu_ptr + rows[:, None] * D + dd[None, :], mask=m, other=0.0)
                    ptrs = dmu_ptr + rows[:, None] * D + dd[None, :]
                    tl.store(ptrs, tl.load(ptrs, mask=m, other=0.0) - deg[:, None] * a, mask=m)
        else:
            tl.store(partial_ptr + pid, 0.0)


    @triton.jit
    def _center_grad_kernel(z_ptr, r_ptr, order_ptr, starts_ptr, counts_ptr, mu_ptr, dmu_ptr, w_ptr, g_ptr, D, stride_zm,
                            BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
        c = tl.program_id(0).to(tl.int64)
        dd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        d_ok = dd < D
        start = tl.load(starts_ptr + c)
        n = tl.load(counts_ptr + c)
        mu = tl.load(mu_ptr + c * D + dd, mask=d_ok, other=0.0)
        # G_c = ∂L/∂μ_c − Σ_{i∈c} w_i (ẑ_i − μ_c)
        acc = tl.load(dmu_ptr + c * D + dd, mask=d_ok, other=0.0)
        for k0 in range(0, n, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < n
            i = tl.load(order_ptr + start + k, mask=k_ok, other=0)
            r = tl.load(r_ptr + i, mask=k_ok, other=0.0)
            w = tl.load(w_ptr + i, mask=k_ok, other=0.0)
            e = tl.load(z_ptr + i[:, None] * stride_zm + dd[None, :], mask=k_ok[:, None] & d_ok[None, :], other=0.0)
            acc -= tl.sum(w[:, None] * (e.to(tl.float32) * r[:, None] - mu[None, :]), axis=0)
        share = acc / tl.maximum(n, 1).to(tl.float32)
        # ∂L/∂ẑ_i += G_c / n_c for every member (each row belongs to one class: no atomics)
        for k0 in range(0, n, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < n
            i = tl.load(order_ptr + start + k, mask=k_ok, other=0)
            ptrs = g_ptr + i[:, None] * D + dd[None, :]
            m = k_ok[:, None] & d_ok[None, :]
            tl.store(ptrs, tl.load(ptrs, mask=m, other=0.0) + share[None, :], mask=m)


# ----------------------------------------------------------------------------- launchers


class _Blocks(NamedTuple):
    rows: int  # BLOCK_K / BLOCK_B: class members or samples per step of the row kernels
    width: int  # BLOCK_D of the row kernels
    tile_m: int  # BLOCK_M × BLOCK_N class tiles of the inter-class kernel
    tile_n: int
    tile_d: int  # its BLOCK_D
    warps: int  # of the row kernels
    tile_warps: int  # of the inter-class kernel (IEEE fp32 dots: 64 × 64 tiles spill on sm_90a)


def _blocks(D: int, impl: Impl) -> _Blocks:
    """Block sizes: the GPU's, or small ones under the interpreter."""
    if autotuned(impl):
        return _Blocks(16, block_size(D, hi=128), 32, 32, 32, 4, 4)
    return _Blocks(16, block_size(D, hi=32), 16, 16, 16, 1, 1)


def center_forward(z, labels, alpha_intra, alpha_inter, normalize, compute_grad, impl, record=None):
    """Loss (fp32 0-dim) and, if ``compute_grad``, z's ``PendingGrad`` (∂L/∂ẑ, finished by
    ``normalize.finish_grad``). ``record``: a ``_common.Recording`` that takes the launches."""
    check_dtype("discriminative_embedding_loss", z)
    z = z if z.stride(-1) == 1 else z.contiguous()
    B, D = z.shape
    assert labels.shape == (B,), "labels must be (B,)"
    dev = z.device
    cls, num_classes, counts, order, starts = class_ids(labels.contiguous())
    r, _ = row_norms(z, normalize, impl, record=record)
    blk = _blocks(D, impl)
    f32 = dict(dtype=torch.float32, device=dev)
    mu = torch.empty(B, D, **f32)
    segment_sum(z, order, starts, counts, mu, impl, scale=r, mean=True, record=record)  # μ_c = Σ_{i∈c} z_i r_i / n_c
    n_intra, n_inter = triton.cdiv(B, blk.rows), triton.cdiv(B, blk.tile_m)
    partial = torch.empty(n_intra + n_inter, **f32)
    weights = torch.empty(B, **f32) if compute_grad else partial
    g = torch.empty(B, D, **f32) if compute_grad else partial
    dmu = torch.empty(B, D, **f32) if compute_grad else partial  # rows < C written by the inter kernel
    launch(_center_intra_kernel, (n_intra,), z, r, cls, mu, weights, g, partial, B, D, z.stride(0), alpha_intra,
           COMPUTE_GRAD=compute_grad, BLOCK_B=blk.rows, BLOCK_D=blk.width, num_warps=blk.warps, record=record)
    launch(_center_inter_kernel, (n_inter,), mu, num_classes, dmu, partial[n_intra:], D, alpha_inter,
           COMPUTE_GRAD=compute_grad, BLOCK_M=blk.tile_m, BLOCK_N=blk.tile_n, BLOCK_D=blk.tile_d,
           num_warps=blk.tile_warps, record=record)
    loss = partial.sum()
    if not compute_grad:
        return loss, None
    launch(_center_grad_kernel, (B, triton.cdiv(D, blk.width)), z, r, order, starts, counts, mu, dmu, weights, g,
           D, z.stride(0), BLOCK_K=blk.rows, BLOCK_D=blk.width, num_warps=blk.warps, record=record)
    return loss, PendingGrad(z, r, g, normalize)


# ----------------------------------------------------------------------------- eager reference


def class_ids(labels: torch.Tensor):
    """Dense class ids without host sync.

    Returns ``(cls, num_classes, counts, order, starts)``: ``cls[i]`` in 0..C−1 numbers the
    distinct labels in ascending order, ``num_classes`` is C as a 0-dim device tensor,
    ``counts`` (B,) the class sizes (zero past C), ``order`` the sample indices grouped by class
    and ``starts`` (B,) each class's first position in ``order``.
    """
    sorted_labels, order = torch.sort(labels, stable=True)
    is_new = torch.ones_like(sorted_labels, dtype=torch.int64)
    is_new[1:] = (sorted_labels[1:] != sorted_labels[:-1]).long()
    cls_sorted = torch.cumsum(is_new, 0) - 1
    cls = torch.empty_like(cls_sorted).scatter_(0, order, cls_sorted)
    counts = torch.zeros_like(cls_sorted).index_add_(0, cls_sorted, torch.ones_like(cls_sorted))
    starts = torch.cumsum(counts, 0) - counts
    return cls, cls_sorted[-1] + 1, counts, order, starts


def discriminative_embedding_loss_ref(z, labels, alpha_intra=0.3, alpha_inter=0.8, normalize=True):
    """Eager definition of L2_m: fp32 0-dim loss, segment sums by sorted class ids, no host sync."""
    with torch.autocast(z.device.type, enabled=False):
        e = z.float()
        e = F.normalize(e, dim=1, eps=_EPS) if normalize else e
        B = e.shape[0]
        cls, num_classes, counts, _, _ = class_ids(labels)
        sums = torch.zeros_like(e).index_add_(0, cls, e)
        mu = sums / counts.clamp_min(1)[:, None].to(e.dtype)  # rows past C stay 0
        intra = ((e - mu[cls]).pow(2).sum(1) - alpha_intra).clamp_min(0).mean()
        present = torch.arange(B, device=e.device) < num_classes
        pairs = present[:, None] & present[None, :] & ~torch.eye(B, dtype=torch.bool, device=e.device)
        sq = mu.pow(2).sum(1)
        d_mu = sq[:, None] + sq[None, :] - 2.0 * (mu @ mu.T)
        inter_sum = torch.where(pairs, (alpha_inter - d_mu).clamp_min(0), 0.0).sum()
        inter = inter_sum / (num_classes * (num_classes - 1)).clamp_min(1)
        return intra + inter


def discriminative_embedding_loss(z, labels, alpha_intra=0.3, alpha_inter=0.8, normalize=True, impl="auto",
                                  deterministic=None):
    """One modality's discriminative embedding loss (fp32 0-dim). ``impl``: "auto" | "triton" | "eager".

    The Triton path has no floating-point atomics, so its gradients are bit-identical run to
    run whatever ``deterministic`` says (the argument exists for a uniform interface)."""
    if z.dim() != 2 or labels.shape != (z.shape[0],):
        raise ValueError(f"discriminative_embedding_loss: need z (B, D) and labels (B,), got {tuple(z.shape)}, {tuple(labels.shape)}")
    if resolve_impl(impl, z, labels) is Impl.EAGER:
        return discriminative_embedding_loss_ref(z, labels, alpha_intra, alpha_inter, normalize)
    return discriminative_embedding_loss_op(z, labels, float(alpha_intra), float(alpha_inter), bool(normalize),
                                            needs_grad(z))[0]


# ----------------------------------------------------------------------------- registered op
#
# ccs_fast::discriminative_embedding_loss (z, labels, alpha_intra, alpha_inter, normalize,
#                                          compute_grad) -> (loss, r, g)
# r (B,) and g = ∂L/∂ẑ (B, D) are fp32 outputs, not differentiable, that the registered
# autograd saves for ``ccs_fast::finish_grad``; empty ((0,), (0, D)) when compute_grad is False.


@torch.library.custom_op("ccs_fast::discriminative_embedding_loss", mutates_args=())
def discriminative_embedding_loss_op(z: Tensor, labels: Tensor, alpha_intra: float, alpha_inter: float,
                                     normalize: bool, compute_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    """L2_m (fp32 0-dim) and, when ``compute_grad``, the row factors r and ∂L/∂ẑ."""
    impl = resolve_impl("triton", z, labels, fallback=True)
    if impl is Impl.EAGER:
        return loss_outputs_ref(lambda e: discriminative_embedding_loss_ref(e, labels, alpha_intra, alpha_inter, False),
                                [z], normalize, compute_grad)
    loss, pending = center_forward(z, labels, alpha_intra, alpha_inter, normalize, compute_grad=compute_grad, impl=impl)
    return (loss, *grad_outputs(z, pending))


@discriminative_embedding_loss_op.register_fake
def _center_fake(z, labels, alpha_intra, alpha_inter, normalize, compute_grad):
    return (z.new_empty((), dtype=torch.float32), *grad_outputs_fake(z, compute_grad))


register_loss_autograd(discriminative_embedding_loss_op, embeddings=(0,), normalize_arg=4)

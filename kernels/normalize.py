"""Row L2 normalisation shared by the losses: ẑ = z / max(‖z‖, eps) and its backward.

``row_norms`` gives r = 1/max(‖z‖, eps) and ‖ẑ‖² per row (fp32, one pass over z; it can zero
a gradient buffer in the same pass); the losses scale rows by r on the fly instead of writing
ẑ. ``finish_grad`` is a loss's whole backward: ∂L/∂ẑ (fp32, computed in the forward) becomes
grad_output · r (g − ẑ (ẑ·g)) (where the norm was clamped to eps, grad_output · r g), written
once in the input's dtype. Both are memory-bound row kernels.

``finish_grad_op`` registers that backward as the operator ``ccs_fast::finish_grad``: the
losses' registered autograd calls it, so a compiled or exported graph holds one opaque node
for it. Where the kernels do not run (CPU without ``TRITON_INTERPRET=1``) it takes the
gradient of ``normalized_ref`` by autograd (``finish_grad_ref``), and the loss ops' eager
branches take ∂L/∂ẑ from their references by autograd (``loss_outputs_ref``).
"""
import torch
from torch import Tensor

from ccs_fast.kernels._common import (
    autograd_inside_op,
    autotuned,
    block_size,
    grad_outputs,
    launch,
    tl,
    triton,
)
from ccs_fast.kernels._dispatch import Impl, resolve_impl

EPS = 1e-12  # F.normalize's clamp of the norm

if triton is not None:

    @triton.jit
    def _row_norm_kernel(z_ptr, r_ptr, sq_ptr, zero_ptr, B, D, stride_zm, NORMALIZE: tl.constexpr,
                         ZERO: tl.constexpr, EPS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
        row_ok = rows < B
        ss = tl.zeros([BLOCK_B], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            m = row_ok[:, None] & (cols < D)[None, :]
            z = tl.load(z_ptr + rows[:, None] * stride_zm + cols[None, :], mask=m, other=0.0).to(tl.float32)
            ss += tl.sum(z * z, axis=1)
            if ZERO:  # a contiguous fp32 (B, D) buffer that atomics will accumulate into
                tl.store(zero_ptr + rows[:, None] * D + cols[None, :], tl.zeros([BLOCK_B, BLOCK_D], tl.float32), mask=m)
        if NORMALIZE:
            # r = 1 / max(‖z‖, eps), ‖ẑ‖² = ‖z‖² r²
            r = 1.0 / tl.maximum(tl.sqrt(ss), EPS)
        else:
            r = tl.full([BLOCK_B], 1.0, tl.float32)
        tl.store(r_ptr + rows, r, mask=row_ok)
        tl.store(sq_ptr + rows, ss * r * r, mask=row_ok)

    @triton.jit
    def _finish_grad_kernel(z_ptr, r_ptr, g_ptr, go_ptr, dz_ptr, B, D, stride_zm, NORMALIZE: tl.constexpr,
                            EPS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
        row_ok = rows < B
        go = tl.load(go_ptr).to(tl.float32)
        r = tl.load(r_ptr + rows, mask=row_ok, other=0.0)
        dot = tl.zeros([BLOCK_B], dtype=tl.float32)
        if NORMALIZE:
            for d0 in range(0, D, BLOCK_D):
                dd = d0 + tl.arange(0, BLOCK_D)
                m = row_ok[:, None] & (dd < D)[None, :]
                zh = tl.load(z_ptr + rows[:, None] * stride_zm + dd[None, :], mask=m, other=0.0).to(tl.float32) * r[:, None]
                g = tl.load(g_ptr + rows[:, None] * D + dd[None, :], mask=m, other=0.0)
                dot += tl.sum(zh * g, axis=1)
        # ∂L/∂z = go · r (g − ẑ (ẑ·g)); where the norm was clamped to eps, ẑ = z/eps and ∂L/∂z = go · r g
        keep = (r < 1.0 / EPS) & NORMALIZE
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            m = row_ok[:, None] & (dd < D)[None, :]
            g = tl.load(g_ptr + rows[:, None] * D + dd[None, :], mask=m, other=0.0)
            if NORMALIZE:
                zh = tl.load(z_ptr + rows[:, None] * stride_zm + dd[None, :], mask=m, other=0.0).to(tl.float32) * r[:, None]
                g = tl.where(keep[:, None], g - zh * dot[:, None], g)
            dz = go * r[:, None] * g
            tl.store(dz_ptr + rows[:, None] * D + dd[None, :], dz.to(dz_ptr.dtype.element_ty), mask=m)


def row_blocks(D: int, impl: Impl):
    """(BLOCK_B, BLOCK_D, num_warps) of the row kernels: 16 rows, up to 128 features at a time
    (256 spill on sm_90a in the zeroing row-norm pass)."""
    if autotuned(impl):
        return 16, block_size(D, hi=128), 4
    return 16, block_size(D, hi=32), 1


def row_norms(z: torch.Tensor, normalize: bool, impl: Impl, zero: torch.Tensor | None = None, record=None):
    """(r, ‖ẑ‖²) per row, fp32: r = 1/max(‖z‖, eps), or 1 when not normalising. ``zero``, a
    contiguous fp32 tensor of z's shape, is zeroed in the same pass."""
    B, D = z.shape
    r = torch.empty(B, dtype=torch.float32, device=z.device)
    sq = torch.empty_like(r)
    bb, bd, w = row_blocks(D, impl)
    launch(_row_norm_kernel, (triton.cdiv(B, bb),), z, r, sq, r if zero is None else zero, B, D, z.stride(0),
           NORMALIZE=normalize, ZERO=zero is not None, EPS=EPS, BLOCK_B=bb, BLOCK_D=bd, num_warps=w, record=record)
    return r, sq


def finish_grad(z: torch.Tensor, r: torch.Tensor, g: torch.Tensor, grad_out: torch.Tensor, normalize: bool,
                impl: Impl, record=None):
    """∂L/∂z in z's dtype from g = ∂L/∂ẑ (fp32 contiguous), the row factors r and grad_output."""
    B, D = z.shape
    dz = torch.empty((B, D), dtype=z.dtype, device=z.device)
    bb, bd, w = row_blocks(D, impl)
    launch(_finish_grad_kernel, (triton.cdiv(B, bb),), z, r, g, grad_out.reshape(1), dz, B, D, z.stride(0),
           NORMALIZE=normalize, EPS=EPS, BLOCK_B=bb, BLOCK_D=bd, num_warps=w, record=record)
    return dz


def row_factors_ref(z: torch.Tensor, normalize: bool) -> torch.Tensor:
    """r = 1/max(‖z‖, eps) per row in fp32 (ones when not normalising), with torch ops."""
    if not normalize:
        return torch.ones(z.shape[0], dtype=torch.float32, device=z.device)
    return 1.0 / torch.linalg.vector_norm(z.float(), dim=1).clamp_min(EPS)


def normalized_ref(z: torch.Tensor, normalize: bool) -> torch.Tensor:
    """ẑ = z · r in fp32 (z itself in fp32 when not normalising), with torch ops."""
    return z.float() * row_factors_ref(z, normalize)[:, None]


def finish_grad_ref(z: torch.Tensor, g: torch.Tensor, grad_out: torch.Tensor, normalize: bool) -> torch.Tensor:
    """``finish_grad`` with torch ops: the gradient of ``normalized_ref`` at z for the cotangent
    grad_output · g, by autograd, in z's dtype (contiguous)."""
    with autograd_inside_op():
        leaf = z.detach().requires_grad_()
        dz = torch.autograd.grad(normalized_ref(leaf, normalize), leaf, grad_out.float().reshape(()) * g)[0]
    return dz.contiguous()


def loss_outputs_ref(ref, zs, normalize: bool, compute_grad: bool) -> tuple:
    """A loss op's outputs ``(loss, r, g, r, g, ...)`` with torch ops: ``ref`` (the loss's
    reference, which must not normalise again) on each input's normalised rows ẑ and, when
    ``compute_grad``, each input's row factors r and g = ∂L/∂ẑ by autograd."""
    hats = [normalized_ref(z.detach(), normalize) for z in zs]
    if not compute_grad:
        return (ref(*hats), *(t for z in zs for t in grad_outputs(z, None)))
    with autograd_inside_op():
        hats = [h.requires_grad_() for h in hats]
        loss = ref(*hats)
        grads = torch.autograd.grad(loss, hats)
    factors = [row_factors_ref(z, normalize) for z in zs]
    return (loss.detach(), *(t for r, g in zip(factors, grads) for t in (r, g.contiguous())))


@torch.library.custom_op("ccs_fast::finish_grad", mutates_args=())
def finish_grad_op(z: Tensor, r: Tensor, g: Tensor, grad_out: Tensor, normalize: bool) -> Tensor:
    """∂L/∂z (B, D) in z's dtype from ∂L/∂ẑ ``g`` (B, D) fp32, the row factors ``r`` (B,) fp32
    and the loss's 0-dim ``grad_out``. Not differentiable itself."""
    impl = resolve_impl("triton", z, r, g, grad_out, fallback=True)
    if impl is Impl.EAGER:
        return finish_grad_ref(z, g, grad_out, normalize)
    z = z if z.stride(-1) == 1 else z.contiguous()
    return finish_grad(z, r.contiguous(), g.contiguous(), grad_out.float(), normalize, impl)


@finish_grad_op.register_fake
def _finish_grad_fake(z, r, g, grad_out, normalize):
    return z.new_empty(z.shape)


def register_loss_autograd(op, embeddings: tuple[int, ...], normalize_arg: int) -> None:
    """Autograd of a loss op whose outputs are ``(loss, r, g, r, g, ...)``, one (r, g) pair per
    input position in ``embeddings`` and whose last input is ``compute_grad``. The forward
    computed ∂L/∂ẑ; the backward finishes each needed input's gradient with
    ``ccs_fast::finish_grad``. The (r, g) outputs are not differentiable."""

    def setup_context(ctx, inputs, output):
        pending = output[1:]
        ctx.mark_non_differentiable(*pending)
        ctx.save_for_backward(*(inputs[i] for i in embeddings), *pending)
        ctx.normalize, ctx.computed, ctx.num_inputs = inputs[normalize_arg], inputs[-1], len(inputs)

    def backward(ctx, grad_loss, *_):
        if not ctx.computed:
            raise RuntimeError("the loss op ran with compute_grad=False: it kept no gradient to give")
        saved = ctx.saved_tensors
        n = len(embeddings)
        grads = [None] * ctx.num_inputs
        for k, i in enumerate(embeddings):
            if ctx.needs_input_grad[i]:
                z, r, g = saved[k], saved[n + 2 * k], saved[n + 2 * k + 1]
                grads[i] = finish_grad_op(z, r, g, grad_loss, ctx.normalize)
        return tuple(grads)

    op.register_autograd(backward, setup_context=setup_context)

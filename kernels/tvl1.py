"""One primal-dual iteration of Dual TV-L1 optical flow, fused: the inner loop of
``ccs_fast.dataloader.tvl1``.

Per pixel, with the linearised data term ρ(u) = ρ_c + ∇I1w · u, l_t = λθ and τ/θ = taut
(Zach, Pock and Bischof 2007; Wedel et al. 2009; the IPOL 2013 description by Sánchez Pérez,
Meinhardt-Llopis and Facciolo; the update order of OpenCV's ``DualTVL1OpticalFlow``):

    v   = u + TH(ρ(u)) ∇I1w            TH: l_t, −l_t or −ρ / |∇I1w|² (0 where |∇I1w|² ≤ FLT_EPSILON)
    u'  = v + θ · div p                div: backward differences, a missing neighbour reads 0
    p'  = (p + taut ∇u') / (1 + taut |∇u'|)   ∇: forward differences, 0 on the last row/column
    err = Σ |u' − u|²                  per pair, for the stopping rule

``p'`` at a pixel needs ``u'`` of its right and lower neighbours, which needs ``p`` of their
left and upper neighbours: the kernel recomputes ``u'`` at those two neighbours from the old
fields instead of synchronising, so each program reads the old fields (``u1, u2, p11, p12,
p21, p22`` and the warped image terms) and writes the new ones to separate buffers
(ping-pong). ``err`` is written as one partial sum per program; a second launch sums them per
pair in a fixed order (no atomics: bit-identical run to run) and updates the pair's state:
a converged pair is copied once into the other buffers and skipped from then on, so a batch
costs what its unconverged pairs cost.

Each program covers ``BLOCK_N`` pixels of one pair in row-major order; any H, W.

``_tvl1_median_kernel`` is the median filtering between outer iterations on CUDA: each
pixel's k×k window (replicated border), padded to a power of two with −∞/+∞, sorted in
registers (``tl.sort``), the middle taken; exact. Off CUDA (and in the interpreter, whose sort
is slow) the drivers use ``dataloader.tvl1.median_filter``, a min/max selection network.
The eager reference ``tvl1_step_ref`` is the definition and the CPU implementation.
Not yet measured on a GPU; the kernel is compiled ahead of time for sm_90a and sm_80 by
``bench.aot`` and checked against the reference in the interpreter (tests/dataloader/test_tvl1.py).
"""
from __future__ import annotations

import torch

from ccs_fast.kernels._common import block_size, launch, tl, triton
from ccs_fast.kernels._dispatch import Impl, resolve_impl

FLT_EPSILON = 1.1920928955078125e-07  # numeric_limits<float>::epsilon(): |∇I1w|² below it is flat


def _shift_right(t: torch.Tensor) -> torch.Tensor:
    """t[..., x - 1] with 0 in column 0."""
    return torch.nn.functional.pad(t[..., :-1], (1, 0))


def _shift_down(t: torch.Tensor) -> torch.Tensor:
    """t[..., y - 1, :] with 0 in row 0."""
    return torch.nn.functional.pad(t[..., :-1, :], (0, 0, 1, 0))


def _forward_diff(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    ux = torch.nn.functional.pad(u[..., 1:] - u[..., :-1], (0, 1))
    uy = torch.nn.functional.pad(u[..., 1:, :] - u[..., :-1, :], (0, 0, 0, 1))
    return ux, uy


def tvl1_step_ref(u1, u2, p11, p12, p21, p22, wx, wy, grad, rho_c, active, l_t, theta, taut):
    """One iteration on (P, H, W) fp32 fields; ``active`` (P,) bool. Returns the six new
    fields and err (P,) fp32 (0 for inactive pairs)."""
    # ρ(u) = ρ_c + ∇I1w · u; v = u + TH(ρ)
    rho = rho_c + (wx * u1 + wy * u2)
    bound = l_t * grad
    step = torch.where(grad > FLT_EPSILON, -rho / grad, torch.zeros_like(rho))
    step = torch.where(rho < -bound, l_t, torch.where(rho > bound, -l_t, step))
    v1, v2 = u1 + step * wx, u2 + step * wy
    # u' = v + θ div p
    div1 = (p11 - _shift_right(p11)) + (p12 - _shift_down(p12))
    div2 = (p21 - _shift_right(p21)) + (p22 - _shift_down(p22))
    n1, n2 = v1 + theta * div1, v2 + theta * div2
    err = ((n1 - u1) * (n1 - u1) + (n2 - u2) * (n2 - u2)).sum(dim=(1, 2))
    # p' = (p + taut ∇u') / (1 + taut |∇u'|)
    u1x, u1y = _forward_diff(n1)
    u2x, u2y = _forward_diff(n2)
    ng1 = 1.0 + taut * torch.hypot(u1x, u1y)
    ng2 = 1.0 + taut * torch.hypot(u2x, u2y)
    new = (n1, n2, (p11 + taut * u1x) / ng1, (p12 + taut * u1y) / ng1,
           (p21 + taut * u2x) / ng2, (p22 + taut * u2y) / ng2)
    if not active.is_cuda and bool(active.all()):  # no host sync on a GPU
        return (*new, err)
    keep = active.view(-1, 1, 1)
    out = tuple(torch.where(keep, n, o) for n, o in zip(new, (u1, u2, p11, p12, p21, p22)))
    return (*out, torch.where(active, err, torch.zeros_like(err)))


if triton is not None:

    @triton.jit
    def _tvl1_primal(base, q, x, y, valid, u1_ptr, u2_ptr, p11_ptr, p12_ptr, p21_ptr, p22_ptr,
                     wx_ptr, wy_ptr, grad_ptr, rho_ptr, W, l_t, theta, EPS: tl.constexpr):
        """u' = u + TH(ρ(u)) + θ div p at flat pixel indices ``q`` of the pair at ``base``."""
        u1 = tl.load(u1_ptr + base + q, mask=valid, other=0.0)
        u2 = tl.load(u2_ptr + base + q, mask=valid, other=0.0)
        wx = tl.load(wx_ptr + base + q, mask=valid, other=0.0)
        wy = tl.load(wy_ptr + base + q, mask=valid, other=0.0)
        grad = tl.load(grad_ptr + base + q, mask=valid, other=0.0)
        rho_c = tl.load(rho_ptr + base + q, mask=valid, other=0.0)
        # ρ(u) = ρ_c + ∇I1w · u; TH: ±l_t ∇I1w outside [−l_t|∇I1w|², l_t|∇I1w|²], −ρ∇I1w/|∇I1w|² inside
        rho = rho_c + (wx * u1 + wy * u2)
        bound = l_t * grad
        step = tl.where(grad > EPS, -rho / tl.where(grad > EPS, grad, 1.0), 0.0)
        step = tl.where(rho < -bound, l_t, tl.where(rho > bound, -l_t, step))
        # div p: backward differences, a neighbour outside the image reads 0
        left = valid & (x > 0)
        up = valid & (y > 0)
        div1 = (tl.load(p11_ptr + base + q, mask=valid, other=0.0)
                - tl.load(p11_ptr + base + q - 1, mask=left, other=0.0)) \
            + (tl.load(p12_ptr + base + q, mask=valid, other=0.0)
               - tl.load(p12_ptr + base + q - W, mask=up, other=0.0))
        div2 = (tl.load(p21_ptr + base + q, mask=valid, other=0.0)
                - tl.load(p21_ptr + base + q - 1, mask=left, other=0.0)) \
            + (tl.load(p22_ptr + base + q, mask=valid, other=0.0)
               - tl.load(p22_ptr + base + q - W, mask=up, other=0.0))
        return u1, u2, (u1 + step * wx) + theta * div1, (u2 + step * wy) + theta * div2

    @triton.jit
    def _tvl1_step_kernel(u1_ptr, u2_ptr, p11_ptr, p12_ptr, p21_ptr, p22_ptr,
                          wx_ptr, wy_ptr, grad_ptr, rho_ptr, state_ptr,
                          o_u1_ptr, o_u2_ptr, o_p11_ptr, o_p12_ptr, o_p21_ptr, o_p22_ptr, err_ptr,
                          H, W, l_t, theta, taut,
                          EPS: tl.constexpr, BLOCK_N: tl.constexpr):
        pid_p = tl.program_id(0).to(tl.int64)
        state = tl.load(state_ptr + pid_p)
        # state 2: the pair converged two or more iterations ago, both buffers hold its fields
        if state < 2:
            _tvl1_step_block(pid_p, state, u1_ptr, u2_ptr, p11_ptr, p12_ptr, p21_ptr, p22_ptr,
                             wx_ptr, wy_ptr, grad_ptr, rho_ptr, o_u1_ptr, o_u2_ptr, o_p11_ptr,
                             o_p12_ptr, o_p21_ptr, o_p22_ptr, err_ptr, H, W, l_t, theta, taut,
                             EPS, BLOCK_N)

    @triton.jit
    def _tvl1_step_block(pid_p, state, u1_ptr, u2_ptr, p11_ptr, p12_ptr, p21_ptr, p22_ptr,
                         wx_ptr, wy_ptr, grad_ptr, rho_ptr,
                         o_u1_ptr, o_u2_ptr, o_p11_ptr, o_p12_ptr, o_p21_ptr, o_p22_ptr, err_ptr,
                         H, W, l_t, theta, taut, EPS: tl.constexpr, BLOCK_N: tl.constexpr):
        """One block of one pair: state 0 computes the iteration, state 1 copies the fields."""
        pid_b = tl.program_id(1)
        HW = H * W
        base = pid_p * HW
        q = pid_b * BLOCK_N + tl.arange(0, BLOCK_N)
        inside = q < HW
        y = q // W
        x = q - y * W
        has_right = inside & (x < W - 1)
        has_down = inside & (y < H - 1)
        u1, u2, n1, n2 = _tvl1_primal(base, q, x, y, inside, u1_ptr, u2_ptr, p11_ptr, p12_ptr,
                                      p21_ptr, p22_ptr, wx_ptr, wy_ptr, grad_ptr, rho_ptr,
                                      W, l_t, theta, EPS)
        _r1, _r2, r1, r2 = _tvl1_primal(base, q + 1, x + 1, y, has_right, u1_ptr, u2_ptr, p11_ptr,
                                        p12_ptr, p21_ptr, p22_ptr, wx_ptr, wy_ptr, grad_ptr,
                                        rho_ptr, W, l_t, theta, EPS)
        _d1, _d2, d1, d2 = _tvl1_primal(base, q + W, x, y + 1, has_down, u1_ptr, u2_ptr, p11_ptr,
                                        p12_ptr, p21_ptr, p22_ptr, wx_ptr, wy_ptr, grad_ptr,
                                        rho_ptr, W, l_t, theta, EPS)
        # ∇u': forward differences, 0 on the last column / row
        u1x = tl.where(has_right, r1 - n1, 0.0)
        u1y = tl.where(has_down, d1 - n1, 0.0)
        u2x = tl.where(has_right, r2 - n2, 0.0)
        u2y = tl.where(has_down, d2 - n2, 0.0)
        p11 = tl.load(p11_ptr + base + q, mask=inside, other=0.0)
        p12 = tl.load(p12_ptr + base + q, mask=inside, other=0.0)
        p21 = tl.load(p21_ptr + base + q, mask=inside, other=0.0)
        p22 = tl.load(p22_ptr + base + q, mask=inside, other=0.0)
        # p' = (p + taut ∇u') / (1 + taut |∇u'|)
        ng1 = 1.0 + taut * tl.sqrt(u1x * u1x + u1y * u1y)
        ng2 = 1.0 + taut * tl.sqrt(u2x * u2x + u2y * u2y)
        keep = inside & (state == 0)
        n1 = tl.where(keep, n1, u1)
        n2 = tl.where(keep, n2, u2)
        tl.store(o_u1_ptr + base + q, n1, mask=inside)
        tl.store(o_u2_ptr + base + q, n2, mask=inside)
        tl.store(o_p11_ptr + base + q, tl.where(keep, (p11 + taut * u1x) / ng1, p11), mask=inside)
        tl.store(o_p12_ptr + base + q, tl.where(keep, (p12 + taut * u1y) / ng1, p12), mask=inside)
        tl.store(o_p21_ptr + base + q, tl.where(keep, (p21 + taut * u2x) / ng2, p21), mask=inside)
        tl.store(o_p22_ptr + base + q, tl.where(keep, (p22 + taut * u2y) / ng2, p22), mask=inside)
        # err: Σ |u' − u|² of this block (0 for an inactive pair)
        e = (n1 - u1) * (n1 - u1) + (n2 - u2) * (n2 - u2)
        tl.store(err_ptr + pid_p * tl.num_programs(1) + pid_b, tl.sum(tl.where(keep, e, 0.0), axis=0))

    @triton.jit
    def _tvl1_converge_kernel(partial_ptr, state_ptr, err_ptr, n_blocks, scaled_eps,
                              BLOCK_B: tl.constexpr):
        """Per pair: err = Σ of the step's block partials (fixed order); state 0 stays 0 while
        err > ε and becomes 1 otherwise; 1 becomes 2 (the copy is done)."""
        pid = tl.program_id(0).to(tl.int64)
        state = tl.load(state_ptr + pid)
        acc = tl.zeros([BLOCK_B], dtype=tl.float32)
        if state == 0:
            for start in range(0, n_blocks, BLOCK_B):
                offs = start + tl.arange(0, BLOCK_B)
                acc += tl.load(partial_ptr + pid * n_blocks + offs, mask=offs < n_blocks, other=0.0)
        err = tl.sum(acc, axis=0)
        tl.store(err_ptr + pid, err)
        converged = tl.where(err > scaled_eps, 0, 1)
        tl.store(state_ptr + pid, tl.where(state == 0, converged, tl.minimum(state + 1, 2)))


if triton is not None:

    @triton.jit
    def _tvl1_median_kernel(x_ptr, o_ptr, state_ptr, H, W, R: tl.constexpr, TAPS: tl.constexpr,
                            BLOCK_N: tl.constexpr):
        """(2R+1)² median with a replicated border for the pairs whose state is 0; the others
        are copied. Each pixel's window, padded to TAPS with −∞/+∞ (half each), is sorted
        along the tile's second axis (a bitonic network in registers)."""
        pid_p = tl.program_id(0).to(tl.int64)
        state = tl.load(state_ptr + pid_p)
        q = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        inside = q < H * W
        base = pid_p * H * W
        if state == 0:
            K: tl.constexpr = 2 * R + 1
            LOW: tl.constexpr = (TAPS - K * K) // 2
            y = q // W
            x = q - y * W
            t = tl.arange(0, TAPS)
            real = t < K * K
            # window taps, coordinates clamped to the image (replicated border)
            yy = tl.minimum(tl.maximum(y[:, None] + (t // K - R)[None, :], 0), H - 1)
            xx = tl.minimum(tl.maximum(x[:, None] + (t % K - R)[None, :], 0), W - 1)
            v = tl.load(x_ptr + base + yy * W + xx, mask=real[None, :] & inside[:, None], other=0.0)
            pad = tl.where(t < K * K + LOW, float("-inf"), float("inf"))
            v = tl.where(real[None, :], v, pad[None, :])
            # the median is the middle of the sorted real taps: sorted position K²//2 + LOW
            med = tl.sum(tl.where((t == K * K // 2 + LOW)[None, :], tl.sort(v, dim=1), 0.0), axis=1)
            tl.store(o_ptr + base + q, med, mask=inside)
        else:
            tl.store(o_ptr + base + q, tl.load(x_ptr + base + q, mask=inside, other=0.0), mask=inside)


def median_filter_triton(x, state, out, k: int, block: int = 64, num_warps: int = 4, record=None):
    """``out`` ← k×k median of ``x`` (P, H, W) fp32 (replicated border) for the pairs whose
    ``state`` is 0, ``x`` for the others. Exact (sorting, no arithmetic). ``record``: a
    ``_common.Recording`` that takes the launch."""
    P, H, W = x.shape
    launch(_tvl1_median_kernel, (P, triton.cdiv(H * W, block)), x, out, state, H, W,
           R=k // 2, TAPS=block_size(k * k), BLOCK_N=block, num_warps=num_warps, record=record)
    return out


def _check_fields(fields):
    P, H, W = fields[0].shape
    for t in fields:
        if t.shape != (P, H, W) or t.dtype != torch.float32 or not t.is_contiguous():
            raise ValueError(f"tvl1_step: fields must be contiguous float32 {(P, H, W)}, got "
                             f"{tuple(t.shape)} {t.dtype}")


def tvl1_iterate_triton(fields, images, out, state, partial, err, l_t, theta, taut, scaled_eps,
                        block: int = 256, num_warps: int = 4, record=None):
    """One fused iteration from ``fields`` (u1, u2, p11, p12, p21, p22) into ``out`` (six
    buffers, not aliasing them) with ``images`` (wx, wy, grad, rho_c), all (P, H, W) fp32;
    ``state`` (P,) int32 (0 active, 1 just converged: copy, 2 skip) and ``err`` (P,) fp32
    are updated in place; ``partial`` (P, ⌈HW/block⌉) fp32 is scratch. Two launches."""
    P, H, W = fields[0].shape
    blocks = triton.cdiv(H * W, block)
    launch(_tvl1_step_kernel, (P, blocks), *fields, *images, state, *out, partial,
           H, W, float(l_t), float(theta), float(taut), EPS=FLT_EPSILON, BLOCK_N=block,
           num_warps=num_warps, record=record)
    launch(_tvl1_converge_kernel, (P,), partial, state, err, blocks, float(scaled_eps),
           BLOCK_B=128, num_warps=1, record=record)


def tvl1_step_triton(u1, u2, p11, p12, p21, p22, wx, wy, grad, rho_c, active, l_t, theta, taut,
                     out=None, block: int = 256, num_warps: int = 4, record=None):
    """``tvl1_step_ref`` with the fused kernels: ``out``, six (P, H, W) buffers for the new
    fields (allocated when None; must not alias the inputs). Returns them and err (P,)."""
    fields = (u1, u2, p11, p12, p21, p22)
    images = (wx, wy, grad, rho_c)
    _check_fields(fields + images)
    P, H, W = u1.shape
    if out is None:
        out = tuple(torch.empty_like(u1) for _ in range(6))
    state = torch.where(active, 0, 1).to(torch.int32)
    partial = torch.empty((P, triton.cdiv(H * W, block)), device=u1.device, dtype=torch.float32)
    err = torch.empty((P,), device=u1.device, dtype=torch.float32)
    tvl1_iterate_triton(fields, images, out, state, partial, err, l_t, theta, taut, 0.0,
                        block=block, num_warps=num_warps, record=record)
    return (*out, err)


class EagerIterations:
    """The inner loop of one warp for a batch, in torch: ``step()`` runs ``tvl1_step_ref`` and
    drops pairs whose err ≤ ``scaled_eps`` from ``active``."""

    def __init__(self, u1, u2, p, images, l_t, theta, taut, scaled_eps):
        self.fields = [u1, u2, *p]
        self.images = images
        self.consts = (l_t, theta, taut)
        self.scaled_eps = scaled_eps
        self.active = torch.ones(u1.shape[0], dtype=torch.bool, device=u1.device)

    def any_active(self) -> bool:
        return bool(self.active.any())

    def median_(self, fn, k: int | None = None) -> None:
        """u ← fn(u) for the active pairs (``k``, the window, is for the Triton driver)."""
        keep = self.active.view(-1, 1, 1)
        for i in (0, 1):
            self.fields[i] = torch.where(keep, fn(self.fields[i]), self.fields[i])

    def step(self) -> None:
        *self.fields, err = tvl1_step_ref(*self.fields, *self.images, self.active, *self.consts)
        self.active = self.active & (err > self.scaled_eps)

    def result(self):
        """(u1, u2, [p11, p12, p21, p22])."""
        return self.fields[0], self.fields[1], self.fields[2:]


class TritonIterations(EagerIterations):
    """The same loop with the fused kernels: the fields ping-pong between two sets of
    buffers, and a converged pair is copied once into the other set and skipped after that
    (``state`` 0 → 1 → 2), so a batch costs what its unconverged pairs cost. No host sync
    but ``any_active``."""

    def __init__(self, u1, u2, p, images, l_t, theta, taut, scaled_eps, impl: Impl = Impl.TRITON):
        fields = [t.contiguous() for t in (u1, u2, *p)]
        images = tuple(t.contiguous() for t in images)
        _check_fields(fields + list(images))
        P, H, W = u1.shape
        self.buffers = [fields, [torch.empty_like(u1) for _ in range(6)]]
        self.current = 0
        self.images = images
        self.consts = (l_t, theta, taut, scaled_eps)
        self.block = 256
        self.impl = impl
        self.state = torch.zeros(P, dtype=torch.int32, device=u1.device)
        self.partial = torch.empty((P, triton.cdiv(H * W, self.block)), device=u1.device,
                                   dtype=torch.float32)
        self.err = torch.empty((P,), device=u1.device, dtype=torch.float32)
        self.scratch = torch.empty_like(u1)

    @property
    def active(self):
        return self.state == 0

    def median_(self, fn, k: int | None = None) -> None:
        """The median of the active pairs' u: with the Triton median kernel on CUDA (``k``),
        ``fn`` under the interpreter (which sorts slowly)."""
        fields = self.buffers[self.current]
        if k is None or self.impl is not Impl.TRITON:
            keep = self.active.view(-1, 1, 1)
            for i in (0, 1):
                fields[i].copy_(torch.where(keep, fn(fields[i]), fields[i]))
            return
        for i in (0, 1):
            median_filter_triton(fields[i], self.state, self.scratch, k)
            fields[i], self.scratch = self.scratch, fields[i]

    def step(self) -> None:
        src, dst = self.buffers[self.current], self.buffers[1 - self.current]
        tvl1_iterate_triton(src, self.images, dst, self.state, self.partial, self.err,
                            *self.consts, block=self.block)
        self.current = 1 - self.current

    def result(self):
        fields = self.buffers[self.current]
        return fields[0], fields[1], fields[2:]


def make_iterations(u1, u2, p, images, l_t, theta, taut, scaled_eps, impl: str = "auto"):
    """The inner loop's driver for one warp: ``TritonIterations`` on CUDA (``impl="auto"``),
    ``EagerIterations`` elsewhere."""
    resolved = resolve_impl(impl, u1)
    if resolved is Impl.EAGER:
        return EagerIterations(u1, u2, p, images, l_t, theta, taut, scaled_eps)
    return TritonIterations(u1, u2, p, images, l_t, theta, taut, scaled_eps, resolved)

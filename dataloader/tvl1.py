"""Dual TV-L1 optical flow, the whole algorithm in torch (pyramid, warps, median, stopping), batched
over pairs: (P, H, W) grey pairs → (P, H, W, 2); its inner primal-dual iteration is ``kernels/tvl1.py``.

The algorithm is the one OpenCV's ``optflow::DualTVL1OpticalFlow`` implements (Zach, Pock and
Bischof 2007 with Wedel et al.'s improvements, as described by Sánchez Pérez, Meinhardt-Llopis
and Facciolo, "TV-L1 Optical Flow Estimation", IPOL 2013), with OpenCV's parameter names,
defaults and, where the description leaves a choice, OpenCV's:

- grey levels as floats 0–255; a pyramid of ``nscales`` levels, each the previous one resized
  by ``scaleStep`` with bilinear interpolation (half-pixel centres, size rounded), stopping
  early at a level narrower or shorter than 16 pixels; no smoothing before resizing;
- per level, from the coarsest: the gradient of I1 by centred differences (one-sided, halved,
  at the borders); ``warps`` times: I1 and its gradient warped by the current flow with
  bicubic interpolation (Keys, a = −0.75, at the exact sample positions as OpenCV 5.1's remap;
  taps outside the image read 0), the data term linearised around the current flow, the dual
  variables kept from the previous warp (zeroed per level); then up to ``outerIterations``
  rounds of [``medianFiltering``×``medianFiltering`` median of the flow (replicated border),
  up to ``innnerIterations`` primal-dual iterations (``ccs_fast.kernels.tvl1``)];
  a pair stops its warp as soon as Σ|u' − u|² ≤ ``epsilon``² · H · W after an iteration;
- the flow resized bilinearly to the next finer level and divided by ``scaleStep``.

Each pair follows its own stopping rule (converged pairs are frozen while the others go on),
so a batch gives every pair the flow it would get alone. Deterministic: no atomics, fixed
reduction order; the same input gives bit-identical output on the same device and impl.
``gamma`` (OpenCV's illumination term) is not implemented: only its default 0 is accepted.

Agreement with OpenCV 5.1 and speed: see ``bench/bench_flow.py`` and README "Flow extraction".
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ccs_fast.base.errors import CCSError
from ccs_fast.kernels.tvl1 import make_iterations

TVL1_PARAMS = ("tau", "lambda_", "theta", "nscales", "warps", "epsilon", "innnerIterations",
               "outerIterations", "scaleStep", "gamma", "medianFiltering")
MIN_SIDE = 16  # OpenCV's pyramid stops at a level under 16 px; the finest level must reach it


def check_pairs(frames0: torch.Tensor, frames1: torch.Tensor) -> None:
    """Raise ``CCSError`` (one line) for pairs TV-L1 can't take: other shapes, not (P, H, W),
    a side under ``MIN_SIDE``, non-finite values."""
    if frames0.shape != frames1.shape:
        raise CCSError(f"TV-L1: the frames of a pair differ in size: {tuple(frames0.shape)} and "
                       f"{tuple(frames1.shape)}")
    if frames0.dim() != 3:
        raise CCSError(f"TV-L1: expected (pairs, H, W) grey frames, got shape {tuple(frames0.shape)}")
    H, W = frames0.shape[1:]
    if H < MIN_SIDE or W < MIN_SIDE:
        raise CCSError(f"TV-L1: frames of {W}x{H} are too small for the pyramid (each side needs "
                       f"at least {MIN_SIDE} pixels)")
    if frames0.is_floating_point():
        for t in (frames0, frames1):
            if not bool(torch.isfinite(t).all()):
                raise CCSError("TV-L1: the frames hold NaN or infinite values")


def _resize_axis(t: torch.Tensor, size: int, scale: float, dim: int) -> torch.Tensor:
    """Bilinear resize of one axis the way cv2.resize (INTER_LINEAR) does it: source position
    (i + 0.5)·scale − 0.5, clamped to the image."""
    n = t.shape[dim]
    pos = (torch.arange(size, dtype=torch.float64, device=t.device) + 0.5) * scale - 0.5
    pos = pos.to(torch.float32)
    i0 = torch.floor(pos)
    frac = pos - i0
    i0 = i0.long()
    frac = torch.where(i0 < 0, torch.zeros_like(frac), frac)
    frac = torch.where(i0 >= n - 1, torch.zeros_like(frac), frac)
    i0 = i0.clamp(0, n - 1)
    i1 = (i0 + 1).clamp(max=n - 1)
    shape = [1] * t.dim()
    shape[dim] = size
    frac = frac.view(shape)
    a, b = t.index_select(dim, i0), t.index_select(dim, i1)
    return a * (1 - frac) + b * frac


def resize_linear(t: torch.Tensor, size: tuple[int, int], scale: tuple[float, float] | None = None):
    """(P, H, W) → (P, h, w) bilinear like cv2.resize; ``scale`` (sy, sx) = source pixels per
    output pixel (default H/h, W/w)."""
    h, w = size
    H, W = t.shape[-2:]
    sy, sx = scale or (H / h, W / w)
    return _resize_axis(_resize_axis(t, w, sx, t.dim() - 1), h, sy, t.dim() - 2)


def centered_gradient(img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Centred differences halved; at the borders the one-sided difference, halved (a
    replicated border)."""
    pad = F.pad(img.unsqueeze(1), (1, 1, 1, 1), mode="replicate").squeeze(1)
    dx = 0.5 * (pad[:, 1:-1, 2:] - pad[:, 1:-1, :-2])
    dy = 0.5 * (pad[:, 2:, 1:-1] - pad[:, :-2, 1:-1])
    return dx, dy


def remap_cubic(images: torch.Tensor, u1: torch.Tensor, u2: torch.Tensor) -> torch.Tensor:
    """images (P, C, H, W) sampled at (x + u1, y + u2) like cv2.remap(INTER_CUBIC,
    BORDER_CONSTANT 0) in OpenCV 5.1: Keys' cubic with a = −0.75 at the exact positions, taps
    outside the image reading 0 (``grid_sample``'s bicubic with zero padding; the positions'
    normalisation to [−1, 1] and back costs ~1e-2 grey level against cv2.remap)."""
    P, C, H, W = images.shape
    xs = torch.arange(W, device=u1.device, dtype=torch.float32).view(1, 1, W)
    ys = torch.arange(H, device=u1.device, dtype=torch.float32).view(1, H, 1)
    gx = (xs + u1) * (2.0 / (W - 1)) - 1.0
    gy = (ys + u2) * (2.0 / (H - 1)) - 1.0
    return F.grid_sample(images, torch.stack((gx, gy), dim=-1), mode="bicubic",
                         padding_mode="zeros", align_corners=True)


def _batcher_pairs(n: int) -> list[tuple[int, int]]:
    """Comparators (low wire, high wire) of Batcher's odd-even merge sort of n = 2^m wires."""
    pairs, p = [], 1
    while p < n:
        k = p
        while k >= 1:
            for j in range(k % p, n - k, 2 * k):
                for i in range(min(k, n - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p):
                        pairs.append((i + j, i + j + k))
            k //= 2
        p *= 2
    return pairs


@functools.lru_cache(maxsize=None)
def _median_network(count: int):
    """A selection network for the median of ``count`` (odd) values: Batcher's sort of the
    next power of two, the extra wires fixed at −∞ / +∞ (half each), pruned backwards to the
    comparators the median wire depends on. Returns (wires, −∞ wires, median wire, [(i, j,
    min needed, max needed)]); for 25 values it is 204 min/max operations."""
    n = 1 << (count - 1).bit_length()
    low = (n - count) // 2
    target = count // 2 + low
    need, plan = {target}, []
    for i, j in reversed(_batcher_pairs(n)):
        if i in need or j in need:
            plan.append((i, j, i in need, j in need))
            need |= {i, j}
    return n, low, target, plan[::-1]


_NEG_INF, _POS_INF = "-inf", "+inf"  # wires holding a constant: comparators on them cost nothing


def median_filter(u: torch.Tensor, k: int) -> torch.Tensor:
    """k×k median of (P, H, W) with a replicated border (cv2.medianBlur on float), exact:
    elementwise min/max over the k² shifted views along a selection network (``_median_network``),
    ~4× faster on a CPU than sorting the unfolded windows."""
    r = k // 2
    H, W = u.shape[-2:]
    pad = F.pad(u.unsqueeze(1), (r, r, r, r), mode="replicate").squeeze(1)
    n, low, target, plan = _median_network(k * k)
    wires = [_NEG_INF] * low + [pad[:, i:i + H, j:j + W] for i in range(k) for j in range(k)]
    wires += [_POS_INF] * (n - len(wires))
    for i, j, want_min, want_max in plan:
        a, b = wires[i], wires[j]
        if a is _NEG_INF or b is _POS_INF:
            continue  # already in order
        if a is _POS_INF or b is _NEG_INF:
            wires[i], wires[j] = b, a
            continue
        if want_min:
            wires[i] = torch.minimum(a, b)
        if want_max:
            wires[j] = torch.maximum(a, b)
    return wires[target].contiguous()


def pyramid_sizes(H: int, W: int, nscales: int, scale_step: float) -> list[tuple[int, int]]:
    """Level sizes, finest first: each level rounds the previous one times ``scale_step``;
    a level with a side under 16 ends the pyramid (it is not used)."""
    sizes = [(H, W)]
    for _ in range(1, nscales):
        h, w = sizes[-1]
        h, w = _cv_round(h * scale_step), _cv_round(w * scale_step)
        if h < MIN_SIDE or w < MIN_SIDE:
            break
        sizes.append((h, w))
    return sizes


def _cv_round(v: float) -> int:
    """cvRound: nearest, ties to even."""
    return int(round(v))


class TVL1Params:
    """OpenCV's DualTVL1OpticalFlow parameters (checked)."""

    def __init__(self, tau, lambda_, theta, nscales, warps, epsilon, innnerIterations,
                 outerIterations, scaleStep, gamma, medianFiltering):
        if gamma != 0:
            raise CCSError("TV-L1 (torch): gamma (the illumination term) is not implemented; use 0")
        if not 0 < scaleStep < 1:
            raise CCSError(f"TV-L1: scaleStep must be in (0, 1), got {scaleStep}")
        if nscales < 1 or warps < 1 or innnerIterations < 1 or outerIterations < 1:
            raise CCSError("TV-L1: nscales, warps and the iteration counts must be ≥ 1")
        if medianFiltering > 1 and medianFiltering % 2 == 0:
            raise CCSError(f"TV-L1: medianFiltering must be odd, got {medianFiltering}")
        self.tau, self.lambda_, self.theta = float(tau), float(lambda_), float(theta)
        self.nscales, self.warps = int(nscales), int(warps)
        self.epsilon, self.scale_step = float(epsilon), float(scaleStep)
        self.inner, self.outer = int(innnerIterations), int(outerIterations)
        self.median = int(medianFiltering)


def _f32(v: float) -> float:
    """A double rounded to float32, as OpenCV's static_cast<float>."""
    return float(torch.tensor(v, dtype=torch.float32))


def _one_scale(I0, I1, u1, u2, prm: TVL1Params, impl: str, sync_every: int):
    P, H, W = I0.shape
    l_t = _f32(prm.lambda_ * prm.theta)
    taut = _f32(prm.tau / prm.theta)
    theta = _f32(prm.theta)
    scaled_eps = _f32(prm.epsilon * prm.epsilon * H * W)
    I1x, I1y = centered_gradient(I1)
    p = [torch.zeros_like(I0) for _ in range(4)]
    stack = torch.stack((I1, I1x, I1y), dim=1)
    for _ in range(prm.warps):
        I1w, wx, wy = remap_cubic(stack, u1, u2).unbind(1)
        wx, wy = wx.contiguous(), wy.contiguous()
        grad = wx * wx + wy * wy
        rho_c = I1w - wx * u1 - wy * u2 - I0
        loop = make_iterations(u1, u2, p, (wx, wy, grad, rho_c), l_t, theta, taut, scaled_eps,
                               impl=impl)
        steps = 0
        for _outer in range(prm.outer):
            if not loop.any_active():
                break
            if prm.median > 1:
                loop.median_(lambda u: median_filter(u, prm.median), prm.median)
            for _inner in range(prm.inner):
                if steps % sync_every == 0 and steps and not loop.any_active():
                    break
                loop.step()
                steps += 1
        u1, u2, p = loop.result()
    return u1, u2


def tvl1_flow(frames0: torch.Tensor, frames1: torch.Tensor, *, impl: str = "auto",
              sync_every: int | None = None, **params) -> torch.Tensor:
    """Dual TV-L1 flow of P pairs: (P, H, W) grey frames (uint8, or floats on the 0–255
    scale) → (P, H, W, 2) float32, ``[..., 0]`` rightward and ``[..., 1]`` downward pixels
    from ``frames0`` to ``frames1``, on the frames' device. ``params``: OpenCV's names (all
    required here; ``make_flow_estimator`` fills OpenCV's defaults). ``impl``: the inner
    iteration's (``"auto"``: the Triton kernel on CUDA). ``sync_every``: iterations between
    checks whether every pair has converged (a host sync on CUDA; default 1 on CPU, 10 on
    CUDA); it changes no result."""
    missing = set(TVL1_PARAMS) - set(params)
    unknown = set(params) - set(TVL1_PARAMS)
    if missing or unknown:
        raise ValueError(f"TV-L1 parameters: missing {sorted(missing)}, unknown {sorted(unknown)}")
    prm = TVL1Params(**params)
    check_pairs(frames0, frames1)
    I0 = frames0.to(torch.float32).contiguous()
    I1 = frames1.to(torch.float32).contiguous()
    sync_every = sync_every or (10 if I0.is_cuda else 1)
    P, H, W = I0.shape
    if P == 0:
        return torch.zeros((0, H, W, 2), device=I0.device, dtype=torch.float32)
    sizes = pyramid_sizes(H, W, prm.nscales, prm.scale_step)
    I0s, I1s = [I0], [I1]
    for h, w in sizes[1:]:
        step = 1.0 / prm.scale_step
        I0s.append(resize_linear(I0s[-1], (h, w), (step, step)))
        I1s.append(resize_linear(I1s[-1], (h, w), (step, step)))
    h, w = sizes[-1]
    u1 = torch.zeros((P, h, w), device=I0.device, dtype=torch.float32)
    u2 = torch.zeros_like(u1)
    inv = _f32(1.0 / prm.scale_step)
    for s in range(len(sizes) - 1, -1, -1):
        u1, u2 = _one_scale(I0s[s], I1s[s], u1, u2, prm, impl, sync_every)
        if s == 0:
            break
        u1 = resize_linear(u1, sizes[s - 1]) * inv
        u2 = resize_linear(u2, sizes[s - 1]) * inv
    return torch.stack((u1, u2), dim=-1)


__all__ = ["tvl1_flow", "check_pairs", "TVL1_PARAMS", "MIN_SIDE", "pyramid_sizes",
           "resize_linear", "remap_cubic", "median_filter", "centered_gradient"]

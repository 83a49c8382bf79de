"""tvl1-torch: agreement with OpenCV's DualTVL1OpticalFlow (and the ground truth), batching,
determinism, the fused Triton iteration against the eager one, bad input.

Small frames (48×64 and less) keep the file at a few seconds; bench/bench_flow.py measures the
same quantities at 340×256.
"""
import pickle

import numpy as np
import pytest
import torch

from bench.bench_flow import (epe, opencv_flow, opencv_tvl1_missing, synth_pairs, synthetic_pairs, torch_flow,
                              within_levels)
from ccs_fast.dataloader.flow import _TVL1_DEFAULTS, make_flow_estimator
from ccs_fast.dataloader.tvl1 import pyramid_sizes, tvl1_flow
from ccs_fast.base.errors import CCSError
from ccs_fast.kernels.tvl1 import tvl1_step_ref, tvl1_step_triton

H, W = 48, 64
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
DEV = "cuda" if torch.cuda.is_available() else "cpu"  # the Triton cases: the interpreter on CPU
# OpenCV's TV-L1 (cv2.optflow) comes with opencv-contrib, which the bare GPU image lacks
requires_opencv_tvl1 = pytest.mark.skipif(opencv_tvl1_missing() is not None, reason=str(opencv_tvl1_missing()))


@pytest.fixture(scope="module")
def flows():
    """Ground-truth pairs and synth frames: (cases, ours, OpenCV's), ours in one batch each size."""
    cases = [(n, a, b, g) for n, a, b, g in synthetic_pairs(H, W)]
    cases += [(n, a, b, None) for n, a, b in synth_pairs(H, videos=1)]
    ours = torch_flow([(c[1], c[2]) for c in cases])
    theirs = opencv_flow([(c[1], c[2]) for c in cases])
    return cases, ours, theirs


@requires_opencv_tvl1
def test_epe_against_ground_truth_within_1_1x_opencv(flows):
    cases, ours, theirs = flows
    ratios = {name: epe(o, gt) / epe(t, gt) for (name, _, _, gt), o, t in zip(cases, ours, theirs)
              if gt is not None}
    assert len(ratios) == 6
    assert all(r <= 1.1 for r in ratios.values()), ratios
    # and the flow is right: well under a pixel from the truth on every pair
    assert all(epe(o, gt) < 0.3 for (_, _, _, gt), o in zip(cases, ours) if gt is not None)


@requires_opencv_tvl1
def test_95_percent_within_2_uint8_levels_of_opencv(flows):
    cases, ours, theirs = flows
    shares = {name: within_levels(o, t) for (name, *_), o, t in zip(cases, ours, theirs)}
    assert all(s >= 0.95 for s in shares.values()), shares
    assert np.mean(list(shares.values())) >= 0.99


def test_batch_gives_each_pair_its_own_flow_bit_identically():
    pairs = synthetic_pairs(24, 28)[:3]
    a = torch.from_numpy(np.stack([p[1] for p in pairs]))
    b = torch.from_numpy(np.stack([p[2] for p in pairs]))
    params = {**_TVL1_DEFAULTS, "nscales": 2, "warps": 2, "outerIterations": 3,
              "innnerIterations": 10, "epsilon": 0.05}
    together = tvl1_flow(a, b, **params)
    never_stop = tvl1_flow(a, b, **{**params, "epsilon": 0.0})
    assert not torch.equal(together, never_stop)  # some pair stopped early
    again = tvl1_flow(a, b, **params)
    assert torch.equal(together, again)  # deterministic
    for i in range(3):  # each pair stops on its own: the batch changes nothing
        alone = tvl1_flow(a[i:i + 1], b[i:i + 1], **params)
        assert torch.equal(alone[0], together[i])
    assert together.shape == (3, 24, 28, 2) and together.dtype == torch.float32
    assert tvl1_flow(a[:0], b[:0], **params).shape == (0, 24, 28, 2)


def test_estimator_callable_pickles_and_matches_batch():
    est = make_flow_estimator("tvl1-torch", device="cpu", nscales=3, warps=2)
    clone = pickle.loads(pickle.dumps(est))
    _, a, b, _ = synthetic_pairs(24, 32)[0]
    flow = clone(a, b)
    assert flow.shape == (24, 32, 2) and flow.dtype == np.float32
    assert np.array_equal(flow, est.batch(a[None], b[None])[0].numpy())
    assert clone.params["nscales"] == 3 and clone.params["innnerIterations"] == 30


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without CUDA")
def test_cuda_device_without_a_gpu_is_one_clear_line():
    with pytest.raises(CCSError, match="no CUDA device"):
        make_flow_estimator("tvl1-torch", device="cuda")


def test_bad_input_is_one_clear_line():
    est = make_flow_estimator("tvl1-torch", device="cpu")
    u8 = np.zeros((32, 32), np.uint8)
    cases = [
        ((torch.zeros(1, 32, 32), torch.zeros(1, 32, 40)), "differ in size"),
        ((torch.zeros(1, 12, 64), torch.zeros(1, 12, 64)), "too small for the pyramid"),
        ((torch.full((1, 32, 32), float("nan")), torch.zeros(1, 32, 32)), "NaN"),
    ]
    for (a, b), words in cases:
        with pytest.raises(CCSError, match=words) as info:
            est.batch(a, b)
        assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="one HxW shape"):
        est(u8, np.zeros((32, 40), np.uint8))
    with pytest.raises(CCSError, match="gamma"):
        make_flow_estimator("tvl1-torch", gamma=0.1).batch(torch.zeros(1, 32, 32), torch.zeros(1, 32, 32))


@requires_opencv_tvl1
def test_constant_frames_give_zero_flow_like_opencv():
    a = np.full((32, 32), 90, np.uint8)
    b = np.full((32, 32), 140, np.uint8)
    ours = make_flow_estimator("tvl1-torch", device="cpu")(a, b)
    assert np.array_equal(ours, np.zeros((32, 32, 2), np.float32))
    assert np.abs(opencv_flow([(a, b)])[0]).max() == 0


def test_pyramid_sizes_follow_opencv():
    assert pyramid_sizes(256, 340, 5, 0.8) == [(256, 340), (205, 272), (164, 218), (131, 174), (105, 139)]
    assert pyramid_sizes(24, 32, 5, 0.8) == [(24, 32), (19, 26)]  # 15 rows would be under 16


def _step_inputs(P, H, W, seed=0):
    g = torch.Generator().manual_seed(seed)
    fields = [torch.randn(P, H, W, generator=g).to(DEV) for _ in range(6)]
    wx, wy = torch.randn(P, H, W, generator=g) * 10, torch.randn(P, H, W, generator=g) * 10
    wx[0, 3, 4] = wy[0, 3, 4] = 0.0  # a flat pixel: |∇I1w|² = 0
    grad = wx * wx + wy * wy
    rho_c = torch.randn(P, H, W, generator=g) * 30
    return fields, wx.to(DEV), wy.to(DEV), grad.to(DEV), rho_c.to(DEV)


@pytest.mark.parametrize("shape,block", [((3, 17, 23), 64), ((1, 16, 16), 256), ((2, 5, 41), 32)])
def test_triton_step_matches_the_eager_iteration(shape, block):
    fields, wx, wy, grad, rho_c = _step_inputs(*shape)
    active = torch.tensor([True, False, True][:shape[0]], device=DEV)
    ref = tvl1_step_ref(*fields, wx, wy, grad, rho_c, active, 0.045, 0.3, 0.25 / 0.3)
    out = tuple(torch.full_like(fields[0], float("nan")) for _ in range(6))  # every element written
    got = tvl1_step_triton(*fields, wx, wy, grad, rho_c, active, 0.045, 0.3, 0.25 / 0.3,
                           out=out, block=block)
    for r, t in zip(ref[:6], got[:6]):
        torch.testing.assert_close(t, r, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[6], ref[6], rtol=1e-5, atol=1e-3)
    if shape[0] > 1:  # an inactive pair is copied through unchanged
        assert all(torch.equal(t[1], f[1]) for t, f in zip(got[:6], fields))


def test_flow_with_the_triton_iteration_matches_eager():
    """Whole flows, Triton iteration vs eager, with pairs that stop at different iterations: a
    constant pair converges at once (copied once, then skipped), the others go on."""
    moving = [synthetic_pairs(16, 20)[i][1:3] for i in (0, 2)]
    flat = (np.full((16, 20), 70, np.uint8), np.full((16, 20), 70, np.uint8))
    a = torch.from_numpy(np.stack([moving[0][0], flat[0], moving[1][0]])).to(DEV)
    b = torch.from_numpy(np.stack([moving[0][1], flat[1], moving[1][1]])).to(DEV)
    params = {**_TVL1_DEFAULTS, "nscales": 1, "warps": 2, "outerIterations": 2, "innnerIterations": 3}
    eager = tvl1_flow(a, b, impl="eager", **params)
    fused = tvl1_flow(a, b, impl="triton", **params)
    torch.testing.assert_close(fused, eager, atol=1e-4, rtol=1e-4)
    assert fused[1].abs().max() == 0 and fused[0].abs().max() > 0.1


@requires_cuda
@requires_opencv_tvl1
def test_cuda_triton_and_eager_agree_with_opencv():
    cases = synthetic_pairs(64, 96)
    a = torch.from_numpy(np.stack([c[1] for c in cases])).cuda()
    b = torch.from_numpy(np.stack([c[2] for c in cases])).cuda()
    fused = tvl1_flow(a, b, impl="triton", **_TVL1_DEFAULTS).cpu().numpy()
    eager = tvl1_flow(a, b, impl="eager", **_TVL1_DEFAULTS).cpu().numpy()
    assert torch.equal(torch.from_numpy(fused), torch.from_numpy(
        tvl1_flow(a, b, impl="triton", **_TVL1_DEFAULTS).cpu().numpy()))  # deterministic
    theirs = opencv_flow([(c[1], c[2]) for c in cases])
    for (name, _, _, gt), f, e, t in zip(cases, fused, eager, theirs):
        assert within_levels(f, t) >= 0.95 and within_levels(e, t) >= 0.95, name
        assert epe(f, gt) <= 1.1 * epe(t, gt), name


def test_triton_median_matches_the_selection_network():
    from ccs_fast.dataloader.tvl1 import median_filter
    from ccs_fast.kernels.tvl1 import median_filter_triton

    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 9, 11, generator=g).to(DEV)  # small: the interpreter sorts slowly
    x[0, 2:6, 3:8] = 1.5  # ties
    state = torch.tensor([0, 1], dtype=torch.int32, device=DEV)  # the second pair is copied
    out = torch.full_like(x, float("nan"))
    median_filter_triton(x, state, out, 5, block=64)  # two blocks per pair
    assert torch.equal(out[0], median_filter(x[:1], 5)[0])
    assert torch.equal(out[1], x[1])

"""amp_step: one step, clipping after unscaling, gradients freed; autocast and scaler choice."""
import copy

import pytest
import torch

from ccs_fast.amp import amp_step, autocast_context, training_precision


def _model_and_batch(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    x = torch.randn(11, 7)
    y = torch.randint(0, 3, (11,))
    return model, x, y


class CountingSGD(torch.optim.SGD):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.steps = 0

    def step(self, closure=None):
        self.steps += 1
        return super().step(closure)


def _reference_step(model, x, y, lr, clip):
    """Plain fp32 SGD with clipping on the true gradients."""
    ref = copy.deepcopy(model)
    loss = torch.nn.functional.cross_entropy(ref(x), y)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), clip)
    with torch.no_grad():
        for p in ref.parameters():
            p -= lr * p.grad
    return ref, norm


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_amp_step_one_step_clip_and_zero(precision):
    model, x, y = _model_and_batch()
    ref, ref_norm = _reference_step(model, x, y, lr=0.1, clip=0.05)
    opt = CountingSGD(model.parameters(), lr=0.1)
    assert training_precision(precision, "cpu").scaler is None
    with autocast_context(precision, "cpu"):
        loss = torch.nn.functional.cross_entropy(model(x).float(), y)
    norm = amp_step(loss, opt, None, clip_grad=0.05)
    assert opt.steps == 1
    assert all(p.grad is None for p in model.parameters())
    assert isinstance(norm, torch.Tensor) and norm.ndim == 0
    if precision == "fp32":
        torch.testing.assert_close(norm, ref_norm)
        for p, q in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(p, q)
    else:
        torch.testing.assert_close(norm, ref_norm, rtol=0.05, atol=1e-3)
        for p, q in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, rtol=0.02, atol=2e-3)


def test_amp_step_fp16_scaler_clips_after_unscale():
    try:
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**30)
    except (RuntimeError, TypeError, AssertionError) as exc:
        pytest.skip(f"no CPU GradScaler in this torch: {exc}")
    model, x, y = _model_and_batch()
    ref, ref_norm = _reference_step(model, x, y, lr=0.1, clip=0.05)
    opt = CountingSGD(model.parameters(), lr=0.1)
    # fp32 forward so the only difference from the reference is the loss scale: if clipping
    # saw the scaled gradients (norm ~2^30 x), the update would differ completely.
    loss = torch.nn.functional.cross_entropy(model(x), y)
    norm = amp_step(loss, opt, scaler, clip_grad=0.05)
    assert opt.steps == 1
    assert all(p.grad is None for p in model.parameters())
    torch.testing.assert_close(norm, ref_norm)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q)
    assert scaler.get_scale() == 2.0**30  # finite step: scale kept until growth_interval


def test_amp_step_fp16_skips_step_on_inf():
    try:
        scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    except (RuntimeError, TypeError, AssertionError) as exc:
        pytest.skip(f"no CPU GradScaler in this torch: {exc}")
    model, x, y = _model_and_batch()
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = model(x).sum() * float("inf")
    norm = amp_step(loss, opt, scaler, clip_grad=1.0)
    assert not torch.isfinite(norm)
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)
    assert scaler.get_scale() == 2.0  # backed off
    assert all(p.grad is None for p in model.parameters())


def test_amp_step_without_clip_returns_norm_and_accepts_parameters():
    model, x, y = _model_and_batch()
    opt = CountingSGD(model.parameters(), lr=0.0)
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward(retain_graph=True)
    expected = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in model.parameters()]))
    opt.zero_grad(set_to_none=True)
    norm = amp_step(loss, opt, None, clip_grad=None, parameters=model.parameters())
    torch.testing.assert_close(norm, expected)
    assert opt.steps == 1


def test_autocast_context_dtypes():
    x = torch.randn(4, 4)
    with autocast_context("bf16", "cpu"):
        assert (x @ x).dtype == torch.bfloat16
    with autocast_context("fp32", "cpu"):
        assert (x @ x).dtype == torch.float32
    with pytest.raises(ValueError):
        autocast_context("fp8", "cpu")
    scaler = training_precision("fp16", "cpu").scaler
    assert scaler is not None and scaler.is_enabled()


def test_training_precision_is_checked_once_not_per_step(monkeypatch):
    """A training run checks its precision against the device when it starts; the autocast
    context of each step checks nothing."""
    from ccs_fast import amp

    checks = []
    real = amp.check_precision
    monkeypatch.setattr(amp, "check_precision", lambda *args: checks.append(args) or real(*args))
    precision = amp.training_precision("bf16", "cpu")
    x = torch.randn(4, 4)
    for _ in range(3):
        with precision.autocast():
            assert (x @ x).dtype == torch.bfloat16
    assert checks == [("bf16", "cpu")] and precision.scaler is None
    with amp.training_precision("fp32", "cpu").autocast():
        assert (x @ x).dtype == torch.float32
    assert amp.training_precision("fp16", "cpu").scaler.is_enabled()

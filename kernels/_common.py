"""Pieces every kernel module shares: the Triton import, dtype checks, the interpreter's
bf16 workaround, dot precision, launching (with a hook for the static cost report) and the
autograd Function of the losses, whose gradient is computed in the forward.

``triton`` and ``tl`` are None when Triton is not installed; the kernel modules then define
no kernels and their dispatchers offer only the eager references.
"""
from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch

from ccs_fast.kernels._dispatch import interpreting, triton_available

if triton_available():
    import triton
    import triton.language as tl
else:  # the package must import without Triton; the dispatchers then only offer "eager"
    triton = None
    tl = None

HALF_DTYPES = (torch.float16, torch.bfloat16)
TRITON_DTYPES = (torch.float32, *HALF_DTYPES)


def check_dtype(op: str, *tensors: torch.Tensor) -> None:
    """The Triton path takes fp32, fp16 and bf16 floating inputs."""
    for t in tensors:
        if t.dtype not in TRITON_DTYPES:
            raise TypeError(f"{op}: the Triton kernels take float32, float16 or bfloat16, got {t.dtype}")


def dot_fp32(dtype: torch.dtype) -> bool:
    """Widen bf16 dot operands to fp32 first: only under the interpreter, whose bf16 ``tl.dot``
    (numpy has no bf16) returns wrong values; on a GPU bf16 tiles go to the tensor cores."""
    return dtype == torch.bfloat16 and interpreting() and _recorder is None


def dot_precision(dtype: torch.dtype) -> str:
    """``"ieee"`` for fp32 unless torch allows TF32 matmuls on CUDA; half inputs use tensor cores."""
    if dtype == torch.float32 and not (torch.cuda.is_available() and torch.backends.cuda.matmul.allow_tf32):
        return "ieee"
    if dot_fp32(dtype):
        return "ieee"
    return "tf32"


def use_autotune(t: torch.Tensor) -> bool:
    """Autotuned configs on a GPU (and while launches are recorded); fixed small blocks under
    the interpreter."""
    return (t.is_cuda and not interpreting()) or _recorder is not None


def deterministic(flag: bool | None) -> bool:
    """An op's ``deterministic`` argument; None follows ``torch.use_deterministic_algorithms``."""
    return torch.are_deterministic_algorithms_enabled() if flag is None else bool(flag)


if triton is not None:

    @triton.jit
    def dot(a, b, DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr):
        """``tl.dot`` with fp32 accumulation; DOT_FP32 widens the operands first (``dot_fp32``)."""
        if DOT_FP32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        return tl.dot(a, b, input_precision=DOT_PRECISION)


# ----------------------------------------------------------------------------- launching

_recorder = None


class Launch(NamedTuple):
    name: str  # the @triton.jit function's name
    kernel: object  # what was launched: a JITFunction or an Autotuner
    grid: tuple
    args: tuple  # positional arguments as passed
    meta: dict  # keyword arguments, with the assumed config's blocks, num_warps and num_stages


@contextlib.contextmanager
def record_launches(configs: dict | None = None):
    """Within this block kernels are not launched but recorded, as on a GPU: autotuned
    kernels take the config that ``configs`` names for them (kernel name → triton.Config),
    and the launchers choose their GPU paths. Yields the list of ``Launch``es. ``bench.aot``
    compiles exactly these launches and ``bench.static`` counts their work, on meta tensors."""
    global _recorder
    launches: list = []
    _recorder = (launches, configs or {})
    try:
        yield launches
    finally:
        _recorder = None


def jit_function(kernel):
    """The @triton.jit function behind a kernel object (an Autotuner wraps one)."""
    fn = kernel
    while not hasattr(fn, "arg_names") or hasattr(fn, "configs"):
        fn = fn.fn
    return fn


def launch(kernel, grid, *args, **meta):
    """``kernel[grid](*args, **meta)``; ``grid`` may be a tuple or a function of the meta."""
    if _recorder is None:
        return kernel[grid](*args, **meta)
    launches, configs = _recorder
    name = jit_function(kernel).__name__
    full = dict(meta)
    cfg = configs.get(name)
    if cfg is not None:
        full.update(cfg.kwargs)
        full["num_warps"], full["num_stages"] = cfg.num_warps, cfg.num_stages
    g = grid(full) if callable(grid) else grid
    launches.append(Launch(name, kernel, tuple(int(x) for x in g), args, full))
    return None


def kernel_configs(kernel) -> list:
    """The configs an autotuned kernel may choose from (before pruning); [] for a plain kernel."""
    return list(getattr(kernel, "configs", []))


# ----------------------------------------------------------------------------- autograd


class PendingGrad(NamedTuple):
    """A loss input's gradient as the forward leaves it: ∂L/∂ẑ (fp32) and the row factors r."""
    z: torch.Tensor
    r: torch.Tensor
    g: torch.Tensor
    normalize: bool


class GradInForward(torch.autograd.Function):
    """Autograd for the losses: ``forward(ctx, fn, *inputs)`` runs ``fn(needs_grad) -> (loss,
    pending)``, one ``PendingGrad`` or None per input, computed in the forward; ``backward``
    finishes each with one kernel (normalisation backward, × grad_output, cast to the input's
    dtype: ``normalize.finish_grad``)."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, fn, *inputs):
        loss, pending = fn(ctx.needs_input_grad[1:])
        ctx.flags = [None if p is None else p.normalize for p in pending]
        ctx.dtypes = [getattr(t, "dtype", None) for t in inputs]
        ctx.save_for_backward(*[t for p in pending if p is not None for t in (p.z, p.r, p.g)])
        return loss

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_out):
        from ccs_fast.kernels.normalize import finish_grad

        saved = iter(ctx.saved_tensors)
        out = [None]
        for normalize, dtype in zip(ctx.flags, ctx.dtypes):
            if normalize is None:
                out.append(None)
                continue
            z, r, g = next(saved), next(saved), next(saved)
            out.append(finish_grad(z, r, g, grad_out.float(), normalize).to(dtype))
        return tuple(out)

"""Pieces every kernel module shares: the Triton import, dtype checks, block sizes, what an
``Impl`` means for blocks, autotuning and dot precision, launching (or recording launches for
the static reports) and the helpers of the registered ops (``ccs_fast::*``, see each op's
module).

``triton`` and ``tl`` are None when Triton is not installed; the kernel modules then define
no kernels and their dispatchers offer only the eager references.
"""
from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch

from ccs_fast.kernels._dispatch import Impl, triton_available

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


def block_size(n: int, lo: int = 1, hi: int | None = None) -> int:
    """A block along an axis of ``n`` elements: the smallest power of two ≥ n, at least ``lo``
    and at most ``hi``."""
    size = max(1 << max(n - 1, 0).bit_length(), lo)
    return size if hi is None else min(size, hi)


def autotuned(impl: Impl) -> bool:
    """Autotuned configs and GPU blocks on CUDA; small fixed blocks under the interpreter."""
    return impl is Impl.TRITON


def dot_fp32(dtype: torch.dtype, impl: Impl) -> bool:
    """Widen bf16 dot operands to fp32 first: only under the interpreter, whose bf16 ``tl.dot``
    (numpy has no bf16) returns wrong values; on a GPU bf16 tiles go to the tensor cores."""
    return dtype == torch.bfloat16 and impl is Impl.TRITON_INTERPRETED


def dot_precision(dtype: torch.dtype, impl: Impl) -> str:
    """``"ieee"`` for fp32 unless torch allows TF32 matmuls on CUDA; half inputs use tensor cores."""
    if dtype == torch.float32 and not (torch.cuda.is_available() and torch.backends.cuda.matmul.allow_tf32):
        return "ieee"
    if dot_fp32(dtype, impl):
        return "ieee"
    return "tf32"


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


def jit_function(kernel):
    """The @triton.jit function behind a kernel object (an Autotuner wraps one)."""
    fn = kernel
    while not hasattr(fn, "arg_names") or hasattr(fn, "configs"):
        fn = fn.fn
    return fn


class Launch(NamedTuple):
    name: str  # the @triton.jit function's name
    kernel: object  # what was launched: a JITFunction or an Autotuner
    grid: tuple
    args: tuple  # positional arguments as passed
    meta: dict  # keyword arguments, with the assumed config's blocks, num_warps and num_stages


class Recording:
    """Launches collected instead of run, for ``bench.aot`` (compiles them) and ``bench.static``
    (counts their work), on meta tensors. A launcher given one records its kernels as on a GPU
    (call it with ``Impl.TRITON``); an autotuned kernel takes the config that ``configs``
    names for it (kernel name → triton.Config)."""

    def __init__(self, configs: dict | None = None):
        self.configs = configs or {}
        self.launches: list[Launch] = []

    def add(self, kernel, grid, args, meta):
        name = jit_function(kernel).__name__
        full = dict(meta)
        cfg = self.configs.get(name)
        if cfg is not None:
            full.update(cfg.kwargs)
            full["num_warps"], full["num_stages"] = cfg.num_warps, cfg.num_stages
        g = grid(full) if callable(grid) else grid
        self.launches.append(Launch(name, kernel, tuple(int(x) for x in g), args, full))


def launch(kernel, grid, *args, record: Recording | None = None, **meta):
    """``kernel[grid](*args, **meta)``, or into ``record``; ``grid`` may be a tuple or a
    function of the meta."""
    if record is None:
        return kernel[grid](*args, **meta)
    record.add(kernel, grid, args, meta)
    return None


# ----------------------------------------------------------------------------- registered ops


class PendingGrad(NamedTuple):
    """A loss input's gradient as the forward leaves it: ∂L/∂ẑ (fp32) and the row factors r."""
    z: torch.Tensor
    r: torch.Tensor
    g: torch.Tensor
    normalize: bool


def needs_grad(*tensors: torch.Tensor) -> bool:
    """Whether autograd will ask for a gradient of any of ``tensors`` (the losses then compute
    it in their forward)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def grad_outputs(z: torch.Tensor, pending: PendingGrad | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A loss op's (r, g) outputs for input ``z``: the pending gradient's row factors (B,) and
    ∂L/∂ẑ (B, D), both fp32, or empty (0,) and (0, D) tensors when none was computed."""
    if pending is None:
        return z.new_empty((0,), dtype=torch.float32), z.new_empty((0, z.shape[1]), dtype=torch.float32)
    return pending.r, pending.g


def grad_outputs_fake(z: torch.Tensor, compute_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The shapes ``grad_outputs`` gives, for a loss op's fake implementation."""
    rows = z.shape[0] if compute_grad else 0
    return z.new_empty((rows,), dtype=torch.float32), z.new_empty((rows, z.shape[1]), dtype=torch.float32)


@contextlib.contextmanager
def autograd_inside_op():
    """Record autograd within a registered op's implementation. The dispatcher runs it below
    autograd (the autograd dispatch keys excluded), where ``torch.enable_grad()`` alone records
    nothing; the ops' eager branches take their gradients from the references this way (a
    ``torch.func`` transform would do too, but its wrapped tensors fail opcheck's schema test)."""
    with contextlib.ExitStack() as stack:
        for key in (torch._C.DispatchKey.AutogradFunctionality, torch._C.DispatchKey.ADInplaceOrView):
            stack.enter_context(torch._C._SetExcludeDispatchKeyGuard(key, False))
        stack.enter_context(torch.enable_grad())
        yield

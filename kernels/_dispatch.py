"""Choosing between a Triton kernel and its eager reference: ``resolve_impl``, the one place.

``impl="auto"`` runs Triton when every tensor argument is on CUDA and Triton is importable,
and the eager reference otherwise (CPU, no Triton, or another accelerator). ``"triton"``
forces the kernel: on CPU that works only under ``TRITON_INTERPRET=1`` (how the tests run the
kernels), which must be set before ``ccs_fast.kernels`` is first imported, because
``triton.jit`` reads it when the kernels are defined. fp64 and empty inputs always run the
eager reference (the kernels take fp32, fp16 and bf16 and at least one row).

The answer is an ``Impl``; the launchers take it and derive their blocks, autotuning and dot
precision from it.
"""
import enum
import importlib.util
import os

import torch

IMPLS = ("auto", "triton", "eager")


class Impl(enum.Enum):
    EAGER = "eager"  # the op's torch reference
    TRITON = "triton"  # compiled kernels on CUDA: GPU blocks, autotuned configs, tensor-core dots
    TRITON_INTERPRETED = "triton_interpreted"  # TRITON_INTERPRET=1: small fixed blocks, fp32 dots for bf16


_TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    """Whether Triton is importable (looked up once, at import: ``torch.compile`` traces the
    dispatchers, and a module search inside a traced function would break the graph)."""
    return _TRITON_AVAILABLE


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_impl(impl: str, *tensors: torch.Tensor, fallback: bool = False) -> Impl:
    """The implementation that runs an op call on ``tensors``, or raise if ``impl`` can't run.

    ``fallback`` (the registered ops' rule): where ``"triton"`` cannot run (a CPU without the
    interpreter, no Triton), the eager reference instead of an error.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "eager":
        return Impl.EAGER
    on_cuda = all(t.is_cuda for t in tensors)
    if impl == "auto" and not (on_cuda and triton_available()):
        return Impl.EAGER
    if not triton_available():
        if fallback:
            return Impl.EAGER
        raise RuntimeError("impl='triton' needs the triton package")
    if not on_cuda and not interpreting():
        if fallback:
            return Impl.EAGER
        raise RuntimeError(
            "impl='triton' on CPU tensors needs TRITON_INTERPRET=1 set before importing ccs_fast.kernels"
        )
    if any(t.dtype == torch.float64 or t.numel() == 0 for t in tensors):
        return Impl.EAGER
    return Impl.TRITON_INTERPRETED if interpreting() else Impl.TRITON

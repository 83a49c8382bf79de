"""Choosing between a Triton kernel and its eager reference.

``impl="auto"`` runs Triton when every tensor argument is on CUDA and Triton is importable,
and the eager reference otherwise (CPU, no Triton, or another accelerator). ``"triton"``
forces the kernel: on CPU that works only under ``TRITON_INTERPRET=1`` (how the tests run the
kernels), which must be set before ``ccs_fast.kernels`` is first imported, because
``triton.jit`` reads it when the kernels are defined.
"""
import importlib.util
import os

import torch

IMPLS = ("auto", "triton", "eager")


_TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    """Whether Triton is importable (looked up once, at import: ``torch.compile`` traces the
    dispatchers, and a module search inside a traced function would break the graph)."""
    return _TRITON_AVAILABLE


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_impl(impl: str, *tensors: torch.Tensor) -> str:
    """Return ``"triton"`` or ``"eager"`` for these tensors, or raise if ``impl`` can't run."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    on_cuda = all(t.is_cuda for t in tensors)
    if impl == "eager":
        return "eager"
    if impl == "auto":
        return "triton" if on_cuda and triton_available() else "eager"
    if not triton_available():
        raise RuntimeError("impl='triton' needs the triton package")
    if not on_cuda and not interpreting():
        raise RuntimeError(
            "impl='triton' on CPU tensors needs TRITON_INTERPRET=1 set before importing ccs_fast.kernels"
        )
    return "triton"

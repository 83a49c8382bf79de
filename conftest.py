"""Set-up shared by tests/ and bench/.

Without CUDA the Triton kernels run in the interpreter; ``triton.jit`` reads
TRITON_INTERPRET when a kernel is defined, so it is set here, before any test module
imports ``ccs_fast.kernels``.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    """Mark as ``cuda`` every test that names CUDA (``test_cuda_*``, a ``cuda`` parameter) or
    is skipped without it, so that ``pytest -m cuda`` selects the device cases wherever they
    live (``bench.gpu`` runs them first on a GPU machine)."""
    import pytest

    for item in items:
        skipped_without_cuda = any(
            "cuda" in str(mark.kwargs.get("reason", "")).lower() for mark in item.iter_markers("skipif"))
        if "cuda" in item.name.lower() or skipped_without_cuda:
            item.add_marker(pytest.mark.cuda)

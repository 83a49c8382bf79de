"""Test set-up shared by every test file.

Without CUDA the Triton kernels run in the interpreter; ``triton.jit`` reads
TRITON_INTERPRET when a kernel is defined, so it is set before anything imports
``ccs_fast.kernels``.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

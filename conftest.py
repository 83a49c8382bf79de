"""Set-up shared by tests/ and bench/.

Without CUDA the Triton kernels run in the interpreter; ``triton.jit`` reads
TRITON_INTERPRET when a kernel is defined, so it is set here, before any test module
imports ``ccs_fast.kernels``.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

"""pytest-benchmark view of bench_losses: the CPU smoke shape (or one CUDA shape) of each op.

Without CUDA the Triton kernels run in the interpreter (the repository's conftest.py sets
TRITON_INTERPRET=1).
"""
import pytest
import torch

from bench.common import run_pytest_benchmark
from bench.bench_losses import OPS, make_case

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPE = dict(B=24, D=16) if DEVICE == "cpu" else dict(B=4096, D=512)
DTYPE = torch.float32 if DEVICE == "cpu" else torch.bfloat16


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("provider", ["eager", "triton"])
def test_loss_full(benchmark, op, provider):
    fn = make_case(op, provider, "full", device=DEVICE, dtype=DTYPE, **SHAPE)
    grads = run_pytest_benchmark(benchmark, fn, DEVICE)
    assert all(torch.isfinite(g).all() for g in grads)

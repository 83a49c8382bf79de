"""pytest-benchmark view of bench_cross_attention: the CPU smoke shape (or one CUDA shape).

Without CUDA the Triton kernels run in the interpreter (the repository's conftest.py sets
TRITON_INTERPRET=1).
"""
import pytest
import torch

from bench.common import run_pytest_benchmark
from bench.bench_cross_attention import make_case

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPE = dict(B=2, N_f=20, N_o=20, d=16, e=16) if DEVICE == "cpu" else dict(B=32, N_f=588, N_o=588, d=512, e=512)
DTYPE = torch.float32 if DEVICE == "cpu" else torch.bfloat16


@pytest.mark.parametrize("provider", ["eager", "triton"])
def test_cross_attention_full(benchmark, provider):
    fn = make_case(provider, "full", device=DEVICE, dtype=DTYPE, **SHAPE)
    grads = run_pytest_benchmark(benchmark, fn, DEVICE)
    assert all(torch.isfinite(g).all() for g in grads)

"""The package imports and runs its eager references when the ``triton`` package is absent.

A child interpreter hides Triton (``sys.modules["triton"] = None`` makes ``import triton`` fail
and ``importlib.util.find_spec("triton")`` return None) before anything from ccs_fast is imported,
then checks that every dispatcher picks the eager reference for impl="auto" and refuses
impl="triton".
"""
import os
import subprocess
import sys

SCRIPT = r"""
import sys
sys.modules["triton"] = None
import importlib.util
assert importlib.util.find_spec("triton") is None

import torch
import ccs_fast.kernels as K
import ccs_fast.losses, ccs_fast.connection, ccs_fast.model  # noqa: F401
from ccs_fast.kernels import cross_attention, triplet, center
assert cross_attention.triton is None and triplet.triton is None and center.triton is None

torch.manual_seed(0)
B, D = 8, 16
labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
z_f, z_o = torch.randn(B, D), torch.randn(B, D)
q, k = torch.randn(2, 5, D), torch.randn(2, 7, D)
v_f, v_o = torch.randn(2, 5, 12), torch.randn(2, 7, 12)

cases = [
    (K.cross_stream_attention, K.cross_stream_attention_ref, (q, k, v_f, v_o)),
    (K.cross_modal_triplet_loss, K.cross_modal_triplet_loss_ref, (z_f, z_o, labels)),
    (K.batch_hard_triplet_loss, K.batch_hard_triplet_loss_ref, (z_f, labels)),
    (K.discriminative_embedding_loss, K.discriminative_embedding_loss_ref, (z_f, labels)),
]
for fn, ref, args in cases:
    got, want = fn(*args, impl="auto"), ref(*args)
    got = got if isinstance(got, tuple) else (got,)
    want = want if isinstance(want, tuple) else (want,)
    assert len(got) == len(want), fn.__name__
    for g, w in zip(got, want):
        assert torch.equal(g, w), (fn.__name__, g, w)
    try:
        fn(*args, impl="triton")
    except RuntimeError as error:
        assert "triton" in str(error).lower(), (fn.__name__, str(error))
    else:
        raise AssertionError(f"{fn.__name__}(impl='triton') ran without triton")
print("ok")
"""


def test_package_works_without_triton():
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    child = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300, env=env)
    assert child.returncode == 0, child.stdout + child.stderr
    assert child.stdout.strip().endswith("ok"), child.stdout + child.stderr

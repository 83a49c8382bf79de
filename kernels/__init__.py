"""Fused ops of ccs_fast (installed as ``ccs_fast.kernels``).

Each op has an eager reference (the definition), Triton forward/backward kernels, a registered
PyTorch operator in the ``ccs_fast::`` namespace (``torch.library.custom_op`` with a fake
implementation and registered autograd, so ``torch.compile(fullgraph=True)`` and
``torch.export`` see one opaque node per op) and a dispatcher with
``impl="auto" | "triton" | "eager"`` (auto: the registered op on CUDA, the reference
elsewhere). The operators:

    ccs_fast::cross_stream_attention            (q, k, v_f, v_o, scale) -> (y_f, y_o, lse_row, lse_col)
    ccs_fast::cross_stream_attention_backward   (..., dy_f, dy_o, scale) -> (dq, dk, dv_f, dv_o)
    ccs_fast::cross_modal_triplet_loss          (z_f, z_o, labels, ...) -> (loss, r_f, g_f, r_o, g_o)
    ccs_fast::batch_hard_triplet_loss           (z, labels, ...) -> (loss, r, g)
    ccs_fast::discriminative_embedding_loss     (z, labels, ...) -> (loss, r, g)
    ccs_fast::finish_grad                       (z, r, g, grad_out, normalize) -> dz

Their implementations launch the Triton kernels on CUDA (and on CPU under
``TRITON_INTERPRET=1``) and otherwise run the eager references, with the gradients the
references give by autograd. ``_dispatch.resolve_impl`` is the one place that decides which.
"""
from ccs_fast.kernels.center import discriminative_embedding_loss, discriminative_embedding_loss_ref
from ccs_fast.kernels.cross_attention import cross_stream_attention, cross_stream_attention_ref
from ccs_fast.kernels.triplet import (
    batch_hard_triplet_loss,
    batch_hard_triplet_loss_ref,
    cross_modal_triplet_loss,
    cross_modal_triplet_loss_ref,
)

__all__ = [
    "cross_stream_attention",
    "cross_stream_attention_ref",
    "cross_modal_triplet_loss",
    "cross_modal_triplet_loss_ref",
    "batch_hard_triplet_loss",
    "batch_hard_triplet_loss_ref",
    "discriminative_embedding_loss",
    "discriminative_embedding_loss_ref",
]

"""Fused ops of ccs_fast (installed as ``ccs_fast.kernels``).

Each op has an eager reference (the definition), Triton forward/backward kernels, an autograd
Function and a dispatcher with ``impl="auto" | "triton" | "eager"`` (auto: Triton on CUDA,
the reference elsewhere).
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

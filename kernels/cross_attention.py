"""Cross-stream attention (SPEC §2.1, §3): one score matrix, two softmaxes.

    S   = scale · q kᵀ                       (B, N_f, N_o)
    y_f = softmax_over_j(S) · v_o            (B, N_f, e)
    y_o = softmax_over_i(S)ᵀ · v_f           (B, N_o, e)

The Triton kernels follow in this file; until then the dispatcher runs the eager reference.
"""
import torch

from ccs_fast.kernels._dispatch import resolve_impl


def _check_inputs(q, k, v_f, v_o):
    for name, t in (("q", q), ("k", k), ("v_f", v_f), ("v_o", v_o)):
        if t.dim() != 3:
            raise ValueError(f"cross_stream_attention: {name} must be 3-D (B, N, features), got {tuple(t.shape)}")
    B, N_f, d = q.shape
    N_o = k.shape[1]
    if k.shape[0] != B or k.shape[2] != d:
        raise ValueError(f"cross_stream_attention: k {tuple(k.shape)} must be (B={B}, N_o, d={d})")
    if v_f.shape[:2] != (B, N_f):
        raise ValueError(f"cross_stream_attention: v_f {tuple(v_f.shape)} must be (B={B}, N_f={N_f}, e)")
    if v_o.shape[:2] != (B, N_o) or v_o.shape[2] != v_f.shape[2]:
        raise ValueError(
            f"cross_stream_attention: v_o {tuple(v_o.shape)} must be (B={B}, N_o={N_o}, e={v_f.shape[2]})"
        )


def cross_stream_attention_ref(q, k, v_f, v_o, scale=None):
    """Eager definition: returns ``(y_f, y_o)`` in the input dtype, computed in fp32 (fp64 stays fp64)."""
    _check_inputs(q, k, v_f, v_o)
    out_dtype = q.dtype
    acc = torch.promote_types(out_dtype, torch.float32)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    # Autocast would silently drop the matmuls back to half precision; the reference is fp32.
    with torch.autocast(device_type=q.device.type, enabled=False):
        s = torch.matmul(q.to(acc), k.to(acc).transpose(1, 2)) * scale
        y_f = torch.matmul(torch.softmax(s, dim=2), v_o.to(acc))
        y_o = torch.matmul(torch.softmax(s, dim=1).transpose(1, 2), v_f.to(acc))
    return y_f.to(out_dtype), y_o.to(out_dtype)


def cross_stream_attention(q, k, v_f, v_o, scale=None, impl="auto"):
    """``(y_f, y_o)`` of cross-stream attention; ``impl`` is "auto" | "triton" | "eager"."""
    if resolve_impl(impl, q, k, v_f, v_o) == "eager":
        return cross_stream_attention_ref(q, k, v_f, v_o, scale)
    raise NotImplementedError("the Triton cross_stream_attention kernels are not committed yet")

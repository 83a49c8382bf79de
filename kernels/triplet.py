"""Batch-hard triplet losses: cross-modal (CCS L1, SPEC §2.2) and single-modality.

Definition (d(a, b) = ‖a − b‖², ẑ = z / max(‖z‖, 1e-12) when ``normalize``):
  cross-modal:  mean over anchors i with a negative of
                [max_{p: y_p = y_i} d(ẑ_f,i, ẑ_o,p) − min_{n: y_n ≠ y_i} d(ẑ_f,i, ẑ_o,n) + margin]_+
                plus the same with f and o swapped, i.e. over the columns of the same B×B
                matrix. The own other modality is a positive. A direction without a valid anchor
                contributes 0 (no NaN, zero gradients).
  single:       the same on d(ẑ_i, ẑ_j), the diagonal is not a positive; anchors with no other
                positive or no negative are left out of the mean.
Hardest positive / negative ties go to the lowest index (the gradient follows that pair).

Status: eager references and dispatchers; the Triton path follows in this file.
"""
import torch
import torch.nn.functional as F

from ccs_fast.kernels._dispatch import resolve_impl

_EPS = 1e-12  # F.normalize's clamp of the norm


def _embed(z: torch.Tensor, normalize: bool) -> torch.Tensor:
    z = z.float()
    return F.normalize(z, dim=1, eps=_EPS) if normalize else z


def _sq_dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # ‖a‖² + ‖b‖² − 2 a·bᵀ: one matmul, not a B×B×D difference tensor
    return a.pow(2).sum(1)[:, None] + b.pow(2).sum(1)[None, :] - 2.0 * (a @ b.T)


def _hardest(d: torch.Tensor, mask: torch.Tensor, largest: bool):
    """Per row: d at the lowest-index arg-max (``largest``) or arg-min over ``mask``, and whether any."""
    fill = float("-inf") if largest else float("inf")
    masked = d.masked_fill(~mask, fill)
    best = masked.amax(1, keepdim=True) if largest else masked.amin(1, keepdim=True)
    cols = torch.arange(d.shape[1], device=d.device).expand_as(d)
    idx = torch.where((masked == best) & mask, cols, d.shape[1]).amin(1)
    found = mask.any(1)
    idx = torch.where(found, idx, 0)
    return d.gather(1, idx[:, None]).squeeze(1), found


def _batch_hard_mean(d: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, margin: float):
    d_pos, has_pos = _hardest(d, pos, largest=True)
    d_neg, has_neg = _hardest(d, neg, largest=False)
    valid = has_pos & has_neg
    hinge = torch.where(valid, (d_pos - d_neg + margin).clamp_min(0), 0.0)
    return hinge.sum() / valid.sum().clamp_min(1)


def cross_modal_triplet_loss_ref(z_f, z_o, labels, margin=0.3, normalize=True):
    """Eager definition of L1 (SPEC §2.2): fp32 0-dim loss, O(B²) memory, no host sync."""
    with torch.autocast(z_f.device.type, enabled=False):
        f, o = _embed(z_f, normalize), _embed(z_o, normalize)
        d = _sq_dist(f, o)
        same = labels[:, None] == labels[None, :]
        return _batch_hard_mean(d, same, ~same, margin) + _batch_hard_mean(d.T, same, ~same, margin)


def batch_hard_triplet_loss_ref(z, labels, margin=0.3, normalize=True):
    """Eager single-modality batch-hard triplet loss: fp32 0-dim, diagonal not a positive."""
    with torch.autocast(z.device.type, enabled=False):
        e = _embed(z, normalize)
        d = _sq_dist(e, e)
        same = labels[:, None] == labels[None, :]
        eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
        return _batch_hard_mean(d, same & ~eye, ~same, margin)


def _check(name, labels, *zs):
    for z in zs:
        if z.dim() != 2 or z.shape != zs[0].shape:
            raise ValueError(f"{name}: embeddings must be (B, D) of one shape, got {[tuple(t.shape) for t in zs]}")
    if labels.shape != (zs[0].shape[0],):
        raise ValueError(f"{name}: labels must be ({zs[0].shape[0]},), got {tuple(labels.shape)}")


def cross_modal_triplet_loss(z_f, z_o, labels, margin=0.3, normalize=True, impl="auto"):
    """Cross-modal batch-hard triplet loss L1 (fp32 0-dim). ``impl``: "auto" | "triton" | "eager"."""
    _check("cross_modal_triplet_loss", labels, z_f, z_o)
    if resolve_impl(impl, z_f, z_o, labels) == "eager":
        return cross_modal_triplet_loss_ref(z_f, z_o, labels, margin, normalize)
    return CrossModalTripletFunction.apply(z_f, z_o, labels, float(margin), bool(normalize))


def batch_hard_triplet_loss(z, labels, margin=0.3, normalize=True, impl="auto"):
    """Single-modality batch-hard triplet loss (fp32 0-dim). ``impl``: "auto" | "triton" | "eager"."""
    _check("batch_hard_triplet_loss", labels, z)
    if resolve_impl(impl, z, labels) == "eager":
        return batch_hard_triplet_loss_ref(z, labels, margin, normalize)
    return BatchHardTripletFunction.apply(z, labels, float(margin), bool(normalize))

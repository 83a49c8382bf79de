"""Discriminative embedding (center) loss of CCS, one modality's L2_m (SPEC §2.2).

  ẑ = z / max(‖z‖, 1e-12) when ``normalize``; μ_c = batch mean of ẑ over class c, 𝒞 = present classes
  L2_m = mean_i [‖ẑ_i − μ_{y_i}‖² − alpha_intra]_+ + mean_{c ≠ c' ∈ 𝒞} [alpha_inter − ‖μ_c − μ_c'‖²]_+
The second mean is over ordered pairs and is 0 when |𝒞| < 2; gradients flow through μ.
Labels are arbitrary int64 values; classes are numbered 0..|𝒞|−1 by sorting, without host sync.

Status: eager reference and dispatcher; the Triton path follows in this file.
"""
import torch
import torch.nn.functional as F

from ccs_fast.kernels._dispatch import resolve_impl

_EPS = 1e-12  # F.normalize's clamp of the norm


def class_ids(labels: torch.Tensor):
    """Dense class ids without host sync.

    Returns ``(cls, num_classes, counts, order, starts)``: ``cls[i]`` in 0..C−1 numbers the
    distinct labels in ascending order, ``num_classes`` is C as a 0-dim device tensor,
    ``counts`` (B,) the class sizes (zero past C), ``order`` the sample indices grouped by class
    and ``starts`` (B,) each class's first position in ``order``.
    """
    sorted_labels, order = torch.sort(labels, stable=True)
    is_new = torch.ones_like(sorted_labels, dtype=torch.int64)
    is_new[1:] = (sorted_labels[1:] != sorted_labels[:-1]).long()
    cls_sorted = torch.cumsum(is_new, 0) - 1
    cls = torch.empty_like(cls_sorted).scatter_(0, order, cls_sorted)
    counts = torch.zeros_like(cls_sorted).index_add_(0, cls_sorted, torch.ones_like(cls_sorted))
    starts = torch.cumsum(counts, 0) - counts
    return cls, cls_sorted[-1] + 1, counts, order, starts


def discriminative_embedding_loss_ref(z, labels, alpha_intra=0.3, alpha_inter=0.8, normalize=True):
    """Eager definition of L2_m: fp32 0-dim loss, segment sums by sorted class ids, no host sync."""
    with torch.autocast(z.device.type, enabled=False):
        e = z.float()
        e = F.normalize(e, dim=1, eps=_EPS) if normalize else e
        B = e.shape[0]
        cls, num_classes, counts, _, _ = class_ids(labels)
        sums = torch.zeros_like(e).index_add_(0, cls, e)
        mu = sums / counts.clamp_min(1)[:, None].to(e.dtype)  # rows past C stay 0
        intra = ((e - mu[cls]).pow(2).sum(1) - alpha_intra).clamp_min(0).mean()
        present = torch.arange(B, device=e.device) < num_classes
        pairs = present[:, None] & present[None, :] & ~torch.eye(B, dtype=torch.bool, device=e.device)
        sq = mu.pow(2).sum(1)
        d_mu = sq[:, None] + sq[None, :] - 2.0 * (mu @ mu.T)
        inter_sum = torch.where(pairs, (alpha_inter - d_mu).clamp_min(0), 0.0).sum()
        inter = inter_sum / (num_classes * (num_classes - 1)).clamp_min(1)
        return intra + inter


def discriminative_embedding_loss(z, labels, alpha_intra=0.3, alpha_inter=0.8, normalize=True, impl="auto"):
    """One modality's discriminative embedding loss (fp32 0-dim). ``impl``: "auto" | "triton" | "eager"."""
    if z.dim() != 2 or labels.shape != (z.shape[0],):
        raise ValueError(f"discriminative_embedding_loss: need z (B, D) and labels (B,), got {tuple(z.shape)}, {tuple(labels.shape)}")
    if resolve_impl(impl, z, labels) == "eager":
        return discriminative_embedding_loss_ref(z, labels, alpha_intra, alpha_inter, normalize)
    return DiscriminativeEmbeddingFunction.apply(z, labels, float(alpha_intra), float(alpha_inter), bool(normalize))

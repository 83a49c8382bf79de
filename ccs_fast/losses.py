"""Loss modules of CCS (SPEC §2.2): drop-in ``nn.Module`` wrappers of the fused ops.

No Triton here: each module calls its op's dispatcher (``impl="auto"`` runs the Triton kernel
on CUDA and the eager reference elsewhere). Every loss is a 0-dim fp32 tensor; nothing syncs
with the host.

Usage::

    from ccs_fast.losses import CCSObjective
    objective = CCSObjective(lambda1=0.5, lambda2=0.5)            # paper defaults
    out = objective(z_f, z_o, logits_f, logits_o, labels)         # z_*: (B, D), logits_*: (B, classes)
    out["loss"].backward()                                        # λ1·L1 + λ2·(L2_f + L2_o) + CE_f + CE_o
    print({k: v.item() for k, v in out.items()})                  # .item() syncs: log sparingly

Names: each loss has a long name (the paper's, SPEC §2.2's, the classes' and the ops') and a
short one (the log keys in ``metrics.jsonl``, ``CCSObjective``'s output and attributes, the
kernel files). Both are kept, since configs and logs already use them:

- L1, the cross-modal triplet loss: ``CrossModalTripletLoss``, op ``cross_modal_triplet_loss``
  (kernels/triplet.py); config ``loss.lambda1``, ``loss.alpha1``; short name ``triplet``.
- L2, the discriminative embedding loss: ``DiscriminativeEmbeddingLoss``, op
  ``discriminative_embedding_loss`` (kernels/center.py); config ``loss.lambda2``,
  ``loss.alpha2``, ``loss.alpha3``; short name ``center``.
- L3, the two streams' cross-entropies: ``F.cross_entropy``; short name ``ce``.

"center" is short for L2's two terms: each embedding is pulled to its class centre (the batch
mean of its class, hinge alpha2 = ``alpha_intra``) and the class centres are pushed apart
(hinge alpha3 = ``alpha_inter``). L2 = L2_f + L2_o: ``DiscriminativeEmbeddingLoss`` on each
modality's embeddings.
"""
import torch
import torch.nn.functional as F
from torch import nn

from ccs_fast.kernels.center import discriminative_embedding_loss
from ccs_fast.kernels.triplet import batch_hard_triplet_loss, cross_modal_triplet_loss


class CrossModalTripletLoss(nn.Module):
    """L1: batch-hard triplet between RGB and flow embeddings, both anchor directions.

    ``deterministic`` (None: follow ``torch.use_deterministic_algorithms``) makes the Triton
    path's gradients bit-identical run to run."""

    def __init__(self, margin: float = 0.3, normalize: bool = True, impl: str = "auto", deterministic=None):
        super().__init__()
        self.margin, self.normalize, self.impl, self.deterministic = margin, normalize, impl, deterministic

    def forward(self, z_f: torch.Tensor, z_o: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return cross_modal_triplet_loss(z_f, z_o, labels, self.margin, self.normalize, self.impl, self.deterministic)

    def extra_repr(self) -> str:
        return f"margin={self.margin}, normalize={self.normalize}, impl={self.impl!r}"


class BatchHardTripletLoss(nn.Module):
    """Single-modality batch-hard triplet loss (the diagonal is not a positive);
    ``deterministic`` as in ``CrossModalTripletLoss``."""

    def __init__(self, margin: float = 0.3, normalize: bool = True, impl: str = "auto", deterministic=None):
        super().__init__()
        self.margin, self.normalize, self.impl, self.deterministic = margin, normalize, impl, deterministic

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return batch_hard_triplet_loss(z, labels, self.margin, self.normalize, self.impl, self.deterministic)

    def extra_repr(self) -> str:
        return f"margin={self.margin}, normalize={self.normalize}, impl={self.impl!r}"


class DiscriminativeEmbeddingLoss(nn.Module):
    """L2_m (short name ``center``): intra-class pull to the batch class mean plus inter-class
    push between means."""

    def __init__(self, alpha_intra: float = 0.3, alpha_inter: float = 0.8, normalize: bool = True, impl: str = "auto"):
        super().__init__()
        self.alpha_intra, self.alpha_inter, self.normalize, self.impl = alpha_intra, alpha_inter, normalize, impl

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return discriminative_embedding_loss(z, labels, self.alpha_intra, self.alpha_inter, self.normalize, self.impl)

    def extra_repr(self) -> str:
        return f"alpha_intra={self.alpha_intra}, alpha_inter={self.alpha_inter}, normalize={self.normalize}, impl={self.impl!r}"


class CCSObjective(nn.Module):
    """L = λ1·L1 + λ2·(L2_f + L2_o) + CE(logits_f, y) + CE(logits_o, y)  (paper Eq. 4–6).

    ``ranking=False`` (variants ``baseline`` and ``cb``) keeps only the two cross-entropies;
    the ranking losses are then not computed and reported as zeros.
    forward returns ``{"loss", "ce", "triplet", "center"}``, 0-dim fp32 tensors, where
    ``triplet`` = L1 and ``center`` = L2_f + L2_o (unweighted; the short names of the module
    docstring, also the attributes holding the two loss modules).

    ``ranking_scale`` (a float in [0, 1], 1 by default) multiplies λ1 and λ2: the trainer ramps
    it from 0 over ``loss.ranking_warmup_epochs`` (``ranking_ramp``). From scratch the embeddings
    carry no class at first, and the ranking losses at full weight then held `all` on the
    Latin-square demo at chance for epochs on some seeds while CE alone (`cb`) left it within
    one or two (README, "What the demo shows").
    """

    def __init__(self, lambda1: float = 0.5, lambda2: float = 0.5, alpha1: float = 0.3, alpha2: float = 0.3,
                 alpha3: float = 0.8, ranking: bool = True, impl: str = "auto"):
        super().__init__()
        self.lambda1, self.lambda2, self.ranking = lambda1, lambda2, ranking
        self.ranking_scale = 1.0
        self.triplet = CrossModalTripletLoss(margin=alpha1, impl=impl)
        self.center = DiscriminativeEmbeddingLoss(alpha_intra=alpha2, alpha_inter=alpha3, impl=impl)

    def forward(self, z_f, z_o, logits_f, logits_o, labels) -> dict:
        ce = F.cross_entropy(logits_f.float(), labels) + F.cross_entropy(logits_o.float(), labels)
        if self.ranking:
            triplet = self.triplet(z_f, z_o, labels)
            center = self.center(z_f, labels) + self.center(z_o, labels)
            loss = ce + self.ranking_scale * (self.lambda1 * triplet + self.lambda2 * center)
        else:
            triplet = center = torch.zeros((), dtype=torch.float32, device=ce.device)
            loss = ce
        return {"loss": loss, "ce": ce, "triplet": triplet, "center": center}

    def extra_repr(self) -> str:
        return f"lambda1={self.lambda1}, lambda2={self.lambda2}, ranking={self.ranking}"


def ranking_ramp(iteration: int, warmup_iters: int) -> float:
    """The ranking losses' weight factor at ``iteration`` (0-based): a linear ramp from 0 to 1
    over ``warmup_iters`` iterations, 1 after it (and without a warm-up)."""
    return 1.0 if warmup_iters <= 0 else min(1.0, iteration / warmup_iters)

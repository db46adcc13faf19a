"""The multibox loss with hard negative mining (SSD §2.2 "Training objective")."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ssd.config import NEG_POS_RATIO


def hard_negative_mask(
    cls_loss: Tensor, positive: Tensor, neg_pos_ratio: float = NEG_POS_RATIO, min_negatives: int = 0
) -> Tensor:
    """Negatives kept for the classification loss, per image.

    cls_loss: Tensor[B, A] per-default-box confidence loss; positive: Tensor[B, A] bool.
    Returns Tensor[B, A] bool: in each image the ``max(ratio · positives, min_negatives)``
    negatives with the highest confidence loss (SSD §2.2: "at most 3:1"; `min_negatives` 0 is
    the paper's rule, under which an image without objects gives none), never a positive. One
    double sort over the whole batch (rank of each box by loss), no loop over images.
    """
    num_neg = (neg_pos_ratio * positive.sum(dim=1, keepdim=True)).clamp(min=min_negatives)  # [B, 1]
    ranked = cls_loss.detach().masked_fill(positive, -float("inf"))
    order = ranked.argsort(dim=1, descending=True)
    rank = order.argsort(dim=1)  # [B, A] position of each box in its image's ranking
    return (rank < num_neg) & ~positive


def multibox_loss(
    cls_logits: Tensor,
    loc_preds: Tensor,
    cls_targets: Tensor,
    loc_targets: Tensor,
    neg_pos_ratio: float = NEG_POS_RATIO,
    alpha: float = 1.0,
    min_negatives: int = 0,
) -> dict[str, Tensor]:
    """L = (L_cls + α·L_loc) / N over a batch.

    cls_logits: Tensor[B, A, C] (class 0 = background); loc_preds: Tensor[B, A, 4] encoded
    offsets; cls_targets: Tensor[B, A] int (0 = background); loc_targets: Tensor[B, A, 4].
    L_loc is smooth-L1 on positives, L_cls softmax cross-entropy on positives plus the hard
    negatives of `hard_negative_mask`; N = number of positives in the batch (1 when there
    are none, so an all-background batch gives a finite loss and no box loss).

    ``min_negatives`` > 0 lets every image, one without objects too, teach at least that many
    hard negatives. L_cls is then divided by N_cls = Σ_images max(positives, min_negatives /
    ratio): an image whose mined negatives are its 3:1 share counts as before, one that mines
    more counts as the positives that share would have come with, so each mined negative weighs
    what it does under the paper's rule and the loss stays comparable. L_loc keeps N. With 0
    (the default) both are the paper's N.
    Returns scalars ``loss``, ``cls`` (L_cls/N), ``loc`` (L_loc/N), and the counts
    ``num_pos`` and ``num_neg`` (detached).
    """
    num_classes = cls_logits.shape[-1]
    cls_targets = cls_targets.long()
    positive = cls_targets > 0  # [B, A]
    ce = F.cross_entropy(
        cls_logits.reshape(-1, num_classes).float(), cls_targets.reshape(-1), reduction="none"
    )
    ce = ce.view_as(cls_targets)  # [B, A]
    negative = hard_negative_mask(ce, positive, neg_pos_ratio, min_negatives)
    num_pos = positive.sum()
    normaliser = num_pos.clamp(min=1).to(ce.dtype)
    cls_normaliser = normaliser
    if min_negatives > 0:
        per_image = positive.sum(dim=1).to(ce.dtype).clamp(min=min_negatives / neg_pos_ratio)
        cls_normaliser = per_image.sum().clamp(min=1)
    cls = torch.where(positive | negative, ce, 0.0).sum() / cls_normaliser
    loc_l1 = F.smooth_l1_loss(loc_preds.float(), loc_targets.float(), reduction="none").sum(-1)  # [B, A]
    loc = torch.where(positive, loc_l1, 0.0).sum() / normaliser
    return {
        "loss": cls + alpha * loc,
        "cls": cls,
        "loc": loc,
        "num_pos": num_pos.detach(),
        "num_neg": negative.sum().detach(),
    }

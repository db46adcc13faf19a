"""The multibox loss with hard negative mining (SSD §2.2 "Training objective")."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ssd.config import NEG_POS_RATIO


def hard_negative_mask(cls_loss: Tensor, positive: Tensor, neg_pos_ratio: float = NEG_POS_RATIO) -> Tensor:
    """Negatives kept for the classification loss, per image.

    cls_loss: Tensor[B, A] per-default-box confidence loss; positive: Tensor[B, A] bool.
    Returns Tensor[B, A] bool: in each image the ``ratio · positives`` negatives with the
    highest confidence loss (SSD §2.2: "at most 3:1"), never a positive. One double sort
    over the whole batch (rank of each box by loss), no loop over images.
    """
    num_neg = neg_pos_ratio * positive.sum(dim=1, keepdim=True)  # [B, 1]
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
) -> dict[str, Tensor]:
    """L = (L_cls + α·L_loc) / N over a batch.

    cls_logits: Tensor[B, A, C] (class 0 = background); loc_preds: Tensor[B, A, 4] encoded
    offsets; cls_targets: Tensor[B, A] int (0 = background); loc_targets: Tensor[B, A, 4].
    L_loc is smooth-L1 on positives, L_cls softmax cross-entropy on positives plus the hard
    negatives of `hard_negative_mask`; N = number of positives in the batch (1 when there
    are none, so an all-background batch gives a finite loss and no box loss).
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
    negative = hard_negative_mask(ce, positive, neg_pos_ratio)
    num_pos = positive.sum()
    normaliser = num_pos.clamp(min=1).to(ce.dtype)
    cls = torch.where(positive | negative, ce, 0.0).sum() / normaliser
    loc_l1 = F.smooth_l1_loss(loc_preds.float(), loc_targets.float(), reduction="none").sum(-1)  # [B, A]
    loc = torch.where(positive, loc_l1, 0.0).sum() / normaliser
    return {
        "loss": cls + alpha * loc,
        "cls": cls,
        "loc": loc,
        "num_pos": num_pos.detach(),
        "num_neg": negative.sum().detach(),
    }

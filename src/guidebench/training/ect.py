"""ED-DPM's entropy-constraint training (ECT) of a guidance classifier (Zheng et al., ECCV 2022, sec. 3.3).

    L = mean_i [ CE(p_i, y_i) + lam (ln C - H(p_i)) ],   H(p) = -sum_c p_c log p_c,

as in `forward_backward_log` of ZGCTroy/ED-DPM scripts/classifier_train_ECT.py: its `entropy` is
ln(NUM_CLASSES) + sum_c log_softmax * softmax = ln C - H(p) = KL(p || Uniform) >= 0, weighted by
`--entropy_constraint_loss_weight` (default 0.1) at every sample and timestep alike. Minimising L raises H,
i.e. penalises over-confident predictions.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F


def check_ect_lambda(lam: float) -> float:
    """lam itself; ValueError unless lam >= 0 (a negative weight would reward over-confidence)."""
    if not lam >= 0:
        raise ValueError(f"train.ect_lambda={lam} must be >= 0 (0 = plain cross-entropy; ED-DPM uses 0.1)")
    return lam


def ect_loss(logits: torch.Tensor, labels: torch.Tensor, lam: float,
             num_classes: int | None = None) -> dict[str, torch.Tensor]:
    """ECT terms of logits [B, C]: ce_loss, entropy_term = ln C - H(p), entropy_constraint_loss = lam *
    entropy_term, loss_per_sample = their sum [B], and loss = F.cross_entropy + lam * mean(entropy_term) (the
    mean of loss_per_sample; exactly F.cross_entropy at lam = 0). C = num_classes, default logits.shape[-1]
    (the original hard-codes ln 1000).
    """
    check_ect_lambda(lam)
    log_probs = F.log_softmax(logits, dim=-1)
    log_c = math.log(logits.shape[-1] if num_classes is None else num_classes)
    ce = F.cross_entropy(logits, labels, reduction="none")
    entropy_term = log_c + (log_probs * F.softmax(logits, dim=-1)).sum(-1)
    constraint = lam * entropy_term
    return {"ce_loss": ce, "entropy_term": entropy_term, "entropy_constraint_loss": constraint,
            "loss_per_sample": ce + constraint,
            "loss": F.cross_entropy(logits, labels) + lam * entropy_term.mean()}

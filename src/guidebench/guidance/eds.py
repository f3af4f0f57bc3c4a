"""Entropy-driven sampling, EDS (Zheng et al. 2022, "Entropy-driven Sampling and Training Scheme for
Conditional Diffusion Generation", ECCV; ZGCTroy/ED-DPM)."""

from __future__ import annotations

import math

import torch

from guidebench.guidance.classifier import ClassifierGuidance


class EntropyDrivenGuidance(ClassifierGuidance):
    """Classifier guidance whose scale grows as the classifier's prediction sharpens (entropy-aware scaling).

        s_b = s ln(C) / H(p_phi(. | x_b; sigma)),   H = -sum_c p_c log p_c (nats)

    per sample (ED-DPM classifier_sample.py `cond_fn`, use_entropy_scale=True), from the same classifier forward as grad log p_phi(y | x_t), detached (no gradient
    flows through s_b), unclamped: H <= ln C, so s_b >= s and EDS only ever amplifies plain
    classifier guidance. It then enters both forms of `ClassifierGuidance` unchanged: the DDPM mean
    mu' = mu + s_b Sigma grad and the DDIM/Heun score eps' = eps - s_b sqrt(1 - abar) grad.

    entropy_classes: the C of ln C. None (default) takes the classifier's class count; the original
    code hard-codes ln 1000 (script_util.NUM_CLASSES), which equals it for ImageNet classifiers only:
    set 1000 to reproduce the original on another label space.
    """

    name = "eds"

    def __init__(self, classifier, scale: float = 1.0, entropy_classes: int | None = None):
        super().__init__(classifier, scale)
        if entropy_classes is not None and entropy_classes < 2:
            raise ValueError(f"guidance.entropy_classes must be >= 2 (or null: the classifier's), got {entropy_classes}")
        self.entropy_classes = entropy_classes

    def entropy_factor(self, logits: torch.Tensor) -> torch.Tensor:
        """ln(C) / H_b, float32 [B]."""
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        entropy = -(log_probs.exp() * log_probs).sum(dim=-1)
        return math.log(self.entropy_classes or logits.shape[-1]) / entropy

    def sample_scale(self, logits: torch.Tensor) -> torch.Tensor:
        return self.scale * self.entropy_factor(logits)

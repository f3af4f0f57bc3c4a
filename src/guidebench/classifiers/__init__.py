"""Noise-aware classifiers `classifier(x, sigma) -> logits` in sigma space, for classifier guidance."""

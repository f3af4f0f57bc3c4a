"""Guidance methods: each changes one denoising step and nothing else (docs/guidance.md)."""

from guidebench.guidance.base import Guidance, NoGuidance
from guidebench.guidance.cfg import ClassifierFreeGuidance
from guidebench.guidance.classifier import ClassifierGuidance
from guidebench.guidance.eds import EntropyDrivenGuidance
from guidebench.guidance.elucd import EluCDEDMGuidance, EluCDGuidance

__all__ = ["Guidance", "NoGuidance", "ClassifierFreeGuidance", "ClassifierGuidance", "EntropyDrivenGuidance",
           "EluCDGuidance", "EluCDEDMGuidance"]

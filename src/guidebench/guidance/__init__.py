"""Guidance methods: each changes one denoising step and nothing else (docs/guidance.md)."""

from guidebench.guidance.apg import AdaptiveProjectedGuidance
from guidebench.guidance.autoguidance import AutoGuidance
from guidebench.guidance.base import Guidance, NoGuidance
from guidebench.guidance.cfg import ClassifierFreeGuidance
from guidebench.guidance.cfg_zero_star import CFGZeroStar
from guidebench.guidance.cfgpp import CFGPlusPlus
from guidebench.guidance.classifier import ClassifierGuidance
from guidebench.guidance.eds import EntropyDrivenGuidance
from guidebench.guidance.elucd import EluCDEDMGuidance, EluCDGuidance
from guidebench.guidance.tcfg import TangentialCFG

__all__ = ["Guidance", "NoGuidance", "ClassifierFreeGuidance", "AdaptiveProjectedGuidance", "AutoGuidance",
           "CFGZeroStar", "CFGPlusPlus", "TangentialCFG", "ClassifierGuidance", "EntropyDrivenGuidance", "EluCDGuidance",
           "EluCDEDMGuidance"]

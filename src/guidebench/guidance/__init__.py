"""Guidance methods: each changes one denoising step and nothing else (docs/guidance.md)."""

from guidebench.guidance.apg import AdaptiveProjectedGuidance
from guidebench.guidance.autoguidance import AutoGuidance
from guidebench.guidance.base import Guidance, NoGuidance
from guidebench.guidance.cads import CADS
from guidebench.guidance.cfg import ClassifierFreeGuidance
from guidebench.guidance.cfg_zero_star import CFGZeroStar
from guidebench.guidance.cfgpp import CFGPlusPlus
from guidebench.guidance.classifier import ClassifierGuidance
from guidebench.guidance.eds import EntropyDrivenGuidance
from guidebench.guidance.elucd import EluCDEDMGuidance, EluCDGuidance
from guidebench.guidance.pag import PerturbedAttentionGuidance, SmoothedEnergyGuidance
from guidebench.guidance.tcfg import TangentialCFG
from guidebench.guidance.tfg import (DPSGuidance, FreeDoMGuidance, LossGuidedDiffusion, MPGDGuidance,
                                    TrainingFreeGuidance, UniversalGuidance)

__all__ = ["Guidance", "NoGuidance", "ClassifierFreeGuidance", "AdaptiveProjectedGuidance", "AutoGuidance", "CADS",
           "CFGZeroStar", "CFGPlusPlus", "TangentialCFG", "ClassifierGuidance", "EntropyDrivenGuidance", "EluCDGuidance",
           "EluCDEDMGuidance", "TrainingFreeGuidance", "DPSGuidance", "FreeDoMGuidance", "LossGuidedDiffusion",
           "MPGDGuidance", "UniversalGuidance", "PerturbedAttentionGuidance", "SmoothedEnergyGuidance"]

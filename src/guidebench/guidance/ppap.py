"""PPAP, Practical Plug-And-Play guidance (Go et al., CVPR 2023, "Towards Practical Plug-and-Play Diffusion
Models"; riiid/PPAP): classifier guidance by n experts, each an off-the-shelf classifier with LoRA adapters
(`guidebench.classifiers.lora`) distilled without labels for one range of the backbone's T training steps
(`guidebench.training.ppap`). Expert k covers the steps [floor(k T / n), floor((k + 1) T / n)).

Routing (MultiExpertWrapper in the original): a sample at sigma is guided by the expert of its ORIGINAL
(unspaced) step t, the training step whose sigma_t is nearest to sigma in log space (on a respaced schedule
exactly the step guided-diffusion's _WrappedModel hands the classifier). Two switches restore the original:
    boundary='upper' (default): a boundary step b_k = k T / n goes to expert k, which trained on it;
             'lower': the original's inclusive ranges [b_k, b_{k+1}], first match, send b_k to expert k - 1
             (with n = 5 and DDIM-25, t = 200, 400, 600, 800 are sampling steps);
    routing='per_sample' (default): each sample by its own t;
            'first_in_batch': the original, the whole batch by its first sample's t.
Guidance is `ClassifierGuidance` with the routed classifier: score form on DDIM,
eps' = eps - s sqrt(1 - abar) grad_{x_t} log p_k(y | x_t), gradient at x_t (no x0 prediction), and the mean
form mu' = mu + s Sigma grad log p_k for DDPM; s = 7.5 (classifier_sample.py's default).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from guidebench.checkpoints import CheckpointError, load_state_dict_checked, load_torch_file
from guidebench.classifiers.lora import add_lora_adapters
from guidebench.denoisers.discrete_vp import betas_for_schedule
from guidebench.guidance.classifier import ClassifierGuidance

TASK = "ppap_experts"
BOUNDARIES = ("upper", "lower")
ROUTINGS = ("per_sample", "first_in_batch")


def train_command(n_experts: int | None = None) -> str:
    extra = f" model.n_experts={n_experts}" if n_experts else ""
    return f"guidebench-train task={TASK} train.samples=SHARD_FOLDER{extra} out=checkpoints/digits/ppap_experts.pt"


def expert_bounds(n_experts: int, num_timesteps: int = 1000) -> list[int]:
    """[int(k T / n) for k = 0..n]: expert k trains on [b_k, b_{k+1}) (classifier_train.py, MultiExpertWrapper)."""
    if not 1 <= n_experts <= num_timesteps:
        raise ValueError(f"n_experts={n_experts} does not fit {num_timesteps} diffusion steps: choose 1 <= n_experts "
                         f"<= {num_timesteps} (PPAP: 5)")
    return [int(k * num_timesteps / n_experts) for k in range(n_experts + 1)]


def expert_index(t: torch.Tensor, bounds: Sequence[int], boundary: str = "upper",
                 routing: str = "per_sample") -> torch.Tensor:
    """The expert of each original step t [B] (int64): see the module docstring for boundary / routing."""
    inner = torch.as_tensor(bounds[1:-1], dtype=torch.int64, device=t.device)
    index = torch.searchsorted(inner, t.to(torch.int64), right=boundary == "upper").clamp_max(len(bounds) - 2)
    return index[:1].expand_as(index) if routing == "first_in_batch" else index


class PPAPExperts(nn.Module):
    """classifier(x, sigma) -> logits [B, K]: expert k of `experts` sees the VP state x_t = x / sqrt(1 + sigma^2)
    as it is (the original feeds raw x_t, no ImageNet normalisation); in eval mode (BatchNorm running stats).

    betas: the backbone's T training betas (routing maps sigma to the original step); image_size / num_classes:
    what the experts were distilled for, checked against the backbone by `PPAPGuidance.check`.
    """

    def __init__(self, experts: Sequence[nn.Module], betas: torch.Tensor, *, image_size: int, num_classes: int,
                 boundary: str = "upper", routing: str = "per_sample"):
        super().__init__()
        if boundary not in BOUNDARIES:
            raise ValueError(f"classifier.boundary must be one of {BOUNDARIES}, got {boundary!r}")
        if routing not in ROUTINGS:
            raise ValueError(f"classifier.routing must be one of {ROUTINGS}, got {routing!r}")
        self.experts = nn.ModuleList(experts)
        self.bounds = expert_bounds(len(self.experts), len(betas))
        self.image_size, self.num_classes, self.boundary, self.routing = image_size, num_classes, boundary, routing
        abar = torch.cumprod(1 - betas.to(torch.float64), dim=0)
        self.register_buffer("sigmas", ((1 - abar) / abar).sqrt(), persistent=False)

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Index of the training step nearest to sigma in log space, int64 [B]."""
        dist = (sigma.to(torch.float64).clamp_min(1e-20).log()[:, None] - self.sigmas.log()[None, :]).abs()
        return dist.argmin(dim=1)

    def route(self, sigma: torch.Tensor) -> torch.Tensor:
        """The expert index of each sample at sigma [B]."""
        return expert_index(self.sigma_to_t(sigma), self.bounds, self.boundary, self.routing)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1).expand(x.shape[0])
        x_t = x.to(torch.float32) * (1 + sigma**2).rsqrt().to(torch.float32).reshape(-1, 1, 1, 1)
        index = self.route(sigma)
        first = int(index[0])
        if bool((index == first).all()):
            return self.experts[first](x_t).float()
        logits = None
        for k in index.unique().tolist():
            rows = index == k
            part = self.experts[k](x_t[rows]).float()
            logits = part.new_zeros(len(x), part.shape[-1]) if logits is None else logits
            logits = logits.index_put((rows,), part)
        return logits


def build_experts(base: nn.Module, model: dict, boundary: str, routing: str) -> PPAPExperts:
    """n copies of `base` with LoRA adapters (model: the task's model config), routed."""
    experts = [add_lora_adapters(copy.deepcopy(base), model["r"], model["lora_alpha"], model["linear_forward"])
               for _ in range(model["n_experts"])]
    return PPAPExperts(experts, betas_for_schedule(model["noise_schedule"], model["num_timesteps"]),
                       image_size=model["image_size"], num_classes=model["num_classes"],
                       boundary=boundary, routing=routing)


def load_experts(checkpoint: str | Path, base: nn.Module, n_experts: int | None = None, boundary: str = "upper",
                 routing: str = "per_sample") -> PPAPExperts:
    """The experts written by `guidebench-train task=ppap_experts` (eval mode, frozen).

    base: the off-the-shelf classifier they were distilled from (its architecture; its weights are overwritten
    by the checkpoint's); n_experts: if set, the checkpoint must hold that many experts.
    """
    source = train_command(n_experts)
    ckpt = load_torch_file(checkpoint, source=source, config_key="classifier.checkpoint")
    if not isinstance(ckpt, dict) or ckpt.get("config", {}).get("task") != TASK:
        raise CheckpointError(f"{checkpoint} is not a task={TASK} checkpoint. Make it with: {source}")
    model = ckpt["config"]["model"]
    if n_experts is not None and int(n_experts) != int(model["n_experts"]):
        raise CheckpointError(f"{checkpoint} holds {model['n_experts']} experts but classifier.n_experts={n_experts}. "
                              f"Train {n_experts} with: {source}")
    experts = build_experts(base, model, boundary, routing)
    load_state_dict_checked(experts, ckpt["state_dict"], path=checkpoint, source=source)
    return experts.eval().requires_grad_(False)


def load_original_experts(checkpoints: Sequence[str | Path], base: nn.Module, *, image_size: int,
                          num_classes: int = 1000, r: int = 16, lora_alpha: float = 8.0,
                          num_timesteps: int = 1000, noise_schedule: str = "linear",
                          boundary: str = "upper", routing: str = "per_sample") -> PPAPExperts:
    """PPAP's released ResNet experts ({k}_max{n}.ckpt, full state dicts with keys `resnet.*`) on `base`, a
    guidebench TorchvisionClassifier of the same architecture (keys `net.*`); one file per expert, in order."""
    files = [Path(c) for c in checkpoints]
    source = "riiid/PPAP README, 'Trained checkpoint' (ResNet50, PPAP-5: {k}_max5.ckpt)"
    model = dict(n_experts=len(files), r=r, lora_alpha=lora_alpha, linear_forward="scaled", num_timesteps=num_timesteps,
                 noise_schedule=noise_schedule, image_size=image_size, num_classes=num_classes)
    experts = build_experts(base, model, boundary, routing)
    for expert, path in zip(experts.experts, files):
        state = load_torch_file(path, source=source, config_key="classifier.checkpoints")
        state = {"net." + k.removeprefix("resnet."): v for k, v in state.items()}
        load_state_dict_checked(expert, state, path=path, source=source)
    return experts.eval().requires_grad_(False)


class PPAPGuidance(ClassifierGuidance):
    """PPAP (Go et al., CVPR 2023): classifier guidance (Dhariwal & Nichol 2021) with `PPAPExperts`.

    DDIM (classifier_sample.py, condition_score): eps' = eps - s sqrt(1 - abar_t) grad_{x_t} log p_k(y | x_t),
    k the expert of t; DDPM: mu' = mu + s Sigma grad_{x_t} log p_k(y | x_t). One expert forward and backward
    per step, as plain classifier guidance. Default s = 7.5 (the original's).
    """

    name = "ppap"

    def __init__(self, classifier, scale: float = 7.5):
        super().__init__(classifier, scale)

    def check(self, denoiser, solver=None) -> None:
        """Experts, then their resolution, label space and schedule against the backbone's, before sampling."""
        experts = self.classifier
        if experts is None:
            return super().check(denoiser, solver)
        if not isinstance(experts, PPAPExperts):
            raise ValueError(f"guidance=ppap needs PPAP's expert classifiers, got {type(experts).__name__}: use "
                             "classifier=digits_ppap (digits) or classifier=ppap_resnet50 (ImageNet)")
        command = train_command(len(experts.experts))
        r, k = denoiser.img_resolution, denoiser.num_classes
        if experts.image_size != r or (k and experts.num_classes != k):
            raise ValueError(f"guidance=ppap: the experts were distilled for {experts.num_classes} classes at "
                             f"{experts.image_size}x{experts.image_size}, the backbone samples {k} classes at {r}x{r}; "
                             f"distil experts on the backbone's own samples: {command}")
        super().check(denoiser, solver)
        own = getattr(denoiser, "sigmas", None)
        if own is None or len(own) != len(experts.sigmas) or not torch.allclose(
                own.detach().cpu().to(torch.float64), experts.sigmas.cpu(), rtol=1e-6):
            raise ValueError(f"guidance=ppap routes by the backbone's training step, but the experts were trained on "
                             f"another {len(experts.sigmas)}-step schedule than the backbone's; distil them for this "
                             f"backbone: {command}")

"""PPAP's data-free knowledge transfer (Go et al., CVPR 2023, sec. 4.3; riiid/PPAP classifier_train.py, method ppap).

No labels: x0 are samples the unconditional diffusion model generated (a guidebench-sample shard folder).
The teacher is the frozen off-the-shelf classifier on clean x0, the student the same classifier with LoRA
adapters on x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) n, t ~ U{b_k .. b_{k+1} - 1} for expert k; the loss is
the forward KL with temperature tau = 0.25 on the teacher only, averaged over classes, then over the batch:

    L = mean_b (1/K) sum_j p_j (log p_j - log q_j),   p = softmax(f_teacher(x0) / tau),  q = softmax(f_student(x_t))

(no tau^2). As the original: experts are trained one after the other, each starting from the previous
expert's weights with the same AdamW state (continual fine-tuning, not from the off-the-shelf model); the
learning rate is lr (1 - step / steps) within each expert; the student's BatchNorm runs in train mode
(batch statistics); the student sees raw x_t while the teacher sees `teacher_normalize`d (x0 + 1) / 2.
"""

from __future__ import annotations

import copy
import logging
import time
from typing import Callable, Iterator

import hydra
import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from guidebench.denoisers.discrete_vp import betas_for_schedule
from guidebench.evaluation.sources import ShardSource
from guidebench.guidance.ppap import PPAPExperts, build_experts, expert_bounds
from guidebench.training.common import loss_summary

log = logging.getLogger("guidebench.training")
Draw = Callable[[torch.Tensor, int, int], tuple[torch.Tensor, torch.Tensor]]


def q_sample(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) n (Ho et al. 2020, eq. 4); coefficients float64 -> float32 as ADM."""
    a = abar[t].to(torch.float64)
    return a.sqrt().float().reshape(-1, 1, 1, 1) * x0 + (1 - a).sqrt().float().reshape(-1, 1, 1, 1) * noise


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      temperature: float = 0.25) -> torch.Tensor:
    """Per-sample, per-class KL terms [B, K]: p (log p - log q), p = softmax(teacher / tau), q = softmax(student)
    (torch's KLDivLoss(reduction='none') as PPAP calls it); the loss is `.mean(-1).mean()`."""
    return F.kl_div(F.log_softmax(student_logits, dim=1), F.softmax(teacher_logits / temperature, dim=1),
                    reduction="none")


def teacher_input(x0: torch.Tensor, normalize: dict | None) -> torch.Tensor:
    """What the teacher sees: x0 as it is, or Normalize(mean, std)((x0 + 1) / 2) (PPAP's ImageNet ResNets)."""
    if normalize is None:
        return x0
    mean = torch.tensor(normalize["mean"], dtype=x0.dtype, device=x0.device).reshape(1, -1, 1, 1)
    std = torch.tensor(normalize["std"], dtype=x0.dtype, device=x0.device).reshape(1, -1, 1, 1)
    return ((x0 + 1) / 2 - mean) / std


def distil(teacher: nn.Module, student: nn.Module, batches: Iterator[torch.Tensor], bounds: list[int],
           steps_per_expert: int, draw: Draw, abar: torch.Tensor, *, lr: float, weight_decay: float,
           anneal_lr: bool = True, temperature: float = 0.25, normalize: dict | None = None,
           record: Callable[[dict], None] | None = None) -> tuple[list[dict], list[float]]:
    """Train the experts in order (classifier_train.py's loop); returns each expert's state dict, taken when its
    range is done, and the losses. draw(x0, lo, hi) -> (t [B] in [lo, hi), noise like x0)."""
    teacher.eval()
    student.train()
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=weight_decay)
    states, losses = [], []
    for k in range(len(bounds) - 1):
        for step in range(steps_per_expert):
            step_lr = lr * (1 - step / steps_per_expert) if anneal_lr else lr
            for group in opt.param_groups:
                group["lr"] = step_lr
            opt.zero_grad(set_to_none=True)
            x0 = next(batches)
            with torch.no_grad():
                teacher_logits = teacher(teacher_input(x0, normalize))
                t, noise = draw(x0, bounds[k], bounds[k + 1])
                x_t = q_sample(x0, t, noise, abar)
            student_logits = student(x_t)
            kd = distillation_loss(student_logits, teacher_logits, temperature)
            loss = kd.mean(dim=-1)
            loss.mean().backward()
            if record is not None:
                record({"expert": k, "step": step, "lr": step_lr, "t": t, "x_t": x_t, "teacher_logits": teacher_logits,
                        "student_logits": student_logits.detach(), "kd_loss": kd.detach(), "loss": loss.detach()})
            opt.step()
            losses.append(float(loss.detach().mean()))
        states.append({key: v.detach().clone() for key, v in student.state_dict().items()})
        log.info("ppap expert %d/%d on t in [%d, %d): loss %.4f", k + 1, len(bounds) - 1, bounds[k], bounds[k + 1],
                 sum(losses[-steps_per_expert:]) / steps_per_expert)
    return states, losses


def generated_batches(folder: str, batch_size: int, generator: torch.Generator,
                      random_flip: bool = False) -> Iterator[torch.Tensor]:
    """Endless shuffled batches of a shard folder's images as float32 [B, C, H, W] in [-1, 1] (x / 127.5 - 1, as
    PPAP's image_datasets), reshuffled every epoch, last partial batch dropped; optional horizontal flips."""
    source = ShardSource(folder)
    images = torch.stack([source[i] for i in range(len(source))]).float() / 127.5 - 1
    if batch_size > len(images):
        raise ValueError(f"train.batch_size={batch_size} exceeds the {len(images)} generated samples in {folder}")
    while True:
        perm = torch.randperm(len(images), generator=generator)
        for i in range(0, len(images) - batch_size + 1, batch_size):
            x = images[perm[i:i + batch_size]]
            if random_flip:
                flip = torch.rand(len(x), generator=generator) < 0.5
                x = torch.where(flip.reshape(-1, 1, 1, 1), x.flip(-1), x)
            yield x


@torch.no_grad()
def heldout_agreement(experts: PPAPExperts, teacher: nn.Module, bounds: list[int], abar: torch.Tensor,
                      seed: int = 12345) -> dict[str, list[float]]:
    """On the digits heldout split noised at each expert's middle step: accuracy of the expert and of the clean
    teacher (both on x_t), and their agreement with the teacher on clean images."""
    from guidebench.data.digits import load_digits_split

    data = load_digits_split("heldout")
    noise = torch.randn(data.images.shape, generator=torch.Generator().manual_seed(seed))
    clean = teacher(data.images).argmax(1)
    out = {"t": [], "expert_accuracy": [], "teacher_accuracy": [], "expert_agreement": []}
    for k, expert in enumerate(experts.experts):
        t = (bounds[k] + bounds[k + 1]) // 2
        x_t = q_sample(data.images, torch.full((len(data),), t), noise, abar)
        pred = expert(x_t).argmax(1)
        out["t"].append(t)
        out["expert_accuracy"].append(float((pred == data.labels).float().mean()))
        out["teacher_accuracy"].append(float((teacher(x_t).argmax(1) == data.labels).float().mean()))
        out["expert_agreement"].append(float((pred == clean).float().mean()))
    return out


def train_ppap_experts(model: dict, train: dict) -> tuple[nn.Module, dict]:
    """Distil model["n_experts"] LoRA experts from model["base"] (a classifier config) on train["samples"].

    train["steps"] is the total over all experts (the original's --iterations) and must divide by n_experts.
    """
    n, steps = int(model["n_experts"]), int(train["steps"])
    bounds = expert_bounds(n, int(model["num_timesteps"]))
    if steps % n:
        raise ValueError(f"train.steps={steps} does not divide into model.n_experts={n} equal parts (the original "
                         f"truncates to int(steps / n) per expert); choose a multiple of {n}")
    torch.manual_seed(train["seed"])
    gen = torch.Generator().manual_seed(train["seed"])
    teacher = hydra.utils.instantiate(model["base"]).eval().requires_grad_(False)
    experts = build_experts(teacher, model, "upper", "per_sample")
    student = copy.deepcopy(experts.experts[0])
    abar = torch.cumprod(1 - betas_for_schedule(model["noise_schedule"], int(model["num_timesteps"])), 0)
    batches = generated_batches(train["samples"], int(train["batch_size"]), gen, bool(train["random_flip"]))
    size = ShardSource(train["samples"]).shape[-1]
    if size != model["image_size"]:
        raise ValueError(f"the samples in {train['samples']} are {size}x{size}, but model.image_size="
                         f"{model['image_size']}: sample the backbone the experts are for")

    def draw(x0, lo, hi):
        return torch.randint(lo, hi, (len(x0),), generator=gen), torch.randn(x0.shape, generator=gen)

    start = time.perf_counter()
    states, losses = distil(teacher, student, batches, bounds, steps // n, draw, abar, lr=train["lr"],
                            weight_decay=train["weight_decay"], anneal_lr=train["anneal_lr"],
                            temperature=train["temperature"], normalize=train.get("teacher_normalize"))
    for expert, state in zip(experts.experts, states):
        expert.load_state_dict(state)
    experts.eval().requires_grad_(False)
    per_expert = np.asarray(losses).reshape(n, -1)
    tail = max(per_expert.shape[1] // 10, 1)
    metrics = {**loss_summary(losses), "train_seconds": time.perf_counter() - start,
               "loss_last_per_expert": per_expert[:, -tail:].mean(1).tolist(),
               "trainable_params_per_expert": sum(p.numel() for p in student.parameters() if p.requires_grad),
               "params_per_expert": sum(p.numel() for p in student.parameters())}
    if train.get("heldout") == "digits":
        metrics["heldout"] = heldout_agreement(experts, teacher, bounds, abar)
    return experts, metrics

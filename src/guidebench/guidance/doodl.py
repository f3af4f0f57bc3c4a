"""DOODL, Wallace et al. 2023 ("End-to-End Diffusion Latent Optimization Improves Classifier Guidance", ICCV;
salesforce/DOODL): optimise the starting noise of an invertible sampler (EDICT) against a loss on its final image.

Per sample, with z the standard-normal start latent (x_T in VP coordinates) and (x_0, y_0) = EDICT(z, z):

    L = s [CE(f(x_0), y) + CE(f(y_0), y)]                   (f: an off-the-shelf classifier, s = `scale`)
    g = clip(-(dL/dx_T + dL/dy_T) / 4, -c, c)               (tied latents: -0.5 * the mean of the pair's gradients)
    b = g at the first iteration, else beta b + g           (momentum 0.9, no dampening; nesterov: step g + beta b)
    z = (z + b + xi) ||z_start|| / ||z + b + xi||,   xi ~ N(0, sigma_xi^2 I)

The gradient goes back through the whole chain by inverting EDICT step by step (`samplers.edict_vjp`), so memory
does not grow with the number of steps. Defaults: salesforce/DOODL `gen` (clip_grad_val 1e-3, momentum 0.9,
perturb_grad_scale 1e-4, grad_scale 1, renormalize_latents, tied_latents, 50 iterations).
Deviations, each deliberate: the loss is the classifier group's cross-entropy on the final sample as the sampler
ends it (the original's WS-DAN FGVC loss takes 16 cutouts, which at its 512-px setting are all the full image,
of (im + 1) / 2 clamped and ImageNet-normalised); `num_iterations` counts updates and the returned sample is
rendered after the last one (the original's num_traversal_steps = T saves the image before its T-th update,
i.e. num_iterations = T - 1, and discards that last gradient); the EDICT steps use the backbone's own conditional
prediction (the original's Stable Diffusion runs CFG 7.5 inside every step); the original runs in float16.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from guidebench.generate import start_scale
from guidebench.guidance.base import Guidance, solver_trait
from guidebench.guidance.classifier import check_classifier
from guidebench.samplers import edict_chain, edict_vjp


def doodl_update(z: torch.Tensor, direction: torch.Tensor, momentum: torch.Tensor | None, noise: torch.Tensor,
                 norm: torch.Tensor | None, clip: float = 1e-3, beta: float = 0.9,
                 nesterov: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One DOODL update of the latents z [B, C, H, W] along `direction` = -(dL/dx_T + dL/dy_T) / 4.

    Element-wise clip to [-clip, clip], momentum b (None: the first iteration), z + b + noise (the noise is not
    in the momentum), then each sample rescaled to its `norm` (None: no renormalisation). Returns (z, b).
    """
    g = direction.clamp(-clip, clip)
    b = g if momentum is None else beta * momentum + g
    z = z + (g + beta * b if nesterov else b) + noise
    if norm is not None:
        z = z * (norm / z.flatten(1).norm(dim=1)).reshape(-1, *[1] * (z.dim() - 1))
    return z, b


class DOODLGuidance(Guidance):
    """DOODL around an invertible solver (`sampler=edict`): `solve` optimises the start, then samples from it.

    Cost per iteration: one EDICT chain (2 denoiser forwards per step) and its inversion with the gradient
    (2 forwards and backwards per step), i.e. 6 NFE per step as counted, plus one classifier forward and backward
    of both EDICT images; then one more chain renders the sample. RNG per iteration: one randn of the latent's
    shape (the perturbation), from the sample's own generator.
    """

    name = "doodl"
    classifier_sees = "x0"

    def __init__(self, classifier,
                 scale: float = 1.0,            # grad_scale: the loss's factor (DOODL's learning rate)
                 num_iterations: int = 50,      # latent updates (the original's num_traversal_steps - 1, see above)
                 clip_grad: float = 1e-3,       # clip_grad_val, element-wise
                 momentum: float = 0.9,         # 0: plain gradient steps (use_momentum=False)
                 nesterov: bool = False,        # use_nesterov
                 noise_scale: float = 1e-4,     # perturb_grad_scale
                 renormalize: bool = True):     # renormalize_latents: back to the start latent's norm
        self.classifier = classifier
        self.scale, self.num_iterations, self.clip_grad = float(scale), int(num_iterations), float(clip_grad)
        self.momentum, self.nesterov, self.noise_scale = float(momentum), bool(nesterov), float(noise_scale)
        self.renormalize = bool(renormalize)
        if self.num_iterations < 0:
            raise ValueError(f"guidance.num_iterations must be >= 0, got {num_iterations}")

    def check(self, denoiser, solver=None) -> None:
        if solver is not None and not solver_trait(solver, "invertible", False):
            name = solver_trait(solver, "__name__", type(solver).__name__)
            raise ValueError(f"guidance=doodl backpropagates through the whole sampler by inverting it, and {name} is "
                             "stochastic or not exactly invertible: use sampler=edict")
        check_classifier(self.classifier, denoiser, self.name)
        if not denoiser.num_classes:
            raise ValueError("guidance=doodl maximises the classifier's probability of a class label; the backbone "
                             "has no label space")

    def loss(self, x0: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-sample loss [B] of final samples x0 (as the sampler ends them): s * CE(classifier(x0), label)."""
        logits = self.classifier(x0.to(torch.float32), x0.new_zeros(len(x0))).float()
        return self.scale * F.cross_entropy(logits, labels, reduction="none")

    def optimise(self, denoiser, z: torch.Tensor, sigmas: torch.Tensor, labels: torch.Tensor, rng,
                 callback=None, **options) -> torch.Tensor:
        """The latents z [B, C, H, W] (standard normal, float64) after `num_iterations` DOODL updates.

        `options` are the EDICT solver's (mix); `callback` gets each iteration's record before its update."""
        scale = start_scale(denoiser, sigmas)
        norm = z.flatten(1).norm(dim=1) if self.renormalize else None
        momentum = None
        for m in range(self.num_iterations):
            final = edict_chain(denoiser, z * scale, z * scale, sigmas, labels, **options)
            with torch.enable_grad():
                pair = torch.cat(final).requires_grad_(True)
                loss = self.loss(pair, torch.cat([labels, labels]))
                grad_x, grad_y = torch.autograd.grad(loss.sum(), pair)[0].chunk(2)
            _, (grad_x, grad_y) = edict_vjp(denoiser, *final, grad_x, grad_y, sigmas, labels, **options)
            grad_x, grad_y = grad_x * scale, grad_y * scale  # d/dz of x = z * scale
            direction = -(grad_x + grad_y) / 4
            if callback is not None:
                callback({"m": m, "z": z, "final": final, "loss": loss.detach().reshape(2, -1),
                          "grad": (grad_x, grad_y), "direction": direction})
            noise = self.noise_scale * rng.randn(list(z.shape)).to(z)
            z, momentum = doodl_update(z, direction, momentum, noise, norm, self.clip_grad, self.momentum,
                                       self.nesterov)
        return z

    def solve(self, solver, denoiser, x, sigmas, labels, rng=None):
        scale = start_scale(denoiser, sigmas)
        z = self.optimise(denoiser, x / scale, sigmas, labels, rng, **getattr(solver, "keywords", {}))
        return solver(denoiser, z * scale, sigmas, labels, rng=rng)

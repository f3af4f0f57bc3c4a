"""CFG++ (Chung et al. 2025, "CFG++: Manifold-constrained Classifier Free Guidance for Diffusion Models", ICLR)."""

from __future__ import annotations

from guidebench.guidance.base import solver_trait
from guidebench.guidance.cfg import ClassifierFreeGuidance


class CFGPlusPlus(ClassifierFreeGuidance):
    """CFG with a small guidance weight on x0 and the step re-noised with the UNCONDITIONAL noise estimate.

        x0_lam = x0_u + lam (x0_c - x0_u),   x' = x0_lam + sigma' eps_u,   eps_u = (x - x0_u) / sigma

    (Chung et al. 2025, DDIM form; in sigma space DDIM with eta = 0 is also the Euler step of the ODE, and
    with eta > 0 the ancestral form adds sigma_up z). lam = `scale` in [0, 1] (lam = 0 is unconditional
    sampling; lam = 1 is not the conditional model: it still re-noises with eps_u). Needs a solver that
    supports re-noising (sampler=ddim). The interval keys apply (outside, the conditional model alone);
    the schedule and rescale keys do not.
    """

    name = "cfgpp"

    def __init__(self, scale: float = 0.6, **cfg_keys):
        super().__init__(scale, **cfg_keys)
        if self.schedule != "constant" or self.rescale:
            raise ValueError("guidance=cfgpp takes no schedule or rescale (its lam is a fixed weight on x0)")
        if not 0 <= self.scale <= 1:
            raise ValueError(f"guidance=cfgpp needs lam = guidance.scale in [0, 1], got {self.scale}")

    def check(self, denoiser, solver=None) -> None:
        super().check(denoiser, solver)
        if solver is not None and not solver_trait(solver, "supports_renoise", False):
            raise ValueError("guidance=cfgpp re-noises with the unconditional estimate: use sampler=ddim "
                             "(DDPM's mean form and Heun's correction have no CFG++ form)")

    def __call__(self, denoiser, x, sigma, labels, mean_form: bool = False, step: int | None = None):
        if not self.in_window(step):
            return denoiser(x, sigma, labels)
        cond, uncond = self.predictions(denoiser, x, sigma, labels)
        guided = uncond + self.scale * (cond.x0 - uncond)
        if self.channels is not None:
            guided = guided.clone()
            guided[:, self.channels:] = cond.x0[:, self.channels:]
        return cond._replace(x0=guided, renoise_x0=uncond)

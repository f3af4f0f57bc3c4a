"""The guidance interface: what a solver calls where it would call the denoiser (docs/guidance.md)."""

from __future__ import annotations

import torch

from guidebench.denoisers.base import Denoised
from guidebench.rng import StackedRandomGenerator


def solver_trait(solver, name: str, default=None):
    """An attribute a solver function carries (`guidance_form`, `supports_renoise`, `invertible`, `__name__`),
    also through the functools.partial a config makes of it."""
    return getattr(getattr(solver, "func", solver), name, default)


def solver_form(solver) -> str:
    """'mean' for solvers that add `Guidance.mean_shift` to a posterior mean (DDPM), else 'score'."""
    return solver_trait(solver, "guidance_form", "score")


class Guidance:
    """A guidance method changes one step; a solver drives it through four calls.

    Per trajectory (one batch): `begin(denoiser, sigmas, labels, rng)` resets any state (a running max,
    a momentum) and sees the schedule. Per step i (sigmas[i] -> sigmas[i + 1]), in this order:
      `displace(denoiser, x, sigma, labels, step=i) -> x`: move the state before the step
          (a displacement method such as EluCD's EDM branch); identity by default;
      `__call__(denoiser, x, sigma, labels, mean_form, step=i) -> Denoised`: replaces D(x; sigma, y),
          every evaluation of the step (both Heun stages) with the same i;
      `mean_shift(denoiser, x, sigma, sigma_next, labels, variance, den=..., step=i)`: only solvers of
          the DDPM mean form (Dhariwal & Nichol 2021, Alg. 1) call it and add the shift to the posterior
          mean; they pass mean_form=True to `__call__`, and a method that guides through the mean then
          returns the unguided prediction there.
    `check(denoiser, solver)` raises a clear error before sampling if the method cannot run.
    `solve(solver, denoiser, x, sigmas, labels, rng)` is the whole trajectory (default: the solver with this
    method in its steps); a method that optimises around the solver (DOODL) overrides it.
    `scale` is the method's strength (for CFG in the EDM/DiT convention, 1 = unguided).
    """

    name = "guidance"
    scale: float = 1.0
    classifier_sees = "x"  # what a classifier-based method feeds its classifier: the state x, or "x0" (images)

    def check(self, denoiser, solver=None) -> None:
        """Raise a clear error if this method cannot guide `denoiser` with `solver`."""

    def to(self, device) -> "Guidance":
        """Move the networks the method holds (a classifier, a guide model) to `device`, in eval mode."""
        for key, value in vars(self).items():
            if isinstance(value, torch.nn.Module):
                setattr(self, key, value.to(device).eval())
        return self

    def begin(self, denoiser, sigmas: torch.Tensor, labels: torch.Tensor | None,
              rng: StackedRandomGenerator | None = None) -> None:
        """A new trajectory over the descending schedule `sigmas` (float64, trailing 0) starts.

        `rng` is the solver's per-sample generator: a method that draws noise (a re-noising recurrence,
        a Monte-Carlo estimate) draws it there, so each sample's stream depends on its seed only."""

    def solve(self, solver, denoiser, x: torch.Tensor, sigmas: torch.Tensor, labels: torch.Tensor | None,
              rng: StackedRandomGenerator | None = None) -> torch.Tensor:
        """The whole trajectory from x at sigmas[0] (sigma space, float64); `generate` calls it once per batch.

        Default: the solver, driving this method through the per-step calls. A method that works around the
        solver rather than inside its steps (DOODL optimises the start x through an invertible solver) overrides
        it; it must draw any noise from `rng` and run every denoiser forward through `denoiser` (counted)."""
        return solver(denoiser, x, sigmas, labels, guidance=self, rng=rng)

    def displace(self, denoiser, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None,
                 step: int | None = None) -> torch.Tensor:
        """The state x (float64, sigma space) at the start of step `step`, after guidance moved it."""
        return x

    def __call__(self, denoiser, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None,
                 mean_form: bool = False, step: int | None = None) -> Denoised:
        return denoiser(x, sigma, labels)

    def mean_shift(self, denoiser, x: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor,
                   labels: torch.Tensor | None, variance: torch.Tensor, den: Denoised | None = None,
                   step: int | None = None) -> torch.Tensor | None:
        """Shift of the DDPM posterior mean (sigma space), or None for methods that guide D itself.

        variance: the step's posterior variance in sigma space (`ddpm_step_moments`); den: the
        prediction `__call__(..., mean_form=True)` returned for this step.
        """
        return None


class NoGuidance(Guidance):
    """Plain conditional (or unconditional) sampling."""

    name = "none"

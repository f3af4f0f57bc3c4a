"""Classifier-free guidance (Ho & Salimans 2022) and what every CFG-like method shares: the guidance
interval, weight schedules, guidance rescale and DiT's channel rule."""

from __future__ import annotations

import math

import torch

from guidebench.denoisers.base import Denoised
from guidebench.guidance.base import Guidance

SCHEDULES = ("constant", "linear", "cosine", "clamp_linear")


def rescale_guided(guided: torch.Tensor, cond: torch.Tensor, phi: float) -> torch.Tensor:
    """Guidance rescale (Lin et al. 2024, eqs. 15-16): match the std of the conditional prediction, mix by phi.

        x_r = x_cfg std(x_c) / std(x_cfg),   x = phi x_r + (1 - phi) x_cfg   (std per sample over C, H, W)
    """
    dims = tuple(range(1, guided.ndim))
    return phi * guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True)) + (1 - phi) * guided


class ClassifierFreeGuidance(Guidance):
    """Ho & Salimans 2022, eq. 6, in the EDM/DiT convention (EDM2's one interpolation around the denoise call).

        D_guided = D(x; sigma, null) + scale * (D(x; sigma, y) - D(x; sigma, null))

    `scale` = 1 is the conditional model, 0 the unconditional one. Ho & Salimans write
    eps~ = (1 + w) eps(y) - w eps(null), i.e. w = scale - 1 (their w = 0 is unguided). The rule is
    affine, so guiding x0 and guiding eps give the same step. Both halves run as ONE batched forward.
    With learned variance the conditional half's variance is kept (as ADM/DiT sampling do).
    Subclasses change `predictions` (where the two predictions come from) or `combine` (how they mix).

    Keys shared by every CFG-like method (they act on step i of N of the solver's schedule; both Heun
    evaluations of a step take the same branch; where the step is unguided only the conditional
    forward runs, so the NFE drops):
      interval: [sigma_lo, sigma_hi]: guide only where sigma_i is in (sigma_lo, sigma_hi]
          (Kynkaanniemi et al. 2024, sec. 3; EDM2-S ImageNet-512: (0.28, 2.90], SD-XL: (0.28, 5.42]);
      interval_steps: [start, stop]: guide only steps int(start N) <= i < int(stop N) (the step-fraction
          window of diffusers' guiders);
      schedule: w_i = (scale - 1) f(p_i) with p_i = (i + 1) / N (Wang et al. 2024, sec. 3): constant f = 1,
          linear f = 2p, cosine f = 1 - cos(pi p) (both average to 1 over the trajectory), clamp_linear
          w_i = max(schedule_clamp, 2 p (scale - 1)) (their "clamp-linear", c = 1 in their w);
      rescale: phi of `rescale_guided` (Lin et al. 2024), on the guided x0 prediction;
      channels: guide only the first `channels` output channels and take the others from the
          conditional prediction. DiT's released sampler does this with channels=3 on its 4-channel
          latents (Peebles & Xie 2023; facebookresearch/DiT models.py `forward_with_cfg`), so its
          published FIDs need channels=3; None guides all channels.
    """

    name = "cfg"

    def __init__(self, scale: float = 1.0, channels: int | None = None, interval: list[float] | None = None,
                 interval_steps: list[float] | None = None, schedule: str = "constant", schedule_clamp: float = 1.0,
                 rescale: float = 0.0):
        if channels is not None and channels < 1:
            raise ValueError(f"cfg channels must be a positive channel count or None (all), got {channels}")
        if interval is not None and not (len(interval) == 2 and 0 <= interval[0] < interval[1]):
            raise ValueError(f"guidance.interval=[sigma_lo, sigma_hi] needs 0 <= sigma_lo < sigma_hi, got {interval}")
        if interval_steps is not None and not (len(interval_steps) == 2
                                               and 0 <= interval_steps[0] < interval_steps[1] <= 1):
            raise ValueError(f"guidance.interval_steps=[start, stop] needs 0 <= start < stop <= 1 (fractions of the "
                             f"steps), got {interval_steps}")
        if schedule not in SCHEDULES:
            raise ValueError(f"guidance.schedule={schedule!r}; expected one of {', '.join(SCHEDULES)}")
        if not 0 <= rescale <= 1:
            raise ValueError(f"guidance.rescale (phi) must be in [0, 1], got {rescale}")
        self.scale = float(scale)
        self.channels = channels
        self.interval = None if interval is None else tuple(float(s) for s in interval)
        self.interval_steps = None if interval_steps is None else tuple(float(s) for s in interval_steps)
        self.schedule, self.schedule_clamp, self.rescale = schedule, float(schedule_clamp), float(rescale)
        self.sigmas = None

    @property
    def w(self) -> float:
        """Ho & Salimans' guidance strength w = scale - 1."""
        return self.scale - 1

    def check(self, denoiser, solver=None) -> None:
        if getattr(denoiser, "null_label", None) is None:
            raise ValueError(
                f"guidance={self.name} needs a conditional backbone with a null label; {type(denoiser).__name__} has "
                "none (use guidance=classifier for an unconditional model)"
            )
        if self.channels is not None and self.channels > denoiser.img_channels:
            raise ValueError(f"cfg channels={self.channels} exceeds the backbone's {denoiser.img_channels} channels")

    def begin(self, denoiser, sigmas, labels, rng=None) -> None:
        self.sigmas = sigmas

    def in_window(self, step: int | None) -> bool:
        """Whether step `step` is guided by the interval keys (always without a step or a schedule)."""
        if step is None or self.sigmas is None:
            return True
        n = len(self.sigmas) - 1
        sigma = float(self.sigmas[step])
        if self.interval is not None and not self.interval[0] < sigma <= self.interval[1]:
            return False
        return self.interval_steps is None or int(self.interval_steps[0] * n) <= step < int(self.interval_steps[1] * n)

    def step_scale(self, step: int | None) -> float:
        """The scale at step `step` of the schedule given to `begin` (1 = unguided); `scale` without a step."""
        if step is None or self.sigmas is None:
            return self.scale
        if not self.in_window(step):
            return 1.0
        p = (step + 1) / (len(self.sigmas) - 1)
        w = self.scale - 1
        if self.schedule == "linear":
            w = 2 * p * w
        elif self.schedule == "cosine":
            w = (1 - math.cos(math.pi * p)) * w
        elif self.schedule == "clamp_linear":
            w = max(self.schedule_clamp, 2 * p * w)
        return 1 + w

    def predictions(self, denoiser, x, sigma, labels) -> tuple[Denoised, torch.Tensor]:
        """(conditional prediction, the x0 it is pushed away from): here D(x; y) and D(x; null), one forward."""
        null = torch.full_like(labels, denoiser.null_label)
        out = denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([labels, null]))
        cond, uncond = out.x0.chunk(2)
        return Denoised(cond, None if out.var_frac is None else out.var_frac.chunk(2)[0]), uncond

    def combine(self, cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
        """The guided x0 from the two predictions: uncond + scale (cond - uncond)."""
        return uncond + scale * (cond - uncond)

    def __call__(self, denoiser, x, sigma, labels, mean_form: bool = False, step: int | None = None) -> Denoised:
        scale = self.step_scale(step)
        if scale == 1:
            return denoiser(x, sigma, labels)
        cond, uncond = self.predictions(denoiser, x, sigma, labels)
        guided = self.combine(cond.x0, uncond, scale)
        if self.rescale > 0:
            guided = rescale_guided(guided, cond.x0, self.rescale)
        if self.channels is not None:
            guided = torch.cat([guided[:, : self.channels], cond.x0[:, self.channels:]], dim=1)
        return cond._replace(x0=guided)

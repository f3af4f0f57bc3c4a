"""Noise schedules: descending sigma tensors ending in 0 (float64), computed from a denoiser.

Any solver in `guidebench.samplers` walks any of these.
"""

from __future__ import annotations

import torch


def sigmas_karras(denoiser, num_steps: int = 18, sigma_min: float | None = None,
                  sigma_max: float | None = None, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. 2022, eq. 5: sigma_i = (s_max^(1/rho) + i/(N-1) (s_min^(1/rho) - s_max^(1/rho)))^rho.

    sigma_min / sigma_max default to the denoiser's range; every level is passed through
    `denoiser.round_sigma` (EDM's generate.py), then a trailing 0 is appended.
    """
    lo = max(sigma_min if sigma_min is not None else denoiser.sigma_min, denoiser.sigma_min)
    hi = min(sigma_max if sigma_max is not None else denoiser.sigma_max, denoiser.sigma_max)
    i = torch.arange(num_steps, dtype=torch.float64)
    sigmas = (hi ** (1 / rho) + i / max(num_steps - 1, 1) * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
    sigmas = torch.as_tensor(denoiser.round_sigma(sigmas), dtype=torch.float64).cpu()
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def space_timesteps(num_timesteps: int, section_counts: str | int | list[int]) -> list[int]:
    """ADM's timestep respacing (guided-diffusion respace.py, Nichol & Dhariwal 2021 sec. 4).

    "250" or [250]: 250 steps spread evenly (integer stride within sections);
    "10,15,20": three equal sections with 10, 15 and 20 steps;
    "ddim25": the stride-based DDIM spacing (range(0, T, T // 25)).
    Returns the kept original timesteps in ascending order.
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = int(section_counts[len("ddim"):])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return list(range(0, num_timesteps, stride))
            raise ValueError(f"cannot create exactly {desired} steps with an integer stride from {num_timesteps}")
        section_counts = [int(x) for x in section_counts.split(",")]
    elif isinstance(section_counts, int):
        section_counts = [section_counts]
    size_per, extra = divmod(num_timesteps, len(section_counts))
    start, kept = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot divide a section of {size} steps into {count}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            kept.append(start + round(cur))
            cur += stride
        start += size
    return sorted(set(kept))


def sigmas_respaced(denoiser, respacing: str | int | list[int] = "250") -> torch.Tensor:
    """The sigma levels of ADM's respaced discrete diffusion, descending, with a trailing 0.

    Needs a discrete-time denoiser (`denoiser.sigmas`: sigma of each of its T training steps).
    Walking these levels with `sample_ddpm` / `sample_ddim` is ADM's SpacedDiffusion: the respaced
    betas 1 - abar_i / abar_{i-1} follow from the kept abar = 1 / (1 + sigma^2).
    """
    if not hasattr(denoiser, "sigmas"):
        raise TypeError(f"{type(denoiser).__name__} is not a discrete-time denoiser; use sigmas_karras")
    kept = space_timesteps(len(denoiser.sigmas), respacing)
    sigmas = denoiser.sigmas.detach().to(torch.float64).cpu()[kept].flip(0)
    return torch.cat([sigmas, sigmas.new_zeros(1)])

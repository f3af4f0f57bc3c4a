"""CADS, condition-annealed sampling (Sadat et al. 2024, "CADS: Unleashing the Diversity of Diffusion Models
through Condition-Annealed Sampling", ICLR)."""

from __future__ import annotations

import contextlib

import torch

from guidebench.guidance.cfg import ClassifierFreeGuidance

# Where each backbone adds its class embedding to the time embedding: ADM `label_emb`, digits `label_embed`,
# DiT `y_embedder.embedding_table` (nn.Embedding of labels, the null label as the last row), EDM `map_label`
# (nn.Linear of a one-hot vector; an all-zero row is unconditional).
CLASS_EMBEDDINGS = ("label_emb", "label_embed", "y_embedder.embedding_table", "map_label")


def class_embedding(denoiser) -> torch.nn.Module:
    """The module of `denoiser` whose output is the class-embedding vector y that CADS anneals."""
    modules = dict(denoiser.named_modules()) if hasattr(denoiser, "named_modules") else {}
    found = [m for name, m in modules.items() for key in CLASS_EMBEDDINGS if name == key or name.endswith("." + key)]
    if not found or getattr(denoiser, "num_classes", 0) == 0:
        raise ValueError(f"guidance=cads anneals a class embedding; {type(denoiser).__name__} has none (a conditional "
                         f"backbone with one of the modules {', '.join(CLASS_EMBEDDINGS)} is needed)")
    return found[0]


def conditional_rows(labels: torch.Tensor, null_label: int | None) -> torch.Tensor:
    """[B] bool: the rows of a class-embedding input that carry a class (labels, or EDM's one-hot vectors)."""
    if labels.ndim > 1:
        return labels.reshape(len(labels), -1).ne(0).any(-1)
    return labels.ne(null_label) if null_label is not None else torch.ones_like(labels, dtype=torch.bool)


def anneal_condition(y: torch.Tensor, noise: torch.Tensor, gamma: float, noise_scale: float, psi: float) -> torch.Tensor:
    """Sadat et al. 2024, eqs. 3 and 5, on condition vectors y [B, D]:

        y_hat = sqrt(gamma) y + s sqrt(1 - gamma) n,                        n ~ N(0, I)
        y_rescaled = (y_hat - mean(y_hat)) / std(y_hat) std(y) + mean(y),   (per vector, over D)
        y_final = psi y_rescaled + (1 - psi) y_hat.
    """
    y_hat = gamma**0.5 * y + noise_scale * (1 - gamma) ** 0.5 * noise
    rescaled = (y_hat - y_hat.mean(-1, keepdim=True)) / y_hat.std(-1, keepdim=True) * y.std(-1, keepdim=True) \
        + y.mean(-1, keepdim=True)
    return psi * rescaled + (1 - psi) * y_hat


class CADS(ClassifierFreeGuidance):
    """Condition annealing around CFG (or the conditional model alone, scale = 1).

    At step i of N the class embedding y of every conditional evaluation is replaced by `anneal_condition`'s
    y_final with (Sadat et al. 2024, eq. 4)
        gamma(t) = 1 for t <= tau1,  (tau2 - t) / (tau2 - tau1) for tau1 < t < tau2,  0 for t >= tau2,
    t = 1 - i / N the normalised time of the step (1 = pure noise; on ADM's respaced DDPM grid t_i / T). The
    unconditional (null-label) rows of CFG's batched forward keep their embedding. n is drawn per sample and per
    evaluation from the solver's per-sample generators (`begin`'s rng). The CFG keys (interval, schedule,
    rescale, channels) compose.
    """

    name = "cads"

    def __init__(self, scale: float = 1.0, tau1: float = 0.6, tau2: float = 0.9, noise_scale: float = 0.25,
                 psi: float = 1.0, **cfg_keys):
        if not 0 <= tau1 < tau2 <= 1:
            raise ValueError(f"guidance.tau1 and tau2 need 0 <= tau1 < tau2 <= 1, got tau1={tau1}, tau2={tau2}")
        if not 0 <= psi <= 1:
            raise ValueError(f"guidance.psi (the rescale mix) must be in [0, 1], got {psi}")
        super().__init__(scale, **cfg_keys)
        self.tau1, self.tau2, self.noise_scale, self.psi = float(tau1), float(tau2), float(noise_scale), float(psi)
        self.rng = self.embedding = None

    def check(self, denoiser, solver=None) -> None:
        class_embedding(denoiser)
        if self.scale != 1:
            super().check(denoiser, solver)

    def begin(self, denoiser, sigmas, labels, rng=None) -> None:
        super().begin(denoiser, sigmas, labels, rng)
        self.rng, self.embedding = rng, class_embedding(denoiser)

    def gamma(self, step: int | None) -> float:
        """gamma(t) of eq. 4 at step `step` of the schedule given to `begin` (1, no annealing, without a step)."""
        if step is None or self.sigmas is None:
            return 1.0
        t = 1 - step / (len(self.sigmas) - 1)
        if t <= self.tau1:
            return 1.0
        return 0.0 if t >= self.tau2 else (self.tau2 - t) / (self.tau2 - self.tau1)

    @contextlib.contextmanager
    def annealed(self, denoiser, gamma: float):
        """Inside, the class embedding of every conditional row of a forward is annealed with `gamma`."""
        null = getattr(denoiser, "null_label", None)

        def hook(module, args, y):
            cond = conditional_rows(args[0], null)
            if self.rng is None or int(cond.sum()) != len(self.rng):
                raise RuntimeError("guidance=cads needs one conditional row per sample in each forward and the solver's "
                                   "rng (begin(..., rng=rng))")
            noise = self.rng.randn([len(self.rng), y.shape[-1]], dtype=torch.float32).to(y.device, y.dtype)
            y = y.clone()
            y[cond] = anneal_condition(y[cond], noise, gamma, self.noise_scale, self.psi).to(y.dtype)
            return y

        module = self.embedding if self.embedding is not None else class_embedding(denoiser)
        handle = module.register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    def __call__(self, denoiser, x, sigma, labels, mean_form: bool = False, step: int | None = None):
        gamma = self.gamma(step)
        if gamma == 1:
            return super().__call__(denoiser, x, sigma, labels, mean_form, step)
        with self.annealed(denoiser, gamma):
            return super().__call__(denoiser, x, sigma, labels, mean_form, step)

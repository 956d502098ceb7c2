"""The official text-to-3D sampler: SD's DDPM discretisation, the eps denoiser, CFG, Euler and DPM-Solver++(2M).

Convention (sgm / EDM): x = data + sigma * noise, sigma falls from sigma_max to 0; the network sees the
DDPM sample x / sqrt(sigma^2 + 1) and the DDPM index of sigma, and predicts eps. Plain functions over
tensors, like `ln3diff_rt.sampling`; the numerics follow `../shared/official-ln3diff/README.md`
("The discretisation, step by step") so that the official 10-step trajectory is reproduced.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ln3diff_rt.sampling import Condition

# eps_model(x_in, idx [B] int64, context, pooled) -> eps like x_in
EpsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

SAMPLERS = ("euler", "dpmpp_2m")
GUIDANCE = 6.5  # the official text-to-3D guidance scale
STEPS = 250  # the research code's step count (deterministic Euler)


@dataclass(frozen=True)
class DDPMSchedule:
    """The 1000-step SD schedule: float64 betas and alphas_cumprod, float32 sigma of each DDPM index."""

    betas: torch.Tensor  # [T] float64
    alphas_cumprod: torch.Tensor  # [T] float64
    sigmas: torch.Tensor  # [T] float32, ascending: sigma of index i

    @property
    def num_timesteps(self) -> int:
        return self.betas.shape[0]


def ddpm_schedule(num_timesteps: int = 1000, linear_start: float = 0.00085,
                  linear_end: float = 0.012) -> DDPMSchedule:
    """betas = linspace(sqrt(start), sqrt(end))^2 in float64, alphas_cumprod = cumprod(1 - betas)."""
    betas = torch.linspace(linear_start ** 0.5, linear_end ** 0.5, num_timesteps, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    return DDPMSchedule(betas, alphas_cumprod, sigmas_of(alphas_cumprod))


def sigmas_of(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """sigma = sqrt((1 - a) / a): the ratio in float64, cast to float32, the root in float32 (as the official code)."""
    return (((1.0 - alphas_cumprod) / alphas_cumprod).float()) ** 0.5


def ddpm_timesteps(steps: int, num_timesteps: int = 1000) -> torch.Tensor:
    """DDPM indices [steps] visited by an N-step run, descending: floor(linspace(T-1, 0, N, endpoint=False))."""
    if not 0 < steps <= num_timesteps:
        raise ValueError(f"steps must be in 1..{num_timesteps}, got {steps}")
    if steps == num_timesteps:
        return torch.arange(num_timesteps - 1, -1, -1)
    step = -(num_timesteps - 1) / steps  # numpy's linspace: k * step + start, in float64
    return torch.floor(torch.arange(steps, dtype=torch.float64) * step + (num_timesteps - 1)).long()


def ddpm_sigmas(schedule: DDPMSchedule, steps: int) -> torch.Tensor:
    """The sigmas [steps + 1] an N-step run visits: descending, then 0."""
    timesteps = ddpm_timesteps(steps, schedule.num_timesteps)
    return torch.cat([sigmas_of(schedule.alphas_cumprod[timesteps]), torch.zeros(1)])


def snap_sigma(schedule: DDPMSchedule, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sigma [B] -> (nearest DDPM sigma [B], its index [B] int64); the network only knows the 1000 indices."""
    table = schedule.sigmas.to(sigma.device)
    idx = (sigma[None] - table[:, None]).abs().argmin(dim=0)
    return table[idx], idx


def denoise(eps_model: EpsFn, schedule: DDPMSchedule, x: torch.Tensor, sigma: torch.Tensor,
            context: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """D(x, sigma) = x - sigma * eps(x / sqrt(sigma^2 + 1), idx): the x0 estimate, sigma [B] snapped first."""
    sigma, idx = snap_sigma(schedule, sigma)
    s = sigma.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
    c_in = 1 / (s ** 2 + 1.0) ** 0.5
    return x - s * eps_model(x * c_in, idx, context, pooled)


def zero_condition(cond: Condition) -> Condition:
    """The official unconditional input: all-zero tokens and vector (not the embedding of an empty prompt)."""
    return Condition(torch.zeros_like(cond.context), torch.zeros_like(cond.pooled))


def guided_denoise(eps_model: EpsFn, schedule: DDPMSchedule, x: torch.Tensor, sigma: torch.Tensor,
                   cond: Condition, uncond: Condition | None, guidance: float) -> torch.Tensor:
    """CFG on the x0 estimates, D_u + g (D_c - D_u), one forward over the batch [uncond; cond] (official order)."""
    s = sigma.expand(x.shape[0])
    if uncond is None or guidance == 1.0:
        return denoise(eps_model, schedule, x, s, cond.context, cond.pooled)
    d = denoise(eps_model, schedule, torch.cat([x, x]), torch.cat([s, s]),
                torch.cat([uncond.context, cond.context]), torch.cat([uncond.pooled, cond.pooled]))
    d_uncond, d_cond = d.chunk(2)
    return d_uncond + guidance * (d_cond - d_uncond)


def euler_step(x: torch.Tensor, denoised: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    """x + (sigma_next - sigma) (x - D) / sigma: one step of the probability-flow ODE dx/dsigma = (x - D) / sigma."""
    return x + (sigma_next - sigma) * ((x - denoised) / sigma)


def dpmpp_2m_step(x: torch.Tensor, denoised: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor,
                  previous: tuple[torch.Tensor, float] | None) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2) with alpha = 1, lambda = -log sigma.

    x_next = (sigma_next / sigma) x - expm1(-h) D', h = lambda_next - lambda, where D' = D (first order:
    first step, or the step to sigma = 0) or (1 + 1/2r) D - 1/2r D_prev with r = h_prev / h.
    `previous` is (D_prev, sigma_prev), the last step's estimate and the sigma it was made at.
    """
    s, s_next = float(sigma), float(sigma_next)
    if s_next == 0.0:
        return denoised
    h = math.log(s) - math.log(s_next)
    d = denoised
    if previous is not None:
        d_prev, s_prev = previous
        r = (math.log(s_prev) - math.log(s)) / h
        d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * d_prev
    return (s_next / s) * x - math.expm1(-h) * d


@torch.no_grad()
def sample_ddpm(eps_model: EpsFn, noise: torch.Tensor, cond: Condition, uncond: Condition | None = None,
                steps: int = STEPS, guidance: float = GUIDANCE, method: str = "euler",
                schedule: DDPMSchedule | None = None,
                callback: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Deterministic sampling from `noise` (standard normal) to a latent in diffusion space.

    `uncond` None means the official all-zero input; guidance 1 skips it. "euler" is the official
    sampler (250 steps); "dpmpp_2m" reaches it in ~25. `callback(step, steps)` runs after each step.
    """
    if method not in SAMPLERS:
        raise ValueError(f"DDPM sampler must be one of {SAMPLERS}, got {method!r}")
    schedule = schedule or ddpm_schedule()
    uncond = zero_condition(cond) if uncond is None else uncond
    sigmas = ddpm_sigmas(schedule, steps).to(noise.device)
    x = noise * torch.sqrt(1.0 + sigmas[0] ** 2.0)
    previous = None
    for i in range(steps):
        denoised = guided_denoise(eps_model, schedule, x, sigmas[i], cond, uncond, guidance)
        if method == "euler":
            x = euler_step(x, denoised, sigmas[i], sigmas[i + 1])
        else:
            x = dpmpp_2m_step(x, denoised, sigmas[i], sigmas[i + 1], previous)
            previous = (denoised, float(sigmas[i]))
        if callback is not None:
            callback(i + 1, steps)
    return x

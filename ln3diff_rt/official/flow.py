"""The official image-to-3D sampler: its time convention adapted onto the project's flow samplers.

Official convention: x_s = s * data + (1 - s) * noise, s = 0 is noise, s = 1 is data, the model
predicts data - noise = dx/ds. The project's (`ln3diff_rt.sampling`): t = 1 - s, v = noise - data.
So the official field is the project's after t -> 1 - t, v -> -v, and the project's fixed-step
Euler/Heun, CFG (batch [cond; uncond], as the official code) and callback serve it unchanged.
The research code integrates with an adaptive dopri5; fixed steps stand in for it (no torchdiffeq).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ln3diff_rt.official.ddpm import zero_condition
from ln3diff_rt.sampling import Condition, VelocityFn, sample

GUIDANCE = 4.0  # the official image-to-3D guidance scale


def project_velocity(model: VelocityFn) -> VelocityFn:
    """The official velocity field (s = 1 - t, predicts data - noise) in the project's convention."""
    def velocity(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        return -model(x, 1.0 - t, context, pooled)
    return velocity


def sample_flow(model: VelocityFn, noise: torch.Tensor, cond: Condition, uncond: Condition | None = None,
                steps: int = 25, guidance: float = GUIDANCE, method: str = "heun", shift: float = 1.0,
                callback: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Integrate the official model's flow from `noise` (s = 0) to data (s = 1); deterministic.

    `uncond` None means the official all-zero input; guidance 1 skips it. Heun costs two model calls
    per step except the last. `callback(step, steps)` runs after each step.
    """
    uncond = zero_condition(cond) if uncond is None else uncond
    return sample(project_velocity(model), noise, cond, uncond, steps=steps, guidance=guidance, shift=shift,
                  method=method, callback=callback)

"""Flow matching: the training loss and few-step ODE samplers (plain functions, as in FLUX).

Convention: z_t = (1 - t) z0 + t eps, t = 1 is noise, t = 0 is data; the model predicts
v = eps - z0 = dz/dt, and sampling integrates from t = 1 down to t = 0.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

# model(x, t, context, pooled[, image]) -> velocity like x
VelocityFn = Callable[..., torch.Tensor]


@dataclass
class Condition:
    """Tokens [B, L, Dc] for cross-attention, a pooled vector [B, Dc] for AdaLN, and optionally image tokens
    [B, M, Di] (models with image conditioning take them as a fifth denoiser argument)."""

    context: torch.Tensor
    pooled: torch.Tensor
    image: torch.Tensor | None = None

    def args(self) -> tuple[torch.Tensor, ...]:
        """The denoiser's condition arguments: (context, pooled) or (context, pooled, image)."""
        return (self.context, self.pooled) if self.image is None else (self.context, self.pooled, self.image)

    def expand(self, batch: int) -> Condition:
        image = None if self.image is None else self.image.expand(batch, -1, -1)
        return Condition(self.context.expand(batch, -1, -1), self.pooled.expand(batch, -1), image)

    @staticmethod
    def cat(conds: list[Condition]) -> Condition:
        """Conditions stacked along the batch (every one with or every one without image tokens)."""
        images = [c.image for c in conds]
        return Condition(torch.cat([c.context for c in conds]), torch.cat([c.pooled for c in conds]),
                         None if images[0] is None else torch.cat(images))


def time_grid(steps: int, shift: float = 1.0, device=None) -> torch.Tensor:
    """steps + 1 times from 1 to 0; shift > 1 spends more steps near the noise end (SD3 / FLUX)."""
    if steps <= 0:
        raise ValueError(f"steps must be positive, got {steps}")
    t = torch.linspace(1.0, 0.0, steps + 1, device=device)
    return shift * t / (1.0 + (shift - 1.0) * t)


def guided_velocity(model: VelocityFn, x: torch.Tensor, t: torch.Tensor, cond: Condition,
                    uncond: Condition | None, guidance: float) -> torch.Tensor:
    """Classifier-free guidance v_u + g (v_c - v_u), with both branches in one batched forward."""
    tt = t.expand(x.shape[0]).to(x.dtype)
    if uncond is None or guidance == 1.0:
        return model(x, tt, *cond.args())
    v = model(torch.cat([x, x]), torch.cat([tt, tt]), *Condition.cat([cond, uncond]).args())
    v_cond, v_uncond = v.chunk(2)
    return v_uncond + guidance * (v_cond - v_uncond)


@torch.no_grad()
def sample(model: VelocityFn, noise: torch.Tensor, cond: Condition, uncond: Condition | None = None,
           steps: int = 8, guidance: float = 1.0, shift: float = 1.0, method: str = "euler",
           callback: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Integrate the flow ODE from `noise` (t = 1) to data (t = 0); deterministic given the noise.

    Heun costs two model calls per step (one on the last step) for second-order accuracy.
    `callback(step, steps)` is called after each step (progress reporting, cancellation).
    """
    if method not in ("euler", "heun"):
        raise ValueError(f"sampler must be 'euler' or 'heun', got {method!r}")
    ts = time_grid(steps, shift, device=noise.device)
    x = noise
    for i in range(steps):
        t, t_next = ts[i], ts[i + 1]
        v = guided_velocity(model, x, t, cond, uncond, guidance)
        x_next = x + (t_next - t) * v
        if method == "heun" and t_next > 0:
            v_next = guided_velocity(model, x_next, t_next, cond, uncond, guidance)
            x_next = x + (t_next - t) * 0.5 * (v + v_next)
        x = x_next
        if callback is not None:
            callback(i + 1, steps)
    return x


def logit_normal_t(batch: int, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Training times t = sigmoid(N(0, 1)): most weight on the middle of the path (SD3's logit-normal, m = 0, s = 1)."""
    return torch.sigmoid(torch.randn(batch, device=device, generator=generator))


def flow_matching_loss(model: VelocityFn, z0: torch.Tensor, cond: Condition,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """MSE between the predicted and the true velocity eps - z0 at logit-normal t."""
    t = logit_normal_t(z0.shape[0], device=z0.device, generator=generator).to(z0.dtype)
    eps = torch.randn(z0.shape, device=z0.device, dtype=z0.dtype, generator=generator)
    tb = t.view(-1, *([1] * (z0.dim() - 1)))
    z_t = (1.0 - tb) * z0 + tb * eps
    v = model(z_t, t, *cond.args())
    return (v - (eps - z0)).square().mean()

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


def bind(model: VelocityFn, cond: Condition) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """model(x, t, *cond.args()) as (x, t) -> v. A model whose class has `bind_condition` (the DiT) computes the
    part that depends on the condition alone once, not at every step. Looked up on the class: a compiled module
    or engine wrapping the DiT runs its own graph, whatever attributes it forwards."""
    binder = getattr(type(model), "bind_condition", None)
    if binder is not None:
        return binder(model, *cond.args())
    args = cond.args()
    return lambda x, t: model(x, t, *args)


def guided(model: VelocityFn, cond: Condition, uncond: Condition | None, scale: float
           ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """(x, t) -> classifier-free guided velocity v_u + scale (v_c - v_u), both branches in one batched forward;
    the conditions are fixed here, once per sampling run."""
    if uncond is None or scale == 1.0:
        plain = bind(model, cond)
        return lambda x, t: plain(x, t.expand(x.shape[0]).to(x.dtype))
    both = bind(model, Condition.cat([cond, uncond]))

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        tt = t.expand(x.shape[0]).to(x.dtype)
        v_cond, v_uncond = both(torch.cat([x, x]), torch.cat([tt, tt])).chunk(2)
        return v_uncond + scale * (v_cond - v_uncond)

    return velocity


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
    velocity = guided(model, cond, uncond, guidance)
    x = noise
    for i in range(steps):
        t, t_next = ts[i], ts[i + 1]
        v = velocity(x, t)
        x_next = x + (t_next - t) * v
        if method == "heun" and t_next > 0:
            v_next = velocity(x_next, t_next)
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

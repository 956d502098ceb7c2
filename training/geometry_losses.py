"""The VAE's losses on the data's channels beyond colour: rendered opacity, depth, surface normals and albedo.

Each is a masked mean over rays with a per-ray weight, so a ray without the channel (its object has no
depth files, or it misses the object) contributes nothing, and a batch without any gives 0. Depth and
normals are compared where the object is (target alpha) and where the model renders a surface (its
opacity, detached): `RenderOutput.depth` is the expected distance given a hit, composited depth divided
by opacity, so its gradient grows as 1 / opacity on a ray the model leaves empty; weighting by the
detached opacity cancels that, and the mask loss is what fills such a ray.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ln3diff_rt.rendering import FieldFn


def masked_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum(w * v) / sum(w) over rays [B, N]; 0 (and no gradient) where every weight is 0."""
    return (weights * values).sum() / weights.sum().clamp(min=1e-6)


def mask_loss(opacity: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """L1 between rendered opacity and the target alpha [B, N], over every ray (the mask is always known)."""
    return (opacity - alpha).abs().mean()


def depth_loss(depth: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """|rendered - target| distance along the ray [B, N] (both `RenderOutput.depth`'s convention), weighted."""
    return masked_mean((depth - target).abs(), weights)


def field_gradient(scalar, planes: torch.Tensor, points: torch.Tensor, step: float) -> torch.Tensor:
    """The gradient [B, N, 3] of a scalar field `scalar(planes, points) -> [B, N]` at points [B, N, 3], by central
    differences `step` apart.

    Differences rather than autograd w.r.t. the points: that needs a double backward through the tri-plane
    sampler, which the Triton kernel does not have, and 6 field queries per point cost the same everywhere.
    """
    b, n, _ = points.shape
    offsets = step * torch.cat([torch.eye(3), -torch.eye(3)]).to(points)  # [6, 3]: +x, +y, +z, -x, -y, -z
    probes = (points[:, :, None] + offsets).clamp(-1.0, 1.0)  # [B, N, 6, 3]
    values = scalar(planes, probes.reshape(b, n * 6, 3)).reshape(b, n, 2, 3)
    return (values[:, :, 0] - values[:, :, 1]) / (2.0 * step)


def field_normals(field: FieldFn, planes: torch.Tensor, points: torch.Tensor, step: float) -> torch.Tensor:
    """Unit outward normals [B, N, 3] of the field at points [B, N, 3]: the negative density gradient by
    central differences `step` apart (`field_gradient`), normalised (0 where the field is flat)."""
    gradient = field_gradient(lambda planes, p: field(planes, p)[0], planes, points, step)
    return F.normalize(-gradient, dim=-1, eps=1e-12)


def eikonal_loss(gradient: torch.Tensor) -> torch.Tensor:
    """(|grad s| - 1)^2 averaged over points [B, N, 3]: keeps an SDF field a distance (IGR, VolSDF), so its zero
    level is where the surface is and its Laplace scale beta means a width in box units."""
    return (gradient.norm(dim=-1) - 1.0).square().mean()


def normal_loss(normals: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """1 - cos between predicted and target unit normals [B, N, 3], weighted per ray [B, N]."""
    return masked_mean(1.0 - (normals * target).sum(-1), weights)


def albedo_loss(albedo: torch.Tensor, target: torch.Tensor, alpha: torch.Tensor, weights: torch.Tensor
                ) -> torch.Tensor:
    """L1 between the field's base colour [B, N, 3] and the target's, which is over white [B, N, 3]: the prediction
    is composited over white with the target alpha [B, N] first, so a pixel on the object's edge compares alike."""
    over_white = alpha[..., None] * albedo + (1.0 - alpha[..., None])
    return masked_mean((over_white - target).abs().mean(-1), weights)

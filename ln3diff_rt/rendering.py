"""Volume rendering of a tri-plane field: stratified + importance samples, alpha compositing.

The field (`models.field.TriplaneField` or a published model's) gives density and colour at
points; rays are marched inside the box [-1, 1]^3.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels import composite_rays
from kernels.occupancy import build_occupancy_grid, occupied_box, occupied_samples
from ln3diff_rt.cameras import ray_aabb_intersect, ray_box_intersect
from ln3diff_rt.config import RendererConfig
from ln3diff_rt.conventions import RAY_CHUNK

# planes [B, 3, C, R, R], points [B, N, 3] -> density [B, N], rgb [B, N, 3]
FieldFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class RenderOutput:
    rgb: torch.Tensor  # [B, N, 3], composited over the background
    depth: torch.Tensor  # [B, N], expected distance along the ray given a hit (0 where opacity is 0)
    opacity: torch.Tensor  # [B, N]


def stratified_t(near: torch.Tensor, far: torch.Tensor, count: int, perturb: bool,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """`count` sorted distances per ray in [near, far]: bin centres, or jittered within bins."""
    offsets = torch.arange(count, device=near.device, dtype=near.dtype)
    if perturb:
        u = torch.rand(*near.shape, count, device=near.device, dtype=near.dtype, generator=generator)
    else:
        u = torch.full((*near.shape, count), 0.5, device=near.device, dtype=near.dtype)
    return near[..., None] + (far - near)[..., None] * (offsets + u) / count


def importance_t(bins: torch.Tensor, weights: torch.Tensor, count: int, perturb: bool,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Inverse-CDF samples [..., count] from piecewise-constant `weights` [..., S-1] on `bins` [..., S]."""
    weights = weights + 1e-5  # keeps the CDF strictly increasing on empty rays
    pdf = weights / weights.sum(dim=-1, keepdim=True)
    cdf = torch.cat([torch.zeros_like(pdf[..., :1]), torch.cumsum(pdf, dim=-1)], dim=-1)
    if perturb:
        u = torch.rand(*cdf.shape[:-1], count, device=cdf.device, dtype=cdf.dtype, generator=generator)
    else:
        u = (torch.arange(count, device=cdf.device, dtype=cdf.dtype) + 0.5).expand(*cdf.shape[:-1], count) / count
    idx = torch.searchsorted(cdf.contiguous(), u.contiguous(), right=True)
    lo = (idx - 1).clamp(0, cdf.shape[-1] - 1)
    hi = idx.clamp(0, cdf.shape[-1] - 1)
    cdf_lo, cdf_hi = cdf.gather(-1, lo), cdf.gather(-1, hi)
    bin_lo, bin_hi = bins.gather(-1, lo), bins.gather(-1, hi)
    frac = (u - cdf_lo) / (cdf_hi - cdf_lo).clamp(min=1e-8)
    return bin_lo + frac * (bin_hi - bin_lo)


def _query(field, planes, origins, dirs, t, occupancy=None, bound: float = 1.0):
    """Density [B, N, S] and colour [B, N, S, 3] of the field at samples t [B, N, S] along the rays.

    With an occupancy grid (inference, B = 1) the field is evaluated only at samples in occupied
    cells; the others count as empty space.
    """
    b, n, s = t.shape
    points = origins[..., None, :] + dirs[..., None, :] * t[..., None]  # [B, N, S, 3]
    if occupancy is None:
        density, rgb = field(planes, points.reshape(b, n * s, 3).clamp(-1.0, 1.0))
    else:
        keep = occupied_samples(occupancy, origins, dirs, t, bound).reshape(b, n * s)
        density = torch.zeros(b, n * s, dtype=planes.dtype, device=planes.device)
        rgb = torch.zeros(b, n * s, 3, dtype=planes.dtype, device=planes.device)
        if keep.any():
            d, c = field(planes, points.reshape(b, n * s, 3)[keep][None].clamp(-1.0, 1.0))
            density[keep], rgb[keep] = d[0], c[0]
    return density.reshape(b, n, s), rgb.reshape(b, n, s, 3)


def _composite(density, rgb, t, far):
    """Composite samples t [B, N, S] of the field; deltas end at the ray's exit `far` [B, N]."""
    b, n, s = t.shape
    deltas = torch.cat([t[..., 1:] - t[..., :-1], (far[..., None] - t[..., -1:]).clamp(min=0.0)], dim=-1)
    return composite_rays(density.reshape(b * n, s), rgb.reshape(b * n, s, 3), t.reshape(b * n, s),
                          deltas.reshape(b * n, s))


def render_rays(field: FieldFn, planes: torch.Tensor, origins: torch.Tensor, dirs: torch.Tensor,
                cfg: RendererConfig, perturb: bool = False, generator: torch.Generator | None = None,
                bound: float = 1.0, occupancy: torch.Tensor | None = None) -> RenderOutput:
    """Render rays origins/dirs [B, N, 3] (unit dirs) through tri-planes [B, 3, C, R, R].

    `occupancy` [G, G, G] (from `occupancy_grid`, batch 1 only) skips the field in empty cells,
    marches only the rays that cross the occupied cells' bounding box, and spends their samples
    inside that box rather than across the whole scene box.
    """
    if occupancy is None:
        near, far, _ = ray_box_intersect(origins, dirs, bound)
        return _march(field, planes, origins, dirs, near, far, cfg, perturb, generator)
    if planes.shape[0] != 1:
        raise ValueError(f"occupancy skipping renders one object at a time, got a batch of {planes.shape[0]}")
    n = origins.shape[1]
    background = torch.tensor(cfg.background, dtype=planes.dtype, device=planes.device)
    rgb, depth, opacity = background.expand(1, n, 3).clone(), planes.new_zeros(1, n), planes.new_zeros(1, n)
    box = occupied_box(occupancy, bound)
    if box is None:
        return RenderOutput(rgb, depth, opacity)
    near, far, hit = ray_aabb_intersect(origins, dirs, *box)
    if hit.any():
        hit = hit[0]
        out = _march(field, planes, origins[:, hit], dirs[:, hit], near[:, hit], far[:, hit], cfg, perturb,
                     generator, occupancy, bound)
        rgb[:, hit], depth[:, hit], opacity[:, hit] = out.rgb, out.depth, out.opacity
    return RenderOutput(rgb, depth, opacity)


def _march(field, planes, origins, dirs, near, far, cfg: RendererConfig, perturb, generator, occupancy=None,
           bound: float = 1.0) -> RenderOutput:
    """Stratified + importance samples between near and far [B, N], composited over the background."""
    b, n, _ = origins.shape
    t = stratified_t(near, far, cfg.num_samples, perturb, generator)
    if cfg.num_importance == 0:
        density, rgb = _query(field, planes, origins, dirs, t, occupancy, bound)
    else:
        with torch.no_grad():
            density, rgb = _query(field, planes, origins, dirs, t, occupancy, bound)
            weights = _composite(density, rgb, t, far)[3].reshape(b, n, -1)
            mids = 0.5 * (t[..., 1:] + t[..., :-1])
            bins = torch.cat([near[..., None], mids, far[..., None]], dim=-1)
            extra = importance_t(bins, weights, cfg.num_importance, perturb, generator)
        if torch.is_grad_enabled():  # training: evaluate every sample again so that gradients reach all
            t, _ = torch.sort(torch.cat([t, extra], dim=-1), dim=-1)
            density, rgb = _query(field, planes, origins, dirs, t, occupancy, bound)
        else:  # inference: reuse the coarse samples' values, a third fewer field queries
            extra_density, extra_rgb = _query(field, planes, origins, dirs, extra, occupancy, bound)
            t, order = torch.sort(torch.cat([t, extra], dim=-1), dim=-1)
            density = torch.cat([density, extra_density], dim=-1).gather(-1, order)
            rgb = torch.cat([rgb, extra_rgb], dim=-2).gather(-2, order[..., None].expand(-1, -1, -1, 3))
    rgb, depth, opacity, _ = _composite(density, rgb, t, far)
    background = torch.tensor(cfg.background, dtype=rgb.dtype, device=rgb.device)
    rgb = rgb + (1.0 - opacity[..., None]) * background
    depth = depth / opacity.clamp(min=1e-6)
    return RenderOutput(rgb.reshape(b, n, 3), depth.reshape(b, n), opacity.reshape(b, n))


def render_chunked(field: FieldFn, planes: torch.Tensor, origins: torch.Tensor, dirs: torch.Tensor,
                   cfg: RendererConfig, chunk: int = RAY_CHUNK, occupancy: torch.Tensor | None = None,
                   on_chunk: Callable[[], None] | None = None) -> RenderOutput:
    """Inference rendering of many rays [B, N, 3] in chunks to bound memory. `on_chunk()` runs before each chunk
    and may raise to stop (a 512 px frame is 64 chunks: cancellation need not wait for the frame)."""
    parts = []
    for i in range(0, origins.shape[1], chunk):
        if on_chunk is not None:
            on_chunk()
        parts.append(render_rays(field, planes, origins[:, i:i + chunk], dirs[:, i:i + chunk], cfg,
                                 occupancy=occupancy))
    return RenderOutput(*(torch.cat([getattr(p, k) for p in parts], dim=1) for k in ("rgb", "depth", "opacity")))


@torch.no_grad()
def occupancy_grid(field, planes: torch.Tensor, resolution: int = 32, min_density: float = 0.5) -> torch.Tensor:
    """Cells [G, G, G] that may hold visible density for one tri-plane [1, 3, C, R, R], dilated by one cell.

    Density is sampled at cell centres; the dilation keeps surfaces that cross a cell without
    covering its centre. Below `min_density` a sample adds under 2% opacity at the usual step.
    """
    grid = build_occupancy_grid(lambda p: field(planes, p[None])[0][0], resolution, min_density,
                                device=planes.device)
    return F.max_pool3d(grid[None, None].float(), 3, stride=1, padding=1)[0, 0] > 0

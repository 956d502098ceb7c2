"""The official importance renderer, re-implemented for parity tests only (previews use `ln3diff_rt.rendering`).

It proves that the field and box conventions in `field.py` are the official ones, with every quirk kept
(README "Rays" .. "Importance samples"): rays from the official camera vector, slab near/far on the
+-0.45 box where missing rays take the min and max of the hitting rays' NEAR values, 64 stratified
samples, samples outside the box forced empty, compositing at segment mid-points with softplus(sigma - 1),
then 64 importance samples from the smoothed coarse weights, merged and composited again. All in official
world units; the uniforms can be injected to make the render deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ln3diff_rt.official.field import BOX_HALF, OfficialTriplaneField, points_from_official

EMPTY_SIGMA = -3.4028235e38 / 3  # official raw sigma of samples outside the box (a third of -FLT_MAX)


@dataclass
class OfficialRender:
    rgb: torch.Tensor  # [B, 3, R, R] in [-1, 1], over a white background
    depth: torch.Tensor  # [B, 1, R, R], sum of weight x depth (not normalised), clamped to the batch's depths
    alpha: torch.Tensor  # [B, 1, R, R], accumulated weight
    depths_coarse: torch.Tensor  # [B, M, 64]
    depths_fine: torch.Tensor  # [B, M, 64]
    weights_coarse: torch.Tensor  # [B, M, 63]
    weights_final: torch.Tensor  # [B, M, 127]


def official_rays(c: torch.Tensor, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Camera vector c [B, 25] (OpenCV cam2world 4x4 + K 3x3 normalised to [0, 1] images, row-major)
    -> origins, unit directions [B, R * R, 3], ray m = row * R + col."""
    b = c.shape[0]
    cam2world = c[:, :16].view(b, 4, 4)
    k = c[:, 16:25].view(b, 3, 3)
    fx, fy, cx, cy, skew = (k[:, 0, 0, None], k[:, 1, 1, None], k[:, 0, 2, None], k[:, 1, 2, None],
                            k[:, 0, 1, None])
    pixels = torch.arange(resolution, dtype=c.dtype, device=c.device)
    rows, cols = torch.meshgrid(pixels, pixels, indexing="ij")
    u = ((cols.flatten() + 0.5) / resolution)[None]  # [1, M], across the width
    v = ((rows.flatten() + 0.5) / resolution)[None]
    y_cam = (v - cy) / fy
    x_cam = (u - cx + cy * skew / fy - skew * v / fy) / fx
    cam_points = torch.stack([x_cam, y_cam, torch.ones_like(x_cam), torch.ones_like(x_cam)], dim=1)  # [B, 4, M]
    world = torch.bmm(cam2world, cam_points).transpose(1, 2)[..., :3]  # [B, M, 3]
    origins = cam2world[:, None, :3, 3].expand_as(world)
    return origins, F.normalize(world - origins, dim=-1)


def box_near_far(origins: torch.Tensor, dirs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Slab entry/exit [B, M] of rays with the box +-0.45; rays that miss get the official fill-in."""
    inv = 1.0 / dirs
    t0, t1 = (-BOX_HALF - origins) * inv, (BOX_HALF - origins) * inv
    near = torch.minimum(t0, t1).amax(dim=-1)
    far = torch.maximum(t0, t1).amin(dim=-1)
    hit = far > near
    if hit.any():  # the official quirk: both come from the hitting rays' near values
        near_hit = near[hit]
        near, far = near.where(hit, near_hit.min()), far.where(hit, near_hit.max())
    return near, far


def _query(field: OfficialTriplaneField, planes: torch.Tensor, origins: torch.Tensor, dirs: torch.Tensor,
           depths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw sigma [B, M, S] and rgb [B, M, S, 3] at depths [B, M, S]; samples outside the box are empty."""
    b, m, s = depths.shape
    xyz = origins[:, :, None] + dirs[:, :, None] * depths[..., None]  # [B, M, S, 3], official world units
    sigma, rgb = field.raw(planes, points_from_official(xyz.reshape(b, m * s, 3)))
    outside = (xyz.abs() > BOX_HALF).any(dim=-1)
    sigma = sigma.reshape(b, m, s).masked_fill(outside, EMPTY_SIGMA)
    return sigma, rgb.reshape(b, m, s, 3).masked_fill(outside[..., None], 0.0)


def _composite(sigma: torch.Tensor, rgb: torch.Tensor, depths: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Samples [B, M, S] -> rgb in [-1, 1] [B, M, 3], depth [B, M], alpha [B, M], weights [B, M, S - 1]."""
    deltas = depths[..., 1:] - depths[..., :-1]
    rgb_mid = (rgb[..., :-1, :] + rgb[..., 1:, :]) / 2
    sigma_mid = (sigma[..., :-1] + sigma[..., 1:]) / 2
    depth_mid = (depths[..., :-1] + depths[..., 1:]) / 2
    alpha = 1 - torch.exp(-F.softplus(sigma_mid - 1) * deltas)
    shifted = torch.cat([torch.ones_like(alpha[..., :1]), 1 - alpha + 1e-10], dim=-1)
    weights = alpha * torch.cumprod(shifted, dim=-1)[..., :-1]
    total = weights.sum(dim=-1)
    color = (weights[..., None] * rgb_mid).sum(dim=-2) + 1 - total[..., None]  # white background
    depth = (weights * depth_mid).sum(dim=-1).clamp(depths.min(), depths.max())
    return color * 2 - 1, depth, total, weights


def _importance_depths(depths: torch.Tensor, weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF depths [B, M, K] from coarse depths [B, M, S] and weights [B, M, S - 1]; u [B * M, K]."""
    b, m, s = depths.shape
    w = F.max_pool1d(weights.reshape(b * m, 1, s - 1), 2, 1, padding=1)  # [BM, 1, S]
    w = F.avg_pool1d(w, 2, 1).reshape(b * m, s - 1) + 0.01
    mids = (0.5 * (depths[..., :-1] + depths[..., 1:])).reshape(b * m, s - 1)  # [BM, S - 1]
    pdf = w[:, 1:-1] + 1e-5  # interior S - 3 weights
    pdf = pdf / pdf.sum(dim=-1, keepdim=True)
    cdf = torch.cat([torch.zeros_like(pdf[:, :1]), torch.cumsum(pdf, dim=-1)], dim=-1)  # [BM, S - 2]
    idx = torch.searchsorted(cdf, u.contiguous(), right=True)
    below = (idx - 1).clamp(min=0)
    above = idx.clamp(max=cdf.shape[-1] - 1)
    cdf_lo, cdf_hi = cdf.gather(1, below), cdf.gather(1, above)
    bin_lo, bin_hi = mids.gather(1, below), mids.gather(1, above)
    denom = cdf_hi - cdf_lo
    denom = torch.where(denom < 1e-5, torch.ones_like(denom), denom)
    return (bin_lo + (u - cdf_lo) / denom * (bin_hi - bin_lo)).reshape(b, m, -1)


def render_official(field: OfficialTriplaneField, planes: torch.Tensor, c: torch.Tensor, resolution: int,
                    u_stratified: torch.Tensor | None = None, u_importance: torch.Tensor | None = None,
                    samples: int = 64, importance: int = 64) -> OfficialRender:
    """Render tri-planes [B, 3, C, R, R] (project layout) from cameras c [B, 25] at resolution x resolution.

    u_stratified [B, M, samples] and u_importance [B * M, importance] are the uniforms the official code
    draws with torch.rand; drawn here from the global generator when not given.
    """
    b = planes.shape[0]
    origins, dirs = official_rays(c, resolution)
    near, far = box_near_far(origins, dirs)
    m = near.shape[1]
    if u_stratified is None:
        u_stratified = torch.rand(b, m, samples, dtype=planes.dtype, device=planes.device)
    if u_importance is None:
        u_importance = torch.rand(b * m, importance, dtype=planes.dtype, device=planes.device)
    steps = torch.arange(samples, dtype=near.dtype, device=near.device) / (samples - 1)
    span = (far - near)[..., None]
    depths_coarse = near[..., None] + steps * span + u_stratified * (span / (samples - 1))  # [B, M, S]
    sigma_c, rgb_c = _query(field, planes, origins, dirs, depths_coarse)
    weights_coarse = _composite(sigma_c, rgb_c, depths_coarse)[3]
    depths_fine = _importance_depths(depths_coarse, weights_coarse, u_importance)
    sigma_f, rgb_f = _query(field, planes, origins, dirs, depths_fine)
    depths, order = torch.sort(torch.cat([depths_coarse, depths_fine], dim=-1), dim=-1)
    sigma = torch.cat([sigma_c, sigma_f], dim=-1).gather(-1, order)
    rgb = torch.cat([rgb_c, rgb_f], dim=-2).gather(-2, order[..., None].expand(-1, -1, -1, 3))
    color, depth, alpha, weights = _composite(sigma, rgb, depths)

    def image(x: torch.Tensor) -> torch.Tensor:  # [B, M, K] -> [B, K, R, R]
        return x.transpose(1, 2).reshape(b, -1, resolution, resolution)

    return OfficialRender(rgb=image(color), depth=image(depth[..., None]), alpha=image(alpha[..., None]),
                          depths_coarse=depths_coarse, depths_fine=depths_fine, weights_coarse=weights_coarse,
                          weights_final=weights)

"""Occupancy grid for empty-space skipping along rays.

Plain torch on purpose: building the grid is one batched field evaluation, and masking samples is
one floor and one gather per sample, already memory-bound in torch; a kernel would not pay.
The grid covers the box [-bound, bound]^3 with G^3 cells indexed [ix, iy, iz] (x first).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ln3diff_rt.conventions import OCCUPANCY_CHUNK


def cell_centres(resolution: int, bound: float = 1.0, device: torch.device | str = "cpu") -> torch.Tensor:
    """Centres [G, G, G, 3] of the grid's cells, indexed [ix, iy, iz]."""
    cell = 2.0 * bound / resolution
    axis = -bound + (torch.arange(resolution, device=device, dtype=torch.float32) + 0.5) * cell
    return torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1)


@torch.no_grad()
def build_occupancy_grid(density_fn: Callable[[torch.Tensor], torch.Tensor], resolution: int,
                         threshold: float, bound: float = 1.0, device: torch.device | str = "cpu",
                         chunk: int = OCCUPANCY_CHUNK) -> torch.Tensor:
    """Boolean grid [G, G, G]: True where density_fn (points [M, 3] -> densities [M]) at the cell
    centre exceeds `threshold`. Evaluated in chunks of `chunk` points to bound memory.

    One sample per cell: structures thinner than a cell that miss every centre are marked empty,
    so pick G at least the field's feature resolution (or a low threshold).
    """
    if resolution < 1:
        raise ValueError(f"resolution {resolution}: expected >= 1")
    points = cell_centres(resolution, bound, device).reshape(-1, 3)
    density = torch.cat([density_fn(points[i:i + chunk]).reshape(-1)
                         for i in range(0, points.shape[0], chunk)])
    return (density > threshold).reshape(resolution, resolution, resolution)


def occupied_samples(grid: torch.Tensor, origins: torch.Tensor, dirs: torch.Tensor, t_vals: torch.Tensor,
                     bound: float = 1.0) -> torch.Tensor:
    """Mask [..., S]: True for samples origins + t dirs (origins/dirs [..., 3], t_vals [..., S]) that lie
    in an occupied cell of `grid` [G, G, G]; samples outside the closed box are False.

    Multiply the densities by this mask (or skip the masked samples) before compositing.
    """
    g = grid.shape[0]
    points = origins[..., None, :] + dirs[..., None, :] * t_vals[..., None]  # [..., S, 3]
    inside = ((points >= -bound) & (points <= bound)).all(dim=-1)
    # The clamp puts points on the far faces into the last cell.
    idx = ((points + bound) * (g / (2.0 * bound))).floor().long().clamp(0, g - 1)
    return inside & grid[idx[..., 0], idx[..., 1], idx[..., 2]]


def occupied_box(grid: torch.Tensor, bound: float = 1.0) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Corners (min [3], max [3]) of the smallest box of whole cells holding every occupied cell of
    `grid` [G, G, G]; None when nothing is occupied. Rays that miss it see only empty space."""
    occupied = grid.nonzero()
    if occupied.numel() == 0:
        return None
    cell = 2.0 * bound / grid.shape[0]
    box_min = -bound + occupied.amin(dim=0).float() * cell
    box_max = -bound + (occupied.amax(dim=0) + 1).float() * cell
    return box_min, box_max

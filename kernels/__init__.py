"""Fused ops for ln3diff_rt. Models call them only through `kernels.dispatch` (re-exported here)."""

from kernels.dispatch import attention, composite_rays, triplane_sample
from kernels.occupancy import build_occupancy_grid, occupied_samples

__all__ = ["attention", "build_occupancy_grid", "composite_rays", "occupied_samples", "triplane_sample"]

"""Fused ops for ln3diff_rt. Models call them only through `kernels.dispatch` (re-exported here)."""

from kernels.dispatch import attention, composite_rays, triplane_sample

__all__ = ["attention", "composite_rays", "triplane_sample"]

"""The official latent layout [B, 3c, h, w] (channel = c * 3 + plane) against the project's [B, 3, c, h, w].

The official DiT, samplers and checkpoints keep the plane index fastest in the channel axis; the
project keeps planes as their own axis. Both helpers are views or one copy, no arithmetic.
"""

from __future__ import annotations

import torch


def official_to_project_latent(latent: torch.Tensor) -> torch.Tensor:
    """[B, 3c, h, w] with channel c * 3 + plane -> [B, 3, c, h, w]."""
    b, channels, h, w = latent.shape
    if channels % 3:
        raise ValueError(f"official latent has {channels} channels; expected a multiple of 3 (c * 3 + plane)")
    return latent.reshape(b, channels // 3, 3, h, w).transpose(1, 2)


def project_to_official_latent(latent: torch.Tensor) -> torch.Tensor:
    """[B, 3, c, h, w] -> [B, 3c, h, w] with channel c * 3 + plane."""
    b, planes, c, h, w = latent.shape
    return latent.transpose(1, 2).reshape(b, c * planes, h, w)

"""Sizes of the published LN3Diff models' denoiser and VAE decoder: frozen dataclasses, torch-free.

They sit in a module of their own so that `ln3diff_rt.config.ModelConfig` can hold them (a
checkpoint stores its config) without importing the model code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class OfficialDiTConfig:
    """Sizes of an official denoiser; the defaults are the published DiT-L/2 (24 blocks, width 1024, 16 heads)."""

    kind: Literal["t23d", "i23d"]
    depth: int = 24
    width: int = 1024
    heads: int = 16
    context_dim: int = 768  # cross-attention tokens: CLIP text (t23d, 768) or CLIP image (i23d, 1024)
    dino_dim: int = 0  # i23d: DINOv2 tokens appended inside self-attention (1024); t23d: 0
    pooled_dim: int = 0  # i23d: pooled CLIP image vector added to the time embedding (768); t23d ignores it
    latent_channels: int = 4
    latent_size: int = 32
    patch_size: int = 2
    mlp_ratio: int = 4

    def __post_init__(self) -> None:
        if self.kind not in ("t23d", "i23d"):
            raise ValueError(f"official DiT kind {self.kind!r}: expected 't23d' or 'i23d'")
        if self.width % self.heads or self.width % 4:
            raise ValueError(f"width {self.width} must be divisible by heads {self.heads} and by 4")
        if self.kind == "i23d" and not (self.dino_dim and self.pooled_dim):
            raise ValueError("an i23d DiT needs dino_dim and pooled_dim")

    @classmethod
    def t23d(cls) -> OfficialDiTConfig:
        return cls("t23d")

    @classmethod
    def i23d(cls) -> OfficialDiTConfig:
        return cls("i23d", context_dim=1024, dino_dim=1024, pooled_dim=768)


@dataclass(frozen=True)
class OfficialVAEConfig:
    """Sizes of the official decoder path; the defaults are the published one (DiT2-L/2, tri-plane 3 x 32 x 128^2)."""

    width: int = 1024  # DiT2 hidden size = token width = conv_sr z_channels
    depth: int = 24
    heads: int = 16
    mlp_hidden: int = 4096
    latent_channels: int = 4  # per plane: the latent is [B, 3, 4, 32, 32]
    latent_size: int = 32
    patch_size: int = 2  # ldm_upsample kernel = stride (vae_p)
    sr_channels: int = 32  # conv_sr `ch`
    sr_ch_mult: tuple[int, ...] = (1, 2, 2, 4)  # one x2 upsampling per level but the first
    sr_res_blocks: int = 1  # conv_sr `num_res_blocks`; each up level has one more
    triplane_channels: int = 32  # per plane (conv_sr `out_ch`)
    field_hidden: int = 64

    def __post_init__(self):
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")

    @property
    def tokens_per_side(self) -> int:
        return self.latent_size // self.patch_size

    @property
    def triplane_resolution(self) -> int:
        return self.tokens_per_side * 2 ** (len(self.sr_ch_mult) - 1)

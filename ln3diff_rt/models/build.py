"""The modules a config describes: the project's VAE and DiT, or the published LN3Diff ones."""

from __future__ import annotations

from torch import nn

from ln3diff_rt.config import ModelConfig


def build_vae(cfg: ModelConfig) -> nn.Module:
    """`TriplaneVAE` (encoder, decoder, field), or for a published model its decoder and field only."""
    if cfg.official_vae is not None:
        from ln3diff_rt.official.vae import OfficialVAEDecoder

        return OfficialVAEDecoder(cfg.official_vae)
    from ln3diff_rt.models.vae import TriplaneVAE

    return TriplaneVAE(cfg)


def build_dit(cfg: ModelConfig) -> nn.Module:
    if cfg.official_dit is not None:
        from ln3diff_rt.official.dit import build_official_dit

        return build_official_dit(cfg.official_dit)
    from ln3diff_rt.models.dit import DiT

    return DiT(cfg)


def build_image_encoder(cfg: ModelConfig) -> nn.Module:
    """The project's condition-image encoder (`ModelConfig.image_encoder`)."""
    if cfg.image_encoder is None:
        raise ValueError(f"preset {cfg.preset!r} has no image encoder (config.image_encoder is None)")
    from ln3diff_rt.models.image_encoder import ImageEncoder

    return ImageEncoder(cfg.image_encoder)

"""The official LN3Diff VAE decoder: latent [B, 3, 4, 32, 32] -> tri-plane [B, 3, 32, 128, 128].

Path (README "VAE decoder"): `superresolution.ldm_upsample`, a patch conv with groups = 3 on the latent in
its official channel order (c * 3 + plane), gives 768 tokens; they are the per-token adaLN condition c of
`vit_decoder` (DiT2), whose sequence starts from its trained `pos_embed`; its blocks alternate attention
within each plane (even) and across all planes (odd), with no cross-attention and no final norm; the tokens,
as one 16 x 16 image per plane, go through `superresolution.conv_sr`, an SD-style conv decoder, to 32
channels at R x R per plane.

Hand-off: `OfficialVAEDecoder.forward` takes the project's latent layout [B, 3, c, h, w] (VAE units: the
diffusion sample already multiplied by 0.96806) and returns the project's tri-plane layout [B, 3, C, R, R],
planes (xy, xz, yz) (see `field.py`), so rendering, meshing and export use it like the project's own
decoder; `field.triplane_to_official` gives back the official [B, 96, R, R].

Attribute names equal the official `rec_model.decoder.*` keys with that prefix stripped, so conversion is
`decoder_state_from_official` + `load_state_dict(strict=True)`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kernels import attention
from ln3diff_rt.official.config import OfficialVAEConfig
from ln3diff_rt.official.field import OfficialTriplaneField, triplane_from_official
from ln3diff_rt.official.layers import FeedForward, SelfAttention, modulate
from ln3diff_rt.official.layout import project_to_official_latent

DECODER_PREFIX = "rec_model.decoder."
# Official decoder keys that generation never reads. The converter drops exactly these, by name, instead
# of our building them as dead parameters (which every converted file would then carry): `w_avg` is a
# placeholder buffer, and `superresolution.quant_conv` maps the encoder's posterior moments (encoder side).
UNUSED_DECODER_KEYS = ("w_avg", "superresolution.quant_conv.weight", "superresolution.quant_conv.bias")
FULL_SIZE_WIDTH, FULL_SIZE_HEADS = 1024, 16  # DiT2-L/2: the head count is not visible in any shape


def infer_vae_config(shapes: Mapping[str, Sequence[int]], heads: int | None = None) -> OfficialVAEConfig:
    """The decoder's sizes from its state-dict shapes (keys without `rec_model.decoder.`, e.g. `{k: t.shape}`).

    Heads leave no trace in the shapes: pass them, or get the published 16 at the published width.
    """

    def shape(key: str) -> tuple[int, ...]:
        if key not in shapes:
            raise KeyError(f"decoder key {key!r} is missing: not an official LN3Diff VAE decoder state dict")
        return tuple(shapes[key])

    def indices(pattern: str) -> list[int]:
        return sorted({int(m.group(1)) for k in shapes if (m := re.fullmatch(pattern, k))})

    _, tokens, width = shape("vit_decoder.pos_embed")  # [1, 3 * s^2, D]
    if heads is None:
        if width != FULL_SIZE_WIDTH:
            raise ValueError(f"decoder width {width} is not the published {FULL_SIZE_WIDTH}: pass its head count")
        heads = FULL_SIZE_HEADS
    _, latent_channels, patch, _ = shape("superresolution.ldm_upsample.proj.weight")  # [3D, c, p, p]
    levels = indices(r"superresolution\.conv_sr\.up\.(\d+)\.block\.0\.conv1\.weight")
    level_widths = [shape(f"superresolution.conv_sr.up.{i}.block.0.conv1.weight")[0] for i in levels]
    ch = math.gcd(*level_widths)  # only ch * mult matters, so the common factor is exact
    return OfficialVAEConfig(
        width=width, depth=len(indices(r"vit_decoder\.blocks\.(\d+)\..*")), heads=heads,
        mlp_hidden=shape("vit_decoder.blocks.0.mlp.mlp.0.weight")[0], latent_channels=latent_channels,
        latent_size=math.isqrt(tokens // 3) * patch, patch_size=patch, sr_channels=ch,
        sr_ch_mult=tuple(w // ch for w in level_widths),
        sr_res_blocks=len(indices(r"superresolution\.conv_sr\.up\.0\.block\.(\d+)\..*")) - 1,
        triplane_channels=shape("superresolution.conv_sr.conv_out.weight")[0],
        field_hidden=shape("triplane_decoder.decoder.net.0.weight")[0])


def decoder_state_from_official(state: Mapping[str, torch.Tensor], prefix: str = DECODER_PREFIX
                                ) -> dict[str, torch.Tensor]:
    """The `prefix` entries of an official state dict, prefix stripped, `UNUSED_DECODER_KEYS` dropped.

    Load the result with `load_state_dict(strict=True)`: every other key must then match by name and shape.
    """
    stripped = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return {k: v for k, v in stripped.items() if k not in UNUSED_DECODER_KEYS}


class LatentPatchConv(nn.Module):
    """`ldm_upsample`: latent [B, 3c, h, w] (official order) -> condition tokens [B, 3 s^2, D], (plane, row, col)."""

    def __init__(self, cfg: OfficialVAEConfig):
        super().__init__()
        # groups=3 takes latent channels 0-3, 4-7, 8-11: mixed planes, not one plane per group.
        self.proj = nn.Conv2d(3 * cfg.latent_channels, 3 * cfg.width, cfg.patch_size, stride=cfg.patch_size,
                              groups=3)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        out = self.proj(latent)  # [B, 3D, s, s]; channel e * 3 + k is feature e of plane k
        b, d = out.shape[0], out.shape[1] // 3
        return out.reshape(b, d, 3, -1).permute(0, 2, 3, 1).reshape(b, -1, d)


class DiT2Block(nn.Module):
    """Attention + MLP, each gated and modulated per token by adaLN of the condition tokens c."""

    def __init__(self, width: int, heads: int, mlp_hidden: int):
        super().__init__()
        self.attn = SelfAttention(width, heads, qk_norm=False)
        self.mlp = FeedForward(width, mlp_hidden)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x, c [B, N, D] -> [B, N, D]."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        d = x.shape[-1]
        x = x + gate_msa * self.attn(modulate(F.layer_norm(x, (d,), eps=1e-6), shift_msa, scale_msa))
        return x + gate_mlp * self.mlp(modulate(F.layer_norm(x, (d,), eps=1e-6), shift_mlp, scale_mlp))


class DiT2(nn.Module):
    """`vit_decoder`: learned query tokens refined by blocks alternating self-plane and cross-plane attention."""

    def __init__(self, cfg: OfficialVAEConfig):
        super().__init__()
        self.pos_embed = nn.Parameter(torch.zeros(1, 3 * cfg.tokens_per_side ** 2, cfg.width))  # trained
        self.blocks = nn.ModuleList(DiT2Block(cfg.width, cfg.heads, cfg.mlp_hidden) for _ in range(cfg.depth))

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        """Condition tokens c [B, 3T, D] -> tokens [B, 3T, D], (plane, row, col) order."""
        b, n, d = c.shape
        x = self.pos_embed.expand(b, n, d)
        c_planes = c.reshape(3 * b, n // 3, d)
        for i, block in enumerate(self.blocks):
            if i % 2 == 0:  # self-plane attention: each plane's T tokens alone
                x = block(x.reshape(3 * b, n // 3, d), c_planes).reshape(b, n, d)
            else:  # cross-plane attention: all 3T tokens
                x = block(x, c)
        return x


def token_images(tokens: torch.Tensor) -> torch.Tensor:
    """Tokens [B, 3 s^2, D] -> one image per plane [3B, D, s, s], plane-major within each batch element."""
    b, n, d = tokens.shape
    side = math.isqrt(n // 3)
    return tokens.reshape(3 * b, side, side, d).permute(0, 3, 1, 2)


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """GroupNorm-swish-conv twice, plus a 1x1 `nin_shortcut` where the width changes."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1 = _group_norm(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = _group_norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        return self.nin_shortcut(x) + self.conv2(F.silu(self.norm2(h)))


class AttnBlock(nn.Module):
    """Single-head attention over the pixels of a feature map (scale 1 / sqrt(C)), residual."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _group_norm(channels)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (conv(y).reshape(b, 1, c, h * w).transpose(-1, -2) for conv in (self.q, self.k, self.v))
        out = attention(q, k, v)  # [B, 1, HW, C]
        return x + self.proj_out(out.transpose(-1, -2).reshape(b, c, h, w))


class MidBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Upsample(nn.Module):
    """Nearest x2, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UpLevel(nn.Module):
    def __init__(self, cin: int, cout: int, blocks: int, upsample: bool):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(cin if i == 0 else cout, cout) for i in range(blocks))
        self.upsample = Upsample(cout) if upsample else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        return self.upsample(x)


class ConvUpsampler(nn.Module):
    """`conv_sr`: the SD-style conv decoder, token images [3B, D, s, s] -> planes [3B, C, R, R]."""

    def __init__(self, cfg: OfficialVAEConfig):
        super().__init__()
        widths = [cfg.sr_channels * m for m in cfg.sr_ch_mult]
        self.conv_in = nn.Conv2d(cfg.width, widths[-1], 3, padding=1)
        self.mid = MidBlock(widths[-1])
        levels = []  # built from the top level down, stored by level index as the official keys are
        cin = widths[-1]
        for level in reversed(range(len(widths))):
            levels.insert(0, UpLevel(cin, widths[level], cfg.sr_res_blocks + 1, upsample=level != 0))
            cin = widths[level]
        self.up = nn.ModuleList(levels)
        self.norm_out = _group_norm(widths[0])
        self.conv_out = nn.Conv2d(widths[0], cfg.triplane_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(x))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Superresolution(nn.Module):
    """Holds the official `superresolution.*` modules the decoder uses (`quant_conv` is dropped)."""

    def __init__(self, cfg: OfficialVAEConfig):
        super().__init__()
        self.ldm_upsample = LatentPatchConv(cfg)
        self.conv_sr = ConvUpsampler(cfg)


class OfficialVAEDecoder(nn.Module):
    """Latent [B, 3, c, h, w] -> tri-plane [B, 3, C, R, R] (project layout); `.field` queries it."""

    def __init__(self, cfg: OfficialVAEConfig):
        super().__init__()
        self.cfg = cfg
        self.superresolution = Superresolution(cfg)
        self.vit_decoder = DiT2(cfg)
        # The official `triplane_decoder` wraps its MLP as `.decoder`; a ModuleDict reproduces the key path.
        self.triplane_decoder = nn.ModuleDict({"decoder": OfficialTriplaneField(cfg.triplane_channels,
                                                                                cfg.field_hidden)})

    @property
    def field(self) -> OfficialTriplaneField:
        return self.triplane_decoder["decoder"]

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """The pipeline's name for the decoder call (as `TriplaneVAE.decode`)."""
        return self(latent)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        b = latent.shape[0]
        c = self.superresolution.ldm_upsample(project_to_official_latent(latent))  # [B, 3T, D]
        planes = self.superresolution.conv_sr(token_images(self.vit_decoder(c)))  # [3B, C, R, R]
        r = planes.shape[-1]
        return triplane_from_official(planes.reshape(b, -1, r, r))

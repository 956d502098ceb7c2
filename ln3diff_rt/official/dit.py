"""The published LN3Diff denoisers: `DiT_TriLatent` (text-to-3D, eps) and `DiT_I23D_PixelArt` (image-to-3D, flow).

Written from the conventions in `../shared/official-ln3diff/README.md`, not from the official code.
Attribute names make `state_dict()` keys equal the official `ddpm_model.*` keys with that prefix
stripped, except `UNUSED_DIT_KEYS`, which are dropped by name (see there).

Both models take the latent in the project's layout [B, 3, c, h, w] and return the same layout
(`layout.py` converts from the official [B, 3c, h, w]); the signature is the project's denoiser
signature `(x, t, context, pooled)`. t23d: t is the DDPM index (int, 0..999), the output is eps,
`pooled` is ignored. i23d: t is flow time in [0, 1] (1 = data), the output is data - noise, and
`context` is CLIP image tokens and DINOv2 tokens concatenated on channels [B, L, 1024 + 1024].
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ln3diff_rt.official.config import OfficialDiTConfig
from ln3diff_rt.official.layers import (
    CrossAttention,
    FeedForward,
    PatchEmbed,
    SelfAttention,
    TimestepEmbedder,
    TokenProjection,
    layer_norm,
    modulate,
    triplane_pos_embed,
    unpatchify,
)

DIT_PREFIX = "ddpm_model."
CROSS_HEAD_DIM = 64  # the official cross-attention's head size at every width, so heads = its width / 64

# Official keys that generation never reads. They are dropped by name here instead of being built as
# parameters nobody calls: building them would carry ~2 M dead parameters (i23d) into converted
# checkpoints and engines. `ema_latent_*`: statistics buffers of the training wrapper; i23d
# `clip_spatial_proj.*`: built, never called; i23d per-block `attention_y_norm`: never called
# (the model-level `attention_y_norm` is used and is built).
UNUSED_DIT_KEYS = (
    re.compile(r"ema_latent_(mean|std)"),
    re.compile(r"clip_spatial_proj\.y_proj\.fc[12]\.(weight|bias)"),
    re.compile(r"blocks\.\d+\.attention_y_norm\.weight"),
)


def infer_dit_config(shapes: Mapping[str, Sequence[int]], heads: int | None = None) -> OfficialDiTConfig:
    """The denoiser's sizes from its state-dict shapes (keys without `ddpm_model.`, e.g. `{k: t.shape}`).

    The head count shows in the cross-attention width (heads x CROSS_HEAD_DIM); `heads`, if given, must agree.
    """

    def shape(key: str) -> tuple[int, ...]:
        if key not in shapes:
            raise KeyError(f"DiT key {key!r} is missing: not an official LN3Diff DiT state dict")
        return tuple(shapes[key])

    kind = "i23d" if "cap_embedder.1.weight" in shapes else "t23d"
    width, channels, patch, _ = shape("x_embedder.proj.weight")  # [D, c, p, p]
    cross_inner = shape("blocks.0.cross_attn.to_q.weight")[0]  # [heads * 64, D]
    if heads is not None and heads * CROSS_HEAD_DIM != cross_inner:
        raise ValueError(f"heads={heads}, but the cross-attention width {cross_inner} means "
                         f"{cross_inner // CROSS_HEAD_DIM} heads of {CROSS_HEAD_DIM}")
    sizes = dict(depth=len({int(m.group(1)) for k in shapes if (m := re.match(r"blocks\.(\d+)\.", k))}),
                 width=width, heads=cross_inner // CROSS_HEAD_DIM, latent_channels=channels, patch_size=patch,
                 latent_size=math.isqrt(shape("pos_embed")[1] // 3) * patch,
                 mlp_ratio=shape("blocks.0.mlp.mlp.0.weight")[0] // width)
    if kind == "t23d":
        return OfficialDiTConfig("t23d", context_dim=shape("clip_text_proj.y_proj.fc1.weight")[1], **sizes)
    return OfficialDiTConfig("i23d", context_dim=shape("blocks.0.cross_attn.to_k.weight")[1],
                             dino_dim=shape("dino_proj.y_proj.fc1.weight")[1],
                             pooled_dim=shape("cap_embedder.1.weight")[1], **sizes)


def is_unused_dit_key(key: str) -> bool:
    """Whether a prefix-stripped official key is one that generation never reads (`UNUSED_DIT_KEYS`)."""
    return any(p.fullmatch(key) for p in UNUSED_DIT_KEYS)


def dit_state_from_official(state: Mapping[str, torch.Tensor], prefix: str = DIT_PREFIX) -> dict[str, torch.Tensor]:
    """The `prefix` entries of an official state dict, prefix stripped, `UNUSED_DIT_KEYS` dropped.

    Load the result with `load_state_dict(strict=True)`: every other key must then match by name and shape.
    """
    stripped = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return {k: v for k, v in stripped.items() if not is_unused_dit_key(k)}


# ---- text-to-3D: DiT_TriLatent ----------------------------------------------------------------------------------


class TextCondDiTBlock(nn.Module):
    """adaLN-Zero self-attention, then un-normed, ungated cross-attention to the text, then the gated MLP."""

    def __init__(self, cfg: OfficialDiTConfig):
        super().__init__()
        d = cfg.width
        self.norm1, self.norm2 = layer_norm(d), layer_norm(d)
        self.attn = SelfAttention(d, cfg.heads, qk_norm=False)
        self.cross_attn = CrossAttention(d, d, cfg.heads, CROSS_HEAD_DIM, qk_norm=False)
        self.mlp = FeedForward(d, cfg.mlp_ratio * d)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))

    def forward(self, x: torch.Tensor, c: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x [B, N, D], c [B, D], context [B, L, D] -> [B, N, D]."""
        mods = self.adaLN_modulation(c)[:, None].chunk(6, dim=-1)  # 6 x [B, 1, D]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
        x = x + gate_msa * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + self.cross_attn(x, context)
        return x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """LayerNorm, adaLN shift then scale from t, Linear to p * p * c rows."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.norm_final = layer_norm(dim)
        self.linear = nn.Linear(dim, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c)[:, None].chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class TriplaneDiT(nn.Module):
    """Shared trunk: patch embedding, frozen positional table, time embedding, unpatchify."""

    def __init__(self, cfg: OfficialDiTConfig):
        super().__init__()
        self.config = cfg
        grid = cfg.latent_size // cfg.patch_size
        self.x_embedder = PatchEmbed(cfg.latent_channels, cfg.width, cfg.patch_size)
        self.t_embedder = TimestepEmbedder(cfg.width)
        # A buffer, not a parameter: frozen in the official model too; saved so the keys match one to one.
        self.register_buffer("pos_embed", triplane_pos_embed(cfg.width, grid)[None])  # [1, 3 g^2, D]

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, 3, c, h, w] -> tokens [B, 3 g^2, D]."""
        return self.x_embedder(x) + self.pos_embed

    def unpatchify(self, rows: torch.Tensor) -> torch.Tensor:
        return unpatchify(rows, self.config.patch_size, self.config.latent_channels)


class OfficialTextDiT(TriplaneDiT):
    """`DiT_TriLatent`: eps prediction from the DDPM index; CLIP text tokens by cross-attention."""

    def __init__(self, cfg: OfficialDiTConfig):
        super().__init__(cfg)
        d = cfg.width
        self.clip_text_proj = TokenProjection(cfg.context_dim, d)
        self.blocks = nn.ModuleList(TextCondDiTBlock(cfg) for _ in range(cfg.depth))
        self.final_layer = FinalLayer(d, cfg.patch_size ** 2 * cfg.latent_channels)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                pooled: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, 3, c, h, w], t [B] DDPM index, context [B, 77, 768] (pooled ignored) -> eps like x."""
        tokens = self.embed(x)
        c = self.t_embedder(t)  # [B, D]
        ctx = self.clip_text_proj(context)  # [B, L, D]
        for block in self.blocks:
            tokens = block(tokens, c, ctx)
        return self.unpatchify(self.final_layer(tokens, c))


# ---- image-to-3D: DiT_I23D_PixelArt -----------------------------------------------------------------------------


class ImageCondDiTBlock(nn.Module):
    """PixArt block with RMSNorm: shared adaLN + own table; DINO tokens appended in self-attention; CLIP cross-attn."""

    def __init__(self, cfg: OfficialDiTConfig):
        super().__init__()
        d = cfg.width
        self.scale_shift_table = nn.Parameter(torch.zeros(6, d))
        self.norm1 = nn.RMSNorm(d, eps=1e-5)
        self.norm2 = nn.RMSNorm(d, eps=1e-5)
        self.attn = SelfAttention(d, cfg.heads, qk_norm=True)
        self.cross_attn = CrossAttention(d, cfg.context_dim, cfg.heads, CROSS_HEAD_DIM, qk_norm=True)
        self.mlp = FeedForward(d, cfg.mlp_ratio * d)

    def forward(self, x: torch.Tensor, t0: torch.Tensor, clip: torch.Tensor, dino: torch.Tensor) -> torch.Tensor:
        """x [B, N, D], t0 [B, 6D], clip [B, L, Dc] (normed), dino [B, T, D] (projected) -> [B, N, D]."""
        mods = (self.scale_shift_table[None] + t0.view(t0.shape[0], 6, -1)).chunk(6, dim=1)  # 6 x [B, 1, D]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
        x = x + gate_msa * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), extra=dino)
        x = x + self.cross_attn(x, clip)
        return x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class T2IFinalLayer(nn.Module):
    """LayerNorm, shift/scale = own table rows + the time vector t (not t0), Linear."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.norm_final = layer_norm(dim)
        self.linear = nn.Linear(dim, out_dim)
        self.scale_shift_table = nn.Parameter(torch.zeros(2, dim))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.scale_shift_table[None] + t[:, None]).chunk(2, dim=1)  # [B, 1, D] each
        return self.linear(modulate(self.norm_final(x), shift, scale))


class OfficialImageDiT(TriplaneDiT):
    """`DiT_I23D_PixelArt`: flow velocity (data - noise) at time t in [0, 1]; CLIP + DINOv2 image conditions."""

    def __init__(self, cfg: OfficialDiTConfig):
        super().__init__(cfg)
        d = cfg.width
        self.cap_embedder = nn.Sequential(nn.LayerNorm(cfg.pooled_dim, eps=1e-5), nn.Linear(cfg.pooled_dim, d))
        self.attention_y_norm = nn.RMSNorm(cfg.context_dim, eps=1e-5)
        self.dino_proj = TokenProjection(cfg.dino_dim, d)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        self.blocks = nn.ModuleList(ImageCondDiTBlock(cfg) for _ in range(cfg.depth))
        self.final_layer = T2IFinalLayer(d, cfg.patch_size ** 2 * cfg.latent_channels)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """x [B, 3, c, h, w], t [B] flow time, context [B, L, 1024 CLIP + 1024 DINO], pooled [B, 768] -> v like x."""
        tokens = self.embed(x)
        t = self.t_embedder(t) + self.cap_embedder(pooled)  # [B, D]
        t0 = self.adaLN_modulation(t)  # [B, 6D]
        clip = self.attention_y_norm(context[..., :self.config.context_dim])
        dino = self.dino_proj(context[..., self.config.context_dim:])
        for block in self.blocks:
            tokens = block(tokens, t0, clip, dino)
        return self.unpatchify(self.final_layer(tokens, t))


def build_official_dit(cfg: OfficialDiTConfig) -> OfficialTextDiT | OfficialImageDiT:
    """The denoiser for `cfg.kind`; build it under `torch.device('meta')` to load full-size weights with assign."""
    return OfficialTextDiT(cfg) if cfg.kind == "t23d" else OfficialImageDiT(cfg)

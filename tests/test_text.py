"""The text encoder: CLIP (the published LN3Diff text-to-3D conditioner) and the bundled MiniLM, and how a name
resolves to a local directory (bundled, a path, or a repo id in the Hugging Face cache; never downloaded)."""

import json

import pytest
import torch
from conftest import fake_hf_cache

from ln3diff_rt.text import DEFAULT_TEXT_ENCODER, TextEncoder, hf_hub_cache, resolve_text_encoder

PROMPTS = ["a red cube", "", "A wooden chair, with FOUR legs!", "a small blue teapot " * 12]  # the last truncates
REPO = "openai/clip-vit-large-patch14"


def test_tiny_clip_matches_transformers(tiny_clip_dir):
    from transformers import CLIPTextModel, CLIPTokenizer

    enc = TextEncoder(str(tiny_clip_dir), 77)
    assert enc.clip and enc.width == 768
    cond = enc(PROMPTS)
    assert cond.context.shape == (4, 77, 768) and cond.pooled.shape == (4, 768)
    assert cond.context.dtype == cond.pooled.dtype == torch.float32

    # The official conditioner: CLIPTokenizer, padding to 77, truncation, input ids only (no padding mask).
    tokenizer = CLIPTokenizer.from_pretrained(str(tiny_clip_dir))
    model = CLIPTextModel.from_pretrained(str(tiny_clip_dir)).eval()
    batch = tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    ids, eos = batch.input_ids, tokenizer.eos_token_id
    assert tokenizer.convert_ids_to_tokens(ids[0, :6]) == ["<|startoftext|>", "a</w>", "r", "e", "d</w>", "c"]
    assert (ids == eos).any(1).all() and (ids[3] == eos).sum() == 1 and ids[3, -1] == eos  # the last one truncated
    with torch.no_grad():
        out = model(input_ids=ids)
    assert torch.equal(cond.context, out.last_hidden_state)
    assert torch.equal(cond.pooled, out.pooler_output)
    # pooled is the first EOS token's state (the published config's eos id 2 takes the highest id's position).
    first_eos = (ids == tokenizer.eos_token_id).int().argmax(1)
    assert torch.equal(cond.pooled, out.last_hidden_state[torch.arange(4), first_eos])
    # Padded positions are the EOS states of the unmasked causal pass, not those of a padding-masked one.
    with torch.no_grad():
        masked = model(input_ids=ids, attention_mask=batch.attention_mask).last_hidden_state
    real = batch.attention_mask.bool()
    assert torch.allclose(masked[real], cond.context[real], atol=1e-5)
    assert not torch.allclose(masked[~real], cond.context[~real], atol=1e-3)

def test_full_clip_checkpoint_loads_text_tower_only(tiny_clip_dir, tmp_path):
    """`openai/clip-vit-large-patch14` is a full CLIPModel (text + vision): only the text tower is built."""
    from transformers import CLIPConfig, CLIPModel

    text_config = json.loads((tiny_clip_dir / "config.json").read_text())
    config = CLIPConfig(text_config=text_config, projection_dim=16, vision_config=dict(
        hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=16))
    torch.manual_seed(1)
    full = CLIPModel(config).eval()
    full.save_pretrained(tmp_path)
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((tiny_clip_dir / name).read_bytes())

    enc = TextEncoder(str(tmp_path), 77)
    assert enc.clip and not any("vision" in n for n, _ in enc.named_parameters())
    cond = enc(PROMPTS[:2])
    ids = enc.tokenizer(PROMPTS[:2], padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        out = full.text_model(input_ids=ids.input_ids)
    assert torch.equal(cond.context, out.last_hidden_state) and torch.equal(cond.pooled, out.pooler_output)


def test_clip_missing_text_weight_is_an_error(tiny_clip_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    for name in ("config.json", "vocab.json", "merges.txt", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((tiny_clip_dir / name).read_bytes())
    weights = load_file(tiny_clip_dir / "model.safetensors")
    key = next(k for k in weights if "final_layer_norm.weight" in k)
    del weights[key]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="final_layer_norm.weight"):
        TextEncoder(str(tmp_path), 77)


def test_max_length_beyond_clip_positions(tiny_clip_dir):
    with pytest.raises(ValueError, match="max_length 78 exceeds its 77 positions"):
        TextEncoder(str(tiny_clip_dir), 78)


def test_repo_id_resolves_from_hf_cache_offline(tiny_clip_dir, hf_env, tmp_path):
    import huggingface_hub

    cache = tmp_path / "hub-cache"
    snapshot = fake_hf_cache(cache, REPO, tiny_clip_dir)
    hf_env.setenv("HF_HUB_CACHE", str(cache))
    assert hf_hub_cache() == cache
    assert resolve_text_encoder(REPO) == snapshot
    # The same folder huggingface_hub itself finds offline.
    assert huggingface_hub.snapshot_download(REPO, cache_dir=str(cache), local_files_only=True) == str(snapshot)
    enc = TextEncoder(REPO, 77)
    assert enc.clip and enc(["a red cube"]).context.shape == (1, 77, 768)
    assert torch.equal(enc(PROMPTS).pooled, TextEncoder(str(tiny_clip_dir), 77)(PROMPTS).pooled)


def test_hf_cache_location_follows_environment(hf_env, tmp_path):
    """HF_HUB_CACHE over HUGGINGFACE_HUB_CACHE over $HF_HOME/hub over $XDG_CACHE_HOME/huggingface/hub, read at
    call time (huggingface_hub reads them once, at import)."""
    hf_env.delenv("HF_HOME")
    hf_env.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hf_hub_cache() == tmp_path / "xdg" / "huggingface" / "hub"
    hf_env.setenv("HF_HOME", str(tmp_path / "home"))
    assert hf_hub_cache() == tmp_path / "home" / "hub"
    snapshot = fake_hf_cache(tmp_path / "home" / "hub", "org/model")
    (snapshot / "config.json").write_text("{}")
    assert resolve_text_encoder("org/model") == snapshot
    hf_env.setenv("HUGGINGFACE_HUB_CACHE", str(tmp_path / "legacy"))
    assert hf_hub_cache() == tmp_path / "legacy"
    hf_env.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert hf_hub_cache() == tmp_path / "hub"


def test_missing_repo_id_error_names_repo_and_cache(hf_env, tmp_path):
    cache = tmp_path / "empty-cache"
    hf_env.setenv("HF_HUB_CACHE", str(cache))
    with pytest.raises(FileNotFoundError) as err:
        resolve_text_encoder(REPO)
    message = str(err.value)
    assert "\n" not in message
    assert f"'{REPO}' is not a local directory and is not in the Hugging Face cache at {cache}" in message
    assert f"hf download {REPO}" in message and "--text-encoder PATH" in message
    with pytest.raises(FileNotFoundError, match="is not in the Hugging Face cache"):
        TextEncoder(REPO, 77)  # the error comes before anything is loaded


def test_partial_snapshot_and_bad_paths(hf_env, tmp_path):
    cache = tmp_path / "cache"
    hf_env.setenv("HF_HUB_CACHE", str(cache))
    fake_hf_cache(cache, "org/partial")  # refs and an empty snapshot: no config.json
    with pytest.raises(FileNotFoundError, match="has no config.json .a partial download."):
        resolve_text_encoder("org/partial")
    with pytest.raises(FileNotFoundError, match="does not exist, and it is neither"):
        resolve_text_encoder(str(tmp_path / "no" / "such" / "dir"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json, and it is neither"):
        resolve_text_encoder(str(tmp_path / "empty"))


def test_local_dir_comes_before_hf_cache(tiny_clip_dir, hf_env, tmp_path):
    hf_env.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    assert resolve_text_encoder(str(tiny_clip_dir)) == tiny_clip_dir


def test_minilm_unchanged():
    """The bundled MiniLM keeps its masked-mean, L2-normalised pooled vector and its attention-masked context."""
    from transformers import AutoModel, AutoTokenizer

    enc = TextEncoder()
    assert not enc.clip and enc.max_length == 32 and enc.width == 384
    cond = enc(PROMPTS)
    assert cond.context.shape == (4, 32, 384) and cond.pooled.shape == (4, 384)

    path = str(resolve_text_encoder(DEFAULT_TEXT_ENCODER))
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    batch = tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=32, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0), dim=-1)
    assert torch.equal(cond.context, hidden) and torch.equal(cond.pooled, pooled)
    # Pinned: the shipped model's output for "a red cube" (recorded before CLIP support was added).
    expected = [-0.01655246689915657, -0.004576838109642267, -0.12708395719528198, 0.11171504855155945]
    torch.testing.assert_close(cond.pooled[0, :4], torch.tensor(expected), rtol=0, atol=1e-5)
    torch.testing.assert_close(cond.context[0, 0, :3], torch.tensor([0.11516491323709488, -0.1832653135061264,
                                                                     -0.6049115061759949]), rtol=0, atol=1e-5)

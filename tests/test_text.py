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
    ids = enc.tokenizer(PROMPTS[:2])["input_ids"]
    with torch.no_grad():
        out = full.text_model(input_ids=ids)
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


# The bundled MiniLM runs as ln3diff_rt.models.bert.BertModel with the `tokenizers` library: no transformers.
UNICODE_PROMPTS = [*PROMPTS, "Crème brûlée à la 東京, naïve café", "  tabs\tand\nnewlines  ", "x" * 300, "ﬁne ½ ①"]


def test_minilm_tokenizer_matches_transformers():
    from transformers import AutoTokenizer

    enc = TextEncoder()
    path = str(resolve_text_encoder(DEFAULT_TEXT_ENCODER))
    reference = AutoTokenizer.from_pretrained(path, local_files_only=True)
    expected = reference(UNICODE_PROMPTS, padding="max_length", truncation=True, max_length=32, return_tensors="pt")
    got = enc.tokenizer(UNICODE_PROMPTS)
    assert set(got) == {"input_ids", "attention_mask", "token_type_ids"}
    for key in got:
        assert torch.equal(got[key], expected[key]), key
    counts = [enc.tokenizer.count(p) for p in UNICODE_PROMPTS]
    assert counts == [len(reference(p)["input_ids"]) for p in UNICODE_PROMPTS]
    assert enc.tokenizer.count(UNICODE_PROMPTS[3]) == 62  # counted before truncation to 32


@pytest.mark.parametrize("layers,width,heads,seq", [(2, 36, 3, 7), (1, 20, 5, 13)])
def test_bert_matches_transformers_random_weights(layers, width, heads, seq):
    """Odd sizes and random weights, padding in the middle of the batch: the module is BERT, not only MiniLM."""
    from transformers import BertConfig as HFConfig
    from transformers import BertModel as HFBert

    from ln3diff_rt.models.bert import BertConfig, BertModel

    torch.manual_seed(0)
    hf_config = HFConfig(vocab_size=97, hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads,
                         intermediate_size=3 * width + 1, max_position_embeddings=seq + 4, type_vocab_size=2)
    reference = HFBert(hf_config).eval()
    for p in reference.parameters():  # BERT's init leaves LayerNorm at identity and biases at 0: perturb them all
        p.data.add_(0.1 * torch.randn_like(p))
    model = BertModel(BertConfig.from_hf(hf_config.to_dict()))
    unused = ("pooler.", "embeddings.position_ids")
    state = {k: v for k, v in reference.state_dict().items() if not k.startswith(unused)}
    model.load_state_dict(state)
    ids = torch.randint(0, 97, (3, seq))
    mask = torch.ones_like(ids)
    mask[1, seq // 2:] = 0
    types = torch.randint(0, 2, (3, seq))
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        got = model(ids, mask, types).last_hidden_state
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_bert_config_leaves_other_models_to_transformers():
    from ln3diff_rt.models.bert import BertConfig

    minilm = json.loads((resolve_text_encoder(DEFAULT_TEXT_ENCODER) / "config.json").read_text())
    assert BertConfig.from_hf(minilm) is not None
    for change in ({"model_type": "roberta"}, {"hidden_act": "gelu_new"},
                   {"position_embedding_type": "relative_key"}, {"is_decoder": True}):
        assert BertConfig.from_hf({**minilm, **change}) is None, change


def test_bert_weights_checked_by_name(tmp_path):
    from safetensors.torch import load_file, save_file

    source = resolve_text_encoder(DEFAULT_TEXT_ENCODER)
    for name in ("config.json", "tokenizer.json"):
        (tmp_path / name).write_bytes((source / name).read_bytes())
    weights = load_file(source / "model.safetensors")
    del weights["encoder.layer.3.output.dense.bias"]
    weights["encoder.layer.0.intermediate.dense.weight"] = weights["encoder.layer.0.intermediate.dense.weight"][:7]
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"model.safetensors' do not fit its config.json: missing "
                                         r"encoder.layer.3.output.dense.bias; mis-shaped "
                                         r"encoder.layer.0.intermediate.dense.weight$"):
        TextEncoder(str(tmp_path))


def test_shipped_model_generates_without_transformers():
    """A process that generates from the shipped model never imports transformers (~2 s of a cold start), nor
    trimesh and scipy (~0.9 s) where it writes a vertex-coloured GLB."""
    import subprocess
    import sys

    code = ("import sys; from ln3diff_rt.pipeline import Generator; from ln3diff_rt.runner import Request, run; "
            "gen = Generator.from_checkpoint(); options = gen.default_options().replace(preview_views=0, texture=0, "
            "mesh_resolution=48, faces=500); (r,) = run(gen, [Request('a red cube', 0, options, ('glb',))]); "
            "assert r.exports, 'no GLB'; "
            "assert len(r.mesh.faces) <= 500, 'not decimated'; "
            "print(sorted(m for m in ('transformers', 'torch._dynamo', 'trimesh', 'scipy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"

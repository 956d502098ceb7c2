"""The published image-to-3D model's conditioner (CLIP ViT-L/14 + DINOv2-reg on transformers), how it finds its
models (local folders or the local Hugging Face cache, never downloaded), and a real photo through the converted
i23d fixture to a GLB.

The encoders are tiny random-weight models shaped like the published ones where it matters (`conftest`'s
`tiny_image_encoder_dirs`); the reference outputs come from calling the transformers models directly with the
preprocessing the module docstring of `ln3diff_rt.official.image` documents.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import converted_official, fake_hf_cache, shared_path

from ln3diff_rt.images import read_image
from ln3diff_rt.official.image import IMAGE_SIZE, OfficialImageConditioner
from ln3diff_rt.pipeline import Generator
from ln3diff_rt.runner import Request, run

CLIP_REPO, DINO_REPO = "openai/clip-vit-large-patch14", "facebook/dinov2-with-registers-large"
REVISION = "0123456789abcdef0123456789abcdef01234567"  # any 40-hex commit id


@pytest.fixture(scope="module")
def conditioner(tiny_image_encoder_dirs):
    clip, dino = tiny_image_encoder_dirs
    return OfficialImageConditioner(str(clip), str(dino))


def reference(clip_dir, dino_dir, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(context, pooled) computed straight from the transformers models: CLIP on CLIP-normalised pixels, patch
    tokens after post_layernorm without CLS, pooled = image_embeds; DINOv2 on ImageNet-normalised pixels, the
    final-norm patch tokens without CLS and the 4 registers; context = [CLIP | DINOv2] on the channel axis."""
    from transformers import CLIPVisionModelWithProjection, Dinov2WithRegistersModel

    clip = CLIPVisionModelWithProjection.from_pretrained(str(clip_dir)).eval()
    dino = Dinov2WithRegistersModel.from_pretrained(str(dino_dir)).eval()
    clip_px = (images - torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)) / torch.tensor(
        [0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    dino_px = (images - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor(
        [0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        c = clip(pixel_values=clip_px)
        tokens = clip.vision_model.post_layernorm(c.last_hidden_state)[:, 1:]
        # image_embeds is the projection of the post-LayerNorm CLS token, not normalised
        cls = clip.vision_model.post_layernorm(c.last_hidden_state[:, 0])
        torch.testing.assert_close(c.image_embeds, clip.visual_projection(cls), rtol=0, atol=1e-6)
        d = dino(pixel_values=dino_px).last_hidden_state
    assert d.shape[1] == 1 + 4 + 256
    return torch.cat([tokens, d[:, 5:]], dim=-1), c.image_embeds


def test_conditioner_matches_transformers(conditioner, tiny_image_encoder_dirs):
    images = torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    cond = conditioner(images)
    assert cond.context.shape == (2, 256, 2048) and cond.pooled.shape == (2, 768) and cond.image is None
    assert cond.context.dtype == cond.pooled.dtype == torch.float32
    assert conditioner.widths == (1024, 1024, 768) and conditioner.context_dim == 2048
    context, pooled = reference(*tiny_image_encoder_dirs, images)
    torch.testing.assert_close(cond.context, context, rtol=0, atol=1e-5)
    torch.testing.assert_close(cond.pooled, pooled, rtol=0, atol=1e-5)
    assert cond.pooled.norm(dim=-1).sub(1).abs().min() > 1e-3  # not L2-normalised
    # The CLIP half went through the final LayerNorm (zero mean per token, with a random-init LN's unit weight).
    assert cond.context[..., :1024].mean(-1).abs().max() < 1e-4
    # Each image alone gives its own row: no batch coupling.
    one = conditioner(images[1:])
    torch.testing.assert_close(one.context[0], cond.context[1], rtol=0, atol=1e-5)


def test_other_sizes_are_resized_as_the_official_code_does(conditioner):
    """256^2 in (the official 'img' size) -> bicubic with align_corners=True to 224^2, then the same encoders."""
    images = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(1))
    resized = F.interpolate(images, size=(224, 224), mode="bicubic", align_corners=True)
    a, b = conditioner(images), conditioner(resized)
    assert torch.equal(a.context, b.context) and torch.equal(a.pooled, b.pooled)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\] in \[0, 1\], got \(3, 224, 224\)"):
        conditioner(images[0, :, :224, :224])


def test_full_clip_checkpoint_builds_its_vision_tower_only(conditioner, tiny_image_encoder_dirs, tmp_path):
    """A whole CLIP checkpoint (as `openai/clip-vit-large-patch14` is) gives the same as its vision tower alone."""
    from transformers import CLIPConfig, CLIPModel

    clip_dir, dino_dir = tiny_image_encoder_dirs
    vision = conditioner.clip
    config = CLIPConfig(text_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                         num_attention_heads=2, vocab_size=99, max_position_embeddings=77),
                        vision_config=vision.config.to_dict(), projection_dim=768)
    full = CLIPModel(config).eval()
    full.vision_model.load_state_dict(vision.vision_model.state_dict())
    full.visual_projection.load_state_dict(vision.visual_projection.state_dict())
    full.save_pretrained(tmp_path / "full-clip")
    images = torch.rand(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(2))
    got = OfficialImageConditioner(str(tmp_path / "full-clip"), str(dino_dir))
    assert not any(name.startswith("text") for name, _ in got.clip.named_parameters())
    a, b = got(images), conditioner(images)
    assert torch.equal(a.context, b.context) and torch.equal(a.pooled, b.pooled)


def test_default_names_resolve_from_the_hf_cache(hf_env, tmp_path, tiny_image_encoder_dirs, conditioner):
    cache = tmp_path / "cache"
    hf_env.setenv("HF_HUB_CACHE", str(cache))
    for repo, folder in zip((CLIP_REPO, DINO_REPO), tiny_image_encoder_dirs, strict=True):
        fake_hf_cache(cache, repo, folder)
    images = torch.rand(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(3))
    assert torch.equal(OfficialImageConditioner()(images).context, conditioner(images).context)


def test_missing_or_wrong_models_are_named_in_one_line(hf_env, tmp_path, tiny_image_encoder_dirs):
    clip_dir, dino_dir = map(str, tiny_image_encoder_dirs)
    cache = tmp_path / "empty-cache"
    hf_env.setenv("HF_HUB_CACHE", str(cache))
    with pytest.raises(FileNotFoundError) as err:
        OfficialImageConditioner(clip_dir, DINO_REPO)
    message = str(err.value)
    assert "\n" not in message
    assert f"image encoder '{DINO_REPO}' is not a local directory and is not in the Hugging Face cache at {cache}" \
        in message
    assert f"hf download {DINO_REPO} '*.json' model.safetensors" in message and "image_encoders" in message
    with pytest.raises(FileNotFoundError, match="does not exist, and it is not a Hugging Face repo id; give "
                                                "image_encoders the path of a local transformers model directory"):
        OfficialImageConditioner(str(tmp_path / "no" / "clip"), dino_dir)
    with pytest.raises(ValueError, match=r"is a 'dinov2_with_registers' model, not a CLIP model"):
        OfficialImageConditioner(dino_dir, dino_dir)
    with pytest.raises(ValueError, match=r"is a 'clip_vision_model' model, not DINOv2 with registers"):
        OfficialImageConditioner(clip_dir, clip_dir)
    with pytest.raises(ValueError, match=r"widths .* \(1024, 1024, 768\), the image-to-3D DiT takes "
                                         r"\(768, 1024, 768\)"):
        OfficialImageConditioner(clip_dir, dino_dir, widths=(768, 1024, 768))


@pytest.fixture(scope="module")
def surfaced_i23d(tmp_path_factory):
    return converted_official("i23d", tmp_path_factory.mktemp("i23d"), surfaced=True)


def test_the_published_names_missing_is_one_line_before_anything_runs(surfaced_i23d, hf_env, tmp_path):
    hf_env.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(FileNotFoundError, match=f"image encoder '{CLIP_REPO}' is not a local directory and is not "
                                                "in the Hugging Face cache"):
        Generator.from_checkpoint(surfaced_i23d)


def test_a_real_photo_becomes_a_glb(surfaced_i23d, tiny_image_encoder_dirs):
    clip_dir, dino_dir = map(str, tiny_image_encoder_dirs)
    gen = Generator.from_checkpoint(surfaced_i23d, image_encoders=(clip_dir, dino_dir))
    assert gen.config.image_only and gen.image_size == IMAGE_SIZE
    defaults = gen.default_options()
    assert (defaults.sampler, defaults.steps, defaults.guidance) == ("heun", 25, 4.0)
    seen = []
    encoder = gen.components.image_encoder

    def spy(images: torch.Tensor):
        seen.append((tuple(images.shape), images.dtype, float(images.min()), float(images.max())))
        return encoder(images)

    gen.components.image_encoder = spy
    options = defaults.replace(steps=2, mesh_resolution=48, faces=0, preview_views=0)
    photos = [read_image(shared_path("samples", "images", f"{name}-input.png")) for name in ("fox", "sword")]
    results = list(run(gen, [Request("", 3, options, ("glb",), image=photo) for photo in photos]))
    assert seen[0][:2] == ((2, 3, IMAGE_SIZE, IMAGE_SIZE), torch.float32) and 0.0 <= seen[0][2] < seen[0][3] <= 1.0
    assert len(results) == 2
    for r in results:
        assert r.latent.shape == (3, 4, 32, 32) and torch.isfinite(r.latent).all()
        assert len(r.mesh.faces) > 0 and r.exports["glb"][:4] == b"glTF" and len(r.exports["glb"]) > 1000
    assert not torch.allclose(results[0].latent, results[1].latent)  # same seed, other photo: the image conditions
    with pytest.raises(ValueError, match="generates from an image"):
        list(run(gen, [Request("a fox", 3, options)]))

"""The project's image conditioning: the condition-image encoder, and a DiT whose image paths start exactly neutral."""

import dataclasses

import pytest
import torch

from ln3diff_rt.checkpoint import load_models
from ln3diff_rt.config import ImageEncoderConfig
from ln3diff_rt.models.dit import DiT
from ln3diff_rt.models.image_encoder import ImageEncoder
from ln3diff_rt.pipeline import DEFAULT_CHECKPOINT


def with_images(cfg):
    encoder = ImageEncoderConfig()
    return cfg.replace(image_encoder=encoder, dit=dataclasses.replace(cfg.dit, image_dim=encoder.width))


@pytest.mark.parametrize("encoder", [ImageEncoderConfig(), ImageEncoderConfig(image_size=48, channels=(8, 16),
                                                                               width=24)])
def test_image_encoder_gives_one_token_per_cell_of_the_last_feature_map(encoder):
    torch.manual_seed(0)
    tokens = ImageEncoder(encoder)(torch.rand(3, 3, encoder.image_size, encoder.image_size))
    assert tokens.shape == (3, encoder.tokens, encoder.width)
    assert encoder.tokens == (encoder.image_size // 2 ** len(encoder.channels)) ** 2


def test_image_encoder_tokens_depend_on_the_image_and_every_weight_learns():
    torch.manual_seed(0)
    encoder = ImageEncoder(ImageEncoderConfig())
    tokens = encoder(torch.rand(2, 3, 64, 64))
    assert not torch.allclose(tokens[0], tokens[1])
    tokens.square().mean().backward()
    for name, p in encoder.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def text_weights() -> dict[str, torch.Tensor]:
    """The shipped DiT's weights without any image-conditioning ones: a trained text-only DiT."""
    return {k: v for k, v in load_models(DEFAULT_CHECKPOINT).dit.state_dict().items() if "image" not in k}


def _inputs(cfg, batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, *cfg.latent_shape, generator=g), torch.rand(batch, generator=g),
            torch.randn(batch, cfg.dit.context_len, cfg.dit.context_dim, generator=g),
            torch.randn(batch, cfg.dit.context_dim, generator=g))


@torch.no_grad()
def test_shipped_text_dit_loads_into_an_image_dit_and_without_an_image_predicts_exactly_as_before():
    """Zero image tokens switch the image path off, sample by sample: with the shipped model's text-only weights the
    image-capable DiT gives the text-only model's velocities bit for bit where a batch has no image."""
    config = load_models(DEFAULT_CHECKPOINT).config
    text_cfg = config.replace(image_encoder=None, dit=dataclasses.replace(config.dit, image_dim=0))
    text_dit = DiT(text_cfg).eval()
    text_dit.load_state_dict(text_weights())  # strict: exactly a text-only model
    image_cfg = with_images(text_cfg)
    dit = DiT(image_cfg).eval()
    missing, unexpected = dit.load_state_dict(text_dit.state_dict(), strict=False)
    assert not unexpected and missing and all("image" in k for k in missing)
    x, t, context, pooled = _inputs(text_cfg)
    expected = text_dit(x, t, context, pooled)
    assert expected.abs().max() > 0
    zeros = torch.zeros(3, image_cfg.image_encoder.tokens, 128)
    assert torch.equal(dit(x, t, context, pooled, zeros), expected)
    assert torch.equal(dit(x, t, context, pooled), expected)
    tokens = ImageEncoder(image_cfg.image_encoder)(torch.rand(3, 3, 64, 64))
    tokens[1] = 0.0  # one request without an image in a batch with images
    mixed = dit(x, t, context, pooled, tokens)
    assert torch.equal(mixed[1], expected[1])
    assert (mixed[0] - expected[0]).abs().max() > 1e-4  # the image path is on from the start (gate 0.1)


def test_image_paths_learn_from_the_start():
    torch.manual_seed(0)
    config = load_models(DEFAULT_CHECKPOINT).config  # the shipped model's sizes (v4: 8 latent channels)
    cfg = with_images(config.replace(image_encoder=None, dit=dataclasses.replace(config.dit, image_dim=0)))
    dit = DiT(cfg)
    dit.load_state_dict(text_weights(), strict=False)  # a trained text DiT
    x, t, context, pooled = _inputs(cfg)
    tokens = torch.randn(3, cfg.image_encoder.tokens, cfg.image_encoder.width)
    dit(x, t, context, pooled, tokens).square().mean().backward()
    for name, p in dit.named_parameters():
        if "image" in name:  # the zero-initialised pooled gate too: its input depends on the image
            assert p.grad.abs().sum() > 0, name


PHOTOS = ("bulldog", "cake", "extinguisher", "fox", "genshin_teapot", "plant", "robot", "sword")


def test_shipped_model_generates_from_each_real_photo():
    """The demo photos (152^2 to 2090^2 RGBA) go through preprocessing and the shipped model's image path; each
    conditions the latent (they are far from the primitives it was trained on: what comes out is a primitive)."""
    from conftest import shared_path

    from ln3diff_rt.images import read_image
    from ln3diff_rt.options import GenerationOptions
    from ln3diff_rt.pipeline import Generator
    from ln3diff_rt.runner import Request, run

    photos = [read_image(shared_path("samples", "images", f"{name}-input.png")) for name in PHOTOS]
    generator = Generator.from_checkpoint()
    assert generator.config.image_encoder is not None and generator.models.image_encoder is not None
    options = GenerationOptions(steps=2, preview_views=0)
    requests = [Request("", 0, options, mesh=False, image=photo) for photo in photos]
    latents = torch.stack([r.latent for r in run(generator, requests)]).flatten(1)  # one seed: only the photos differ
    assert torch.isfinite(latents).all()
    differences = (latents[:, None] - latents[None]).abs().amax(dim=-1) + torch.eye(len(photos))
    assert differences.min() > 1e-3  # every photo gives its own object

"""Shapes for every preset, gradient flow through the VAE, DiT behaviour."""

import dataclasses

import pytest
import torch

from ln3diff_rt.cameras import intrinsics_from_fov, orbit_camera
from ln3diff_rt.config import PRESETS, get_preset
from ln3diff_rt.models.dit import DiT
from ln3diff_rt.models.layers import patchify, unpatchify
from ln3diff_rt.models.vae import TriplaneVAE
from ln3diff_rt.presets import describe
from ln3diff_rt.rendering import render_rays
from ln3diff_rt.sampling import Condition, sample

PROJECT_PRESETS = sorted(name for name, cfg in PRESETS.items() if not cfg.is_official)  # built from models/


def _count_tokens(dit: DiT) -> list[int]:
    """Filled with the sequence length the DiT's blocks see, on each forward."""
    seen = []
    dit.blocks[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
    return seen


def _forward_shapes(cfg, batch):
    enc = cfg.encoder
    vae, dit = TriplaneVAE(cfg), DiT(cfg)
    images = torch.rand(batch, enc.num_views, 3, enc.image_size, enc.image_size)
    c2w = torch.stack([orbit_camera(90.0 * i, 20.0, 4.0) for i in range(enc.num_views)]).expand(batch, -1, -1, -1)
    intrinsics = intrinsics_from_fov(0.9, enc.image_size, enc.image_size).expand(batch, enc.num_views, 4)
    depth = torch.rand(batch, enc.num_views, 1, enc.image_size, enc.image_size) if enc.use_depth else None
    mean, logvar = vae.encode(images, c2w, intrinsics, depth)
    planes = vae.decode(mean)
    context = torch.randn(batch, cfg.dit.context_len, cfg.dit.context_dim)
    tokens = _count_tokens(dit)
    v = dit(mean, torch.rand(batch), context, torch.randn(batch, cfg.dit.context_dim))
    out = render_rays(vae.field, planes, torch.randn(batch, 5, 3), torch.randn(batch, 5, 3), cfg.renderer)
    return mean, logvar, planes, v, out, tokens


@pytest.mark.parametrize("name", PROJECT_PRESETS)
def test_preset_shapes(name):
    cfg = get_preset(name)
    device = "cpu" if name == "tiny" else "meta"  # large presets cost no memory on the meta device
    with torch.device(device):
        mean, logvar, planes, v, out, tokens = _forward_shapes(cfg, batch=2)
    assert mean.shape == logvar.shape == (2, *cfg.latent_shape)
    assert planes.shape == (2, *cfg.triplane_shape)
    assert v.shape == mean.shape
    assert out.rgb.shape == (2, 5, 3) and out.depth.shape == (2, 5)
    assert tokens == [describe(cfg)["dit_tokens"]]  # the presets table counts the tokens the DiT sees


def test_paper_preset_has_the_published_shapes():
    """LN3Diff's Objaverse text-to-3D scale: 256^2 views of RGB + Plücker + depth (10 channels), latent
    [3, 4, 32, 32] (f = 8), a DiT-L/2 over 768 tokens with CLIP ViT-L/14 text (77 x 768), tri-planes 3 x 32 x 256^2."""
    cfg = get_preset("paper")
    views = cfg.encoder.num_views
    with torch.device("meta"):
        vae, dit = TriplaneVAE(cfg), DiT(cfg)
        c2w = torch.stack([orbit_camera(360.0 * i / views, 20.0, 4.0) for i in range(views)])[None]
        intrinsics = intrinsics_from_fov(0.9, 256, 256).expand(1, views, 4)
        mean, _ = vae.encode(torch.rand(1, views, 3, 256, 256), c2w, intrinsics, torch.rand(1, views, 1, 256, 256))
        planes = vae.decode(mean)
        tokens = _count_tokens(dit)
        v = dit(mean, torch.rand(1), torch.randn(1, 77, 768), torch.randn(1, 768))
    assert vae.encoder.stem.in_channels == 10
    assert mean.shape == v.shape == (1, 3, 4, 32, 32)
    assert planes.shape == (1, 3, 32, 256, 256)
    assert tokens == [768]
    assert 450e6 < describe(cfg)["dit"] < 650e6  # DiT-L/2 (458M) plus cross-attention to text


def dit_parameters(cfg) -> int:
    """A text-only DiT's parameter count from its config alone: DiT's adaLN-Zero blocks plus cross-attention to text."""
    d, w = cfg.dit, cfg.dit.width
    assert d.image_dim == 0, "image conditioning adds modules this count leaves out"

    def linear(fan_in: int, fan_out: int) -> int:
        return fan_in * fan_out + fan_out

    patch = cfg.latent_channels * d.patch_size ** 2
    hidden = int(w * d.mlp_ratio)
    self_attention = linear(w, w) + linear(w, 2 * w) + linear(w, w)  # q, kv, out
    cross_attention = linear(w, w) + linear(d.context_dim, 2 * w) + linear(w, w)
    block = self_attention + 2 * w + cross_attention + linear(w, hidden) + linear(hidden, w) + linear(w, 6 * w)
    inputs = linear(patch, w) + linear(256, w) + linear(w, w) + linear(d.context_dim, w) + linear(w, w)  # x, t, text
    return inputs + d.depth * block + linear(w, 2 * w) + linear(w, patch)


@pytest.mark.parametrize("name", PROJECT_PRESETS)
def test_dit_parameters_follow_the_config(name):
    cfg = get_preset(name)
    assert describe(cfg)["dit"] == dit_parameters(cfg)
    other = cfg.replace(dit=dataclasses.replace(cfg.dit, depth=2, mlp_ratio=2.0, context_dim=512))
    assert describe(other)["dit"] == dit_parameters(other)  # every field reaches the modules


def test_patchify_roundtrip_odd_channels():
    x = torch.randn(2, 3, 5, 6, 6)
    for p in (1, 2, 3):
        tokens = patchify(x, p)
        assert tokens.shape == (2, 3 * (6 // p) ** 2, 5 * p * p)
        assert torch.equal(unpatchify(tokens, p, 5, 6), x)


def test_gradients_flow_encoder_to_renderer():
    torch.manual_seed(0)
    cfg = get_preset("tiny")
    vae = TriplaneVAE(cfg)
    b, v = 2, cfg.encoder.num_views
    c2w = torch.stack([torch.stack([orbit_camera(90.0 * i + 7 * j, 25.0, 2.7) for i in range(v)]) for j in range(b)])
    intr = intrinsics_from_fov(0.8, 64, 64).expand(b, v, 4)
    mean, logvar = vae.encode(torch.rand(b, v, 3, 64, 64), c2w, intr)
    planes = vae.decode(vae.sample_posterior(mean, logvar))
    origins = torch.randn(b, 37, 3) * 0.1 + torch.tensor([0.0, 0.0, 2.5])
    dirs = torch.nn.functional.normalize(-origins + 0.2 * torch.randn(b, 37, 3), dim=-1)
    out = render_rays(vae.field, planes, origins, dirs, cfg.renderer, perturb=True)
    (out.rgb.square().mean() + out.opacity.mean() + vae.kl(mean, logvar)).backward()
    for name, p in vae.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # every stage actually receives signal, not just the last layers
    for module in (vae.encoder.stem, vae.encoder.lift[-1], vae.encoder.head[-1], vae.decoder.embed,
                   vae.decoder.upsampler.out, vae.field.mlp[0]):
        assert module.weight.grad.abs().sum() > 0


def test_dit_is_zero_at_init_and_conditions_after_update():
    torch.manual_seed(0)
    cfg = get_preset("tiny")
    dit = DiT(cfg)
    x = torch.randn(3, *cfg.latent_shape)
    ctx = torch.randn(3, cfg.dit.context_len, cfg.dit.context_dim)
    pooled = torch.randn(3, cfg.dit.context_dim)
    assert dit(x, torch.rand(3), ctx, pooled).abs().max() == 0  # AdaLN-Zero
    for p in dit.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    a = dit(x, torch.full((3,), 0.5), ctx, pooled)
    b = dit(x, torch.full((3,), 0.5), ctx.flip(0), pooled.flip(0))
    assert not torch.allclose(a, b)  # the text condition changes the prediction


def test_dit_takes_image_tokens_of_its_image_dim():
    cfg = get_preset("tiny")
    cfg = cfg.replace(dit=type(cfg.dit)(**{**cfg.dit.__dict__, "image_dim": 24}))
    dit = DiT(cfg)
    x = torch.randn(2, *cfg.latent_shape)
    v = dit(x, torch.rand(2), torch.randn(2, cfg.dit.context_len, cfg.dit.context_dim),
            torch.randn(2, cfg.dit.context_dim), image_tokens=torch.randn(2, 5, 24))
    assert v.shape == x.shape
    with pytest.raises(ValueError, match="image_dim"):
        DiT(get_preset("tiny"))(x, torch.rand(2), torch.randn(2, 32, 384), torch.randn(2, 384),
                                image_tokens=torch.randn(2, 5, 24))


def test_projection_lands_on_the_pixel_whose_ray_holds_the_point():
    from ln3diff_rt.cameras import camera_rays
    from ln3diff_rt.models.encoder import plane_sample_points, project_to_views

    h, w = 24, 32
    c2w = orbit_camera(40.0, 25.0, 3.0)
    intr = intrinsics_from_fov(0.9, w, h)
    origins, dirs = camera_rays(c2w, intr, h, w)
    points = torch.stack([origins[5, 7] + 2.5 * dirs[5, 7], origins[17, 26] + 3.1 * dirs[17, 26]])
    cols, rows = torch.meshgrid(torch.arange(w) + 0.5, torch.arange(h) + 0.5, indexing="xy")
    feats = torch.stack([cols, rows])[None, None]  # a feature map that holds its own pixel coordinates
    seen = project_to_views(feats, points, c2w[None, None], intr[None, None], (h, w))
    torch.testing.assert_close(seen[0], torch.tensor([[7.5, 5.5], [26.5, 17.5]]), atol=1e-3, rtol=0)
    grid = plane_sample_points(4, 3)
    assert grid.shape == (3, 4, 4, 3, 3)
    assert torch.allclose(grid[1, 2, 3, 0], torch.tensor([0.75, -2 / 3, 0.25]))  # xz plane: x=col, z=row, y=depth


def test_encoder_latents_depend_on_the_views():
    torch.manual_seed(0)
    cfg = get_preset("tiny")
    vae = TriplaneVAE(cfg)
    v = cfg.encoder.num_views
    c2w = torch.stack([orbit_camera(90.0 * i, 20.0, 4.0) for i in range(v)])[None]
    intr = intrinsics_from_fov(0.9, 64, 64).expand(1, v, 4)
    red = torch.ones(1, v, 3, 64, 64)
    red[:, :, 1:, 24:40, 24:40] = 0.0  # a red square in the middle of each view
    blue = torch.ones(1, v, 3, 64, 64)
    blue[:, :, :2, 24:40, 24:40] = 0.0
    with torch.no_grad():
        a, _ = vae.encode(red, c2w, intr)
        b, _ = vae.encode(blue, c2w, intr)
    assert (a - b).std() > 0.1 * a.std()  # untrained, the input already shapes the latent


def test_encoder_lift_samples_finer_trunk_levels():
    """lift_levels = 2 also samples the trunk level before the last (stride f / 2): a detail smaller than one
    stride-f feature pixel reaches the latent through it (its weights get a gradient and change the latent);
    1 keeps the checkpoint layout of the shipped model's encoder (no extra weights); out of range is refused."""
    torch.manual_seed(1)
    base = get_preset("tiny")
    v = base.encoder.num_views
    c2w = torch.stack([orbit_camera(90.0 * i + 10.0, 20.0, 4.0) for i in range(v)])[None]
    intr = intrinsics_from_fov(0.9, 64, 64).expand(1, v, 4)
    views = torch.rand(1, v, 3, 64, 64)  # RGB; the VAE appends the rays
    one = TriplaneVAE(base)
    assert not any(k.startswith("encoder.to_fine") for k in one.state_dict())
    cfg = base.replace(encoder=dataclasses.replace(base.encoder, lift_levels=2))
    two = TriplaneVAE(cfg)
    assert two.encoder.to_fine[0][-1].in_channels == base.encoder.channels[-2]
    mean, _ = two.encode(views, c2w, intr)
    assert mean.shape == one.encode(views, c2w, intr)[0].shape
    mean.square().sum().backward()
    assert two.encoder.to_fine[0][-1].weight.grad.abs().sum() > 0
    with torch.no_grad():
        two.encoder.to_fine[0][-1].weight.mul_(2.0)
        assert not torch.allclose(two.encode(views, c2w, intr)[0], mean)
    with pytest.raises(ValueError, match="lift_levels 4"):
        TriplaneVAE(base.replace(encoder=dataclasses.replace(base.encoder, lift_levels=4)))


@pytest.mark.parametrize("image_dim", [0, 24])
def test_dit_bound_to_a_condition_predicts_what_forward_does(image_dim):
    """Sampling binds the condition once (`bind_condition`: the cross-attention's keys and values computed before
    the steps); each step must give forward's prediction exactly, with and without image tokens."""
    torch.manual_seed(3)
    cfg = get_preset("tiny")
    cfg = cfg.replace(dit=dataclasses.replace(cfg.dit, image_dim=image_dim))
    dit = DiT(cfg)
    for p in dit.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    ctx, pooled = torch.randn(3, 7, cfg.dit.context_dim), torch.randn(3, cfg.dit.context_dim)
    image = None
    if image_dim:
        image = torch.randn(3, 5, image_dim)
        image[1] = 0  # "no image" for one sample of the batch
    with torch.no_grad():
        step = dit.bind_condition(ctx, pooled, image)
        for t in (0.9, 0.35):
            x, tt = torch.randn(3, *cfg.latent_shape), torch.full((3,), t)
            assert torch.equal(step(x, tt), dit(x, tt, ctx, pooled, image))


def test_sampling_computes_the_condition_once_and_compiled_wrappers_keep_their_own_graph():
    from ln3diff_rt.sampling import Condition, sample

    torch.manual_seed(4)
    cfg = get_preset("tiny")
    dit = DiT(cfg)
    for p in dit.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    calls = []
    dit.blocks[0].cross.to_kv.register_forward_hook(lambda *_: calls.append(1))
    cond = Condition(torch.randn(2, 9, cfg.dit.context_dim), torch.randn(2, cfg.dit.context_dim))
    uncond = Condition(torch.randn(2, 9, cfg.dit.context_dim), torch.randn(2, cfg.dit.context_dim))
    noise = torch.randn(2, *cfg.latent_shape)
    bound = sample(dit, noise, cond, uncond, steps=5, guidance=3.0)
    assert len(calls) == 1  # the first block's cross keys and values: once for 5 steps (both branches batched)
    # The plain path (what a compiled module or engine gets) computes them at each step, and samples the same.
    unbound = sample(lambda *args: dit(*args), noise, cond, uncond, steps=5, guidance=3.0)
    assert len(calls) == 1 + 5
    torch.testing.assert_close(bound, unbound, rtol=0, atol=1e-6)

    # torch.compile's module forwards attribute lookups to the DiT, yet `bind` must call its compiled forward.
    compiled = torch.compile(dit)  # compiles on its first call, which this test never makes
    assert hasattr(compiled, "bind_condition") and getattr(type(compiled), "bind_condition", None) is None


@pytest.mark.parametrize("name", [*PROJECT_PRESETS, "tiny+image"])
def test_models_make_no_tensor_off_their_device(name):
    """Every forward on the meta device: a tensor made on the CPU inside one (a factory call without `device=`)
    meets a meta tensor and raises, as it would meet a CUDA tensor on a GPU (the GPU suite's first run found
    one in the timestep embedding). Meta tensors carry no data, so even `paper` costs nothing here."""
    cfg = get_preset(name.removesuffix("+image"))
    if name.endswith("+image"):
        cfg = cfg.replace(dit=dataclasses.replace(cfg.dit, image_dim=24))
    enc, batch, meta = cfg.encoder, 2, torch.device("meta")
    with meta:
        vae, dit = TriplaneVAE(cfg).eval(), DiT(cfg).eval()
    images = torch.rand(batch, enc.num_views, 3, enc.image_size, enc.image_size, device=meta)
    c2w = torch.stack([orbit_camera(90.0 * i, 20.0, 4.0) for i in range(enc.num_views)]).expand(batch, -1, -1, -1)
    intrinsics = intrinsics_from_fov(0.9, enc.image_size, enc.image_size).expand(batch, enc.num_views, 4)
    depth = torch.rand(batch, enc.num_views, 1, enc.image_size, enc.image_size, device=meta) if enc.use_depth else None
    with torch.no_grad():
        mean, _ = vae.encode(images, c2w.to(meta), intrinsics.to(meta), depth)
        planes = vae.decode(mean)
        density, rgb = vae.field(planes, torch.rand(batch, 7, 3, device=meta))
        image = torch.randn(batch, 5, 24, device=meta) if cfg.dit.image_dim else None
        cond = Condition(torch.randn(batch, cfg.dit.context_len, cfg.dit.context_dim, device=meta),
                         torch.randn(batch, cfg.dit.context_dim, device=meta), image)
        z = sample(dit, torch.randn(batch, *cfg.latent_shape, device=meta), cond, cond, steps=2, guidance=3.0)
    assert mean.device == planes.device == density.device == rgb.device == z.device == meta
    assert z.shape == (batch, *cfg.latent_shape) and density.shape == (batch, 7)

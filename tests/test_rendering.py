"""The renderer on an analytic case: tri-planes that encode a sphere give its silhouette and depth."""

import math

import pytest
import torch

from ln3diff_rt.cameras import camera_rays, intrinsics_from_fov, orbit_camera
from ln3diff_rt.config import RendererConfig
from ln3diff_rt.models.field import TriplaneField
from ln3diff_rt.rendering import importance_t, occupancy_grid, render_chunked, render_rays

RADIUS = 0.6


def sphere_triplane(resolution: int) -> torch.Tensor:
    """One-channel planes whose sum at p is |p|^2: each plane stores (u^2 + v^2) / 2 at its texel centres."""
    centres = (2 * torch.arange(resolution, dtype=torch.float64) + 1) / resolution - 1  # align_corners=False
    v, u = torch.meshgrid(centres, centres, indexing="ij")
    plane = ((u * u + v * v) / 2).float()
    return plane.expand(1, 3, 1, resolution, resolution).clone()


def sphere_field(cfg: RendererConfig) -> TriplaneField:
    """Hand-set MLP: hidden = softplus(k (R^2 - |p|^2)), density = softplus(w hidden - 12 - 1), constant red."""
    field = TriplaneField(1, cfg)
    with torch.no_grad():
        field.mlp[0].weight.fill_(-200.0)
        field.mlp[0].bias.fill_(200.0 * RADIUS**2)
        field.mlp[2].weight.zero_()
        field.mlp[2].weight[0, 0] = 50.0
        field.mlp[2].bias.copy_(torch.tensor([-12.0, 8.0, -8.0, -8.0]))  # empty space: density ~ 1e-6
    return field


def analytic_hits(origins, dirs):
    """Distance to the sphere |p| = RADIUS along each ray, inf where the ray misses."""
    b = (origins * dirs).sum(-1)
    c = (origins * origins).sum(-1) - RADIUS**2
    disc = b * b - c
    t = -b - torch.sqrt(disc.clamp(min=0))
    return torch.where(disc > 0, t, torch.full_like(t, math.inf))


@pytest.mark.parametrize("azimuth,elevation", [(20.0, 15.0), (137.0, -40.0)])
def test_sphere_silhouette_and_depth(azimuth, elevation):
    cfg = RendererConfig(hidden=1, num_samples=64, num_importance=64)
    field = sphere_field(cfg)
    planes = sphere_triplane(129)
    size = 41
    origins, dirs = camera_rays(orbit_camera(azimuth, elevation, 2.5), intrinsics_from_fov(0.9, size, size),
                                size, size)
    origins, dirs = origins.reshape(1, -1, 3), dirs.reshape(1, -1, 3)
    with torch.no_grad():
        out = render_rays(field, planes, origins, dirs, cfg)
    t_hit = analytic_hits(origins[0], dirs[0])
    inside = torch.isfinite(t_hit)
    predicted = out.opacity[0] > 0.5
    assert 0.1 < inside.float().mean() < 0.9
    # silhouette: disagreement only on rays grazing the boundary
    wrong = predicted != inside
    assert wrong.float().mean() < 0.02
    b = (origins[0] * dirs[0]).sum(-1)
    miss_distance = ((origins[0] * origins[0]).sum(-1) - b * b).sqrt()  # closest approach to the centre
    assert ((miss_distance[wrong] - RADIUS).abs() < 0.03).all()
    # depth where clearly inside; colour red over white elsewhere
    core = miss_distance < RADIUS * 0.9
    assert torch.allclose(out.depth[0][core], t_hit[core], atol=0.03)
    assert torch.allclose(out.rgb[0][core], torch.tensor([1.0, 0.0, 0.0]), atol=0.01)
    assert torch.allclose(out.rgb[0][~inside & ~wrong], torch.ones(3), atol=1e-3)


def test_importance_samples_concentrate_on_weights():
    bins = torch.linspace(0.0, 1.0, 11).expand(2, 11)
    weights = torch.zeros(2, 10)
    weights[:, 7] = 1.0
    t = importance_t(bins, weights, 50, perturb=False)
    assert ((t >= 0.7) & (t <= 0.8)).float().mean() > 0.95
    g = torch.Generator().manual_seed(0)
    t2 = importance_t(bins, weights, 50, perturb=True, generator=g)
    assert ((t2 >= 0.7) & (t2 <= 0.8)).float().mean() > 0.9


def test_occupancy_skipping_matches_full_marching():
    cfg = RendererConfig(hidden=1, num_samples=48, num_importance=48)
    field, planes = sphere_field(cfg), sphere_triplane(65)
    origins, dirs = camera_rays(orbit_camera(60.0, 30.0, 2.5), intrinsics_from_fov(0.9, 29, 29), 29, 29)
    origins, dirs = origins.reshape(1, -1, 3), dirs.reshape(1, -1, 3)
    occupancy = occupancy_grid(field, planes, resolution=16)
    assert 0.05 < occupancy.float().mean() < 0.5  # it does skip most of the box
    with torch.no_grad():
        full = render_rays(field, planes, origins, dirs, cfg)
        skipped = render_rays(field, planes, origins, dirs, cfg, occupancy=occupancy)
    assert torch.allclose(full.rgb, skipped.rgb, atol=2e-3)
    assert torch.allclose(full.opacity, skipped.opacity, atol=2e-3)
    with pytest.raises(ValueError, match="one object at a time"):
        render_rays(field, planes.expand(2, -1, -1, -1, -1), origins.expand(2, -1, -1), dirs.expand(2, -1, -1), cfg,
                    occupancy=occupancy)


def test_inference_reuses_coarse_samples_without_changing_the_image():
    """Under no_grad the fine pass reuses the coarse samples' field values; with autograd it
    re-evaluates them. Both must composite the same samples to the same image."""
    cfg = RendererConfig(hidden=1, num_samples=21, num_importance=19)
    field, planes = sphere_field(cfg), sphere_triplane(33)
    origins, dirs = camera_rays(orbit_camera(20.0, 10.0, 2.5), intrinsics_from_fov(0.9, 17, 13), 17, 13)
    origins, dirs = origins.reshape(1, -1, 3), dirs.reshape(1, -1, 3)
    with torch.no_grad():
        reused = render_rays(field, planes, origins, dirs, cfg)
    evaluated = render_rays(field, planes.requires_grad_(True), origins, dirs, cfg)
    assert evaluated.rgb.requires_grad
    for name in ("rgb", "depth", "opacity"):
        torch.testing.assert_close(getattr(reused, name), getattr(evaluated, name).detach(), atol=1e-5, rtol=1e-5)


def test_rays_that_miss_the_occupied_cells_are_background():
    cfg = RendererConfig(hidden=1, num_samples=16, num_importance=16, background=(0.2, 0.4, 0.6))
    field, planes = sphere_field(cfg), sphere_triplane(33)
    occupancy = occupancy_grid(field, planes, resolution=16)
    origins = torch.tensor([[[0.0, -3.0, 0.0], [0.0, -3.0, 0.0], [0.9, -3.0, 0.9]]])
    dirs = torch.tensor([[[0.0, 1.0, 0.0], [0.0, -1.0, 0.0], [0.0, 1.0, 0.0]]])  # hit, away, past a corner
    with torch.no_grad():
        out = render_rays(field, planes, origins, dirs, cfg, occupancy=occupancy)
        empty = render_rays(field, planes, origins, dirs, cfg, occupancy=torch.zeros_like(occupancy))
    assert out.opacity[0, 0] > 0.99 and torch.allclose(out.rgb[0, 0], torch.tensor([1.0, 0.0, 0.0]), atol=0.01)
    assert torch.equal(out.rgb[0, 1:], torch.tensor([[0.2, 0.4, 0.6]] * 2))
    assert torch.equal(out.opacity[0, 1:], torch.zeros(2))
    assert torch.equal(empty.rgb[0], torch.tensor([[0.2, 0.4, 0.6]] * 3))


def test_chunked_rendering_checks_in_before_every_chunk_and_can_be_stopped():
    cfg = RendererConfig(hidden=1, num_samples=16, num_importance=16)
    field, planes = sphere_field(cfg), sphere_triplane(33)
    origins, dirs = camera_rays(orbit_camera(60.0, 30.0, 2.5), intrinsics_from_fov(0.9, 25, 25), 25, 25)
    origins, dirs = origins.reshape(1, -1, 3), dirs.reshape(1, -1, 3)  # 625 rays: 5 chunks of 128
    calls = []
    with torch.no_grad():
        whole = render_rays(field, planes, origins, dirs, cfg)
        chunked = render_chunked(field, planes, origins, dirs, cfg, chunk=128, on_chunk=lambda: calls.append(1))
        assert len(calls) == 5 and torch.allclose(whole.rgb, chunked.rgb, atol=1e-6)

        def stop_at_the_third():
            if len(calls) == 7:
                raise InterruptedError
            calls.append(1)

        with pytest.raises(InterruptedError):
            render_chunked(field, planes, origins, dirs, cfg, chunk=128, on_chunk=stop_at_the_third)
    assert len(calls) == 7  # two chunks rendered, the third refused

"""The renderer on an analytic case (tri-planes that encode a sphere give its silhouette and depth), and the
preview path (`render_occupied`) against marching every sample on random fields."""

import dataclasses
import math

import pytest
import torch

from kernels import triplane_sample
from kernels.occupancy import occupied_box, occupied_samples
from ln3diff_rt.cameras import camera_rays, intrinsics_from_fov, orbit_camera, ray_aabb_intersect
from ln3diff_rt.config import RendererConfig
from ln3diff_rt.models.field import TriplaneField
from ln3diff_rt.rendering import (
    importance_t,
    occupancy_grid,
    preview_renderer,
    render_chunked,
    render_occupied,
    render_rays,
)

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


def random_field(cfg: RendererConfig, seed: int = 0) -> tuple[TriplaneField, torch.Tensor]:
    """A random field (5 channels, 13 x 13 planes) whose density logit is rescaled so that a fifth of the box is
    dense (up to ~50) and the rest nearly empty: rays stop inside it, pass by, or cross thin parts."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    field = TriplaneField(5, cfg)
    planes = torch.randn(1, 3, 5, 13, 13, generator=g)
    with torch.no_grad():
        raw = field.mlp(triplane_sample(planes, torch.rand(1, 4096, 3, generator=g) * 2 - 1))[0, :, 0]
        q, s = raw.quantile(0.8), raw.std()
        field.mlp[2].weight[0] *= 12 / s
        field.mlp[2].bias[0] = (field.mlp[2].bias[0] - q) * 12 / s
    return field, planes


class CountingField(torch.nn.Module):
    """The field, recording every point it is asked about."""

    def __init__(self, field):
        super().__init__()
        self.field, self.points = field, []

    def forward(self, planes, points):
        self.points.append(points[0])
        return self.field(planes, points)

    @property
    def queried(self) -> torch.Tensor:
        return torch.cat(self.points) if self.points else torch.zeros(0, 3)


def odd_rays(width: int = 23, height: int = 19, fov: float = 0.9):
    origins, dirs = camera_rays(orbit_camera(33.0, 21.0, 2.7), intrinsics_from_fov(fov, width, height), height, width)
    return origins.reshape(1, -1, 3), dirs.reshape(1, -1, 3)


def test_occupied_march_matches_every_sample_on_a_random_field():
    """With every cell occupied the preview path places the same samples as `render_rays`; it differs only by
    what it skips: samples behind opaque points (transmittance < 1e-4) and importance samples on rays the
    coarse samples find empty (here up to 0.9 of 255 in opacity: a random field hides more from 19 samples
    than a trained one)."""
    cfg = RendererConfig(hidden=7, num_samples=19, num_importance=11, background=(0.3, 0.5, 0.7))
    field, planes = random_field(cfg)
    origins, dirs = odd_rays()
    counting = CountingField(field)
    with torch.no_grad():
        reference = render_rays(counting, planes, origins, dirs, cfg)
        every_sample = counting.queried.shape[0]
        counting.points.clear()
        occupied = render_occupied(counting, planes, origins, dirs, cfg, torch.ones(9, 9, 9, dtype=torch.bool))
    assert 0.1 < reference.opacity.mean() < 0.9 and (reference.opacity > 0.999).any()  # stops, passes, partial
    assert counting.queried.shape[0] < every_sample
    for name in ("rgb", "opacity"):
        diff = (getattr(occupied, name) - getattr(reference, name)).abs()
        assert diff.max() < 4e-3 and diff.mean() < 1e-4, name
    visible = reference.opacity > 0.5
    assert torch.allclose(occupied.depth[visible], reference.depth[visible], atol=1e-2)


def test_opaque_rays_stop_marching():
    """A ray into the sphere stops a few coarse samples past its surface: the field is not asked about the rest."""
    cfg = RendererConfig(hidden=1, num_samples=41, num_importance=9)
    counting = CountingField(sphere_field(cfg))
    origins, dirs = torch.tensor([[[0.0, -3.0, 0.0]]]), torch.tensor([[[0.0, 1.0, 0.0]]])
    with torch.no_grad():
        out = render_occupied(counting, sphere_triplane(33), origins, dirs, cfg, torch.ones(7, 7, 7, dtype=torch.bool))
    assert out.opacity[0, 0] > 0.999 and abs(out.depth[0, 0] - (3.0 - RADIUS)) < 0.02
    # 8 coarse samples lie before the surface at y = -0.6 (spacing 2 / 41); the march stops within a block past it
    assert len(counting.queried) <= 8 + 4 + cfg.num_importance


def test_preview_queries_the_field_only_in_occupied_cells_and_rays_that_miss_are_background():
    cfg = RendererConfig(hidden=7, num_samples=17, num_importance=9, background=(0.2, 0.4, 0.6))
    field, planes = random_field(cfg, seed=1)
    occupancy = torch.zeros(13, 13, 13, dtype=torch.bool)
    occupancy[3:9, 5:11, 2:7] = True  # an L of two blocks off centre: its box leaves most rays out, and holds
    occupancy[3:5, 5:11, 7:9] = True  # empty cells that rays cross
    origins, dirs = odd_rays()
    counting = CountingField(field)
    with torch.no_grad():
        out = render_occupied(counting, planes, origins, dirs, cfg, occupancy)
    points = counting.queried
    assert len(points) > 0
    assert occupied_samples(occupancy, points, torch.zeros_like(points), torch.zeros(len(points), 1)).all()
    _, _, hit = ray_aabb_intersect(origins[0], dirs[0], *occupied_box(occupancy))
    assert 0.1 < hit.float().mean() < 0.9
    assert torch.equal(out.rgb[0, ~hit], torch.tensor([[0.2, 0.4, 0.6]]).expand(int((~hit).sum()), 3))
    assert torch.equal(out.opacity[0, ~hit], torch.zeros(int((~hit).sum())))
    assert torch.equal(out.depth[0, ~hit], torch.zeros(int((~hit).sum())))
    assert (out.opacity[0, hit] > 0.5).any()


def test_preview_sample_counts_keep_the_sphere_frame():
    """At preview counts the analytic sphere's 8-bit frame is the one marching every sample at full counts gives."""
    cfg = RendererConfig(hidden=1, num_samples=32, num_importance=32)
    preview = preview_renderer(cfg)
    assert 1 <= preview.num_samples < cfg.num_samples and preview.num_importance < cfg.num_importance
    assert dataclasses.replace(preview, num_samples=32, num_importance=32) == cfg  # only the counts change
    field, planes = sphere_field(cfg), sphere_triplane(65)
    origins, dirs = camera_rays(orbit_camera(60.0, 30.0, 2.5), intrinsics_from_fov(0.9, 45, 45), 45, 45)
    origins, dirs = origins.reshape(1, -1, 3), dirs.reshape(1, -1, 3)
    with torch.no_grad():
        reference = render_rays(field, planes, origins, dirs, cfg)
        fast = render_occupied(field, planes, origins, dirs, preview, occupancy_grid(field, planes, resolution=16))
    to_uint8 = lambda rgb: (rgb.clamp(0, 1) * 255 + 0.5).to(torch.uint8).int()  # noqa: E731
    error = (to_uint8(fast.rgb) - to_uint8(reference.rgb)).abs()
    assert 0.1 < reference.opacity.mean() < 0.9
    assert error.float().mean() < 0.05 and error.max() <= 2


def test_chunked_preview_checks_in_before_every_chunk_of_marched_rays():
    cfg = RendererConfig(hidden=7, num_samples=13, num_importance=7)
    field, planes = random_field(cfg, seed=2)
    occupancy = torch.zeros(11, 11, 11, dtype=torch.bool)
    occupancy[2:8, 3:9, 4:10] = True
    origins, dirs = odd_rays(fov=1.3)
    _, _, hit = ray_aabb_intersect(origins[0], dirs[0], *occupied_box(occupancy))
    calls = []
    with torch.no_grad():
        whole = render_occupied(field, planes, origins, dirs, cfg, occupancy)
        chunked = render_chunked(field, planes, origins, dirs, cfg, chunk=37, occupancy=occupancy,
                                 on_chunk=lambda: calls.append(1))
    assert len(calls) == math.ceil(int(hit.sum()) / 37) > 1
    for name in ("rgb", "depth", "opacity"):
        torch.testing.assert_close(getattr(chunked, name), getattr(whole, name), atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="perturb"):
        render_rays(field, planes, origins, dirs, cfg, perturb=True, occupancy=occupancy)

"""Rasterisation (ln3diff_rt/raster.py): fragments, and mesh frames (previews): coverage, depth order, colours and
the cameras of rays."""

import math

import numpy as np
import pytest
import torch
import trimesh

from ln3diff_rt.cameras import camera_rays, intrinsics_from_fov, orbit_camera, project_points
from ln3diff_rt.raster import rasterize, render_mesh

WHITE = (1.0, 1.0, 1.0)


def test_rasterize_covers_pixel_centres_inside_the_triangle():
    # the lower-left half of a 4x4 square, diagonal from (0, 0) to (4, 4) in (x right, y down) pixels
    triangle = torch.tensor([[[0.0, 0.0], [4.0, 4.0], [0.0, 4.0]]], dtype=torch.float64)
    rows, cols, tri, weights = (t.numpy() for t in rasterize(triangle, 8, 8))
    assert sorted(zip(rows.tolist(), cols.tolist(), strict=True)) == [(r, c) for r in range(4) for c in range(r + 1)]
    assert (tri == 0).all() and np.allclose(weights.sum(axis=1), 1.0) and (weights >= -1e-7).all()
    centres = weights @ np.array([[0.0, 0.0], [4.0, 4.0], [0.0, 4.0]])  # barycentric -> the pixel centre itself
    assert np.allclose(centres, np.stack([cols + 0.5, rows + 0.5], axis=1))
    empty = rasterize(torch.tensor([[[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]]), 8, 8)  # degenerate: nothing
    assert all(len(a) == 0 for a in empty)


def _sphere(centre, radius, subdivisions=4):
    mesh = trimesh.creation.icosphere(subdivisions=subdivisions, radius=radius)
    return torch.tensor(mesh.vertices + np.asarray(centre), dtype=torch.float32), torch.tensor(mesh.faces)


def _ray_sphere_mask(c2w, intrinsics, size, centre, radius, supersample=4):
    """Fraction of each pixel's sub-pixel rays (camera_rays at `supersample` x the size) that hit the sphere."""
    origins, dirs = camera_rays(c2w, intrinsics * supersample, size * supersample, size * supersample)
    oc = origins - torch.tensor(centre)
    b = (oc * dirs).sum(-1)
    hit = (b * b - (oc * oc).sum(-1) + radius ** 2 > 0) & (b < 0)
    return hit.float().view(size, supersample, size, supersample).mean(dim=(1, 3))


@pytest.mark.parametrize("azimuth", [-90.0, 33.0])
def test_an_off_centre_sphere_lands_where_the_rays_of_previews_find_it(azimuth):
    """Same cameras as ray marching (no flip or shift): coverage of an off-centre sphere matches ray-sphere hits."""
    size, centre, radius = 61, (0.45, -0.2, 0.3), 0.35
    c2w = orbit_camera(azimuth, 20.0, 3.2)
    intrinsics = intrinsics_from_fov(math.radians(50.0), size, size)
    vertices, faces = _sphere(centre, radius)
    image = render_mesh(vertices, faces, torch.zeros(len(vertices), 3), c2w, intrinsics, size, WHITE, supersample=4)
    coverage = 1.0 - image[..., 0]
    expected = _ray_sphere_mask(c2w, intrinsics, size, centre, radius)
    assert expected.sum() > 50  # in view, and off centre:
    ys, xs = torch.nonzero(expected > 0.5, as_tuple=True)
    assert abs(xs.float().mean() - size / 2) + abs(ys.float().mean() - size / 2) > 3
    assert (coverage - expected).abs().mean() < 0.01  # the icosphere's facets and sampling, not a misplacement
    assert abs(coverage.sum() - expected.sum()) / expected.sum() < 0.03


def test_the_nearer_face_wins_whatever_the_order_of_faces():
    c2w = orbit_camera(0.0, 0.0, 3.0)  # at +X, looking at the origin
    intrinsics = intrinsics_from_fov(math.radians(50.0), 33, 33)
    quad = torch.tensor([[0.0, -0.5, -0.5], [0.0, 0.5, -0.5], [0.0, 0.5, 0.5], [0.0, -0.5, 0.5]])
    vertices = torch.cat([quad + torch.tensor([0.4, 0.0, 0.0]), quad])  # the first quad nearer the camera
    near_faces, far_faces = torch.tensor([[0, 1, 2], [0, 2, 3]]), torch.tensor([[4, 5, 6], [4, 6, 7]])
    colours = torch.cat([torch.tensor([[1.0, 0.0, 0.0]]).expand(4, 3), torch.tensor([[0.0, 0.0, 1.0]]).expand(4, 3)])
    for faces in (torch.cat([near_faces, far_faces]), torch.cat([far_faces, near_faces])):
        image = render_mesh(vertices, faces, colours, c2w, intrinsics, 33, WHITE)
        assert torch.allclose(image[16, 16], torch.tensor([1.0, 0.0, 0.0]))


def test_colours_blend_barycentrically_and_the_background_fills_the_rest():
    c2w = orbit_camera(0.0, 0.0, 3.0)
    intrinsics = intrinsics_from_fov(math.radians(50.0), 41, 41)
    g = torch.Generator().manual_seed(0)
    vertices = torch.tensor([[0.0, -0.8, -0.6], [0.0, 0.8, -0.6], [0.0, 0.0, 0.9]])
    colours = torch.rand(3, 3, generator=g)
    background = (0.2, 0.7, 0.4)
    image = render_mesh(vertices, torch.tensor([[0, 1, 2]]), colours, c2w, intrinsics, 41, background, supersample=1)
    # The pixel holding the centroid's projection is near the blend (1/3, 1/3, 1/3) of the vertex colours.
    uv, _ = project_points(vertices.mean(dim=0, keepdim=True), c2w, intrinsics)
    u, v = uv[0]
    assert torch.allclose(image[int(v), int(u)], colours.mean(dim=0), atol=0.05)
    assert torch.equal(image[0, 0], torch.tensor(background))
    assert torch.equal(image[-1, -1], torch.tensor(background))


def test_faces_behind_the_camera_are_not_drawn_and_bad_indices_are_refused():
    c2w = orbit_camera(0.0, 0.0, 3.0)
    intrinsics = intrinsics_from_fov(math.radians(50.0), 17, 17)
    behind = torch.tensor([[4.0, -0.5, -0.5], [4.0, 0.5, -0.5], [4.0, 0.0, 0.5]])  # past the camera at x = 3
    image = render_mesh(behind, torch.tensor([[0, 1, 2]]), torch.zeros(3, 3), c2w, intrinsics, 17, WHITE)
    assert torch.equal(image, torch.ones(17, 17, 3))
    with pytest.raises(ValueError, match="faces index vertices 0..2"):
        render_mesh(behind, torch.tensor([[0, 1, 3]]), torch.zeros(3, 3), c2w, intrinsics, 17, WHITE)

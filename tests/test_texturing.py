"""UV unwrapping, texture baking and levels of detail on analytic fields whose surface and colour are known."""

import numpy as np
import pytest
import torch
import trimesh

from ln3diff_rt.meshing import extract_mesh
from ln3diff_rt.raster import rasterize
from ln3diff_rt.texturing import bake_texture, dilate, levels_of_detail, unwrap, uv_to_pixels

RES = 64
SIZE = 256


def sphere(p: torch.Tensor) -> torch.Tensor:
    """Density 10 on the sphere |p| = 0.5, rising inwards."""
    return 200 * (0.5 - p.norm(dim=-1)) + 10.0


def stripes(p: torch.Tensor) -> torch.Tensor:
    """Colour with detail finer than a 2K-face mesh's vertex spacing: bands 0.1 apart along z, x and y."""
    return torch.stack([0.5 + 0.5 * torch.sin(30 * p[:, 2]), 0.5 + 0.5 * torch.cos(20 * p[:, 0]),
                        0.5 + 0.4 * torch.sin(25 * p[:, 1])], dim=-1)


@pytest.fixture(scope="module")
def sphere_mesh():
    return extract_mesh(sphere, RES, color_fn=stripes, faces=6000)


@pytest.fixture(scope="module")
def unwrapped(sphere_mesh):
    return unwrap(sphere_mesh, SIZE)


@pytest.fixture(scope="module")
def texture(unwrapped):
    return bake_texture(unwrapped, stripes, SIZE, chunk=4096)


def lookup(texture: np.ndarray, uvs: np.ndarray) -> np.ndarray:
    """Nearest texel of UVs [K, 2] -> colours [K, 3] in [0, 1]."""
    xy = np.floor(uv_to_pixels(uvs, texture.shape[0])).astype(int).clip(0, texture.shape[0] - 1)
    return texture[xy[:, 1], xy[:, 0]] / 255.0


def test_unwrap_splits_vertices_along_seams_and_keeps_the_surface(sphere_mesh, unwrapped):
    u = unwrapped
    assert len(u.faces) == len(sphere_mesh.faces) and len(u.vertices) >= len(sphere_mesh.vertices)
    assert u.uvs.shape == (len(u.vertices), 2) and u.uvs.min() >= 0.0 and u.uvs.max() <= 1.0
    assert set(map(tuple, u.vertices.round(6))) == set(map(tuple, sphere_mesh.vertices.round(6)))  # same points
    assert u.stats["charts"] >= 1
    welded = trimesh.Trimesh(u.vertices, u.faces)  # merges the seam copies back
    assert welded.is_watertight and welded.volume == pytest.approx(4 / 3 * np.pi * 0.5 ** 3, rel=0.03)
    # charts do not overlap: no texel centre lies inside two triangles' interiors
    rows, cols, _, weights = (t.numpy() for t in rasterize(torch.from_numpy(uv_to_pixels(u.uvs, SIZE)[u.faces]), SIZE,
                                                            SIZE))
    interior = (weights > 1e-3).all(axis=1)
    texel = rows[interior] * SIZE + cols[interior]
    assert len(np.unique(texel)) == len(texel)


def test_baked_texture_holds_the_field_colour_at_the_surface(unwrapped, texture):
    assert texture.shape == (SIZE, SIZE, 3) and texture.dtype == np.uint8
    # texel centres inside triangles: colour of the surface point there
    rows, cols, tri, weights = (t.numpy() for t in rasterize(
        torch.from_numpy(uv_to_pixels(unwrapped.uvs, SIZE)[unwrapped.faces]), SIZE, SIZE))
    points = np.einsum("kc,kcd->kd", weights, unwrapped.vertices[unwrapped.faces[tri]])
    expected = np.round(stripes(torch.from_numpy(points).float()).numpy() * 255)
    assert np.abs(texture[rows, cols] - expected).max() <= 1
    # every UV the mesh uses reads a colour close to the field's at that vertex (nearest texel, seams included)
    error = np.abs(lookup(texture, unwrapped.uvs) - stripes(torch.from_numpy(unwrapped.vertices)).numpy())
    assert np.percentile(error, 99) < 0.1


def test_dilation_fills_every_texel_from_the_nearest_covered_one():
    texture = np.zeros((5, 7, 3), np.uint8)
    covered = np.zeros((5, 7), bool)
    texture[1, 1], covered[1, 1] = (255, 0, 0), True
    texture[3, 6], covered[3, 6] = (0, 0, 255), True
    out = dilate(texture, covered)
    assert (out[covered] == texture[covered]).all()
    assert (out[0, 0] == (255, 0, 0)).all() and (out[4, 6] == (0, 0, 255)).all() and (out[4, 0] == (255, 0, 0)).all()
    assert np.array_equal(dilate(texture, np.ones((5, 7), bool)), texture)


def test_levels_of_detail_share_uvs_and_stay_closed(unwrapped):
    levels = levels_of_detail(unwrapped, (100_000, 2000, 500))
    assert levels[0] is unwrapped  # a budget the mesh already meets keeps it
    assert [len(m.faces) for m in levels[1:]] == [2000, 500]
    for level in levels[1:]:
        # each level's vertices are vertices of the unwrapped mesh with the same UVs and colours
        index = {tuple(v): i for i, v in enumerate(np.concatenate([unwrapped.vertices, unwrapped.uvs], axis=1))}
        rows = [index[tuple(v)] for v in np.concatenate([level.vertices, level.uvs], axis=1)]
        assert np.array_equal(unwrapped.vertex_colors[rows], level.vertex_colors)
        welded = trimesh.Trimesh(level.vertices, level.faces)  # seams collapsed on both sides alike: no cracks
        assert welded.is_watertight and welded.volume > 0.9 * 4 / 3 * np.pi * 0.5 ** 3


def test_texture_keeps_colour_detail_that_vertex_colours_lose_at_a_low_level(unwrapped, texture):
    """At 500 faces the vertices are ~0.08 apart, coarser than the stripes: the texture, baked on the detailed
    level, still holds them. Colour error at random points of the coarse surface, against the field."""
    coarse = levels_of_detail(unwrapped, (500,))[0]
    rng = np.random.default_rng(0)
    tri = rng.integers(0, len(coarse.faces), 20000)
    weights = rng.dirichlet(np.ones(3), len(tri))
    corners = coarse.faces[tri]
    points = np.einsum("kc,kcd->kd", weights, coarse.vertices[corners])
    truth = stripes(torch.from_numpy(points).float()).numpy()
    vertex = np.einsum("kc,kcd->kd", weights, coarse.vertex_colors[corners, :3] / 255.0)
    textured = lookup(texture, np.einsum("kc,kcd->kd", weights, coarse.uvs[corners]))
    vertex_error, texture_error = np.abs(vertex - truth).mean(), np.abs(textured - truth).mean()
    assert texture_error < 0.6 * vertex_error, (texture_error, vertex_error)

"""Mesh extraction and export on analytic fields whose threshold-10 surfaces are known."""

import io

import numpy as np
import pytest
import torch
import trimesh
from scipy.spatial import cKDTree

from ln3diff_rt.mesh_export import FORMATS, Placement, export_mesh, mesh_bytes, to_trimesh
from ln3diff_rt.meshing import extract_mesh
from ln3diff_rt.usd_export import USD_FORMATS

RES = 96
CELL = 2.0 / (RES - 1)
THRESHOLD = 10.0


def sphere(p: torch.Tensor, radius: float = 0.5) -> torch.Tensor:
    """Density 10 on the sphere |p| = radius, rising inwards (20 * 10 per unit of depth)."""
    return 20 * (radius - p.norm(dim=-1)) * 10 + THRESHOLD


def box(p: torch.Tensor) -> torch.Tensor:
    return 200 * (torch.tensor([0.6, 0.4, 0.3]) - p.abs()).amin(dim=-1) + THRESHOLD


def torus(p: torch.Tensor) -> torch.Tensor:
    ring = torch.stack([p[:, :2].norm(dim=-1) - 0.55, p[:, 2]], dim=-1)
    return 200 * (0.2 - ring.norm(dim=-1)) + THRESHOLD


def tall_ellipsoid(p: torch.Tensor) -> torch.Tensor:
    """Elongated along world Z: semi-axes 0.3, 0.4, 0.8."""
    return 200 * (1.0 - (p / torch.tensor([0.3, 0.4, 0.8])).norm(dim=-1)) + THRESHOLD


def position_color(p: torch.Tensor) -> torch.Tensor:
    return p * 0.5 + 0.5


def hausdorff(a: np.ndarray, b: np.ndarray) -> float:
    return max(cKDTree(a).query(b)[0].max(), cKDTree(b).query(a)[0].max())


@pytest.fixture(scope="module")
def sphere_mesh():
    return extract_mesh(sphere, RES, color_fn=position_color)


@pytest.mark.parametrize("field", [sphere, box, torus], ids=["sphere", "box", "torus"])
def test_coarse_to_fine_matches_dense(field):
    dense = extract_mesh(field, RES, coarse_resolution=RES)
    fast = extract_mesh(field, RES)
    assert dense.stats["evaluations"] == RES ** 3
    assert abs(len(fast.vertices) - len(dense.vertices)) <= 0.02 * len(dense.vertices)
    assert hausdorff(fast.vertices, dense.vertices) < CELL
    ratio = fast.stats["evaluations"] / dense.stats["evaluations"]
    print(f"{field.__name__}: {fast.stats['evaluations']} / {RES ** 3} evaluations ({ratio:.3f})")
    assert ratio < 0.3


def test_sphere_radius_normals_and_winding(sphere_mesh):
    m = sphere_mesh
    radii = np.linalg.norm(m.vertices, axis=1)
    assert abs(radii.mean() - 0.5) < 0.5 * CELL
    assert np.abs(radii - 0.5).max() < 0.5 * CELL
    outward = (m.normals * m.vertices / radii[:, None]).sum(axis=1)
    assert outward.min() > 0.9
    tm = trimesh.Trimesh(m.vertices, m.faces, process=False)
    assert tm.is_watertight and tm.is_winding_consistent
    assert tm.volume == pytest.approx(4 / 3 * np.pi * 0.5 ** 3, rel=0.02)  # positive: faces wind outwards
    assert m.vertices.dtype == np.float32 and m.vertex_colors.dtype == np.uint8
    assert m.vertex_colors.shape == (len(m.vertices), 4)


def test_vertex_colors_follow_color_fn(sphere_mesh):
    expected = np.round((sphere_mesh.vertices * 0.5 + 0.5) * 255)
    assert np.abs(sphere_mesh.vertex_colors[:, :3] - expected).max() <= 1
    assert (sphere_mesh.vertex_colors[:, 3] == 255).all()


@pytest.mark.parametrize("fmt", [f for f in FORMATS if f not in USD_FORMATS])  # trimesh reads no USD
def test_export_loads_back_with_colors(sphere_mesh, fmt, tmp_path):
    path = tmp_path / f"sphere.{fmt}"
    written = export_mesh(sphere_mesh, path, format=fmt)
    assert written == path.stat().st_size == len(mesh_bytes(sphere_mesh, fmt))
    loaded = trimesh.load(path, force="mesh", process=False)
    assert loaded.vertices.shape == sphere_mesh.vertices.shape
    assert loaded.faces.shape == sphere_mesh.faces.shape
    assert np.array_equal(loaded.visual.vertex_colors, sphere_mesh.vertex_colors)
    buffer = io.BytesIO()
    assert export_mesh(sphere_mesh, buffer, format=fmt) == written


def test_y_up_longest_side_and_bottom_pivot():
    m = extract_mesh(tall_ellipsoid, RES, color_fn=position_color)
    raw = to_trimesh(m, placement=None)
    x, y, z = m.vertices.T
    assert np.allclose(raw.vertices, np.stack([x, z, -y], axis=1), atol=1e-6)  # world +Z -> +Y
    assert raw.volume > 0  # a rotation keeps the winding
    asset = trimesh.load(io.BytesIO(mesh_bytes(m, "glb")), file_type="glb", force="mesh", process=False)
    extents = asset.extents
    assert np.argmax(extents) == 1  # long along Y, as it was along world Z
    assert extents.max() == pytest.approx(1.0, abs=1e-5)
    lo, hi = asset.bounds
    assert abs(lo[1]) < 1e-6 and np.allclose((lo + hi)[[0, 2]], 0.0, atol=1e-5)  # bottom centre at the origin
    assert extents[2] > extents[0]  # world Y (0.4) -> glTF Z, world X (0.3) stays X


def test_decimation_reaches_budget_and_resamples_colors(sphere_mesh):
    m = extract_mesh(sphere, RES, color_fn=position_color, faces=2000)
    assert 0.9 * 2000 <= len(m.faces) <= 2000 < len(sphere_mesh.faces)
    assert list(m.stats["seconds"]) == ["density", "marching_cubes", "decimate", "color"]  # each stage timed
    assert "decimate" not in sphere_mesh.stats["seconds"]  # no budget: no decimation
    within = extract_mesh(sphere, RES, faces=len(sphere_mesh.faces))  # a budget the mesh already meets
    assert "decimate" not in within.stats["seconds"] and np.array_equal(within.faces, sphere_mesh.faces)
    expected = np.round((m.vertices * 0.5 + 0.5) * 255)
    assert np.abs(m.vertex_colors[:, :3] - expected).max() <= 1
    assert trimesh.Trimesh(m.vertices, m.faces, process=False).volume > 0


def test_floaters_dropped_on_request():
    def with_floater(p):
        return torch.maximum(sphere(p), sphere(p - torch.tensor([0.65, 0.65, 0.65]), radius=0.15))

    def components(m):
        return len(trimesh.Trimesh(m.vertices, m.faces).split(only_watertight=False))

    assert components(extract_mesh(with_floater, RES)) == 2
    cleaned = extract_mesh(with_floater, RES, min_component_fraction=0.5)
    assert components(cleaned) == 1
    assert np.linalg.norm(cleaned.vertices, axis=1).max() < 0.5 + CELL


def test_empty_field_gives_empty_mesh():
    m = extract_mesh(lambda p: torch.zeros(len(p)), 64, color_fn=position_color)
    assert m.empty
    assert m.vertices.shape == (0, 3) and m.faces.shape == (0, 3) and m.vertex_colors.shape == (0, 4)
    assert m.stats["evaluations"] < 0.05 * 64 ** 3
    with pytest.raises(ValueError, match="empty"):
        mesh_bytes(m)


def test_bad_arguments_raise(sphere_mesh):
    with pytest.raises(ValueError, match=r"format='fbx'.*\('glb', 'obj', 'ply', 'usdz', 'usda'\)"):
        mesh_bytes(sphere_mesh, "fbx")
    with pytest.raises(ValueError, match="height=0"):
        to_trimesh(sphere_mesh, Placement(height=0))
    with pytest.raises(ValueError, match="pivot='top'"):
        Placement(pivot="top")
    with pytest.raises(ValueError, match="resolution=1"):
        extract_mesh(sphere, 1)

"""Mesh extraction and export on analytic fields whose threshold-10 surfaces are known."""

import io

import numpy as np
import pytest
import torch
import trimesh
from scipy.spatial import cKDTree

from ln3diff_rt.mesh_export import FORMATS, Placement, export_mesh, mesh_bytes, to_trimesh
from ln3diff_rt.meshing import extract_mesh, sample_density_grid
from ln3diff_rt.surface_band import BRICK
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


def node_cube(p: torch.Tensor) -> torch.Tensor:
    """A cube of half-size 0.5: at 97^3 its faces lie on grid nodes, where the density is exactly 10."""
    return 200 * (0.5 - p.abs().amax(dim=-1)) + THRESHOLD


def corner_ball(p: torch.Tensor) -> torch.Tensor:
    """A ball centred on a corner of the box: the surface meets three box faces."""
    return 200 * (0.9 - (p - 1.0).norm(dim=-1)) + THRESHOLD


def slanted_plane(p: torch.Tensor) -> torch.Tensor:
    """A plane crossing the whole box, through many bricks and every brick face orientation."""
    return 200 * (0.1 - p @ torch.tensor([0.48, 0.36, 0.8])) + THRESHOLD


def two_balls(p: torch.Tensor) -> torch.Tensor:
    """Two small balls (radius 0.1) on either side of x = 0, where bricks meet at most resolutions."""
    left = sphere(p + torch.tensor([0.11, 0.0, 0.0]), radius=0.1)
    return torch.maximum(left, sphere(p - torch.tensor([0.11, 0.0, 0.0]), radius=0.1))


def rounded_box(p: torch.Tensor, centre: list[float], half: list[float]) -> torch.Tensor:
    q = (p - torch.tensor(centre)).abs() - torch.tensor(half)
    return q.clamp(min=0).norm(dim=-1) + q.amax(dim=-1).clamp(max=0)  # signed distance, negative inside


def chair(p: torch.Tensor) -> torch.Tensor:
    """Seat, back and four legs of radius 0.03 (3 cells at 192^3, under half a coarse cell at stride 8)."""
    d = torch.minimum(rounded_box(p, [0, 0, 0.1], [0.4, 0.4, 0.04]), rounded_box(p, [0, 0.37, 0.45], [0.4, 0.03, 0.35]))
    for x in (-0.35, 0.35):
        for y in (-0.35, 0.35):
            leg = torch.maximum((p[:, :2] - torch.tensor([x, y])).norm(dim=-1) - 0.03, (p[:, 2] + 0.25).abs() - 0.35)
            d = torch.minimum(d, leg)
    return -200 * d + THRESHOLD


def welded(m) -> trimesh.Trimesh:
    return trimesh.Trimesh(m.vertices, m.faces, process=False)


# (field, resolution, Euler number of the closed surface or None where the box cuts it open)
CASES = {
    "sphere": (sphere, RES, 2), "sphere-97": (sphere, 97, 2), "box": (box, RES, 2), "torus": (torus, RES, 0),
    "torus-97": (torus, 97, 0), "node-cube-97": (node_cube, 97, 2), "two-balls-65": (two_balls, 65, 4),
    "corner-ball": (corner_ball, RES, None), "slanted-plane-97": (slanted_plane, 97, None),
}


@pytest.mark.parametrize("name", list(CASES))
def test_coarse_to_fine_matches_dense(name):
    field, res, euler = CASES[name]
    cell = 2.0 / (res - 1)
    dense = extract_mesh(field, res, coarse_resolution=res)
    fast = extract_mesh(field, res)
    assert dense.stats["evaluations"] == res ** 3
    # Welding merges vertices closer than 1e-4 cells to a node, so slivers dense keeps may go: compare areas.
    assert welded(fast).area == pytest.approx(welded(dense).area, rel=1e-4)
    assert hausdorff(fast.vertices, dense.vertices) < cell
    assert len(np.unique(fast.vertices, axis=0)) == len(fast.vertices)  # welded: one vertex per position
    if euler is not None:  # closed: every edge between two faces, so the brick seams are welded
        mesh = welded(fast)
        assert mesh.is_watertight and mesh.is_winding_consistent and mesh.euler_number == euler
        assert mesh.volume > 0
    ratio = fast.stats["evaluations"] / dense.stats["evaluations"]
    print(f"{name}: {fast.stats['evaluations']} / {res ** 3} evaluations ({ratio:.3f})")
    assert ratio < 0.3


def test_thin_legs_followed_from_a_coarse_lattice():
    """Legs thinner than a coarse cell (stride 8) are kept whole: the band follows them from the seat."""
    res = 192
    dense = extract_mesh(chair, res, coarse_resolution=res)
    fast = extract_mesh(chair, res, coarse_resolution=res // 8)
    assert fast.stats["coarse_stride"] == 8
    assert len(fast.faces) == len(dense.faces)
    assert hausdorff(fast.vertices, dense.vertices) < 2.0 / (res - 1)


def test_band_holds_dense_values_wherever_the_surface_is():
    """Every corner of a cell the surface crosses holds the evaluated value, not an interpolated one."""
    res = 97
    dense, _ = sample_density_grid(torus, res, THRESHOLD, bound=1.0, stride=1, chunk=2 ** 16)
    band, evaluations = sample_density_grid(torus, res, THRESHOLD, bound=1.0, stride=4, chunk=2 ** 16)
    assert evaluations < 0.3 * res ** 3
    inside = torch.from_numpy(dense > THRESHOLD)
    cells = np.argwhere((inside[1:, 1:, 1:] != inside[:-1, :-1, :-1]).numpy()
                        | (inside[1:, :-1, :-1] != inside[:-1, :-1, :-1]).numpy())
    corners = (cells[:, None, :] + np.argwhere(np.ones((2, 2, 2)))[None]).reshape(-1, 3)
    assert len(cells) > 1000
    np.testing.assert_array_equal(band[tuple(corners.T)], dense[tuple(corners.T)])


def test_surface_across_brick_faces_is_closed():
    """A sphere whose fine grid puts brick faces through it at every axis is one closed, welded surface."""
    res = 4 * BRICK + 1
    m = extract_mesh(lambda p: sphere(p, radius=0.55), res)
    mesh = welded(m)
    assert mesh.is_watertight and mesh.euler_number == 2
    assert np.abs(np.linalg.norm(m.vertices, axis=1) - 0.55).max() < 0.5 * 2.0 / (res - 1)


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


@pytest.mark.parametrize("value", [0.0, 2 * THRESHOLD], ids=["all-outside", "all-inside"])
def test_empty_field_gives_empty_mesh(value):
    m = extract_mesh(lambda p: torch.full((len(p),), value), 64, color_fn=position_color)
    assert m.empty
    assert m.vertices.shape == (0, 3) and m.faces.shape == (0, 3) and m.vertex_colors.shape == (0, 4)
    assert m.normals.shape == (0, 3)
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

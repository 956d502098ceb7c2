"""Mesh extraction from a density field: coarse-to-fine sampling, marching cubes, vertex colours.

The official LN3Diff code samples the tri-plane densely at 192^3, runs marching cubes at density
10 and colours vertices from the tri-plane; holding every query at once needs ~24 GB. We sample a
coarse lattice and refine by x2 only in cells along the surface (`surface_band.py`: the cells whose
corners straddle the threshold, their neighbours on the first step, and every cell the surface or
the interpolation error leads into), so wherever the surface is, the values are those of dense
sampling; marching cubes then runs over those cells only, never over a dense resolution^3 volume,
so time and memory follow the surface area. `coarse_resolution=resolution` samples densely and
marches the whole grid (the reference the tests compare against).

Grid: `resolution` samples per axis at cell corners, x_i = -bound + i * h for i = 0 .. resolution - 1
with h = 2 * bound / (resolution - 1), so the first and last samples lie on the faces of the box.

Assumption of the coarse-to-fine pass: every piece of surface either lies within one coarse cell of
a coarse cell whose corners straddle the threshold, or joins such a piece (the band follows the
surface from there, so thin legs attached to a body are kept), or hides where the field comes
closer to the threshold than the interpolation error seen next to it. Pieces thicker than a coarse
cell's diagonal (sqrt(3) * stride * h: 0.11 world units by default from 128^3 up) always contain a
coarse sample. A small detached piece (a floater, a thin wire apart from the body) can be
lost; raise `coarse_resolution` to keep them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from skimage.measure import marching_cubes

from ln3diff_rt.surface_band import (
    Band,
    BrickLattice,
    DensityFn,
    dilate,
    evaluate_nodes,
    march_band,
    referenced,
    refine,
    straddling_cells,
)

COARSE_SAMPLES = 32  # largest default coarse lattice per axis (see coarse_stride)
ColorFn = Callable[[torch.Tensor], torch.Tensor]  # points [N, 3] -> rgb in [0, 1], [N, 3]


@dataclass
class MeshResult:
    """A triangle mesh in world coordinates (Z up, inside the box [-bound, bound]^3); `texturing.unwrap` adds UVs."""

    vertices: np.ndarray  # [V, 3] float32
    faces: np.ndarray  # [F, 3] int64, counter-clockwise seen from outside
    vertex_colors: np.ndarray  # [V, 4] uint8 RGBA
    normals: np.ndarray  # [V, 3] float32, unit, pointing out of the object
    stats: dict = field(default_factory=dict)
    uvs: np.ndarray | None = None  # [V, 2] float32 texture coordinates (origin bottom-left) once unwrapped

    @property
    def empty(self) -> bool:
        """True when the field has no surface at the threshold inside the box."""
        return len(self.faces) == 0


def coarse_stride(resolution: int, coarse_resolution: int | None = None) -> int:
    """Power-of-two step between coarse samples, in fine cells; 1 means dense sampling.

    The default coarse lattice has about resolution / 4 samples per axis, at most COARSE_SAMPLES: the
    default request's 128^3 has coarse cells of 0.063 world units, and finer grids keep that
    guarantee for detached pieces instead of a coarse lattice that grows as N^3. Thin parts joined to
    the body do not need a finer one: the band follows them (chair legs of radius 0.03 at stride 8,
    tests/test_meshing.py); before it did, resolution / 8 cut those legs short.
    """
    if coarse_resolution is None:
        coarse_resolution = max(2, min(resolution // 4, COARSE_SAMPLES))
    ratio = (resolution - 1) / max(1, coarse_resolution - 1)
    return 2 ** max(0, int(math.floor(math.log2(ratio))))


def _coarse_lattice(density_fn: DensityFn, resolution: int, bound: float, stride: int,
                    chunk: int) -> torch.Tensor:
    """fn on the lattice of nodes `stride` finest cells apart, padded to whole cells -> [count]^3."""
    spacing = 2.0 * bound / (resolution - 1)
    count = math.ceil((resolution - 1) / stride) + 1
    out = torch.empty(count ** 3)
    for start in range(0, count ** 3, chunk):  # node indices made per chunk: a dense 256^3 list is 400 MB
        flat = torch.arange(start, min(start + chunk, count ** 3))
        nodes = torch.stack([flat // (count * count), (flat // count) % count, flat % count], dim=-1)
        out[start:start + len(flat)] = evaluate_nodes(density_fn, nodes, stride, spacing, bound, chunk)
    return out.view(count, count, count)


def sample_band(density_fn: DensityFn, resolution: int, threshold: float, bound: float, stride: int,
                chunk: int) -> Band:
    """The finest level refined by x2 steps from a lattice `stride` cells apart (stride >= 2), along the surface.

    The first refinement splits the coarse cells that straddle the threshold and their neighbours (the
    module's assumption); later ones start from the straddling cells; each follows the surface.
    """
    spacing = 2.0 * bound / (resolution - 1)
    values = _coarse_lattice(density_fn, resolution, bound, stride, chunk)
    known = torch.ones_like(values, dtype=torch.bool)  # which nodes hold a true evaluation
    evaluations = values.numel()
    seed = dilate(straddling_cells(values, threshold))
    step = stride
    while True:
        step //= 2
        lattice = BrickLattice(values, known)
        last = step == 1
        band = refine(lattice, seed, threshold, valid_cells=resolution - 1 if last else lattice.n - 1,
                      valid_nodes=resolution if last else lattice.n,
                      evaluate=lambda nodes, step=step: evaluate_nodes(density_fn, nodes, step, spacing, bound, chunk))
        evaluations += band.evaluations
        if last:
            band.evaluations = evaluations
            return band
        values, known = lattice.dense()
        seed = straddling_cells(values, threshold)


def sample_density_grid(density_fn: DensityFn, resolution: int, threshold: float, bound: float,
                        stride: int, chunk: int) -> tuple[np.ndarray, int]:
    """Density on the dense grid [resolution]^3: sampled densely (stride 1) or refined along the surface.

    Returns the grid (exact on every cell the surface crosses, trilinear elsewhere) and the number of
    evaluations. The mesher itself never builds this grid when stride > 1; tests compare against it.
    """
    if stride == 1:
        values = _coarse_lattice(density_fn, resolution, bound, 1, chunk)
        return values.numpy(), values.numel()
    band = sample_band(density_fn, resolution, threshold, bound, stride, chunk)
    values, _ = band.lattice.dense()
    return values[:resolution, :resolution, :resolution].numpy(), band.evaluations


def _vertex_colors(color_fn: ColorFn | None, vertices: np.ndarray, chunk: int) -> np.ndarray:
    colors = np.full((len(vertices), 4), 255, dtype=np.uint8)
    if color_fn is None or len(vertices) == 0:
        return colors
    points = torch.from_numpy(np.ascontiguousarray(vertices, dtype=np.float32))
    rgb = torch.cat([color_fn(points[i:i + chunk]).reshape(-1, 3).to(torch.float32)
                     for i in range(0, len(points), chunk)])
    colors[:, :3] = (rgb.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).numpy()
    return colors


def _drop_small_components(vertices: np.ndarray, faces: np.ndarray, min_fraction: float
                           ) -> tuple[np.ndarray, np.ndarray]:
    """Keep connected components (faces joined by a shared vertex) with at least min_fraction of the largest's faces."""
    labels = vertex_components(len(vertices), np.concatenate([faces[:, :2], faces[:, 1:]]))
    face_labels = labels[faces[:, 0]]
    sizes = np.bincount(face_labels)
    return referenced(vertices, faces[sizes[face_labels] >= min_fraction * sizes.max()])


def vertex_components(count: int, edges: np.ndarray) -> np.ndarray:
    """A component label [count] per vertex (the smallest vertex index in it), edges [E, 2].

    Hook and jump: each round every edge joining two trees hangs the larger root under the smaller label, then
    pointers are followed until every vertex points at its root; a mesh's components settle in a few rounds.
    Written out rather than `scipy.sparse.csgraph.connected_components` because importing scipy.sparse costs
    ~0.3 s, a tenth of a cold `ln3diff generate`."""
    parent = np.arange(count)
    while True:
        a, b = parent[edges[:, 0]], parent[edges[:, 1]]
        apart = a != b
        if not apart.any():
            return parent
        np.minimum.at(parent, np.maximum(a, b)[apart], np.minimum(a, b)[apart])
        while True:
            jumped = parent[parent]
            if np.array_equal(jumped, parent):
                break
            parent = jumped


def _decimate(vertices: np.ndarray, faces: np.ndarray, budget: int) -> tuple[np.ndarray, np.ndarray]:
    """Quadric decimation to about `budget` faces with fast_simplification (what trimesh's
    `simplify_quadric_decimation` calls; called directly, a cold start need not import trimesh and scipy)."""
    try:
        import fast_simplification
    except ImportError as err:
        raise ImportError("decimation to a face budget needs `pip install fast-simplification`") from err
    points, tris = fast_simplification.simplify(np.ascontiguousarray(vertices, np.float64),
                                                np.ascontiguousarray(faces, np.int64), target_count=budget)
    return referenced(np.asarray(points), np.asarray(tris, dtype=np.int64))


def vertex_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Unit vertex normals [V, 3] float32: the area-weighted mean of the faces' normals (faces wind outwards)."""
    v = torch.from_numpy(np.ascontiguousarray(vertices, np.float32))
    f = torch.from_numpy(np.ascontiguousarray(faces, np.int64))
    corners = v[f]  # [F, 3, 3]
    face_normals = torch.linalg.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])  # 2 x area
    normals = torch.zeros_like(v).index_add_(0, f.reshape(-1), face_normals.repeat_interleave(3, dim=0))
    return F.normalize(normals, dim=1).numpy()


def _empty_result(stats: dict) -> MeshResult:
    return MeshResult(vertices=np.zeros((0, 3), np.float32), faces=np.zeros((0, 3), np.int64),
                      vertex_colors=np.zeros((0, 4), np.uint8), normals=np.zeros((0, 3), np.float32),
                      stats=stats)


def _march(density_fn: DensityFn, resolution: int, threshold: float, bound: float, stride: int, chunk: int,
           stats: dict) -> tuple[np.ndarray, np.ndarray]:
    """Vertices [V, 3] (world) and faces [F, 3] (counter-clockwise from outside) of the surface; times both stages."""
    seconds = stats["seconds"]
    spacing = 2.0 * bound / (resolution - 1)
    t0 = time.perf_counter()
    if stride == 1:
        volume, stats["evaluations"] = sample_density_grid(density_fn, resolution, threshold, bound, 1, chunk)
        seconds["density"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        verts, faces = np.zeros((0, 3)), np.zeros((0, 3), np.int64)
        if volume.min() < threshold < volume.max():
            verts, faces, _, _ = marching_cubes(volume, level=threshold, allow_degenerate=False)
    else:
        band = sample_band(density_fn, resolution, threshold, bound, stride, chunk)
        stats["evaluations"] = band.evaluations
        seconds["density"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        verts, faces = march_band(band, threshold, resolution)
    seconds["marching_cubes"] = time.perf_counter() - t0
    # skimage winds triangles clockwise seen from the high-value side; density is high inside.
    return verts * spacing - bound, np.ascontiguousarray(faces[:, ::-1], dtype=np.int64)


@torch.no_grad()
def extract_mesh(density_fn: DensityFn, resolution: int = 256, threshold: float = 10.0, bound: float = 1.0,
                 color_fn: ColorFn | None = None, coarse_resolution: int | None = None, chunk: int = 2 ** 18,
                 faces: int | None = None, min_component_fraction: float = 0.0) -> MeshResult:
    """Surface {density = threshold} of a field in [-bound, bound]^3 as a coloured triangle mesh.

    density_fn / color_fn take CPU float32 points [N, 3] (N <= chunk) and return density [N] /
    RGB in [0, 1] [N, 3]; density is high inside the object. `coarse_resolution` sets the first
    lattice (default resolution / 4, at most 32; `coarse_resolution=resolution` samples densely). `faces` is a
    face budget for quadric decimation; components with fewer faces than `min_component_fraction`
    of the largest are dropped as floaters. Colours are sampled at the final vertices.
    """
    if resolution < 2:
        raise ValueError(f"resolution={resolution}; expected at least 2 samples per axis")
    if coarse_resolution is not None and not 2 <= coarse_resolution <= resolution:
        raise ValueError(f"coarse_resolution={coarse_resolution}; expected 2 .. resolution ({resolution})")
    if bound <= 0 or chunk <= 0:
        raise ValueError(f"bound={bound}, chunk={chunk}; both must be positive")
    if faces is not None and faces < 1:
        raise ValueError(f"faces={faces}; expected a positive face budget or None")
    if not 0.0 <= min_component_fraction <= 1.0:
        raise ValueError(f"min_component_fraction={min_component_fraction}; expected a fraction in [0, 1]")

    stride = coarse_stride(resolution, coarse_resolution)
    seconds: dict[str, float] = {}
    stats = {"resolution": resolution, "coarse_stride": stride, "seconds": seconds}
    vertices, tris = _march(density_fn, resolution, threshold, bound, stride, chunk, stats)
    if len(tris) == 0:
        return _empty_result(stats)
    if min_component_fraction > 0:
        t0 = time.perf_counter()
        vertices, tris = _drop_small_components(vertices, tris, min_component_fraction)
        seconds["floaters"] = time.perf_counter() - t0
    if faces is not None and len(tris) > faces:
        t0 = time.perf_counter()
        vertices, tris = _decimate(vertices, tris, faces)
        seconds["decimate"] = time.perf_counter() - t0

    vertices = vertices.astype(np.float32)
    t0 = time.perf_counter()
    colors = _vertex_colors(color_fn, vertices, chunk)
    seconds["color"] = time.perf_counter() - t0
    return MeshResult(vertices=vertices, faces=tris, vertex_colors=colors, normals=vertex_normals(vertices, tris),
                      stats=stats)

"""UV atlases, baked base-colour textures and levels of detail for game-ready meshes.

`unwrap` cuts the mesh into charts and packs them into one square atlas with xatlas (the mesh's
vertices are split along the chart seams). `bake_texture` rasterises every triangle into texture
space, interpolates its 3D corners at each covered texel's centre and asks the field for the
colour there, so colour detail comes from the texture's resolution, not from the triangle count;
uncovered texels take their nearest covered texel's colour (dilation), so bilinear filtering and
mipmaps never pull in background across a chart's edge. `levels_of_detail` decimates the
unwrapped mesh with meshoptimizer, whose simplifier keeps UV seams closed (both sides of a seam
collapse together), so every level indexes a subset of the same vertices and shares the texture.

UVs follow the OpenGL / OBJ / USD convention: (0, 0) is the bottom-left corner of the image;
texture arrays are stored top row first, as image files are.
"""

from __future__ import annotations

import numpy as np
import torch

from ln3diff_rt.meshing import ColorFn, MeshResult
from ln3diff_rt.raster import rasterize

# Texels between charts per 1024 of texture size. Bilinear filtering needs 2; a level of detail needs more: its
# seam edges are chords of the detailed seam's polyline and cut up to a few texels outside the chart. Measured on
# the shipped model at 1024^2 and 2K faces: 2 texels let ~5 pixels per 192^2 view sample a neighbouring chart
# (colour error > 25/255), 4 texels ~1, 6 texels none.
ATLAS_PADDING_PER_1024 = 6
# Longest chart boundary, in world units (objects span at most the box [-1, 1]^3). Unbounded, xatlas grows charts
# over the noisy normals of a marching-cubes mesh for 5-6 CPU s at 30K faces (~850 charts); bounded at 1.5 it takes
# 0.6-0.7 s for 100-130 charts and the same texel density (atlas 1350-1380 texels across for 1024 asked, measured
# on the shipped model's chair and dumbbell; 1.0: 0.4-0.5 s, 5% coarser; 2.0: 0.9-1.8 s).
CHART_MAX_BOUNDARY = 1.5


def unwrap(mesh: MeshResult, size: int, padding: int | None = None) -> MeshResult:
    """The mesh cut into charts packed into one atlas for a `size`^2 texture, `padding` texels apart (default
    ATLAS_PADDING_PER_1024, scaled to the size, at least 2): vertices split along the seams, with `uvs` [V, 2] in
    [0, 1]; colours and normals follow their vertices."""
    try:
        import xatlas
    except ImportError as err:
        raise ImportError("UV unwrapping (texture > 0) needs `pip install xatlas`") from err
    if mesh.empty:
        raise ValueError("the mesh is empty; nothing to unwrap")
    atlas = xatlas.Atlas()
    atlas.add_mesh(np.ascontiguousarray(mesh.vertices, np.float32), np.ascontiguousarray(mesh.faces, np.uint32),
                   np.ascontiguousarray(mesh.normals, np.float32))
    pack = xatlas.PackOptions()
    pack.resolution, pack.bilinear = size, True
    pack.padding = max(2, round(ATLAS_PADDING_PER_1024 * size / 1024)) if padding is None else padding
    charts = xatlas.ChartOptions()
    charts.max_boundary_length = CHART_MAX_BOUNDARY
    atlas.generate(charts, pack)
    if atlas.atlas_count != 1:
        raise RuntimeError(f"xatlas packed the charts into {atlas.atlas_count} atlases; expected one")
    source, faces, uvs = atlas[0]  # source [V'] indexes mesh.vertices; uvs have v pointing down the image
    uvs = np.stack([uvs[:, 0], 1.0 - uvs[:, 1]], axis=1).astype(np.float32)
    stats = {**mesh.stats, "charts": int(atlas.chart_count), "atlas_utilization": float(atlas.utilization)}
    return MeshResult(vertices=mesh.vertices[source], faces=faces.astype(np.int64),
                      vertex_colors=mesh.vertex_colors[source], normals=mesh.normals[source], stats=stats, uvs=uvs)


def uv_to_pixels(uvs: np.ndarray, size: int) -> np.ndarray:
    """UVs (origin bottom-left) -> pixel coordinates (x right, y down) of a `size`^2 image."""
    return np.stack([uvs[:, 0] * size, (1.0 - uvs[:, 1]) * size], axis=-1)


@torch.no_grad()
def bake_texture(mesh: MeshResult, color_fn: ColorFn, size: int, chunk: int) -> np.ndarray:
    """The field's colour at each texel's surface point: [size, size, 3] uint8, top row first.

    `mesh` carries `uvs` (from `unwrap`); `color_fn` takes CPU float32 points [N, 3] (N <= chunk) and
    returns RGB in [0, 1] (the runner's field checks for cancellation before every chunk)."""
    if mesh.uvs is None:
        raise ValueError("the mesh has no UVs; unwrap it first")
    rows, cols, tri, weights = (t.numpy() for t in rasterize(torch.from_numpy(uv_to_pixels(mesh.uvs, size)[mesh.faces]),
                                                             size, size))
    corners = mesh.vertices[mesh.faces[tri]].astype(np.float64)  # [K, 3, 3]
    points = torch.from_numpy(np.einsum("kc,kcd->kd", weights, corners).astype(np.float32))
    rgb = np.empty((len(points), 3), np.float32)
    for start in range(0, len(points), chunk):
        rgb[start:start + chunk] = color_fn(points[start:start + chunk]).reshape(-1, 3).float().numpy()
    texture = np.zeros((size, size, 3), np.uint8)
    texture[rows, cols] = (np.clip(rgb, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    return dilate(texture, covered_mask(rows, cols, size))


def covered_mask(rows: np.ndarray, cols: np.ndarray, size: int) -> np.ndarray:
    mask = np.zeros((size, size), bool)
    mask[rows, cols] = True
    return mask


def dilate(texture: np.ndarray, covered: np.ndarray) -> np.ndarray:
    """Every uncovered texel takes the colour of its nearest covered texel (padding against seams and for mipmaps)."""
    if covered.all() or not covered.any():
        return texture
    from scipy import ndimage  # here: importing it costs ~0.3-0.5 s of a cold start that bakes no texture

    nearest = ndimage.distance_transform_edt(~covered, return_distances=False, return_indices=True)  # [2, H, W]
    return texture[nearest[0], nearest[1]]


def levels_of_detail(mesh: MeshResult, budgets: tuple[int, ...]) -> list[MeshResult]:
    """The mesh decimated to each face budget (most detailed first), each level a subset of its vertices, so
    UVs, colours and normals carry over unchanged and UV seams stay closed. A budget at or above the mesh's face
    count keeps the mesh; a level may keep more faces than asked where seams leave nothing cheaper to collapse."""
    try:
        import meshoptimizer
    except ImportError as err:
        raise ImportError("levels of detail (lods) need `pip install meshoptimizer`") from err
    indices = np.ascontiguousarray(mesh.faces.reshape(-1), np.uint32)
    positions = np.ascontiguousarray(mesh.vertices, np.float32)
    levels = []
    for budget in budgets:
        if budget >= len(mesh.faces):
            levels.append(mesh)
            continue
        kept = np.zeros_like(indices)
        count = meshoptimizer.simplify(kept, indices, positions, target_index_count=3 * budget, target_error=1.0)
        used, faces = np.unique(kept[:count], return_inverse=True)
        levels.append(MeshResult(vertices=mesh.vertices[used], faces=faces.reshape(-1, 3).astype(np.int64),
                                 vertex_colors=mesh.vertex_colors[used], normals=mesh.normals[used],
                                 stats={**mesh.stats, "face_budget": budget},
                                 uvs=None if mesh.uvs is None else mesh.uvs[used]))
    return levels

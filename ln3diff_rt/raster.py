"""Rasterise a vertex-coloured triangle mesh into an image: a z-buffer over pixel centres, supersampled.

Previews of a request that makes a mesh show that mesh (what the asset is) instead of ray-marching the
field again: on the CPU a turntable of the default 30K-face mesh is a few milliseconds a frame, where the
ray-marched frames were half of the default request. Written out in torch rather than taken from a library
because the ones that rasterise (pyrender, moderngl, Open3D) need an OpenGL context this machine and a server
do not have, and nvdiffrast and PyTorch3D's CPU paths need a GPU build or a compiler.

Each face is tested against the pixel centres inside its bounding box (faces of a 30K-face mesh at preview
size cover a few pixels each, so this is a short list), the nearest face at each centre wins (ties: the
lower face index, so frames are deterministic), its colour is the barycentric blend of its vertices'.
`supersample` x `supersample` centres per pixel, averaged, smooth the silhouette.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ln3diff_rt.cameras import project_points


def _edge(p0: torch.Tensor, p1: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Twice the signed area of (p0, p1, q) [K, 2] each -> [K]: which side of the edge p0 -> p1 q lies on."""
    return (p1[:, 0] - p0[:, 0]) * (q[:, 1] - p0[:, 1]) - (p1[:, 1] - p0[:, 1]) * (q[:, 0] - p0[:, 0])


def rasterize(vertices: torch.Tensor, faces: torch.Tensor, colours: torch.Tensor, c2w: torch.Tensor,
              intrinsics: torch.Tensor, size: int, background: tuple[float, float, float],
              supersample: int = 2) -> torch.Tensor:
    """Frame [size, size, 3] (float, colours' range) of a mesh: vertices [V, 3] world, faces [F, 3] (either
    winding: faces are two-sided), colours [V, 3] per vertex; camera c2w [4, 4] and intrinsics (fx, fy, cx, cy)
    at `size` pixels, as `cameras.camera_rays`. Points behind the camera are not drawn."""
    if faces.numel() and (faces.min() < 0 or faces.max() >= len(vertices)):
        raise ValueError(f"faces index vertices 0..{len(vertices) - 1}, got {int(faces.min())}..{int(faces.max())}")
    side = size * supersample
    uv, depth = project_points(vertices.float(), c2w.float(), intrinsics.float() * supersample)
    faces = faces[(depth[faces] > 0).all(dim=1)]
    tri = uv[faces]  # [F, 3, 2] in supersampled pixels, centres at +0.5
    lo = (tri.amin(dim=1) - 0.5).ceil().clamp(0, side)
    hi = (tri.amax(dim=1) - 0.5).floor().clamp(-1, side - 1)
    span = (hi - lo + 1).clamp(min=0).long()  # centres covered by each face's box, per axis
    counts = span[:, 0] * span[:, 1]
    face = torch.repeat_interleave(torch.arange(len(faces)), counts)  # one entry per (face, centre in its box)
    offset = torch.arange(len(face)) - (torch.cumsum(counts, 0) - counts)[face]
    width = span[face, 0]
    px, py = lo[face, 0].long() + offset % width, lo[face, 1].long() + offset // width
    centre = torch.stack([px, py], dim=1).float() + 0.5
    a, b, c = tri[face, 0], tri[face, 1], tri[face, 2]
    area = _edge(a, b, c)
    w = torch.stack([_edge(b, c, centre), _edge(c, a, centre), _edge(a, b, centre)], dim=1) / area[:, None]
    inside = (w >= 0).all(dim=1) & (area != 0)
    face, w, pixel = face[inside], w[inside], (py * side + px)[inside]
    z = (w * depth[faces[face]]).sum(dim=1)
    nearest = torch.full((side * side,), math.inf).scatter_reduce_(0, pixel, z, "amin")
    candidate = torch.arange(len(z))
    first = torch.full((side * side,), len(z)).scatter_reduce_(0, pixel[z <= nearest[pixel]],
                                                               candidate[z <= nearest[pixel]], "amin")
    won = first[pixel] == candidate  # one winner per pixel: nearest, then lowest entry (lowest face index)
    image = torch.tensor(background, dtype=torch.float32).repeat(side * side, 1)
    image[pixel[won]] = (w[won, :, None] * colours.float()[faces[face[won]]]).sum(dim=1)
    image = image.view(1, side, side, 3).permute(0, 3, 1, 2)
    return F.avg_pool2d(image, supersample)[0].permute(1, 2, 0)

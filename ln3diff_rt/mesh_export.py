"""Mesh files for DCC tools and game engines: GLB (default), OBJ and PLY, all with vertex colours.

Our world is Z-up in the scene box; glTF is Y-up in metres. An exported asset is rotated so that
world +Z is +Y ((x, y, z) -> (x, z, -y), a proper rotation, so triangle winding and outward normals
are kept) and, by default, centred at the origin and scaled so its longest side is 1 m.
"""

from __future__ import annotations

import io
import os
from typing import BinaryIO

import numpy as np
import trimesh

from ln3diff_rt.meshing import MeshResult

FORMATS = ("glb", "obj", "ply")

# Rows map world (x, y, z) to glTF (x, z, -y): world +Z becomes +Y, world +Y becomes -Z.
_Z_UP_TO_Y_UP = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])


def to_trimesh(mesh: MeshResult, unit_size: float | None = 1.0) -> trimesh.Trimesh:
    """A trimesh in the asset convention: glTF's +Y up.

    With `unit_size` the bounding box is centred at the origin and its longest side scaled to
    `unit_size` metres; `unit_size=None` keeps the (rotated) world coordinates.
    """
    if unit_size is not None and not unit_size > 0:
        raise ValueError(f"unit_size={unit_size}; expected a positive length in metres or None")
    if mesh.empty:
        raise ValueError("the mesh is empty (the field has no surface at the threshold); nothing to export")
    vertices = mesh.vertices.astype(np.float64) @ _Z_UP_TO_Y_UP.T
    normals = mesh.normals.astype(np.float64) @ _Z_UP_TO_Y_UP.T
    if unit_size is not None:
        lo, hi = vertices.min(axis=0), vertices.max(axis=0)
        vertices = (vertices - (lo + hi) / 2) * (unit_size / max(float((hi - lo).max()), 1e-12))
    return trimesh.Trimesh(vertices=vertices.astype(np.float32), faces=mesh.faces,
                           vertex_normals=normals.astype(np.float32), vertex_colors=mesh.vertex_colors,
                           process=False)


def mesh_bytes(mesh: MeshResult, format: str = "glb", unit_size: float | None = 1.0) -> bytes:
    """The mesh encoded as a GLB, OBJ (vertex colours as `v x y z r g b`) or binary PLY file."""
    if format not in FORMATS:
        raise ValueError(f"format={format!r}; expected one of {FORMATS}")
    tm = to_trimesh(mesh, unit_size=unit_size)
    if format == "glb":
        return trimesh.exchange.gltf.export_glb(tm, include_normals=True)
    if format == "obj":
        text = trimesh.exchange.obj.export_obj(tm, include_normals=True, include_color=True,
                                               include_texture=False, write_texture=False)
        return text.encode("utf-8")
    return trimesh.exchange.ply.export_ply(tm, encoding="binary", vertex_normal=True)


def export_mesh(mesh: MeshResult, path_or_fileobj: str | os.PathLike | BinaryIO, format: str = "glb",
                unit_size: float | None = 1.0) -> int:
    """Write the mesh to a path or a binary file object; returns the number of bytes written."""
    data = mesh_bytes(mesh, format=format, unit_size=unit_size)
    if isinstance(path_or_fileobj, str | os.PathLike):
        with open(path_or_fileobj, "wb") as f:
            f.write(data)
    elif isinstance(path_or_fileobj, io.TextIOBase):
        raise TypeError("export_mesh writes bytes; open the file in binary mode ('wb')")
    else:
        path_or_fileobj.write(data)
    return len(data)

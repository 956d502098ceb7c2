"""Mesh files for DCC tools and game engines: GLB (default), OBJ and PLY, all with vertex colours.

Our world is Z-up in the scene box. Each format is written in the axes its importers expect: glTF and
OBJ are +Y up (Blender's, Unity's and Unreal's glTF/OBJ importers convert from Y-up), PLY is +Z up
(Blender's PLY importer reads it as Z-up; a Y-up PLY lay on its side). Y-up is a proper rotation,
(x, y, z) -> (x, z, -y), so triangle winding and outward normals are kept. Assets are in metres
with the pivot at the bottom centre (props stand on the floor at the origin), sized by the
request (`Placement`), named after the prompt, and a GLB records the choices in its scene `extras`.
"""

from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
import trimesh

from ln3diff_rt.meshing import MeshResult

FORMATS = ("glb", "obj", "ply")
PIVOTS = ("bottom", "center")
# Height in metres a size word in the prompt asks for (the shipped model's vocabulary: small, medium, large).
SIZE_WORDS = {"tiny": 0.25, "small": 0.5, "medium": 1.0, "large": 2.0, "huge": 4.0}
DEFAULT_LONGEST_SIDE = 1.0  # metres, where neither a height nor a size word says otherwise

# Rows map world (x, y, z) to glTF (x, z, -y): world +Z becomes +Y, world +Y becomes -Z.
_Z_UP_TO_Y_UP = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])


@dataclass(frozen=True)
class Placement:
    """How an asset is sized and placed: `height` metres tall (None: longest side `longest` metres), pivot at
    the bottom centre or the box centre. `source` says where the size came from (recorded in the GLB)."""

    height: float | None = None
    longest: float = DEFAULT_LONGEST_SIDE
    pivot: str = "bottom"
    source: str = "default"

    def __post_init__(self) -> None:
        if self.pivot not in PIVOTS:
            raise ValueError(f"pivot={self.pivot!r}; expected one of {PIVOTS}")
        if (self.height is not None and not self.height > 0) or not self.longest > 0:
            raise ValueError(f"height={self.height}, longest={self.longest}; expected positive lengths in metres")


def placement_for(prompt: str, height: float = 0.0, pivot: str = "bottom") -> Placement:
    """A given height (> 0) wins; else the prompt's size word; else the longest side is 1 m."""
    if height > 0:
        return Placement(height=height, pivot=pivot, source="height option")
    words = [w for w in re.findall(r"[a-z]+", prompt.lower()) if w in SIZE_WORDS]
    if words:
        return Placement(height=SIZE_WORDS[words[0]], pivot=pivot, source=f"size word {words[0]!r}")
    return Placement(pivot=pivot)


def to_trimesh(mesh: MeshResult, placement: Placement | None = Placement(), up: str = "y") -> trimesh.Trimesh:
    """A trimesh in metres with +Y up (`up="z"` keeps the world's +Z up, for PLY), sized and placed by
    `placement`; `placement=None` keeps the (rotated) world coordinates."""
    if mesh.empty:
        raise ValueError("the mesh is empty (the field has no surface at the threshold); nothing to export")
    rotation = _Z_UP_TO_Y_UP if up == "y" else np.eye(3)
    vertical = 1 if up == "y" else 2
    vertices = mesh.vertices.astype(np.float64) @ rotation.T
    normals = mesh.normals.astype(np.float64) @ rotation.T
    if placement is not None:
        lo, hi = vertices.min(axis=0), vertices.max(axis=0)
        extent = hi - lo
        scale = (placement.height / max(float(extent[vertical]), 1e-12) if placement.height is not None
                 else placement.longest / max(float(extent.max()), 1e-12))
        anchor = (lo + hi) / 2
        if placement.pivot == "bottom":
            anchor[vertical] = lo[vertical]
        vertices = (vertices - anchor) * scale
    return trimesh.Trimesh(vertices=vertices.astype(np.float32), faces=mesh.faces,
                           vertex_normals=normals.astype(np.float32), vertex_colors=mesh.vertex_colors,
                           process=False)


def mesh_bytes(mesh: MeshResult, format: str = "glb", placement: Placement | None = Placement(), name: str = "",
               extras: dict | None = None) -> bytes:
    """The mesh encoded as a GLB, OBJ (vertex colours as `v x y z r g b`) or binary PLY file, the object
    named `name`; a GLB carries `extras` (and the placement) in its scene's extras."""
    if format not in FORMATS:
        raise ValueError(f"format={format!r}; expected one of {FORMATS}")
    tm = to_trimesh(mesh, placement, up="z" if format == "ply" else "y")
    name = name.strip() or "object"
    if format == "glb":
        scene = trimesh.Scene()
        scene.add_geometry(tm, geom_name=name, node_name=name)
        record = dict(extras or {})
        if placement is not None:
            record.update(pivot=placement.pivot, size_source=placement.source,
                          height_m=round(float(tm.extents[1]), 4), up="+Y", units="metres")
        scene.metadata["ln3diff"] = record
        return trimesh.exchange.gltf.export_glb(scene, include_normals=True)
    if format == "obj":
        text = trimesh.exchange.obj.export_obj(tm, include_normals=True, include_color=True,
                                               include_texture=False, write_texture=False)
        return f"o {_one_line(name)}\n".encode() + text.encode("utf-8")
    return trimesh.exchange.ply.export_ply(tm, encoding="binary", vertex_normal=True)


def _one_line(text: str) -> str:
    return re.sub(r"\s+", " ", text)[:200]


def export_mesh(mesh: MeshResult, path_or_fileobj: str | os.PathLike | BinaryIO, format: str = "glb",
                placement: Placement | None = Placement(), name: str = "") -> int:
    """Write the mesh to a path or a binary file object; returns the number of bytes written."""
    data = mesh_bytes(mesh, format=format, placement=placement, name=name)
    if isinstance(path_or_fileobj, str | os.PathLike):
        with open(path_or_fileobj, "wb") as f:
            f.write(data)
    elif isinstance(path_or_fileobj, io.TextIOBase):
        raise TypeError("export_mesh writes bytes; open the file in binary mode ('wb')")
    else:
        path_or_fileobj.write(data)
    return len(data)

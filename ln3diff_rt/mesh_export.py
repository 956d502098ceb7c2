"""Asset files for DCC tools and game engines: GLB (default), OBJ, PLY, USDZ and USDA.

Our world is Z-up in the scene box. Each format is written in the axes its importers expect: glTF and
OBJ are +Y up (Blender's, Unity's and Unreal's glTF/OBJ importers convert from Y-up), PLY is +Z up
(Blender's PLY importer reads it as Z-up; a Y-up PLY lay on its side). Y-up is a proper rotation,
(x, y, z) -> (x, z, -y), so triangle winding and outward normals are kept. Assets are in metres
with the pivot at the bottom centre (props stand on the floor at the origin), sized by the
request (`Placement`), named after the prompt, and a GLB records the choices in its scene `extras`.

Colour is either per vertex or a base-colour texture on UVs (`Material`): a textured GLB carries a glTF 2.0
metallic-roughness material (baseColorTexture, metallic 0) and no vertex colours (glTF would multiply them);
an OBJ refers to an MTL file and a PNG beside it; USD binds a UsdPreviewSurface (`usd_export`). `asset_files`
writes every file of one object, keyed by `export_file_name`'s keys: the format alone ("glb") for the one
level of detail, "LOD<k>.<format>" for each of several (one file per level, `name_LOD0.glb` ...: the suffix
Unity's importer groups into a LODGroup and Unreal's LOD import reads level by level), plus "mtl" and "png"
where an OBJ or a USDA refers to them. Every level uses the same UVs and the same texture.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO

import numpy as np
from PIL import Image

from ln3diff_rt.gltf import glb_bytes
from ln3diff_rt.meshing import MeshResult
from ln3diff_rt.options import FORMATS, USD_FORMATS
from ln3diff_rt.usd_export import usd_bytes

if TYPE_CHECKING:
    import trimesh

COMPANIONS = ("mtl", "png")  # files an OBJ (mtl, png) or a USDA (png) refers to by name
SLUG_CHARS = 60
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


@dataclass(frozen=True)
class Material:
    """How an asset is coloured: `texture` [S, S, 3] uint8 (top row first) on the mesh's UVs, or vertex colours
    where None; glTF metallic-roughness with metallic 0 and this roughness."""

    texture: np.ndarray | None = None
    roughness: float = 0.5

    @functools.cached_property
    def png(self) -> bytes:
        """The texture as a PNG file (encoded once, shared by every file that holds or refers to it)."""
        buffer = io.BytesIO()
        Image.fromarray(self.texture).save(buffer, format="PNG")
        return buffer.getvalue()


def slug(name: str, seed: int) -> str:
    """A file-name stem from a name (the prompt) and the seed: 'a red cube', 7 -> 'a-red-cube_s7'.

    Where the readable part loses something (other scripts than ASCII, punctuation, a cut at
    SLUG_CHARS), a short hash of the whole name keeps distinct names in distinct files:
    '红色的立方体', 0 -> 'object-1b2c3d_s0'.
    """
    readable = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    stem = readable[:SLUG_CHARS] or "object"
    if stem != re.sub(r"\s+", "-", name.strip().lower()):
        stem += "-" + hashlib.sha256(name.encode()).hexdigest()[:6]
    return f"{stem}_s{seed}"


def export_file_name(stem: str, key: str) -> str:
    """The file name of an `asset_files` key: ("chair_s3", "glb") -> chair_s3.glb, "LOD1.glb" -> chair_s3_LOD1.glb,
    "png" -> chair_s3.png."""
    return f"{stem}_{key}" if key.startswith("LOD") else f"{stem}.{key}"


def placed(mesh: MeshResult, placement: Placement | None = Placement(), up: str = "y",
           reference: MeshResult | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Vertices and normals [V, 3] float32 in metres with +Y up (`up="z"` keeps the world's +Z up, for PLY), sized
    and placed by `placement` from the bounds of `reference` (default: the mesh itself; the most detailed level,
    so that every level sits in the same place); `placement=None` keeps the (rotated) world coordinates."""
    if mesh.empty:
        raise ValueError("the mesh is empty (the field has no surface at the threshold); nothing to export")
    rotation = _Z_UP_TO_Y_UP if up == "y" else np.eye(3)
    vertical = 1 if up == "y" else 2
    vertices = mesh.vertices.astype(np.float64) @ rotation.T
    normals = mesh.normals.astype(np.float64) @ rotation.T
    if placement is not None:
        framing = vertices if reference is None else reference.vertices.astype(np.float64) @ rotation.T
        lo, hi = framing.min(axis=0), framing.max(axis=0)
        extent = hi - lo
        scale = (placement.height / max(float(extent[vertical]), 1e-12) if placement.height is not None
                 else placement.longest / max(float(extent.max()), 1e-12))
        anchor = (lo + hi) / 2
        if placement.pivot == "bottom":
            anchor[vertical] = lo[vertical]
        vertices = (vertices - anchor) * scale
    return vertices.astype(np.float32), normals.astype(np.float32)


def to_trimesh(mesh: MeshResult, placement: Placement | None = Placement(), up: str = "y",
               reference: MeshResult | None = None) -> trimesh.Trimesh:
    """The mesh as a trimesh, placed as `placed` places it, with its vertex colours."""
    import trimesh  # on first use (~0.9 s with scipy): a process that writes only GLB never pays for it

    vertices, normals = placed(mesh, placement, up, reference)
    return trimesh.Trimesh(vertices=vertices, faces=mesh.faces, vertex_normals=normals,
                           vertex_colors=mesh.vertex_colors, process=False)


def mesh_bytes(mesh: MeshResult, format: str = "glb", placement: Placement | None = Placement(), name: str = "",
               extras: dict | None = None, material: Material = Material(), stem: str = "object",
               reference: MeshResult | None = None) -> bytes:
    """The mesh encoded as one file: GLB, OBJ (vertex colours as `v x y z r g b`, or UVs and `mtllib stem.mtl`),
    binary PLY (vertex colours), USDZ or USDA (texture `stem.png`), the object named `name`; a GLB carries
    `extras` (and the placement) in its scene's extras. A textured `material` needs the mesh's `uvs`."""
    if format not in FORMATS:
        raise ValueError(f"format={format!r}; expected one of {FORMATS}")
    textured = material.texture is not None and format != "ply"
    if textured and mesh.uvs is None:
        raise ValueError("a textured material needs a mesh with UVs (texturing.unwrap)")
    name = name.strip() or "object"
    up = "z" if format == "ply" else "y"
    vertices, normals = placed(mesh, placement, up, reference)
    record = dict(extras or {})
    if placement is not None:
        frame = vertices if reference is None and up == "y" else placed(reference or mesh, placement)[0]
        record.update(pivot=placement.pivot, size_source=placement.source,
                      height_m=round(float(frame[:, 1].max() - frame[:, 1].min()), 4), up="+Y", units="metres")
    if format == "glb":
        return glb_bytes(vertices, mesh.faces, normals, name, {"ln3diff": record},
                         colors=None if textured else mesh.vertex_colors, uvs=mesh.uvs if textured else None,
                         texture_png=material.png if textured else None, roughness=material.roughness)
    if format in USD_FORMATS:
        return usd_bytes(format, vertices, mesh.faces, normals, mesh.vertex_colors,
                         mesh.uvs if textured else None, material.png if textured else None, f"{stem}.png", name,
                         material.roughness, record)
    import trimesh

    tm = trimesh.Trimesh(vertices=vertices, faces=mesh.faces, vertex_normals=normals,
                         vertex_colors=mesh.vertex_colors, process=False)
    if textured:
        tm.visual = trimesh.visual.TextureVisuals(uv=mesh.uvs, material=trimesh.visual.material.PBRMaterial(
            name=stem, baseColorTexture=Image.fromarray(material.texture),
            metallicFactor=0.0, roughnessFactor=float(material.roughness)))
    if format == "obj":
        if textured:  # trimesh's own MTL would tint the texture (Kd 0.4) and name the PNG after the material
            text, _ = trimesh.exchange.obj.export_obj(tm, include_normals=True, include_texture=True,
                                                      return_texture=True, mtl_name=f"{stem}.mtl")
        else:
            text = trimesh.exchange.obj.export_obj(tm, include_normals=True, include_color=True,
                                                   include_texture=False, write_texture=False)
        return f"o {_one_line(name)}\n".encode() + text.encode("utf-8")
    return trimesh.exchange.ply.export_ply(tm, encoding="binary", vertex_normal=True)


def obj_material(stem: str, roughness: float) -> bytes:
    """The MTL file of a textured OBJ: white diffuse times the texture `stem.png`, PBR roughness (`Pr`) and metallic
    (`Pm`, 0) as Blender's importer reads them."""
    return (f"newmtl {stem}\nKa 0 0 0\nKd 1 1 1\nKs 0 0 0\nd 1\nillum 1\nPr {roughness:g}\nPm 0\n"
            f"map_Kd {stem}.png\n").encode()


def asset_files(levels: list[MeshResult], formats: tuple[str, ...], placement: Placement | None = Placement(),
                name: str = "", extras: dict | None = None, material: Material = Material(), stem: str = "object"
                ) -> dict[str, bytes]:
    """Every file of one object: key -> bytes (see `export_file_name`). `levels` are its levels of detail, most
    detailed first (one level: files keyed by format; several: "LOD<k>.<format>"), placed alike."""
    if not levels:
        raise ValueError("no mesh to export")
    files = {}
    for k, level in enumerate(levels):
        lod = {} if len(levels) == 1 else {"lod": k}
        for fmt in formats:
            key = fmt if len(levels) == 1 else f"LOD{k}.{fmt}"
            level_name = name if len(levels) == 1 else f"{name.strip() or 'object'}_LOD{k}"
            files[key] = mesh_bytes(level, fmt, placement, level_name, {**(extras or {}), **lod}, material, stem,
                                    reference=levels[0])
    if material.texture is not None and {"obj", "usda"} & set(formats):
        files["png"] = material.png
        if "obj" in formats:
            files["mtl"] = obj_material(stem, material.roughness)
    return files


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

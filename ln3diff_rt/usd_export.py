"""USD assets (`usda` text, `usdz` package) through Pixar's usd-core, for Apple AR and NVIDIA Omniverse.

The stage is Y-up with metersPerUnit = 1 (usdview's and ARKit's conventions); one `Xform` named after
the object (its prompt as the display name) holds the `Mesh` and a `UsdPreviewSurface` material bound to
it: a `UsdUVTexture` on the `st` primvar feeds diffuseColor where the mesh is textured, else the vertex
colours (`displayColor`, linear) do; metallic 0, roughness as asked. A `usdz` packs a binary layer and
the texture; a `usda` refers to the texture file beside it by name.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from ln3diff_rt.options import USD_FORMATS


def _pxr():
    try:
        from pxr import Gf, Sdf, Usd, UsdGeom, UsdShade, UsdUtils, Vt
    except ImportError as err:
        raise ImportError("USD export (usdz, usda) needs Pixar's usd-core: `pip install usd-core`") from err
    return Gf, Sdf, Usd, UsdGeom, UsdShade, UsdUtils, Vt


def srgb_to_linear(c: np.ndarray) -> np.ndarray:
    """sRGB-encoded values in [0, 1] -> linear light (USD colours are linear)."""
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


def _stage(vertices: np.ndarray, faces: np.ndarray, normals: np.ndarray, colors: np.ndarray, uvs: np.ndarray | None,
           texture_file: str | None, name: str, roughness: float, metadata: dict):
    """An in-memory stage: vertices [V, 3] metres Y-up, faces [F, 3] counter-clockwise, colours [V, 4] uint8."""
    Gf, Sdf, Usd, UsdGeom, UsdShade, _, Vt = _pxr()
    from pxr import Tf

    stage = Usd.Stage.CreateInMemory()
    UsdGeom.SetStageUpAxis(stage, UsdGeom.Tokens.y)
    UsdGeom.SetStageMetersPerUnit(stage, 1.0)
    prim_name = Tf.MakeValidIdentifier(name)
    root = UsdGeom.Xform.Define(stage, f"/{prim_name}")
    stage.SetDefaultPrim(root.GetPrim())
    Usd.ModelAPI(root.GetPrim()).SetKind("component")
    root.GetPrim().SetDisplayName(name)
    stage.GetRootLayer().customLayerData = {"ln3diff": {k: v for k, v in metadata.items() if v is not None}}

    mesh = UsdGeom.Mesh.Define(stage, f"/{prim_name}/mesh")
    mesh.CreateSubdivisionSchemeAttr(UsdGeom.Tokens.none)
    mesh.CreatePointsAttr(Vt.Vec3fArray.FromNumpy(np.ascontiguousarray(vertices, np.float32)))
    mesh.CreateFaceVertexCountsAttr(Vt.IntArray.FromNumpy(np.full(len(faces), 3, np.int32)))
    mesh.CreateFaceVertexIndicesAttr(Vt.IntArray.FromNumpy(np.ascontiguousarray(faces.reshape(-1), np.int32)))
    mesh.CreateNormalsAttr(Vt.Vec3fArray.FromNumpy(np.ascontiguousarray(normals, np.float32)))
    mesh.SetNormalsInterpolation(UsdGeom.Tokens.vertex)
    mesh.CreateExtentAttr(Vt.Vec3fArray([Gf.Vec3f(*map(float, vertices.min(axis=0))),
                                         Gf.Vec3f(*map(float, vertices.max(axis=0)))]))
    primvars = UsdGeom.PrimvarsAPI(mesh)
    linear = srgb_to_linear(colors[:, :3].astype(np.float64) / 255.0).astype(np.float32)
    primvars.CreatePrimvar("displayColor", Sdf.ValueTypeNames.Color3fArray, UsdGeom.Tokens.vertex).Set(
        Vt.Vec3fArray.FromNumpy(np.ascontiguousarray(linear)))

    material = UsdShade.Material.Define(stage, f"/{prim_name}/material")
    surface = UsdShade.Shader.Define(stage, f"/{prim_name}/material/surface")
    surface.CreateIdAttr("UsdPreviewSurface")
    surface.CreateInput("metallic", Sdf.ValueTypeNames.Float).Set(0.0)
    surface.CreateInput("roughness", Sdf.ValueTypeNames.Float).Set(float(roughness))
    material.CreateSurfaceOutput().ConnectToSource(surface.ConnectableAPI(), "surface")
    reader = UsdShade.Shader.Define(stage, f"/{prim_name}/material/primvar")
    if texture_file is not None:
        primvars.CreatePrimvar("st", Sdf.ValueTypeNames.TexCoord2fArray, UsdGeom.Tokens.vertex).Set(
            Vt.Vec2fArray.FromNumpy(np.ascontiguousarray(uvs, np.float32)))
        reader.CreateIdAttr("UsdPrimvarReader_float2")
        reader.CreateInput("varname", Sdf.ValueTypeNames.String).Set("st")
        texture = UsdShade.Shader.Define(stage, f"/{prim_name}/material/base_color")
        texture.CreateIdAttr("UsdUVTexture")
        texture.CreateInput("file", Sdf.ValueTypeNames.Asset).Set(texture_file)
        texture.CreateInput("sourceColorSpace", Sdf.ValueTypeNames.Token).Set("sRGB")
        texture.CreateInput("st", Sdf.ValueTypeNames.Float2).ConnectToSource(reader.ConnectableAPI(), "result")
        rgb = texture.CreateOutput("rgb", Sdf.ValueTypeNames.Float3)
    else:
        reader.CreateIdAttr("UsdPrimvarReader_float3")
        reader.CreateInput("varname", Sdf.ValueTypeNames.String).Set("displayColor")
        rgb = reader.CreateOutput("result", Sdf.ValueTypeNames.Float3)
    surface.CreateInput("diffuseColor", Sdf.ValueTypeNames.Color3f).ConnectToSource(rgb)
    UsdShade.MaterialBindingAPI.Apply(mesh.GetPrim()).Bind(material)
    return stage


def usd_bytes(format: str, vertices: np.ndarray, faces: np.ndarray, normals: np.ndarray, colors: np.ndarray,
              uvs: np.ndarray | None = None, texture_png: bytes | None = None, texture_name: str = "texture.png",
              name: str = "object", roughness: float = 0.5, metadata: dict | None = None) -> bytes:
    """A `usda` layer (referring to `texture_name` beside it) or a `usdz` package (the texture inside).
    Inputs are in the asset's frame (metres, Y-up); `uvs` and `texture_png` together make it textured."""
    if format not in USD_FORMATS:
        raise ValueError(f"format={format!r}; expected one of {USD_FORMATS}")
    textured = uvs is not None and texture_png is not None
    stage = _stage(vertices, faces, normals, colors, uvs, texture_name if textured else None, name, roughness,
                   metadata or {})
    if format == "usda":
        return stage.GetRootLayer().ExportToString().encode("utf-8")
    UsdUtils = _pxr()[5]
    with tempfile.TemporaryDirectory(prefix="ln3diff-usdz-") as tmp:
        layer = Path(tmp) / "asset.usdc"
        stage.GetRootLayer().Export(str(layer))
        if textured:
            (Path(tmp) / texture_name).write_bytes(texture_png)
        package = Path(tmp) / "asset.usdz"
        if not UsdUtils.CreateNewUsdzPackage(str(layer), str(package)):
            raise RuntimeError("usd-core could not write the usdz package")
        return package.read_bytes()

"""Binary glTF 2.0 (GLB) of one triangle mesh, in numpy: the default asset of every request.

Written out rather than through trimesh's exporter because importing trimesh (and the scipy it pulls in) costs
~0.9 s, a third of a cold `ln3diff generate`; a GLB of one mesh is a JSON header and one binary buffer. It holds
what trimesh's exporter wrote before (tests read the files back with trimesh): positions with their bounds, unit
normals, uint32 indices, and either normalised uint8 vertex colours (no material: glTF's default material
multiplies them) or UVs and a metallic-roughness material with an embedded PNG base-colour texture; the scene
carries `extras`. Other formats still go through trimesh (`mesh_export`).
"""

from __future__ import annotations

import json
import struct

import numpy as np

FLOAT, UNSIGNED_BYTE, UNSIGNED_INT = 5126, 5121, 5125  # glTF accessor component types
ARRAY_BUFFER, ELEMENT_ARRAY_BUFFER = 34962, 34963  # bufferView targets
TRIANGLES = 4
GENERATOR = "ln3diff-rt"


def glb_bytes(vertices: np.ndarray, faces: np.ndarray, normals: np.ndarray, name: str, extras: dict | None = None,
              colors: np.ndarray | None = None, uvs: np.ndarray | None = None, texture_png: bytes | None = None,
              roughness: float = 0.5) -> bytes:
    """vertices and normals [V, 3] (+Y up, metres), faces [F, 3] counter-clockwise from outside, and either colors
    [V, 4] uint8 or uvs [V, 2] (origin bottom-left) with `texture_png` -> the GLB file's bytes."""
    if (uvs is None) != (texture_png is None):
        raise ValueError("a textured GLB needs both uvs and texture_png")
    blob = bytearray()
    views: list[dict] = []
    accessors: list[dict] = []

    def view(data: bytes, target: int | None = None) -> int:
        blob.extend(b"\0" * (-len(blob) % 4))  # every view starts 4-byte aligned
        views.append({"buffer": 0, "byteOffset": len(blob), "byteLength": len(data)} |
                     ({} if target is None else {"target": target}))
        blob.extend(data)
        return len(views) - 1

    def accessor(array: np.ndarray, kind: str, component: int, target: int, bounds: bool = False, **more) -> int:
        entry = {"bufferView": view(array.tobytes(), target), "componentType": component, "count": len(array),
                 "type": kind, **more}
        if bounds:
            entry.update(min=array.min(axis=0).tolist(), max=array.max(axis=0).tolist())
        accessors.append(entry)
        return len(accessors) - 1

    indices = np.ascontiguousarray(faces, np.uint32).reshape(-1)
    primitive: dict = {"indices": accessor(indices, "SCALAR", UNSIGNED_INT, ELEMENT_ARRAY_BUFFER), "mode": TRIANGLES,
                       "attributes": {}}
    attributes = primitive["attributes"]
    attributes["POSITION"] = accessor(np.ascontiguousarray(vertices, np.float32), "VEC3", FLOAT, ARRAY_BUFFER,
                                      bounds=True)  # the spec requires POSITION's bounds
    attributes["NORMAL"] = accessor(np.ascontiguousarray(normals, np.float32), "VEC3", FLOAT, ARRAY_BUFFER)
    document: dict = {"asset": {"version": "2.0", "generator": GENERATOR}, "scene": 0,
                      "scenes": [{"nodes": [0]} | ({"extras": extras} if extras else {})],
                      "nodes": [{"name": name, "mesh": 0}], "meshes": [{"name": name, "primitives": [primitive]}]}
    if uvs is not None:
        flipped = np.column_stack([uvs[:, 0], 1.0 - uvs[:, 1]])  # glTF's UV origin is the image's top-left
        attributes["TEXCOORD_0"] = accessor(np.ascontiguousarray(flipped, np.float32), "VEC2", FLOAT, ARRAY_BUFFER)
        document["images"] = [{"bufferView": view(texture_png), "mimeType": "image/png"}]
        document["textures"] = [{"source": 0}]
        document["materials"] = [{"name": name, "pbrMetallicRoughness": {
            "baseColorTexture": {"index": 0}, "metallicFactor": 0.0, "roughnessFactor": float(roughness)}}]
        primitive["material"] = 0
    elif colors is not None:
        attributes["COLOR_0"] = accessor(np.ascontiguousarray(colors, np.uint8), "VEC4", UNSIGNED_BYTE, ARRAY_BUFFER,
                                         normalized=True)
    blob.extend(b"\0" * (-len(blob) % 4))
    document["buffers"] = [{"byteLength": len(blob)}]
    document["bufferViews"], document["accessors"] = views, accessors
    header = json.dumps(document, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 4)  # the JSON chunk is padded with spaces, the binary one with zeros
    total = 12 + 8 + len(header) + 8 + len(blob)
    return b"".join([struct.pack("<4sII", b"glTF", 2, total), struct.pack("<I4s", len(header), b"JSON"), header,
                     struct.pack("<I4s", len(blob), b"BIN\0"), bytes(blob)])

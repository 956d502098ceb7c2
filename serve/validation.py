"""Request checking at the gRPC boundary: a GenerateRequest becomes a runner `Request` or an `InvalidOption`.

The settings, their defaults and their bounds come from `ln3diff_rt.options` (proto fields carry
the same names); `Limits` only tightens the bounds, to cap what one request may cost, and adds what no
single option bounds: the previews' pixels and the size of a GenerateUnary reply. Every message names
the field as the proto spells it, the value (quoted short) and what was expected, so the client can fix
the request from INVALID_ARGUMENT alone. Prompts are normalised (`ln3diff_rt.prompts`) before any check.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from google.protobuf.message import DecodeError, Message

from ln3diff_rt.images import ImageError, read_image
from ln3diff_rt.options import FORMATS as MESH_FORMATS
from ln3diff_rt.options import GenerationOptions, InvalidOption, int_list, option_specs, resolve_seed
from ln3diff_rt.pipeline import Generator
from ln3diff_rt.prompts import normalise_prompt
from ln3diff_rt.runner import Request
from serve.ln3diff.v1 import generator_pb2 as pb

DEFAULT_FORMATS = ("glb",)
# Bytes per face of each mesh file, for V ~ F / 2 vertices (a closed surface), with a margin over what was measured
# at 200k faces (GLB 26, OBJ 94, PLY 27), and each file's fixed part (headers, the object's name, GLB extras).
MESH_BYTES_PER_FACE = {"glb": 32, "obj": 120, "ply": 32, "usdz": 40, "usda": 160}
MESH_FILE_BYTES = 64 << 10
RESULT_BYTES = 64 << 10  # the Result message: counts, timings, warnings


@dataclass(frozen=True)
class Limits:
    """The server's cost limits: each tightens the bound of the GenerationOptions field it names."""

    max_prompt_chars: int = 500
    max_image_bytes: int = 8 << 20
    max_steps: int = 200
    max_guidance: float = 20.0
    max_shift: float = 10.0
    min_mesh_resolution: int = 16
    max_mesh_resolution: int = 256
    min_faces: int = 100  # so 0 (keep every face) is refused: the face count is part of the cost
    max_faces: int = 200_000
    max_preview_views: int = 16
    min_preview_size: int = 16
    max_preview_size: int = 512
    max_preview_pixels: int = 16 * 256 * 256  # preview_views x preview_size^2: 16 views of 256 px, 4 of 512
    max_unary_reply_bytes: int = 4 << 20  # what GenerateUnary sends at most: gRPC's default receive limit
    max_texture: int = 2048  # texture size: the bake queries the field once per texel

    def effective_bounds(self) -> dict[str, tuple[float, float]]:
        """Option field -> the (lo, hi) a request meets here: the option's own bounds tightened by these limits."""
        bounds = self.bounds()
        return {name: spec.tightened(*bounds.get(name, (None, None)))
                for name, spec in option_specs().items() if not spec.choices}

    def bounds(self) -> dict[str, tuple[float | None, float | None]]:
        """GenerationOptions field -> (lo, hi); None keeps the option's own bound."""
        return {"steps": (None, self.max_steps), "guidance": (None, self.max_guidance),
                "shift": (None, self.max_shift),
                "mesh_resolution": (self.min_mesh_resolution, self.max_mesh_resolution),
                "faces": (self.min_faces, self.max_faces), "preview_views": (None, self.max_preview_views),
                "preview_size": (self.min_preview_size, self.max_preview_size),
                "texture": (None, self.max_texture), "lods": (self.min_faces, self.max_faces)}


def decode_request(message_type: type[Message], data: bytes) -> Message:
    """The request message the bytes hold, or InvalidOption("request") when they hold none."""
    try:
        return message_type.FromString(data)
    except DecodeError as e:
        raise InvalidOption("request", f"<{len(data)} bytes>",
                            f"a serialised {message_type.DESCRIPTOR.full_name} (they do not parse as one)") from e


def requested_options(request: pb.GenerateRequest) -> dict:
    """The GenerationOptions fields the request sets: `optional` fields when present, the others when non-zero."""
    given = {}
    for name in option_specs():
        field = request.DESCRIPTOR.fields_by_name[name]
        value = getattr(request, name)
        if request.HasField(name) if field.has_presence else value:
            given[name] = value
    return given


def check_request(request: pb.GenerateRequest, limits: Limits, model: Generator | None = None) -> Request:
    """The request with the served `model`'s defaults filled in, or InvalidOption naming the first bad field."""
    prompt = normalise_prompt(request.prompt)
    image = check_image(request.image, limits) if request.image else None
    if not prompt and image is None:
        raise InvalidOption("prompt", request.prompt, "a non-empty description, e.g. 'a red cube' (or an image)")
    if len(prompt) > limits.max_prompt_chars:
        raise InvalidOption("prompt", f"<{len(prompt)} chars>", f"at most {limits.max_prompt_chars} characters")
    defaults = model.default_options() if model is not None else GenerationOptions()
    options = defaults.replace(**requested_options(request)).validate(limits.bounds())
    pixels = options.preview_views * options.preview_size ** 2
    if pixels > limits.max_preview_pixels:
        raise InvalidOption("preview_views", options.preview_views,
                            f"preview_views x preview_size^2 at most {limits.max_preview_pixels} pixels here, got "
                            f"{options.preview_views} x {options.preview_size}^2 = {pixels}: fewer or smaller views")
    if model is not None:
        if options.sampler not in model.samplers:
            raise InvalidOption("sampler", options.sampler, f"one of {', '.join(model.samplers)} for the served model")
        model.check_inputs(prompt, image)
    if request.skip_mesh and request.formats:
        raise InvalidOption("formats", list(request.formats), "empty when skip_mesh is set")
    formats = () if request.skip_mesh else tuple(request.formats) or DEFAULT_FORMATS
    for fmt in formats:
        if fmt not in MESH_FORMATS:
            raise InvalidOption("formats", fmt, f"each one of {MESH_FORMATS}")
    if len(set(formats)) != len(formats):
        raise InvalidOption("formats", list(formats), "no format twice")
    seed = resolve_seed(request.seed if request.HasField("seed") else None)
    return Request(prompt, seed, options, formats, not request.skip_mesh, image)


def unary_reply_bytes(request: Request) -> int:
    """An upper estimate of a GenerateUnary reply's size from the request's settings alone: meshes at the face
    budget, previews as raw RGB (a PNG is never much larger)."""
    meshes, previews = _reply_parts(request)
    return meshes + previews + RESULT_BYTES


def unary_reply_refusal(request: Request, size: int, limit: int, measured: bool) -> InvalidOption:
    """The INVALID_ARGUMENT for a GenerateUnary reply of `size` bytes over `limit`, naming the setting that weighs
    most and pointing to the streaming Generate."""
    meshes, previews = _reply_parts(request)
    o = request.options
    field, value = ("faces", o.faces) if meshes >= previews else ("preview_views", o.preview_views)
    size_text = f"is {size}" if measured else f"would be about {size}"
    return InvalidOption(field, value, f"a GenerateUnary reply within max_unary_reply_bytes = {limit}; this one "
                         f"{size_text} bytes: lower faces, formats, preview_views or preview_size, or call the "
                         "streaming Generate, which sends the same in messages of about 1 MiB")


def _reply_parts(request: Request) -> tuple[int, int]:
    """(mesh bytes, preview bytes) of a reply, estimated from the settings; no face budget: a box-filling surface."""
    o = request.options
    faces = (o.faces or 12 * o.mesh_resolution ** 2) + sum(int_list(o.lods) or [])  # every level is a file
    # The PNG, embedded or beside each format's files: baked atlases compress to well under a byte per texel, and the
    # real reply is measured before sending anyway; an uncompressed bound (3 bytes) refused default requests.
    texture = o.texture ** 2
    meshes = sum(MESH_BYTES_PER_FACE[fmt] * faces + MESH_FILE_BYTES + texture for fmt in request.formats) \
        if request.mesh else 0
    return meshes, o.preview_views * (3 * o.preview_size ** 2 + o.preview_size + 1024)


def check_image(data: bytes, limits: Limits) -> np.ndarray:
    """The image file decoded to RGBA, or InvalidOption("image") saying why not (the bytes are not echoed)."""
    if len(data) > limits.max_image_bytes:
        raise InvalidOption("image", f"<{len(data)} bytes>", f"an image file of at most {limits.max_image_bytes} bytes")
    try:
        return read_image(data, name="image")
    except ImageError as e:
        raise InvalidOption("image", f"<{len(data)} bytes>", str(e).removeprefix("image: ")) from e

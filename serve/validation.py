"""Request checking at the gRPC boundary: a GenerateRequest becomes a `Job` spec or an `InvalidField`.

Every message names the field as the proto spells it, the value and what was expected, so the
client can fix the request from INVALID_ARGUMENT alone. Unset fields take GenerationOptions'
defaults; `Limits` are the server's own bounds (tighter than the pipeline's, to bound the work).
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

from ln3diff_rt.mesh_export import FORMATS as MESH_FORMATS
from ln3diff_rt.pipeline import GenerationOptions
from serve.ln3diff.v1 import generator_pb2 as pb

SAMPLERS = ("euler", "heun")
DEFAULT_FORMATS = ("glb",)


class InvalidField(ValueError):
    """A request field out of range; str() starts with the field name."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class Limits:
    max_prompt_chars: int = 500
    max_steps: int = 200
    max_guidance: float = 20.0
    max_shift: float = 10.0
    min_mesh_resolution: int = 16
    max_mesh_resolution: int = 256
    min_faces: int = 100
    max_faces: int = 200_000
    max_preview_views: int = 16
    min_preview_size: int = 16
    max_preview_size: int = 512


@dataclass(frozen=True)
class RequestSpec:
    """A checked request: what the scheduler runs."""

    prompt: str
    seed: int
    options: GenerationOptions
    formats: tuple[str, ...]  # empty when no mesh is wanted
    mesh: bool


def random_seed() -> int:
    """A fresh seed in [1, 2**31 - 1], small enough for any tool a user may paste it into."""
    return secrets.randbelow(2**31 - 1) + 1


def check_request(request: pb.GenerateRequest, limits: Limits) -> RequestSpec:
    """The request with defaults filled in, or InvalidField naming the first bad field."""
    d = GenerationOptions()
    prompt = request.prompt.strip()
    if not prompt:
        raise _bad("prompt", request.prompt, "a non-empty description, e.g. 'a red cube'")
    if len(prompt) > limits.max_prompt_chars:
        raise _bad("prompt", f"<{len(prompt)} chars>", f"at most {limits.max_prompt_chars} characters")

    steps = request.steps or d.steps
    _in_range("steps", steps, 1, limits.max_steps)
    guidance = request.guidance if request.HasField("guidance") else d.guidance
    _in_range("guidance", guidance, 0.0, limits.max_guidance)
    shift = request.shift if request.HasField("shift") else d.shift
    if not (math.isfinite(shift) and 0.0 < shift <= limits.max_shift):
        raise _bad("shift", shift, f"a number in (0, {limits.max_shift}]")
    sampler = request.sampler or d.sampler
    if sampler not in SAMPLERS:
        raise _bad("sampler", sampler, f"one of {SAMPLERS}")

    if request.skip_mesh and request.formats:
        raise _bad("formats", list(request.formats), "empty when skip_mesh is set")
    formats = () if request.skip_mesh else tuple(request.formats) or DEFAULT_FORMATS
    for fmt in formats:
        if fmt not in MESH_FORMATS:
            raise _bad("formats", fmt, f"each one of {MESH_FORMATS}")
    if len(set(formats)) != len(formats):
        raise _bad("formats", list(formats), "no format twice")
    resolution = request.mesh_resolution or d.mesh_resolution
    _in_range("mesh_resolution", resolution, limits.min_mesh_resolution, limits.max_mesh_resolution)
    faces = request.faces if request.HasField("faces") else d.faces
    _in_range("faces", faces, limits.min_faces, limits.max_faces)

    views = request.preview_views if request.HasField("preview_views") else d.preview_views
    _in_range("preview_views", views, 0, limits.max_preview_views)
    size = request.preview_size or d.preview_size
    _in_range("preview_size", size, limits.min_preview_size, limits.max_preview_size)

    options = GenerationOptions(steps=steps, guidance=float(guidance), shift=float(shift), sampler=sampler,
                                mesh_resolution=resolution, faces=faces, preview_views=views, preview_size=size)
    try:
        options.validate()
    except ValueError as e:  # the pipeline's own bounds, should Limits ever be looser
        raise InvalidField(str(e).split("=", 1)[0], str(e)) from e
    return RequestSpec(prompt, int(request.seed) or random_seed(), options, formats, not request.skip_mesh)


def _bad(field: str, value, expected: str) -> InvalidField:
    return InvalidField(field, f"{field}={value!r}: expected {expected}")


def _in_range(field: str, value, lo, hi) -> None:
    if not (math.isfinite(value) and lo <= value <= hi):
        kind = "an integer" if isinstance(lo, int) and isinstance(hi, int) else "a number"
        raise _bad(field, value, f"{kind} in [{lo}, {hi}]")

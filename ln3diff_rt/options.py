"""Every request setting in one place: its default, its bounds and its help text.

`GenerationOptions` is what the pipeline runs. The `ln3diff generate` flags, the gRPC client's
flags, the profiler's flags, the server's limits and the request validation are all derived from
its fields, so a setting has one name, one meaning and one default everywhere. A server may
tighten the bounds (its cost limits), never rename or redefine a setting. The seed means the same
everywhere too: an integer is that seed (0 included); no seed draws a random one, reported back.

Torch-free on purpose: the gRPC client imports it, also inside Blender's Python.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field

SAMPLERS = ("euler", "heun", "dpmpp_2m")  # which of them a model knows: Generator.samplers
USD_FORMATS = ("usdz", "usda")  # asset formats written by usd-core (the `assets` extra)
FORMATS = ("glb", "obj", "ply", *USD_FORMATS)  # asset formats a request may ask for (mesh_export writes them)
MAX_SEED = 2**63 - 1  # what a signed 64-bit integer holds: torch's generators and the proto's uint64 both take it


class InvalidOption(ValueError):
    """A setting out of its bounds; `field` names it as GenerationOptions (and the proto) spell it.

    The message quotes at most QUOTE_CHARS of the value's repr, then its length: a megabyte prompt must not come
    back whole (over gRPC it would not fit in the status message)."""

    QUOTE_CHARS = 100

    def __init__(self, field: str, value, expected: str):
        super().__init__(f"{field}={self.quote(value)}: expected {expected}")
        self.field, self.value, self.expected = field, value, expected

    @classmethod
    def quote(cls, value) -> str:
        """repr(value), cut after QUOTE_CHARS characters with the value's length added where it was cut."""
        text = repr(value)
        if len(text) <= cls.QUOTE_CHARS:
            return text
        unit = "chars" if isinstance(value, str) else "bytes" if isinstance(value, bytes | bytearray) else "items"
        length = f"{len(value)} {unit}" if hasattr(value, "__len__") else f"{len(text)} chars as text"
        return f"{text[:cls.QUOTE_CHARS]}... ({length})"


@dataclass(frozen=True)
class Spec:
    """Bounds and help of one setting. `flag` is its command-line name where that differs from the field's."""

    help: str
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False  # lo itself excluded
    choices: tuple[str, ...] = ()
    flag: str | None = None
    max_items: int = 0  # > 0: the value is a text list of up to this many comma-separated integers, each in bounds

    def tightened(self, lo: float | None = None, hi: float | None = None) -> tuple[float, float]:
        """The spec's bounds, narrowed (never widened) by `lo`/`hi` where given."""
        return (self.lo if lo is None else max(lo, self.lo), self.hi if hi is None else min(hi, self.hi))

    def check(self, name: str, value, lo: float | None = None, hi: float | None = None) -> None:
        """Raise InvalidOption unless `value` is allowed; `lo`/`hi` tighten the spec's own bounds."""
        if self.choices:
            if value not in self.choices:
                raise InvalidOption(name, value, f"one of {', '.join(self.choices)}")
            return
        lo, hi = self.tightened(lo, hi)
        if self.max_items:
            items = int_list(value) if isinstance(value, str) else None
            if items is None or len(items) > self.max_items or not all(lo <= i <= hi for i in items):
                raise InvalidOption(name, value, f"up to {self.max_items} comma-separated integers in [{lo}, {hi}], "
                                                 "e.g. '30000,8000,2000', or '' for none")
            return
        integer = isinstance(self.lo, int) and isinstance(self.hi, int)
        kind = "an integer" if integer else "a number"
        number = isinstance(value, int) if integer else isinstance(value, (int, float))
        low_ok = number and math.isfinite(value) and (value > lo if self.lo_open else value >= lo)
        if isinstance(value, bool) or not (low_ok and value <= hi):
            raise InvalidOption(name, value, f"{kind} in {'(' if self.lo_open else '['}{lo}, {hi}]")


def int_list(text: str) -> tuple[int, ...] | None:
    """'30000, 8000,2000' -> (30000, 8000, 2000); '' -> (); None unless every item is a plain integer."""
    items = [t.strip() for t in text.split(",")] if text.strip() else []
    return tuple(int(t) for t in items) if all(t.isdigit() for t in items) else None


def _option(default, help: str, **bounds):
    return field(default=default, metadata={"spec": Spec(help, **bounds)})


@dataclass(frozen=True)
class GenerationOptions:
    steps: int = _option(8, "sampling steps (denoiser calls per object, twice that with guidance)", lo=1, hi=1000)
    guidance: float = _option(3.0, "classifier-free guidance scale; 1 disables it", lo=0.0, hi=50.0)
    shift: float = _option(1.0, "time-grid shift; > 1 spends more steps near the noise end", lo=0.0, hi=20.0,
                           lo_open=True)
    sampler: str = _option("euler", "ODE solver", choices=SAMPLERS)
    mesh_resolution: int = _option(128, "marching-cubes grid per axis, refined coarse to fine", lo=16, hi=512,
                                   flag="resolution")
    faces: int = _option(30000, "face budget of the decimated mesh; 0 keeps every face", lo=0, hi=10_000_000)
    preview_views: int = _option(8, "turntable preview frames, 0 for none: the mesh as exported (lit colour), or the "
                                    "field ray-marched where no mesh is made", lo=0,
                                 hi=120, flag="views")
    preview_size: int = _option(128, "preview frame size in pixels", lo=16, hi=1024)
    height: float = _option(0.0, "the asset's height in metres; 0 takes it from the prompt's size word (tiny 0.25, "
                                 "small 0.5, medium 1, large 2, huge 4) or else makes the longest side 1 m",
                            lo=0.0, hi=1000.0)
    pivot: str = _option("bottom", "the asset's origin: bottom centre (props stand on the floor) or box centre",
                         choices=("bottom", "center"))
    texture: int = _option(1024, "base-colour texture size in pixels (UV-unwrapped, baked from the field; a power of "
                                 "two suits engines); 0 keeps vertex colours", lo=0, hi=8192)
    roughness: float = _option(1.0, "PBR roughness of the material (metallic is 0); 1, glTF's default, suits a "
                                    "colour that may already hold the light it was trained under", lo=0.0, hi=1.0)
    lods: str = _option("", "levels of detail as face budgets, e.g. 30000,8000,2000: one file per level "
                            "(name_LOD0.glb ...), each a decimation of the mesh sharing its UVs and texture; empty: "
                            "one file", lo=100, hi=10_000_000, max_items=8)

    def validate(self, bounds: Mapping[str, tuple[float | None, float | None]] | None = None) -> GenerationOptions:
        """Raise InvalidOption naming the first bad field; `bounds` (field -> (lo, hi)) tightens the specs."""
        bounds = bounds or {}
        for name, spec in option_specs().items():
            spec.check(name, getattr(self, name), *bounds.get(name, (None, None)))
        return self

    def replace(self, **changes) -> GenerationOptions:
        return dataclasses.replace(self, **changes)


def option_specs() -> dict[str, Spec]:
    """Field name -> Spec, in declaration order."""
    return {f.name: f.metadata["spec"] for f in dataclasses.fields(GenerationOptions)}


SEED = Spec("seed of the object; unset draws a random one, reported with the result", lo=0, hi=MAX_SEED)


def resolve_seed(seed: int | None) -> int:
    """`seed` checked against its bounds, or a fresh random one (small enough to paste anywhere) when None."""
    if seed is None:
        return secrets.randbelow(2**31 - 1) + 1
    SEED.check("seed", seed)
    return seed


# -- command-line flags ------------------------------------------------------------------------------


def flag_name(name: str) -> str:
    """The command-line flag of a GenerationOptions field: mesh_resolution -> --resolution."""
    spec = option_specs().get(name)
    return "--" + ((spec.flag if spec else None) or name).replace("_", "-")


# The denoiser's and decoder's arithmetic on the eager and compile backends (`Generator.precision`): bf16 runs them
# under autocast. Here, torch-free, so every command's flag and the pipeline share one list.
PRECISIONS = ("fp32", "bf16")


def add_precision_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--precision", default="fp32", choices=PRECISIONS,
                        help="the denoiser's and decoder's arithmetic with --backend eager or compile: bf16 runs them "
                             "under autocast (for GPUs with bf16 tensor cores; slower on most CPUs); exported engines "
                             "take theirs from build_engine.py (default: %(default)s)")


def add_option_flags(parser: argparse.ArgumentParser, shown: GenerationOptions | None = None,
                     whose: str = "the model's") -> None:
    """One flag per option, typed and bounded by its Spec. An unset flag stays None: the value is left to
    `whose` defaults (the model's own, or the server's); `shown` are the defaults the help text quotes."""
    for f in dataclasses.fields(GenerationOptions):
        spec: Spec = f.metadata["spec"]
        default, shown_value = None, getattr(shown, f.name) if shown else None
        shown_text = f"{whose}" + (f"; {shown_value} for the shipped model" if shown else "")
        # Choices are checked by Spec.check, not argparse, so a bad value is one line naming the flag.
        choices = f"; one of {', '.join(spec.choices)}" if spec.choices else ""
        parser.add_argument(flag_name(f.name), dest=f.name, type=_TYPES[f.type], default=default,
                            help=f"{spec.help}{choices} (default: {shown_text})")


def options_from_args(args: argparse.Namespace, base: GenerationOptions | None = None) -> GenerationOptions:
    """GenerationOptions from parsed flags (those left None keep `base`'s values), validated."""
    base = base or GenerationOptions()
    given = {name: getattr(args, name) for name in option_specs() if getattr(args, name, None) is not None}
    return base.replace(**given).validate()


_TYPES = {"int": int, "float": float, "str": str}

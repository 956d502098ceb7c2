"""One request path: conditions -> sampling -> decode -> mesh -> asset files -> previews, for every caller.

`run` is the only place the stages of a request are sequenced; the CLI, the server's scheduler,
the profiler, warm-up and the figures all call it. The batch stages (text, sampling, decode) run
once for all objects; the per-object stages run object by object and yield each result as soon as
it is ready, so a server streams the first while the next is meshed. The asset files come from
the mesh through UV unwrapping and texture baking (`texture` > 0), levels of detail (`lods`) and the
encoding of each format, each a stage of its own. Every stage is timed by one
clock (`timing.StageClock`). With `object_threads` > 1 several objects go through their per-object
stages at once on threads, each result handed over as soon as its object is done: much of meshing and
encoding is single-threaded native code (marching cubes, decimation, numpy) that another object's
field queries run beside, 1.07-1.27x per object at batch 8 on 2 cores (`benchmarks/bench_batch.py`). Only the
eager backend is called from two threads at once (compiled graphs and engines keep one caller).
`alive(i)` says whether object i is still wanted (client cancel,
deadline, shutdown): it is checked between stages, after every sampling step, before every
field-query chunk and before every ray chunk of a preview; an object nobody wants is dropped, and when no
object is wanted the run raises `Cancelled`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field

import numpy as np
import torch

from ln3diff_rt.conventions import FIELD_CHUNK
from ln3diff_rt.mesh_export import Material, Placement, asset_files, placement_for, slug
from ln3diff_rt.meshing import MeshResult
from ln3diff_rt.options import FORMATS, USD_FORMATS, GenerationOptions, InvalidOption, int_list
from ln3diff_rt.pipeline import Generator
from ln3diff_rt.prompts import normalise_prompt
from ln3diff_rt.texturing import bake_texture, levels_of_detail, unwrap
from ln3diff_rt.timing import StageClock

# (stage, done, total, object index or None for the whole batch): once per sampling step, at the start
# (done 0) of every other stage and at the end (done = total) of every per-object stage.
ProgressFn = Callable[[str, int, int, "int | None"], None]


BATCH_STAGES = ("encode_text", "sample", "decode")  # run once for the whole batch; the others once per object


class Cancelled(Exception):
    """No object of the run is wanted any more: the run stopped."""


class _ObjectGone(Exception):
    """This object is no longer wanted: skip the rest of its stages."""


@dataclass(frozen=True)
class Request:
    """One object to make. Requests sampled as one batch share the sampling settings (`sampling_key`)."""

    prompt: str
    seed: int
    options: GenerationOptions = field(default_factory=GenerationOptions)
    formats: tuple[str, ...] = ()  # asset files to encode into the result: "glb", "obj", "ply", "usdz", "usda"
    mesh: bool = True  # False: previews only
    image: np.ndarray | None = field(default=None, compare=False, repr=False)  # RGBA uint8 [H, W, 4] condition
    name: str = ""  # what the files are named after (default: the prompt), with the seed

    @property
    def stem(self) -> str:
        """The file-name stem of this object's files; an OBJ or USDA refers to its MTL and texture by it."""
        return slug(self.name or self.prompt, self.seed)

    @property
    def sampling_key(self) -> tuple:
        o = self.options
        return (o.steps, o.guidance, o.shift, o.sampler)

    def check(self, index: int = 0) -> None:
        """Raise ValueError (InvalidOption for a setting) naming the first bad field."""
        self.options.validate()
        if not normalise_prompt(self.prompt) and self.image is None:
            raise ValueError(f"prompts[{index}] is empty: describe the object, e.g. 'a red cube', or give an image")
        for fmt in self.formats:
            if fmt not in FORMATS:
                raise InvalidOption("formats", fmt, f"each one of {', '.join(FORMATS)}")
            if fmt in USD_FORMATS and importlib.util.find_spec("pxr") is None:
                raise InvalidOption("formats", fmt, f"a format this install writes: {fmt} needs usd-core "
                                                    f"(pip install 'ln3diff-rt[assets]')")
        if self.options.lods and importlib.util.find_spec("meshoptimizer") is None:
            raise InvalidOption("lods", self.options.lods, "'' here: levels of detail need meshoptimizer "
                                                           "(pip install 'ln3diff-rt[assets]')")


@dataclass
class GenerationResult:
    request: Request
    index: int  # position in the batch
    latent: torch.Tensor  # [3, c, h, w], in VAE units (scale undone)
    triplane: torch.Tensor  # [3, C, R, R]
    mesh: MeshResult | None
    exports: dict[str, bytes]  # mesh_export.asset_files key -> file bytes (none: empty mesh or no format asked)
    previews: list[np.ndarray]  # [H, W, 3] uint8 turntable frames
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage; batch stages shared
    placement: Placement | None = None  # how the exported meshes were sized and placed

    @property
    def prompt(self) -> str:
        return self.request.prompt

    @property
    def seed(self) -> int:
        return self.request.seed

    @property
    def stem(self) -> str:
        return self.request.stem


OBJECT_THREADS = 2  # objects finished at once when a caller asks for the default (measured on 2 cores)


def object_threads_for(gen: Generator, requested: int | None, count: int) -> int:
    """How many objects `run` finishes at once: `requested` (None: OBJECT_THREADS), at most `count`, and 1 on a
    backend other than eager (a compiled graph or an engine is not called from two threads)."""
    if requested is not None and requested < 1:
        raise ValueError(f"object_threads={requested}; expected at least 1")
    if gen.backend != "eager":
        return 1
    return max(1, min(OBJECT_THREADS if requested is None else requested, count))


def run(gen: Generator, requests: list[Request], *, progress: ProgressFn | None = None,
        alive: Callable[[int], bool] | None = None, object_threads: int | None = 1) -> Iterator[GenerationResult]:
    """Generate one object per request, sampled as one batch; yields each object's result as soon as it is done.

    Up to `object_threads` objects are finished at once (see `object_threads_for`); with one, results come in
    request order, with more in the order they finish (`GenerationResult.index` says which request each is).
    """
    if not requests:
        return
    for i, r in enumerate(requests):
        r.check(i)
        gen.check_options(r.options)
        gen.check_inputs(r.prompt, r.image)
        if r.sampling_key != requests[0].sampling_key:
            raise ValueError(f"requests[{i}]: sampling settings {r.sampling_key} differ from the batch's "
                             f"{requests[0].sampling_key}; sample them in separate runs")
    workers = object_threads_for(gen, object_threads, len(requests))
    emit = progress or (lambda *event: None)
    wanted = alive or (lambda i: True)
    count, options = len(requests), requests[0].options
    prompts = [r.prompt for r in requests]

    def batch_alive() -> None:
        if not any(wanted(i) for i in range(count)):
            raise Cancelled

    def on_step(step: int, steps: int) -> None:
        batch_alive()
        emit("sample", step, steps, None)

    clock = StageClock(gen.device)
    batch_alive()
    emit("encode_text", 0, 1, None)
    with clock.time("encode_text"):  # prompts and images: the stage keeps its name for the metrics' sake
        cond = gen.encode_conditions(prompts, [r.image for r in requests])
        uncond = gen.unconditional(cond) if options.guidance != 1.0 else None
    with clock.time("sample"):
        latents = gen.sample_latents(cond, uncond, [r.seed for r in requests], options, on_step)  # [B, 3, c, h, w]
    batch_alive()
    emit("decode", 0, 1, None)
    with clock.time("decode"):
        planes = gen.decode(latents)  # [B, 3, C, R, R]
    lock, stopped = threading.Lock(), threading.Event()

    def locked_emit(*event) -> None:  # progress callbacks (a terminal bar, a server's queue) get one caller at a time
        with lock:
            emit(*event)

    def still_wanted(i: int) -> bool:
        return not stopped.is_set() and wanted(i)

    def finish(i: int) -> GenerationResult | None:
        if not still_wanted(i):
            return None
        try:
            with torch.no_grad():  # grad mode is per thread
                return _finish_object(gen, i, requests[i], latents[i], planes[i], StageClock(gen.device, clock.times),
                                      locked_emit, still_wanted)
        except _ObjectGone:
            return None

    if workers == 1:
        for i in range(count):
            if (result := finish(i)) is not None:
                yield result
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="ln3diff-object") as pool:
        futures = [pool.submit(finish, i) for i in range(count)]
        try:
            for future in as_completed(futures):  # a finished object is handed over at once, whatever its index
                if (result := future.result()) is not None:
                    yield result
        finally:  # the caller stopped early or an object failed: the objects in progress stop at their next check
            stopped.set()
            for future in futures:
                future.cancel()


def _finish_object(gen: Generator, i: int, request: Request, latent: torch.Tensor, planes: torch.Tensor,
                   clock: StageClock, emit: ProgressFn, wanted: Callable[[int], bool]) -> GenerationResult:
    """Mesh, export and previews of object i (planes [3, C, R, R]); `clock` starts from the batch stages."""

    def still_wanted(*_) -> None:
        if not wanted(i):
            raise _ObjectGone

    def field_queries(planes: torch.Tensor, points: torch.Tensor):
        still_wanted()
        with clock.time("field_queries"):
            return gen.components.field(planes, points)

    def checked_field(planes: torch.Tensor, points: torch.Tensor):  # timed by the stage that calls it
        still_wanted()
        return gen.components.field(planes, points)

    @contextlib.contextmanager
    def stage(name: str):
        """A per-object stage: the object still wanted, progress at its start and end, its time on the clock."""
        still_wanted()
        emit(name, 0, 1, i)
        with clock.time(name):
            yield
        emit(name, 1, 1, i)

    options = request.options
    placement = placement_for(request.prompt, options.height, options.pivot)
    mesh_result, exports, previews = None, {}, []
    if request.mesh:
        with stage("mesh"):
            mesh_result = gen.extract_mesh(planes, options, field=field_queries, check=still_wanted)
        if request.formats and not mesh_result.empty:
            exports = _asset_files(gen, request, planes, mesh_result, placement, stage, checked_field, still_wanted)
    if options.preview_views:
        with stage("preview"):
            previews = gen.render_previews(planes, options, on_view=still_wanted, mesh=mesh_result)
    return GenerationResult(request, i, latent.cpu(), planes.cpu(), mesh_result, exports, previews, clock.times,
                            placement)


def _asset_files(gen: Generator, request: Request, planes: torch.Tensor, mesh: MeshResult, placement: Placement,
                 stage: Callable[[str], contextlib.AbstractContextManager], field, check: Callable[[], None]
                 ) -> dict[str, bytes]:
    """An object's files: UV unwrap and texture bake (`texture` > 0; the bake queries `field`, or the albedo after
    `check`), levels of detail (`lods`), then the encoding of every format, each a stage of its own."""
    options = request.options
    material = Material(roughness=options.roughness)
    if options.texture:
        with stage("uv_unwrap"):
            mesh = unwrap(mesh, options.texture)
        with stage("bake_texture"):
            material = Material(bake_texture(mesh, gen.colour_fn(planes, field, check=check), options.texture,
                                             FIELD_CHUNK),
                                options.roughness)
    levels = [mesh]
    if options.lods:
        with stage("lods"):
            levels = levels_of_detail(mesh, tuple(sorted(set(int_list(options.lods)), reverse=True)))
    with stage("export"):
        extras = {"prompt": request.prompt, "seed": request.seed, "steps": options.steps, "guidance": options.guidance,
                  "sampler": options.sampler, "model": gen.config.preset, "checkpoint": gen.models.path.name,
                  "texture": options.texture}
        return asset_files(levels, request.formats, placement, request.prompt, extras, material, request.stem)


def generate(gen: Generator, prompts: list[str], seeds: list[int], options: GenerationOptions | None = None,
             formats: tuple[str, ...] = ()) -> list[GenerationResult]:
    """One object per (prompt, seed) with the same options, sampled as one batch, as a list."""
    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds")
    options = options or GenerationOptions()
    results = run(gen, [Request(p, int(s), options, formats) for p, s in zip(prompts, seeds, strict=True)])
    return sorted(results, key=lambda r: r.index)

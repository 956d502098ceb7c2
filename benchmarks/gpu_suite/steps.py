"""The GPU suite's Python steps, each run by the suite in a process of its own (so a time limit can stop it):

    python -m benchmarks.gpu_suite.steps STEP WORKDIR --deadline EPOCH_S [--dry-run]

STEP is one of `STEPS`. Each writes WORKDIR/record.json ({status, reason, results}) after every measurement,
so a step stopped at its limit still leaves what it had measured. The pipeline steps time `runner.run` through
`ln3diff_rt.profile.profile` on random weights (`random_weights.random_models`) with the stand-in text
encoder; the server step reuses `benchmarks/bench_serve.py`'s load test; AOTInductor engines are built by
`export.build_engine` and loaded by `export.runtime`, on the device itself.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import importlib.util
import json
import os
import platform
import sys
import time
import traceback
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Sizes:
    """What each step measures: the GPU run's sizes, or the dry run's smallest ones on the CPU."""

    device: str
    preset: str
    batches: tuple[int, ...]  # batch sizes always timed
    large_batch: int  # timed too when the time left allows (estimated from the largest timed batch)
    steps: int  # sampling steps per request (the latency goal: 8)
    mesh_resolution: int | None  # None: the request default
    repeats: int
    warmup: int
    aoti_components: tuple[str, ...]
    precision: str  # eager's and compile's (autocast; Generator(precision=))
    aoti_precision: str  # the AOTInductor packages' build precision
    serve_requests_one_client: int
    serve_clients: int
    serve_requests_concurrent: int
    copy_bytes: int  # of the copy that measures memory bandwidth
    matmul_size: int  # n of the n x n x n matrix product that measures the dense rate
    compile_stance: str | None  # torch.compiler.set_stance for the compile step; None: compile for real
    official_small: bool  # pipeline_official: a two-layer copy of the published architecture, not its sizes


# AOTInductor packages the denoiser and decoder (nearly all of the model's FLOPs; the field's tri-plane sampling is
# already a Triton kernel): each takes minutes of compilation, and the whole suite has 8.
GPU = Sizes("cuda", "paper", (1, 8), 64, 8, None, 5, 1, ("denoiser", "decoder"), "bf16", "bf16", 16, 16, 64, 2 ** 31,
            8192, None, False)
# The dry run exercises every line of the suite, not the compilers: Inductor is switched off in the compile
# step (the stance "force_eager" keeps torch.compile's wrappers) and AOTInductor builds only the field, since
# each component takes ~20 s of C++ compilation on two CPU cores.
DRY_RUN = Sizes("cpu", "tiny", (1, 2), 3, 2, 32, 1, 0, ("field",), "bf16", "fp32", 2, 2, 4, 2 ** 25, 256,
                "force_eager", True)
FP32_SLOWDOWN_BOUND = 20.0  # fp32 requests take at most this many times bf16's (time budgeting only)
LARGE_BATCH_RUNS = 2  # one warm-up, one timed: a batch of 64 objects takes many seconds each time
SERVE_TIMEOUT_S = 120.0


class Record:
    """A step's record on disk, rewritten whole (atomically) after every change."""

    def __init__(self, path: Path):
        self.path = path
        self.data: dict = {"status": "running", "reason": "", "results": {}}
        self.write()

    def put(self, key: str, value: object) -> None:
        self.data["results"][key] = value
        self.write()

    def finish(self, status: str, reason: str = "") -> None:
        self.data.update(status=status, reason=reason)
        self.write()

    def write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(tmp, self.path)


def _timed(fn: Callable[[], object], device: str, runs: int) -> float:
    """Median seconds of `runs` calls after one untimed call."""
    fn()
    times = []
    for _ in range(runs):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _copy_gb_per_s(sizes: Sizes) -> float:
    """Bytes read plus bytes written per second by a device-to-device copy (the tensors are freed on return)."""
    src = torch.empty(sizes.copy_bytes // 4, dtype=torch.float32, device=sizes.device)
    dst = torch.empty_like(src)
    return 2 * sizes.copy_bytes / _timed(lambda: dst.copy_(src), sizes.device, 10) / 1e9


def device_step(sizes: Sizes, rec: Record, workdir: Path, deadline: float) -> None:
    """Versions, the device, and two measured peaks: copy bandwidth (bytes read + written) and the dense rate."""
    triton = importlib.util.find_spec("triton")
    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "triton": importlib.metadata.version("triton") if triton else None, "cpu_count": os.cpu_count(),
            "device": "cpu", "cuda_available": torch.cuda.is_available()}
    if sizes.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(device=props.name, sm_count=props.multi_processor_count,
                    memory_gib=round(props.total_memory / 2 ** 30, 1), capability=f"{props.major}.{props.minor}")
    rec.put("environment", info)
    rec.put("copy_gb_per_s", _copy_gb_per_s(sizes))
    dtype = torch.bfloat16 if sizes.device == "cuda" else torch.float32
    a = torch.randn(sizes.matmul_size, sizes.matmul_size, dtype=dtype, device=sizes.device)
    seconds = _timed(lambda: a @ a, sizes.device, 10)
    rec.put("matmul_tflop_per_s", {"dtype": str(dtype).removeprefix("torch."),
                                   "value": 2 * sizes.matmul_size ** 3 / seconds / 1e12})


def mesh_support() -> tuple[bool, bool, str]:
    """(meshes, decimates, why not). Without trimesh (not on a bare GPU machine) an empty module takes its name,
    so that `ln3diff_rt.pipeline` imports (its meshing modules import trimesh at the top), and requests run
    without mesh and GLB; without fast-simplification meshes keep every face."""
    if importlib.util.find_spec("trimesh") is None:
        sys.modules["trimesh"] = types.ModuleType("trimesh")
        return False, False, "trimesh missing: requests ran without mesh extraction and GLB export (bring the wheels)"
    if importlib.util.find_spec("fast_simplification") is None:
        return True, False, "fast-simplification missing: meshes kept every face (no decimation)"
    return True, True, ""


def official_t23d(sizes: Sizes):
    """The published text-to-3D architecture (`official-t23d`: DiT-L/2, the DiT2 decoder) at its sizes, or for the
    dry run a two-layer copy of it; random weights either way (the released ones cannot travel)."""
    from ln3diff_rt.config import get_preset, official_config
    from ln3diff_rt.official.config import OfficialDiTConfig, OfficialVAEConfig

    if not sizes.official_small:
        return get_preset("official-t23d")
    return official_config("t23d", OfficialDiTConfig("t23d", depth=2, width=64, heads=2),
                           OfficialVAEConfig(width=64, depth=2, heads=2, mlp_hidden=128, sr_channels=32,
                                             sr_ch_mult=(1, 2), triplane_channels=8, field_hidden=16))


def _generator(sizes: Sizes, backend: str, rec: Record, workdir: Path, official: bool = False):
    """A Generator of random weights at the suite's preset (or the published text-to-3D architecture) with the
    stand-in text encoder, on `backend`."""
    from benchmarks.gpu_suite.stand_in import DESCRIPTION, SURFACE_DESCRIPTION, StandInTextEncoder, ball_surface
    from ln3diff_rt.pipeline import AUTOCAST_BACKENDS, Components, Generator, compiled_components
    from ln3diff_rt.random_weights import random_models

    start = time.perf_counter()
    models = random_models(official_t23d(sizes) if official else sizes.preset, 0, sizes.device)
    cfg = models.config
    text = StandInTextEncoder(cfg.dit.context_len, cfg.dit.context_dim).to(sizes.device)
    components = Components(text, models.dit, models.vae.decode, models.vae.field)
    parameters = {name: sum(p.numel() for p in getattr(models, name).parameters()) for name in ("dit", "vae")}
    text_note = DESCRIPTION + ("; the published model reads CLIP ViT-L/14's text tower (12 layers of width 768), "
                               "which costs more" if official else "")
    rec.put("model", {"preset": cfg.preset, "parameters": parameters, "text_encoder": text_note,
                      "surface": SURFACE_DESCRIPTION, "build_s": time.perf_counter() - start})
    if backend == "compile":
        if sizes.compile_stance:
            torch.compiler.set_stance(sizes.compile_stance)
            rec.put("compile_stance", f"{sizes.compile_stance} (dry run: Inductor off, torch.compile's wrappers on)")
        components = compiled_components(components, device=sizes.device)
    elif backend == "aoti":
        components = _aoti_components(models, components, sizes, rec, workdir)
    components.field = ball_surface(components.field, cfg.renderer.mesh_threshold)
    precision = sizes.precision if backend in AUTOCAST_BACKENDS else "fp32"  # an engine's is built in
    return Generator(models, sizes.device, components, backend, precision=precision)


def _aoti_components(models, eager, sizes: Sizes, rec: Record, workdir: Path):
    """Build AOTInductor packages of the suite's components on this device and load them (export/)."""
    from export.build_engine import build_engine
    from export.runtime import load_engine_components
    from ln3diff_rt.checkpoint import save_checkpoint

    start = time.perf_counter()
    ckpt, engine = workdir / "random.safetensors", workdir / "engine"
    save_checkpoint(ckpt, models.config, {"vae": models.vae, "dit": models.dit})
    manifest = build_engine(ckpt, engine, "aoti", sizes.aoti_precision, list(sizes.batches), sizes.device,
                            sizes.aoti_components, progress=False)
    built = {e.component: {"seconds": e.seconds, "mib": e.bytes / 2 ** 20, "max_abs_error": e.max_abs_error}
             for e in manifest.components if e.file}
    rec.put("aoti_build", {"precision": sizes.aoti_precision, "seconds": time.perf_counter() - start,
                           "components": built})
    return load_engine_components(engine, "aoti", ckpt, eager, sizes.device)


def pipeline_step(backend: str, official: bool = False) -> Callable[[Sizes, Record, Path, float], None]:
    def step(sizes: Sizes, rec: Record, workdir: Path, deadline: float) -> None:
        """Per-stage latency, peak memory and assets per second of whole requests on `backend`; `official`: of the
        published text-to-3D architecture at its own request defaults (DPM-Solver++(2M), 25 steps, 192^3)."""
        meshes, decimates, why = mesh_support()
        from ln3diff_rt.pipeline import Generator
        from ln3diff_rt.profile import Workload, profile

        gen = _generator(sizes, backend, rec, workdir, official)
        changes = dict(preview_views=0, texture=0, lods="")
        if not official:  # the published architecture keeps its own sampler and steps
            changes["steps"] = sizes.steps
        if not decimates:
            changes["faces"] = 0
        if sizes.mesh_resolution:
            changes["mesh_resolution"] = sizes.mesh_resolution
        options = gen.default_options().replace(**changes)
        precision = sizes.aoti_precision if backend == "aoti" else gen.precision
        rec.put("workload", {"backend": backend, "precision": precision, **changes, "sampler": options.sampler,
                             "steps": options.steps, "guidance": options.guidance,
                             "mesh_resolution": options.mesh_resolution, "mesh": meshes,
                             "formats": ["glb"] if meshes else [],
                             "note": why or "prompt to GLB (vertex colours, no previews)"})
        start = time.perf_counter()
        profile(gen, Workload(1, options, meshes), repeats=1, warmup=0)
        rec.put("first_request_s", time.perf_counter() - start)  # compiles, for compile and aoti
        for batch in sizes.batches:
            rec.put(f"batch_{batch}", _with_rate(profile(gen, Workload(batch, options, meshes), sizes.repeats,
                                                         sizes.warmup)))
        if backend == "eager" and gen.precision != "fp32":  # the same requests in fp32: the ratio in one run
            fp32 = Generator(gen.models, gen.device, gen.components, backend)
            first = rec.data["results"][f"batch_{sizes.batches[0]}"]
            estimate = FP32_SLOWDOWN_BOUND * first["end_to_end"]["median"] * (sizes.repeats + sizes.warmup)
            if time.time() + estimate < deadline:
                rec.put("fp32_batch_1", _with_rate(profile(fp32, Workload(1, options, meshes), sizes.repeats,
                                                           sizes.warmup)))
        last = rec.data["results"][f"batch_{sizes.batches[-1]}"]
        estimate = last["end_to_end"]["median"] / last["batch_size"] * sizes.large_batch * LARGE_BATCH_RUNS
        if time.time() + estimate > deadline:
            rec.put(f"batch_{sizes.large_batch}", {"skipped": f"needs ~{estimate:.0f} s (estimated from batch "
                                                              f"{last['batch_size']}); {deadline - time.time():.0f} s "
                                                              "left"})
        else:
            work = Workload(sizes.large_batch, options, meshes)
            rec.put(f"batch_{sizes.large_batch}", _with_rate(profile(gen, work, LARGE_BATCH_RUNS - 1, 1)))

    return step


def _with_rate(result: dict) -> dict:
    return {**result, "assets_per_s": result["batch_size"] / result["end_to_end"]["median"]}


def serve_step(sizes: Sizes, rec: Record, workdir: Path, deadline: float) -> None:
    """The gRPC server on loopback: one client's latency, then concurrent clients' throughput (bench_serve.load)."""
    from benchmarks.bench_serve import WORKLOAD, load, summary

    gen = _generator(sizes, "eager", rec, workdir)
    rec.put("workload", {**WORKLOAD, "note": "bench_serve's workload: no mesh, no previews"})
    one = load(gen, 1, sizes.serve_requests_one_client, 1, 0.0, SERVE_TIMEOUT_S)
    rec.put("one_client", summary([one]))
    many = load(gen, sizes.serve_clients, sizes.serve_requests_concurrent, sizes.serve_clients, 20.0, SERVE_TIMEOUT_S)
    rec.put("concurrent", {"clients": sizes.serve_clients, "max_batch": sizes.serve_clients, **summary([many])})


STEPS: dict[str, Callable[[Sizes, Record, Path, float], None]] = {
    "device": device_step,
    "pipeline_eager": pipeline_step("eager"),
    "pipeline_compile": pipeline_step("compile"),
    "pipeline_aoti": pipeline_step("aoti"),
    "pipeline_official": pipeline_step("eager", official=True),
    "serve": serve_step,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_suite.steps", description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=list(STEPS))
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--deadline", type=float, required=True, help="epoch seconds when the suite stops this step")
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    rec = Record(args.workdir / "record.json")
    sizes = DRY_RUN if args.dry_run else GPU
    rec.put("sizes", dataclasses.asdict(sizes))
    if sizes.device == "cuda" and not torch.cuda.is_available():
        rec.finish("failed", "no CUDA device: run on a GPU machine, or with --dry-run")
        return 1
    try:
        STEPS[args.step](sizes, rec, args.workdir, args.deadline)
    except Exception as e:  # the record says what broke; the traceback goes to the step's log
        traceback.print_exc()
        rec.finish("failed", f"{type(e).__name__}: {e}"[:500])
        return 1
    rec.finish("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())

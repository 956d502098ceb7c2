"""TensorRT: engines built from the ONNX graphs with the TensorRT Python API, one optimisation profile each.

UNVERIFIED: this project's CI and development machines have no GPU and no TensorRT, so
`build_trt_engine` and `TensorRTRunner` have never run. What is tested is everything around
them: the ONNX they consume, the profile computation, the cache keys, the batch splitting and
the refusal on machines without a GPU or TensorRT. The alternative path, not wired in, is
torch-tensorrt: `torch_tensorrt.compile(exported_program, ir="dynamo", inputs=[...],
enabled_precisions={torch.half})` on the same torch.export programs the AOTInductor path traces.

Profiles (min / opt / max of each dynamic dim) come from `--batch-sizes`: the denoiser sees
2B with classifier-free guidance, the text encoder a single "" for the unconditional branch, and
the field point chunks of up to 2^19 (meshing asks for 2^18 at a time). A call outside the
profile is split into chunks of at most max and padded up to min by repeating the last row.
Engines are cached under a key of everything that makes a plan differ.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch

from export.components import ComponentSpec
from export.manifest import BuildContext, ComponentEntry, TensorSpec
from export.onnx_engine import export_onnx
from ln3diff_rt.checkpoint import file_sha256
from ln3diff_rt.conventions import FIELD_CHUNK, MAX_FIELD_POINTS

# min, opt, max points per field call: most calls are mesh chunks, the largest a chunk of preview rays.
FIELD_POINTS = (1, FIELD_CHUNK, MAX_FIELD_POINTS)
WORKSPACE_BYTES = 4 << 30


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run on this machine (the CLI exits with status 2)."""


def require_tensorrt(device: str) -> None:
    """Refuse, before any work, where TensorRT cannot build engines: no CUDA device or no tensorrt package."""
    if torch.device(device).type != "cuda":
        raise BackendUnavailable(f"tensorrt engines need --device cuda (got --device {device})")
    if not torch.cuda.is_available():
        raise BackendUnavailable("tensorrt backend needs a CUDA GPU and this machine has none; "
                                 "use --backend aoti or --backend onnx")
    if importlib.util.find_spec("tensorrt") is None:
        raise BackendUnavailable("tensorrt backend needs the tensorrt package: pip install 'ln3diff-rt[gpu]'")


def dim_range(component: str, dim: str, batch_sizes: list[int]) -> tuple[int, int, int]:
    """(min, opt, max) of a dynamic dim of `component` for a server that batches `batch_sizes` requests."""
    if dim == "points":
        return FIELD_POINTS
    lo, hi = min(batch_sizes), max(batch_sizes)
    if component == "denoiser":  # cond + uncond in one call; B alone when guidance is 1
        return lo, 2 * hi, 2 * hi
    if component == "text_encoder":  # the unconditional "" prompt is encoded on its own
        return 1, hi, hi
    return lo, hi, hi


def optimisation_profile(component: str, inputs: list[TensorSpec],
                         batch_sizes: list[int]) -> dict[str, dict[str, list[int]]]:
    """Input shapes with named dynamic axes -> {input: {"min": shape, "opt": shape, "max": shape}}."""
    profile = {}
    for spec in inputs:
        shapes = {"min": [], "opt": [], "max": []}
        for size in spec.shape:
            bounds = dim_range(component, size, batch_sizes) if isinstance(size, str) else (size,) * 3
            for key, value in zip(("min", "opt", "max"), bounds, strict=True):
                shapes[key].append(int(value))
        profile[spec.name] = shapes
    return profile


def engine_cache_key(component: str, ckpt_sha256: str, onnx_sha256: str, gpu_name: str, trt_version: str,
                     precision: str, profile: dict) -> str:
    """A stable hex key of everything a plan depends on (the ONNX hash covers code changes to the model)."""
    payload = json.dumps({"component": component, "checkpoint": ckpt_sha256, "onnx": onnx_sha256, "gpu": gpu_name,
                          "tensorrt": trt_version, "precision": precision, "profile": profile}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ln3diff_rt" / "tensorrt"


def build_trt_engine(onnx_path: Path, plan_path: Path, profile: dict, precision: str, cache_dir: Path,
                     key: str) -> bool:
    """Write the plan for `onnx_path` to `plan_path`, from the cache or freshly built; -> True on a cache hit."""
    cached = cache_dir / f"{key}.plan"
    hit = cached.is_file()
    if not hit:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(".tmp")
        tmp.write_bytes(_build_plan(onnx_path, profile, precision))
        os.replace(tmp, cached)
    plan_path.write_bytes(cached.read_bytes())
    return hit


def _build_plan(onnx_path: Path, profile: dict, precision: str) -> bytes:
    """UNVERIFIED here (no GPU, no TensorRT): written against the TensorRT 10 Python API."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"{onnx_path}: TensorRT could not parse the ONNX graph: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif precision == "bf16":
        config.set_flag(trt.BuilderFlag.BF16)
    trt_profile = builder.create_optimization_profile()
    for name, shapes in profile.items():
        trt_profile.set_shape(name, shapes["min"], shapes["opt"], shapes["max"])
    config.add_optimization_profile(trt_profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"{onnx_path}: TensorRT engine build failed (see the TensorRT log above)")
    return bytes(plan)


def gpu_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "none"


def trt_version() -> str:
    import tensorrt as trt

    return trt.__version__


class TensorRTRunner:
    """A deserialised plan called with CUDA tensors in manifest input order; outputs as a tuple.

    UNVERIFIED here (no GPU, no TensorRT): written against the TensorRT 10 Python API.
    """

    def __init__(self, path: Path, device: str, input_names: list[str], output_names: list[str]):
        import tensorrt as trt

        self.device = torch.device(device)
        self.engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise RuntimeError(f"{path}: TensorRT could not deserialise this plan (another TensorRT or GPU?)")
        self.context = self.engine.create_execution_context()
        self.input_names, self.output_names = input_names, output_names
        self.dtypes = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16,
                       trt.DataType.BF16: torch.bfloat16, trt.DataType.INT32: torch.int32,
                       trt.DataType.INT64: torch.int64}

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        inputs = tuple(t.contiguous() for t in inputs)  # kept alive until the stream has run
        for name, t in zip(self.input_names, inputs, strict=True):
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
        outputs = []
        for name in self.output_names:
            out = torch.empty(tuple(self.context.get_tensor_shape(name)),
                              dtype=self.dtypes[self.engine.get_tensor_dtype(name)], device=self.device)
            self.context.set_tensor_address(name, out.data_ptr())
            outputs.append(out)
        stream = torch.cuda.current_stream(self.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed (see the TensorRT log above)")
        return tuple(outputs)


def run_within(fn: Callable[..., tuple[torch.Tensor, ...]], inputs: tuple[torch.Tensor, ...],
               in_axes: list[int | None], out_axes: list[int], lo: int, hi: int) -> tuple[torch.Tensor, ...]:
    """Call `fn` only with sizes in [lo, hi] along the dynamic axis: split larger calls, pad smaller ones."""
    axis = next(a for a in in_axes if a is not None)
    size = inputs[in_axes.index(axis)].shape[axis]
    parts = []
    for start in range(0, size, hi):
        stop = min(size, start + hi)
        chunk = [t if a is None else t.narrow(a, start, stop - start) for t, a in zip(inputs, in_axes, strict=True)]
        pad = lo - (stop - start)
        if pad > 0:
            chunk = [t if a is None else torch.cat([t, t.narrow(a, t.shape[a] - 1, 1).expand(
                *[pad if i == a else -1 for i in range(t.dim())])], dim=a)
                for t, a in zip(chunk, in_axes, strict=True)]
        out = fn(*chunk)
        parts.append([o.narrow(a, 0, stop - start) for o, a in zip(out, out_axes, strict=True)])
    return tuple(torch.cat([p[i] for p in parts], dim=out_axes[i]) for i in range(len(out_axes)))


def build(spec: ComponentSpec, engine_dir: Path, entry: ComponentEntry, ctx: BuildContext) -> None:
    """ONNX graph first (kept beside the plan), then the plan from the cache or freshly built.

    UNVERIFIED here: no GPU and no TensorRT on the development machines.
    """
    onnx_file = f"{spec.name}.onnx"
    entry.exporter = export_onnx(spec, engine_dir / onnx_file)
    if (engine_dir / f"{onnx_file}.data").is_file():
        entry.data_file = f"{onnx_file}.data"
    entry.profile = optimisation_profile(spec.name, entry.inputs, ctx.batch_sizes)
    key = engine_cache_key(spec.name, ctx.ckpt_sha256, file_sha256(engine_dir / onnx_file), gpu_name(), trt_version(),
                           ctx.precision, entry.profile)
    hit = build_trt_engine(engine_dir / onnx_file, engine_dir / entry.file, entry.profile, ctx.precision,
                           ctx.cache_dir, key)
    entry.exporter += "+tensorrt" + (" (cached)" if hit else "")
    entry.extra = {**entry.extra, "cache_key": key, "onnx": onnx_file}


def load(path: Path, entry: ComponentEntry, device: str) -> Callable[..., tuple[torch.Tensor, ...]]:
    """The plan as a callable that splits or pads calls to stay inside its optimisation profile."""
    run = TensorRTRunner(path, device, [i.name for i in entry.inputs], [o.name for o in entry.outputs])

    def axis_of(name: str) -> int | None:
        axes = entry.dynamic_axes.get(name, {})
        return int(next(iter(axes))) if axes else None

    in_axes = [axis_of(i.name) for i in entry.inputs]
    out_axes = [axis_of(o.name) for o in entry.outputs]
    first = next(i for i, a in zip(entry.inputs, in_axes, strict=True) if a is not None)
    axis = in_axes[entry.inputs.index(first)]
    lo, hi = entry.profile[first.name]["min"][axis], entry.profile[first.name]["max"][axis]
    return lambda *inputs: run_within(run, inputs, in_axes, out_axes, lo, hi)


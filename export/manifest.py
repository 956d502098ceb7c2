"""`manifest.json`: what an engine directory holds and what it was built from, checked on every load.

One entry per component (text encoder, denoiser, decoder, field). An entry whose `backend` is
`eager` has no file: the runtime keeps the PyTorch module for it (e.g. a text encoder left out
with `--components`). Shapes name their dynamic axes ("batch", "points") in place of a size.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
COMPONENTS = ("text_encoder", "image_encoder", "denoiser", "decoder", "field")
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class TensorSpec:
    name: str
    shape: list[int | str]  # a string names a dynamic axis
    dtype: str  # torch dtype name without the prefix: "float32", "int64"


@dataclass
class ComponentEntry:
    component: str
    backend: str  # "aoti" | "onnx" | "tensorrt", or "eager" when not exported
    precision: str
    file: str | None  # relative to the engine directory; None for eager
    inputs: list[TensorSpec] = field(default_factory=list)
    outputs: list[TensorSpec] = field(default_factory=list)
    dynamic_axes: dict[str, dict[str, str]] = field(default_factory=dict)  # tensor -> {axis: name}
    data_file: str | None = None  # ONNX external weights (models over 2 GB)
    bytes: int = 0
    sha256: str | None = None
    seconds: float = 0.0  # export + compile time
    exporter: str | None = None  # "torch.export+aoti", "onnx-dynamo", "onnx-torchscript", "tensorrt"
    max_abs_error: dict[str, float] = field(default_factory=dict)  # vs eager, per checked size
    profile: dict[str, dict[str, list[int]]] | None = None  # tensorrt: input -> {min, opt, max}
    extra: dict[str, object] = field(default_factory=dict)  # text encoder: tokenizer name, max_length


@dataclass(frozen=True)
class BuildContext:
    """What an engine builder needs beyond the component: the request's settings and the source checkpoint."""

    precision: str
    batch_sizes: list[int]
    ckpt_sha256: str
    cache_dir: Path  # tensorrt's engine cache


@dataclass
class Manifest:
    backend: str
    precision: str
    device: str
    checkpoint: dict[str, str]  # {"file": name, "sha256": hex}
    versions: dict[str, str | None]
    batch_sizes: list[int]
    components: list[ComponentEntry]
    created: str = ""
    manifest_version: int = MANIFEST_VERSION

    def entry(self, component: str) -> ComponentEntry:
        for e in self.components:
            if e.component == component:
                return e
        raise KeyError(component)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)


def versions() -> dict[str, str | None]:
    """Versions an artefact depends on; None where a package is not installed."""

    def dist(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {"ln3diff_rt": dist("ln3diff-rt"), "torch": torch.__version__, "onnx": dist("onnx"),
            "onnxruntime": dist("onnxruntime") or dist("onnxruntime-gpu"),
            "tensorrt": dist("tensorrt") if importlib.util.find_spec("tensorrt") else None}


def write_manifest(manifest: Manifest, engine_dir: str | Path) -> Path:
    path = Path(engine_dir) / MANIFEST_NAME
    path.write_text(manifest.to_json() + "\n")
    return path


def read_manifest(engine_dir: str | Path) -> Manifest:
    """Parse `engine_dir/manifest.json`; the format version is checked before anything else is read."""
    path = Path(engine_dir) / MANIFEST_NAME
    if not path.is_file():
        raise ValueError(f"{path}: no engine manifest here; build one with python export/build_engine.py")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from e
    found = raw.get("manifest_version") if isinstance(raw, dict) else None
    if found != MANIFEST_VERSION:
        raise ValueError(f"{path}: manifest format version {found!r}, this ln3diff_rt reads {MANIFEST_VERSION!r}; "
                         "rebuild the engine with python export/build_engine.py")
    try:
        entries = [ComponentEntry(**{**e, "inputs": [TensorSpec(**t) for t in e.get("inputs", [])],
                                     "outputs": [TensorSpec(**t) for t in e.get("outputs", [])]})
                   for e in raw.pop("components")]
        return Manifest(**raw, components=entries)
    except (KeyError, TypeError) as e:
        raise ValueError(f"{path}: manifest fields do not match format version {MANIFEST_VERSION}: {e}") from e


def check_manifest(manifest: Manifest, engine_dir: str | Path, backend: str, ckpt_path: str | Path,
                   ckpt_sha256: str, device: str) -> None:
    """Refuse an engine built for another backend, checkpoint, ln3diff_rt / runtime version or device type."""
    path = Path(engine_dir) / MANIFEST_NAME
    if manifest.backend != backend:
        raise ValueError(f"{path}: engine built for backend {manifest.backend!r}, asked to load it as {backend!r}")
    found = manifest.checkpoint.get("sha256")
    if found != ckpt_sha256:
        raise ValueError(f"{path}: engine built from a checkpoint with sha256 {found}, but {ckpt_path} has sha256 "
                         f"{ckpt_sha256}; rebuild the engine for this checkpoint")
    now = versions()
    # AOTInductor packages hold torch ABI code and TensorRT plans are tied to one TensorRT release.
    pinned = ("ln3diff_rt",) + {"aoti": ("torch",), "tensorrt": ("tensorrt",)}.get(backend, ())
    for name in pinned:
        if manifest.versions.get(name) != now[name]:
            raise ValueError(f"{path}: engine built with {name} {manifest.versions.get(name)}, this environment "
                             f"has {name} {now[name]}; rebuild the engine with python export/build_engine.py")
    if backend in ("aoti", "tensorrt") and torch.device(manifest.device).type != torch.device(device).type:
        raise ValueError(f"{path}: {backend} engine compiled for device {manifest.device!r}, asked to run on "
                         f"{device!r}; rebuild it with --device {torch.device(device).type}")

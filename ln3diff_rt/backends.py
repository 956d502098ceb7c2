"""The backend registry: each backend's name, what it needs, its engine artefact and the code behind it.

A leaf module: `ln3diff_rt` (CLI, pipeline, profiler), `export` and `serve` all read this one
table, and adding a backend is one entry here plus the module its entry names. Entries name their
code as "module:function" paths, resolved on first use, so the pipeline reaches the exporters'
loaders without importing `export` (which sits above it) and `import ln3diff_rt` stays cheap.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Backend:
    name: str
    help: str
    # Returns the request's compute for this backend:
    # (models, eager Components, device, engine_dir, checkpoint path) -> Components.
    components: str | None = None  # None: the eager PyTorch modules themselves
    engine_suffix: str | None = None  # artefact suffix in an engine directory; None: nothing to build
    build: str | None = None  # (ComponentSpec, engine_dir, ComponentEntry, BuildContext) -> None, fills the entry
    load: str | None = None  # (artefact path, ComponentEntry, device) -> callable over tensors
    devices: tuple[str, ...] = ("cpu", "cuda")
    modules: tuple[str, ...] = ()  # what it imports beyond the core install, and the extra that brings them
    extra: str | None = None

    def check_installed(self) -> None:
        """ValueError naming the missing packages and the extra to install, before any work."""
        missing = [m for m in self.modules if importlib.util.find_spec(m) is None]
        if missing:
            raise ValueError(f"backend {self.name!r} needs {', '.join(missing)}: "
                             f"pip install 'ln3diff-rt[{self.extra}]'")

    @property
    def needs_engine(self) -> bool:
        """Runs artefacts from `export/build_engine.py` (an engine directory), not the checkpoint's modules."""
        return self.engine_suffix is not None

    def resolve(self, role: str) -> Callable:
        """The function behind `role` ("components", "build" or "load")."""
        target = getattr(self, role)
        if target is None:
            raise ValueError(f"backend {self.name!r} has no {role!r} step")
        module, _, name = target.partition(":")
        return getattr(importlib.import_module(module), name)


_ENTRIES = (
    Backend("eager", "PyTorch modules as they are (the reference every backend is checked against)"),
    Backend("compile", "torch.compile of the denoiser, decoder and field (on a CPU the field in the gather form "
            "Inductor compiles well); compiles on the first request",
            components="ln3diff_rt.pipeline:compiled_components"),
    Backend("aoti", "torch.export + AOTInductor .pt2 packages", components="export.runtime:engine_components",
            engine_suffix=".pt2", build="export.aoti_engine:build", load="export.aoti_engine:load"),
    Backend("onnx", "ONNX Runtime (TensorRT or CUDA execution provider on a GPU, CPU provider otherwise)",
            components="export.runtime:engine_components", engine_suffix=".onnx", build="export.onnx_engine:build",
            load="export.onnx_engine:load", modules=("onnx", "onnxscript", "onnxruntime"), extra="export"),
    Backend("tensorrt", "TensorRT plans built from the ONNX graphs (GPU only; untested without one)",
            components="export.runtime:engine_components", engine_suffix=".plan",
            build="export.tensorrt_engine:build", load="export.tensorrt_engine:load", devices=("cuda",),
            modules=("onnx", "onnxscript", "tensorrt"), extra="gpu"),
)
BACKENDS: dict[str, Backend] = {b.name: b for b in _ENTRIES}
ENGINE_BACKENDS = tuple(name for name, b in BACKENDS.items() if b.needs_engine)


def get_backend(name: str) -> Backend:
    if name not in BACKENDS:
        raise ValueError(f"backend={name!r}: expected one of {', '.join(BACKENDS)}")
    return BACKENDS[name]


def backends_help() -> str:
    return "; ".join(f"{b.name}: {b.help}" for b in _ENTRIES)

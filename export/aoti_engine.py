"""AOTInductor: torch.export with dynamic dims -> `aoti_compile_and_package` (.pt2) -> `aoti_load_package`.

The package holds compiled C++ (CPU) or CUDA/Triton code for the device the module was on, so
it runs only on that device type and with the torch it was built with (the manifest checks both).
Triton kernels registered through `torch.library` (kernels.dispatch on CUDA tensors) are traced
as single ops and packaged with the rest.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from export.components import ComponentSpec
from export.manifest import BuildContext, ComponentEntry


def export_aoti(spec: ComponentSpec, path: Path) -> str:
    """Trace `spec.module` at the trace sizes with its dynamic dims and compile it into `path`."""
    program = torch.export.export(spec.module, spec.inputs(), dynamic_shapes=spec.torch_dynamic_shapes())
    torch._inductor.aoti_compile_and_package(program, package_path=str(path))
    return "torch.export+aoti"


def load_aoti(path: Path, device: str) -> Callable[..., tuple[torch.Tensor, ...]]:
    """The compiled package as a callable over tensors on `device`, returning a tuple of outputs."""
    dev = torch.device(device)
    index = (dev.index if dev.index is not None else torch.cuda.current_device()) if dev.type == "cuda" else -1
    model = torch._inductor.aoti_load_package(str(path), device_index=index)

    def run(*inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = model(*inputs)
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)

    return run


def build(spec: ComponentSpec, engine_dir: Path, entry: ComponentEntry, ctx: BuildContext) -> None:
    entry.exporter = export_aoti(spec, engine_dir / entry.file)


def load(path: Path, entry: ComponentEntry, device: str) -> Callable[..., tuple[torch.Tensor, ...]]:
    return load_aoti(path, device)

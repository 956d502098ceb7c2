"""ONNX: export (opset 18, dynamic axes, reference kernel maths), `onnx.checker`, ONNX Runtime sessions.

The dynamo exporter (`torch.onnx.export(..., dynamo=True)`) is used first; where it fails the
TorchScript exporter is tried and the manifest records which one produced the file. Triton ops
have no ONNX form, so export always runs with LN3DIFF_KERNELS=reference: attention becomes plain
SDPA maths and tri-plane sampling `GridSample`, which every execution provider runs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from export.components import ComponentSpec
from export.manifest import BuildContext, ComponentEntry

OPSET = 18
_NUMPY = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64, torch.int32: np.int32}
log = logging.getLogger(__name__)


@contextlib.contextmanager
def reference_kernels():
    """Force the PyTorch reference path of every fused op for the duration (restores the old setting)."""
    old = os.environ.get("LN3DIFF_KERNELS")
    os.environ["LN3DIFF_KERNELS"] = "reference"
    try:
        yield
    finally:
        if old is None:
            del os.environ["LN3DIFF_KERNELS"]
        else:
            os.environ["LN3DIFF_KERNELS"] = old


def export_onnx(spec: ComponentSpec, path: Path, dynamo: bool = True) -> str:
    """Write `spec` to `path` (plus `path.data` over 2 GB), check it with onnx.checker; -> exporter name."""
    import onnx

    args = spec.inputs()
    with reference_kernels(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporters warn per op about things that do not apply here
        exporter = "onnx-dynamo"
        if dynamo:
            try:
                program = torch.onnx.export(spec.module, args, dynamo=True, opset_version=OPSET,
                                            input_names=list(spec.input_names), output_names=list(spec.output_names),
                                            dynamic_shapes=spec.torch_dynamic_shapes(), verbose=False)
                program.save(str(path))
            except Exception as e:  # any exporter failure means: try the other exporter
                log.warning("%s: dynamo ONNX export failed (%s: %s); trying the TorchScript exporter",
                            spec.name, type(e).__name__, e)
                dynamo = False
        if not dynamo:
            exporter = "onnx-torchscript"
            torch.onnx.export(spec.module, args, str(path), dynamo=False, opset_version=OPSET,
                              input_names=list(spec.input_names), output_names=list(spec.output_names),
                              dynamic_axes=spec.dynamic_axes)
    onnx.checker.check_model(str(path), full_check=True)
    return exporter


def ort_providers(device: str) -> list[str]:
    """TensorRT, then CUDA execution providers on a CUDA device where installed; always CPU last."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    gpu = [p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider") if p in available]
    return (gpu if torch.device(device).type == "cuda" else []) + ["CPUExecutionProvider"]


class OrtRunner:
    """An ONNX Runtime session called with torch tensors on `device`, returning a tuple of torch tensors."""

    def __init__(self, path: Path, device: str):
        import onnxruntime as ort

        self.device = torch.device(device)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # errors only: ORT warns about every unused initializer otherwise
        # As many threads as torch uses, and no spinning between calls: the sampler, meshing and previews
        # run torch ops between engine calls, and spinning ORT threads would steal their cores.
        options.intra_op_num_threads = torch.get_num_threads()
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), options, providers=ort_providers(device))
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.device.type == "cpu":
            feeds = {n: t.detach().contiguous().numpy() for n, t in zip(self.input_names, inputs, strict=True)}
            return tuple(torch.from_numpy(o) for o in self.session.run(self.output_names, feeds))
        # CUDA: inputs are bound in place; outputs come back through host memory (one copy per call).
        binding, index = self.session.io_binding(), self.device.index or 0
        inputs = [t.detach().contiguous() for t in inputs]
        for name, t in zip(self.input_names, inputs, strict=True):
            binding.bind_input(name, "cuda", index, _NUMPY[t.dtype], tuple(t.shape), t.data_ptr())
        for name in self.output_names:
            binding.bind_output(name, "cuda", index)
        self.session.run_with_iobinding(binding)
        return tuple(torch.from_numpy(o).to(self.device) for o in binding.copy_outputs_to_cpu())


def build(spec: ComponentSpec, engine_dir: Path, entry: ComponentEntry, ctx: BuildContext) -> None:
    entry.exporter = export_onnx(spec, engine_dir / entry.file)
    if (engine_dir / f"{entry.file}.data").is_file():
        entry.data_file = f"{entry.file}.data"


def load(path: Path, entry: ComponentEntry, device: str) -> OrtRunner:
    return OrtRunner(path, device)

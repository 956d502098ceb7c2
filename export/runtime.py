"""Engine directory -> `Components` with the same call signatures as the eager ones (torch tensors in and out).

`Generator.from_checkpoint(..., backend="aoti" | "onnx" | "tensorrt", engine_dir=...)` reaches
`load_engine_components` through the backend registry (`ln3diff_rt.backends`). The manifest is
checked first: an engine built from another checkpoint, with another manifest format, ln3diff_rt,
torch (AOTInductor) or TensorRT version, or for another device type, is refused with a message
naming the file and both values. Components the manifest lists as `eager` keep their PyTorch module.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from export.manifest import ComponentEntry, check_manifest, read_manifest
from export.tensorrt_engine import require_tensorrt
from ln3diff_rt.backends import ENGINE_BACKENDS, get_backend
from ln3diff_rt.checkpoint import file_sha256
from ln3diff_rt.conventions import FIELD_CHUNK
from ln3diff_rt.pipeline import Components
from ln3diff_rt.sampling import Condition

Engine = Callable[..., tuple[torch.Tensor, ...]]


def load_engine(engine_dir: str | Path, entry: ComponentEntry, device: str) -> Engine:
    """One artefact as a callable: inputs are moved and cast to what it was built for, outputs come back fp32."""
    path = Path(engine_dir) / entry.file
    if not path.is_file():
        raise ValueError(f"{path}: listed for {entry.component!r} in manifest.json but missing")
    if entry.backend not in ENGINE_BACKENDS:
        raise ValueError(f"{path}: unknown backend {entry.backend!r} for {entry.component!r}")
    run = get_backend(entry.backend).resolve("load")(path, entry, device)
    dtypes = [getattr(torch, spec.dtype) for spec in entry.inputs]

    def call(*inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # contiguous: compiled code assumes the strides it was traced with (conv outputs may be channels-last)
        moved = [t.to(device=device, dtype=d).contiguous() for t, d in zip(inputs, dtypes, strict=True)]
        return tuple(o.float() for o in run(*moved))

    return call


class EngineTextEncoder:
    """The eager tokenizer, then the exported transformer: prompts -> Condition, like `TextEncoder`."""

    def __init__(self, tokenizer, max_length: int, input_names: list[str], engine: Engine):
        self.tokenizer, self.max_length, self.input_names, self.engine = tokenizer, max_length, input_names, engine

    def __call__(self, prompts: list[str]) -> Condition:
        batch = self.tokenizer(list(prompts))
        context, pooled = self.engine(*(batch[k] for k in self.input_names))
        return Condition(context, pooled)


def load_engine_components(engine_dir: str | Path | None, backend: str, ckpt_path: str | Path, eager: Components,
                           device: str) -> Components:
    """Components for `backend` from `engine_dir`, after checking its manifest against `ckpt_path`."""
    if engine_dir is None:
        raise ValueError(f"backend={backend!r} needs an engine directory (python export/build_engine.py)")
    manifest = read_manifest(engine_dir)
    check_manifest(manifest, engine_dir, backend, ckpt_path, file_sha256(ckpt_path), device)
    if backend == "tensorrt":
        require_tensorrt(device)
    entries = {e.component: e for e in manifest.components if e.backend != "eager"}
    engines = {name: load_engine(engine_dir, e, device) for name, e in entries.items()}
    out = Components(eager.text_encoder, eager.denoiser, eager.decoder, eager.field, eager.image_encoder)
    if "text_encoder" in engines:
        entry = entries["text_encoder"]
        if entry.extra.get("max_length") != eager.text_encoder.max_length:
            raise ValueError(f"{Path(engine_dir) / 'manifest.json'}: text encoder exported for max_length "
                             f"{entry.extra.get('max_length')}, the checkpoint's config asks for "
                             f"{eager.text_encoder.max_length}")
        out.text_encoder = EngineTextEncoder(eager.text_encoder.tokenizer, eager.text_encoder.max_length,
                                             [i.name for i in entry.inputs], engines["text_encoder"])
    if "denoiser" in engines:
        denoiser = engines["denoiser"]
        out.denoiser = lambda *inputs: denoiser(*inputs)[0]  # (x, t, context, pooled[, image tokens])
    if "image_encoder" in engines:
        image_encoder = engines["image_encoder"]
        out.image_encoder = lambda images: image_encoder(images)[0]
    if "decoder" in engines:
        decoder = engines["decoder"]
        out.decoder = lambda latent: decoder(latent)[0]
    if "field" in engines:
        out.field = _batched_field(engines["field"], FIELD_CHUNK if torch.device(device).type == "cpu" else None)
    return out


def engine_components(eager: Components, backend: str, device: str, engine_dir: str | Path | None,
                      ckpt_path: str | Path) -> Components:
    """The entry `ln3diff_rt.backends` names for every engine backend (called by keyword from the pipeline)."""
    return load_engine_components(engine_dir, backend, ckpt_path, eager, device)


def _batched_field(engine: Engine, chunk: int | None
                   ) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """The field engine takes one tri-plane: loop over a batch of them, in chunks of at most `chunk` points."""

    def field(planes: torch.Tensor, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, n = points.shape[:2]
        if n == 0:  # meshing can ask for no points
            return points.new_zeros(b, 0), points.new_zeros(b, 0, 3)
        step = chunk or n
        outs = [engine(planes[i:i + 1], points[i:i + 1, s:s + step]) for i in range(b) for s in range(0, n, step)]
        density = torch.cat([o[0] for o in outs], dim=1).reshape(b, n)
        return density, torch.cat([o[1] for o in outs], dim=1).reshape(b, n, 3)

    return field

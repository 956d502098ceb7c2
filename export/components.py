"""What gets exported: one `ComponentSpec` per per-request component, with its signature and dynamic axes.

- text_encoder: the transformer (input_ids, attention_mask[, token_type_ids] -> context, pooled);
  the tokenizer stays in Python.
- denoiser: the DiT forward (x, t, context, pooled -> v) with a dynamic batch; the sampler batches
  CFG (cond + uncond) into one call of batch 2B.
- decoder: latent [B, 3, c, h, w] -> tri-planes [B, 3, C, R, R], dynamic batch.
- field: planes [1, 3, C, R, R], points [1, N, 3] -> density [1, N], rgb [1, N, 3], dynamic N.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from export.manifest import TensorSpec
from ln3diff_rt.checkpoint import Models
from ln3diff_rt.models.projected_field import ProjectedTriplaneField
from ln3diff_rt.text import TextEncoder, text_features

TRACE_SIZES = {"batch": 2, "points": 64}  # example sizes for tracing: above 1, so nothing specialises on them
CHECK_SIZES = {"points": (1, 4099)}  # field sizes checked against eager after export (batches: --batch-sizes)
_PROMPTS = ("a red cube", "", "a wooden chair with four legs", "a small blue teapot", "a tall lamp")


class TextTransformer(nn.Module):
    """The text encoder's transformer plus the pooling of `ln3diff_rt.text.TextEncoder`, as one graph."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return text_features(self.model, input_ids, attention_mask, token_type_ids)


@dataclass
class ComponentSpec:
    name: str
    module: nn.Module  # the eager module, at the export precision and device
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    dynamic_axes: dict[str, dict[int, str]]  # input or output name -> {axis: dynamic dim name}
    make_inputs: Callable[[dict[str, int]], tuple[torch.Tensor, ...]]  # sizes of the dynamic dims -> inputs
    extra: dict[str, object]

    def inputs(self, **sizes: int) -> tuple[torch.Tensor, ...]:
        return self.make_inputs({**TRACE_SIZES, **sizes})

    def dims(self) -> set[str]:
        return {d for axes in self.dynamic_axes.values() for d in axes.values()}

    def tensor_specs(self, names: tuple[str, ...], tensors: tuple[torch.Tensor, ...]) -> list[TensorSpec]:
        """Shapes of `tensors` with the dynamic axes named."""
        specs = []
        for name, t in zip(names, tensors, strict=True):
            axes = self.dynamic_axes.get(name, {})
            specs.append(TensorSpec(name, [axes.get(i, s) for i, s in enumerate(t.shape)],
                                    str(t.dtype).removeprefix("torch.")))
        return specs

    def torch_dynamic_shapes(self) -> tuple[dict[int, torch.export.Dim] | None, ...]:
        """`dynamic_shapes` for torch.export: one shared Dim per dynamic name, sizes 1 and up."""
        dims = {name: torch.export.Dim(name, min=1) for name in self.dims()}
        return tuple({axis: dims[d] for axis, d in self.dynamic_axes[name].items()}
                     if name in self.dynamic_axes else None for name in self.input_names)


def _randn(gen: torch.Generator, shape, dtype, device) -> torch.Tensor:
    return torch.randn(shape, generator=gen).to(device=device, dtype=dtype)


def component_specs(models: Models, text: TextEncoder | None, names: tuple[str, ...], dtype: torch.dtype,
                    device: str, projected_field: bool = False) -> list[ComponentSpec]:
    """Specs for the components `names`, modules cast to `dtype` on `device` (the checkpoint is left as is).

    `projected_field` exports the field as `ProjectedTriplaneField` (AOTInductor on a CPU), else as is.
    """
    cfg = models.config
    batch = {0: "batch"}
    specs = []
    for name in names:
        gen = torch.Generator().manual_seed(0)
        if name == "text_encoder":
            if text is None:
                raise ValueError("exporting the text encoder needs its TextEncoder")
            specs.append(_text_spec(text, dtype, device))
        elif name == "image_encoder":
            if models.image_encoder is None:
                continue  # a text-only model: the component stays absent (eager None)
            enc = cfg.image_encoder

            def make(s, gen=gen, enc=enc):
                return (torch.rand(s["batch"], 3, enc.image_size, enc.image_size, generator=gen).to(device, dtype),)

            specs.append(ComponentSpec("image_encoder", _cast(models.image_encoder, dtype, device), ("images",),
                                       ("tokens",), {"images": batch, "tokens": batch}, make, {}))
        elif name == "denoiser":
            image = models.image_encoder is not None  # image-conditioned: image tokens are a fifth input

            def make(s, gen=gen, image=image):
                b = s["batch"]
                inputs = (_randn(gen, (b, *cfg.latent_shape), dtype, device),
                          torch.rand(b, generator=gen).to(device=device, dtype=dtype),
                          _randn(gen, (b, cfg.dit.context_len, cfg.dit.context_dim), dtype, device),
                          F.normalize(_randn(gen, (b, cfg.dit.context_dim), dtype, device), dim=-1))
                enc = cfg.image_encoder
                return inputs + ((_randn(gen, (b, enc.tokens, enc.width), dtype, device),) if image else ())

            names = ("x", "t", "context", "pooled") + (("image",) if image else ())
            axes = {**{n: batch for n in names}, "v": batch}
            specs.append(ComponentSpec("denoiser", _cast(models.dit, dtype, device), names, ("v",), axes, make, {}))
        elif name == "decoder":
            def make(s, gen=gen):
                return (_randn(gen, (s["batch"], *cfg.latent_shape), dtype, device),)

            # The project's VAE holds its decoder; a published model's VAE component is the decoder itself.
            decoder = getattr(models.vae, "decoder", models.vae)
            specs.append(ComponentSpec("decoder", _cast(decoder, dtype, device), ("latent",),
                                       ("planes",), {"latent": batch, "planes": batch}, make, {}))
        elif name == "field":
            def make(s, gen=gen):
                points = torch.rand(1, s["points"], 3, generator=gen) * 2.0 - 1.0
                return (_randn(gen, (1, *cfg.triplane_shape), dtype, device), points.to(device=device, dtype=dtype))

            n = {1: "points"}
            module = ProjectedTriplaneField(models.vae.field) if projected_field else models.vae.field
            specs.append(ComponentSpec("field", _cast(module, dtype, device), ("planes", "points"),
                                       ("density", "rgb"), {"points": n, "density": n, "rgb": n}, make,
                                       {"form": "projected" if projected_field else "reference"}))
        else:
            raise ValueError(f"component {name!r}: expected one of text_encoder, image_encoder, denoiser, decoder, "
                             "field")
    return specs


def _text_spec(text: TextEncoder, dtype: torch.dtype, device: str) -> ComponentSpec:
    keys = ("input_ids", "attention_mask", "token_type_ids")
    probe = text.tokenizer(["probe"])
    input_names = tuple(k for k in keys if k in probe)

    def make(s):
        prompts = [_PROMPTS[i % len(_PROMPTS)] for i in range(s["batch"])]
        batch = text.tokenizer(prompts)
        return tuple(batch[k].to(device) for k in input_names)

    batch = {0: "batch"}
    axes = {**{k: batch for k in input_names}, "context": batch, "pooled": batch}
    return ComponentSpec("text_encoder", TextTransformer(_cast(text.model, dtype, device)).eval(), input_names,
                         ("context", "pooled"), axes, make,
                         {"tokenizer": text.tokenizer.name, "max_length": text.max_length})


def _cast(module: nn.Module, dtype: torch.dtype, device: str) -> nn.Module:
    """The module on `device` at `dtype`; a copy when that changes anything, so the loaded models stay fp32."""
    ref = next(module.parameters())
    if ref.dtype == dtype and ref.device == torch.device(device):
        return module.eval()
    return copy.deepcopy(module).to(device=device, dtype=dtype).eval()


def run_module(spec: ComponentSpec, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """The eager outputs of a spec as a tuple."""
    with torch.no_grad():
        out = spec.module(*inputs)
    return out if isinstance(out, tuple) else (out,)

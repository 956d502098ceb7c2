"""The `Generator`: prompt -> few-step flow-matching sampling -> VAE decode -> tri-planes -> mesh and previews.

The compute is four swappable callables (`Components`): text encoder, denoiser, tri-plane decoder
and field. `eager` uses the PyTorch modules; `compile` wraps them in torch.compile; compiled
engines (`aoti`, `onnx`, `tensorrt`) come from `export.runtime`. Everything else (seeding, CFG,
meshing, previews, timing) is shared, so every backend is compared with eager on equal terms.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ln3diff_rt.cameras import camera_rays, intrinsics_from_fov, orbit_camera
from ln3diff_rt.checkpoint import Models, load_models
from ln3diff_rt.meshing import MeshResult, extract_mesh
from ln3diff_rt.rendering import occupancy_grid, render_chunked
from ln3diff_rt.sampling import Condition, sample
from ln3diff_rt.text import TextEncoder
from ln3diff_rt.timing import StageClock

DEFAULT_CHECKPOINT = Path(__file__).parent / "assets" / "ln3diff-tiny.safetensors"
BACKENDS = ("eager", "compile", "aoti", "onnx", "tensorrt")
PREVIEW_ELEVATION, PREVIEW_RADIUS, PREVIEW_FOV = 20.0, 3.2, math.radians(50.0)

ProgressFn = Callable[[str, int, int], None]  # (stage, done, total)


@dataclass(frozen=True)
class GenerationOptions:
    steps: int = 8
    guidance: float = 3.0
    shift: float = 1.0
    sampler: str = "euler"
    mesh_resolution: int = 128
    faces: int | None = 30000
    preview_views: int = 8
    preview_size: int = 128

    def validate(self) -> None:
        """Raise ValueError naming the first bad field, its value and what is expected."""
        checks = [
            ("steps", 1 <= self.steps <= 1000, "an integer in [1, 1000]"),
            ("guidance", 0.0 <= self.guidance <= 50.0, "a number in [0, 50]"),
            ("shift", 0.0 < self.shift <= 20.0, "a number in (0, 20]"),
            ("sampler", self.sampler in ("euler", "heun"), "'euler' or 'heun'"),
            ("mesh_resolution", 16 <= self.mesh_resolution <= 512, "an integer in [16, 512]"),
            ("faces", self.faces is None or self.faces >= 100, "at least 100, or None for no decimation"),
            ("preview_views", 0 <= self.preview_views <= 120, "an integer in [0, 120]"),
            ("preview_size", 16 <= self.preview_size <= 1024, "an integer in [16, 1024]"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r}: expected {expected}")


@dataclass
class GenerationResult:
    prompt: str
    seed: int
    options: GenerationOptions
    latent: torch.Tensor  # [3, c, h, w], in VAE units (scale undone)
    triplane: torch.Tensor  # [3, C, R, R]
    mesh: MeshResult | None
    previews: list[np.ndarray]  # [H, W, 3] uint8 turntable frames
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage, batch stages shared


@dataclass
class Components:
    """The per-request compute, each a plain callable so that compiled engines can stand in."""

    text_encoder: Callable[[list[str]], Condition]
    denoiser: Callable[..., torch.Tensor]  # (x, t, context, pooled) -> v
    decoder: Callable[[torch.Tensor], torch.Tensor]  # latent [B, 3, c, h, w] -> planes [B, 3, C, R, R]
    field: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # planes, points -> density, rgb


def eager_components(models: Models, device: str) -> Components:
    text = TextEncoder(models.config.text_encoder, models.config.dit.context_len).to(device)
    return Components(text, models.dit, models.vae.decode, models.vae.field)


class Generator:
    def __init__(self, models: Models, device: str = "cpu", components: Components | None = None,
                 backend: str = "eager"):
        if models.vae is None or models.dit is None:
            raise ValueError(f"{models.path}: generation needs both 'vae' and 'dit' components")
        self.models, self.config, self.device, self.backend = models, models.config, device, backend
        self.components = components or eager_components(models, device)
        self._text_cache: dict[str, Condition] = {}

    @classmethod
    def from_checkpoint(cls, path: str | Path | None = None, device: str = "cpu", backend: str = "eager",
                        engine_dir: str | Path | None = None) -> Generator:
        """Load a checkpoint (default: the shipped tiny model) and build the chosen backend."""
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r}: expected one of {BACKENDS}")
        path = Path(path) if path else DEFAULT_CHECKPOINT
        models = load_models(path, device, require=("vae", "dit"))
        components = eager_components(models, device)
        if backend == "compile":
            components.denoiser = torch.compile(components.denoiser)
            components.decoder = torch.compile(components.decoder)
            components.field = torch.compile(components.field, dynamic=True)
        elif backend != "eager":
            if engine_dir is None:
                raise ValueError(f"backend={backend!r} needs an engine directory (python export/build_engine.py)")
            from export.runtime import load_engine_components

            components = load_engine_components(engine_dir, backend, path, components, device)
        return cls(models, device, components, backend)

    # -- stages ----------------------------------------------------------------------------------

    def encode_text(self, prompts: list[str]) -> Condition:
        """Text conditions for prompts, cached per prompt (servers see the same prompts repeatedly)."""
        missing = sorted({p for p in prompts if p not in self._text_cache})
        if missing:
            cond = self.components.text_encoder(missing)
            for i, p in enumerate(missing):
                self._text_cache[p] = Condition(cond.context[i:i + 1], cond.pooled[i:i + 1])
        conds = [self._text_cache[p] for p in prompts]
        return Condition(torch.cat([c.context for c in conds]).to(self.device),
                         torch.cat([c.pooled for c in conds]).to(self.device))

    def initial_noise(self, seeds: list[int]) -> torch.Tensor:
        """One noise tensor per seed, drawn on the CPU: a seed gives the same object in any batch, on any device."""
        noise = [torch.randn(self.config.latent_shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
        return torch.stack(noise).to(self.device)

    @torch.no_grad()
    def sample_latents(self, prompts: list[str], seeds: list[int], options: GenerationOptions,
                       progress: ProgressFn | None = None) -> torch.Tensor:
        """Flow-matching sampling with CFG -> latents [B, 3, c, h, w] in VAE units."""
        cond = self.encode_text(prompts)
        uncond = self.encode_text([""] * len(prompts)) if options.guidance != 1.0 else None
        callback = (lambda i, n: progress("sample", i, n)) if progress else None
        z = sample(self.components.denoiser, self.initial_noise(seeds), cond, uncond, steps=options.steps,
                   guidance=options.guidance, shift=options.shift, method=options.sampler, callback=callback)
        return z * self.config.latent_scale

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.components.decoder(latents)

    def _field_fns(self, planes: torch.Tensor):
        """Density and colour callables over points [N, 3] for one tri-plane [3, C, R, R]."""
        planes = planes[None].to(self.device)

        def density(points: torch.Tensor) -> torch.Tensor:
            return self.components.field(planes, points[None].to(self.device))[0][0].float().cpu()

        def color(points: torch.Tensor) -> torch.Tensor:
            return self.components.field(planes, points[None].to(self.device))[1][0].float().cpu()

        return density, color

    @torch.no_grad()
    def extract_mesh(self, planes: torch.Tensor, options: GenerationOptions) -> MeshResult:
        density, color = self._field_fns(planes)
        return extract_mesh(density, resolution=options.mesh_resolution, threshold=self.config.renderer.mesh_threshold,
                            color_fn=color, faces=options.faces, min_component_fraction=0.01,
                            chunk=2**14)  # measured: 2.4x faster field queries than 2^18 on a CPU (cache-sized)

    @torch.no_grad()
    def render_previews(self, planes: torch.Tensor, options: GenerationOptions) -> list[np.ndarray]:
        """A turntable of `preview_views` frames around the object, ray-marched from the tri-plane."""
        size = options.preview_size
        intrinsics = intrinsics_from_fov(PREVIEW_FOV, size, size)
        planes = planes[None].to(self.device)
        occupancy = occupancy_grid(self.components.field, planes) if options.preview_views else None
        frames = []
        for i in range(options.preview_views):
            c2w = orbit_camera(360.0 * i / options.preview_views - 90.0, PREVIEW_ELEVATION, PREVIEW_RADIUS)
            origins, dirs = camera_rays(c2w, intrinsics, size, size)
            out = render_chunked(self.components.field, planes, origins.reshape(1, -1, 3).to(self.device),
                                 dirs.reshape(1, -1, 3).to(self.device), self.config.renderer, occupancy=occupancy)
            rgb = out.rgb[0].reshape(size, size, 3).clamp(0, 1)
            frames.append((rgb * 255.0 + 0.5).to(torch.uint8).cpu().numpy())
        return frames

    # -- the whole request -----------------------------------------------------------------------

    def generate(self, prompts: list[str], seeds: list[int], options: GenerationOptions | None = None,
                 mesh: bool = True, progress: ProgressFn | None = None) -> list[GenerationResult]:
        """Generate one object per (prompt, seed), sampled as one batch; timings per stage in each result."""
        options = options or GenerationOptions()
        options.validate()
        if len(prompts) != len(seeds):
            raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds")
        for i, p in enumerate(prompts):
            if not p.strip():
                raise ValueError(f"prompts[{i}] is empty: describe the object, e.g. 'a red cube'")
        clock = StageClock(self.device)
        with clock.time("encode_text"):
            self.encode_text(prompts)
        with clock.time("sample"):
            latents = self.sample_latents(prompts, seeds, options, progress)
        with clock.time("decode"):
            planes = self.decode(latents)
        results = []
        for i, (prompt, seed) in enumerate(zip(prompts, seeds, strict=True)):
            own = StageClock(self.device, clock.times)
            mesh_result = None
            if mesh:
                with own.time("mesh"):
                    mesh_result = self.extract_mesh(planes[i], options)
                if progress:
                    progress("mesh", i + 1, len(prompts))
            with own.time("preview"):
                previews = self.render_previews(planes[i], options)
            if progress and options.preview_views:
                progress("preview", i + 1, len(prompts))
            results.append(GenerationResult(prompt, int(seed), options, latents[i].cpu(), planes[i].cpu(),
                                            mesh_result, previews, own.times))
        return results

"""The `Generator`: a loaded model and the stages of a request, each a method over plain tensors.

The compute is four swappable callables (`Components`): text encoder, denoiser, tri-plane decoder
and field. `eager` uses the PyTorch modules; the other backends (`ln3diff_rt.backends`) swap in
compiled versions. Everything else (seeding, CFG, meshing, previews) is shared, so every backend
is compared with eager on equal terms. `ln3diff_rt.runner.run` sequences the stages for every
caller (CLI, server, profiler, warm-up, batch generation).
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ln3diff_rt.backends import get_backend
from ln3diff_rt.cameras import camera_rays, intrinsics_from_fov, orbit_camera
from ln3diff_rt.checkpoint import Models, load_models
from ln3diff_rt.conventions import FIELD_CHUNK, PREVIEW_ELEVATION, PREVIEW_FOV, PREVIEW_RADIUS
from ln3diff_rt.images import centre_object
from ln3diff_rt.meshing import MeshResult, extract_mesh
from ln3diff_rt.models.dit import DiT
from ln3diff_rt.models.field import TriplaneField
from ln3diff_rt.models.projected_field import ProjectedTriplaneField
from ln3diff_rt.official.ddpm import SAMPLERS as DDPM_SAMPLERS
from ln3diff_rt.official.ddpm import sample_ddpm
from ln3diff_rt.official.flow import sample_flow
from ln3diff_rt.options import PRECISIONS, GenerationOptions, InvalidOption
from ln3diff_rt.raster import render_mesh
from ln3diff_rt.rendering import FieldFn, occupancy_grid, preview_renderer, render_chunked
from ln3diff_rt.sampling import Condition, sample
from ln3diff_rt.text import TextEncoder

DEFAULT_CHECKPOINT = Path(__file__).parent / "assets" / "ln3diff-tiny.safetensors"
TEXT_CACHE_SIZE = 1024  # prompts whose conditions are kept; a server sees the same prompts again and again

StepFn = Callable[[int, int], None]  # (step, steps) after each sampling step; may raise to stop

# How each objective (ModelConfig.objective) is sampled, and the solvers it knows. Each is called as
# fn(denoiser, noise, cond, uncond, steps=, guidance=, method=, shift=, callback=) -> diffusion-space latent.
SAMPLING: dict[str, tuple[Callable[..., torch.Tensor], tuple[str, ...]]] = {
    "flow": (sample, ("euler", "heun")),
    "eps": (lambda *a, shift, **k: sample_ddpm(*a, **k), DDPM_SAMPLERS),  # the DDPM schedule has no shift
    "flow-data": (sample_flow, ("euler", "heun")),
}


@dataclass
class Components:
    """The per-request compute, each a plain callable so that compiled engines can stand in."""

    text_encoder: Callable[[list[str]], Condition]
    denoiser: Callable[..., torch.Tensor]  # (x, t, context, pooled[, image tokens]) -> v
    decoder: Callable[[torch.Tensor], torch.Tensor]  # latent [B, 3, c, h, w] -> planes [B, 3, C, R, R]
    field: FieldFn
    # Condition images [B, 3, S, S] in [0, 1] -> image tokens [B, M, Di] (the project's image conditioning),
    # or -> a whole Condition (the published image model's CLIP + DINOv2 conditioner); None: no image input.
    image_encoder: Callable[[torch.Tensor], torch.Tensor | Condition] | None = None


def eager_components(models: Models, device: str, text_encoder: str | None = None,
                     image_encoders: tuple[str, str] | None = None) -> Components:
    """The checkpoint's own modules; `text_encoder` (a local directory or a cached Hugging Face id) replaces
    the one its config names, and `image_encoders` (CLIP, DINOv2; the same kinds of name) the published image
    model's."""
    cfg = models.config
    if cfg.image_only:  # the published image model: no prompt, CLIP + DINOv2 image tokens
        from ln3diff_rt.official.image import OfficialImageConditioner

        image = OfficialImageConditioner(*(image_encoders or cfg.image_encoders)).to(device)
        return Components(_no_text(cfg.preset), models.dit, models.vae.decode, models.vae.field, image)
    text = TextEncoder(text_encoder or cfg.text_encoder, cfg.dit.context_len).to(device)
    return Components(text, models.dit, models.vae.decode, models.vae.field, models.image_encoder)


def check_precision(precision: str, backend: str) -> None:
    """ValueError naming `precision` for an unknown precision, or bf16 on an exported engine's backend."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: expected one of {', '.join(PRECISIONS)}")
    if precision != "fp32" and backend not in AUTOCAST_BACKENDS:
        raise ValueError(f"precision={precision!r}: expected fp32 with backend {backend!r}: an engine's precision is "
                         "set when it is built (export/build_engine.py --precision)")


def _no_text(preset: str) -> Callable[[list[str]], Condition]:
    def refuse(prompts: list[str]) -> Condition:
        raise ValueError(f"{preset} generates from an image only: give --image instead of a prompt")

    return refuse


def compiled_components(eager: Components, device: str, **_: object) -> Components:
    """torch.compile of the denoiser, decoder and field (the registry's other keywords are not needed).

    On the CPU the field is compiled in its gather form (`ProjectedTriplaneField`, as AOTInductor engines are):
    traced from the reference's `grid_sample`, Inductor emits strided per-channel loads that ran slower than eager
    in every field stage (mesh queries 0.66x, previews 0.76x in issue 21's measurement). On a GPU the sampler is
    the Triton op either way. A field of another kind (the published models') is compiled as it is."""
    field = eager.field
    if not str(device).startswith("cuda") and isinstance(field, TriplaneField):
        field = ProjectedTriplaneField(field)
    field = torch.compile(field, dynamic=True)
    denoiser = CompiledDiT(eager.denoiser) if isinstance(eager.denoiser, DiT) else torch.compile(eager.denoiser)
    return Components(eager.text_encoder, denoiser, torch.compile(eager.decoder), field, eager.image_encoder)


class CompiledDiT:
    """torch.compile of the project's DiT that samples as eager does (`DiT.bind_condition`): the condition's part
    (the cross-attention's keys and values) runs once per sampling run, each step runs the compiled `denoise`.
    Called with the whole condition, it is the compiled `forward`."""

    def __init__(self, dit: DiT):
        self.dit, self.forward, self.denoise = dit, torch.compile(dit), torch.compile(dit.denoise)

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        return self.forward(*args)

    def bind_condition(self, context: torch.Tensor, pooled: torch.Tensor, image_tokens: torch.Tensor | None = None
                       ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        return self.dit.bind_condition(context, pooled, image_tokens, step=self.denoise)


class ConditionCache:
    """Text conditions per prompt, least recently used evicted beyond `size` (0 disables the cache)."""

    def __init__(self, size: int = TEXT_CACHE_SIZE):
        self.size = size
        self._items: OrderedDict[str, Condition] = OrderedDict()

    def get(self, prompt: str) -> Condition | None:
        if prompt in self._items:
            self._items.move_to_end(prompt)
        return self._items.get(prompt)

    def put(self, prompt: str, cond: Condition) -> None:
        if self.size <= 0:
            return
        self._items[prompt] = cond
        self._items.move_to_end(prompt)
        while len(self._items) > self.size:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


# The denoiser's and decoder's arithmetic on the eager and compile backends: bf16 runs them under autocast (matrix
# products in bf16 on tensor cores, fp32 weights, latents and planes handed on in fp32). At paper scale on an H200
# the fp32 denoiser took 335 of a request's 523 ms. The field stays fp32 (its queries were 13 ms there). Exported
# engines take their precision from `export/build_engine.py --precision` instead (options.PRECISIONS: the list).
AUTOCAST_BACKENDS = ("eager", "compile")


class Generator:
    def __init__(self, models: Models, device: str = "cpu", components: Components | None = None,
                 backend: str = "eager", text_cache_size: int = TEXT_CACHE_SIZE, precision: str = "fp32"):
        if models.vae is None or models.dit is None:
            raise ValueError(f"{models.path}: generation needs both 'vae' and 'dit' components")
        check_precision(precision, backend)
        self.models, self.config, self.device, self.backend = models, models.config, device, backend
        self.precision = precision
        self.components = components or eager_components(models, device)
        self.text_cache = ConditionCache(text_cache_size)
        self._empty_prompt: Condition | None = None  # the guidance's unconditional text, encoded once

    @classmethod
    def from_checkpoint(cls, path: str | Path | None = None, device: str = "cpu", backend: str = "eager",
                        engine_dir: str | Path | None = None, text_cache_size: int = TEXT_CACHE_SIZE,
                        text_encoder: str | None = None, image_encoders: tuple[str, str] | None = None,
                        precision: str = "fp32") -> Generator:
        """Load a checkpoint (default: the shipped tiny model) and build the chosen backend."""
        check_precision(precision, backend)  # before minutes of loading
        chosen = get_backend(backend)
        chosen.check_installed()
        path = Path(path) if path else DEFAULT_CHECKPOINT
        models = load_models(path, device, require=("vae", "dit"))
        components = eager_components(models, device, text_encoder, image_encoders)
        if chosen.components is not None:
            components = chosen.resolve("components")(eager=components, backend=backend, device=device,
                                                      engine_dir=engine_dir, ckpt_path=path)
        return cls(models, device, components, backend, text_cache_size, precision)

    def autocast(self) -> torch.autocast:
        """The context the denoiser and decoder run in: bf16 autocast on the generator's device, or nothing."""
        return torch.autocast(torch.device(self.device).type, dtype=torch.bfloat16, enabled=self.precision == "bf16")

    @property
    def samplers(self) -> tuple[str, ...]:
        """The solvers this model's objective knows (a request's `sampler` must be one)."""
        return SAMPLING[self.config.objective][1]

    def default_options(self) -> GenerationOptions:
        """GenerationOptions with this model's own defaults (its config's `request_defaults`) filled in."""
        return GenerationOptions().replace(**self.config.request_defaults)

    def check_inputs(self, prompt: str, image: np.ndarray | None) -> None:
        """InvalidOption naming `image` unless this model takes this kind of request (a prompt, an image, or both):
        the one check behind the CLI, the runner and the server."""
        if image is not None and not self.config.takes_images:
            raise InvalidOption("image", "<an image>", f"none: {self.config.preset} ({self.models.path.name}) "
                                                       "takes a prompt only")
        if image is None and self.config.image_only:
            raise InvalidOption("image", "<none>", f"an image: {self.config.preset} ({self.models.path.name}) "
                                                   "generates from an image alone")

    def prompt_warnings(self, prompt: str) -> list[str]:
        """One-line warnings for a prompt this model will read only in part: words outside its training captions'
        vocabulary, or more tokens than its text encoder reads."""
        warnings = []
        vocabulary = set(self.config.vocabulary)
        unknown = [w for w in re.findall(r"[^\W\d_]+", prompt.lower()) if vocabulary and w not in vocabulary]
        if unknown:
            warnings.append(f"{prompt!r}: {', '.join(repr(w) for w in dict.fromkeys(unknown))} not among the words "
                            f"this model was trained on ({' '.join(self.config.vocabulary)})")
        tokenizer = getattr(self.components.text_encoder, "tokenizer", None)
        limit = self.config.dit.context_len
        if tokenizer is not None and prompt:
            count = tokenizer.count(prompt)
            if count > limit:
                warnings.append(f"{prompt[:40]!r}...: {count} tokens; the text encoder reads the first {limit}")
        return warnings

    def check_options(self, options: GenerationOptions) -> None:
        """InvalidOption unless `options` suit this model (beyond their own bounds)."""
        if options.sampler not in self.samplers:
            raise InvalidOption("sampler", options.sampler, f"one of {', '.join(self.samplers)} for this model "
                                f"({self.config.preset}, objective {self.config.objective})")

    # -- the stages of a request ----------------------------------------------------------------

    def encode_text(self, prompts: list[str]) -> Condition:
        """Text conditions [B, L, Dc] / [B, Dc] for prompts; prompts seen recently come from the cache."""
        missing = sorted({p for p in prompts if self.text_cache.get(p) is None})
        fresh = {}
        if missing:
            cond = self.components.text_encoder(missing)
            for i, p in enumerate(missing):
                fresh[p] = Condition(cond.context[i:i + 1], cond.pooled[i:i + 1])
                self.text_cache.put(p, fresh[p])
        conds = [fresh.get(p) or self.text_cache.get(p) for p in prompts]
        return Condition(torch.cat([c.context for c in conds]).to(self.device),
                         torch.cat([c.pooled for c in conds]).to(self.device))

    @property
    def image_size(self) -> int:
        """Side of the square condition image the image encoder takes."""
        from ln3diff_rt.official.image import IMAGE_SIZE

        return IMAGE_SIZE if self.config.image_only else self.config.image_encoder.image_size

    def encode_conditions(self, prompts: list[str], images: list[np.ndarray | None]) -> Condition:
        """The batch's conditions: prompts (cached) and RGBA images [H, W, 4] uint8, None where a request has none.

        The published image model takes the image alone; the project's image-conditioned models take both,
        with zero image tokens where a request has no image (what training's condition dropout taught them).
        """
        given = [i for i, image in enumerate(images) if image is not None]
        if self.config.image_only:
            return self.components.image_encoder(self._image_batch(images))
        cond = self.encode_text(prompts)
        if self.components.image_encoder is None:
            return cond
        enc = self.config.image_encoder
        tokens = torch.zeros(len(images), enc.tokens, enc.width, device=self.device)  # [B, M, Di]
        if given:
            tokens[given] = self.components.image_encoder(self._image_batch([images[i] for i in given])).float()
        return Condition(cond.context, cond.pooled, tokens)

    def _image_batch(self, images: list[np.ndarray]) -> torch.Tensor:
        """[B, 3, S, S] in [0, 1] on the device: each object centred and scaled alike (`images.centre_object`)."""
        return torch.stack([centre_object(image, self.image_size) for image in images]).to(self.device)

    def unconditional(self, cond: Condition) -> Condition:
        """The guidance's unconditional input for a batch: the empty prompt's encoding and zero image tokens, or
        all zeros (the published models)."""
        if self.config.uncond == "zeros":
            return Condition(torch.zeros_like(cond.context), torch.zeros_like(cond.pooled))
        if self._empty_prompt is None:  # the same for every request: encoded once, whatever the prompt cache holds
            self._empty_prompt = self.encode_text([""])
        b, empty = cond.context.shape[0], self._empty_prompt
        return Condition(empty.context.expand(b, *empty.context.shape[1:]), empty.pooled.expand(b, -1),
                         None if cond.image is None else torch.zeros_like(cond.image))

    def initial_noise(self, seeds: list[int]) -> torch.Tensor:
        """One noise tensor per seed, drawn on the CPU: a seed gives the same object in any batch, on any device."""
        noise = [torch.randn(self.config.latent_shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
        return torch.stack(noise).to(self.device)

    @torch.no_grad()
    def sample_latents(self, cond: Condition, uncond: Condition | None, seeds: list[int],
                       options: GenerationOptions, on_step: StepFn | None = None) -> torch.Tensor:
        """Sampling with CFG, as the model's objective wants it -> latents [B, 3, c, h, w] in VAE units."""
        self.check_options(options)
        sampler = SAMPLING[self.config.objective][0]
        with self.autocast():
            z = sampler(self.components.denoiser, self.initial_noise(seeds), cond, uncond, steps=options.steps,
                        guidance=options.guidance, method=options.sampler, shift=options.shift, callback=on_step)
        return z.float() * self.config.latent_scale

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            planes = self.components.decoder(latents)
        return planes if self.precision == "fp32" else planes.float()

    def colour_fn(self, planes: torch.Tensor, field: FieldFn | None = None, lit: bool = False,
                  check: Callable[[], None] | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
        """points [N, 3] -> colour [N, 3] on the CPU, for one tri-plane [3, C, R, R].

        The colour is an asset's (vertex colours, baked textures): the unlit base colour where the model predicts
        one (`RendererConfig.albedo`), else the lit colour; `lit` asks for the lit colour, what previews render,
        either way. The lit colour comes from `field` (the components' field by default); the albedo from the
        checkpoint's own field, alone (one MLP pass, no density: compiled engines compute density and lit colour
        only), with `check` run before each query as `field` would run it (the runner's cancellation check)."""
        planes, field = planes[None].to(self.device), field or self.components.field
        own = self.models.vae.field
        if lit or not getattr(own, "has_albedo", False):
            return lambda points: field(planes, points[None].to(self.device))[1][0].float().cpu()
        planes = planes.to(next(own.parameters()).dtype)  # from an fp16 engine, say

        def albedo(points: torch.Tensor) -> torch.Tensor:
            if check is not None:
                check()
            return own.albedo(planes, points[None].to(planes)).float()[0].cpu()

        return albedo

    def surface_fn(self, planes: torch.Tensor, field: FieldFn | None = None
                   ) -> tuple[Callable[[torch.Tensor], torch.Tensor], float]:
        """(points [N, 3] -> the scalar marching cubes cuts [N], its level) for one tri-plane [3, C, R, R]: the
        density at the calibrated threshold, or an SDF field's -s at 0 (recovered from any engine's density)."""
        planes, field, own = planes[None].to(self.device), field or self.components.field, self.models.vae.field
        level = own.mesh_level(torch.tensor(own.surface_density(self.config.renderer.mesh_threshold)))
        return (lambda points: own.mesh_level(field(planes, points[None].to(self.device))[0][0].float().cpu()),
                float(level))

    @torch.no_grad()
    def extract_mesh(self, planes: torch.Tensor, options: GenerationOptions, field: FieldFn | None = None,
                     check: Callable[[], None] | None = None) -> MeshResult:
        """Coarse-to-fine marching cubes of one tri-plane [3, C, R, R]; `field` may wrap the components' field,
        `check` runs before the albedo's queries (`colour_fn`). Vertex colours are the asset colour."""
        surface, level = self.surface_fn(planes, field)
        return extract_mesh(surface, resolution=options.mesh_resolution, threshold=level,
                            color_fn=self.colour_fn(planes, field, check=check),
                            faces=options.faces or None, min_component_fraction=0.01, chunk=FIELD_CHUNK)

    @torch.no_grad()
    def render_previews(self, planes: torch.Tensor, options: GenerationOptions,
                        on_view: Callable[[int], None] | None = None, mesh: MeshResult | None = None
                        ) -> list[np.ndarray]:
        """A turntable of `preview_views` frames [H, W, 3] uint8 around one tri-plane [3, C, R, R].

        With a `mesh` (the request's, not empty) the frames rasterise it, coloured by the field's lit colour at
        its vertices: the asset as it is, at a few ms a frame. Without one they ray-march the field (its
        occupied cells). `on_view(i)` runs before frame i and before each of its ray chunks (cancellation)."""
        size = options.preview_size
        intrinsics = intrinsics_from_fov(PREVIEW_FOV, size, size)
        if mesh is not None and not mesh.empty and options.preview_views:
            return self._mesh_previews(planes, mesh, options, intrinsics, on_view)
        planes = planes[None].to(self.device)
        occupancy = occupancy_grid(self.components.field, planes) if options.preview_views else None
        frames = []
        for i in range(options.preview_views):
            if on_view is not None:
                on_view(i)
            c2w = orbit_camera(360.0 * i / options.preview_views - 90.0, PREVIEW_ELEVATION, PREVIEW_RADIUS)
            origins, dirs = camera_rays(c2w, intrinsics, size, size)
            out = render_chunked(self.components.field, planes, origins.reshape(1, -1, 3).to(self.device),
                                 dirs.reshape(1, -1, 3).to(self.device), preview_renderer(self.config.renderer),
                                 occupancy=occupancy,
                                 on_chunk=None if on_view is None else lambda i=i: on_view(i))
            rgb = out.rgb[0].reshape(size, size, 3).clamp(0, 1)
            frames.append((rgb * 255.0 + 0.5).to(torch.uint8).cpu().numpy())
        return frames

    def _mesh_previews(self, planes: torch.Tensor, mesh: MeshResult, options: GenerationOptions,
                       intrinsics: torch.Tensor, on_view: Callable[[int], None] | None) -> list[np.ndarray]:
        vertices = torch.from_numpy(np.ascontiguousarray(mesh.vertices, dtype=np.float32))
        faces = torch.from_numpy(np.ascontiguousarray(mesh.faces, dtype=np.int64))
        colour = self.colour_fn(planes, lit=True)
        lit = torch.cat([colour(vertices[i:i + FIELD_CHUNK]) for i in range(0, len(vertices), FIELD_CHUNK)])
        frames = []
        for i in range(options.preview_views):
            if on_view is not None:
                on_view(i)
            c2w = orbit_camera(360.0 * i / options.preview_views - 90.0, PREVIEW_ELEVATION, PREVIEW_RADIUS)
            rgb = render_mesh(vertices, faces, lit, c2w, intrinsics, options.preview_size,
                              self.config.renderer.background).clamp(0, 1)
            frames.append((rgb * 255.0 + 0.5).to(torch.uint8).numpy())
        return frames

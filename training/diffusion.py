"""Stage 2: train the flow-matching DiT on latents of the frozen VAE.

    python -m training.diffusion --data data/synth --vae runs/vae/vae.safetensors --out runs/diffusion
    torchrun --nproc_per_node=2 -m training.diffusion --data data/synth --vae runs/vae/vae.safetensors

Encodes the dataset once (cached under OUT/latents, keyed by the VAE's sha256), scales latents by
their standard deviation (stored in the config as `latent_scale`), then trains with
z_t = (1 - t) z0 + t eps, target eps - z0, logit-normal t, and the caption replaced by the empty
prompt with probability cfg_dropout for classifier-free guidance. Writes
`train_state.safetensors` (resume), `model.safetensors` (VAE + EMA DiT: what `ln3diff generate`
loads) and `log.jsonl` under --out.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ln3diff_rt.checkpoint import load_models, save_checkpoint
from ln3diff_rt.config import get_preset
from ln3diff_rt.models.dit import DiT
from ln3diff_rt.sampling import Condition, flow_matching_loss
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
    warmup: int = flag(200, "linear warm-up steps")
    ema: float = flag(0.999, "EMA decay of the shipped weights")
    encode_passes: int = flag(4, "random input-view subsets encoded per training object (augmentation)")
    eval_every: int = flag(500, "steps between held-out loss evaluations")
    save_every: float = flag(120.0, "seconds between state saves")
    seed: int = flag(0, "seed for weights, batches, noise and dropout")
    device: str = flag("cpu", "cpu or cuda (one GPU per torchrun process)")
    resume: bool = flag(False, "continue from OUT/train_state.safetensors")


class FlowObjective(nn.Module):
    """Flow-matching loss with CFG dropout as one module, so DDP wraps one forward call."""

    def __init__(self, dit: DiT, dropout: float):
        super().__init__()
        self.dit, self.dropout = dit, dropout

    def forward(self, z0, context, pooled, null: Condition, generator) -> tuple[torch.Tensor, dict]:
        drop = torch.rand(z0.shape[0], generator=generator, device=z0.device) < self.dropout
        context = torch.where(drop[:, None, None], null.context, context)
        pooled = torch.where(drop[:, None], null.pooled, pooled)
        return flow_matching_loss(self.dit, z0, Condition(context, pooled), generator), {}


def draw_batch(latents: LatentSet, idx: list[int], scale: float, generator: torch.Generator):
    """Posterior samples z0 / scale and their text conditions for the given latent indices."""
    index = torch.tensor(idx)
    mean, logvar = latents.mean[index], latents.logvar[index]
    z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=generator)
    cap = latents.caption_ids[index]
    return z / scale, latents.context[cap], latents.pooled[cap]


@torch.no_grad()
def evaluate(dit: DiT, latents: LatentSet, scale: float, device: str, seed: int = 1234) -> float:
    """Flow-matching loss on held-out latents, fixed noise and times: comparable across evaluations."""
    dit.eval()
    g = torch.Generator().manual_seed(seed)
    losses = []
    for start in range(0, len(latents.mean), 128):
        idx = list(range(start, min(start + 128, len(latents.mean))))
        z, ctx, pooled = draw_batch(latents, idx, scale, g)
        loss = flow_matching_loss(dit, z.to(device), Condition(ctx.to(device), pooled.to(device)), g)
        losses.append(loss.item() * len(idx))
    dit.train()
    return sum(losses) / max(1, len(latents.mean))


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, parameter by parameter (the shipped weights are the EMA)."""
    for pe, p in zip(ema.parameters(), model.parameters(), strict=True):
        pe.lerp_(p, 1.0 - decay)


def train(cfg: DiffusionTrainConfig) -> Path:
    """Run (or resume) stage-2 training; returns the path of the written model (VAE + EMA DiT)."""
    dist_env = setup_distributed(cfg.device)
    device = dist_env.device(cfg.device)
    out = Path(cfg.out)
    vae_models = load_models(cfg.vae, "cpu", require=("vae",))
    if dist_env.main:
        build_latent_cache(cfg.data, cfg.vae, out / "latents", cfg.encode_passes, vae_models.config.text_encoder,
                           "cpu", cfg.seed)
    if dist_env.world > 1:
        torch.distributed.barrier()  # the other ranks read what rank 0 encoded
    train_set, val_set = load_latents(out / "latents" / "train.safetensors"), load_latents(
        out / "latents" / "val.safetensors")
    scale = train_set.mean.std().item()  # unit-variance latents, like LN3Diff's fixed divider
    # The VAE checkpoint fixes encoder, decoder and renderer; the DiT comes from the current preset.
    model_cfg = vae_models.config.replace(latent_scale=scale, dit=get_preset(vae_models.config.preset).dit)
    null = Condition(train_set.context[:1].to(device), train_set.pooled[:1].to(device))  # captions[0] == ""

    torch.manual_seed(cfg.seed)
    dit = DiT(model_cfg).to(device)
    ema = copy.deepcopy(dit).requires_grad_(False)
    model_path = out / "model.safetensors"

    def batch(indices: list[int], step: int, generator: torch.Generator) -> tuple:
        z, ctx, pooled = draw_batch(train_set, indices, scale, generator)
        return z.to(device), ctx.to(device), pooled.to(device), null

    def evaluate_ema() -> tuple[dict, str]:
        val = evaluate(ema, val_set, scale, device)
        return {"val_flow_loss": round(val, 5)}, f"held-out flow-matching loss {val:.4f} (EMA)"

    def finish(step: int) -> dict:
        save_checkpoint(model_path, model_cfg, {"vae": vae_models.vae, "dit": ema},
                        {"train_steps_dit": str(step), "train_steps_vae": vae_models.metadata.get("train_steps", "")})
        return {}

    stage = Stage(name="diffusion", config=model_cfg, model=dit,
                  state=nn.ModuleDict({"dit": dit, "ema": ema}),  # saved together for exact resume
                  objective=FlowObjective(dit, model_cfg.dit.cfg_dropout),
                  optimizer=torch.optim.AdamW(dit.parameters(), lr=cfg.lr, weight_decay=0.0),
                  num_items=len(train_set.mean), batch=batch, finish=finish, evaluate=evaluate_ema,
                  after_step=lambda: update_ema(ema, dit, cfg.ema),
                  info={"latents": len(train_set.mean), "val_latents": len(val_set.mean), "latent_scale": scale})
    run(cfg, stage, dist_env)
    return model_path


def main(argv: list[str] | None = None) -> None:
    with distributed_teardown():
        path = train(parse_config(DiffusionTrainConfig, argv, "python -m training.diffusion", __doc__))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

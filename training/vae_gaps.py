"""Where a VAE's reconstruction error comes from: the encoder, the latent and decoder, or the tri-plane field.

For each held-out object, three PSNRs over all of its target views:

1. encoder: the tri-planes decoded from the encoder's posterior mean (what `training.evaluate` measures, here
   over every target view, not the first);
2. latent fit: that latent optimised to render the views, the decoder fixed: what the latent and decoder can
   express; the gain over 1 is the encoder's share of the error (its amortisation gap);
3. tri-plane fit: the decoded tri-planes optimised directly, the field's MLP fixed: what the tri-plane resolution
   and MLP can express; the gain over 2 is the latent's and decoder's share.

The fits see the views they are measured on: a capacity test, not a held-out figure.

    python -m training.vae_gaps --ckpt runs/v3/vae/vae.safetensors --data data/synth-v2 [--objects 4] [--steps 100]
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

import torch

from ln3diff_rt.cameras import camera_rays
from ln3diff_rt.checkpoint import load_models
from ln3diff_rt.rendering import render_chunked, render_rays
from training.data.dataset import MultiViewDataset

STAGES = ("encoder", "latent fit", "tri-plane fit")


def _views(item: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every target view's rays and colours: origins, dirs, rgb [1, V*H*W, 3]."""
    _, _, h, w = item["target_images"].shape
    origins, dirs = camera_rays(item["target_c2w"], item["target_intrinsics"], h, w)
    rgb = item["target_images"].permute(0, 2, 3, 1)
    return origins.reshape(1, -1, 3), dirs.reshape(1, -1, 3), rgb.reshape(1, -1, 3)


def _fit(vae, start: torch.Tensor, planes_of: Callable[[torch.Tensor], torch.Tensor], views, steps: int,
         lr: float, rays: int, seed: int) -> torch.Tensor:
    """`start` optimised (Adam, L1 on random rays of the views); returns the tri-planes it decodes to."""
    origins, dirs, rgb = views
    param = start.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([param], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        pick = torch.randint(0, origins.shape[1], (rays,), generator=gen)
        out = render_rays(vae.field, planes_of(param), origins[:, pick], dirs[:, pick], vae.cfg.renderer,
                          perturb=True, generator=gen)
        loss = (out.rgb - rgb[:, pick]).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return planes_of(param)


@torch.no_grad()
def _psnr(vae, planes: torch.Tensor, views) -> float:
    origins, dirs, rgb = views
    out = render_chunked(vae.field, planes, origins, dirs, vae.cfg.renderer)
    return 10.0 * math.log10(1.0 / max((out.rgb.clamp(0, 1) - rgb).square().mean().item(), 1e-10))


def gaps(ckpt: str, data: str, objects: int = 4, steps: int = 100, lr: float = 3e-2, rays: int = 2048,
         seed: int = 0, on_object: Callable[[dict], None] | None = None) -> list[dict]:
    """One row per held-out object: its shape (procedural objects) and the PSNR after each of `STAGES`."""
    models = load_models(ckpt, require=("vae",))
    vae, cfg = models.vae.eval(), models.config
    for p in vae.parameters():
        p.requires_grad_(False)
    val = MultiViewDataset(data, "val", cfg.encoder.num_views, 8, cfg.encoder.image_size, "skip", seed=seed)
    val.set_epoch(0)
    rows = []
    for i in range(min(objects, len(val))):
        item = val[i]
        views = _views(item)
        with torch.no_grad():
            mean, _ = vae.encode(*(item[k][None] for k in ("input_images", "input_c2w", "input_intrinsics")))
            planes = vae.decode(mean)
        record = val.records[i]
        row = {"object": record.transforms_path.parent.name, "shape": record.meta.get("ln3diff_synth", {}).get("shape"),
               "encoder": _psnr(vae, planes, views)}
        row["latent fit"] = _psnr(vae, _fit(vae, mean, vae.decode, views, steps, lr, rays, seed), views)
        row["tri-plane fit"] = _psnr(vae, _fit(vae, planes, lambda p: p, views, steps, lr, rays, seed), views)
        rows.append(row)
        if on_object is not None:
            on_object(row)
    return rows


def _line(name: str, values: dict) -> str:
    return f"{name:34s}" + "".join(f" {values[s]:>13.2f}" for s in STAGES)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m training.vae_gaps", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="a checkpoint with a VAE")
    parser.add_argument("--data", required=True, help="dataset root; its val/ objects are used")
    parser.add_argument("--objects", type=int, default=4, help="held-out objects (default 4; ~3 min each on a CPU)")
    parser.add_argument("--steps", type=int, default=100, help="optimisation steps of each fit (default 100)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    print(f"{'PSNR over every target view (dB)':34s}" + "".join(f" {s:>13s}" for s in STAGES), flush=True)
    rows = gaps(args.ckpt, args.data, args.objects, args.steps, seed=args.seed,
                on_object=lambda r: print(_line(f"{r['object']} ({r['shape']})", r), flush=True))
    if rows:
        print(_line(f"mean of {len(rows)}", {s: sum(r[s] for r in rows) / len(rows) for s in STAGES}))


if __name__ == "__main__":
    main()

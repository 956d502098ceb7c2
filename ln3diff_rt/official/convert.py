"""Convert a released LN3Diff "joint" checkpoint into this project's checkpoint format, strictly.

    ln3diff convert official-t23d --ckpt model_joint_denoise_rec_model3910000.safetensors --out t23d.safetensors

A joint file holds the DiT under `ddpm_model.*` and the whole VAE under `rec_model.*`. Every key is
either loaded into the matching module (by name, and shape-checked) or dropped by name because
generation never reads it (`UNUSED_DIT_KEYS`, `UNUSED_DECODER_KEYS`, and the encoder
`rec_model.encoder.*`, which only reconstruction from images needs). Anything else (a missing
key, an unexpected one, a wrong shape) is an error naming it: the official loader skips
mismatches silently, its users' most reported failure. Sizes come from the tensors' shapes;
what shapes cannot tell (the VAE decoder's head count off the published width) comes from a flag.
`.pt` files are read with `torch.load(weights_only=True)`: no pickle code runs.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ln3diff_rt.checkpoint import CheckpointError, file_sha256, load_state, save_checkpoint
from ln3diff_rt.config import ModelConfig, official_config
from ln3diff_rt.official.dit import DIT_PREFIX, build_official_dit, dit_state_from_official, infer_dit_config
from ln3diff_rt.official.layers import triplane_pos_embed
from ln3diff_rt.official.vae import (
    DECODER_PREFIX,
    OfficialVAEDecoder,
    decoder_state_from_official,
    infer_vae_config,
)

KINDS = ("t23d", "i23d")
ENCODER_PREFIX = "rec_model.encoder."  # reconstruction only: not converted
# xformers' FusedMLP bias: a plain zero tensor there, so never trained; some builds may have saved it.
ZERO_MLP_BIAS = re.compile(r"(ddpm_model\.|rec_model\.decoder\.vit_decoder\.)blocks\.\d+\.mlp\.mlp\.[13]\.bias")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a .safetensors or .pt file (the latter without unpickling code), on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file: {e}") from e
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError, ... for bad files
        raise CheckpointError(f"{path}: not a weights-only torch checkpoint: {e}") from e
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise CheckpointError(f"{path}: expected a flat state dict of tensors (a joint model's state_dict)")
    return state


def split_joint_state(state: dict[str, torch.Tensor], path: Path) -> tuple[dict, dict]:
    """(DiT state, decoder state) with prefixes kept; refuses keys of neither, checks and drops the rest."""
    unexpected = [k for k in state if not k.startswith((DIT_PREFIX, DECODER_PREFIX, ENCODER_PREFIX))]
    if unexpected:
        raise CheckpointError(f"{path}: unexpected keys {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}: "
                              f"an LN3Diff joint model holds only {DIT_PREFIX}*, {DECODER_PREFIX}* and "
                              f"{ENCODER_PREFIX}*")
    for key in [k for k in state if ZERO_MLP_BIAS.fullmatch(k)]:
        if state[key].abs().max() != 0:
            raise CheckpointError(f"{path}: {key} is not zero; the official MLPs have no trained bias")
        del state[key]
    dit = {k: v for k, v in state.items() if k.startswith(DIT_PREFIX)}
    decoder = {k: v for k, v in state.items() if k.startswith(DECODER_PREFIX)}
    if not dit or not decoder:
        raise CheckpointError(f"{path}: no {DIT_PREFIX if not dit else DECODER_PREFIX}* keys; not a joint "
                              "LN3Diff model (both the DiT and the VAE are needed)")
    return dit, decoder


def convert(kind: str, ckpt: str | Path, out: str | Path, heads: int | None = None,
            vae_heads: int | None = None) -> ModelConfig:
    """Convert `ckpt` (a released joint model of `kind`) into a project checkpoint at `out`; returns its config."""
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}: expected one of {', '.join(f'official-{k}' for k in KINDS)}")
    ckpt = Path(ckpt)
    dit_state, decoder_state = split_joint_state(read_state_dict(ckpt), ckpt)
    dit_state = {k: v.float() for k, v in dit_state_from_official(dit_state).items()}  # release dtype unknown
    decoder_state = {k: v.float() for k, v in decoder_state_from_official(decoder_state).items()}
    try:
        dit_cfg = infer_dit_config({k: v.shape for k, v in dit_state.items()}, heads)
        vae_cfg = infer_vae_config({k: v.shape for k, v in decoder_state.items()}, vae_heads)
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{ckpt}: {e.args[0]}") from e
    if dit_cfg.kind != kind:
        raise CheckpointError(f"{ckpt}: holds an official-{dit_cfg.kind} DiT, not official-{kind}")
    with torch.device("meta"):
        dit, decoder = build_official_dit(dit_cfg), OfficialVAEDecoder(vae_cfg)
    for name, module, state in (("dit", dit, dit_state), ("vae", decoder, decoder_state)):
        load_state(module, state, ckpt, name, assign=True)
        _check_finite(module, ckpt, name)
    grid = dit_cfg.latent_size // dit_cfg.patch_size
    if not torch.allclose(dit.pos_embed[0], triplane_pos_embed(dit_cfg.width, grid), atol=1e-5):
        raise CheckpointError(f"{ckpt}: {DIT_PREFIX}pos_embed is not the frozen sin-cos table the official code "
                              "computes; the file is damaged or not an LN3Diff DiT")
    config = official_config(kind, dit_cfg, vae_cfg)
    save_checkpoint(out, config, {"vae": decoder, "dit": dit},
                    {"converted_from": ckpt.name, "converted_from_sha256": file_sha256(ckpt)})
    return config


def _check_finite(module: torch.nn.Module, path: Path, component: str) -> None:
    for name, tensor in module.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CheckpointError(f"{path}: {component} tensor {name} holds NaN or infinite values")

"""Model checkpoints: one safetensors file, the config as JSON in its metadata, never pickle.

Tensors are stored under a component prefix (`vae.`, `dit.`); metadata keys:
`format_version`, `ln3diff_rt.config` (ModelConfig JSON) and `ln3diff_rt.components`.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ln3diff_rt.config import ModelConfig

FORMAT_VERSION = "1"
CONFIG_KEY = "ln3diff_rt.config"
COMPONENTS_KEY = "ln3diff_rt.components"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and what is wrong."""


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str]) -> None:
    """Write to a temporary file in the same directory, fsync, then rename: a crash leaves the old file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_checkpoint(path: str | Path, config: ModelConfig, components: dict[str, torch.nn.Module | dict],
                    metadata: dict[str, str] | None = None) -> None:
    """Save modules (or state dicts) under their component names with the config in the metadata."""
    tensors = {}
    for name, module in components.items():
        state = module.state_dict() if isinstance(module, torch.nn.Module) else module
        tensors.update({f"{name}.{k}": v for k, v in state.items()})
    meta = {"format_version": FORMAT_VERSION, CONFIG_KEY: config.to_json(),
            COMPONENTS_KEY: ",".join(sorted(components))}
    meta.update(metadata or {})
    atomic_save_safetensors(tensors, path, meta)


def read_metadata(path: str | Path) -> dict[str, str]:
    """The safetensors metadata of `path`, with clear errors for missing, truncated or foreign files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors checkpoint (truncated or corrupt?): {e}") from e
    return meta


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu"
                    ) -> tuple[ModelConfig, dict[str, dict[str, torch.Tensor]], dict[str, str]]:
    """-> (config, {component: state_dict}, metadata), after checking format version and config."""
    path = Path(path)
    meta = read_metadata(path)
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {version!r}, this ln3diff_rt reads {FORMAT_VERSION!r}")
    if CONFIG_KEY not in meta:
        raise CheckpointError(f"{path}: metadata has no {CONFIG_KEY!r}; not an ln3diff_rt checkpoint")
    try:
        config = ModelConfig.from_json(meta[CONFIG_KEY])
    except (ValueError, TypeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: config in metadata does not match this version: {e}") from e
    states: dict[str, dict[str, torch.Tensor]] = {}
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            for key in f.keys():
                component, _, name = key.partition(".")
                states.setdefault(component, {})[name] = f.get_tensor(key)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: tensor data unreadable (truncated?): {e}") from e
    declared = set(filter(None, meta.get(COMPONENTS_KEY, "").split(",")))
    if declared != set(states):
        raise CheckpointError(f"{path}: metadata lists components {sorted(declared)} "
                              f"but the file holds {sorted(states)}")
    return config, states, meta


def load_state(module: torch.nn.Module, state: dict[str, torch.Tensor], path: str | Path, component: str,
               assign: bool = False) -> None:
    """Strict load with a message naming the file, the component and the first mismatches.

    `assign=True` adopts the tensors themselves: a module built on the meta device is then materialised
    without a second copy of its weights in memory (gpt-fast's way)."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        details = "; ".join(filter(None, [
            f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}" if missing else "",
            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}" if unexpected else "",
            f"shape mismatch {shapes[:3]}" if shapes else ""]))
        raise CheckpointError(f"{path}: component {component!r} does not match its config: {details}")
    module.load_state_dict(state, assign=assign)
    left = [name for name, t in (*module.named_parameters(), *module.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointError(f"{path}: component {component!r}: {left[:3]} were not loaded (still on meta)")


@dataclass
class Models:
    config: ModelConfig
    vae: torch.nn.Module | None
    dit: torch.nn.Module | None
    path: Path
    metadata: dict[str, str]
    image_encoder: torch.nn.Module | None = None  # the project's image conditioning, when the model has it


def load_models(path: str | Path, device: str | torch.device = "cpu", require: tuple[str, ...] = ()) -> Models:
    """Rebuild the VAE, DiT and image encoder stored in `path` (those present); `require` names components that
    must be there."""
    from ln3diff_rt.models.build import build_dit, build_image_encoder, build_vae

    path = Path(path)
    config, states, meta = load_checkpoint(path, device="cpu")
    for name in require:
        if name not in states:
            raise CheckpointError(f"{path}: has no {name!r} component (holds {sorted(states)})")
    built = {}
    for name, build in (("vae", build_vae), ("dit", build_dit), ("image_encoder", build_image_encoder)):
        if name in states:
            module = build(config)
            load_state(module, states[name], path, name)
            built[name] = module.to(device).eval()
    return Models(config, built.get("vae"), built.get("dit"), path, meta, built.get("image_encoder"))


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()

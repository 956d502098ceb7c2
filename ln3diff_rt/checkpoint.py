"""Model checkpoints: one safetensors file, the config as JSON in its metadata, never pickle.

Tensors are stored under a component prefix (`vae.`, `dit.`); metadata keys:
`format_version`, `ln3diff_rt.config` (ModelConfig JSON), `ln3diff_rt.components` and
`ln3diff_rt.tensor_sha256`, the sha256 of every tensor's stored bytes, which every writer records
(`atomic_save_safetensors`) and every reader checks, so a damaged copy is refused with the tensor
named. A checkpoint's digest (`Models.sha256`, what a server reports) covers its tensors, not the
file: sha256 of the `name dtype shape sha256` lines in name order, the same whatever the metadata.
Files written before digests load with the digest computed (`sha256_verified` False).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ln3diff_rt.config import ModelConfig

FORMAT_VERSION = "1"
CONFIG_KEY = "ln3diff_rt.config"
COMPONENTS_KEY = "ln3diff_rt.components"
TENSOR_SHA256_KEY = "ln3diff_rt.tensor_sha256"  # JSON {tensor name: sha256 hex of its stored bytes}


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and what is wrong."""


def tensor_sha256(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's bytes as safetensors stores them (C order, little-endian)."""
    data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
    return hashlib.sha256(memoryview(data)).hexdigest()


def checkpoint_sha256(tensors: dict[str, torch.Tensor], digests: dict[str, str]) -> str:
    """One digest for a file's tensors: sha256 of the `name dtype shape sha256` lines in name order."""
    lines = "".join(f"{k} {str(tensors[k].dtype).removeprefix('torch.')} {list(tensors[k].shape)} {digests[k]}\n"
                    for k in sorted(tensors))
    return hashlib.sha256(lines.encode()).hexdigest()


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str]) -> None:
    """Write to a temporary file in the same directory, fsync, then rename: a crash leaves the old file (and a
    `.NAME.*.tmp` that `remove_stale_temporaries` clears). Records every tensor's sha256 in the metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    metadata = {**metadata, TENSOR_SHA256_KEY: json.dumps({k: tensor_sha256(v) for k, v in tensors.items()})}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def remove_stale_temporaries(directory: str | Path) -> list[Path]:
    """Delete what saves killed between write and rename left in `directory` (`.NAME.safetensors.*.tmp`); returns
    them. Call it where no save is running, e.g. when a run starts."""
    stale = [p for p in Path(directory).glob(".*.safetensors.*.tmp") if _TEMPORARY.fullmatch(p.name)]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


_TEMPORARY = re.compile(r"\..+\.safetensors\.[A-Za-z0-9_]+\.tmp")  # tempfile.mkstemp's names in atomic_save


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


@dataclass
class TensorFile:
    """A safetensors file's tensors and metadata; `sha256` is the checkpoint digest, checked against the one
    recorded at write time (`verified`) or, for files written before digests, computed."""

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    sha256: str
    verified: bool


def read_tensor_file(path: str | Path, device: str | torch.device = "cpu") -> TensorFile:
    """Every tensor of `path`, each checked against its recorded sha256 (CheckpointError naming the first that
    differs)."""
    path = Path(path)
    meta = read_metadata(path)
    try:
        recorded = json.loads(meta[TENSOR_SHA256_KEY]) if TENSOR_SHA256_KEY in meta else None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: metadata {TENSOR_SHA256_KEY!r} is not valid JSON ({e}): damaged file") from e
    tensors, digests = {}, {}
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
                digests[key] = tensor_sha256(tensors[key])
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: tensor data unreadable (truncated?): {e}") from e
    if recorded is not None:
        if not isinstance(recorded, dict) or set(recorded) != set(digests):
            names = set(recorded) if isinstance(recorded, dict) else set()
            odd = sorted(names ^ set(digests))[:3]
            raise CheckpointError(f"{path}: the recorded sha256 digests do not list the file's tensors ({odd} on "
                                  "one side only): damaged or edited file")
        for key in sorted(digests):
            if digests[key] != recorded[key]:
                raise CheckpointError(f"{path}: tensor {key}: sha256 {digests[key][:16]}... differs from the "
                                      f"{str(recorded[key])[:16]}... recorded when the file was written: the file is "
                                      "damaged (a bad copy or disk); fetch or copy it again")
    return TensorFile(tensors, meta, checkpoint_sha256(tensors, digests), recorded is not None)


def read_config(path: str | Path) -> tuple[ModelConfig, dict[str, str]]:
    """The config and metadata of a checkpoint, after checking its format version (reads the header only)."""
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
    return config, meta


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu"
                    ) -> tuple[ModelConfig, dict[str, dict[str, torch.Tensor]], TensorFile]:
    """-> (config, {component: state_dict}, the file), after checking format version, config and digests."""
    config, meta = read_config(path)
    file = read_tensor_file(path, device)
    return config, _components(Path(path), file), file


def _declared(meta: dict[str, str]) -> set[str]:
    return set(filter(None, meta.get(COMPONENTS_KEY, "").split(",")))


def _components(path: Path, file: TensorFile) -> dict[str, dict[str, torch.Tensor]]:
    """{component: state_dict} from the tensors' prefixes, which must be the components the metadata lists."""
    states: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in file.tensors.items():
        component, _, name = key.partition(".")
        states.setdefault(component, {})[name] = tensor
    declared = _declared(file.metadata)
    if declared != set(states):
        raise CheckpointError(f"{path}: metadata lists components {sorted(declared)} "
                              f"but the file holds {sorted(states)}")
    return states


def load_state(module: torch.nn.Module, state: dict[str, torch.Tensor], path: str | Path, component: str,
               assign: bool = False) -> None:
    """Strict load with a message naming the file, the component and the first mismatches (names, shapes and
    dtypes), and the first tensor holding NaN or infinite values.

    `assign=True` adopts the tensors themselves: a module built on the meta device is then materialised
    without a second copy of its weights in memory (gpt-fast's way)."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    dtypes = [f"{k}: file {state[k].dtype} vs model {own[k].dtype}"
              for k in own if k in state and state[k].dtype != own[k].dtype]
    if missing or unexpected or shapes or dtypes:
        details = "; ".join(filter(None, [
            f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}" if missing else "",
            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}" if unexpected else "",
            f"shape mismatch {shapes[:3]}" if shapes else "",
            f"dtype mismatch {dtypes[:3]}" if dtypes else ""]))
        raise CheckpointError(f"{path}: component {component!r} does not match its config: {details}")
    for name, tensor in state.items():  # a finite sum (one cheap pass) means every element is finite
        if tensor.is_floating_point() and not torch.isfinite(tensor.sum()) and not torch.isfinite(tensor).all():
            raise CheckpointError(f"{path}: {component} tensor {name} holds NaN or infinite values")
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
    sha256: str = ""  # the checkpoint digest of its tensors (see the module docstring)
    sha256_verified: bool = False  # checked against the digest recorded when the file was written


def load_models(path: str | Path, device: str | torch.device = "cpu", require: tuple[str, ...] = ()) -> Models:
    """Rebuild the VAE, DiT and image encoder stored in `path` (those present); `require` names components that
    must be there."""
    from ln3diff_rt.models.build import build_dit, build_image_encoder, build_vae

    path = Path(path)
    config, meta = read_config(path)
    declared = _declared(meta)
    for name in require:
        if name not in declared:
            raise CheckpointError(f"{path}: has no {name!r} component (holds {sorted(declared)})")
    with ThreadPoolExecutor(1) as pool:  # the file is read and its digests checked while the modules are built
        reading = pool.submit(read_tensor_file, path)
        built = {name: build(config) for name, build in (("vae", build_vae), ("dit", build_dit),
                                                          ("image_encoder", build_image_encoder)) if name in declared}
        file = reading.result()
    states = _components(path, file)
    for name, module in built.items():
        load_state(module, states[name], path, name)
        built[name] = module.to(device).eval()
    return Models(config, built.get("vae"), built.get("dit"), path, file.metadata, built.get("image_encoder"),
                  file.sha256, file.verified)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()

"""What both training stages share: torchrun/DDP setup, resumable training state, logs, how a run ends.

Exact resume by construction: every random draw of step s comes from generators seeded with
(seed, s, rank), and the data order is a function of (seed, epoch), so the saved state is just
the weights, the optimizer state and the step.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from ln3diff_rt.checkpoint import CheckpointError, atomic_save_safetensors, read_tensor_file
from ln3diff_rt.config import ModelConfig
from training.data.dataset import DatasetError


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def device(self, requested: str) -> str:
        """This process's device: "cuda" means the GPU of its local rank (one GPU per torchrun process)."""
        return f"cuda:{self.local_rank}" if requested == "cuda" else requested


def setup_distributed(device: str) -> Dist:
    """Join the process group when launched by torchrun (gloo on CPU, nccl on GPU)."""
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) == 1:
        return Dist()
    backend = "nccl" if device.startswith("cuda") else "gloo"
    dist.init_process_group(backend)
    local = int(os.environ.get("LOCAL_RANK", 0))
    if backend == "nccl":
        torch.cuda.set_device(local)
    return Dist(dist.get_rank(), dist.get_world_size(), local)


class Terminated(KeyboardInterrupt):
    """SIGTERM (kill, schedulers, torchrun shutting down), raised like Ctrl-C so that the loop saves its state."""

    def __init__(self, signum: int):
        super().__init__(f"signal {signum}")
        self.signum = signum


@contextlib.contextmanager
def distributed_teardown() -> Iterator[None]:
    """What a training entry point runs inside: leave the process group cleanly, and end as a user can act on.

    A user's error (bad data, nothing to resume, a damaged checkpoint, a full disk: DatasetError, ValueError,
    OSError) ends as one line on stderr and exit code 1, an interrupt (Ctrl-C, SIGTERM) as one line and exit
    code 128 + the signal; the notes the loop adds (where it saved the state) go on that line. Anything else
    is a bug and keeps its traceback.

    Without the teardown, a rank that exits while gloo's threads are still alive can abort with
    "terminate called without an active exception" (SIGABRT) after training has succeeded.
    The barrier is only taken on success: after an error the other ranks may never reach it.
    """
    try:
        yield
    except BaseException as e:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        if isinstance(e, KeyboardInterrupt):
            print(_one_line("interrupted", e), file=sys.stderr)
            raise SystemExit(128 + getattr(e, "signum", signal.SIGINT)) from None
        if isinstance(e, (DatasetError, ValueError, OSError)):
            raise SystemExit(_one_line("error", e)) from None
        raise
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def step_generator(seed: int, step: int, rank: int, device: str = "cpu") -> torch.Generator:
    """The generator for all random draws of one step on one rank."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + step) * 1009 + rank)
    return g


def batch_indices(num_items: int, batch_size: int, step: int, seed: int, rank: int, world: int) -> list[int]:
    """Object indices for `step` on `rank`: each epoch is a seeded permutation, split across ranks."""
    global_batch = batch_size * world
    per_epoch = max(1, num_items // global_batch)
    epoch, pos = divmod(step, per_epoch)
    g = torch.Generator()
    g.manual_seed(seed * 7919 + epoch)
    perm = torch.randperm(num_items, generator=g)
    start = pos * global_batch
    chunk = perm[start:start + global_batch]
    if len(chunk) < global_batch:  # fewer items than one global batch: wrap around
        chunk = perm.repeat(global_batch // num_items + 1)[:global_batch]
    return chunk[rank::world].tolist()


def save_train_state(path: Path, config: ModelConfig, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                     step: int, extra: dict) -> None:
    """Weights + optimizer state + step in one safetensors file, written atomically."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    opt = optimizer.state_dict()
    for idx, state in opt["state"].items():
        for key, value in state.items():
            tensors[f"optim.{idx}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    meta = {"format_version": "1", "kind": "train_state", "ln3diff_rt.config": config.to_json(), "step": str(step),
            "param_groups": json.dumps(opt["param_groups"]), "extra": json.dumps(extra)}
    atomic_save_safetensors(tensors, path, meta)


def load_train_state(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[int, dict]:
    """Restore what `save_train_state` wrote (its tensors' digests checked); returns (step, extra)."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no training state to resume from; leave out --resume to start afresh")
    file = read_tensor_file(path)
    meta = file.metadata
    if meta.get("kind") != "train_state":
        raise CheckpointError(f"{path}: not a training state file (kind={meta.get('kind')!r})")
    model_state, optim_state = {}, {}
    for key, tensor in file.tensors.items():
        group, _, name = key.partition(".")
        if group == "model":
            model_state[name] = tensor
        else:
            idx, _, field = name.partition(".")
            optim_state.setdefault(int(idx), {})[field] = tensor
    model.load_state_dict(model_state)
    optimizer.load_state_dict({"state": optim_state, "param_groups": json.loads(meta["param_groups"])})
    return int(meta["step"]), json.loads(meta["extra"])


class JsonlLog:
    """Append-only JSONL log (rank 0 only); each record gets wall time since the run started."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled, self.start = path, enabled, time.time()
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, **record) -> None:
        if self.enabled:
            record["time"] = round(time.time() - self.start, 3)
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def replica_divergence(model: torch.nn.Module, world: int) -> float:
    """Largest absolute difference between any replica's weights and rank 0's (0.0 when DDP kept them equal)."""
    if world == 1:
        return 0.0
    flat = torch.cat([p.detach().flatten().float() for p in model.parameters()])
    reference = flat.clone()
    dist.broadcast(reference, src=0)
    diff = (flat - reference).abs().max()
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return diff.item()


class Interrupts:
    """SIGTERM (and Ctrl-C, where it is not ignored, as under nohup) raise `Terminated` in the main thread, so the
    loop saves its state; inside `held()` the signal waits and is raised when the block ends, so an optimizer
    update is never cut in half (its weights would belong to no step, with nothing to save). `restore()` puts the
    previous handlers back."""

    def __init__(self):
        self.holding, self.pending, self._previous = False, None, {}
        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            return
        for signum in (signal.SIGTERM, signal.SIGINT):
            if signum == signal.SIGINT and signal.getsignal(signum) is not signal.default_int_handler:
                continue  # ignored (nohup) or someone else's: leave it
            self._previous[signum] = signal.signal(signum, self._handler)

    def _handler(self, signum, frame):
        if self.holding:
            self.pending = signum
        else:
            raise Terminated(signum)

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        self.holding = True
        try:
            yield
        finally:
            self.holding = False
        if self.pending is not None:
            signum, self.pending = self.pending, None
            raise Terminated(signum)

    def restore(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)


def _one_line(kind: str, e: BaseException) -> str:
    """`kind: message; note; note` on one line (the notes say what the loop saved)."""
    text = "; ".join(filter(None, [str(e), *getattr(e, "__notes__", ())]))
    return " ".join(f"{kind}: {text}".split()) if text else kind


def warmup_cosine_lr(peak: float, step: int, warmup: int, steps: int) -> float:
    """Linear warm-up to `peak`, then cosine decay to 10% of it at `steps` (both stages use this schedule)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))

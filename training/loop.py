"""The training loop both stages run, written once (nanoGPT's train.py loop with the stage plugged in).

A stage (training.vae, training.diffusion) builds its data, model and objective and hands them over
as a `Stage`; `run` does the rest the same way for both: resume, DDP, warm-up + cosine learning
rate, gradient clipping, JSONL log and progress bar, periodic evaluation, state saves every few
seconds and when an interrupt (Ctrl-C or SIGTERM) or an error stops it, the replica check and the final
state. Temporary files of a save killed half-way are removed when a run starts.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ln3diff_rt.checkpoint import remove_stale_temporaries
from ln3diff_rt.config import ModelConfig
from training.common import (
    Dist,
    Interrupts,
    JsonlLog,
    batch_indices,
    load_train_state,
    replica_divergence,
    save_train_state,
    step_generator,
    warmup_cosine_lr,
)


class LoopConfig(Protocol):
    """The fields of a stage's training config (a frozen dataclass) that the loop reads."""

    __dataclass_fields__: ClassVar[dict[str, Any]]

    @property
    def out(self) -> str: ...  # run directory: train_state.safetensors and log.jsonl
    @property
    def steps(self) -> int: ...
    @property
    def batch_size(self) -> int: ...  # items per step per process
    @property
    def lr(self) -> float: ...  # peak learning rate
    @property
    def warmup(self) -> int: ...
    @property
    def eval_every(self) -> int: ...
    @property
    def save_every(self) -> float: ...  # seconds
    @property
    def seed(self) -> int: ...
    @property
    def resume(self) -> bool: ...


@dataclass
class Stage:
    """What one training stage plugs into the loop."""

    name: str  # progress-bar label
    config: ModelConfig  # stored in the training state beside the weights
    model: nn.Module  # the optimised weights: gradients are clipped and replicas compared on these
    state: nn.Module  # all the training state holds: `model`, plus its EMA where there is one
    objective: nn.Module  # forward(*batch, generator) -> (loss, {name: detached part to log}); DDP wraps it
    optimizer: torch.optim.Optimizer  # a param group's own "peak_lr", where it has one, replaces cfg.lr for it
    num_items: int  # training items the batch indices are drawn from
    batch: Callable[[list[int], int, torch.Generator], tuple]  # (item indices, step, generator) -> objective inputs
    finish: Callable[[int], dict]  # rank 0 after the last step: write the model; returns extra `done` fields
    evaluate: Callable[[], tuple[dict, str]] | None = None  # rank 0: (`eval` record fields, console line)
    after_step: Callable[[], None] | None = None  # after each optimizer step (the diffusion stage's EMA)
    info: dict = field(default_factory=dict)  # extra fields of the `start` record


def run(cfg: LoopConfig, stage: Stage, dist_env: Dist) -> int:
    """Train from step 0 (or the saved step when cfg.resume) to cfg.steps; returns the last step.

    Every random draw of a step comes from `step_generator(seed, step, rank)` and the data order
    from `batch_indices`, so a resumed run repeats the uninterrupted one exactly. An interrupt or an error
    after a completed step saves the state first and says so in a note on the exception.
    """
    out = Path(cfg.out)
    state_path = out / "train_state.safetensors"
    if dist_env.main:
        remove_stale_temporaries(out)
    step = start = load_train_state(state_path, stage.state, stage.optimizer)[0] if cfg.resume else 0
    wrapped = DistributedDataParallel(stage.objective) if dist_env.world > 1 else stage.objective
    log = JsonlLog(out / "log.jsonl", dist_env.main)
    log.write(event="start", step=step, config=dataclasses.asdict(cfg), world=dist_env.world, **stage.info)

    def save(step: int) -> None:
        if dist_env.main:
            save_train_state(state_path, stage.config, stage.state, stage.optimizer, step,
                             {"train_config": dataclasses.asdict(cfg)})

    interrupts = Interrupts()
    last_save = time.time()
    bar = tqdm(total=cfg.steps, initial=step, disable=not dist_env.main, desc=stage.name, dynamic_ncols=True)
    updating = False
    try:
        while step < cfg.steps:
            t0 = time.time()
            g = step_generator(cfg.seed, step, dist_env.rank)
            idx = batch_indices(stage.num_items, cfg.batch_size, step, cfg.seed, dist_env.rank, dist_env.world)
            batch = stage.batch(idx, step, g)
            for group in stage.optimizer.param_groups:
                group["lr"] = warmup_cosine_lr(group.get("peak_lr", cfg.lr), step, cfg.warmup, cfg.steps)
            loss, parts = wrapped(*batch, g)
            stage.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(stage.model.parameters(), 1.0)
            updating = True  # the weights belong to no step until step += 1: a signal waits, an error saves nothing
            with interrupts.held():
                stage.optimizer.step()
                if stage.after_step is not None:
                    stage.after_step()
                step += 1
                updating = False
            record = {k: round(v.item(), 5) for k, v in parts.items()}
            record.update(loss=round(loss.item(), 5), grad_norm=round(grad_norm.item(), 4),
                          lr=stage.optimizer.param_groups[0]["lr"], steps_per_s=round(1.0 / (time.time() - t0), 3))
            log.write(event="train", step=step, **record)
            bar.update(1)
            bar.set_postfix({k: f"{record[k]:.4f}" for k in ("loss", *parts)})
            if dist_env.main and stage.evaluate is not None and (step % cfg.eval_every == 0 or step == cfg.steps):
                fields, line = stage.evaluate()
                log.write(event="eval", step=step, **fields)
                bar.write(f"step {step}: {line}")
            if time.time() - last_save > cfg.save_every:
                save(step)
                last_save = time.time()
    except (KeyboardInterrupt, Exception) as e:  # keep what the completed steps did; the entry point reports
        bar.close()
        if dist_env.main and updating:
            e.add_note(f"state not saved: the error came inside the optimizer update of step {step + 1}")
        elif dist_env.main and step > start:
            save(step)
            e.add_note(f"state at step {step} saved to {state_path}; continue with --resume")
        elif dist_env.main:
            e.add_note(f"no step completed since step {start}: nothing new to save")
        raise
    finally:
        interrupts.restore()
    bar.close()
    save(step)
    divergence = replica_divergence(stage.model, dist_env.world)  # collective: every rank calls it
    if dist_env.main:
        done = stage.finish(step)
        log.write(event="done", step=step, world=dist_env.world, replica_divergence=divergence, **done)
    return step

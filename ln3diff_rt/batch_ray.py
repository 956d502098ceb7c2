"""`ln3diff batch --ray ADDRESS`: the batch's items on Ray Data, one model per worker, one worker per device.

Each worker (an actor of `map_batches`) loads the model once and runs `batch.generate_items` on the
batches it is handed, writing the files into OUT itself, so OUT must be a folder every worker sees (a local
disk in local mode, a shared mount on a cluster). The driver appends each returned record to the
manifest as its batch finishes, so a kill loses only the batches in flight. Needs the cluster extra.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

from ln3diff_rt.batch import Item, ModelSpec, generate_items


class BatchWorker:
    """A Ray Data actor: one loaded model; a batch of item rows in, their manifest records (JSON) out."""

    def __init__(self, model: ModelSpec, overrides: dict, formats: tuple[str, ...], out_dir: str, settings: dict):
        self.generator = model.load()
        self.overrides, self.formats, self.out_dir, self.settings = overrides, formats, out_dir, settings

    def __call__(self, rows: dict) -> dict:
        items = [Item(int(i), str(p), int(s), str(m) or None)  # "" for no image: a None column turns into NaN
                 for i, p, s, m in zip(rows["index"], rows["prompt"], rows["seed"], rows["image"], strict=True)]
        records = generate_items(self.generator, items, self.overrides, self.formats, self.out_dir, self.settings,
                                 len(items))
        return {"record": [json.dumps(r, ensure_ascii=False) for r in records]}


def generate_on_ray(address: str, items: list[Item], model: ModelSpec, overrides: dict, formats: tuple[str, ...],
                    out_dir: Path, settings: dict, batch_size: int, workers: int | None = None) -> Iterator[dict]:
    """Manifest records of `items`, made by `workers` actors (default: one per GPU of the cluster when the model
    runs on CUDA, else one), each taking batches of `batch_size`; records arrive as batches finish."""
    import ray

    if not ray.is_initialized():
        ray.init(address=None if address == "local" else address)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    on_gpu = model.device.startswith("cuda") or (model.device == "auto" and gpus > 0)
    if on_gpu and gpus == 0:
        raise ValueError(f"--device {model.device}: the Ray cluster has no GPU")
    workers = workers or (gpus if on_gpu else 1)
    rows = [{**asdict(item), "image": item.image or ""} for item in items]
    dataset = ray.data.from_items(rows, override_num_blocks=math.ceil(len(rows) / batch_size))
    records = dataset.map_batches(
        BatchWorker, fn_constructor_kwargs=dict(model=model, overrides=overrides, formats=formats,
                                                out_dir=str(out_dir), settings=settings),
        batch_size=batch_size, batch_format="numpy", concurrency=workers, num_gpus=1 if on_gpu else 0, num_cpus=1)
    for row in records.iter_rows():
        yield json.loads(row["record"])

"""Offline batch generation: a list of prompts (text, JSONL or Parquet) -> assets in a folder, with a manifest.

Every item goes through `runner.run`, in batches of `batch_size` requests with the same settings. Each
finished item appends one line to `OUT/manifest.jsonl` (prompt, seed, image, files with size and sha256,
mesh counts, timings), flushed and fsynced after its files are written: a crash or a kill loses only the
items in progress. A rerun skips every item whose record is there and whose files still exist; an item is
known by its key (position in the list, prompt, seed, image), so editing or moving a line makes it new. At
the end the manifest is also written as `manifest.parquet` when pyarrow is installed. A rerun first rewrites
the manifest without the records it will redo, so each item has one record.

Items without a seed get `seed + index` (default seed 0), so a rerun makes the same objects. In one process
by default; `ln3diff_rt.batch_ray` spreads the batches over the devices of a Ray cluster with Ray Data.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from ln3diff_rt.checkpoint import file_sha256
from ln3diff_rt.options import SEED, GenerationOptions, InvalidOption
from ln3diff_rt.pipeline import Generator
from ln3diff_rt.runner import Request, run

MANIFEST = "manifest.jsonl"
MANIFEST_PARQUET = "manifest.parquet"
JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet", ".pq")
ITEM_FIELDS = ("prompt", "seed", "image")


class BatchInputError(ValueError):
    """A list file, one of its lines, or an output folder that cannot be used; the message names it."""


@dataclass(frozen=True)
class Item:
    """One object to make: its position in the list, prompt, seed and condition image (a path, or None)."""

    index: int
    prompt: str
    seed: int
    image: str | None = None

    @property
    def key(self) -> str:
        """What a finished item is recognised by on a rerun: position, prompt, seed and image."""
        digest = hashlib.sha256(f"{self.prompt}\0{self.seed}\0{self.image or ''}".encode()).hexdigest()[:16]
        return f"{self.index}-{digest}"


# -- reading the list -------------------------------------------------------------------------------------


def read_items(path: str | Path, seed: int = 0) -> list[Item]:
    """The items of a list file: one prompt per line (text), one {"prompt", "seed", "image"} object per line
    (.jsonl), or a table with those columns (.parquet). BatchInputError names the file and line of a bad one."""
    path = Path(path)
    if not path.is_file():
        raise BatchInputError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix in PARQUET_SUFFIXES:
        rows = _parquet_rows(path)
    elif suffix in JSONL_SUFFIXES:
        rows = _jsonl_rows(path)
    else:
        rows = _text_rows(path)
    items, seen = [], {}
    for index, (where, row) in enumerate(rows):
        item = _item(path, where, index, row, seed)
        twin = seen.setdefault((item.prompt, item.seed), (where, item))
        if twin[1].image != item.image:  # the same prompt and seed name the same files
            raise BatchInputError(f"{where}: same prompt and seed as {twin[0]} with another image; give one a seed")
        items.append(item)
    if not items:
        raise BatchInputError(f"{path}: no prompts in it")
    return items


def _text_rows(path: Path) -> Iterator[tuple[str, dict]]:
    for number, line in enumerate(_read_text(path).splitlines(), 1):
        if line.strip():
            yield f"{path}:{number}", {"prompt": line.strip()}


def _jsonl_rows(path: Path) -> Iterator[tuple[str, dict]]:
    for number, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise BatchInputError(f"{where}: not JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict):
            raise BatchInputError(f"{where}: expected an object like {{\"prompt\": \"a red cube\", \"seed\": 7}}")
        yield where, row


def _parquet_rows(path: Path) -> Iterator[tuple[str, dict]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise BatchInputError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow, or the cluster "
                              "extra); or give a .jsonl or text list") from None
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow's errors have no common base worth naming
        raise BatchInputError(f"{path}: not a Parquet file ({e})") from None
    for number, row in enumerate(table.to_pylist(), 1):
        yield f"{path}: row {number}", {k: v for k, v in row.items() if v is not None}


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise BatchInputError(f"{path}: not UTF-8 text (byte {e.start}); give a text, .jsonl or .parquet list") \
            from None


def _item(path: Path, where: str, index: int, row: dict, seed: int) -> Item:
    unknown = sorted(set(row) - set(ITEM_FIELDS))
    if unknown:
        raise BatchInputError(f"{where}: unknown field {unknown[0]!r}; expected some of {', '.join(ITEM_FIELDS)}")
    prompt, image = row.get("prompt", ""), row.get("image")
    if not isinstance(prompt, str):
        raise BatchInputError(f"{where}: prompt={prompt!r}: expected a string")
    if image is not None:
        if not isinstance(image, str) or not image:
            raise BatchInputError(f"{where}: image={image!r}: expected a file path")
        file = path.parent / image  # relative paths are relative to the list
        if not file.is_file():
            raise BatchInputError(f"{where}: image {image}: no such file ({file})")
        image = str(file.resolve())
    if not prompt.strip() and image is None:
        raise BatchInputError(f"{where}: no prompt and no image: give a description, e.g. \"a red cube\"")
    value = row.get("seed", seed + index)
    try:
        SEED.check("seed", value)
    except InvalidOption as e:
        raise BatchInputError(f"{where}: {e}") from None
    return Item(index, prompt.strip(), value, image)


# -- the manifest ---------------------------------------------------------------------------------------------


class Manifest:
    """OUT/manifest.jsonl: one record per finished item, appended and synced as each one finishes."""

    def __init__(self, out_dir: str | Path):
        self.out = Path(out_dir)
        self.path = self.out / MANIFEST

    def records(self) -> list[dict]:
        """The records on disk; a last line cut short by a crash is ignored."""
        if not self.path.is_file():
            return []
        lines = self.path.read_text(encoding="utf-8").splitlines()
        records = []
        for number, line in enumerate(lines, 1):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if number < len(lines):
                    raise BatchInputError(f"{self.path}:{number}: not JSON; the manifest was edited or damaged") \
                        from None
        return records

    def finished(self, settings: dict) -> dict[str, dict]:
        """Key -> record of the items done with these `settings` whose files are all still there (the last
        record of a key counts).

        BatchInputError when the manifest was written with other settings: those assets are not these."""
        done = {}
        for record in self.records():
            if record.get("settings") != settings:
                raise BatchInputError(f"{self.path}: written with other settings ({record.get('settings')}, now "
                                      f"{settings}); use another --out, or the same settings to resume")
            if all((self.out / f["path"]).is_file() for f in record["files"]):
                done[record["key"]] = record
        return done

    def keep(self, records: Iterable[dict]) -> None:
        """Rewrite the manifest with only `records` (a temporary file, then renamed): what a crash cut short
        or what is to be made again goes, so each item has one record."""
        temporary = self.out / f".{MANIFEST}.tmp"
        with open(temporary, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, self.path)

    def append(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def write_parquet(self) -> Path | None:
        """The records as OUT/manifest.parquet (written to a temporary file, then renamed), if pyarrow is here."""
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            return None
        rows = [{**r, "timings": json.dumps(r["timings"]), "options": json.dumps(r["options"]),
                 "settings": json.dumps(r["settings"])} for r in self.records()]
        target, temporary = self.out / MANIFEST_PARQUET, self.out / f".{MANIFEST_PARQUET}.tmp"
        pq.write_table(pa.Table.from_pylist(rows), temporary)
        os.replace(temporary, target)
        return target


# -- generating -----------------------------------------------------------------------------------------------


def batch_options(generator: Generator, overrides: dict) -> GenerationOptions:
    """The model's default options with the given fields replaced, validated."""
    return generator.default_options().replace(**overrides).validate()


def generate_items(generator: Generator, items: list[Item], overrides: dict, formats: tuple[str, ...],
                   out_dir: str | Path, settings: dict, batch_size: int, object_threads: int | None = None
                   ) -> Iterator[dict]:
    """Make `items` in batches of `batch_size` through `runner.run` (`object_threads`: its default, see
    `runner.object_threads_for`), write each item's files to `out_dir` as soon as it is made and yield its
    manifest record."""
    from ln3diff_rt.images import ImageError, read_image
    from ln3diff_rt.outputs import write_result

    options, out = batch_options(generator, overrides), Path(out_dir)
    worker = f"{socket.gethostname()}:{os.getpid()}:{generator.device}"
    for start in range(0, len(items), batch_size):
        chunk, began = items[start:start + batch_size], time.perf_counter()
        try:
            images = [None if item.image is None else read_image(item.image) for item in chunk]
        except ImageError as e:
            raise BatchInputError(str(e)) from None
        requests = [Request(item.prompt, item.seed, options, formats, image=image)
                    for item, image in zip(chunk, images, strict=True)]
        for result in run(generator, requests, object_threads=object_threads):
            item, mesh = chunk[result.index], result.mesh
            files = [{"path": path.name, "bytes": path.stat().st_size, "sha256": file_sha256(path)}
                     for path in write_result(result, out)]
            empty = mesh is None or mesh.empty
            yield {"key": item.key, **asdict(item), "files": files, "mesh_empty": mesh is not None and mesh.empty,
                   "vertices": 0 if empty else len(mesh.vertices), "faces": 0 if empty else len(mesh.faces),
                   "timings": {**result.timings, "wall": time.perf_counter() - began}, "batch_size": len(chunk),
                   "options": asdict(options), "settings": settings, "worker": worker,
                   "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def record_all(manifest: Manifest, records: Iterable[dict], on_record=None) -> int:
    """Append each record to the manifest as it arrives; returns how many."""
    count = 0
    for record in records:
        manifest.append(record)
        count += 1
        if on_record is not None:
            on_record(record)
    return count


@dataclass(frozen=True)
class ModelSpec:
    """How each worker loads the model (Generator.from_checkpoint's arguments)."""

    ckpt: str | None = None
    device: str = "cpu"
    backend: str = "eager"
    engine: str | None = None
    text_encoder: str | None = None
    precision: str = "fp32"

    def load(self) -> Generator:
        device = self.device
        if device == "auto":
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        return Generator.from_checkpoint(self.ckpt, device, self.backend, self.engine, text_encoder=self.text_encoder,
                                         precision=self.precision)


@dataclass
class Summary:
    total: int  # items in the list
    skipped: int  # already in the manifest
    made: int  # made by this run
    seconds: float
    manifest: Path
    parquet: Path | None


def run_batch(list_path: str | Path, out_dir: str | Path, model: ModelSpec, overrides: dict,
              formats: tuple[str, ...], seed: int = 0, batch_size: int = 4, ray: str | None = None,
              workers: int | None = None, on_plan=None, on_record=None, object_threads: int | None = None
              ) -> Summary:
    """Make every item of the list not yet in OUT's manifest: in this process, or on the Ray cluster at `ray`
    ('local' starts one here). `on_plan(total, skipped)` before the work, `on_record(record)` per item."""
    from ln3diff_rt.outputs import check_out_dir
    from ln3diff_rt.pipeline import DEFAULT_CHECKPOINT

    if batch_size < 1:
        raise BatchInputError(f"--batch-size {batch_size}: expected at least 1")
    if object_threads is not None and object_threads < 1:
        raise BatchInputError(f"--object-threads {object_threads}: expected at least 1")
    start = time.perf_counter()
    items = read_items(list_path, seed)
    GenerationOptions().replace(**overrides).validate()  # bad flags fail before any work
    out = check_out_dir(out_dir)
    ckpt = Path(model.ckpt) if model.ckpt else DEFAULT_CHECKPOINT
    if not ckpt.is_file():
        raise BatchInputError(f"--ckpt {ckpt}: no such file")
    settings = {"checkpoint_sha256": file_sha256(ckpt), "options": overrides, "formats": list(formats)}
    manifest = Manifest(out)
    done = manifest.finished(settings)
    manifest.keep(done.values())
    todo = [item for item in items if item.key not in done]
    if on_plan is not None:
        on_plan(len(items), len(items) - len(todo))
    if not todo:
        records = iter(())
    elif ray is not None:
        from ln3diff_rt.batch_ray import generate_on_ray

        records = generate_on_ray(ray, todo, model, overrides, formats, out, settings, batch_size, workers)
    else:
        records = generate_items(model.load(), todo, overrides, formats, out, settings, batch_size, object_threads)
    made = record_all(manifest, records, on_record)
    return Summary(len(items), len(items) - len(todo), made, time.perf_counter() - start, manifest.path,
                   manifest.write_parquet())

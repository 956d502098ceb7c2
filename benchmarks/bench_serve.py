"""Loopback load test of the gRPC server: micro-batching on (max batch 8) vs off (max batch 1).

Workload: `--clients` threads (default 8) each send Generate requests back to back, `--requests`
in all per mode, all with the same sampling settings (8 Euler steps, CFG 3, so batchable), four
distinct prompts, fresh seeds, no mesh and no previews (skip_mesh, preview_views 0): what is timed
is admission, text encoding (cached), sampling, decoding and streaming, and sampling dominates.
Server and clients share this process, on the loopback interface; latency is per request, from
the call to the final message. The modes alternate over `--rounds` so that drifting background
load hits both alike; the per-round ratios show how much that load moves the result. The tiny
preset's cost does not depend on its weights, so without a checkpoint a random-weight one is made.

    python benchmarks/bench_serve.py [--ckpt PATH] [--clients 8] [--requests 96] [--rounds 3] [--json [PATH]]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ln3diff_rt.pipeline import DEFAULT_CHECKPOINT, Generator
from ln3diff_rt.random_weights import random_checkpoint
from serve.client import Client
from serve.server import ServerConfig, ServerThread

PROMPTS = ["a red cube", "a wooden chair", "a blue vase", "a small house"]
WORKLOAD = dict(steps=8, guidance=3.0, skip_mesh=True, preview_views=0)


def load(generator: Generator, clients: int, requests: int, max_batch: int, max_wait_ms: float,
         timeout: float) -> tuple[float, list[float], list[int]]:
    """(wall seconds, latencies in seconds, batch sizes) of `requests` Generate calls from `clients` threads."""
    server = ServerThread(lambda: generator, ServerConfig(port=0, max_batch=max_batch, max_wait_ms=max_wait_ms,
                                                          max_queue=4 * clients)).wait_serving()
    try:
        with Client(f"127.0.0.1:{server.port}") as client:
            def one(i: int) -> tuple[float, int]:
                t = time.perf_counter()
                result = client.generate(PROMPTS[i % len(PROMPTS)], seed=i + 1, timeout=timeout, **WORKLOAD).result
                return time.perf_counter() - t, result.batch_size

            with concurrent.futures.ThreadPoolExecutor(clients) as pool:
                list(pool.map(one, range(clients)))  # warm-up: one round, not timed
                start = time.perf_counter()
                outcomes = list(pool.map(one, range(clients, clients + requests)))
                wall = time.perf_counter() - start
    finally:
        server.stop()
    return wall, [o[0] for o in outcomes], [o[1] for o in outcomes]


def summary(runs: list[tuple[float, list[float], list[int]]]) -> dict:
    latency = np.concatenate([r[1] for r in runs]) * 1e3
    return {"requests": len(latency), "seconds": sum(r[0] for r in runs),
            "throughput_rps": len(latency) / sum(r[0] for r in runs),
            "p50_ms": float(np.percentile(latency, 50)), "p95_ms": float(np.percentile(latency, 95)),
            "p99_ms": float(np.percentile(latency, 99)), "mean_batch": float(np.mean([b for r in runs for b in r[2]]))}


def print_table(off: dict, on: dict) -> None:
    print(f"{'case':<22} {'batching off':>13} {'batching on':>13} {'ratio':>7}")
    rows = [("throughput req/s", "throughput_rps", on["throughput_rps"] / off["throughput_rps"]),
            ("latency p50 ms", "p50_ms", off["p50_ms"] / on["p50_ms"]),
            ("latency p95 ms", "p95_ms", off["p95_ms"] / on["p95_ms"]),
            ("latency p99 ms", "p99_ms", off["p99_ms"] / on["p99_ms"]),
            ("mean batch size", "mean_batch", on["mean_batch"] / off["mean_batch"])]
    for name, key, ratio in rows:
        print(f"{name:<22} {off[key]:>13.2f} {on[key]:>13.2f} {ratio:>6.2f}x")
    print("ratio: on / off for throughput and batch size, off / on for latency (higher is better for batching)")


def served_generator(ckpt: Path | None, device: str = "cpu") -> Generator:
    """The model a serving benchmark runs: `ckpt`, else the shipped model, else a random-weight tiny checkpoint
    (written to a temporary folder; the loaded model keeps no file open)."""
    if ckpt is None and not DEFAULT_CHECKPOINT.is_file():
        with tempfile.TemporaryDirectory() as tmp:
            return Generator.from_checkpoint(random_checkpoint(Path(tmp) / "tiny-random.safetensors"), device)
    return Generator.from_checkpoint(ckpt or DEFAULT_CHECKPOINT, device)


def machine(generator: Generator) -> str:
    """The line that says where a serving benchmark ran."""
    return (f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, load average "
            f"{os.getloadavg()[0]:.2f}, checkpoint {generator.models.path.name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", type=Path, default=None, help="default: the shipped model if present, "
                        "else a random-weight tiny checkpoint")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=96, help="timed requests per mode, split over the rounds")
    parser.add_argument("--rounds", type=int, default=3, help="off/on pairs, interleaved")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--max-wait-ms", type=float, default=20.0)
    parser.add_argument("--timeout", type=float, default=120.0, help="deadline of each request, seconds")
    parser.add_argument("--json", nargs="?", const=str(Path(__file__).with_suffix(".json")), default=None,
                        help="also write the figures as JSON (default path: beside this script)")
    args = parser.parse_args()
    generator = served_generator(args.ckpt, args.device)
    print(f"{machine(generator)}, device {args.device}")
    print(f"workload: {args.clients} clients, {args.requests} requests per mode, {WORKLOAD}")
    runs: dict[bool, list] = {False: [], True: []}
    for i in range(args.rounds):  # alternate the order: background load drifts, both modes see it alike
        for batching in (False, True) if i % 2 == 0 else (True, False):
            runs[batching].append(load(generator, args.clients, args.requests // args.rounds,
                                       args.max_batch if batching else 1, args.max_wait_ms, args.timeout))
    off, on = summary(runs[False]), summary(runs[True])
    per_round = [len(b[1]) / b[0] / (len(a[1]) / a[0]) for a, b in zip(runs[False], runs[True], strict=True)]
    print_table(off, on)
    print(f"throughput ratio per round: {', '.join(f'{r:.2f}x' for r in per_round)}")
    if args.json:
        Path(args.json).write_text(json.dumps({"workload": {**WORKLOAD, "clients": args.clients},
                                               "off": off, "on": on, "ratio_per_round": per_round}, indent=2) + "\n")
        print(f"wrote {args.json}")

if __name__ == "__main__":
    main()
